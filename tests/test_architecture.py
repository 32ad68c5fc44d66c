"""Import architecture, read from the source (ast): the oracle stays independent, Triton stays optional.

1. reference/ (installed as psb_fast.reference) is the test oracle: no module of psb_fast/ or
   kernels/ imports it, at module level or inside a function (absolute `psb_fast.reference...`,
   relative `.reference` / `..reference`, `from . import reference`, or importlib with its name).
2. reference/ computes what it checks with its own code: from production it imports only the
   names in REFERENCE_MAY_IMPORT (the objects under test whose own math is checked elsewhere).
3. No module of psb_fast/ imports `triton` or `psb_fast.kernels` at module level: the kernels
   are imported on first use of the "triton" backend (psb_fast.backends.kernel_module), so
   `import psb_fast` needs no Triton (run for real in tests/test_no_triton.py).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# source folder -> installed package (pyproject.toml [tool.setuptools.package-dir])
PACKAGES = {"psb_fast": "psb_fast", "kernels": "psb_fast.kernels", "reference": "psb_fast.reference"}
ORACLE = "psb_fast.reference"

# What reference/ may import from production: module -> names. PhaseBridge only, for Sigma's
# Cholesky factor, AA and N(t) (checked against reference/high_precision.py's 50-digit solve in
# tests/test_bridge.py) and its parameters p and mode; every derived quantity (means, labels,
# hop, multistep coefficients, noise covariances, steps, samplers) is the oracle's own code.
REFERENCE_MAY_IMPORT = {"psb_fast.bridge": {"PhaseBridge"}}


def _modules(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def _resolve(package: str, level: int, module: str | None) -> str:
    """The absolute module of `from <level dots><module> import ...` inside `package`."""
    if level == 0:
        return module or ""
    parts = package.split(".")
    base = ".".join(parts[: len(parts) - (level - 1)])
    return f"{base}.{module}" if module else base


def _package_of(path: Path) -> str:
    folder = path.relative_to(ROOT).parts[0]
    sub = path.relative_to(ROOT / folder).parts[:-1]
    return ".".join((PACKAGES[folder], *sub))


def imports(path: Path, module_level_only: bool = False) -> list[tuple[str, str | None, int]]:
    """(module, imported name or None, line) for every import in `path`, relative ones resolved:
    `import a.b` -> ("a.b", None); `from a import b` -> ("a", "b"); plus importlib.import_module
    / __import__ calls with a constant name. module_level_only: skip function and class bodies."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = _package_of(path)
    out = []

    def visit(node: ast.AST) -> None:
        if module_level_only and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            return
        if isinstance(node, ast.Import):
            out.extend((alias.name, None, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = _resolve(package, node.level, node.module)
            out.extend((module, alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in ("import_module", "__import__") and node.args:
                arg = node.args[0]
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    out.append((arg.value, None, node.lineno))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return out


def _is_under(module: str, name: str | None, target: str) -> bool:
    """Whether the import (module, name) reaches `target` or a submodule of it."""
    full = module if name is None else f"{module}.{name}"
    return any(m == target or m.startswith(target + ".") for m in (module, full))


def _production_modules() -> list[Path]:
    return _modules("psb_fast") + _modules("kernels")


@pytest.mark.parametrize("path", _production_modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_production_does_not_import_the_oracle(path):
    bad = [
        f"line {line}: {module}" + (f" import {name}" if name else "")
        for module, name, line in imports(path)
        if _is_under(module, name, ORACLE) or module == "reference" or module.startswith("reference.")
    ]
    assert not bad, f"{path.relative_to(ROOT)} imports the test oracle (reference/): {bad}"


@pytest.mark.parametrize("path", _modules("reference"), ids=lambda p: str(p.relative_to(ROOT)))
def test_oracle_imports_only_the_objects_under_test(path):
    bad = []
    for module, name, line in imports(path):
        if not (module == "psb_fast" or module.startswith("psb_fast.")) or _is_under(module, name, ORACLE):
            continue  # third-party, or the oracle's own modules
        if name is None or name not in REFERENCE_MAY_IMPORT.get(module, set()):
            bad.append(f"line {line}: {module}" + (f" import {name}" if name else ""))
    assert not bad, (
        f"{path.relative_to(ROOT)} imports production code beyond {REFERENCE_MAY_IMPORT}: {bad}; "
        "the oracle must compute what it checks with its own code"
    )


@pytest.mark.parametrize("path", _modules("psb_fast"), ids=lambda p: str(p.relative_to(ROOT)))
def test_triton_is_not_imported_at_module_level(path):
    bad = [
        f"line {line}: {module}" + (f" import {name}" if name else "")
        for module, name, line in imports(path, module_level_only=True)
        if _is_under(module, name, "triton") or _is_under(module, name, "psb_fast.kernels")
    ]
    assert not bad, f"{path.relative_to(ROOT)} imports Triton or the kernels at import time: {bad}"


def test_the_checks_see_every_form_of_import(tmp_path, monkeypatch):
    """The parser resolves relative, absolute, `from . import`, and importlib forms."""
    source = (
        "import importlib\n"
        "from .reference import sde_step\n"
        "from . import reference\n"
        "import psb_fast.reference.bridge_sample\n"
        "def f():\n"
        "    from .kernels import phase_step\n"
        "    importlib.import_module('psb_fast.reference.sampler')\n"
    )
    folder = tmp_path / "psb_fast"
    folder.mkdir()
    (folder / "mod.py").write_text(source)
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    found = imports(folder / "mod.py")
    hits = [line for module, name, line in found if _is_under(module, name, ORACLE)]
    assert hits == [2, 3, 4, 7]
    top = imports(folder / "mod.py", module_level_only=True)
    assert not any(_is_under(m, n, "psb_fast.kernels") for m, n, _ in top)
    assert any(_is_under(m, n, "psb_fast.kernels") for m, n, _ in found)
