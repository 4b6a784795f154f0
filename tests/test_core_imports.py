"""The core's modules import one another without a circle (issue 30): every import
counts, at module level or inside a function or `if TYPE_CHECKING`."""

import ast
import graphlib
import pathlib

import candle_ckpt.core

CORE = pathlib.Path(candle_ckpt.core.__file__).parent


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(CORE.parent.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def core_imports(path: pathlib.Path, modules: set[str]) -> set[str]:
    """The modules of the core that the module at `path` imports."""
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            found.add(module)
            # `from . import x` imports the module x
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return {name for name in found if name in modules and name != module_name(path)}


def test_the_core_has_no_import_circle():
    paths = sorted(CORE.rglob("*.py"))
    modules = {module_name(path) for path in paths}
    graph = {module_name(path): core_imports(path, modules) for path in paths}
    assert len(graph) > 30 and graph["candle_ckpt.core.format.history"]
    try:
        order = list(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as error:
        raise AssertionError(f"an import circle in candle_ckpt.core: {error.args[1]}") from None
    assert set(order) == modules
