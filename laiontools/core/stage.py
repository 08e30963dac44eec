"""The one stage contract: a typed config, ``run(cfg, spark=None) -> StageResult``, one CLI main.

Every stage module (``laiontools/stages/<name>.py``) declares::

    STAGE = "reshard"                      # the name in cli.STAGES
    CONFIG = ReshardConfig                 # a StageConfig dataclass; required settings and path checks in validate()

    @stage_entry(STAGE)
    def run(cfg: ReshardConfig, spark: Any = None) -> StageResult: ...

and optionally ``build_parser()`` when some flag needs more than :func:`~laiontools.core.config.add_config_args`
gives. :func:`stage_main` is the CLI of every stage (parse flags + ``--config`` YAML, ``run``, print the
summary), so adding a stage is one module plus one line in ``cli.STAGES``.

``stage_entry`` is the runner that every call goes through (CLI, ``jobs/`` under spark-submit, the demo,
the study, tests): it times the call and stamps the result with the stage name. Spark stages take a
:class:`SparkStageConfig` (its ``master`` and ``spark_conf`` settings) and get their session from
:func:`stage_spark`: the session passed in, else spark-submit's or the active one, else a new embedded one
that is stopped when the stage returns.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from laiontools.core.config import StageConfig, add_config_args, config_from_args

C = TypeVar("C", bound=StageConfig)


@dataclasses.dataclass
class StageResult:
    """What every stage's ``run`` returns.

    ``outputs``: name -> path of what the stage wrote (``manifest``, ``report``, ...); ``counts``: name ->
    number (rows, shards, duplicates, ...); ``timings``: name -> seconds (``total`` is set by the runner);
    ``details``: the stage's own result (the report dict, the subset rows, ...) for callers that need
    more; ``summary``: the text the CLI prints; ``ok``: False when the stage finished but left some work
    failed (listed in its report); the CLI then exits 1.
    """

    stage: str = ""
    outputs: dict[str, str] = dataclasses.field(default_factory=dict)
    counts: dict[str, int] = dataclasses.field(default_factory=dict)
    timings: dict[str, float] = dataclasses.field(default_factory=dict)
    details: Any = None
    summary: str = ""
    ok: bool = True

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class SparkStageConfig(StageConfig):
    """Settings every Spark stage shares; the only place a Spark master is chosen.

    ``master`` is used only when this process has no session yet (not under spark-submit, whose
    ``--master`` wins); unset, ``LAIONTOOLS_SPARK_MASTER`` or ``local[*]`` applies (core/spark.py).
    """

    master: str | None = dataclasses.field(
        default=None, metadata={"help": "Spark master for a new embedded session (default: $LAIONTOOLS_SPARK_MASTER "
                                         "or local[*]; under spark-submit its --master applies)"})
    spark_conf: dict[str, str] = dataclasses.field(
        default_factory=dict, metadata={"help": "Spark settings for a new embedded session (YAML mapping)"})


# Settings that choose where a stage runs, not what it writes: never part of an output's identity.
RUNTIME_SETTINGS = frozenset({"master", "spark_conf"})


@contextmanager
def stage_spark(cfg: StageConfig, spark: Any = None, app_name: str = "laiontools") -> Iterator[Any]:
    """The SparkSession a stage runs on: ``spark`` if given, else one from :func:`core.spark.spark_session`
    (spark-submit's or the active one, left running; or a new one on ``cfg.master``, stopped on exit)."""
    if spark is not None:
        yield spark
        return
    from laiontools.core.spark import spark_session

    master = getattr(cfg, "master", None)
    conf = dict(getattr(cfg, "spark_conf", None) or {}) or None
    with spark_session(master, app_name=app_name, conf=conf) as s:
        yield s


def stage_entry(name: str) -> Callable[[Callable[..., StageResult]], Callable[..., StageResult]]:
    """Make ``fn(cfg, spark=None) -> StageResult`` a stage's ``run``: every call goes through here."""

    def wrap(fn: Callable[..., StageResult]) -> Callable[..., StageResult]:
        @functools.wraps(fn)
        def run(cfg: StageConfig, spark: Any = None) -> StageResult:
            t0 = time.time()
            result = fn(cfg, spark)
            result.stage = name
            result.timings.setdefault("total", round(time.time() - t0, 3))
            return result

        run.stage_name = name  # type: ignore[attr-defined]
        return run

    return wrap


def config_parser(cls: type[StageConfig], prog: str, description: str = "",
                  skip: tuple[str, ...] = ()) -> argparse.ArgumentParser:
    """An argparse parser with one flag per config field (see :func:`add_config_args`)."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    add_config_args(p, cls, skip=skip)
    return p


def stage_main(module_name: str, argv: list[str] | None = None) -> int:
    """The CLI of every stage module: flags (+ ``--config`` YAML) -> config -> ``run`` -> printed summary.

    Exit code 0, or 1 when the stage finished with failed work listed in its report (``ok`` False).
    UserErrors propagate: the CLI (``cli.run_stage``) prints them as one line, tests assert on them.
    """
    import sys

    from laiontools.core.report import emit

    mod = importlib.import_module(module_name)
    if hasattr(mod, "build_parser"):
        parser = mod.build_parser()
    else:
        doc = (mod.__doc__ or "").strip().split("\n")[0]
        parser = config_parser(mod.CONFIG, prog=f"laiontools {mod.STAGE}", description=doc)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    cfg = config_from_args(mod.CONFIG, args)
    result = mod.run(cfg)
    if result.summary:
        emit(result.summary)
    return 0 if result.ok else 1
