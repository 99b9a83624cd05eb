"""The package's own structure: its modules import each other without a circle, and the config stands alone."""

from __future__ import annotations

import ast
import subprocess
import sys
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


def test_every_private_peft_name_mitp_relies_on_is_still_there():
    from peft_mitp.internals import missing_internals

    assert missing_internals() == []


def test_a_moved_private_name_is_reported_with_what_mitp_uses_it_for():
    from peft_mitp.internals import Internal, missing_internals

    problems = missing_internals(
        (
            Internal("peft.tuners.tuners_utils:BaseTuner", "_renamed_in_a_future_release", (), "the hub's dtype"),
            Internal("peft.config:PeftConfig", "_split_kwargs", ("a_new_parameter",), "Hub keywords"),
            Internal("peft.no_such_module:Thing", "x", (), "nothing"),
        )
    )
    assert len(problems) == 3
    assert "BaseTuner._renamed_in_a_future_release is gone" in problems[0] and "the hub's dtype" in problems[0]
    assert "no longer takes ['a_new_parameter']" in problems[1]
    assert "peft.no_such_module:Thing is gone" in problems[2]


def test_private_peft_names_are_used_only_where_internals_lists_them():
    """A new dependency on a private peft method must be added to `peft_mitp.internals.INTERNALS`."""
    from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer

    from peft_mitp.internals import INTERNALS
    from peft_mitp.layer import MITPLayer
    from peft_mitp.model import MITPModel

    listed = {item.name for item in INTERNALS}
    for ours, theirs in ((MITPModel, BaseTuner), (MITPLayer, BaseTunerLayer)):
        overridden = {
            name for name in vars(ours)
            if name.startswith("_") and not name.startswith("__") and name != "_abc_impl" and hasattr(theirs, name)
        }
        assert overridden <= listed, f"{ours.__name__} overrides private {sorted(overridden - listed)} of peft"


def test_importing_the_plugin_changes_no_peft_class_and_the_first_mitp_adapter_installs_signature_keeping_wrappers():
    # A fresh process: this test process may already have created MITP adapters.
    script = r'''
import inspect
from peft import PeftModel
originals = {name: getattr(PeftModel, name) for name in
             ("save_pretrained", "push_to_hub", "create_or_update_model_card", "load_adapter")}
import peft_mitp
assert all(getattr(PeftModel, name) is fn for name, fn in originals.items()), "import peft_mitp patched PeftModel"
from conftest import make_model
make_model()  # get_peft_model with an MITPConfig
for name, fn in originals.items():
    assert getattr(PeftModel, name) is not fn, f"{name} not wrapped after the first MITP adapter"
    assert inspect.signature(getattr(PeftModel, name)) == inspect.signature(fn), name
print("ok")
'''
    result = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).parent, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
