"""The one table of per-family knowledge: where each dual encoder keeps its towers and their layers.

MITP runs every family's own stock feature functions (`get_text_features` / `get_image_features`), so a family needs
no forward of its own here: only where its towers and their encoder-layer lists live, which inputs go to which
tower, how wide the pooled features are, and the few call arguments of its layers that are per token (they must grow
with the appended prompts). Adding a family is one `register_family(...)` call plus its test (see
`docs/backbones.md`); adding a stand-alone tower for `VisionTextDualEncoderModel` is one `TOWER_LAYER_PATHS` entry.

Everything here was checked against transformers 5.24 by `tests/test_families.py` (tiny configs of every family).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

TokenArgumentKind = Literal["rotary", "pairwise", "mask"]


@dataclass(frozen=True)
class TokenArgument:
    """A call argument of a tower's encoder layers that holds one entry per token and must grow with the prompts.

    MITP appends M prompts after the L tokens of an interaction layer; the attention mask is always extended. Some
    layers take further per-token arguments, which `MITPLayer` extends by their kind:

    - "rotary": a `(cos, sin)` pair of rotary position embeddings with the tokens on dim -2 (DINOv3 covers its patch
      tokens only, MLCD all tokens). The prompts get the identity rotation (cos = 1, sin = 0): they are
      position-free, like DINOv3's class and register tokens, so padding never moves them.
    - "pairwise": an additive attention bias of shape (..., L, L), e.g. MPNet's relative position bias; the prompt
      rows and columns get 0 (no bias).
    - "mask": a second attention mask in the same formats as `attention_mask` (e.g. a local-attention mask), extended
      by `extend_attention_mask` with the same rule.

    Args:
        name: the argument's name in the layer's `forward` signature (positional or keyword, both are found).
        kind: "rotary", "pairwise" or "mask", as above.
    """

    name: str
    kind: TokenArgumentKind


# Rotary position embeddings, as transformers 5.x hands them to a layer: `position_embeddings=(cos, sin)`.
ROTARY = TokenArgument("position_embeddings", "rotary")

# Where a stand-alone encoder keeps its layer list, by `config.model_type` (towers of `VisionTextDualEncoderModel`).
# `VisionTextDualEncoderModel` projects each tower's `pooler_output`, so only towers with a pooler are listed; each is
# checked by `tests/test_families.py`. Towers that cannot work are in `REFUSED`, with the reason.
TOWER_LAYER_PATHS: dict[str, str] = {
    # text towers
    "bert": "encoder.layer",
    "roberta": "encoder.layer",
    "xlm-roberta": "encoder.layer",
    "xlm-roberta-xl": "encoder.layer",
    "camembert": "encoder.layer",
    "ernie": "encoder.layer",
    "data2vec-text": "encoder.layer",
    "megatron-bert": "encoder.layer",
    "mpnet": "encoder.layer",
    "jina_embeddings_v3": "layers",
    "clip_text_model": "encoder.layers",
    # vision towers
    "vit": "layers",
    "deit": "layers",
    "pixio": "layers",
    "dinov2": "encoder.layer",
    "dinov2_with_registers": "encoder.layer",
    "dinov3_vit": "model.layer",
    "clip_vision_model": "encoder.layers",
    "siglip_vision_model": "encoder.layers",
    "aimv2_vision_model": "encoder.layers",
    "mlcd_vision_model": "encoder.layers",
    # the offline default's vision tower (`peft_mitp.offline_backbone`)
    "mitp_convstem_vit": "encoder.layer",
}

# Per-token layer arguments of stand-alone towers, by `config.model_type` (see `TokenArgument`).
TOWER_TOKEN_ARGUMENTS: dict[str, tuple[TokenArgument, ...]] = {
    "mpnet": (TokenArgument("position_bias", "pairwise"),),
    "jina_embeddings_v3": (ROTARY,),
    "dinov3_vit": (ROTARY,),
    "mlcd_vision_model": (ROTARY,),
}

_NO_POOLER = (
    "has no pooled output (`pooler_output`), which `VisionTextDualEncoderModel` projects; use a tower with a pooler "
    "(e.g. BERT, RoBERTa, ViT, DINOv2)"
)
_CNN = "is a convolutional network: it has no token layers to put prompts into"
_HIERARCHICAL = (
    "is hierarchical: windowed attention over stages that merge tokens, so appended prompts have no place in its "
    "windows"
)
_SINGLE_STREAM = "is a fusion (single-stream or cross-attention) model, not a dual encoder of two separate towers"

# Model types MITP refuses, with the reason given to the user (dual-encoder families and stand-alone towers alike).
REFUSED: dict[str, str] = {
    "align": "ALIGN's image tower is an EfficientNet, a convolutional network: it has no token layers to put "
    "prompts into",
    "blip-2": "BLIP-2 pairs a Q-Former with a generative language model (its `get_text_features` runs the language "
    "model); it is not a dual encoder of two transformer encoders",
    "groupvit": "GroupViT's image tower is hierarchical: its layers are spread over grouping stages that merge "
    "tokens between stages, so there is no single layer list to pair with the text tower",
    "xclip": "X-CLIP encodes videos, not images",
    "videoprism": "VideoPrism encodes videos, not images",
    "pe_video": "PE-Video encodes videos, not images",
    "clap": "CLAP encodes audio, not images",
    "clvp": "CLVP encodes speech, not images",
    "sam3": "SAM 3 is a promptable segmentation model, not a dual encoder",
    "bridgetower": "BridgeTower " + _SINGLE_STREAM,
    "vilt": "ViLT " + _SINGLE_STREAM,
    "lxmert": "LXMERT " + _SINGLE_STREAM,
    "visual_bert": "VisualBERT " + _SINGLE_STREAM,
    # stand-alone towers a `VisionTextDualEncoderModel` cannot use
    "electra": "ELECTRA " + _NO_POOLER,
    "distilbert": "DistilBERT " + _NO_POOLER,
    "deberta": "DeBERTa " + _NO_POOLER,
    "deberta-v2": "DeBERTa-v2 " + _NO_POOLER,
    "roformer": "RoFormer " + _NO_POOLER,
    "modernbert": "ModernBERT " + _NO_POOLER,
    "nomic_bert": "Nomic BERT " + _NO_POOLER,
    "gte": "GTE " + _NO_POOLER,
    "eurobert": "EuroBERT " + _NO_POOLER,
    "vit_mae": "ViT-MAE " + _NO_POOLER,
    "vit_msn": "ViT-MSN " + _NO_POOLER,
    "ijepa": "I-JEPA " + _NO_POOLER,
    "albert": "ALBERT shares one set of layer weights across all depths, so prompting one layer would prompt every "
    "depth",
    "beit": "BEiT's published checkpoints add a relative position bias inside each attention layer, sized for the "
    "patch grid, which appended prompts do not fit",
    "data2vec-vision": "Data2Vec-Vision is BEiT-like: a relative position bias inside each attention layer, sized "
    "for the patch grid, which appended prompts do not fit",
    "swin": "Swin " + _HIERARCHICAL,
    "swinv2": "Swin V2 " + _HIERARCHICAL,
    "donut-swin": "Donut-Swin " + _HIERARCHICAL,
    "hiera": "Hiera " + _HIERARCHICAL,
    "convnext": "ConvNeXt " + _CNN,
    "convnextv2": "ConvNeXt V2 " + _CNN,
    "resnet": "ResNet " + _CNN,
    "regnet": "RegNet " + _CNN,
    "efficientnet": "EfficientNet " + _CNN,
    "bit": "BiT " + _CNN,
    "siglip_text_model": "transformers' AutoModel cannot rebuild a SigLIP text tower from its config, which "
    "`VisionTextDualEncoderModel` needs to load a saved model; use the whole SigLIP checkpoint",
    "siglip2_vision_model": "SigLIP 2's vision tower needs `pixel_attention_mask` and `spatial_shapes`, which "
    "`VisionTextDualEncoderModel.get_image_features` does not pass on; use the whole SigLIP 2 checkpoint",
}


@dataclass(frozen=True)
class TowerSpec:
    """Where one tower lives inside the backbone.

    Args:
        module: attribute path from the backbone to the tower model (e.g. "text_model").
        layers: attribute path from the tower model to its `nn.ModuleList` of encoder layers. None: look it up in
            `TOWER_LAYER_PATHS` by the tower's `config.model_type` (for backbones that combine arbitrary towers).
        token_arguments: per-token call arguments of the tower's layers besides the attention mask (see
            `TokenArgument`); default none. With `layers=None` the tower type's `TOWER_TOKEN_ARGUMENTS` are added.
        packed: the layers take the images packed into one (N, D) sequence without a batch dimension, split by a
            `cu_seqlens` argument (Qwen2-VL's vision tower); each image then gets its own prompts inside its segment.
        width: the tower config's attribute holding its layers' width ("hidden_size"; Qwen2-VL's vision tower keeps
            it in "embed_dim" and its output width in "hidden_size").
    """

    module: str
    layers: str | None = None
    token_arguments: tuple[TokenArgument, ...] = ()
    packed: bool = False
    width: str = "hidden_size"


def _projection_dims(config: Any) -> tuple[int, int]:
    return config.projection_dim, config.projection_dim


def _siglip_dims(config: Any) -> tuple[int, int]:
    # No projections: the text head maps to `projection_size`, the image attention-pooling head keeps the width.
    return config.text_config.projection_size, config.vision_config.hidden_size


def _hidden_dims(config: Any) -> tuple[int, int]:
    return config.text_config.hidden_size, config.vision_config.hidden_size


@dataclass(frozen=True)
class BackboneFamily:
    """Everything MITP needs to know about one dual-encoder family.

    Args:
        name: the family's name in messages and docs.
        model_types: the `config.model_type` values of the backbones of this family.
        text: where the text tower lives.
        vision: where the vision tower lives.
        text_inputs: forward arguments routed to the text feature function (each must be one of its parameters).
        vision_inputs: forward arguments routed to the image feature function.
        feature_dims: backbone config -> (text feature width, image feature width) of the pooled, projected features.
        text_features: name of the backbone method that returns pooled text features.
        image_features: name of the backbone method that returns pooled image features.
        features_token: None when the feature functions return pooled features (B, D). An int when they return
            per-token features (B, L, D) and the family's contrastive feature is that token (FLAVA: 0, the CLS token,
            as `FlavaModel.forward` takes it).
        text_padding: how texts must be padded for this family (used by `peft_mitp.processing`): "longest" (the
            default; the tower pools padding-independently) or "max_length" (SigLIP and SigLIP 2 pool the last
            position, so they were trained on texts padded to the maximum length and must be used that way).
        pixel_values_layout: "images" (the default): `pixel_values` are (B, C, H, W) images, checked against the
            vision config's `num_channels` and `image_size` before the towers run; "patches": flattened patches
            (B, P, C*p*p), as SigLIP 2's NaFlex image processor gives them with `pixel_attention_mask` and
            `spatial_shapes`.
        output_tokens: whether the feature functions' outputs hold each tower's last-layer tokens at its layers'
            width (`last_hidden_state`, or the per-token features of a `features_token` family): the memory hub's
            token consolidation reads them (`MITPConfig.token_consolidation`). False for AltCLIP, whose text output
            projects its tokens to another width.
    """

    name: str
    model_types: tuple[str, ...]
    text: TowerSpec
    vision: TowerSpec
    text_inputs: tuple[str, ...] = ("input_ids", "attention_mask", "position_ids")
    vision_inputs: tuple[str, ...] = ("pixel_values", "interpolate_pos_encoding")
    feature_dims: Callable[[Any], tuple[int, int]] = _projection_dims
    text_features: str = "get_text_features"
    image_features: str = "get_image_features"
    features_token: int | None = None
    text_padding: Literal["longest", "max_length"] = "longest"
    pixel_values_layout: Literal["images", "patches"] = "images"
    output_tokens: bool = True


def _last_layer(config: Any, depth: int) -> int:
    return depth - 1


def _vision_feature_layer(config: Any, depth: int) -> int:
    """LLaVA-style `config.vision_feature_layer`: an index into the vision tower's hidden states (one per layer plus
    the embeddings), or a list of them (VipLLaVA); the deepest one sets the last layer whose output is used."""
    chosen = config.vision_feature_layer
    indices = list(chosen) if isinstance(chosen, (list, tuple)) else [chosen]
    # hidden_states[i] is the output of layer i - 1; a negative i counts from depth + 1 entries.
    return max((i if i >= 0 else depth + 1 + i) - 1 for i in indices)


@dataclass(frozen=True)
class DecoderFamily:
    """Everything MITP needs to know about one decoder vision-language model family.

    Such a model feeds the output of a vision tower, through a projector, into a causal language model together with
    the text. The two parts cannot run in lock-step: the vision tower finishes before the language model starts, so
    the memory hub stores the vision read-outs and hands them to the language model's interaction layers (direction
    vision -> language only; docs/method.md, "Decoder vision-language models").

    Args:
        name: the family's name in messages and docs.
        model_types: the `config.model_type` values of this family.
        vision: where the vision tower lives, from the base model (the `*Model`, not `*ForConditionalGeneration`);
            `layers=None` looks the vision tower's layer list up in `TOWER_LAYER_PATHS` by its `model_type`.
        language: where the language model lives, from the base model.
        inputs: the forward arguments the base model takes besides `input_ids` and `attention_mask` (e.g.
            `pixel_values`, `image_sizes`, `token_type_ids`); anything else is refused.
        last_vision_layer: (backbone config, vision depth) -> index of the deepest vision layer whose output the model
            uses (LLaVA's `vision_feature_layer=-2` takes the second to last); interaction layers must be at or
            below it.
        positions_from_mask: compute `position_ids` from the attention mask when none are given (left padding then
            gives the positions of the unpadded text); False for families that derive their own positions from the
            mask (Qwen2-VL's 3-D rotary positions).
        image_token: name of the config attribute holding the image placeholder token id.
        vision_rows: (base model, forward inputs) -> (R,) the sample of each row the vision tower runs, for families
            that split an image into tiles or crops; None: the vision tower runs one row per sample.
        text_padding: how texts are padded (`peft_mitp.processing`); "longest" for every decoder family (the head
            reads the last non-padding token, so padding never changes a sample's logits).
    """

    name: str
    model_types: tuple[str, ...]
    vision: TowerSpec
    language: TowerSpec = TowerSpec("language_model", "layers", (ROTARY,))
    inputs: tuple[str, ...] = ("pixel_values",)
    last_vision_layer: Callable[[Any, int], int] = _last_layer
    positions_from_mask: bool = True
    image_token: str = "image_token_id"
    vision_rows: Callable[[Any, dict[str, Any]], torch.Tensor] | None = None
    text_padding: Literal["longest", "max_length"] = "longest"


_FAMILIES: dict[str, BackboneFamily] = {}
_DECODER_FAMILIES: dict[str, DecoderFamily] = {}


def register_family(family: BackboneFamily) -> BackboneFamily:
    """Add a family to the table (or replace the entry of the same name).

    Args:
        family: the new entry.

    Returns:
        `family`, so the call can be used as an expression.

    Raises:
        ValueError: one of its model types already belongs to another family.
    """
    for other in _FAMILIES.values():
        clash = set(other.model_types) & set(family.model_types)
        if clash and other.name != family.name:
            raise ValueError(f"model_type(s) {sorted(clash)} already belong to family {other.name!r}.")
    _FAMILIES[family.name] = family
    return family


def register_decoder_family(family: DecoderFamily) -> DecoderFamily:
    """Add a decoder vision-language family to the table (or replace the entry of the same name).

    Raises:
        ValueError: one of its model types already belongs to another family.
    """
    for other in (*_FAMILIES.values(), *_DECODER_FAMILIES.values()):
        clash = set(other.model_types) & set(family.model_types)
        if clash and other.name != family.name:
            raise ValueError(f"model_type(s) {sorted(clash)} already belong to family {other.name!r}.")
    _DECODER_FAMILIES[family.name] = family
    return family


def families() -> dict[str, BackboneFamily]:
    """The registered dual-encoder families, by name."""
    return dict(_FAMILIES)


def decoder_families() -> dict[str, DecoderFamily]:
    """The registered decoder vision-language families, by name."""
    return dict(_DECODER_FAMILIES)


def supported_model_types() -> list[str]:
    """All `config.model_type` values MITP accepts as a backbone (dual encoders and decoder VLMs)."""
    return sorted(t for f in (*_FAMILIES.values(), *_DECODER_FAMILIES.values()) for t in f.model_types)


def supported_decoder_model_types() -> list[str]:
    """The decoder vision-language `config.model_type` values MITP accepts."""
    return sorted(t for f in _DECODER_FAMILIES.values() for t in f.model_types)


class UnsupportedBackboneError(ValueError):
    """The backbone is not a dual encoder MITP knows how to prompt."""


_HOW_TO_ADD = (
    "To add a dual-encoder family, describe where its towers and layer lists live with "
    "`peft_mitp.register_family(BackboneFamily(...))`; to add a stand-alone tower for `VisionTextDualEncoderModel`, "
    "`peft_mitp.families.TOWER_LAYER_PATHS[model_type] = 'path.to.layers'` (see docs/backbones.md)."
)


def _image_text_to_text_types() -> set[str]:
    """The model types of transformers' image-text-to-text mapping (the decoder vision-language models)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    return set(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)


def family_for(model_type: str) -> BackboneFamily | DecoderFamily:
    """The family of a backbone `config.model_type`: a dual encoder or a decoder vision-language model.

    Raises:
        UnsupportedBackboneError: naming why (for known refusals), the supported families and how to add one.
    """
    for family in (*_FAMILIES.values(), *_DECODER_FAMILIES.values()):
        if model_type in family.model_types:
            return family
    supported = ", ".join(supported_model_types())
    if model_type in _image_text_to_text_types():
        reason = DECODER_REFUSED.get(model_type) or REFUSED.get(model_type) or _DECODER_UNCHECKED
        raise UnsupportedBackboneError(
            f"MITP does not support the vision-language model type {model_type!r}: {reason}. Supported decoder "
            f"vision-language models: {', '.join(supported_decoder_model_types())}; supported dual encoders: "
            f"{', '.join(sorted(t for f in _FAMILIES.values() for t in f.model_types))}. To add a decoder family, "
            "describe where its vision tower and language model live with "
            "`peft_mitp.families.register_decoder_family(DecoderFamily(...))` (see docs/backbones.md)."
        )
    if model_type in TOWER_LAYER_PATHS:
        raise UnsupportedBackboneError(
            f"A {model_type!r} model is a single encoder, not a dual encoder: MITP needs a text tower and a vision "
            "tower. Combine a text encoder and a vision encoder with "
            "`MITPForImageTextClassification.from_text_vision_pretrained(text_name_or_path, vision_name_or_path, "
            f"num_labels=...)` (or wrap a `VisionTextDualEncoderModel`). Supported dual encoders: {supported}."
        )
    reason = REFUSED.get(model_type)
    why = f": {reason}." if reason else "."
    raise UnsupportedBackboneError(
        f"MITP does not support backbones of model_type {model_type!r}{why} It needs a dual encoder whose text and "
        f"vision towers are transformer encoders; supported model types: {supported}. {_HOW_TO_ADD}"
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
        token_arguments: per-token call arguments of its layers besides the attention mask (see `TokenArgument`).
        usable_depth: how many of its layers (from the bottom) the model's output depends on; None: all. A decoder
            VLM that takes a middle vision layer's output (`vision_feature_layer=-2`) does not use the layers above.
        packed: its layers take packed (N, D) sequences split by `cu_seqlens` (`TowerSpec.packed`).
    """

    module: nn.Module
    layers: nn.ModuleList
    layers_path: str
    width: int
    attn_implementation: str | None
    token_arguments: tuple[TokenArgument, ...] = ()
    usable_depth: int | None = None
    packed: bool = False


def tower_layers_path(model_type: str, kind: str) -> str:
    """Where a stand-alone tower of `model_type` keeps its encoder layers (`TOWER_LAYER_PATHS`).

    Args:
        model_type: the tower's `config.model_type`.
        kind: "text" or "vision" (for messages).

    Raises:
        UnsupportedBackboneError: the tower is refused (with the reason) or unknown, naming the known towers and how
            to add one.
    """
    path = TOWER_LAYER_PATHS.get(model_type)
    if path is not None:
        return path
    reason = REFUSED.get(model_type)
    why = f": {reason}." if reason else " (it is not in `TOWER_LAYER_PATHS`)."
    raise UnsupportedBackboneError(
        f"MITP cannot prompt a {kind} tower of model_type {model_type!r}{why} Known towers: "
        f"{', '.join(sorted(TOWER_LAYER_PATHS))}. To add one, "
        f"`peft_mitp.families.TOWER_LAYER_PATHS[{model_type!r}] = 'path.to.layers'` (see docs/backbones.md)."
    )


def resolve_tower(backbone: nn.Module, spec: TowerSpec, kind: str) -> ResolvedTower:
    """Find a tower's layer list and width in a concrete backbone.

    Args:
        backbone: the dual encoder.
        spec: where the tower lives (from its family).
        kind: "text" or "vision" (for messages).

    Raises:
        UnsupportedBackboneError: the tower type is refused or unknown (for backbones that combine arbitrary towers),
            or the layer path does not lead to an `nn.ModuleList`.
    """
    module = _get_path(backbone, spec.module)
    config = module.config
    layers_path = spec.layers
    token_arguments = spec.token_arguments
    if layers_path is None:
        layers_path = tower_layers_path(config.model_type, kind)
        token_arguments = token_arguments + TOWER_TOKEN_ARGUMENTS.get(config.model_type, ())
    layers = _get_path(module, layers_path)
    if not isinstance(layers, nn.ModuleList):
        raise UnsupportedBackboneError(f"{spec.module}.{layers_path} is not an nn.ModuleList of encoder layers.")
    return ResolvedTower(
        module=module,
        layers=layers,
        layers_path=f"{spec.module}.{layers_path}",
        width=getattr(config, spec.width),
        attn_implementation=getattr(config, "_attn_implementation", None),
        token_arguments=token_arguments,
        packed=spec.packed,
    )


def pooled(features: Any, token: int | None = None) -> torch.Tensor:
    """The pooled feature tensor from whatever a feature function returned (a tensor or a model output).

    Args:
        features: a tensor, or a model output whose `pooler_output` holds the features.
        token: None for pooled (B, D) features; an index to take that token of per-token (B, L, D) features
            (`BackboneFamily.features_token`).
    """
    if not isinstance(features, torch.Tensor):
        features = features.pooler_output
    return features if token is None else features[:, token]


# ---------------------------------------------------------------------------------------------------------- the table
# Causality of the text towers (checked by tests/test_families.py): CLIP, MetaCLIP 2, OWL-ViT, OWLv2 and CLIPSeg pass
# `is_causal=True` to their text layers; AIMv2 builds a causal mask from the padding mask; all others are
# bidirectional. `MITPLayer` reads both from the layer call (and a causal-by-attribute attention from the layer
# itself), so no entry needs to say it.

register_family(
    BackboneFamily(
        name="clip",
        model_types=("clip",),
        text=TowerSpec("text_model", "encoder.layers"),
        vision=TowerSpec("vision_model", "encoder.layers"),
    )
)
register_family(
    BackboneFamily(
        name="metaclip-2",
        model_types=("metaclip_2",),
        text=TowerSpec("text_model", "encoder.layers"),
        vision=TowerSpec("vision_model", "encoder.layers"),
    )
)
register_family(
    BackboneFamily(
        name="siglip",
        model_types=("siglip",),
        text=TowerSpec("text_model", "encoder.layers"),
        vision=TowerSpec("vision_model", "encoder.layers"),
        feature_dims=_siglip_dims,
        text_padding="max_length",
    )
)
register_family(
    BackboneFamily(
        name="siglip2",
        model_types=("siglip2",),
        text=TowerSpec("text_model", "encoder.layers"),
        vision=TowerSpec("vision_model", "encoder.layers"),
        # NaFlex: the image processor returns patches plus their mask and grid shape, all for the vision tower.
        vision_inputs=("pixel_values", "pixel_attention_mask", "spatial_shapes"),
        feature_dims=_siglip_dims,
        text_padding="max_length",
        pixel_values_layout="patches",
    )
)
register_family(
    BackboneFamily(
        name="chinese-clip",
        model_types=("chinese_clip",),
        text=TowerSpec("text_model", "encoder.layer"),
        vision=TowerSpec("vision_model", "encoder.layers"),
        text_inputs=("input_ids", "attention_mask", "token_type_ids", "position_ids"),
    )
)
register_family(
    BackboneFamily(
        name="altclip",
        model_types=("altclip",),
        text=TowerSpec("text_model", "roberta.encoder.layers"),
        vision=TowerSpec("vision_model", "encoder.layers"),
        text_inputs=("input_ids", "attention_mask", "token_type_ids", "position_ids"),
        output_tokens=False,
    )
)
register_family(
    BackboneFamily(
        name="owlvit",
        model_types=("owlvit",),
        text=TowerSpec("text_model", "encoder.layers"),
        vision=TowerSpec("vision_model", "encoder.layers"),
        text_inputs=("input_ids", "attention_mask"),
    )
)
register_family(
    BackboneFamily(
        name="owlv2",
        model_types=("owlv2",),
        text=TowerSpec("text_model", "encoder.layers"),
        vision=TowerSpec("vision_model", "encoder.layers"),
        text_inputs=("input_ids", "attention_mask"),
    )
)
register_family(
    BackboneFamily(
        name="clipseg",
        model_types=("clipseg",),
        text=TowerSpec("text_model", "encoder.layers"),
        vision=TowerSpec("vision_model", "encoder.layers"),
    )
)
register_family(
    BackboneFamily(
        name="aimv2",
        model_types=("aimv2",),
        text=TowerSpec("text_model", "encoder.layers"),
        vision=TowerSpec("vision_model", "encoder.layers"),
    )
)
register_family(
    BackboneFamily(
        name="blip",
        model_types=("blip",),
        # The text layers take `encoder_hidden_states` second and the mask by keyword: `MITPLayer` finds it by name.
        text=TowerSpec("text_model", "encoder.layer"),
        vision=TowerSpec("vision_model", "encoder.layers"),
    )
)
register_family(
    BackboneFamily(
        name="flava",
        model_types=("flava",),
        text=TowerSpec("text_model", "encoder.layer"),
        vision=TowerSpec("image_model", "encoder.layer"),
        text_inputs=("input_ids", "attention_mask", "token_type_ids", "position_ids"),
        features_token=0,
    )
)
register_family(
    BackboneFamily(
        name="tipsv2",
        model_types=("tipsv2",),
        text=TowerSpec("text_model", "encoder.layers"),
        vision=TowerSpec("vision_model", "encoder.layer"),
        vision_inputs=("pixel_values",),
        feature_dims=_hidden_dims,
    )
)
register_family(
    BackboneFamily(
        name="vision-text-dual-encoder",
        model_types=("vision-text-dual-encoder",),
        text=TowerSpec("text_model"),
        vision=TowerSpec("vision_model"),
        text_inputs=("input_ids", "attention_mask", "position_ids", "token_type_ids"),
        vision_inputs=("pixel_values",),
    )
)


# ------------------------------------------------------------------------------------ decoder vision-language models
_DECODER_UNCHECKED = (
    "its layout has not been described to MITP yet (it is not in the decoder-family table, so no test shows that "
    "MITP runs on it)"
)
_Q_FORMER = (
    "a Q-Former between the vision tower and the language model resamples the image into learned queries; MITP's "
    "vision -> language memory is defined for a vision tower that feeds the language model directly"
)
_NO_VISION_ENCODER = "it has no vision encoder with layers to put prompts into (images enter the language model as"
_ENCODER_DECODER = "it is an encoder-decoder (sequence-to-sequence) model, not a vision tower feeding a causal language model"
_TIMM = "its vision tower is a timm model (timm needs torchvision), whose layers MITP does not know"

# Model types of transformers' image-text-to-text mapping that MITP refuses, with the reason.
DECODER_REFUSED: dict[str, str] = {
    "blip-2": _Q_FORMER,
    "instructblip": _Q_FORMER,
    "instructblipvideo": _Q_FORMER,
    "fuyu": f"{_NO_VISION_ENCODER} linearly projected patches)",
    "chameleon": f"{_NO_VISION_ENCODER} discrete VQ-VAE tokens)",
    "emu3": f"{_NO_VISION_ENCODER} discrete VQ-VAE tokens)",
    "florence2": _ENCODER_DECODER,
    "pix2struct": _ENCODER_DECODER,
    "udop": _ENCODER_DECODER,
    "vision-encoder-decoder": _ENCODER_DECODER,
    "t5gemma2": _ENCODER_DECODER,
    "fast_vlm": _TIMM,
    "perception_lm": _TIMM,
    "mllama": "its language model reads the image through cross-attention layers and its vision tower has two "
    "layer stacks (local and global), which MITP's one-list vision side does not describe",
    "video_llava": "it has two vision towers (images and videos)",
    "mistral3": "its Pixtral vision tower packs every image of a batch into one sequence with a block-diagonal "
    "mask, where appended prompts would be shared by all images",
    "lighton_ocr": "its Pixtral vision tower packs every image of a batch into one sequence with a block-diagonal "
    "mask, where appended prompts would be shared by all images",
}

def _llava_next_rows(model: Any, inputs: dict[str, Any]) -> torch.Tensor:
    """LLaVA-NeXT (and LLaVA-OneVision) tile each image by its size (`image_sizes`); all tiles run as one batch."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    config = model.config
    counts = [
        image_size_to_num_patches(size, config.image_grid_pinpoints, config.vision_config.image_size)
        for size in inputs["image_sizes"].tolist()
    ]
    return torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))


def _idefics3_rows(model: Any, inputs: dict[str, Any]) -> torch.Tensor:
    """Idefics3 / SmolVLM: (B, N, C, H, W) crops per sample; all-zero padding crops are dropped before the tower."""
    pixels = inputs["pixel_values"]
    batch, per_sample = pixels.shape[:2]
    real = (pixels.flatten(2) != 0).any(dim=-1).flatten().cpu()
    return torch.arange(batch).repeat_interleave(per_sample)[real]


register_decoder_family(
    DecoderFamily(
        name="llava",
        model_types=("llava",),
        vision=TowerSpec("vision_tower"),
        inputs=("pixel_values", "image_sizes"),
        last_vision_layer=_vision_feature_layer,
    )
)
register_decoder_family(
    DecoderFamily(
        name="llava-next",
        model_types=("llava_next",),
        vision=TowerSpec("vision_tower"),
        # Image tiling: (B, tiles, C, H, W) pixel values and each image's original size.
        inputs=("pixel_values", "image_sizes"),
        last_vision_layer=_vision_feature_layer,
        vision_rows=_llava_next_rows,
    )
)
register_decoder_family(
    DecoderFamily(
        name="llava-onevision",
        model_types=("llava_onevision",),
        vision=TowerSpec("vision_tower"),
        # AnyRes tiling as LLaVA-NeXT: each image's tiles run as vision rows, averaged per sample for the hub.
        inputs=("pixel_values", "image_sizes"),
        last_vision_layer=_vision_feature_layer,
        vision_rows=_llava_next_rows,
    )
)
register_decoder_family(
    DecoderFamily(
        name="paligemma",
        model_types=("paligemma",),
        vision=TowerSpec("vision_tower"),
        # token_type_ids mark the prefix (image + prompt, attended bidirectionally) against the suffix.
        inputs=("pixel_values", "token_type_ids"),
    )
)
register_decoder_family(
    DecoderFamily(
        name="gemma3",
        model_types=("gemma3",),
        vision=TowerSpec("vision_tower"),
        inputs=("pixel_values", "token_type_ids"),
    )
)
register_decoder_family(
    DecoderFamily(
        name="idefics3",
        model_types=("idefics3", "smolvlm"),
        vision=TowerSpec("vision_model", "encoder.layers"),
        # The pixel-shuffle connector; images may be split into crops, `pixel_attention_mask` marks real pixels.
        language=TowerSpec("text_model", "layers", (ROTARY,)),
        inputs=("pixel_values", "pixel_attention_mask"),
        vision_rows=_idefics3_rows,
    )
)
register_decoder_family(
    DecoderFamily(
        name="qwen2-vl",
        model_types=("qwen2_vl",),
        # Packed patches: every image's patches in one (N, D) sequence, split by `cu_seqlens` from `image_grid_thw`.
        vision=TowerSpec("visual", "blocks", (ROTARY,), packed=True, width="embed_dim"),
        inputs=("pixel_values", "image_grid_thw", "mm_token_type_ids"),
        # 3-D rotary positions (time, height, width) computed by the model from the ids, the grid and the mask.
        positions_from_mask=False,
    )
)
register_decoder_family(
    DecoderFamily(
        name="qwen2.5-vl",
        model_types=("qwen2_5_vl",),
        vision=TowerSpec("visual", "blocks", (ROTARY,), packed=True),
        inputs=("pixel_values", "image_grid_thw", "mm_token_type_ids"),
        positions_from_mask=False,
    )
)
register_decoder_family(
    DecoderFamily(
        name="vipllava",
        model_types=("vipllava",),
        vision=TowerSpec("vision_tower"),
        # The projector reads several vision layers (`vision_feature_layers`); interaction stays at or below the
        # deepest of them.
        last_vision_layer=_vision_feature_layer,
    )
)
register_decoder_family(
    DecoderFamily(
        name="aya-vision",
        model_types=("aya_vision",),
        vision=TowerSpec("vision_tower"),
        last_vision_layer=_vision_feature_layer,
    )
)
register_decoder_family(DecoderFamily(name="cohere2-vision", model_types=("cohere2_vision",),
                                      vision=TowerSpec("vision_tower")))
register_decoder_family(
    DecoderFamily(
        name="internvl",
        model_types=("internvl",),
        vision=TowerSpec("vision_tower", "encoder.layer"),
        last_vision_layer=_vision_feature_layer,
    )
)
register_decoder_family(DecoderFamily(name="deepseek-vl", model_types=("deepseek_vl",),
                                      vision=TowerSpec("vision_model")))
register_decoder_family(DecoderFamily(name="janus", model_types=("janus",),
                                      vision=TowerSpec("vision_model", "encoder.layers")))
