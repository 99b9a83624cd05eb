"""`MITPForImageTextClassification`: a frozen dual encoder run in lock-step, plus a classification head."""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import torch
from huggingface_hub.dataclasses import strict
from peft.utils import ModulesToSaveWrapper
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedConfig, PreTrainedModel
from transformers.configuration_utils import SubConfigSpec
from transformers.modeling_outputs import SequenceClassifierOutput
from transformers.utils import logging

from . import decoder
from .config import PROBLEM_TYPES
from .families import (
    BackboneFamily,
    DecoderFamily,
    ResolvedTower,
    UnsupportedBackboneError,
    family_for,
    pooled,
    resolve_tower,
    tower_layers_path,
)
from .hub import HubOutput
from .inputs import (
    check_head_options,
    check_input_shapes,
    check_input_types,
    check_label_rows,
    route_inputs,
    split_by_presence,
)
from .layer import MITPLayer
from .lockstep import run_lockstep
from .mixed import BASE, MixedBatch, current_mixed_batch
from .remote import HUB_KWARGS, REACHABILITY_KWARGS, check_hub_reachable

# Head size of a task model built without `num_labels` (transformers' default); an adapter resizes it.
_PLACEHOLDER_LABELS = 2

logger = logging.get_logger(__name__)


@dataclasses.dataclass
class _TowerRun:
    """What one lock-step forward of the towers produced (see `MITPForImageTextClassification._run_towers`)."""

    text: torch.Tensor
    image: torch.Tensor
    hub_outputs: list[HubOutput]
    hub: Any
    presence: Any
    tokens: dict[str, torch.Tensor | None]
    token_masks: dict[str, torch.Tensor | None]


def _attn_implementations(config: PreTrainedConfig) -> list[tuple[PreTrainedConfig, str | None]]:
    """Each (sub-)config of a backbone with its attention implementation."""
    found = [(config, config._attn_implementation_internal)]
    for key in config.sub_configs:
        sub = getattr(config, key, None)
        if isinstance(sub, PreTrainedConfig):
            found.extend(_attn_implementations(sub))
    return found





def _load_tower(name_or_path: str | os.PathLike, kind: str, kwargs: dict[str, Any]) -> PreTrainedModel:
    """One pretrained tower for `from_text_vision_pretrained`: a stand-alone encoder, or a dual encoder's tower."""
    check_hub_reachable(name_or_path, **{k: kwargs[k] for k in REACHABILITY_KWARGS if k in kwargs})
    config = AutoConfig.from_pretrained(name_or_path, **{k: kwargs[k] for k in HUB_KWARGS if k in kwargs})
    # A dual-encoder checkpoint (CLIP, SigLIP, ...) brings the tower's config as a sub-config: load that tower alone.
    tower_config = getattr(config, f"{kind}_config", None)
    from_dual_encoder = isinstance(tower_config, PreTrainedConfig)
    if not from_dual_encoder:
        tower_config = config
    tower_layers_path(tower_config.model_type, kind)  # refuse before loading any weights
    model, info = AutoModel.from_pretrained(name_or_path, config=tower_config, output_loading_info=True, **kwargs)
    if from_dual_encoder and info["missing_keys"]:
        raise UnsupportedBackboneError(
            f"Could not take the {kind} tower out of the {config.model_type!r} checkpoint {name_or_path}: "
            f"{len(info['missing_keys'])} of its weights are not in the checkpoint (e.g. "
            f"{sorted(info['missing_keys'])[:3]}). Give a stand-alone {kind} encoder checkpoint instead, or use the "
            "dual encoder as a whole with `MITPForImageTextClassification.from_pretrained`."
        )
    return model


def _fixed_projection(out_features: int, in_features: int, seed: int) -> torch.Tensor:
    """Identity (zero-padded) when widening or keeping the width; a seeded semi-orthogonal map when narrowing."""
    if out_features >= in_features:
        return torch.eye(out_features, in_features)
    generator = torch.Generator().manual_seed(seed)
    return nn.init.orthogonal_(torch.empty(out_features, in_features), generator=generator)


def _dual_encoder(
    text_model: PreTrainedModel, vision_model: PreTrainedModel, projection_dim: int | None
) -> PreTrainedModel:
    """A `VisionTextDualEncoderModel` joining two towers through fixed projections (`from_text_vision_pretrained`)."""
    from transformers import VisionTextDualEncoderConfig, VisionTextDualEncoderModel

    widths = {"text": text_model.config.hidden_size, "vision": vision_model.config.hidden_size}
    if projection_dim is None:
        projection_dim = max(widths.values())
    config = VisionTextDualEncoderConfig.from_vision_text_configs(
        vision_model.config, text_model.config, projection_dim=projection_dim
    )
    backbone = VisionTextDualEncoderModel(config=config, vision_model=vision_model, text_model=text_model)
    with torch.no_grad():
        for seed, (projection, tower, width) in enumerate(
            (
                (backbone.text_projection, text_model, widths["text"]),
                (backbone.visual_projection, vision_model, widths["vision"]),
            )
        ):
            weight = _fixed_projection(projection_dim, width, seed)
            parameter = next(tower.parameters())
            projection.to(device=parameter.device, dtype=parameter.dtype)
            projection.weight.copy_(weight)
    backbone.requires_grad_(False)
    return backbone.eval()


@strict
class MITPTaskConfig(PreTrainedConfig):
    """Configuration of `MITPForImageTextClassification`: the backbone's own config plus the head.

    Args:
        backbone_config: the dual encoder's config (a `CLIPConfig`, `VisionTextDualEncoderConfig`, ...), or its dict.
        classifier_dropout: dropout on the concatenated pooled features before the head.
        num_labels / id2label / label2id / problem_type: as in every transformers classification config;
            `problem_type="multi_label_classification"` switches the loss to BCE-with-logits.
    """

    model_type = "mitp-image-text"
    sub_configs_defaults = {"backbone_config": SubConfigSpec(config_class=AutoConfig, model_type="clip")}

    backbone_config: PreTrainedConfig | dict | None = None
    classifier_dropout: float = 0.0


class MITPForImageTextClassification(PreTrainedModel):
    """A frozen dual encoder whose two towers run in lock-step, with a linear head on their pooled features.

    This is the task model MITP adapters go on. Without an adapter (or with `disable_adapter()`), its pooled features
    are exactly the backbone's stock `get_text_features` / `get_image_features`; with an MITP adapter, the wrapped
    interaction layers of both towers pause at each interaction pair so the memory hub can read both towers'
    prompts before either tower continues (see `peft_mitp.lockstep`).

    Build it from a checkpoint (`from_pretrained`) or from a backbone in memory (`from_backbone`), then
    `peft.get_peft_model(model, MITPConfig())`.

    Args:
        config: an `MITPTaskConfig`.
        backbone: an already built backbone (its config must be `config.backbone_config`); None builds it from the
            config with random weights (how `from_pretrained` of a saved task model starts).
    """

    config_class = MITPTaskConfig
    base_model_prefix = "mitp"
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    _supports_sdpa = True
    _supports_flash_attn = True
    supports_gradient_checkpointing = True
    # Trainer: the loss is a mean over the batch; no `num_items_in_batch` normalisation.
    accepts_loss_kwargs = False
    # True while the head is `from_pretrained`'s placeholder, waiting for an adapter to size it (`set_head`).
    mitp_head_pending: bool = False

    def __init__(self, config: MITPTaskConfig, backbone: PreTrainedModel | None = None) -> None:
        super().__init__(config)
        if config.problem_type is not None and config.problem_type not in PROBLEM_TYPES:
            raise ValueError(f"`problem_type`={config.problem_type!r} is not supported; use one of {PROBLEM_TYPES}.")
        self.family: BackboneFamily | DecoderFamily = family_for(config.backbone_config.model_type)
        if backbone is None:
            backbone = AutoModel.from_config(config.backbone_config)
        if self.is_decoder_vlm:
            # A `*ForConditionalGeneration` brings a vocabulary head MITP does not use: keep its base model.
            backbone = decoder.base_model(backbone, self.family)
        self.backbone = backbone
        # Keep one config object for the backbone, so attention-implementation switches reach both.
        self.config.backbone_config = backbone.config
        self.mitp_towers()  # fail now, not at the first adapter, on towers MITP cannot prompt
        self.dropout = nn.Dropout(config.classifier_dropout)
        self.classifier = nn.Linear(sum(self.mitp_feature_dims()), config.num_labels)
        self.backbone.requires_grad_(False)
        self.post_init()

    @property
    def is_decoder_vlm(self) -> bool:
        """True for a decoder vision-language backbone (a vision tower feeding a causal language model)."""
        return isinstance(self.family, DecoderFamily)

    @property
    def mitp_direction(self) -> str:
        """Which way the memory hub generates prompts: "both" (dual encoders) or "vision_to_text" (decoder VLMs)."""
        return "vision_to_text" if self.is_decoder_vlm else "both"

    @property
    def is_gradient_checkpointing(self) -> bool:
        """Whether activation checkpointing is on; the same as `is_activation_checkpointing`.

        transformers deprecated this name (a FutureWarning on every read), but peft's `PeftModel.__init__` still
        reads it from the model it wraps, so every `get_peft_model` / `PeftModel.from_pretrained` of this model would
        print the warning. Answering here keeps the value and drops the warning.
        """
        return self.is_activation_checkpointing

    def _init_weights(self, module: nn.Module) -> None:
        if module is getattr(self, "classifier", None):
            nn.init.normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_backbone(
        cls,
        backbone: PreTrainedModel,
        num_labels: int | None = None,
        *,
        id2label: dict[int, str] | None = None,
        problem_type: str | None = None,
        classifier_dropout: float = 0.0,
    ) -> MITPForImageTextClassification:
        """Wrap a dual encoder already in memory (its weights are used as they are, not copied).

        Args:
            backbone: a supported dual encoder (`CLIPModel`, `VisionTextDualEncoderModel`, ...).
            num_labels: number of classes (or of labels, for multi-label). Defaults to `len(id2label)`.
            id2label: optional class names.
            problem_type: None or "single_label_classification" (cross-entropy), or
                "multi_label_classification" (BCE-with-logits, labels as 0/1 float vectors).
            classifier_dropout: dropout before the head.
        """
        if not isinstance(backbone, PreTrainedModel):
            raise TypeError(
                f"`backbone` must be a transformers model (e.g. a `CLIPModel`), got {type(backbone).__name__}. To "
                "load a checkpoint by name use `MITPForImageTextClassification.from_pretrained(name, num_labels=...)`."
            )
        family_for(backbone.config.model_type)  # fail early with the list of supported families
        check_head_options(num_labels, id2label, classifier_dropout)
        if num_labels is None and id2label is None:
            raise ValueError("Give `num_labels` (the number of classes) or `id2label`.")
        attn_before = _attn_implementations(backbone.config)
        kwargs: dict[str, Any] = {}
        if id2label is not None:
            kwargs["id2label"] = {int(k): v for k, v in id2label.items()}
            kwargs["label2id"] = {v: int(k) for k, v in id2label.items()}
            if num_labels is not None and num_labels != len(id2label):
                raise ValueError(f"`num_labels`={num_labels} but `id2label` has {len(id2label)} entries.")
        else:
            kwargs["num_labels"] = num_labels
        config = MITPTaskConfig(
            backbone_config=backbone.config,
            classifier_dropout=classifier_dropout,
            problem_type=problem_type,
            **kwargs,
        )
        config._name_or_path = getattr(backbone.config, "_name_or_path", "")
        model = cls(config, backbone=backbone)
        # Wrapping sets the wrapper's (unset) attention implementation on the nested configs: restore the backbone's.
        for sub_config, implementation in attn_before:
            sub_config._attn_implementation_internal = implementation
        return model.to(next(backbone.parameters()).device)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *model_args: Any,
        num_labels: int | None = None,
        id2label: dict[int, str] | None = None,
        problem_type: str | None = None,
        classifier_dropout: float = 0.0,
        **kwargs: Any,
    ) -> MITPForImageTextClassification:
        """Load a saved task model, or build one around a dual-encoder checkpoint.

        Args:
            pretrained_model_name_or_path: a Hub id or local folder holding either a saved
                `MITPForImageTextClassification` (config `model_type` "mitp-image-text") or any supported dual
                encoder (`"openai/clip-vit-large-patch14"`, a `VisionTextDualEncoderModel` folder, ...), or
                `"offline"`: the packaged offline backbone (`peft_mitp.offline_backbone.build_offline_backbone()`,
                built from installed packages without the Hub; Hub keywords are ignored for it).
            num_labels / id2label / problem_type / classifier_dropout: the head, for a dual-encoder checkpoint
                (a saved task model brings its own).
            **kwargs: passed to `from_pretrained` of the backbone (`dtype`, `attn_implementation`, `revision`,
                `token`, `cache_dir`, `local_files_only`, ...). `quantization_config`: a `BitsAndBytesConfig`
                (8-bit; the encoder layers are quantized, projections and poolers kept) or a `TorchAoConfig`
                (int8 weight-only, applied by `peft_mitp.quantize_backbone` after loading); the adapter stays
                float32 (docs/reliability.md, "Quantized backbones").

        Raises:
            HubUnreachableError: a Hub id that is not in the local cache, and the Hub cannot be reached (at once, not
                after huggingface_hub's retries; the message names the ways to work offline).
        """
        check_head_options(num_labels, id2label, classifier_dropout)
        hub_kwargs = {
            k: kwargs[k]
            for k in HUB_KWARGS
            if k in kwargs
        }
        from .offline_backbone import build_offline_backbone, is_offline_backbone_name

        quantization = kwargs.pop("quantization_config", None)
        torchao = quantization is not None and type(quantization).__name__ == "TorchAoConfig"
        if quantization is not None and not torchao and type(quantization).__name__ != "BitsAndBytesConfig":
            raise TypeError(
                f"`quantization_config` must be a `transformers.BitsAndBytesConfig` or `TorchAoConfig`, got "
                f"{type(quantization).__name__} (docs/reliability.md, 'Quantized backbones')."
            )
        if kwargs.get("config") is None and is_offline_backbone_name(pretrained_model_name_or_path):
            # The packaged offline backbone: built from installed packages, never looked up on the Hub.
            backbone = build_offline_backbone()
            if kwargs.get("dtype") not in (None, "auto"):
                dtype = kwargs["dtype"]
                backbone.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)
            if quantization is not None and not torchao:
                # bitsandbytes quantizes while loading: load the built backbone back from a temporary folder.
                from .quantization import load_quantized, saved_for_quantized_loading

                name = backbone.config._name_or_path  # what `load_processor` recognises the offline backbone by
                with saved_for_quantized_loading(backbone) as folder:
                    backbone = load_quantized(folder, quantization, backbone.config, AutoModel.from_pretrained)
                backbone.config._name_or_path = name
        else:
            if kwargs.get("config") is None:
                check_hub_reachable(
                    pretrained_model_name_or_path, **{k: v for k, v in hub_kwargs.items() if k in REACHABILITY_KWARGS}
                )
            config = kwargs.get("config") or AutoConfig.from_pretrained(pretrained_model_name_or_path, **hub_kwargs)
            if isinstance(config, MITPTaskConfig):
                if quantization is not None:
                    raise ValueError(
                        "`quantization_config` applies to a backbone checkpoint; a saved task model loads as it was "
                        "saved. Load the backbone checkpoint with `quantization_config` instead."
                    )
                head = {"num_labels": num_labels, "id2label": id2label, "problem_type": problem_type}
                for key, value in head.items():
                    if value is not None:
                        kwargs[key] = value
                return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
            family_for(config.model_type)
            kwargs.pop("config", None)
            if quantization is not None and not torchao:
                from .quantization import load_quantized

                backbone = load_quantized(
                    pretrained_model_name_or_path, quantization, config,
                    lambda *a, **k: AutoModel.from_pretrained(*a, *model_args, **k), **kwargs
                )
            else:
                backbone = AutoModel.from_pretrained(
                    pretrained_model_name_or_path, *model_args, config=config, **kwargs
                )
        # No head size given: build a placeholder head that the MITP adapter loaded next sizes from what it recorded
        # (`PeftModel.from_pretrained`, `AutoPeftModel`); `get_peft_model` refuses it (docs/sharing.md).
        pending = num_labels is None and id2label is None
        model = cls.from_backbone(
            backbone,
            num_labels=_PLACEHOLDER_LABELS if pending else num_labels,
            id2label=id2label,
            problem_type=problem_type,
            classifier_dropout=classifier_dropout,
        )
        if pending:
            logger.warning(
                f"No `num_labels` or `id2label` given for {pretrained_model_name_or_path}: the classification head is "
                "a placeholder, sized by the MITP adapter you load next. To train a new adapter, pass num_labels=..."
            )
            model.mitp_head_pending = True
        if torchao:
            from .quantization import quantize_backbone

            quantize_backbone(model, quantization)
        return model

    @classmethod
    def from_text_vision_pretrained(
        cls,
        text_name_or_path: str | os.PathLike,
        vision_name_or_path: str | os.PathLike,
        num_labels: int | None = None,
        *,
        projection_dim: int | None = None,
        id2label: dict[int, str] | None = None,
        problem_type: str | None = None,
        classifier_dropout: float = 0.0,
        **kwargs: Any,
    ) -> MITPForImageTextClassification:
        """Build a task model from a separately pre-trained text encoder and vision encoder (as PMF does).

        The two towers are loaded by name and joined in a stock `transformers.VisionTextDualEncoderModel`, like its
        `from_vision_text_pretrained`, but with fixed projections instead of untrained random ones: the projections
        are frozen with the rest of the backbone, so they must not throw information away.

        - `projection_dim=None` (default): P = the wider tower's width and both projections are identities, the
          narrower tower's features zero-padded to P. The pooled features are then exactly the towers' own pooled
          outputs (BERT's and ViT's poolers: `tanh(dense(CLS))`).
        - `projection_dim=P`: an identity (zero-padded) for a tower of width <= P; for a wider tower a fixed random
          semi-orthogonal map (seeded, so the same call always builds the same backbone, which a saved adapter needs).

        Args:
            text_name_or_path: a text encoder checkpoint (Hub id or folder), e.g. "google-bert/bert-base-uncased", or
                a dual-encoder checkpoint whose text tower to take (e.g. a CLIP checkpoint gives its `CLIPTextModel`).
            vision_name_or_path: a vision encoder checkpoint, e.g. "google/vit-base-patch16-224-in21k", or a
                dual-encoder checkpoint whose vision tower to take.
            num_labels / id2label / problem_type / classifier_dropout: the head, as in `from_backbone`.
            projection_dim: width P of the projected features (see above); None: the wider tower's width.
            **kwargs: passed to both towers' `from_pretrained` (`dtype`, `attn_implementation`, `revision`,
                `token`, `cache_dir`, `local_files_only`, ...); prefix a key with `text_` or `vision_` to pass it to
                that tower only (`text_revision="main"`).

        Returns:
            An `MITPForImageTextClassification` around a `VisionTextDualEncoderModel`. Save it with `save_pretrained`
            to reload it in one piece; the towers' sources are kept in `config.backbone_config.{text,vision}_config`.

        Raises:
            UnsupportedBackboneError: a tower type MITP cannot prompt (checked before any weights are loaded).
        """
        if projection_dim is not None and (
            not isinstance(projection_dim, int) or isinstance(projection_dim, bool) or projection_dim < 1
        ):
            raise ValueError(f"`projection_dim` must be a positive integer or None, got {projection_dim!r}.")
        shared = {k: v for k, v in kwargs.items() if not k.startswith(("text_", "vision_"))}
        towers = {}
        for kind, name_or_path in (("text", text_name_or_path), ("vision", vision_name_or_path)):
            own = {k[len(kind) + 1 :]: v for k, v in kwargs.items() if k.startswith(f"{kind}_")}
            towers[kind] = _load_tower(name_or_path, kind, {**shared, **own})
        backbone = _dual_encoder(towers["text"], towers["vision"], projection_dim)
        return cls.from_backbone(
            backbone,
            num_labels=num_labels,
            id2label=id2label,
            problem_type=problem_type,
            classifier_dropout=classifier_dropout,
        )

    def set_head(
        self,
        num_labels: int | None = None,
        *,
        id2label: dict[int, str] | None = None,
        problem_type: str | None = None,
    ) -> None:
        """Replace the classification head by a freshly initialised one (before any adapter wraps it).

        Loading an MITP adapter onto a task model built by `from_pretrained(<dual encoder>)` without `num_labels`
        calls this with the head the adapter recorded (see `docs/sharing.md`). Call it yourself to reuse a task model
        for another label set before `get_peft_model`.

        Args:
            num_labels: number of classes (or labels, for multi-label). Defaults to `len(id2label)`.
            id2label: class names; None keeps transformers' default "LABEL_i" names.
            problem_type: None or "single_label_classification" (cross-entropy), or "multi_label_classification".

        Raises:
            ValueError: neither `num_labels` nor `id2label`, a mismatch between them, or an unknown `problem_type`.
            RuntimeError: an adapter already wraps the head (peft keeps one copy per adapter); call it before.
        """
        check_head_options(num_labels, id2label)
        if id2label is not None:
            id2label = {int(k): v for k, v in id2label.items()}
            if num_labels is not None and num_labels != len(id2label):
                raise ValueError(f"`num_labels`={num_labels} but `id2label` has {len(id2label)} entries.")
            num_labels = len(id2label)
        if num_labels is None:
            raise ValueError("Give `num_labels` (the number of classes) or `id2label`.")
        if problem_type is not None and problem_type not in PROBLEM_TYPES:
            raise ValueError(f"`problem_type`={problem_type!r} is not supported; use one of {PROBLEM_TYPES}.")
        old = self.classifier
        if not isinstance(old, nn.Linear):
            raise RuntimeError(
                f"The head is already wrapped by an adapter ({type(old).__name__}); set it before `get_peft_model`."
            )
        self.config.num_labels = num_labels
        if id2label is not None:
            self.config.id2label = id2label
            self.config.label2id = {v: k for k, v in id2label.items()}
        self.config.problem_type = problem_type
        head = nn.Linear(old.in_features, num_labels, device=old.weight.device, dtype=old.weight.dtype)
        if head.weight.device != old.weight.device:
            # Inside accelerate's `init_empty_weights` (peft's `low_cpu_mem_usage=True`) new parameters land on the
            # meta device; this head is not loaded from a file, so it needs real storage.
            head.to_empty(device=old.weight.device)
        self.classifier = head
        self._init_weights(head)
        self.mitp_head_pending = False

    # ------------------------------------------------------------------ what the tuner needs
    def mitp_towers(self) -> dict[str, ResolvedTower]:
        """Both towers of the backbone, with layer paths relative to this model (used by `MITPModel`).

        For a decoder VLM, "text" is the language model and "vision" the vision tower.
        """
        if self.is_decoder_vlm:
            resolved = decoder.resolve_towers(self.backbone, self.family)
        else:
            resolved = {
                kind: resolve_tower(self.backbone, spec, kind)
                for kind, spec in (("text", self.family.text), ("vision", self.family.vision))
            }
        return {
            kind: dataclasses.replace(tower, layers_path=f"backbone.{tower.layers_path}")
            for kind, tower in resolved.items()
        }

    def get_input_embeddings(self) -> nn.Module:
        """The text tower's input (token) embeddings, as `get_input_embeddings` of the text tower returns them.

        peft's `save_embedding_layers=True` and its preparation helpers (`enable_input_require_grads`, ...) call this.
        """
        return self.mitp_towers()["text"].module.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        """Replace the text tower's input (token) embeddings."""
        self.mitp_towers()["text"].module.set_input_embeddings(value)

    def mitp_feature_dims(self) -> tuple[int, int]:
        """Widths of the pooled (text, image) features the head reads (used by `MITPModel` for the stand-ins).

        A decoder VLM's head reads the language model's last token only: (its width, 0).
        """
        if self.is_decoder_vlm:
            return self.mitp_towers()["text"].width, 0
        return self.family.feature_dims(self.backbone.config)

    # ------------------------------------------------------------------ forward
    def _frozen_towers(self, towers: dict[str, ResolvedTower]) -> list[str]:
        """The towers whose feature function uses no trainable weight except MITP's prompts.

        Only those may run their layers below the first interaction layer without autograd. Anything else trainable
        in a tower (LoRA, IA3, full fine-tuning, a trainable embedding or projection) needs autograd from the
        embeddings up. Read on every forward: `requires_grad` can change between steps.
        """
        prompts = {
            id(p) for m in self.backbone.modules() if isinstance(m, MITPLayer) for p in m.mitp_prompt.parameters()
        }
        trainable = {id(p) for p in self.backbone.parameters() if p.requires_grad and id(p) not in prompts}
        if not trainable:
            return list(towers)
        own = {kind: {id(p) for p in tower.module.parameters()} for kind, tower in towers.items()}
        frozen = []
        for kind in towers:
            # What the tower's feature function may use: everything but the other tower's own weights (the
            # projections and any shared module count for both towers).
            others = set().union(*(ids for other, ids in own.items() if other != kind)) - own[kind]
            if not trainable - others:
                frozen.append(kind)
        return frozen

    def pooled_features(self, **inputs: Any) -> tuple[torch.Tensor, torch.Tensor, list[HubOutput]]:
        """Run both towers in lock-step and return (text features, image features, hub outputs per pair).

        `image_present` / `text_present` masks (or a missing `pixel_values` / `input_ids`) mark samples without that
        modality: its tower does not run for them and the active adapter's stand-ins take its place (see `forward`).
        These are the towers' own pooled features; the head reads them with the memory hub's read-out added
        (`head_features`).
        """
        run = self._run_towers(inputs)
        return run.text, run.image, run.hub_outputs

    def head_features(self, **inputs: Any) -> torch.Tensor:
        """The (B, D) features the classification head reads: both towers' pooled features, concatenated, plus the
        active adapter's memory read-out (token consolidation and fusion, `MITPConfig.token_consolidation`)."""
        return self._memory_features(self._run_towers(inputs))

    def _run_towers(self, inputs: dict[str, Any]) -> _TowerRun:
        """Run both towers in lock-step (or the decoder VLM's stream); see `pooled_features`."""
        masks = {"text": inputs.pop("text_present", None), "vision": inputs.pop("image_present", None)}
        if self.is_decoder_vlm:
            return self._decoder_features(inputs, masks)
        text_inputs, vision_inputs = route_inputs(self.family, inputs, type(self).__name__)
        check_input_types(text_inputs, vision_inputs)
        check_input_shapes(self.family, self.mitp_towers(), text_inputs, vision_inputs)
        routed, presence = split_by_presence(
            {"text": text_inputs, "vision": vision_inputs}, masks, self.classifier.weight.device
        )
        backbone = self.backbone
        towers = self.mitp_towers()
        token = self.family.features_token
        fns = {
            "text": lambda: getattr(backbone, self.family.text_features)(**routed["text"]),
            "vision": lambda: getattr(backbone, self.family.image_features)(**routed["vision"]),
        }
        result = run_lockstep(
            fns["text"] if routed["text"] is not None else None,
            fns["vision"] if routed["vision"] is not None else None,
            attn_implementations={k: t.attn_implementation for k, t in towers.items()},
            presence=presence,
            token_arguments={k: t.token_arguments for k, t in towers.items()},
            frozen_below=self._frozen_towers(towers),
        )
        outputs = {"text": result.text, "vision": result.vision}
        text, image = (None if outputs[k] is None else pooled(outputs[k], token) for k in ("text", "vision"))
        tokens = {
            kind: None if output is None else (output if isinstance(output, torch.Tensor) else output.last_hidden_state)
            for kind, output in outputs.items()
        }
        token_masks = {
            "text": None if routed["text"] is None else routed["text"].get("attention_mask"),
            "vision": None if routed["vision"] is None else routed["vision"].get("pixel_attention_mask"),
        }
        if result.presence is not None:
            if result.hub is None:
                raise ValueError(
                    f"{result.presence.describe()}, but no MITP adapter is active, so nothing can stand in for a "
                    "missing modality. Use an adapter created with `MITPConfig(missing_modality=True)` (not inside "
                    "`disable_adapter()`), or give every sample both an image and a text."
                )
            text = result.hub.fill_features("text", text, result.presence)
            image = result.hub.fill_features("vision", image, result.presence)
        return _TowerRun(text, image, result.hub_outputs, result.hub, result.presence, tokens, token_masks)

    def _memory_features(self, run: _TowerRun) -> torch.Tensor:
        """Concatenated pooled features plus the serving adapter's memory read-out (each adapter's, for its own
        samples, in a mixed batch; none inside `disable_adapter()` or for "__base__" samples)."""
        features = torch.cat([run.text, run.image], dim=-1)
        hub = run.hub
        if hub is None:
            return features
        if isinstance(hub, nn.ModuleDict):  # a mixed-adapter batch: each adapter's read-out on its own samples
            mixed = current_mixed_batch()
            done = {
                name: (rows.to(features.device), self._adapter_memory(hub[name], features[rows.to(features.device)],
                                                                      run, rows))
                for name, rows in mixed.groups.items()
                if name != BASE and hub[name].readout is not None
            }
            dtypes = [features.dtype, *(out.dtype for _, out in done.values())]
            parts = features.to(functools.reduce(torch.promote_types, dtypes)).clone()
            for rows, out in done.values():
                parts[rows] = out.to(parts.dtype)
            return parts
        if hub.readout is None:
            return features
        return self._adapter_memory(hub, features, run, None)

    @staticmethod
    def _adapter_memory(hub: Any, features: torch.Tensor, run: _TowerRun, rows: torch.Tensor | None) -> torch.Tensor:
        """One adapter's memory read-out on `features` (the batch's rows `rows`; None: all rows)."""
        scores = None
        if hub.token_heads:
            weight = hub.text_in.weight
            scores = torch.zeros(features.shape[0], hub.token_heads, device=weight.device, dtype=weight.dtype)
            tokens, masks = run.tokens, run.token_masks
            if tokens["text"] is not None and tokens["vision"] is not None:
                if run.presence is None:
                    pick = {k: (rows if rows is not None else slice(None)) for k in tokens}
                    both = slice(None)
                else:  # samples lacking a modality get no similarities (zeros: no evidence either way)
                    kept, ran = run.presence.kept, run.presence.ran
                    both = (kept["text"] & kept["vision"]).to(weight.device)
                    pick = {k: (ran[k].long().cumsum(0) - 1)[both.to(ran[k].device)] for k in tokens}
                sub = {
                    k: (tokens[k][pick[k]], None if masks[k] is None else masks[k][pick[k]]) for k in tokens
                }
                if not isinstance(both, torch.Tensor) or bool(both.any()):
                    scores[both] = hub.consolidate_tokens(*sub["text"], *sub["vision"])
        return hub.readout(features, scores)

    def _decoder_features(self, inputs: dict[str, Any], masks: dict[str, torch.Tensor | None]) -> _TowerRun:
        """`_run_towers` of a decoder VLM: the language model's last-token state, and no image features."""
        if any(mask is not None for mask in masks.values()):
            raise ValueError(
                "`image_present` / `text_present` (missing modalities) are not supported on decoder vision-language "
                "models: every sample needs its text and its image."
            )
        given = decoder.check_inputs(self.family, self.backbone.config, inputs, type(self).__name__)
        towers = self.mitp_towers()
        features, hub_outputs, hub = decoder.pooled_features(
            self.backbone, self.family, towers, given, self._frozen_towers(towers)
        )
        none = {"text": None, "vision": None}
        return _TowerRun(features, features.new_zeros(features.shape[0], 0), hub_outputs, hub, None, none, none)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        output_hub_activations: bool = False,
        image_present: torch.Tensor | None = None,
        text_present: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        pixel_attention_mask: torch.Tensor | None = None,
        spatial_shapes: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        mm_token_type_ids: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> SequenceClassifierOutput:
        """Classify image-text pairs.

        Args:
            input_ids: (B, L) token ids of the text tower.
            attention_mask: (B, L) 1 for real tokens, 0 for padding.
            pixel_values: (B, C, H, W) images as the backbone's image processor prepares them.
            labels: (B,) class indices, or (B, num_labels) 0/1 floats for multi-label.
            position_ids: optional text position ids.
            output_hub_activations: also return the memory hub's activation maps in `attentions`, as a tuple with one
                `(text_activation, vision_activation)` pair per interaction pair that fed a next pair.
            image_present: (B,) bool, False for samples without an image. Needs an active adapter created with
                `MITPConfig(missing_modality=True)`: the vision tower does not run for those samples and the
                adapter's learned stand-ins take its place. `pixel_values` then holds one row per sample (rows of
                samples without an image are ignored) or one row per sample with an image. `pixel_values=None` alone
                means no sample has an image. None (default): every sample has one.
            text_present: (B,) bool, the same for texts (`input_ids` and the other text inputs).
            token_type_ids: (B, L) segment ids, for families whose text tower takes them (BERT-like towers,
                Chinese-CLIP, AltCLIP, FLAVA); named here so that `Trainer` keeps the column.
            pixel_attention_mask: (B, P) mask of real patches, for SigLIP 2 (NaFlex) image processors.
            spatial_shapes: (B, 2) patch-grid shapes, for SigLIP 2 (NaFlex) image processors.
            image_sizes / image_grid_thw / mm_token_type_ids: decoder VLM inputs (LLaVA-NeXT's image sizes, Qwen2-VL's
                patch grids and multimodal token types), named here so that `Trainer` keeps the columns.
            **kwargs: other family-specific inputs (see `BackboneFamily.text_inputs` / `vision_inputs`); Trainer's
                `num_items_in_batch` is ignored.

        Returns:
            `SequenceClassifierOutput` with `loss` (when labels are given) and `logits` (B, num_labels).
        """
        kwargs.pop("num_items_in_batch", None)
        if not isinstance(output_hub_activations, bool):
            raise TypeError(f"`output_hub_activations` must be True or False, got {output_hub_activations!r}.")
        kwargs.pop("return_dict", None)
        check_label_rows(labels, input_ids, pixel_values, image_present, text_present)
        run = self._run_towers(dict(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values=pixel_values,
            position_ids=position_ids,
            image_present=image_present,
            text_present=text_present,
            token_type_ids=token_type_ids,
            pixel_attention_mask=pixel_attention_mask,
            spatial_shapes=spatial_shapes,
            image_sizes=image_sizes,
            image_grid_thw=image_grid_thw,
            mm_token_type_ids=mm_token_type_ids,
            **kwargs,
        ))
        features, hub_outputs = self._memory_features(run), run.hub_outputs
        mixed = current_mixed_batch()
        if (
            mixed is not None
            and isinstance(self.classifier, ModulesToSaveWrapper)
            and not self.classifier.disable_adapters  # inside `disable_adapter()` every sample is a base sample
        ):
            logits, loss = self._mixed_head(self.dropout(features), labels, mixed)
        else:
            logits = self.classifier(self.dropout(features.to(self.classifier.weight.dtype)))
            loss = None if labels is None else self.loss(logits, labels)
        attentions = None
        if output_hub_activations:
            attentions = tuple((o.text_activation, o.vision_activation) for o in hub_outputs)
        return SequenceClassifierOutput(loss=loss, logits=logits, attentions=attentions)

    def _mixed_head(
        self, features: torch.Tensor, labels: torch.Tensor | None, mixed: MixedBatch
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Each sample through its adapter's head (the task model's own for "__base__"; `peft_mitp.mixed`).

        Returns logits with the widest head's columns, `-inf` beyond a sample's own head, and the mean over samples
        of each sample's loss under its own head.
        """
        wrapper = self.classifier
        parts: dict[str, torch.Tensor] = {}
        for name, rows in mixed.groups.items():
            head = wrapper.original_module if name == BASE else wrapper.modules_to_save[name]
            rows = rows.to(features.device)
            parts[name] = head(features[rows].to(head.weight.dtype))
        width = max(part.shape[-1] for part in parts.values())
        first = next(iter(parts.values()))
        logits = first.new_full((features.shape[0], width), float("-inf"))
        losses = []
        for name, part in parts.items():
            rows = mixed.groups[name].to(features.device)
            logits[rows, : part.shape[-1]] = part
            if labels is not None:
                losses.append(self.loss(part, labels[rows.to(labels.device)]) * rows.numel())
        loss = torch.stack(losses).sum() / features.shape[0] if losses else None
        return logits, loss

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy for single-label problems, BCE-with-logits for `multi_label_classification`."""
        labels = labels.to(logits.device)
        if self.config.problem_type == "multi_label_classification":
            if labels.shape != logits.shape:
                raise ValueError(
                    f"Multi-label `labels` must have shape (batch, num_labels)={tuple(logits.shape)} with 0/1 "
                    f"entries, got {tuple(labels.shape)}."
                )
            return nn.functional.binary_cross_entropy_with_logits(logits.float(), labels.float())
        if labels.dim() != 1 or labels.shape[0] != logits.shape[0] or labels.is_floating_point():
            raise ValueError(
                f"Single-label `labels` must be a (batch,)={logits.shape[0]} tensor of class indices, got shape "
                f"{tuple(labels.shape)} and dtype {labels.dtype}. For multi-label data set "
                "problem_type='multi_label_classification'."
            )
        if labels.numel() and (labels.min() < 0 or labels.max() >= logits.shape[-1]):
            raise ValueError(
                f"`labels` must lie in 0..{logits.shape[-1] - 1} (num_labels={logits.shape[-1]}), got values "
                f"{labels.min().item()}..{labels.max().item()}."
            )
        return nn.functional.cross_entropy(logits.float(), labels)


AutoConfig.register(MITPTaskConfig.model_type, MITPTaskConfig, exist_ok=True)
