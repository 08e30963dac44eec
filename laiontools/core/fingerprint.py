"""What laiontools code a process imports (its code fingerprint), and the refusal of a Spark worker whose code
is not the driver's. Standard library only, and no import of laiontools modules but core.errors (a leaf):
laiontools/__init__ imports this in an executor's Python worker (:func:`refuse_other_driver_code`), and
core.spark ships :func:`fingerprint_probe`'s probe by value to executors that may run other code."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

_FINGERPRINT: dict[str, str] = {}


def fingerprint_probe() -> Any:
    """The function that says which laiontools a process imports: ``probe(anything)`` yields one
    (host, version, code sha256, folder), or (host, "", "", the import error) when laiontools cannot be
    imported there. Made inside this factory, so that cloudpickle ships its code by value: an executor
    runs it whatever laiontools it has (an older release, another checkout) or lacks."""

    def probe(_: Any) -> Iterator[tuple[str, str, str, str]]:
        import hashlib
        import os
        import socket

        host = socket.gethostname()
        try:
            import importlib

            # (by name, not an import statement: the probe asks whatever Python runs it which laiontools it
            # imports, an executor's included; this module is itself imported by laiontools/__init__)
            laiontools = importlib.import_module("laiontools")

            # ... and what every stage's tasks import with it (laiontools/__init__ alone holds only the version:
            # an executor Python without numpy passed, then each task failed on a raw ModuleNotFoundError)
            for dep in ("numpy", "pandas", "pyarrow"):
                importlib.import_module(dep)
        except Exception as e:  # noqa: BLE001 - whatever stops the import is what the driver reports
            yield host, "", "", f"{type(e).__name__}: {e}"
            return
        root = os.path.dirname(os.path.realpath(laiontools.__file__))
        files = []
        for d, dirs, names in os.walk(root, followlinks=True):  # schemas/ is a link in a checkout, a folder when installed
            dirs[:] = [x for x in dirs if x != "__pycache__"]
            files += [os.path.join(d, x) for x in names if x.endswith((".py", ".json", ".c"))]  # what a wheel installs
        h = hashlib.sha256()
        for name, path in sorted((os.path.relpath(f, root).replace(os.sep, "/"), f) for f in files):
            with open(path, "rb") as fh:
                data = fh.read()
            h.update(b"%d:%s%d:" % (len(name.encode()), name.encode(), len(data)))
            h.update(data)
        yield host, str(getattr(laiontools, "__version__", "?")), h.hexdigest(), root

    return probe


def code_fingerprint() -> dict[str, str]:
    """What this process runs of laiontools: its version, the sha256 of its package's code and data
    (each ``.py``, ``.json`` and ``.c`` file: name and bytes, the files a wheel installs) and the folder it
    was imported from. A checkout and an install of the same commit give the same sha256; one changed file
    changes it. Whether the optional compiled module was built is not part of it: built or not, the stages
    write the same bytes (laiontools/wds/native.py)."""
    if not _FINGERPRINT:
        _, version, sha, path = next(fingerprint_probe()(None))
        _FINGERPRINT.update(version=version, sha256=sha, path=path)
    return dict(_FINGERPRINT)


# Set (by core.spark.check_executors) in the environment of every executor's Python worker that runs this driver's tasks: the
# driver's code fingerprint, as JSON. laiontools/__init__ compares it with its own (refuse_other_driver_code).
DRIVER_CODE_ENV = "LAIONTOOLS_DRIVER_CODE"


def refuse_other_driver_code(driver: str) -> None:
    """In an executor's Python worker (laiontools/__init__, when :data:`DRIVER_CODE_ENV` is set): raise an
    ImportError (a task error the driver reports in one line) unless this process imports the same laiontools
    code as the driver whose fingerprint `driver` holds. The executors' check (core.spark.check_executors) probes
    the executors there are when a stage starts; one that registers later (a standalone master schedules
    on the executors it has at once; dynamic allocation adds them as a stage grows) is refused here, at the
    first import of laiontools in each of its Python workers: it runs none of the stage's code."""
    import json
    import socket

    from laiontools.core.errors import TASK_ERROR_TAG

    want = json.loads(driver)
    mine = code_fingerprint()
    if mine["sha256"] == want.get("sha256"):
        return
    where = (f"laiontools {mine['version']}, code sha256 {mine['sha256'][:12]}, from {mine['path']}" if mine["sha256"]
             else f"cannot import what laiontools needs: {mine['path']}")
    raise ImportError(
        f"{TASK_ERROR_TAG}an executor that joined after the executors' check, or whose code changed since ({socket.gethostname()}: "
        f"{where}), does not run this driver's laiontools; install laiontools {want.get('version')} (the driver's, from {want.get('path')}, code sha256 "
        f"{str(want.get('sha256'))[:12]}) in the Python environment every executor runs (spark.pyspark.python / PYSPARK_PYTHON): "
        "docs/scale.md, 'What a cluster run needs'"
    )
