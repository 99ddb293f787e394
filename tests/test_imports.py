"""abot's modules import one another without a cycle, counting the imports inside functions too."""

import ast
import graphlib
from pathlib import Path

import abot

ROOT = Path(abot.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(path: Path, modules: set[str]) -> set[str]:
    """What `path` names in any import statement (`from m import x` names m.x when that is one of `modules`)."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, up level - 1
                up = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(up + [base] if base else up)
            found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names}
    return found


def test_no_import_cycle_inside_abot():
    paths = {module_name(p): p for p in ROOT.rglob("*.py")}
    graph = {name: (imported_names(path, set(paths)) & set(paths)) - {name} for name, path in paths.items()}
    graphlib.TopologicalSorter(graph).prepare()  # raises CycleError naming the modules of a cycle


def test_the_kernel_rewrite_imports_nothing_from_abot():
    """The g++ wrapper runs abot/platform/kernels.py as a script, outside the package."""
    kernels = ROOT / "platform" / "kernels.py"
    assert not any(name.split(".")[0] == "abot" for name in imported_names(kernels, set()))
