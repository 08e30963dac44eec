"""A synthetic LAION: images that captions describe, LAION-format metadata, and a local "web" that fails.

Everything downstream (download tests, the demo, benchmarks, dedup tests) runs on this instead of
the internet. Typical use — start the server first, because the URLs in the metadata need its port::

    with SyntheticWebServer(f"{work}/images") as web:
        src = make_source(work, n=80, base_url=web.base_url, evalset=True)
        # src["source"] is LAION metadata; src["expected"] says how each row must end in the catalog

Modules: ``images`` (pool images + captions), ``evalset`` (eval set + planted copies), ``source``
(metadata files, routes and expected statuses), ``server`` (the HTTP server).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

from laiontools.core.config import ConfigError, StageConfig, add_config_args, config_from_args
from laiontools.synthetic.evalset import (
    EVAL_FORMATS,
    GLYPHS,
    PLANT_ID_BASE,
    PLANT_TRANSFORMS,
    load_evalset,
    plant_copies,
    render_eval_item,
    write_evalset,
)
from laiontools.synthetic.images import COLOURS, SHAPES, TEXTURES, WORDS, render_item, write_images
from laiontools.synthetic.server import SyntheticWebServer, huge_png
from laiontools.synthetic.source import (
    CAPTION_TOO_LONG_CHARS,
    DEFAULT_BROKEN,
    EXPECTED_COLUMNS,
    FORMATS,
    HTTP_ROUTES,
    PROFILES,
    ROUTES,
    SLOW_SECONDS,
    TRANSIENT_ROUTES,
    URL_TOO_LONG_CHARS,
    expected_path,
    expected_status,
    is_private_host,
    write_source,
)

__all__ = [
    "CAPTION_TOO_LONG_CHARS", "COLOURS", "DEFAULT_BROKEN", "EVAL_FORMATS", "EXPECTED_COLUMNS", "FORMATS", "GLYPHS",
    "HTTP_ROUTES", "PLANT_ID_BASE", "PLANT_TRANSFORMS", "PROFILES", "ROUTES", "SHAPES",
    "SLOW_SECONDS", "TEXTURES", "TRANSIENT_ROUTES", "URL_TOO_LONG_CHARS", "WORDS", "SynthConfig",
    "SyntheticWebServer", "build_parser", "expected_path", "expected_status", "huge_png", "is_private_host", "load_evalset", "main", "make_source",
    "plant_copies", "render_eval_item", "render_item", "write_evalset", "write_images", "write_source",
]

log = logging.getLogger(__name__)

IMAGES_DIR = "images"
EVALSET_DIR = "evalset"
SOURCE_DIR = "source"


def make_source(workdir: str, n: int, base_url: str, *, seed: int = 0, profile: str = "laion400m",
                fmt: str = "parquet", realistic: bool = False, broken: dict[str, float] | None = None,
                evalset: bool = False, n_files: int = 1, processes: int = 1) -> dict[str, Any]:
    """Write a whole synthetic source under `workdir` and return where everything is.

    ``<workdir>/images``: n pool images (+ planted copies when evalset); ``<workdir>/evalset``: an
    ImageFolder eval set (5 classes x 4) when evalset; ``<workdir>/source/part-*.<fmt>``: metadata
    whose URLs start with `base_url` (a SyntheticWebServer over ``<workdir>/images``, started
    before or after: files are read at request time); ``<workdir>/source.expected.parquet``.
    Returns ``{"source", "images", "expected" (DataFrame), "evalset" (dir or None), "planted"
    (DataFrame: id, file, eval_item, transform, expected_uid; empty without evalset)}``. `processes`: the
    pool images are rendered in that many processes (the same files; for benchmarks' tens of thousands).
    """
    import pandas as pd

    images = os.path.join(workdir, IMAGES_DIR)
    items = write_images(images, n, seed=seed, realistic=realistic, processes=processes)
    ev_dir = None
    planted: list[dict[str, Any]] = []
    if evalset:
        ev_dir = os.path.join(workdir, EVALSET_DIR)
        ev = write_evalset(ev_dir, seed=seed + 1)
        planted = plant_copies(ev, ev_dir, images, seed=seed)
    source = os.path.join(workdir, SOURCE_DIR)
    expected = write_source(source, base_url, items + planted, profile=profile, fmt=fmt, n_files=n_files,
                            broken=broken, seed=seed)
    pl = expected[expected["eval_item"].notna()][["item_id", "file", "eval_item", "transform", "expected_uid"]]
    pl = pl.rename(columns={"item_id": "id"}).reset_index(drop=True)
    if not planted:
        pl = pd.DataFrame(columns=["id", "file", "eval_item", "transform", "expected_uid"])
    return {"source": source, "images": images, "expected": expected, "evalset": ev_dir, "planted": pl}


@dataclass
class SynthConfig(StageConfig):
    output: str = field(default="", metadata={"help": "folder to write images/, source/ (and evalset/) into"})
    n: int = field(default=100, metadata={"help": "number of pool images"})
    profile: str = field(default="laion400m", metadata={"help": f"metadata columns: {', '.join(PROFILES)}"})
    format: str = field(default="parquet", metadata={"help": f"metadata file format: {', '.join(FORMATS)}"})
    n_files: int = field(default=1, metadata={"help": "split the metadata into this many files"})
    realistic: bool = field(default=False, metadata={"help": "512-800 px photo-like images (for benchmarks)"})
    evalset: bool = field(default=False, metadata={"help": "also write an eval set and plant copies of it in the pool"})
    seed: int = field(default=0, metadata={"help": "random seed (same seed, same files)"})
    broken: bool = field(default=True, metadata={"help": "send ~25%% of rows down broken routes (--no-broken: a clean source)"})
    serve: bool = field(default=False, metadata={"help": "serve the images and point the metadata at this server"})
    serve_seconds: float | None = field(default=None, metadata={"help": "with --serve: stop after this many seconds"})
    port: int = field(default=0, metadata={"help": "with --serve: port on 127.0.0.1 (0 = any free port)"})
    base_url: str = field(default="http://127.0.0.1:8000",
                          metadata={"help": "without --serve: the base URL written into the metadata"})

    def validate(self) -> None:
        if not self.output:
            raise ConfigError("synth: --output is required (a folder to write into)")
        if self.n < 1:
            raise ConfigError(f"synth: --n must be >= 1, got {self.n}")
        if self.profile not in PROFILES:
            raise ConfigError(f"synth: unknown --profile {self.profile!r}; known: {', '.join(PROFILES)}")
        if self.format not in FORMATS:
            raise ConfigError(f"synth: unknown --format {self.format!r}; known: {', '.join(FORMATS)}")
        if self.n_files < 1:
            raise ConfigError(f"synth: --n-files must be >= 1, got {self.n_files}")
        if self.serve_seconds is not None and self.serve_seconds < 0:
            raise ConfigError(f"synth: --serve-seconds must be >= 0, got {self.serve_seconds}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="laiontools synth",
        description="Write a synthetic LAION-format source (images + metadata + expected statuses) and optionally serve it "
                    "on 127.0.0.1 with routes that fail the ways the web fails.",
    )
    add_config_args(p, SynthConfig)
    return p


def main(argv: list[str] | None = None) -> int:
    """``laiontools synth --output DIR --n N [--profile P] [--format F] [--realistic] [--evalset] [--serve]``."""
    from laiontools.core.report import emit, table

    cfg = config_from_args(SynthConfig, build_parser().parse_args(argv))
    from laiontools.core.storage import ensure_output_dir, write_json

    ensure_output_dir(cfg.output)
    server = SyntheticWebServer(os.path.join(cfg.output, IMAGES_DIR), port=cfg.port) if cfg.serve else None
    try:
        base_url = server.start().base_url if server else cfg.base_url
        t0 = time.monotonic()
        src = make_source(cfg.output, cfg.n, base_url, seed=cfg.seed, profile=cfg.profile, fmt=cfg.format,
                          realistic=cfg.realistic, broken=None if cfg.broken else {}, evalset=cfg.evalset,
                          n_files=cfg.n_files)
        write_json(os.path.join(cfg.output, "synth.settings.json"), {**dataclasses.asdict(cfg), "base_url": base_url})
        exp = src["expected"]
        counts = exp.groupby(["route", "expected"]).size().reset_index(name="rows")
        emit(table(counts.to_dict("records")))
        emit(f"wrote {len(exp)} rows ({(exp['expected'] == 'success').sum()} expected to succeed) in "
             f"{time.monotonic() - t0:.1f}s\n  source:   {src['source']}\n  expected: {expected_path(src['source'])}\n"
             f"  images:   {src['images']}" + (f"\n  evalset:  {src['evalset']}" if src["evalset"] else ""))
        if server:
            emit(f"serving {src['images']} at {base_url}  (Ctrl-C to stop)")
            deadline = None if cfg.serve_seconds is None else time.monotonic() + cfg.serve_seconds
            try:
                while deadline is None or time.monotonic() < deadline:
                    time.sleep(0.2)
            except KeyboardInterrupt:
                pass
    finally:
        if server:
            server.stop()
    return 0
