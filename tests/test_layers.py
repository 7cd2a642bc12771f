"""Layering, checked two ways: a walk of every module's source (each import statement, at any depth,
lazy ones inside functions included) against the rules README's layout states, and a run-time probe
that the API process loads no torch, models or workers. Also: the catalogue the API validates against
names exactly the models the registry can load."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from app import catalog

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("app", "workers", "models")
# Import cycles that are allowed: the fused iResNet subclasses the plain one, which builds the fused
# one on request (a lazy import inside a method).
ALLOWED_CYCLES = [{"models.embedders.iresnet", "models.embedders.iresnet_fused"}]
# Modules outside app/api that may import the HTTP edge: the `serve` and `keys` commands manage the
# API's own key ring in Redis (app.api.auth.KeyRing).
EDGE_IMPORTERS = {"app.cli"}


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("")
            if "presets" in rel.parts[:2] and rel.name not in ("__init__",):
                continue
            name = ".".join(rel.parts).removesuffix(".__init__")
            out[name] = path
    return out


MODULES = _modules()


def _type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _imports(tree: ast.AST, in_tc: bool = False) -> Iterator[tuple[str, int, bool]]:
    """(imported module, line, under `if TYPE_CHECKING`) for every import in the tree: a `from X
    import y` names X.y when that is a module of ours, else X."""
    for node in ast.iter_child_nodes(tree):
        tc = in_tc or _type_checking(node)
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, node.lineno, tc
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                yield (sub if sub in MODULES else node.module), node.lineno, tc
        yield from _imports(node, tc)


def _graph() -> dict[str, list[tuple[str, int, bool]]]:
    return {m: [(t, line, tc) for t, line, tc in _imports(ast.parse(p.read_text(), str(p)))
                if t.split(".")[0] in PACKAGES]
            for m, p in MODULES.items()}


GRAPH = _graph()


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_the_walk_sees_every_layer() -> None:
    """The walk is not vacuous: it finds modules in every package and the imports between them."""
    assert {m.split(".")[0] for m in MODULES} == set(PACKAGES)
    assert any(_within(m, "app.api") for m in MODULES) and len(MODULES) > 60
    edges = {(a.split(".")[0], b.split(".")[0]) for a, ts in GRAPH.items() for b, _, _ in ts}
    assert {("workers", "app"), ("workers", "models"), ("app", "app")} <= edges


@pytest.mark.parametrize(("package", "forbidden", "why"), [
    ("app", ("workers", "models"), "the kernel and the HTTP edge never import the compute side"),
    ("models", ("app", "workers"), "models/ is the tensor side, usable without the service"),
    ("workers", ("app.api",), "workers use the kernel, never the HTTP edge"),
])
def test_no_import_runs_up_a_layer(package: str, forbidden: tuple[str, ...], why: str) -> None:
    bad = [f"{m}:{line} imports {t}" for m, ts in GRAPH.items() if _within(m, package)
           for t, line, _ in ts if any(_within(t, f) for f in forbidden)]
    assert bad == [], f"{why}: {bad}"


def test_only_the_api_imports_the_http_edge() -> None:
    bad = [f"{m}:{line} imports {t}" for m, ts in GRAPH.items()
           if not _within(m, "app.api") and m not in EDGE_IMPORTERS
           for t, line, _ in ts if _within(t, "app.api")]
    assert bad == [], bad


def _cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[set[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = set()
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.add(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(comp)
    return out


def test_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_but_the_iresnet_pair() -> None:
    """Run-time imports only (those under `if TYPE_CHECKING:` never run); a package's __init__ is
    not counted as importing its submodules."""
    graph = {m: {t for t, _, tc in ts if not tc and t in MODULES and t != m} for m, ts in GRAPH.items()}
    cycles = [c for c in _cycles(graph) if c not in ALLOWED_CYCLES]
    assert cycles == [], cycles

PROBE = r"""
import json, sys
from fastapi.testclient import TestClient
from app.api.main import create_app
from app.settings import Settings
import app.cli  # the CLI module too: its heavy commands import lazily
settings = Settings(redis_url=sys.argv[1], api_keys="alpha:k", storage_dir=sys.argv[2])
with TestClient(create_app(settings)) as c:
    codes = [c.post("/v1/jobs", json={"identities": 2, "images_per_identity": 1},
                    headers={"Authorization": "Bearer k"}).status_code,
             c.get("/v1/models", headers={"Authorization": "Bearer k"}).status_code,
             c.get("/readyz").status_code]
heavy = sorted(m for m in sys.modules
               if m.split(".")[0] in {"torch", "models", "workers", "diffusers", "transformers",
                                      "numpy"})
print(json.dumps({"codes": codes, "heavy": heavy}))
"""


def test_api_process_never_imports_torch(redis_server, tmp_path) -> None:  # type: ignore[no-untyped-def]
    out = subprocess.run([sys.executable, "-c", PROBE, redis_server.url, str(tmp_path)],
                         capture_output=True, text=True, timeout=120, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["codes"] == [202, 200, 200], got  # the probe really served requests
    assert got["heavy"] == [], f"the API process imported {got['heavy']}"


def test_catalogue_matches_registry() -> None:
    from models import registry

    assert set(catalog.CATALOG) == set(registry.SPECS)
    for name, entry in catalog.CATALOG.items():
        spec = registry.get_spec(name)
        assert (spec.kind, spec.family, spec.tiny) == (entry.kind, entry.family, entry.tiny)


def test_every_module_imports() -> None:
    """The sweep the re-housing needs (mypy ignores missing imports): every module imports, lazy
    imports aside, in a fresh process."""
    names = sorted(m for m in MODULES if not m.endswith("__main__"))
    code = "import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module(m)\nprint(len(sys.argv) - 1)"
    out = subprocess.run([sys.executable, "-c", code, *names], capture_output=True, text=True, timeout=300,
                         cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[-1] == str(len(names))


def _top_level_names(path: Path) -> set[str]:
    """Names a module binds at its top level (definitions, assignments, imports), including inside
    top-level if/try blocks."""
    names: set[str] = set()
    todo = list(ast.parse(path.read_text()).body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {n.id for tgt in targets for n in ast.walk(tgt) if isinstance(n, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, (ast.If, ast.Try)):
            todo += [*node.body, *getattr(node, "orelse", []), *getattr(node, "finalbody", []),
                     *(s for h in getattr(node, "handlers", []) for s in h.body)]
    return names


def test_every_import_of_ours_names_something_that_exists() -> None:
    """Imports inside function bodies run only when called, so a moved module or function could
    leave a stale one behind that no import of the module shows: every `from app|workers|models...
    import x` must name a module of ours and, in it, a submodule or a top-level name."""
    stale = []
    for m, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.ImportFrom) and node.module and node.level == 0
                    and node.module.split(".")[0] in PACKAGES):
                continue
            if node.module not in MODULES:
                stale.append(f"{m}:{node.lineno} no module {node.module}")
                continue
            defined = _top_level_names(MODULES[node.module])
            stale += [f"{m}:{node.lineno} {node.module} has no {a.name}" for a in node.names
                      if f"{node.module}.{a.name}" not in MODULES and a.name not in defined]
    assert stale == [], stale


def test_tests_import_helpers_that_exist() -> None:
    """The same for the tests' own imports of each other (`from tests.x.y import z`), lazy ones too:
    moving a test file must not leave an import of its old path behind."""
    stale = []
    for path in sorted((ROOT / "tests").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "tests":
                target = ROOT.joinpath(*node.module.split(".")).with_suffix(".py")
                if not target.is_file():
                    stale.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.module}")
                    continue
                defined = _top_level_names(target)
                stale += [f"{path.relative_to(ROOT)}:{node.lineno} {node.module} has no {a.name}"
                          for a in node.names if a.name not in defined]
    assert stale == [], stale
