"""`MITPForImageTextClassification`: a frozen dual encoder run in lock-step, plus a classification head."""

from __future__ import annotations

import os
from typing import Any

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedConfig, PreTrainedModel
from transformers.configuration_utils import SubConfigSpec
from transformers.modeling_outputs import SequenceClassifierOutput

from .families import BackboneFamily, ResolvedTower, family_for, pooled, resolve_tower
from .hub import HubOutput
from .lockstep import run_lockstep

PROBLEM_TYPES = ("single_label_classification", "multi_label_classification")


def _attn_implementations(config: PreTrainedConfig) -> list[tuple[PreTrainedConfig, str | None]]:
    """Each (sub-)config of a backbone with its attention implementation."""
    found = [(config, config._attn_implementation_internal)]
    for key in config.sub_configs:
        sub = getattr(config, key, None)
        if isinstance(sub, PreTrainedConfig):
            found.extend(_attn_implementations(sub))
    return found


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

    def __init__(self, config: MITPTaskConfig, backbone: PreTrainedModel | None = None) -> None:
        super().__init__(config)
        if config.problem_type is not None and config.problem_type not in PROBLEM_TYPES:
            raise ValueError(f"`problem_type`={config.problem_type!r} is not supported; use one of {PROBLEM_TYPES}.")
        self.family: BackboneFamily = family_for(config.backbone_config.model_type)
        if backbone is None:
            backbone = AutoModel.from_config(config.backbone_config)
        self.backbone = backbone
        # Keep one config object for the backbone, so attention-implementation switches reach both.
        self.config.backbone_config = backbone.config
        text_dim, image_dim = self.family.feature_dims(backbone.config)
        self.dropout = nn.Dropout(config.classifier_dropout)
        self.classifier = nn.Linear(text_dim + image_dim, config.num_labels)
        self.backbone.requires_grad_(False)
        self.post_init()

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
        family_for(backbone.config.model_type)  # fail early with the list of supported families
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
                encoder (`"openai/clip-vit-large-patch14"`, a `VisionTextDualEncoderModel` folder, ...).
            num_labels / id2label / problem_type / classifier_dropout: the head, for a dual-encoder checkpoint
                (a saved task model brings its own).
            **kwargs: passed to `from_pretrained` of the backbone (`dtype`, `attn_implementation`, `revision`,
                `token`, `cache_dir`, `local_files_only`, ...).
        """
        hub_kwargs = {
            k: kwargs[k]
            for k in ("revision", "token", "cache_dir", "local_files_only", "subfolder", "trust_remote_code")
            if k in kwargs
        }
        config = kwargs.get("config") or AutoConfig.from_pretrained(pretrained_model_name_or_path, **hub_kwargs)
        if isinstance(config, MITPTaskConfig):
            head = {"num_labels": num_labels, "id2label": id2label, "problem_type": problem_type}
            for key, value in head.items():
                if value is not None:
                    kwargs[key] = value
            return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        family_for(config.model_type)
        kwargs.pop("config", None)
        backbone = AutoModel.from_pretrained(pretrained_model_name_or_path, *model_args, config=config, **kwargs)
        return cls.from_backbone(
            backbone,
            num_labels=num_labels,
            id2label=id2label,
            problem_type=problem_type,
            classifier_dropout=classifier_dropout,
        )

    # ------------------------------------------------------------------ what the tuner needs
    def mitp_towers(self) -> dict[str, ResolvedTower]:
        """Both towers of the backbone, with layer paths relative to this model (used by `MITPModel`)."""
        towers = {}
        for kind, spec in (("text", self.family.text), ("vision", self.family.vision)):
            tower = resolve_tower(self.backbone, spec, kind)
            towers[kind] = ResolvedTower(
                module=tower.module,
                layers=tower.layers,
                layers_path=f"backbone.{tower.layers_path}",
                width=tower.width,
                attn_implementation=tower.attn_implementation,
            )
        return towers

    # ------------------------------------------------------------------ forward
    def _route_inputs(self, inputs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        text, vision = {}, {}
        for name, value in inputs.items():
            if value is None:
                continue
            if name in self.family.text_inputs:
                text[name] = value
            elif name in self.family.vision_inputs:
                vision[name] = value
            else:
                accepted = sorted(set(self.family.text_inputs) | set(self.family.vision_inputs) | {"labels"})
                raise TypeError(
                    f"{type(self).__name__}.forward() got the unexpected input {name!r} for a {self.family.name} "
                    f"backbone; it accepts {accepted}."
                )
        if "input_ids" not in text:
            raise ValueError("`input_ids` is missing: MITP classifies image-text pairs; tokenize the text first.")
        if "pixel_values" not in vision:
            raise ValueError("`pixel_values` is missing: MITP classifies image-text pairs; process the image first.")
        return text, vision

    def pooled_features(self, **inputs: Any) -> tuple[torch.Tensor, torch.Tensor, list[HubOutput]]:
        """Run both towers in lock-step and return (text features, image features, hub outputs per pair)."""
        text_inputs, vision_inputs = self._route_inputs(inputs)
        backbone = self.backbone
        towers = self.mitp_towers()
        result = run_lockstep(
            lambda: pooled(getattr(backbone, self.family.text_features)(**text_inputs)),
            lambda: pooled(getattr(backbone, self.family.image_features)(**vision_inputs)),
            attn_implementations={k: t.attn_implementation for k, t in towers.items()},
        )
        return result.text, result.vision, result.hub_outputs

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        output_hub_activations: bool = False,
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
            **kwargs: family-specific inputs (e.g. `token_type_ids`); Trainer's `num_items_in_batch` is ignored.

        Returns:
            `SequenceClassifierOutput` with `loss` (when labels are given) and `logits` (B, num_labels).
        """
        kwargs.pop("num_items_in_batch", None)
        kwargs.pop("return_dict", None)
        text, image, hub_outputs = self.pooled_features(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values=pixel_values,
            position_ids=position_ids,
            **kwargs,
        )
        features = torch.cat([text, image], dim=-1).to(self.classifier.weight.dtype)
        logits = self.classifier(self.dropout(features))
        loss = None if labels is None else self.loss(logits, labels)
        attentions = None
        if output_hub_activations:
            attentions = tuple((o.text_activation, o.vision_activation) for o in hub_outputs)
        return SequenceClassifierOutput(loss=loss, logits=logits, attentions=attentions)

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
