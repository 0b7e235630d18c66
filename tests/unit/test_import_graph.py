"""The import graph of the three layers, built from the source with ``ast`` (every import,
also those inside functions): the layer rules hold, there is no cycle, and no module
imports another module's private name."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
#: import name → source folder (as setup.py maps them)
LAYERS = {
    "histosynth": "plugin",
    "histosynth.synthesis": "synthesis",
    "histosynth.integration": "integration",
}
#: layer → import prefixes it must not use
FORBIDDEN = {
    "histosynth.synthesis": ("histosynth.integration", "histosynth.plugin-layer"),
    "histosynth.integration": ("histosynth.synthesis", "torch"),
}


def _modules() -> dict[str, Path]:
    found = {}
    for package, folder in LAYERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


MODULES = _modules()


def _common(module: str) -> bool:
    """The low-level home (``histosynth.common``) every layer may import."""
    return module == "histosynth.common" or module.startswith("histosynth.common.")


def _layer(module: str) -> str:
    for package in ("histosynth.synthesis", "histosynth.integration"):
        if module == package or module.startswith(package + "."):
            return package
    return "histosynth"


def _absolute(module: str, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    if MODULES[module].name != "__init__.py":
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str) -> list[tuple[str, str | None, int]]:
    """(imported module, imported name or None, line) for every import in ``module``."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(alias.name, None, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = _absolute(module, node)
            for alias in node.names:
                full = f"{target}.{alias.name}"
                if full in MODULES:
                    out.append((full, None, node.lineno))
                else:
                    out.append((target, alias.name, node.lineno))
    return out


def _graph() -> dict[str, set[str]]:
    return {
        module: {
            target for target, _, _ in _imports(module) if target in MODULES and target != module
        }
        for module in MODULES
    }


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_graph_covers_every_layer() -> None:
    layers = {_layer(m) for m in MODULES}
    assert layers == set(LAYERS)
    assert "histosynth.integration.tiles" in MODULES and "histosynth.cli" in MODULES
    assert "histosynth.commands.main" in MODULES and "histosynth.workflows.extract" in MODULES


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_rules(layer: str) -> None:
    bad = []
    for module in MODULES:
        if _layer(module) != layer:
            continue
        for target, _, line in _imports(module):
            plugin = (target in MODULES and _layer(target) == "histosynth"
                      and not _common(target))
            for prefix in FORBIDDEN[layer]:
                hit = (
                    plugin
                    if prefix == "histosynth.plugin-layer"
                    else target == prefix or target.startswith(prefix + ".")
                )
                if hit:
                    bad.append(f"{module}:{line} imports {target}")
    assert bad == []


def test_the_common_home_imports_nothing_of_the_project() -> None:
    """``histosynth.common``: standard library and numpy only (and the root package's
    version string), so that every layer can import it."""
    bad = []
    for module in MODULES:
        if not _common(module):
            continue
        for target, _, line in _imports(module):
            top = target.split(".")[0]
            ours = target == "histosynth" or _common(target)
            outside = top not in ("histosynth", "numpy", "__future__") and not _stdlib(top)
            if (top == "histosynth" and not ours) or outside:
                bad.append(f"{module}:{line} imports {target}")
    assert bad == []


def _stdlib(name: str) -> bool:
    import sys

    return name in sys.stdlib_module_names


def test_no_import_cycle() -> None:
    assert _cycles(_graph()) == []


def test_no_private_name_from_another_module() -> None:
    bad = [
        f"{module}:{line} imports {name} from {target}"
        for module in MODULES
        for target, name, line in _imports(module)
        if target.startswith("histosynth")
        and name is not None
        and name.startswith("_")
        and not name.startswith("__")
        and target != module
    ]
    assert bad == []


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _reachable(graph: dict[str, set[str]], starts: set[str]) -> set[str]:
    """``starts`` and every module they import, directly or through others."""
    seen, todo = set(), list(starts)
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo += sorted(graph.get(module, ()))
    return seen


def test_the_workflows_never_import_click() -> None:
    """``histosynth.workflows`` is click-free: none of its modules imports click, nor does
    any project module they import (at the top or inside a function)."""
    graph = _graph()
    workflows = {m for m in MODULES if _within(m, "histosynth.workflows")}
    assert workflows, "no workflow module found"
    bad = [
        f"{module}:{line} imports {target}"
        for module in sorted(_reachable(graph, workflows))
        for target, _, line in _imports(module)
        if _within(target, "click")
    ]
    assert bad == []


def test_only_the_entry_point_imports_the_commands() -> None:
    """The commands are the outermost layer: no workflow, engine, integration or other
    plugin module imports ``histosynth.commands``; only ``histosynth.cli`` (the console
    entry point) does."""
    bad = [
        f"{module}:{line} imports {target}"
        for module in MODULES
        if not _within(module, "histosynth.commands") and module != "histosynth.cli"
        for target, _, line in _imports(module)
        if _within(target, "histosynth.commands")
    ]
    assert bad == []


def test_reachable_follows_imports_through_other_modules() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": set(), "d": {"a"}}
    assert _reachable(graph, {"a"}) == {"a", "b", "c"}


def test_the_cycle_finder_finds_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


#: a module longer than this says why in a ``Size:`` paragraph of its docstring
MAX_LINES = 600


def _unexplained_long_modules(modules: dict[str, Path], root: Path) -> list[str]:
    out = []
    for _, path in sorted(modules.items()):
        source = path.read_text(encoding="utf-8")
        lines = source.count("\n")
        docstring = ast.get_docstring(ast.parse(source)) or ""
        if lines > MAX_LINES and "\nSize: " not in f"\n{docstring}":
            out.append(f"{path.relative_to(root)} ({lines} lines)")
    return out


def test_a_long_module_says_why_it_is_one_module() -> None:
    """Over :data:`MAX_LINES` lines, a module's docstring has a ``Size:`` paragraph."""
    assert _unexplained_long_modules(MODULES, ROOT) == []


def test_the_size_rule_finds_a_long_module_without_a_reason(tmp_path: Path) -> None:
    body = "x = 1\n" * MAX_LINES
    files = {
        "long": '"""A module."""\n' + body,
        "explained": '"""A module.\n\nSize: one concept.\n"""\n' + body,
        "short": '"""A module."""\n' + "x = 1\n" * 10,
    }
    for name, text in files.items():
        (tmp_path / f"{name}.py").write_text(text, encoding="utf-8")
    modules = {name: tmp_path / f"{name}.py" for name in files}
    assert _unexplained_long_modules(modules, tmp_path) == [f"long.py ({MAX_LINES + 1} lines)"]


#: the largest a module and a function may be (lines; a function counts what it nests)
MAX_MODULE_LINES = 800
MAX_FUNCTION_LINES = 120


def _oversized(modules: dict[str, Path], root: Path) -> list[str]:
    """Modules over :data:`MAX_MODULE_LINES` and functions over :data:`MAX_FUNCTION_LINES`."""
    out = []
    for path in modules.values():
        source = path.read_text(encoding="utf-8")
        where = path.relative_to(root)
        if len(source.splitlines()) > MAX_MODULE_LINES:
            out.append(f"{where} ({len(source.splitlines())} lines)")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    out.append(f"{where}:{node.lineno} {node.name} ({length} lines)")
    return out


def test_no_module_or_function_is_too_long_to_read() -> None:
    assert _oversized(MODULES, ROOT) == []


def test_the_length_rule_finds_a_long_function_and_a_long_module(tmp_path: Path) -> None:
    long_function = "def f():\n" + "    x = 1\n" * MAX_FUNCTION_LINES
    files = {
        "function": long_function,
        "module": "x = 1\n" * (MAX_MODULE_LINES + 1),
        "fine": "def g():\n" + "    x = 1\n" * (MAX_FUNCTION_LINES - 1),
    }
    for name, text in files.items():
        (tmp_path / f"{name}.py").write_text(text, encoding="utf-8")
    modules = {name: tmp_path / f"{name}.py" for name in files}
    assert _oversized(modules, tmp_path) == [
        f"function.py:1 f ({MAX_FUNCTION_LINES + 1} lines)",
        f"module.py ({MAX_MODULE_LINES + 1} lines)",
    ]


#: a concept → the one module that defines it (issue: one home per concept)
ONE_HOME = {
    "tissue_mask": "histosynth.integration.masks",
    "class_matches": "histosynth.integration.annotations",
    "atomic_write_bytes": "histosynth.common.files",
    "fsync_dir": "histosynth.common.files",
    "file_sha256": "histosynth.common.files",
    "HistosynthError": "histosynth.common.errors",
    "histosynth_version": "histosynth.common.version",
    "lazy_names": "histosynth.common.lazy",
    "check_finite": "histosynth.options",
    "FiniteFloat": "histosynth.commands.options",
    "wait_option": "histosynth.commands.options",
    "TileGeometry": "histosynth.common.geometry",
    "strength_of": "histosynth.synthesis.sampling_defaults",
    "read_sources": "histosynth.integration.tiles",
}


def _definitions(name: str) -> list[str]:
    return [
        module
        for module, path in sorted(MODULES.items())
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.FunctionDef | ast.ClassDef) and node.name == name
    ]


@pytest.mark.parametrize("name", sorted(ONE_HOME))
def test_each_concept_is_defined_once(name: str) -> None:
    assert _definitions(name) == [ONE_HOME[name]]


def _mpp_literals(path: Path) -> list[int]:
    """Lines where a resolution of 0.5 µm/px is written as a number for ``mpp``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    lines = []

    def half(node: ast.AST | None) -> bool:
        return isinstance(node, ast.Constant) and node.value == 0.5

    for node in ast.walk(tree):
        keyword = isinstance(node, ast.keyword) and node.arg == "mpp"
        field = (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                 and node.target.id == "mpp")
        if (keyword or field) and half(node.value):
            lines.append(node.lineno)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            args = node.args.args + node.args.kwonlyargs
            defaults = [None] * (len(node.args.args) - len(node.args.defaults)) + list(
                node.args.defaults) + list(node.args.kw_defaults)
            lines += [node.lineno for a, d in zip(args, defaults, strict=True)
                      if a.arg == "mpp" and half(d)]
        elif isinstance(node, ast.Call) and any(
                isinstance(a, ast.Constant) and a.value == "--mpp" for a in node.args):
            lines += [k.value.lineno for k in node.keywords if k.arg == "default" and half(k.value)]
    return lines


def test_the_default_resolution_is_written_once() -> None:
    """``DEFAULT_MPP`` (histosynth.common.geometry) is the one 0.5 µm/px; no ``mpp=0.5``."""
    bad = [f"{module}:{line}" for module, path in MODULES.items()
           if module != "histosynth.common.geometry" for line in _mpp_literals(path)]
    assert bad == []
