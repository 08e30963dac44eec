"""`laiontools <stage> ...`: one command, one module per stage.

A stage module follows the stage contract of :mod:`laiontools.core.stage` (``STAGE``, ``CONFIG``,
``run(cfg, spark=None) -> StageResult``) and gets its command line from :func:`~laiontools.core.stage.stage_main`;
adding a stage is that module plus one line in STAGES. Tools that are not stages (verify, inspect, synth)
expose ``main(argv) -> int`` instead. Modules are imported only when their stage runs, so
``laiontools --help`` stays instant.
"""

from __future__ import annotations

import importlib
import sys

# stage name -> (module, one-line help)
STAGES: dict[str, tuple[str, str]] = {
    "prepare": ("laiontools.stages.prepare", "normalize source metadata, assign uids, apply URL policy (Spark)"),
    "download": ("laiontools.stages.download", "prepare + img2dataset download into a webdataset pool with catalog and manifest (Spark)"),
    "embed": ("laiontools.stages.embed", "open_clip image/text embeddings and CLIP scores for a pool"),
    "dedup": ("laiontools.stages.dedup", "find pool samples that are near-duplicates of evaluation sets (faiss, Spark)"),
    "dedup calibrate": ("laiontools.stages.dedup_calibrate", "measure which dedup --threshold fits a model (planted copies)"),
    "semdedup": ("laiontools.stages.semdedup", "semantic near-duplicates inside a pool: k-means + in-cluster pairs, exclusion list per eps (faiss, Spark)"),
    "subsets": ("laiontools.stages.subsets", "filters + dedup exclusions + seeded nested subsets with manifests (Spark)"),
    "takedown": ("laiontools.stages.takedown", "remove what a removal list names from a pool into a new pool (parent, audit log; Spark)"),
    "reshard": ("laiontools.stages.reshard", "write a subset into shuffled, evenly sized webdataset shards (Spark)"),
    "verify": ("laiontools.stages.verify", "re-check every file a manifest names (sha256, counts, uids, nesting)"),
    "inspect": ("laiontools.stages.verify", "print a readable summary of a manifest"),
    "train": ("laiontools.stages.train", "DDP training of an open_clip model on a manifest with a fixed samples-seen budget"),
    "evaluate": ("laiontools.stages.evaluate", "zero-shot classification and retrieval on evaluation sets"),
    "study": ("laiontools.stages.study", "grid of scale x samples-seen x model runs, scaling-law fit and report"),
    "study fit": ("laiontools.stages.study", "frontier, power-law fit, plots and report from a results table (ours or another's)"),
    "study plan": ("laiontools.stages.study", "GMACs, GPU-hours, shards and disk of a study grid, before running it"),
    "plan": ("laiontools.stages.plan", "cores, GPUs, tasks, partitions, bytes and cost of each data stage for N rows on a cluster, before running it"),
    "synth": ("laiontools.synthetic", "write a synthetic LAION-format source (metadata + images) and/or serve it"),
    "demo": ("laiontools.stages.demo", "the whole pipeline on a synthetic source, on this machine"),
}

# Stages whose module serves several commands pick the entry point by name.
_ENTRY = {"inspect": "inspect_main", "verify": "verify_main", "study fit": "fit_main", "study plan": "plan_main"}


def _usage() -> str:
    width = max(map(len, STAGES))
    lines = ["usage: laiontools <stage> [options]   (laiontools <stage> --help for a stage's options)", "", "stages:"]
    lines += [f"  {name.ljust(width)}  {help_}" for name, (_, help_) in STAGES.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from laiontools import __version__

        print(f"laiontools {__version__}")
        return 0
    stage, rest = argv[0], argv[1:]
    if rest and f"{stage} {rest[0]}" in STAGES:  # two-word stages: `dedup calibrate`
        stage, rest = f"{stage} {rest[0]}", rest[1:]
    if stage not in STAGES:
        import difflib

        close = difflib.get_close_matches(stage, STAGES, n=3)
        print(f"laiontools: unknown stage {stage!r}" + (f"; did you mean {', '.join(close)}?" if close else ""), file=sys.stderr)
        print(_usage(), file=sys.stderr)
        return 2
    return run_stage(stage, rest)


def run_stage(stage: str, argv: list[str]) -> int:
    """Run one stage's entry point with logging set up; user errors become one line and exit code 2.

    Used by the CLI and by the spark-submit scripts in jobs/, so both behave the same.
    """
    from laiontools.core.errors import (
        UserError,
        damaged_input_error,
        environment_error,
        executor_import_error,
        user_error_from,
    )
    from laiontools.core.logs import setup_logging
    from laiontools.core.redact import redact_text

    setup_logging()
    try:
        module = importlib.import_module(STAGES[stage][0])
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] == "laiontools":
            raise
        # a Python without laiontools' dependencies (under spark-submit: spark.pyspark.python named for the driver
        # a Python that has laiontools on its path but not what it imports): one line, not a traceback
        import traceback

        where = next((f" (imported at {fr.filename}:{fr.lineno})" for fr in reversed(traceback.extract_tb(e.__traceback__))
                      if "laiontools" in fr.filename), "")
        print(f"laiontools {stage}: error: this Python ({sys.executable}) cannot import {e.name!r}{where}, which laiontools needs; "
              "run it with the Python environment laiontools is installed in (under spark-submit: spark.pyspark.driver.python "
              "or PYSPARK_DRIVER_PYTHON for the driver, spark.pyspark.python for the executors)", file=sys.stderr)
        return 2
    try:
        if hasattr(module, "run") and hasattr(module, "CONFIG") and stage not in _ENTRY:
            from laiontools.core.stage import stage_main

            return stage_main(module.__name__, argv)
        return int(getattr(module, _ENTRY.get(stage, "main"))(argv) or 0)
    except (UserError, FileNotFoundError, NotADirectoryError, IsADirectoryError) as e:
        # (IsADirectoryError: a folder given where a file is read: --config, --blocklist, a manifest's path)
        print(redact_text(f"laiontools {stage}: error: {e}"), file=sys.stderr)
        return 2
    except Exception as e:
        # A full disk, a quota or a read-only file system is the machine's fault, not the code's, and a
        # file Spark's reader cannot read is a damaged input, as is what a task raised with task_error
        # and no stage turned back into a UserError: one line naming the path, wherever it was raised
        # (here or inside a Spark task), no traceback.
        fault = (environment_error(e, _flag(argv, "--output")) or damaged_input_error(e) or user_error_from(e)
                 or executor_import_error(e))
        if fault is None:  # an object store's refusal outside the places that name their path: the URL it names
            from laiontools.core.storage import failing_url, store_error

            fault = store_error(e, failing_url(e, [a.split("=", 1)[-1] for a in argv if "://" in a]))
        if fault is None:
            raise
        print(redact_text(f"laiontools {stage}: error: {fault}"), file=sys.stderr)
        return 2


def _flag(argv: list[str], name: str) -> str | None:
    """The value of `name` in argv (``--name v`` or ``--name=v``), if given."""
    for i, a in enumerate(argv):
        if a == name and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


if __name__ == "__main__":
    sys.exit(main())
