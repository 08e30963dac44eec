"""Errors a user can act on. The CLI prints them as one clear line (exit code 2), without a traceback."""


class UserError(Exception):
    """Bad input or settings: the message names the file/shard/row and says what to do."""


class InputError(UserError, ValueError):
    """Source metadata or another input file is missing, empty, unreadable or lacks required columns."""


# Errors raised inside Spark tasks reach the driver wrapped (py4j / PythonException, the worker's
# traceback as text), so their class is lost. A task marks a problem the user must fix with this tag
# in the message, and the driver turns the first tagged line back into a UserError of its choosing.
TASK_ERROR_TAG = "LAIONTOOLS-USER-ERROR:: "


class TaskError(RuntimeError):
    """A user error raised inside a Spark task, its message tagged (see :func:`task_error`)."""


def task_error(msg: str) -> TaskError:
    """The exception a Spark task raises for a problem the user must fix (a damaged input file, ...):
    ``raise task_error(f"{path}: ...")``. The driver recovers it with :func:`user_error_from`."""
    return TaskError(TASK_ERROR_TAG + msg)


def user_error_from(e: BaseException, cls: type[UserError] = InputError) -> UserError | None:
    """The user error a Spark task raised with :func:`task_error`, as `cls` with the task's message
    (first line only, without the traceback), or None when `e` does not carry one."""
    text = str(e)
    i = text.find(TASK_ERROR_TAG)
    if i < 0:
        return None
    return cls(text[i + len(TASK_ERROR_TAG) :].split("\n", 1)[0])
