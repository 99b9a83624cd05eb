"""FSDP for MITP models: the supported wrap policy, and a model that `fully_shard` accepts.

MITP runs its two towers in lock-step (greenlets) with the memory hub between them. Under FSDP that works when the
FSDP units, and the activation-checkpoint boundaries FSDP derives from the same classes, are the backbone's encoder
layers: an `MITPLayer` then holds its prompts in the root unit around a wrapped (and possibly checkpointed) encoder
layer, which runs and recomputes on tokens and prompts together, and the tuner's memory hubs sit in the root unit,
unsharded for the whole forward. A unit or checkpoint wrapper *around* an `MITPLayer` (or a module holding one) is
refused: a checkpoint wrapper would re-run the layer in backward, outside the lock-step forward, without its prompts.

Measured on 2 CPU processes over gloo (docs/reliability.md, "FSDP"); FSDP2 (`fully_shard`) only.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from .layer import MITPLayer

__all__ = ["fsdp_layer_classes", "prepare_fsdp"]

FSDP_VERSION = 2
WRAP_POLICY = "TRANSFORMER_BASED_WRAP"
STATE_DICT_TYPE = "FULL_STATE_DICT"


def _task_model(model: nn.Module) -> nn.Module:
    """The `MITPForImageTextClassification` inside `model` (a PeftModel, or the task model itself)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not hasattr(base, "mitp_towers"):
        raise TypeError(
            f"FSDP settings for MITP need a model with an MITP adapter, got {type(model).__name__}. Call this on "
            "the PeftModel that `get_peft_model(task_model, MITPConfig(...))` returned for an "
            "`MITPForImageTextClassification`."
        )
    if not any(isinstance(m, MITPLayer) for m in base.modules()):
        raise ValueError(
            f"This {type(base).__name__} has no MITP adapter yet, so the wrap policy cannot be checked against its "
            "interaction layers. Call this on the model `get_peft_model(model, MITPConfig(...))` returned."
        )
    return base


def fsdp_layer_classes(model: nn.Module) -> list[type[nn.Module]]:
    """The classes MITP supports as FSDP units: the encoder layers of the backbone's two towers.

    Interaction layers count by the encoder layer their `MITPLayer` wraps, never by `MITPLayer` itself.

    Args:
        model: a `PeftModel` holding an MITP adapter (what `get_peft_model` returned).

    Returns:
        The distinct encoder layer classes, text tower first (one class for CLIP, `CLIPEncoderLayer`; two for
        backbones joined from separate towers, e.g. `BertLayer` and `ViTLayer`).

    Raises:
        TypeError: `model` is not an MITP model.
        ValueError: it holds no MITP adapter yet.
    """
    towers = _task_model(model).mitp_towers()
    classes: list[type[nn.Module]] = []
    for kind in ("text", "vision"):
        for layer in towers[kind].layers:
            cls = type(layer.get_base_layer() if isinstance(layer, MITPLayer) else layer)
            if cls not in classes:
                classes.append(cls)
    return classes


def _normalised(fsdp_config: Mapping[str, Any] | None) -> dict[str, Any]:
    if fsdp_config is not None and not isinstance(fsdp_config, Mapping):
        raise TypeError(
            f"`fsdp_config` must be a dict of `TrainingArguments.fsdp_config` settings, got "
            f"{type(fsdp_config).__name__}."
        )
    # transformers reads "fsdp_version" as "version" (and so on): read them the way it does.
    return {(k[5:] if k.startswith("fsdp_") else k): v for k, v in (fsdp_config or {}).items()}


def _check_wrap_classes(model: nn.Module, names: list[str], supported: list[str]) -> None:
    present: dict[str, list[nn.Module]] = {}
    for module in model.modules():
        present.setdefault(type(module).__name__, []).append(module)
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"`transformer_layer_cls_to_wrap` takes class names (str), got {name!r}.")
        if name not in present:
            raise ValueError(
                f"`transformer_layer_cls_to_wrap` names {name!r}, which is no module class of this model (FSDP would "
                f"fail to find it). MITP's encoder layers here are {supported}."
            )
        if any(isinstance(sub, MITPLayer) for module in present[name] for sub in module.modules()):
            what = "is MITP's interaction layer" if name == MITPLayer.__name__ else "holds MITP interaction layers"
            raise ValueError(
                f"`transformer_layer_cls_to_wrap` names {name!r}, which {what} (MITPLayer). MITP supports FSDP units "
                "around the encoder layers an MITPLayer wraps, never around an MITPLayer: FSDP's "
                "`activation_checkpointing` wraps the same classes in a checkpoint wrapper, which would re-run the "
                "MITPLayer in backward outside MITP's lock-step forward, without its prompts. Wrap "
                f"{supported} instead: leave `transformer_layer_cls_to_wrap` out and `peft_mitp.prepare_fsdp` fills "
                "it in."
            )


def _scalar_parameters_to_buffers(model: nn.Module) -> list[str]:
    """Re-register frozen 0-d parameters as buffers of the same name; return their names."""
    moved: list[str] = []
    trainable = [name for name, p in model.named_parameters() if p.dim() == 0 and p.requires_grad]
    if trainable:
        raise ValueError(
            f"FSDP2 (`fully_shard`) cannot shard 0-d parameters, and {trainable} are trainable. Freeze them "
            "(`requires_grad_(False)`), or train without FSDP."
        )
    for module_name, module in model.named_modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if param.dim() == 0:
                delattr(module, name)
                module.register_buffer(name, param.detach(), persistent=True)
                moved.append(f"{module_name}.{name}" if module_name else name)
    return moved


def prepare_fsdp(model: nn.Module, fsdp_config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Ready an MITP model for FSDP2 and return the `fsdp_config` for `transformers.TrainingArguments`.

    ```python
    model = get_peft_model(task_model, MITPConfig(...))
    args = TrainingArguments(..., fsdp=True, fsdp_config=peft_mitp.prepare_fsdp(model))
    ```

    The returned settings wrap each encoder layer of both towers in its own FSDP2 unit
    (`fsdp_layer_classes(model)`), keep the prompts, the memory hubs and the head in the root unit, and save the
    adapter from a full state dict, so that `adapter_model.safetensors` holds whole tensors.

    The model is changed in place in one way: its frozen 0-d parameters (the `logit_scale` of CLIP and of
    `VisionTextDualEncoderModel`), which `fully_shard` refuses ("doesn't support scalar parameters") and which MITP
    never uses, become buffers of the same name. Their values and the state-dict keys stay the same. Call this once per model, before
    `Trainer` wraps it, on every process.

    Args:
        model: a `PeftModel` holding an MITP adapter (what `get_peft_model` returned).
        fsdp_config: your own `TrainingArguments.fsdp_config` settings to complete and check (None: the defaults),
            e.g. `{"activation_checkpointing": True}` (FSDP's activation checkpointing of the encoder layers),
            `{"reshard_after_forward": False}`, `{"cpu_offload": True}`. Keys may carry transformers' `fsdp_` prefix.
            Settings MITP depends on are checked: `version` must be 2, `auto_wrap_policy` "TRANSFORMER_BASED_WRAP",
            `state_dict_type` "FULL_STATE_DICT", and `transformer_layer_cls_to_wrap` (default: the encoder layers)
            must not name `MITPLayer` or a module that holds one.

    Returns:
        A new dict for `TrainingArguments(fsdp=True, fsdp_config=...)`: your settings, plus `version`,
        `auto_wrap_policy`, `transformer_layer_cls_to_wrap` and `state_dict_type`.

    Raises:
        TypeError: `model` is not an MITP model, or `fsdp_config` is not a dict.
        ValueError: the model has no MITP adapter yet; a setting would wrap an MITPLayer, uses another FSDP version,
            wrap policy or state-dict type; or a 0-d parameter is trainable (FSDP2 cannot shard it).
    """
    config = _normalised(fsdp_config)
    supported = [cls.__name__ for cls in fsdp_layer_classes(model)]
    version = config.get("version", FSDP_VERSION)
    if str(version) != str(FSDP_VERSION):
        raise ValueError(
            f"MITP supports FSDP2 (`fully_shard`) only, got `version`={version!r}. FSDP1 was not run with MITP (on "
            "CPU, accelerate's FSDP1 wrapping fails before any MITP code runs), and transformers deprecates it. Use "
            "`version`=2 (the default)."
        )
    policy = config.get("auto_wrap_policy", WRAP_POLICY)
    if policy != WRAP_POLICY:
        raise ValueError(
            f"`auto_wrap_policy`={policy!r} is not supported with MITP: a size-based policy may wrap an MITPLayer. "
            f"Use {WRAP_POLICY!r} (the default) with the encoder layers {supported}."
        )
    state_dict_type = config.get("state_dict_type", STATE_DICT_TYPE)
    if state_dict_type != STATE_DICT_TYPE:
        raise ValueError(
            f"`state_dict_type`={state_dict_type!r}: with it, Trainer.save_model writes no adapter_model.safetensors "
            f"for a PEFT model. Use {STATE_DICT_TYPE!r} (the default): the adapter is small, only it is written."
        )
    names = config.get("transformer_layer_cls_to_wrap")
    if names is None:
        names = supported
    elif isinstance(names, str):
        names = [name.strip() for name in names.split(",")]  # accelerate reads "A,B" as two classes
    else:
        names = list(names)
    _check_wrap_classes(model, names, supported)
    _scalar_parameters_to_buffers(model)
    config.update(
        version=FSDP_VERSION,
        auto_wrap_policy=WRAP_POLICY,
        transformer_layer_cls_to_wrap=names,
        state_dict_type=STATE_DICT_TYPE,
    )
    return config
