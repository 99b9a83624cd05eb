"""The package's own structure: its modules import each other without a circle, and the config stands alone."""

from __future__ import annotations

import ast
from pathlib import Path

import peft_mitp

PACKAGE = Path(peft_mitp.__file__).parent


def _internal_imports() -> dict[str, set[str]]:
    """Module -> the package modules it imports, at module level or inside functions (relative imports)."""
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        package = parts if path.name == "__init__.py" else parts[:-1]
        name = ".".join(parts[:-1] if path.name == "__init__.py" else parts)
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package[: len(package) - (node.level - 1)]
                deps.add(".".join(base + ([node.module] if node.module else [])))
        graph[name] = deps - {"peft_mitp"}  # `from . import __version__`
    return graph


def test_package_modules_import_each_other_without_a_circle():
    graph = _internal_imports()
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        for dep in sorted(graph.get(name, ())):
            assert dep not in path, f"import circle: {' -> '.join([*path[path.index(dep):], dep])}"
            if dep not in done and dep in graph:
                visit(dep, [*path, dep])
        done.add(name)

    for name in sorted(graph):
        visit(name, [name])


def test_the_config_imports_nothing_of_the_tuner_or_the_task_model():
    assert _internal_imports()["peft_mitp.config"] <= {"peft_mitp.adapter_files"}
