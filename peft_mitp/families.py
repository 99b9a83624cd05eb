"""The one table of per-family knowledge: where each dual encoder keeps its towers and their layers.

MITP runs every family's own stock feature functions (`get_text_features` / `get_image_features`), so a family needs
no forward of its own here: only where its towers and their encoder-layer lists live, which inputs go to which
tower, and how wide the pooled features are. Adding a family is one `register_family(...)` call (see
`docs/backbones.md`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

# Where a stand-alone encoder keeps its layer list, by `config.model_type` (towers of `VisionTextDualEncoderModel`).
TOWER_LAYER_PATHS: dict[str, str] = {
    "bert": "encoder.layer",
    "roberta": "encoder.layer",
    "xlm-roberta": "encoder.layer",
    "vit": "encoder.layer",
    "deit": "encoder.layer",
    "clip_text_model": "encoder.layers",
    "clip_vision_model": "encoder.layers",
    "mitp_convstem_vit": "encoder.layer",
}


@dataclass(frozen=True)
class TowerSpec:
    """Where one tower lives inside the backbone.

    Args:
        module: attribute path from the backbone to the tower model (e.g. "text_model").
        layers: attribute path from the tower model to its `nn.ModuleList` of encoder layers. None: look it up in
            `TOWER_LAYER_PATHS` by the tower's `config.model_type` (for backbones that combine arbitrary towers).
    """

    module: str
    layers: str | None = None


def _projection_dims(config: Any) -> tuple[int, int]:
    return config.projection_dim, config.projection_dim


@dataclass(frozen=True)
class BackboneFamily:
    """Everything MITP needs to know about one dual-encoder family.

    Args:
        name: the family's name in messages and docs.
        model_types: the `config.model_type` values of the backbones of this family.
        text: where the text tower lives.
        vision: where the vision tower lives.
        text_inputs: forward arguments routed to the text feature function.
        vision_inputs: forward arguments routed to the image feature function.
        feature_dims: backbone config -> (text feature width, image feature width) of the pooled, projected features.
        text_features: name of the backbone method that returns pooled text features.
        image_features: name of the backbone method that returns pooled image features.
    """

    name: str
    model_types: tuple[str, ...]
    text: TowerSpec
    vision: TowerSpec
    text_inputs: tuple[str, ...] = ("input_ids", "attention_mask", "position_ids")
    vision_inputs: tuple[str, ...] = ("pixel_values",)
    feature_dims: Callable[[Any], tuple[int, int]] = _projection_dims
    text_features: str = "get_text_features"
    image_features: str = "get_image_features"


_FAMILIES: dict[str, BackboneFamily] = {}


def register_family(family: BackboneFamily) -> BackboneFamily:
    """Add a family to the table (or replace the entry of the same name)."""
    for other in _FAMILIES.values():
        clash = set(other.model_types) & set(family.model_types)
        if clash and other.name != family.name:
            raise ValueError(f"model_type(s) {sorted(clash)} already belong to family {other.name!r}.")
    _FAMILIES[family.name] = family
    return family


def families() -> dict[str, BackboneFamily]:
    """The registered families, by name."""
    return dict(_FAMILIES)


def supported_model_types() -> list[str]:
    """All `config.model_type` values MITP accepts as a backbone."""
    return sorted(t for f in _FAMILIES.values() for t in f.model_types)


class UnsupportedBackboneError(ValueError):
    """The backbone is not a dual encoder MITP knows how to prompt."""


def family_for(model_type: str) -> BackboneFamily:
    """The family of a backbone `config.model_type`.

    Raises:
        UnsupportedBackboneError: naming the supported families and how to add one.
    """
    for family in _FAMILIES.values():
        if model_type in family.model_types:
            return family
    raise UnsupportedBackboneError(
        f"MITP does not support backbones of model_type {model_type!r}. It needs a dual encoder whose text and "
        f"vision towers are transformer encoders; supported model types: {', '.join(supported_model_types())}. "
        "To add a family, describe where its towers and layer lists live with "
        "`peft_mitp.register_family(BackboneFamily(...))` (see docs/backbones.md)."
    )


def _get_path(root: Any, path: str) -> Any:
    for part in path.split("."):
        root = getattr(root, part)
    return root


@dataclass(frozen=True)
class ResolvedTower:
    """One tower of a concrete backbone.

    Attributes:
        module: the tower model.
        layers: its encoder layers.
        layers_path: attribute path from the backbone to `layers`.
        width: hidden width.
        attn_implementation: the tower's attention implementation (for mask extension).
    """

    module: nn.Module
    layers: nn.ModuleList
    layers_path: str
    width: int
    attn_implementation: str | None


def resolve_tower(backbone: nn.Module, spec: TowerSpec, kind: str) -> ResolvedTower:
    """Find a tower's layer list and width in a concrete backbone."""
    module = _get_path(backbone, spec.module)
    config = module.config
    layers_path = spec.layers
    if layers_path is None:
        layers_path = TOWER_LAYER_PATHS.get(config.model_type)
        if layers_path is None:
            raise UnsupportedBackboneError(
                f"MITP does not know where the {kind} tower of model_type {config.model_type!r} keeps its encoder "
                f"layers. Known towers: {', '.join(sorted(TOWER_LAYER_PATHS))}. Add it with "
                f"`peft_mitp.families.TOWER_LAYER_PATHS[{config.model_type!r}] = 'path.to.layers'`."
            )
    layers = _get_path(module, layers_path)
    if not isinstance(layers, nn.ModuleList):
        raise UnsupportedBackboneError(f"{spec.module}.{layers_path} is not an nn.ModuleList of encoder layers.")
    return ResolvedTower(
        module=module,
        layers=layers,
        layers_path=f"{spec.module}.{layers_path}",
        width=config.hidden_size,
        attn_implementation=getattr(config, "_attn_implementation", None),
    )


def pooled(features: Any) -> torch.Tensor:
    """The pooled feature tensor from whatever a feature function returned (a tensor or a model output)."""
    if isinstance(features, torch.Tensor):
        return features
    return features.pooler_output


register_family(
    BackboneFamily(
        name="clip",
        model_types=("clip",),
        text=TowerSpec("text_model", "encoder.layers"),
        vision=TowerSpec("vision_model", "encoder.layers"),
        vision_inputs=("pixel_values", "interpolate_pos_encoding"),
    )
)
register_family(
    BackboneFamily(
        name="vision-text-dual-encoder",
        model_types=("vision-text-dual-encoder",),
        text=TowerSpec("text_model"),
        vision=TowerSpec("vision_model"),
        text_inputs=("input_ids", "attention_mask", "position_ids", "token_type_ids"),
    )
)
