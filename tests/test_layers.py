"""The import rules hold: each module imports only its own layer or below (the README's table),
and no frontend module names an engine kind (tokenizers come from the engine registry)."""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Iterator, Optional

import pytest

from llumnix_py.engines.registry import engine_kinds

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("llumnix_py", "migration", "policies")
FRONTEND_FILES = sorted([*(ROOT / "llumnix_py" / "frontend").glob("*.py"),
                         *(ROOT / "llumnix_py" / "server").glob("*.py"), ROOT / "llumnix_py" / "cli.py"])
ENGINE_PACKAGES = ("llumnix_py.engines.torch_engine", "llumnix_py.engines.vllm")
# Imports that break the layer table today, in files another change owns: (importer, imported) -> why.
KNOWN_EXCEPTIONS: dict[tuple[str, str], str] = {}


def layer_table() -> list[tuple[int, list[str]]]:
    """(layer, module patterns) from the README's "Which package may import which" table.

    ``policies/`` names a package, ``llumnix_py/load.py`` a module, ``llumnix_py/llumlet*.py``
    every module whose name starts so, ``llumnix_py/__init__.py`` the package module alone
    (pattern ``=llumnix_py``)."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("### Which package may import which"):]
    section = section[:section.index("\n#", 1)]
    rows = re.findall(r"^\| (\d+) [^|]*\| ([^|]+) \|", section, flags=re.M)
    assert rows, "the README's layer table is missing"
    table = []
    for layer, cell in rows:
        paths = re.findall(r"`([^`]+)`", cell)
        patterns = [p.removesuffix(".py").removesuffix("/").replace("/", ".") for p in paths]
        table.append((int(layer), ["=" + p.removesuffix(".__init__") if p.endswith(".__init__") else p
                                   for p in patterns]))
    return table


def layer_of(module: str, table: list[tuple[int, list[str]]]) -> Optional[int]:
    """The layer of the longest pattern that covers ``module`` (``pkg.__init__`` is ``pkg``)."""
    module = module.removesuffix(".__init__")
    best: tuple[int, int] = (-1, -1)
    for layer, patterns in table:
        for pat in patterns:
            if pat.startswith("="):
                hit = module == pat[1:]
            elif pat.endswith("*"):
                hit = module.startswith(pat[:-1])
            else:
                hit = module == pat or module.startswith(pat + ".")
            if hit and len(pat) > best[0]:
                best = (len(pat), layer)
    return best[1] if best[0] >= 0 else None


def project_modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def imports(path: Path, module: str, known: set[str], type_checking: bool = False) -> Iterator[tuple[str, int]]:
    """(imported project module, line) for every import in ``path`` (function-level ones too);
    imports under ``if TYPE_CHECKING:`` only when ``type_checking``."""
    tree = ast.parse(path.read_text(), str(path))
    skip: set[int] = set()
    if not type_checking:
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                skip.update(id(n) for b in node.body for n in ast.walk(b))
    base = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                pkg = base.split(".")[: len(base.split(".")) - (node.level - 1)]
                mod = ".".join(pkg + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [f"{mod}.{a.name}" for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # the longest project module the import names
                target = target.rpartition(".")[0]
            if target and target != module:
                yield target, node.lineno


def test_the_layer_table_places_every_module():
    table = layer_table()
    assert [layer for layer, _ in table] == list(range(len(table)))
    unplaced = [m for m in project_modules() if layer_of(m, table) is None]
    assert unplaced == [], "add these modules to the README's layer table"


def test_no_module_imports_a_layer_above_its_own():
    table = layer_table()
    modules = project_modules()
    upward = []
    for module, path in sorted(modules.items()):
        mine = layer_of(module, table)
        for target, line in imports(path, module, set(modules)):
            theirs = layer_of(target, table)
            if mine is not None and theirs is not None and theirs > mine and (module, target) not in KNOWN_EXCEPTIONS:
                upward.append(f"{path.relative_to(ROOT)}:{line} (layer {mine}) imports {target} (layer {theirs})")
    assert upward == []


def test_known_exceptions_are_still_needed():
    modules = project_modules()
    for importer, imported in KNOWN_EXCEPTIONS:
        assert imported in {t for t, _ in imports(modules[importer], importer, set(modules))}, \
            f"{importer} no longer imports {imported}: drop the exception"


def test_the_checker_sees_upward_imports(tmp_path):
    table = [(0, ["low"]), (1, ["high"])]
    (tmp_path / "low.py").write_text("def f():\n    from high import x\nif TYPE_CHECKING:\n    import high.y\n")
    found = list(imports(tmp_path / "low.py", "low", {"low", "high", "high.y"}))
    assert found == [("high", 2)] and layer_of("high.y", table) == 1 and layer_of("lowest", table) is None


@pytest.mark.parametrize("path", FRONTEND_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_frontend_modules_import_no_engine_implementation(path):
    modules = project_modules()
    module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
    named = [t for t, _ in imports(path, module, set(modules), type_checking=True)
             if any(t == p or t.startswith(p + ".") for p in ENGINE_PACKAGES)]
    assert named == []


@pytest.mark.parametrize("path", FRONTEND_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_frontend_modules_name_no_engine_kind(path):
    """No branch on ``spec.kind == "vllm"``, no kind-specific default: the registry answers."""
    kinds = set(engine_kinds())
    tree = ast.parse(path.read_text())
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    named = [(n.lineno, n.value) for n in ast.walk(tree)
             if isinstance(n, ast.Constant) and id(n) not in docstrings and n.value in kinds]
    assert named == []
