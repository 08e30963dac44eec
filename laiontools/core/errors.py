"""Errors a user can act on. The CLI prints them as one clear line (exit code 2), without a traceback."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager


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


@contextmanager
def task_errors_as(cls: type[UserError]) -> Iterator[None]:
    """``with task_errors_as(ReshardError): ...``: an error a Spark task raised with :func:`task_error`
    (it arrives wrapped by py4j) is raised as `cls` with the task's message; a UserError passes as it is,
    anything else too."""
    try:
        yield
    except UserError:
        raise
    except Exception as e:
        err = user_error_from(e, cls)
        if err is not None:
            raise err from None
        raise


# An object store's refusal inside a task (core.storage.StorageError, which names the object and what to
# do) reaches the driver as the last line of the worker's traceback.
_REMOTE_STORAGE_ERROR = re.compile(r"^laiontools\.core\.storage\.StorageError: (?P<msg>.+)$", re.MULTILINE)


def user_error_from(e: BaseException, cls: type[UserError] = InputError) -> UserError | None:
    """The user error a Spark task raised with :func:`task_error` (or an object store's refusal it
    met), as `cls` with the task's message (first line only, without the traceback), or None when `e`
    does not carry one."""
    text = str(e)
    i = text.find(TASK_ERROR_TAG)
    if i < 0:
        m = _REMOTE_STORAGE_ERROR.search(text)
        return cls(m.group("msg")) if m else None
    return cls(text[i + len(TASK_ERROR_TAG) :].split("\n", 1)[0])


class EnvironmentFault(UserError):
    """The machine refused a write the stage needed (disk full, quota, read-only file system)."""


# errno -> what the user does about it. Only faults of the machine, not of the code: these end a run
# with one line (exit 2) wherever they are raised, in the driver or inside a Spark task.
_ENV_ERRNOS = {
    28: ("no space left on device", "free space (or give an output on a larger file system)"),  # ENOSPC
    122: ("disk quota exceeded", "free space or raise the quota"),  # EDQUOT
    30: ("read-only file system", "give an output on a writable file system"),  # EROFS
    # (no errno: Hadoop's local file system, under Spark's own writers, says only that a folder could not be
    # made, for a read-only file system and a permission refused alike)
    "mkdirs": ("cannot create a folder (a read-only file system, no permission, or a file where the folder goes)",
         "give an output every node can write (on a cluster: a path every executor sees and may write)"),
}
# The same faults as Python (OSError) and Java (IOException, e.g. Spark's own parquet writer) word them
# inside the text of an error that Spark wrapped.
_ENV_TEXT = re.compile(
    r"\[Errno (?P<errno>28|122|30)\] [^:'\n]*(?:: '(?P<path>[^'\n]+)')?"
    r"|(?P<java>No space left on device|Disk quota exceeded|Read-only file system)"
    r"|Mkdirs failed to create (?:file:)?(?P<mkdirs>[^\n]+?)(?= \(exists=|\r?\n|$)"
)


def environment_error(e: BaseException, output: str | None = None) -> EnvironmentFault | None:
    """A disk-full / quota / read-only-file-system fault anywhere in `e` (the exception, its causes, or
    the text of a Spark-wrapped task error) as one EnvironmentFault naming the path (the file when
    known, else `output`); None for any other error.

    The message ends with what to do: finished work is kept (completion markers are written last), so
    re-running the same command after freeing space resumes.
    """
    seen: set[int] = set()
    err: BaseException | None = e
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and isinstance(err.errno, int) and err.errno > 0 and err.errno in _ENV_ERRNOS:
            return _env_fault(err.errno, err.filename, output)
        m = _ENV_TEXT.search(str(err))
        if m:
            if m.group("errno"):
                return _env_fault(int(m.group("errno")), m.group("path"), output)
            if m.group("mkdirs"):  # (Hadoop names its task attempt's folder under the output)
                return _env_fault("mkdirs", m.group("mkdirs").split("/_temporary/")[0], output)
            errno = {"No space left on device": 28, "Disk quota exceeded": 122}.get(m.group("java"), 30)
            return _env_fault(errno, None, output)
        err = err.__cause__ or err.__context__
    return None


def _env_fault(errno: int | str, path: str | None, output: str | None) -> EnvironmentFault:
    what, todo = _ENV_ERRNOS[errno]
    where = f"writing {path}" if path else (f"writing under {output}" if output else "writing the output")
    return EnvironmentFault(f"{what} {where}; {todo} and re-run the same command: finished work is kept")


# Spark's own readers name a file they cannot read in an error class (Spark 3.5+/4), e.g.
# "[FAILED_READ_FILE.CANNOT_READ_FILE_FOOTER] Encountered error while reading file file:/x/part-0.parquet."
_SPARK_READ_TEXT = re.compile(r"\[(?P<cls>FAILED_READ_FILE[.\w]*|CANNOT_READ_FILE_FOOTER)\][^\n]*?reading file (?P<path>\S+?)\.?(?:\s|$)")


def damaged_input_error(e: BaseException) -> InputError | None:
    """A file Spark's own reader could not read (cut or damaged parquet: footer or page unreadable),
    as one InputError naming it; None for any other error. Spark raises these at whichever action
    first touches the file, so the CLI, not each stage, recognises them."""
    m = _SPARK_READ_TEXT.search(str(e))
    if m is None:
        return None
    path = m.group("path").removeprefix("file:").replace("///", "/")
    what = "its footer is unreadable" if "FOOTER" in m.group("cls") else "its data is unreadable"
    return InputError(f"{path} is damaged or truncated ({what}); regenerate it by re-running the stage that wrote it")


# A Spark task's Python could not import what its function needs (the worker's traceback, in the text of
# the error py4j / pyspark raise on the driver).
_EXECUTOR_IMPORT = re.compile(r"ModuleNotFoundError: No module named '(?P<mod>[^'\n]+)'")


def executor_import_error(e: BaseException) -> UserError | None:
    """A Spark task that could not import a module on its executor (a node whose Python lacks laiontools or
    one of its dependencies: one that joined after the executors' check, or a run with the check turned
    off), as one UserError naming the module and what to do; None for any other error, and for an import
    that failed on the driver (not wrapped by Spark)."""
    if not type(e).__module__.startswith(("py4j", "pyspark")):
        return None
    m = _EXECUTOR_IMPORT.search(str(e))
    if m is None:
        return None
    mod = m.group("mod")
    return UserError(
        f"a Spark task could not import {mod!r} on an executor (No module named {mod!r}): that executor's Python lacks "
        "laiontools or one of its dependencies; install the driver's laiontools (`laiontools --version`) with its dependencies "
        "in the Python environment every executor runs (spark.pyspark.python / PYSPARK_PYTHON): docs/scale.md, 'What a "
        "cluster run needs'"
    )
