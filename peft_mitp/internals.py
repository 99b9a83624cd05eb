"""Every private peft, transformers or torch name the plugin relies on, in one place, with a check that it exists.

peft offers no public extension point for some of what MITP needs (a tuner-level memory hub, encoder layers rather
than linear layers as targets, adapter names nested in state-dict keys). MITP then overrides or calls a private
method of peft's base classes. If a peft release renames one, an override would silently never be called again; so
each dependency is listed here with the parameters MITP's code passes or receives, and `missing_internals()` (run by
`import peft_mitp`, which warns, and by tests/test_structure.py, which fails) says exactly which one moved.

Methods listed under `BaseTuner` that peft documents as the hooks a tuner implements (`_create_and_replace`,
`_check_target_module_exists`, `_prepare_adapter_config`, `_mark_only_adapters_as_trainable`) are checked too: they
are private by name only, but a rename would break MITP just the same.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

__all__ = ["INTERNALS", "Internal", "missing_internals"]


@dataclass(frozen=True)
class Internal:
    """One private name MITP depends on.

    Attributes:
        owner: "module:Class" (or "module:function") that must have it.
        name: the attribute name.
        parameters: parameter names (after `self` / `cls`) its signature must have; empty for attributes and for
            callables whose signature MITP does not depend on.
        why: what MITP uses it for, and where.
    """

    owner: str
    name: str
    parameters: tuple[str, ...] = ()
    why: str = ""


_TUNER = "peft.tuners.tuners_utils:BaseTuner"
INTERNALS: tuple[Internal, ...] = (
    Internal(_TUNER, "_create_and_replace",
             ("peft_config", "adapter_name", "target", "target_name", "parent", "current_key"),
             "wraps each interaction layer in an MITPLayer (model.py)"),
    Internal(_TUNER, "_check_target_module_exists", ("peft_config", "key"), "targets exactly the resolved layers"),
    Internal(_TUNER, "_prepare_adapter_config", ("peft_config", "model_config"), "no target-module defaults"),
    Internal(_TUNER, "_mark_only_adapters_as_trainable", ("model",), "keeps the tuner-level hub trainable"),
    Internal(_TUNER, "_enable_adapter_layers", ("enabled",), "disable_adapter also freezes the hub"),
    Internal(_TUNER, "_cast_adapter_dtype", ("adapter_name", "autocast_adapter_dtype"),
             "one dtype rule for prompts, hub and head copy"),
    Internal(_TUNER, "_replace_module", ("parent", "child_name", "new_module", "child"),
             "encoder layers have no `.weight`"),
    Internal(_TUNER, "_remove_adapter_name_from_key", ("key", "adapter_name"),
             "strips the adapter name nested in hub keys"),
    Internal("peft.peft_model:PeftModel", "_enable_peft_forward_hooks", (),
             "calls the tuner's method of that name, by which MITP runs `adapter_names` (mixed) batches"),
    Internal(_TUNER, "_check_merge_allowed", (), "refuses merging"),
    Internal("peft.tuners.tuners_utils:BaseTunerLayer", "_get_base_layer_device_and_dtype", ("base_layer",),
             "encoder layers have no `.weight` (layer.py)"),
    Internal("peft.config:PeftConfig", "_split_kwargs", ("kwargs",), "Hub keywords for the adapter-file checks"),
    Internal("peft.mapping:PEFT_TYPE_TO_CONFIG_MAPPING", "", (), "registration (registration.py)"),
    Internal("peft.mapping:PEFT_TYPE_TO_TUNER_MAPPING", "", (), "registration (registration.py)"),
    Internal("peft.mapping:PEFT_TYPE_TO_PREFIX_MAPPING", "", (), "registration (registration.py)"),
    Internal("transformers.utils:output_capturing", "_active_collector", (),
             "`output_hidden_states` of an interaction layer without the prompts (layer.py); VLMs read middle layers"),
    Internal("transformers:PretrainedConfig", "_attn_implementation_internal", (),
             "reads/sets each tower's attention implementation (modeling.py)"),
    Internal("torch:_C", "_current_graph_task_id", (),
             "refuses an MITPLayer re-run in backward by a checkpoint wrapper around it (layer.py)"),
)


def _resolve(owner: str) -> Any:
    import importlib

    module_name, _, attr = owner.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def missing_internals(internals: tuple[Internal, ...] = INTERNALS) -> list[str]:
    """What no longer matches: one readable line per private name that is gone or whose parameters changed.

    Returns:
        An empty list when every dependency is in place.
    """
    problems = []
    for item in internals:
        where = f"{item.owner}.{item.name}" if item.name else item.owner
        try:
            owner = _resolve(item.owner)
        except (ImportError, AttributeError):
            problems.append(f"{item.owner} is gone (peft_mitp uses it: {item.why})")
            continue
        if not item.name:
            continue
        if isinstance(owner, type) and item.name.startswith("_attn"):
            present = item.name in getattr(owner, "__annotations__", {}) or hasattr(owner(), item.name)
        else:
            present = hasattr(owner, item.name)
        if not present:
            problems.append(f"{where} is gone (peft_mitp uses it: {item.why})")
            continue
        if item.parameters:
            try:
                names = list(inspect.signature(getattr(owner, item.name)).parameters)
            except (TypeError, ValueError):
                continue
            lacking = [p for p in item.parameters if p not in names]
            if lacking:
                problems.append(f"{where} no longer takes {lacking} (has {names}; peft_mitp uses it: {item.why})")
    return problems
