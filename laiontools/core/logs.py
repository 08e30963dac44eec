"""Logging set-up for the CLI: console on rank 0 only, optional per-process log file."""

from __future__ import annotations

import logging
import os
import sys


def setup_logging(level: str | int = "INFO", log_file: str | None = None) -> None:
    rank = int(os.environ.get("RANK", "0"))
    handlers: list[logging.Handler] = []
    if rank == 0:
        handlers.append(logging.StreamHandler(sys.stderr))
    if log_file:
        os.makedirs(os.path.dirname(os.path.abspath(log_file)), exist_ok=True)
        handlers.append(logging.FileHandler(log_file))
    if not handlers:
        handlers.append(logging.NullHandler())
    for h in handlers:
        h.addFilter(_quiet_root_info)
        h.addFilter(_client_errors_in_one_line)
        h.addFilter(_without_credentials)
    logging.basicConfig(
        level=level,
        format=f"%(asctime)s [r{rank}] %(levelname)s %(name)s: %(message)s",
        handlers=handlers,
        force=True,
    )
    # (botocore and aiobotocore say at INFO where they found the credentials and the endpoint, in every process
    # that opens a store: 8 lines in a reshard, before any error line of the stage's own)
    for noisy in ("py4j", "PIL", "urllib3", "matplotlib", "fsspec", "faiss", "faiss.loader", "botocore", "aiobotocore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _quiet_root_info(record: logging.LogRecord) -> bool:
    """Drop INFO chatter that libraries send to the root logger (open_clip logs every model it builds);
    laiontools logs through named loggers, and warnings from anyone still pass."""
    return record.name != "root" or record.levelno >= logging.WARNING


# Object-store clients that log a traceback (logger.exception) when they give up on a request; the stage
# then ends with its own line naming the path, so theirs is kept to its message.
_CLIENT_LOGGERS = ("gcsfs", "s3fs", "aiobotocore", "botocore")


def _client_errors_in_one_line(record: logging.LogRecord) -> bool:
    """Keep an object-store client's error as its message line, without the traceback it attaches (gcsfs:
    20 lines of aiohttp frames before `laiontools <stage>: error: ...` for an endpoint that never answers)."""
    if record.exc_info and record.name.split(".", 1)[0] in _CLIENT_LOGGERS:
        record.exc_info, record.exc_text = None, None
    return True


def _without_credentials(record: logging.LogRecord) -> bool:
    """Log a line with the credentials a URL or setting in it carries replaced (core/redact.py): a log
    is a record, and a user may type a token into a flag that a stage then names in a message."""
    from laiontools.core.redact import redact_text

    msg = record.getMessage()
    clean = redact_text(msg)
    if clean != msg:
        record.msg, record.args = clean, None
    if record.exc_info and record.exc_info[1] is not None:
        text = logging.Formatter().formatException(record.exc_info)
        clean = redact_text(text)
        if clean != text:  # the traceback's own text, redacted, stands for it
            record.exc_info, record.exc_text = None, None
            record.msg = f"{record.msg}\n{clean}"
    return True


class RateLimitedLogger:
    """Log per-sample failures without flooding: the first `first` of each kind, then every `every`-th."""

    def __init__(self, logger: logging.Logger, first: int = 10, every: int = 1000) -> None:
        self.logger, self.first, self.every = logger, first, every
        self.counts: dict[str, int] = {}

    def warn(self, kind: str, msg: str, *args: object) -> None:
        n = self.counts.get(kind, 0) + 1
        self.counts[kind] = n
        if n <= self.first or n % self.every == 0:
            self.logger.warning(f"[{kind} #{n}] " + msg, *args)


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB (-1 where the platform cannot tell); stages record it per
    task to show that memory per task stays flat as the input grows."""
    try:
        import resource
        import sys

        r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return round(r / (1 << 20) if sys.platform == "darwin" else r / 1024, 1)
    except (ImportError, OSError):  # pragma: no cover - not on POSIX
        return -1.0
