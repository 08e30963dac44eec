"""Errors a user can act on. The CLI prints them as one clear line (exit code 2), without a traceback."""


class UserError(Exception):
    """Bad input or settings: the message names the file/shard/row and says what to do."""


class InputError(UserError, ValueError):
    """Source metadata or another input file is missing, empty, unreadable or lacks required columns."""
