"""The import rules of the README's code map, checked on the source (every import, function-local ones included).

- `analysis` may import `probes`; `probes` never imports `analysis`.
- Inside `probes` the layers follow the data path: data and stats < models < activations, leakage < probing,
  patching < organism, mitigation. A module imports its own subpackage or a lower layer, never one beside or above.
- No private name (`_x`) is imported from another module, and no two modules import each other.
- `probes.data` loads neither torch nor transformers.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYER = {  # the first part under probes -> its rank on the data path
    "stats": 0, "data": 0, "models": 1, "activations": 2, "leakage": 2, "probing": 3, "patching": 3, "organism": 4,
    "mitigation": 4,
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, imported module, imported names) for every import of `probes` or `analysis` in the file."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] in ("probes", "analysis"):
                out.append((node.lineno, node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name, []) for a in node.names if a.name.split(".")[0] in ("probes", "analysis")]
    return out


def sources() -> list[Path]:
    return sorted(p for pkg in ("probes", "analysis") for p in (ROOT / pkg).rglob("*.py"))


def layer_of(module: str) -> tuple[str, int] | None:
    parts = module.split(".")
    if parts[0] != "probes" or len(parts) == 1:
        return None
    return parts[1], LAYER[parts[1]]


def violations() -> list[str]:
    found = []
    graph: dict[str, set[str]] = {}
    for path in sources():
        me = module_name(path)
        where = path.relative_to(ROOT)
        for line, target, names in project_imports(path):
            graph.setdefault(me, set()).add(target)
            if me.startswith("probes") and target.startswith("analysis"):
                found.append(f"{where}:{line}: probes imports {target}")
            mine, theirs = layer_of(me), layer_of(target)
            if mine and theirs and mine[0] != theirs[0] and theirs[1] >= mine[1]:
                found.append(f"{where}:{line}: {mine[0]} (layer {mine[1]}) imports {target} (layer {theirs[1]})")
            found += [f"{where}:{line}: private name {n} imported from {target}" for n in names if n.startswith("_")]
    for a, targets in graph.items():
        for b in targets:
            if b != a and a in graph.get(b, ()) and a < b:
                found.append(f"{a} and {b} import each other")
    return found


def test_imports_follow_the_layers():
    assert violations() == []


def test_the_checker_sees_a_violation(tmp_path, monkeypatch):
    """The rules fail where they should: an upward import, a private name and a cycle planted in a copy."""
    for pkg in ("probes", "analysis"):
        (tmp_path / pkg / "data").mkdir(parents=True)
    (tmp_path / "probes" / "data" / "a.py").write_text("from probes.patching.core import _x\n")
    (tmp_path / "probes" / "data" / "b.py").write_text("import probes.data.c\n")
    (tmp_path / "probes" / "data" / "c.py").write_text("import probes.data.b\nimport analysis.tables\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    found = "\n".join(violations())
    assert "data (layer 0) imports probes.patching.core (layer 3)" in found
    assert "private name _x" in found
    assert "probes.data.b and probes.data.c import each other" in found
    assert "probes imports analysis.tables" in found


LIGHT = ["probes", "probes.data", "probes.patching.config", "analysis.study.config"]  # `mmret study validate`: no torch


@pytest.mark.parametrize("module", LIGHT + sorted(
    module_name(p) for p in (ROOT / "probes" / "data").glob("*.py") if p.name != "__init__.py"))
def test_data_layer_loads_no_torch(module):
    code = f"import sys, {module}; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]", f"import {module} loads {out.stdout.strip()}"


@pytest.mark.parametrize("package", ["probes", "probes.patching"])
def test_lazy_names_are_not_shadowed_by_submodules(package):
    """A submodule named like an exported function would replace it on the package once imported."""
    code = (f"import importlib, pkgutil, types, {package} as p\n"
            f"for m in pkgutil.walk_packages(p.__path__, '{package}.'): importlib.import_module(m.name)\n"
            "print([n for n in p.__all__ if isinstance(getattr(p, n), types.ModuleType)])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"


def test_functions_in_probes_stay_short_and_take_few_parameters():
    """Issue 17's limits: no function in `probes` over 80 lines or with more than 8 parameters (self and cls not
    counted; **options not counted: they build a config dataclass)."""
    found = []
    for path in sorted((ROOT / "probes").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                a = node.args
                params = [*a.posonlyargs, *a.args, *a.kwonlyargs]
                n = len(params) - (1 if params and params[0].arg in ("self", "cls") else 0)
                lines = node.end_lineno - node.lineno + 1
                if lines > 80 or n > 8:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {lines} lines, {n} parameters")
    assert found == []
