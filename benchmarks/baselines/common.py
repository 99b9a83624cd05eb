"""What every benchmark method shares: input routing to the towers, the pooled features, and a plain classifier.

`DualEncoderClassifier` is the model behind the linear probe, the late-fusion MLP probe, LoRA and full fine-tuning. It
runs the backbone's stock feature functions directly, one tower after the other, with autograd as the caller set it.
(`MITPForImageTextClassification` is not used for these: it runs its towers inside the lock-step scheduler, which keeps
autograd off below the first MITP interaction layer, so without an MITP adapter no gradient would reach LoRA weights or
an unfrozen backbone.)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

from peft_mitp.families import BackboneFamily, family_for, pooled

__all__ = ["DualEncoderClassifier", "classification_output", "init_linear", "split_inputs"]


def init_linear(linear: nn.Linear, std: float = 0.02) -> nn.Linear:
    """Initialise a head the way `MITPForImageTextClassification` initialises its classifier: N(0, std), zero bias.

    Every method's head starts from the same distribution, so head initialisation is not a difference between them.
    """
    nn.init.normal_(linear.weight, std=std)
    nn.init.zeros_(linear.bias)
    return linear


def split_inputs(family: BackboneFamily, inputs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Route a batch's inputs to the text and the vision feature function, as the family table says.

    Args:
        family: the backbone's family (`peft_mitp.families.family_for`).
        inputs: the batch without labels (`input_ids`, `attention_mask`, `token_type_ids`, `pixel_values`, ...).

    Returns:
        (text inputs, vision inputs); inputs that are None or that neither tower takes (e.g. `token_type_ids` for
        CLIP) are dropped.
    """
    text = {k: v for k, v in inputs.items() if v is not None and k in family.text_inputs}
    vision = {k: v for k, v in inputs.items() if v is not None and k in family.vision_inputs}
    return text, vision


def classification_output(logits: torch.Tensor, labels: torch.Tensor | None) -> SequenceClassifierOutput:
    """Cross-entropy (computed in float32) on single-label logits, packed like every transformers classifier."""
    loss = None if labels is None else nn.functional.cross_entropy(logits.float(), labels.to(logits.device))
    return SequenceClassifierOutput(loss=loss, logits=logits)


class DualEncoderClassifier(nn.Module):
    """A classification head on the concatenated pooled features of a dual encoder.

    The features are exactly what `MITPForImageTextClassification` feeds its head when no adapter is active (the
    family's stock `get_text_features` / `get_image_features`), so a linear probe here is MITP without the adapter.

    Args:
        backbone: a dual encoder of a family in `peft_mitp.families` (CLIP, the offline `VisionTextDualEncoderModel`,
            ...). Its `requires_grad` flags are left as they are: freeze it for a probe, unfreeze it for full
            fine-tuning, or let peft's LoRA set them.
        num_labels: number of classes.
        hidden_size: None (default) for a linear head; an int for the late-fusion MLP probe, a head with one hidden
            layer of this width and GELU.
    """

    # transformers' weight-conversion lookup (which peft calls when injecting LoRA) reads it off the wrapping model.
    base_model_prefix = "backbone"

    def __init__(self, backbone: nn.Module, num_labels: int, hidden_size: int | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.family = family_for(backbone.config.model_type)
        self.config = backbone.config  # peft reads `model.config`
        text_dim, image_dim = self.family.feature_dims(backbone.config)
        width = text_dim + image_dim
        if hidden_size is None:
            self.classifier: nn.Module = init_linear(nn.Linear(width, num_labels))
        else:
            self.classifier = nn.Sequential(
                init_linear(nn.Linear(width, hidden_size)), nn.GELU(), init_linear(nn.Linear(hidden_size, num_labels))
            )

    def pooled_features(self, **inputs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(text features, image features): the backbone's pooled, projected features of both towers."""
        text, vision = split_inputs(self.family, inputs)
        token = self.family.features_token
        text_features = pooled(getattr(self.backbone, self.family.text_features)(**text), token)
        image_features = pooled(getattr(self.backbone, self.family.image_features)(**vision), token)
        return text_features, image_features

    def forward(self, labels: torch.Tensor | None = None, **inputs: Any) -> SequenceClassifierOutput:
        """Classify image-text pairs.

        Args:
            labels: (B,) class indices, or None for inference.
            **inputs: the batch (`input_ids`, `attention_mask`, `token_type_ids`, `pixel_values`, ...).

        Returns:
            `SequenceClassifierOutput` with `loss` (when labels are given) and `logits`.
        """
        text, image = self.pooled_features(**inputs)
        head_dtype = next(self.classifier.parameters()).dtype
        logits = self.classifier(torch.cat([text, image], dim=-1).to(head_dtype))
        return classification_output(logits, labels)
