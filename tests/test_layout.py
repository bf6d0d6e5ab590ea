"""The package's layering rules (README "Project layout"), read from the code's own imports and definitions.

Run ``python tests/test_layout.py`` for the full list of what breaks a rule; the tests below hold the limits.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "layerwatch"
INTEGRATIONS = REPO / "integrations"

MAX_MODULE_LINES = 700
MAX_FUNCTION_LINES = 60
MAX_FUNCTION_LEVEL_IMPORTS = 8  # of layerwatch's own modules, outside layerwatch/cli/
MAX_INTEGRATION_LINES = 600
MAX_MODULES_WITH_METRIC_NAMES = 2
# Functions allowed past MAX_FUNCTION_LINES (named and justified in the README's "Project layout").
LONG_FUNCTIONS: set[str] = set()
# Heavy optional libraries: importing them inside a function is the point.
LAZY_LIBRARIES = ("matplotlib", "wandb", "mlflow", "lightning", "pytorch_lightning", "deepspeed")


@dataclass
class Module:
    name: str
    path: Path
    tree: ast.Module
    lines: int
    imports: list[tuple[str, list[str], bool]] = field(default_factory=list)  # (module, names, in a function)


def _module_name(path: Path) -> str:
    if path.is_relative_to(INTEGRATIONS):
        parts = ["layerwatch", "integrations", *path.relative_to(INTEGRATIONS).with_suffix("").parts]
    else:
        parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _collect_imports(module: Module) -> None:
    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for other in child.orelse:
                    visit(other, in_function)
                continue
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    module.imports.append((alias.name, [], in_function))
            elif isinstance(child, ast.ImportFrom) and child.module and not child.level:
                module.imports.append((child.module, [a.name for a in child.names], in_function))
            visit(child, inner)

    visit(module.tree, False)


def load_modules() -> dict[str, Module]:
    modules = {}
    for path in sorted([*PACKAGE.rglob("*.py"), *INTEGRATIONS.rglob("*.py")]):
        text = path.read_text(encoding="utf-8")
        module = Module(_module_name(path), path, ast.parse(text), len(text.splitlines()))
        _collect_imports(module)
        modules[module.name] = module
    return modules


def import_edges(modules: dict[str, Module]) -> dict[str, set[str]]:
    """``A -> B`` for every import of a layerwatch module B by A (``from P import m`` counts as importing ``P.m``)."""
    edges: dict[str, set[str]] = {name: set() for name in modules}
    for module in modules.values():
        for target, names, _ in module.imports:
            submodules = [f"{target}.{n}" for n in names if f"{target}.{n}" in modules]
            for other in submodules or ([target] if target in modules else []):
                if other != module.name:
                    edges[module.name].add(other)
    return edges


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in edges[node]:
            if other not in index:
                connect(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
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

    sys.setrecursionlimit(10_000)
    for node in edges:
        if node not in index:
            connect(node)
    return found


def _subpackage(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 2 else "<top>"


def private_imports_across_subpackages(modules: dict[str, Module]) -> list[str]:
    found = []
    for module in modules.values():
        for target, names, _ in module.imports:
            if not target.startswith("layerwatch.") or _subpackage(target + ".x") == _subpackage(module.name):
                continue
            found += [f"{module.name} imports {target}.{n}" for n in names if n.startswith("_") and not n.startswith("__")]
    return found


def function_level_imports(modules: dict[str, Module]) -> list[str]:
    return [
        f"{module.name} imports {target} inside a function"
        for module in modules.values()
        if not module.name.startswith("layerwatch.cli")
        for target, _, in_function in module.imports
        if in_function and target.split(".")[0] == "layerwatch" and target != "layerwatch._version"
    ]


def _body_lines(function: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    body = function.body
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
        body = body[1:] or body
    return body[-1].end_lineno - body[0].lineno + 1


def long_functions(modules: dict[str, Module]) -> list[str]:
    found = []
    for module in modules.values():
        for node in ast.walk(module.tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and _body_lines(node) > MAX_FUNCTION_LINES:
                found.append(f"{module.name}.{node.name} ({_body_lines(node)} lines)")
    return sorted(found)


def metric_name_literals(modules: dict[str, Module]) -> dict[str, int]:
    from layerwatch.metrics import names

    metric_names = {value for key, value in vars(names).items() if key.isupper() and isinstance(value, str)}
    counts = {}
    for module in modules.values():
        hits = sum(isinstance(n, ast.Constant) and n.value in metric_names for n in ast.walk(module.tree))
        if hits:
            counts[module.name] = hits
    return counts


# ------------------------------------------------------------------------------------------------------------ tests
MODULES = load_modules()


def test_no_import_circle():
    assert circles(import_edges(MODULES)) == []


def test_no_private_name_crosses_a_subpackage():
    assert private_imports_across_subpackages(MODULES) == []


def test_few_function_level_imports_of_our_own_modules():
    found = function_level_imports(MODULES)
    assert len(found) <= MAX_FUNCTION_LEVEL_IMPORTS, found


def test_modules_and_functions_are_short():
    big = [f"{m.name} ({m.lines} lines)" for m in MODULES.values() if m.lines > MAX_MODULE_LINES]
    assert big == []
    assert [f for f in long_functions(MODULES) if f.split(" ")[0] not in LONG_FUNCTIONS] == []
    assert len(LONG_FUNCTIONS) <= 2


def test_metric_names_are_written_in_few_modules():
    assert len(metric_name_literals(MODULES)) <= MAX_MODULES_WITH_METRIC_NAMES, metric_name_literals(MODULES)


def test_integrations_stay_thin():
    assert sum(m.lines for m in MODULES.values() if m.name.startswith("layerwatch.integrations")) <= MAX_INTEGRATION_LINES


def test_the_checker_sees_a_circle_and_a_private_import():
    """The rules above could fail: a planted circle and a planted private import are found."""
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert circles(edges) == [["a", "b", "c"]]
    tree = ast.parse("from layerwatch.metrics.base import _gram\n")
    planted = Module("layerwatch.monitor.planted", PACKAGE / "planted.py", tree, 1)
    _collect_imports(planted)
    assert private_imports_across_subpackages({"x": planted}) == ["layerwatch.monitor.planted imports layerwatch.metrics.base._gram"]


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    report = {
        "circles": circles(import_edges(MODULES)),
        "private imports across sub-packages": private_imports_across_subpackages(MODULES),
        "function-level imports": function_level_imports(MODULES),
        "modules over 700 lines": [f"{m.name} {m.lines}" for m in MODULES.values() if m.lines > MAX_MODULE_LINES],
        "functions over 60 lines": long_functions(MODULES),
        "metric-name literals": metric_name_literals(MODULES),
        "integrations lines": sum(m.lines for m in MODULES.values() if m.name.startswith("layerwatch.integrations")),
    }
    for key, value in report.items():
        print(f"== {key}: {len(value) if isinstance(value, (list, dict)) else value}")
        for item in value if isinstance(value, list) else ([f"{k}: {v}" for k, v in value.items()] if isinstance(value, dict) else []):
            print("  ", item)
