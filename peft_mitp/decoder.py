"""Decoder vision-language models (LLaVA, PaliGemma, Gemma 3, Idefics3, ...): the part of the task model that runs them.

Such a model runs its vision tower, projects the image tokens into the language model's input and runs the language
model over text and image tokens together. MITP prompts interaction layers of both parts. The vision tower finishes
before the language model starts, so the memory hub keeps the vision read-outs and consolidates each with the
language model's read-out of the paired layer (`peft_mitp.lockstep.run_stream`); the classification head reads the
language model's last non-padding token.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from .families import DecoderFamily, ResolvedTower, UnsupportedBackboneError, resolve_tower
from .layer import MITPLayer
from .lockstep import run_stream
from .mixed import current_mixed_batch

# Inputs every decoder family takes besides its own (`DecoderFamily.inputs`).
COMMON_INPUTS = ("input_ids", "attention_mask", "position_ids")


def base_model(backbone: nn.Module, family: DecoderFamily) -> nn.Module:
    """The base model (`LlavaModel`, ...) of a decoder VLM given as itself or as its `*ForConditionalGeneration`.

    MITP needs the language model's hidden states, not its vocabulary logits, so the generation head is not kept.
    """
    vision_root = family.vision.module.split(".")[0]
    if hasattr(backbone, vision_root):
        return backbone
    inner = getattr(backbone, "model", None)
    if inner is not None and hasattr(inner, vision_root):
        return inner
    raise UnsupportedBackboneError(
        f"Could not find the vision tower `{family.vision.module}` in this {type(backbone).__name__} (a "
        f"{family.name} model should have it, or its `.model` should)."
    )


def resolve_towers(backbone: nn.Module, family: DecoderFamily) -> dict[str, ResolvedTower]:
    """The language model (as "text") and the vision tower of a decoder VLM's base model.

    The vision tower's `usable_depth` is the number of its layers whose output the model uses (LLaVA's
    `vision_feature_layer=-2` leaves the last layer unused).
    """
    vision = resolve_tower(backbone, family.vision, "vision")
    usable = family.last_vision_layer(backbone.config, len(vision.layers)) + 1
    return {
        "text": resolve_tower(backbone, family.language, "text"),
        "vision": dataclasses.replace(vision, usable_depth=usable),
    }


def check_inputs(family: DecoderFamily, config: Any, inputs: dict[str, Any], caller: str) -> dict[str, Any]:
    """The given inputs of a decoder VLM's forward, checked before any compute.

    Returns:
        The inputs that are not None.

    Raises:
        TypeError: an input this family does not take, or a non-tensor input.
        ValueError: no `input_ids` or no images, shapes that disagree, or a text without the image placeholder token.
    """
    given = {k: v for k, v in inputs.items() if v is not None}
    allowed = (*COMMON_INPUTS, *family.inputs)
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise TypeError(
            f"{caller} on a {family.name} backbone got inputs it does not take: {unknown}. It takes {list(allowed)} "
            "(the family's processor, `peft_mitp.load_processor`, makes them)."
        )
    for name, value in given.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"`{name}` must be a torch.Tensor, got {type(value).__name__}.")
    ids = given.get("input_ids")
    if ids is None or ids.dim() != 2:
        raise ValueError(
            f"A {family.name} backbone needs `input_ids` of shape (batch, length) holding the text and the image "
            f"placeholder tokens, got {None if ids is None else tuple(ids.shape)}. Use the family's processor "
            "(`peft_mitp.load_processor`)."
        )
    if given.get("pixel_values") is None:
        raise ValueError(
            "MITP classifies image-text pairs: give `pixel_values` (missing modalities are not supported on decoder "
            "vision-language models)."
        )
    for name in ("attention_mask", "position_ids", "token_type_ids"):
        value = given.get(name)
        if value is not None and value.dim() == 2 and tuple(value.shape) != tuple(ids.shape):
            raise ValueError(f"`{name}` has shape {tuple(value.shape)} but `input_ids` has {tuple(ids.shape)}.")
    image_token = getattr(config, family.image_token, None)
    if image_token is not None:
        missing = (~(ids == image_token).any(dim=1)).nonzero().flatten().tolist()
        if missing:
            raise ValueError(
                f"Sample(s) {missing} hold no image placeholder token (id {image_token}): the model could not place "
                "the image in the text. Build the inputs with the family's processor (`peft_mitp.load_processor`), "
                "which inserts them."
            )
    return given


def last_token(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Each row's hidden state at its last non-padding position (left and right padding alike)."""
    if attention_mask is None:
        return hidden[:, -1]
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    index = (positions * attention_mask.to(torch.bool)).argmax(dim=1).to(hidden.device)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), index]


def active_pairs(tower: ResolvedTower) -> int:
    """How many interaction layers of `tower` the active adapter runs (0 without an adapter or when disabled)."""
    count = 0
    for layer in tower.layers:
        if isinstance(layer, MITPLayer) and not layer.disable_adapters and layer._active_prompt() is not None:
            count += 1
    return count


def pooled_features(
    backbone: nn.Module,
    family: DecoderFamily,
    towers: dict[str, ResolvedTower],
    inputs: dict[str, Any],
    frozen_below: list[str],
) -> tuple[torch.Tensor, list[Any], Any]:
    """Run the decoder VLM with the memory hub between its parts; return (last-token features, hub outputs, the hub
    that served the forward: a `MemoryHub`, every adapter's hubs in a mixed batch, or None without an adapter)."""
    mask = inputs.get("attention_mask")
    if family.positions_from_mask and mask is not None and inputs.get("position_ids") is None:
        # Left padding: give each real token the position it has without padding, so padded and unpadded texts match.
        inputs = {**inputs, "position_ids": (mask.long().cumsum(-1) - 1).clamp(min=0)}
    rows = None
    if family.vision_rows is not None:
        rows = family.vision_rows(backbone, inputs)
    if current_mixed_batch() is not None and (rows is not None or towers["vision"].packed):
        raise NotImplementedError(
            f"Mixed-adapter batches need one vision row per sample; {family.name} splits images into tiles, crops or "
            "packed patches. Run one batch per adapter (`model.set_adapter(name)`)."
        )
    result = run_stream(
        lambda: backbone(**inputs, use_cache=False),
        pairs=active_pairs(towers["vision"]),
        attn_implementations={k: t.attn_implementation for k, t in towers.items()},
        token_arguments={k: t.token_arguments for k, t in towers.items()},
        frozen_below=frozen_below,
        vision_rows=rows,
        packed={k for k, t in towers.items() if t.packed},
    )
    return last_token(result.output.last_hidden_state, mask), result.hub_outputs, result.hub


__all__ = [
    "COMMON_INPUTS",
    "active_pairs",
    "base_model",
    "check_inputs",
    "last_token",
    "pooled_features",
    "resolve_towers",
]
