"""The import graph of laiontools/ keeps the architecture: no cycles, no private imports across modules,
library modules never import stages, and a stage imports another stage only where it runs it."""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
STAGES = "laiontools.stages."
# stage -> stages it may import: it runs them (demo, study, download runs prepare), or they are its own
# parts (dedup calibrate reuses dedup's index and search; the gallery page; the trainer's worker).
ALLOWED_STAGE_IMPORTS = {
    "demo": {"*"},
    "study": {"*"},
    "plan": {"*"},  # the plan takes each stage's own thresholds (engine, spans, joins), so that it cannot drift from them
    "download": {"prepare"},
    "dedup_calibrate": {"dedup"},
    "dedup": {"dedup_gallery"},
    "semdedup": {"dedup", "dedup_gallery"},
    "train": {"train_worker"},
}
# Not library code: fixtures that build a stage's output the way the stage would.
LIBRARY_EXCEPTIONS = {"laiontools.testing"}


def _modules() -> dict[str, pathlib.Path]:
    mods = {}
    for p in (ROOT / "laiontools").rglob("*.py"):
        name = ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        mods[name] = p
    return mods


def _graph() -> tuple[dict[str, set[str]], list[tuple[str, str, str]]]:
    """module -> laiontools modules it imports (anywhere in the file), and private names imported."""
    mods = _modules()

    def owner(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    private = []
    for name, path in mods.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in mods]
                if node.module.startswith("laiontools"):
                    private += [(name, node.module, a.name) for a in node.names
                                if a.name.startswith("_") and not a.name.startswith("__")]
            for t in targets:
                o = owner(t) if t.startswith("laiontools") else None
                if o and o != name:
                    deps.add(o)
        graph[name] = deps
    return graph, private


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    graph, _ = _graph()
    assert len(graph) > 40  # the walk found the package
    assert _cycles(graph) == []


def test_no_private_imports_across_modules():
    _, private = _graph()
    assert private == []


def test_library_modules_do_not_import_stages():
    graph, _ = _graph()
    bad = sorted((a, b) for a, deps in graph.items() for b in deps
                 if b.startswith(STAGES) and not a.startswith(STAGES) and a != "laiontools.cli"
                 and not any(a.startswith(x) for x in LIBRARY_EXCEPTIONS))
    assert bad == []


def test_stages_import_only_the_stages_they_run():
    graph, _ = _graph()
    bad = []
    for a, deps in graph.items():
        if not a.startswith(STAGES):
            continue
        allowed = ALLOWED_STAGE_IMPORTS.get(a[len(STAGES):], set())
        for b in deps:
            if b.startswith(STAGES) and "*" not in allowed and b[len(STAGES):] not in allowed:
                bad.append((a, b))
    assert sorted(bad) == []


# pyarrow has no global default for parquet page checksums: every call that writes or reads parquet pages
# passes core.storage's options (a call without them writes no CRCs, or reads without checking them, and
# nothing else would notice). Calls that read only a file's footer (its metadata or schema) read no page.
_PARQUET_WRITERS = {"write_table", "ParquetWriter", "to_parquet", "write_dataset"}
_PARQUET_READERS = {"read_table", "read_parquet", "ParquetFile", "ParquetDataset", "read_pandas"}
_FOOTER_ONLY = {"metadata", "schema_arrow", "schema", "num_row_groups"}


def _parquet_calls_without_crc_options(tree: ast.AST) -> list[tuple[int, str]]:
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    bad = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
        if name in _PARQUET_WRITERS:
            want = "PARQUET_WRITE"
        elif name in _PARQUET_READERS:
            parent = parents.get(node)
            if isinstance(parent, ast.Attribute) and parent.attr in _FOOTER_ONLY:
                continue
            want = "PARQUET_READ"
        else:
            continue
        # **PARQUET_WRITE, or the options merged into a dict that is unpacked: **{**PARQUET_WRITE, "compression": c}
        given = [k.value for k in node.keywords if k.arg is None]
        given += [v for d in given if isinstance(d, ast.Dict) for key, v in zip(d.keys, d.values) if key is None]
        passed = {v.id for v in given if isinstance(v, ast.Name)}
        if want not in passed:
            bad.append((node.lineno, f"{name}(...) without **{want}"))
    return bad


def test_every_parquet_page_read_and_write_passes_the_checksum_options():
    found = []
    for path in sorted([*(ROOT / "laiontools").rglob("*.py"), *(ROOT / "jobs").glob("*.py")]):
        if "testing" in path.parts:
            continue  # test helpers read what the tests wrote
        for line, what in _parquet_calls_without_crc_options(ast.parse(path.read_text())):
            found.append(f"{path.relative_to(ROOT)}:{line}: {what}")
    assert found == []


def test_the_parquet_checksum_check_finds_a_call_without_the_options():
    src = (
        "import pyarrow.parquet as pq\n"
        "pq.write_table(t, p)\n"
        "pq.write_table(t, p, **PARQUET_WRITE)\n"
        "df.to_parquet(b, index=False)\n"
        "pq.ParquetFile(f, **PARQUET_READ).iter_batches()\n"
        "n = pq.ParquetFile(f).metadata.num_rows\n"
        "t = pq.read_table(p, columns=['a'])\n"
        "pq.write_table(t, p, **{**PARQUET_WRITE, 'compression': 'gzip'})\n"
        "pq.write_table(t, p, **{'compression': 'gzip'})\n"
    )
    assert _parquet_calls_without_crc_options(ast.parse(src)) == [
        (2, "write_table(...) without **PARQUET_WRITE"),
        (4, "to_parquet(...) without **PARQUET_WRITE"),
        (7, "read_table(...) without **PARQUET_READ"),
        (9, "write_table(...) without **PARQUET_WRITE"),
    ]
