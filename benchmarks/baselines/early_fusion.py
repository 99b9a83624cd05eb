"""Early fusion in the PromptFuse style (Liang et al., 2022): image tokens as extra input tokens of the text tower.

The frozen vision tower encodes the image (without autograd); a trainable linear map projects its tokens (all of
its last hidden states, or only the pooled image feature) to the text tower's width; they are inserted, with a few
trainable prompt vectors, right after the text's first token ([CLS]), and the frozen text tower runs over the whole
sequence. A linear head reads the text tower's pooled output. The text tower is the fusion module, so the gradient
runs through all of its layers, down to the inserted tokens.

Needs a text tower that accepts `inputs_embeds` and pools its first token (BERT-like towers, as in the offline
backbone and BERT + ViT); CLIP's text tower pools the end-of-text token found from `input_ids` and is refused.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn

from peft_mitp.families import family_for

from .common import classification_output, init_linear

__all__ = ["EarlyFusionForImageTextClassification"]

# Text towers whose pooled output is read off the first token and that take `inputs_embeds`.
_FIRST_TOKEN_TEXT_TOWERS = ("bert", "roberta", "xlm-roberta", "camembert", "ernie", "data2vec-text", "megatron-bert")


class EarlyFusionForImageTextClassification(nn.Module):
    """PromptFuse-style early fusion on a frozen dual encoder.

    Args:
        backbone: a `VisionTextDualEncoderModel`-like dual encoder with a BERT-like text tower (`text_model`), a vision
            tower (`vision_model`) and a `text_projection`; frozen here.
        num_labels: number of classes.
        image_tokens: "patch" (default): every token of the vision tower's last hidden state (CLS and patches);
            "pooled": the pooled image feature only (one token).
        num_prompts: trainable prompt vectors inserted after the image tokens (PromptFuse uses a few; default 8).
        init_std: standard deviation of the prompts' initialisation.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_labels: int,
        *,
        image_tokens: Literal["patch", "pooled"] = "patch",
        num_prompts: int = 8,
        init_std: float = 0.02,
    ) -> None:
        super().__init__()
        if image_tokens not in ("patch", "pooled"):
            raise ValueError(f"`image_tokens` must be 'patch' or 'pooled', got {image_tokens!r}.")
        text_model = getattr(backbone, "text_model", None)
        text_type = getattr(getattr(text_model, "config", None), "model_type", None)
        if text_type not in _FIRST_TOKEN_TEXT_TOWERS:
            raise ValueError(
                f"Early fusion needs a BERT-like text tower that takes `inputs_embeds` and pools its first token "
                f"({', '.join(_FIRST_TOKEN_TEXT_TOWERS)}); this backbone's is {text_type!r}."
            )
        backbone.requires_grad_(False)
        self.backbone = backbone
        self.family = family_for(backbone.config.model_type)
        self.image_tokens = image_tokens
        text_width = text_model.config.hidden_size
        vision_width = backbone.vision_model.config.hidden_size
        self.image_projection = nn.Linear(vision_width, text_width)
        self.prompts = nn.Parameter(torch.randn(num_prompts, text_width) * init_std)
        text_dim, _ = self.family.feature_dims(backbone.config)
        self.classifier = init_linear(nn.Linear(text_dim, num_labels))

    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **_: Any,
    ) -> Any:
        """Classify image-text pairs; returns loss and logits."""
        backbone = self.backbone
        with torch.no_grad():
            vision = backbone.vision_model(pixel_values=pixel_values)
        tokens = vision.last_hidden_state if self.image_tokens == "patch" else vision.pooler_output[:, None]
        text_model = backbone.text_model
        embeddings = text_model.get_input_embeddings()(input_ids)
        batch = input_ids.shape[0]
        inserted = torch.cat(
            [self.image_projection(tokens.to(self.image_projection.weight.dtype)), self.prompts.expand(batch, -1, -1)],
            dim=1,
        ).to(embeddings.dtype)
        embeddings = torch.cat([embeddings[:, :1], inserted, embeddings[:, 1:]], dim=1)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        ones = attention_mask.new_ones(batch, inserted.shape[1])
        attention_mask = torch.cat([attention_mask[:, :1], ones, attention_mask[:, 1:]], dim=1)
        token_types = torch.zeros(attention_mask.shape, dtype=torch.long, device=input_ids.device)
        if token_type_ids is not None:
            token_types[:, :1], token_types[:, 1 + inserted.shape[1] :] = token_type_ids[:, :1], token_type_ids[:, 1:]
        text = text_model(inputs_embeds=embeddings, attention_mask=attention_mask, token_type_ids=token_types)
        features = backbone.text_projection(text.pooler_output)
        logits = self.classifier(features.to(self.classifier.weight.dtype))
        return classification_output(logits, labels)
