"""Evaluation sets: declare them (``name=path[:format]`` or YAML), read their items, classes and templates.

Dedup (decontamination) and evaluate both read evaluation sets through this module, so an item id
means the same thing in a dedup report and in an evaluation result.

Formats (``EvalSet.format``):

``imagefolder``
    ``<path>/<class>/<image>`` (torchvision's ImageFolder: classes are the sorted subfolder names,
    label = index). Item id: ``<class>/<file>``. A ``classnames.txt`` beside the class folders (one
    human-readable name per line, in sorted-folder order) replaces the folder names in
    :func:`classnames`, as ImageNet's wnid folders need.
``folder``
    a flat folder of images. Item id: the file name. ``<stem>.txt`` beside an image is its caption;
    an optional ``labels.csv`` (``path,label``) gives labels, ``classnames.txt`` their names.
``wds``
    webdataset tars as clip_benchmark writes them: ``<key>.webp|jpg|jpeg|png`` + ``<key>.cls``
    (integer label) [+ ``<key>.txt`` caption], with ``classnames.txt`` and optionally
    ``zeroshot_classification_templates.txt`` beside the tars or one folder up (clip_benchmark puts
    the tars in ``test/``). ``path`` is a tar, a folder of tars, or a folder with ``test/*.tar``.
    Item id: ``<tar stem>/<key>``.
``parquet``
    one parquet file or a folder of them; an image column holding bytes (``image``/``jpg``/``img``/
    ``image_bytes``, or a Hugging Face ``{bytes, path}`` struct) or a path column (``image_path``/
    ``path``/``filepath``, relative to the parquet file), and optional ``label``, ``caption`` and
    ``item_id`` columns (a caption cell may be a list of captions). Item id: the ``item_id`` column,
    else ``<file stem>/<row>``.

An item's ``caption`` may hold several captions of its image, one per line, as clip_benchmark's
retrieval tars (``wds_mscoco_captions``, ``wds_flickr30k``) store them; :func:`caption_lines` splits them.

Unreadable images are not dropped: :func:`iter_items` yields them with ``error`` set and
``image=None``, so callers count them and report them by item id.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import os
import re
import string
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from laiontools.core.errors import UserError
from laiontools.core.images import (
    ImageLimitError,
    OversizeMember,
    check_resized_pixels,
    error_text,
    open_image,
    read_regular_file,
    to_rgb,
)
from laiontools.core.logs import RateLimitedLogger
from laiontools.core.storage import PARQUET_READ, glob_literal, url_to_fs
from laiontools.wds.keys import is_hidden

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

log = logging.getLogger(__name__)
_failures = RateLimitedLogger(log)

FORMATS = ("imagefolder", "folder", "wds", "parquet")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm")
WDS_IMAGE_EXTS = ("webp", "jpg", "jpeg", "png")
CLASSNAMES_FILE = "classnames.txt"
LABELS_FILE = "labels.csv"
TEMPLATES_FILE = "zeroshot_classification_templates.txt"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")

# Parquet column candidates, in order of preference.
_PQ_IMAGE_COLS = ("image", "jpg", "img", "image_bytes", "webp", "png")
_PQ_PATH_COLS = ("image_path", "path", "filepath", "file_path", "file")
_PQ_LABEL_COLS = ("label", "cls", "class", "target")
_PQ_CAPTION_COLS = ("caption", "text", "txt")
_PQ_ID_COLS = ("item_id", "id", "key")

# Used when a set ships no templates file: a few of open_clip's SIMPLE_IMAGENET_TEMPLATES-style
# prompts. Each contains "{c}" (fill with ``t.format(c=classname)``), as clip_benchmark's files do.
DEFAULT_TEMPLATES = (
    "a photo of a {c}.",
    "a bad photo of the {c}.",
    "a photo of many {c}.",
    "a sculpture of a {c}.",
    "a photo of the hard to see {c}.",
    "a low resolution photo of the {c}.",
    "a rendering of a {c}.",
    "a cropped photo of the {c}.",
    "a bright photo of a {c}.",
    "a photo of a large {c}.",
    "a photo of a small {c}.",
    "itap of a {c}.",
)


class EvalSetError(UserError, ValueError):
    """An evaluation set is missing, empty, of an unknown format, or declared twice."""


@dataclasses.dataclass(frozen=True)
class EvalSet:
    """A declared evaluation set. ``path`` is as given (local path or fsspec URL)."""

    name: str
    path: str
    format: str  # imagefolder | folder | wds | parquet

    def to_dict(self) -> dict[str, str]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class EvalItem:
    """One evaluation item. ``image`` is an RGB PIL image, or None with ``error`` set when unreadable."""

    item_id: str
    image: Image.Image | None
    label: int | None
    caption: str | None  # one caption per line (several for an image with several)
    error: str | None


# ---------------------------------------------------------------------------------------------
# declaring sets


def parse_evalset_spec(spec: str) -> EvalSet:
    """Parse ``name=path[:format]``; detect the format from the files when it is omitted.

    A trailing ``:format`` is taken as the format only when it is one of :data:`FORMATS`, so URLs
    (``s3://...``) and Windows-free paths with colons still work. Raises EvalSetError for a bad
    spec, a missing or empty path, or a format that cannot be detected.
    """
    if "=" not in spec:
        raise EvalSetError(f"evaluation set {spec!r}: expected name=path[:format] (formats: {', '.join(FORMATS)})")
    name, _, rest = spec.partition("=")
    name, rest = name.strip(), rest.strip()
    fmt: str | None = None
    head, sep, tail = rest.rpartition(":")
    if sep and tail in FORMATS:
        rest, fmt = head, tail
    elif sep and head and re.fullmatch(r"\w+", tail) and not _exists(rest) and _exists(head):
        # "path:bogus" where path exists is a mistyped format, not a missing path "path:bogus"
        raise EvalSetError(f"evaluation set {name!r}: unknown format {tail!r}; known: {', '.join(FORMATS)}")
    return make_evalset(name, rest, fmt)


def _exists(path: str) -> bool:
    fs, p = url_to_fs(path)
    return bool(fs.exists(p))


def make_evalset(name: str, path: str, fmt: str | None = None, where: str = "") -> EvalSet:
    """Build and check an EvalSet (name syntax, path exists and is not empty, format known/detected)."""
    ctx = f"{where}: " if where else ""
    if not name or not _NAME_RE.match(name):
        raise EvalSetError(
            f"{ctx}evaluation set name {name!r} must be non-empty letters, digits, '_', '-', '.' (it names output files)"
        )
    if not path:
        raise EvalSetError(f"{ctx}evaluation set {name!r} has no path")
    fs, p = url_to_fs(path)
    if not fs.exists(p):
        raise EvalSetError(f"{ctx}evaluation set {name!r}: {path} does not exist; check the path")
    if fmt is None:
        fmt = detect_format(path)
    elif fmt not in FORMATS:
        raise EvalSetError(f"{ctx}evaluation set {name!r}: unknown format {fmt!r}; known: {', '.join(FORMATS)}")
    es = EvalSet(name=name, path=path, format=fmt)
    _check_not_empty(es)
    return es


def detect_format(path: str) -> str:
    """Guess the format of an evaluation set from its files (see the module docstring)."""
    fs, p = url_to_fs(path)
    if fs.isfile(p):
        if p.endswith(".parquet"):
            return "parquet"
        if p.endswith(".tar"):
            return "wds"
        raise EvalSetError(f"evaluation set {path}: a single file must be .parquet or .tar; give a folder otherwise")
    entries = fs.ls(p, detail=True)
    files = [e["name"] for e in entries if e["type"] == "file"]
    dirs = _subdirs(fs, p)
    if any(f.endswith(".parquet") for f in files):
        return "parquet"
    if any(f.endswith(".tar") for f in files):
        return "wds"
    if any(_is_image(f) for f in files):
        return "folder"
    if any(_base(d) == "test" for d in dirs) and fs.glob(glob_literal(p.rstrip("/")) + "/test/*.tar"):
        return "wds"
    for d in dirs:
        if any(_is_image(f) for f in fs.ls(d, detail=False)):
            return "imagefolder"
    raise EvalSetError(
        f"evaluation set {path}: found no images, class folders, .tar or .parquet files; "
        f"give name=path:format with one of {', '.join(FORMATS)} or check the folder"
    )


def _path_identity(path: str) -> str:
    """Same folder under two spellings -> same string (local: realpath; URLs: as written, no trailing '/')."""
    fs, p = url_to_fs(path)
    from laiontools.core.storage import is_local

    if is_local(fs):
        return os.path.realpath(p)
    return f"{fs.protocol}://{p.rstrip('/')}"


def load_evalsets(specs: list[str] | None = None, yaml_path: str | None = None) -> list[EvalSet]:
    """All evaluation sets from ``--evalset`` specs and/or a YAML file, in the order given.

    YAML: a list of ``{name, path[, format]}`` (or ``{evalsets: [...]}``); relative paths are taken
    relative to the YAML file's folder. Refuses duplicate names and the same path declared under two
    names (its items would count twice in every overlap figure). Raises EvalSetError; an empty
    result is an error too.
    """
    sets: list[EvalSet] = []
    for s in specs or []:
        sets.append(parse_evalset_spec(s))
    if yaml_path:
        sets.extend(_load_yaml(yaml_path))
    if not sets:
        raise EvalSetError("no evaluation sets given: pass --evalset name=path[:format] or --evalsets-yaml FILE")
    by_name: dict[str, EvalSet] = {}
    by_path: dict[str, EvalSet] = {}
    for es in sets:
        if es.name in by_name:
            raise EvalSetError(
                f"evaluation set name {es.name!r} is declared twice ({by_name[es.name].path} and {es.path}); names must be unique"
            )
        ident = _path_identity(es.path)
        if ident in by_path:
            raise EvalSetError(
                f"evaluation set {es.path} is declared twice, as {by_path[ident].name!r} and {es.name!r}; "
                f"declare it once (its items would be counted twice)"
            )
        by_name[es.name] = es
        by_path[ident] = es
    return sets


def _read_text(path: str) -> str:
    """The UTF-8 text of a file that the user brings (a leading BOM is dropped).

    Raises EvalSetError naming `path` when it is a folder or not UTF-8 (a classnames file saved as
    Latin-1 would otherwise crash, or with ``errors="replace"`` silently rename classes).
    """
    fs, p = url_to_fs(path)
    if fs.isdir(p):
        raise EvalSetError(f"{path} is a folder; expected a file")
    try:  # a FIFO named classnames.txt would block the read for good, /dev/zero never end
        data = read_regular_file(fs, p)
    except ImageLimitError as e:
        raise EvalSetError(f"{path}: {e}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise EvalSetError(
            f"{path} is not UTF-8 text (byte 0x{data[e.start]:02x} on line {line}); save it as UTF-8"
        ) from e


def _load_yaml(yaml_path: str) -> list[EvalSet]:
    import yaml

    fs, p = url_to_fs(yaml_path)
    if not fs.exists(p):
        raise EvalSetError(f"evaluation sets file {yaml_path} does not exist")
    text = _read_text(yaml_path)
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = getattr(e, "problem", None) or " ".join(str(e).split())
        raise EvalSetError(f"evaluation sets file {yaml_path} is not valid YAML: {what}{where}") from e
    if isinstance(doc, dict) and "evalsets" in doc:
        doc = doc["evalsets"]
    if not isinstance(doc, list) or not doc:
        raise EvalSetError(f"{yaml_path}: expected a non-empty list of {{name, path, format}} entries")
    base = yaml_path.rpartition("/")[0] or "."
    out = []
    for i, entry in enumerate(doc):
        where = f"{yaml_path} entry {i}"
        if not isinstance(entry, dict) or "name" not in entry or "path" not in entry:
            raise EvalSetError(f"{where}: expected a mapping with 'name' and 'path' (and optional 'format'), got {entry!r}")
        unknown = sorted(set(entry) - {"name", "path", "format"})
        if unknown:
            raise EvalSetError(f"{where}: unknown key(s) {unknown}; allowed: name, path, format")
        if entry["name"] is None or isinstance(entry["name"], (dict, list, bool)) or not str(entry["name"]).strip():
            # str() would name the set "None"
            raise EvalSetError(f"{where}: the evaluation set has no name (name: {entry['name']!r}); give it one")
        if entry["path"] is None or isinstance(entry["path"], (dict, list, bool)) or not str(entry["path"]).strip():
            # str() would make a null path the folder "None" (then "…/None does not exist")
            raise EvalSetError(f"{where}: evaluation set {entry['name']!r} has no path (path: {entry['path']!r}); "
                               "give its folder or file")
        path = str(entry["path"])
        if "://" not in path and not os.path.isabs(path):
            path = os.path.normpath(os.path.join(base, path))
        out.append(make_evalset(str(entry["name"]), path, entry.get("format"), where=where))
    return out


# ---------------------------------------------------------------------------------------------
# reading items


def _base(p: str) -> str:
    return p.rstrip("/").rpartition("/")[2]


def _is_image(p: str) -> bool:
    return p.lower().endswith(IMAGE_EXTS)


def decode_image(data: bytes) -> Image.Image:
    """Encoded image bytes -> a loaded RGB PIL image. PIL raises for bytes it cannot decode, and
    :func:`laiontools.core.images.open_image` for an image over the pixel limit (checked from the
    header, before decoding) or a tar member that was over the byte limit, and for a strip that a model's
    resize (short side to its input) would blow up past that limit (:func:`check_resized_pixels`)."""
    im = open_image(data)
    try:
        check_resized_pixels(*im.size)
    except ImageLimitError:
        im.close()
        raise
    im.load()
    return to_rgb(im)


def _read_image(fs: Any, path: str) -> tuple[Image.Image | None, str | None]:
    try:
        # only a regular file, and a bounded read: a FIFO named x.jpg would block, /dev/zero never end
        return decode_image(read_regular_file(fs, path)), None
    except Exception as e:  # noqa: BLE001 - any read or decoder failure is a per-item error, not a crash
        return None, error_text(e)


def printable_id(item_id: str) -> str:
    """`item_id` as valid UTF-8 text: a file name that is not UTF-8 (Python keeps its bytes as surrogate
    escapes) gets them as ``\\xff`` escapes, so parquet and JSON outputs can store it."""
    try:
        raw = item_id.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate that is not an escaped byte
        return item_id.encode("utf-8", "backslashreplace").decode("utf-8")
    return raw.decode("utf-8", "backslashreplace")


def _item(es: EvalSet, item_id: str, image: Any, label: int | None, caption: str | None, error: str | None) -> EvalItem:
    item_id = printable_id(item_id)
    if error is not None:
        error = printable_id(error)
        _failures.warn("unreadable_eval_image", "evaluation set %s: item %s unreadable: %s", es.name, item_id, error)
    return EvalItem(item_id=item_id, image=image, label=label, caption=caption, error=error)


def _subdirs(fs: Any, root: str) -> list[str]:
    """Full paths of the folders in `root`, a symlink to a folder included (ImageNet symlink farms:
    fsspec lists it as type 'other'). Hidden names (a leading '.') are skipped, as the tar readers do."""
    out = []
    for e in fs.ls(root, detail=True):
        if is_hidden(e["name"].rstrip("/")):
            continue
        if e["type"] == "directory" or (e.get("islink") and fs.isdir(e["name"])):
            out.append(e["name"])
    return out


def _imagefolder_classes(fs: Any, root: str) -> list[str]:
    return sorted(_base(d) for d in _subdirs(fs, root))


def _class_files(fs: Any, root: str, cls: str) -> list[str]:
    """Image files under one class folder, sorted; hidden files and folders (``._x.jpg``) left out.

    ``find`` follows the class folder itself when it is a symlink, but not symlinked folders inside
    it, so a symlink loop cannot make it run forever."""
    base = root.rstrip("/") + "/" + cls
    return sorted(f for f in fs.find(base) if _is_image(f)
                  and not any(part.startswith(".") for part in f[len(base) + 1 :].split("/")))


def _iter_imagefolder(es: EvalSet) -> Iterator[EvalItem]:
    fs, root = url_to_fs(es.path)
    for label, cls in enumerate(_imagefolder_classes(fs, root)):
        for f in _class_files(fs, root, cls):
            rel = f[len(root.rstrip("/")) + 1 :]
            image, err = _read_image(fs, f)
            yield _item(es, rel, image, label, None, err)


def _folder_labels(fs: Any, root: str) -> dict[str, int]:
    """file name -> label from an optional ``labels.csv`` (columns ``path,label[,...]``) beside the images."""
    import csv

    path = root.rstrip("/") + "/" + LABELS_FILE
    if not fs.exists(path):
        return {}
    reader = csv.DictReader(io.StringIO(_read_text(path), newline=""))
    out: dict[str, int] = {}
    try:
        if reader.fieldnames and not {"path", "label"} <= set(reader.fieldnames):
            raise EvalSetError(f"{path}: expected columns 'path' and 'label', got {sorted(reader.fieldnames)}")
        for r in reader:
            # DictReader fills the fields a short row lacks with None
            if r["path"] is None or r["label"] is None:
                raise EvalSetError(f"{path} line {reader.line_num}: the row has fewer fields than the header")
            try:
                out[r["path"]] = int(r["label"])
            except ValueError as e:
                raise EvalSetError(f"{path} line {reader.line_num}: label {r['label']!r} is not an integer") from e
    except csv.Error as e:
        raise EvalSetError(f"{path} line {reader.line_num}: not readable as CSV ({e})") from e
    return out


def _iter_folder(es: EvalSet) -> Iterator[EvalItem]:
    fs, root = url_to_fs(es.path)
    names = sorted(fs.ls(root, detail=False))
    present = set(names)
    labels = _folder_labels(fs, root)
    for f in names:
        if not _is_image(f) or is_hidden(f):
            continue
        cap_path = f.rpartition(".")[0] + ".txt"
        caption = cap_err = None
        if cap_path in present:
            try:  # the same rule as for images: a FIFO named x.txt must not block the reader
                caption = read_regular_file(fs, cap_path).decode("utf-8", "replace").strip()
            except ImageLimitError as e:
                cap_err = f"caption {_base(cap_path)}: {e}"
        image, err = _read_image(fs, f)
        if cap_err is not None:
            image, err = None, err or cap_err
        yield _item(es, _base(f), image, labels.get(_base(f)), caption, err)


def _wds_tars(es: EvalSet) -> tuple[Any, list[str]]:
    fs, p = url_to_fs(es.path)
    if fs.isfile(p):
        return fs, [p]
    tars = sorted(fs.glob(glob_literal(p.rstrip("/")) + "/*.tar"))
    if not tars:
        tars = sorted(fs.glob(glob_literal(p.rstrip("/")) + "/test/*.tar"))
    return fs, tars


def _iter_wds(es: EvalSet) -> Iterator[EvalItem]:
    import tarfile

    from laiontools.wds.samples import iter_samples

    fs, tars = _wds_tars(es)
    for tar_path in tars:
        stem = _base(tar_path)[: -len(".tar")]
        with fs.open(tar_path, "rb") as raw:
            try:
                # webdataset's grouping: a sample is a run of adjacent members with the same key.
                for key, files in iter_samples(raw, fs.size(tar_path), on_duplicate="last"):
                    yield _wds_item(es, stem, key, files)
            except tarfile.TarError as e:
                raise EvalSetError(f"evaluation set {es.name!r}: {tar_path} is not a readable tar ({e}); re-create it") from e


def _wds_item(es: EvalSet, stem: str, key: str, files: dict[str, bytes]) -> EvalItem:
    item_id = f"{stem}/{key}"
    label = caption = None
    # a member over the byte limit was not read: its item records why rather than parsing b""
    err = next((error_text(ImageLimitError(v.reason)) for v in files.values() if isinstance(v, OversizeMember)), None)
    try:
        if "cls" in files:
            label = int(files["cls"].decode().strip())
    except ValueError:
        err = err or f"{key}.cls is not an integer: {files['cls'][:20]!r}"
    if "txt" in files:
        caption = files["txt"].decode("utf-8", "replace").strip()
    ext = next((e for e in WDS_IMAGE_EXTS if e in files), None)
    image = None
    if ext is None:
        err = err or f"no image member (.{'/.'.join(WDS_IMAGE_EXTS)}) for key {key}; members: {sorted(files)}"
    elif err is None:
        try:
            image = decode_image(files[ext])
        except Exception as e:  # noqa: BLE001 - a decoder's failure is the item's error
            err = error_text(e)
    return _item(es, item_id, image, label, caption, err)


def _parquet_files(es: EvalSet) -> tuple[Any, list[str]]:
    fs, p = url_to_fs(es.path)
    if fs.isfile(p):
        return fs, [p]
    return fs, sorted(f for f in fs.find(p) if f.endswith(".parquet"))


def _pick(names: list[str], candidates: tuple[str, ...]) -> str | None:
    lower = {n.lower(): n for n in names}
    return next((lower[c] for c in candidates if c in lower), None)


def _iter_parquet(es: EvalSet) -> Iterator[EvalItem]:
    import pyarrow.parquet as pq

    fs, files = _parquet_files(es)
    for fpath in files:
        with fs.open(fpath, "rb") as fh, _parquet_errors(es, fpath):
            pf = pq.ParquetFile(fh, **PARQUET_READ)
            names = pf.schema_arrow.names
            img_col, path_col = _pick(names, _PQ_IMAGE_COLS), _pick(names, _PQ_PATH_COLS)
            if img_col is None and path_col is None:
                raise EvalSetError(
                    f"evaluation set {es.name!r}: {fpath} has no image column (one of {list(_PQ_IMAGE_COLS)}) "
                    f"and no image path column (one of {list(_PQ_PATH_COLS)}); columns: {names}"
                )
            label_col, cap_col, id_col = (_pick(names, c) for c in (_PQ_LABEL_COLS, _PQ_CAPTION_COLS, _PQ_ID_COLS))
            cols = [c for c in (img_col, path_col, label_col, cap_col, id_col) if c is not None]
            stem = _base(fpath)[: -len(".parquet")]
            parent = fpath.rpartition("/")[0]
            row = 0
            # Batches keep memory bounded by the batch, not the file (image bytes can be large).
            for batch in pf.iter_batches(batch_size=256, columns=cols):
                for rec in batch.to_pylist():
                    item_id = str(rec[id_col]) if id_col and rec[id_col] is not None else f"{stem}/{row}"
                    row += 1
                    label = rec[label_col] if label_col else None
                    caption = rec[cap_col] if cap_col else None
                    yield _parquet_item(es, fs, parent, item_id, rec, img_col, path_col, label, caption)


@contextlib.contextmanager
def _parquet_errors(es: EvalSet, fpath: str) -> Iterator[None]:
    """Turn pyarrow's errors on a damaged or non-parquet file into an EvalSetError naming the file."""
    from laiontools.core.storage import parquet_damaged

    try:
        yield
    except Exception as e:
        if not parquet_damaged(e):
            raise
        raise EvalSetError(f"evaluation set {es.name!r}: {fpath} is not a readable parquet file ({e}); re-create it") from e


def caption_lines(caption: str | None) -> list[str]:
    """The captions of an item: one per non-empty line of its caption text (clip_benchmark's retrieval
    tars hold an image's captions that way, and :func:`iter_items` writes a list column so)."""
    return [ln.strip() for ln in caption.splitlines() if ln.strip()] if caption else []


def _caption_text(v: Any) -> str | None:
    """A parquet caption cell as caption text: a list of captions (Hugging Face's flickr30k / COCO
    layout) one per line, not the list's Python repr."""
    if v is None:
        return None
    if isinstance(v, (list, tuple)):
        return "\n".join(str(c).strip() for c in v if c is not None and str(c).strip())
    return str(v)


def _int_label(v: Any) -> int:
    """A label as an int; raises ValueError/TypeError/OverflowError unless it is integral (0.7 is not 0)."""
    n = int(v)
    if not isinstance(v, (str, bytes)) and n != v:
        raise ValueError(f"{v!r} is not integral")
    return n


def _parquet_item(
    es: EvalSet, fs: Any, parent: str, item_id: str, rec: dict, img_col: str | None, path_col: str | None,
    label: Any, caption: Any,
) -> EvalItem:
    data = rec.get(img_col) if img_col else None
    img_path = None
    if isinstance(data, dict):  # Hugging Face datasets' Image feature: {"bytes": ..., "path": ...}
        data, img_path = data.get("bytes"), data.get("path")
    if data is None and path_col:
        img_path = rec.get(path_col) or img_path
    try:
        label = None if label is None else _int_label(label)
    except (TypeError, ValueError, OverflowError):
        return _item(es, item_id, None, None, caption, f"label {label!r} is not an integer")
    caption = _caption_text(caption)
    if data is not None:
        try:
            return _item(es, item_id, decode_image(bytes(data)), label, caption, None)
        except Exception as e:  # noqa: BLE001 - a decoder's failure is the item's error
            return _item(es, item_id, None, label, caption, error_text(e))
    if img_path is not None and not isinstance(img_path, str):
        return _item(es, item_id, None, label, caption, f"image path {img_path!r} is not a string")
    if img_path:
        full = img_path if ("://" in img_path or img_path.startswith("/")) else parent + "/" + img_path
        image, err = _read_image(fs, full)
        return _item(es, item_id, image, label, caption, err)
    return _item(es, item_id, None, label, caption, "row has neither image bytes nor an image path")


_READERS = {"imagefolder": _iter_imagefolder, "folder": _iter_folder, "wds": _iter_wds, "parquet": _iter_parquet}


def iter_items(es: EvalSet) -> Iterator[EvalItem]:
    """Yield every item of `es` in a stable order (same files -> same order and item ids).

    Unreadable images come out as items with ``image=None`` and ``error`` set (logged rate-limited);
    the caller counts and reports them. Raises EvalSetError if the set yields no item at all.
    """
    n = 0
    for item in _READERS[es.format](es):
        n += 1
        yield item
    if n == 0:
        raise EvalSetError(f"evaluation set {es.name!r} ({es.format}) at {es.path} has no items; check the path and format")


def _check_not_empty(es: EvalSet) -> None:
    """Cheap emptiness check by listing (no decoding), so a bad declaration fails before any work."""
    fs, p = url_to_fs(es.path)
    if es.format == "imagefolder":
        ok = fs.isdir(p) and any(_class_files(fs, p, c) for c in _imagefolder_classes(fs, p))
    elif es.format == "folder":
        ok = fs.isdir(p) and any(_is_image(f) for f in fs.ls(p, detail=False))
    elif es.format == "wds":
        ok = any(fs.size(t) > 0 for t in _wds_tars(es)[1])
    else:
        import pyarrow.parquet as pq

        ok = False
        for f in _parquet_files(es)[1]:
            with fs.open(f, "rb") as fh, _parquet_errors(es, f):
                if pq.ParquetFile(fh).metadata.num_rows > 0:
                    ok = True
                    break
    if not ok:
        raise EvalSetError(
            f"evaluation set {es.name!r} at {es.path} is empty (no {es.format} items found); check the path and format"
        )


# ---------------------------------------------------------------------------------------------
# classes and templates


def _aux_file(es: EvalSet, name: str) -> str | None:
    """Find `name` beside the set: in its folder, beside a single file, or one folder above the tars."""
    fs, p = url_to_fs(es.path)
    root = p if fs.isdir(p) else p.rpartition("/")[0]
    candidates = [root.rstrip("/") + "/" + name]
    if es.format == "wds":
        _, tars = _wds_tars(es)
        if tars:
            tar_dir = tars[0].rpartition("/")[0]
            candidates += [tar_dir + "/" + name, tar_dir.rpartition("/")[0] + "/" + name]
    for c in candidates:
        if fs.exists(c):
            # as the set's path is written: a store's path without its protocol would be read as a local
            # path relative to the working folder
            return fs.unstrip_protocol(c) if "://" in es.path and "://" not in c else c
    return None


def _read_lines(path: str) -> list[str]:
    return [ln.strip() for ln in _read_text(path).splitlines() if ln.strip()]


def _template_problem(t: str) -> str | None:
    """Why `t` cannot be filled with ``t.format(c=classname)``, or None if it can.

    As in clip_benchmark, a template is a Python format string whose only field is ``{c}``; other
    fields (``{place}``, ``{}``, ``{c.x}``) and stray braces would fail when evaluate formats it.
    """
    brace = "write a literal brace as '{{' or '}}'"
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(t) if f is not None]
    except ValueError as e:
        return f"not a valid format string ({e}); {brace}"
    other = sorted({f or "{}" for f in fields if f != "c"})
    if other:
        return f"only {{c}} may appear in braces, found {', '.join(other)}; {brace}"
    if not fields:
        return "no {c} placeholder for the class name"
    try:
        t.format(c="x")  # a conversion or format spec of {c} that str cannot take, e.g. {c:d}
    except (ValueError, TypeError) as e:
        return f"{{c}} cannot be formatted ({e})"
    return None


def classnames(es: EvalSet) -> list[str] | None:
    """Class names in label order, or None for a set without classes.

    ``classnames.txt`` (one per line) when present; else, for ImageFolder, the sorted subfolder
    names. Raises EvalSetError if an ImageFolder's classnames.txt has a different count than its
    class folders (labels would be misnamed).
    """
    aux = _aux_file(es, CLASSNAMES_FILE)
    names = _read_lines(aux) if aux else None
    if es.format == "imagefolder":
        fs, root = url_to_fs(es.path)
        folders = _imagefolder_classes(fs, root)
        if names is not None and len(names) != len(folders):
            raise EvalSetError(
                f"evaluation set {es.name!r}: {aux} lists {len(names)} class names but there are "
                f"{len(folders)} class folders; fix one of them"
            )
        return names or folders
    return names


def templates(es: EvalSet) -> list[str]:
    """Zero-shot prompt templates (each with ``{c}``): the set's templates file, else :data:`DEFAULT_TEMPLATES`."""
    aux = _aux_file(es, TEMPLATES_FILE)
    if aux:
        lines = []
        for n, raw in enumerate(_read_text(aux).splitlines(), 1):
            t = raw.strip()
            if not t:
                continue
            problem = _template_problem(t)
            if problem:
                raise EvalSetError(f"{aux} line {n}: template {t!r}: {problem}")
            lines.append(t)
        if lines:
            return lines
    return list(DEFAULT_TEMPLATES)
