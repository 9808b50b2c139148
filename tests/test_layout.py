"""The package's layers import downwards only: core <- kernels <- cache <- methods <- models/data/metrics <-
analysis <- bench/lmeval <- experiments (the validation experiment runs its samples through the runner's worker;
lmeval runs lm-eval's requests in the runner's decode loop, and the runner's worker runs lm-eval documents). A
module importing a higher layer fails here, with the offending import named."""
import ast
from pathlib import Path

import smartkv

ROOT = Path(smartkv.__file__).parent
LAYERS = [("core",), ("kernels",), ("cache",), ("methods",), ("models", "data", "metrics"),
          ("analysis",), ("bench", "lmeval"), ("experiments",)]
RANK = {name: i for i, names in enumerate(LAYERS) for name in names}


def _top(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "smartkv" else None


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            if node.module == "smartkv":
                yield from (f"smartkv.{a.name}" for a in node.names)
            else:
                yield node.module


def upward_imports() -> list[str]:
    bad = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        if rel.parts[0] == "__init__.py":
            continue  # the package's front door re-exports the public API
        mine = RANK[rel.parts[0].removesuffix(".py")]
        for module in _imports(path):
            top = _top(module)
            if top is not None and top in RANK and RANK[top] > mine:
                bad.append(f"{rel} imports {module}")
    return bad


def test_every_module_has_a_layer():
    tops = {p.relative_to(ROOT).parts[0].removesuffix(".py") for p in ROOT.rglob("*.py")} - {"__init__"}
    assert tops <= set(RANK), f"place these in LAYERS: {sorted(tops - set(RANK))}"


def test_imports_point_downwards():
    assert upward_imports() == []


def test_the_check_catches_an_upward_import(tmp_path, monkeypatch):
    (tmp_path / "core").mkdir()
    (tmp_path / "core" / "x.py").write_text("from smartkv.bench.cli import app\nimport smartkv.cache.layer\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    assert upward_imports() == ["core/x.py imports smartkv.bench.cli", "core/x.py imports smartkv.cache.layer"]
