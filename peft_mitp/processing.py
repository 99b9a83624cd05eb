"""Preprocessing for any supported backbone: (images, texts) -> the task model's inputs.

`load_processor` finds the right transformers processor for a backbone (its `AutoProcessor` for a dual-encoder
checkpoint; the text tower's tokenizer plus the vision tower's image processor, joined in a
`VisionTextDualEncoderProcessor`, for a text encoder + vision encoder pair) and wraps it in an `ImageTextProcessor`
that applies the family's text conventions from `peft_mitp.families` (how to pad, how long) and keeps exactly the
inputs the family's towers take. Examples and the CLI use it, so nothing hard-codes CLIP.
"""

from __future__ import annotations

import os
from typing import Any

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoProcessor,
    AutoTokenizer,
    BatchFeature,
    PreTrainedConfig,
    PreTrainedModel,
    VisionTextDualEncoderProcessor,
)

from .families import BackboneFamily, DecoderFamily, family_for
from .remote import HUB_KWARGS, REACHABILITY_KWARGS, check_hub_reachable

# Tokenizers without a recorded limit report a huge `model_max_length`; below this it is a real limit.
_NO_LIMIT = 1_000_000


class ImageTextProcessor:
    """Turns images and texts into the inputs of an `MITPForImageTextClassification` of one backbone family.

    Call it as `processor(images, texts)`; it returns a `BatchFeature` of tensors (`input_ids`, `attention_mask`,
    `pixel_values`, and the family's extra inputs such as `token_type_ids` or SigLIP 2's `pixel_attention_mask` and
    `spatial_shapes`) that go straight into the model: `model(**processor(images, texts), labels=...)`.

    Text conventions come from the family: texts are truncated to `max_length`, and padded to the longest text of
    the batch, or to `max_length` for families that pool the last position (SigLIP, SigLIP 2; they were trained that
    way). Outputs the family's towers do not take are dropped.

    Build it with `load_processor`; construct it directly only to wrap a processor you built yourself.

    Args:
        processor: a transformers processor taking `images=` and `text=` (e.g. `CLIPProcessor`,
            `VisionTextDualEncoderProcessor`).
        family: the backbone family (`peft_mitp.families.family_for(model_type)`).
        max_length: maximum text length in tokens. None: the tokenizer's `model_max_length` when it records one,
            otherwise no truncation (a family that pads to the maximum length then needs it).
    """

    def __init__(self, processor: Any, family: BackboneFamily | DecoderFamily, max_length: int | None = None) -> None:
        self.processor = processor
        self.family = family
        if max_length is None:
            limit = getattr(getattr(processor, "tokenizer", None), "model_max_length", None)
            max_length = int(limit) if limit is not None and limit < _NO_LIMIT else None
        self.max_length = max_length
        if family.text_padding == "max_length" and max_length is None:
            raise ValueError(
                f"{family.name} texts are padded to a fixed length, but the tokenizer records no `model_max_length`: "
                "pass `max_length=` (the text tower's `max_position_embeddings`, e.g. 64 for SigLIP)."
            )

    @property
    def model_input_names(self) -> tuple[str, ...]:
        """The inputs this processor returns when their modality is given (the family's routed inputs)."""
        if isinstance(self.family, DecoderFamily):
            return ("input_ids", "attention_mask", *self.family.inputs)
        return self.family.text_inputs + self.family.vision_inputs

    def _with_image_placeholders(self, texts: str | list[str]) -> list[str]:
        """A decoder VLM's texts with the image in them: the processor's chat template (a user turn holding the image
        and the text, then the assistant's turn, whose first position is the last token the head reads), or the
        processor's image token before the text when it has no template."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        if getattr(self.processor, "chat_template", None):
            return [
                self.processor.apply_chat_template(
                    [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}],
                    add_generation_prompt=True,
                )
                for text in texts
            ]
        token = getattr(self.processor, "image_token", None)
        if token is None:
            return texts
        return [text if token in text else f"{token}{text}" for text in texts]

    def __call__(
        self,
        images: Any = None,
        texts: str | list[str] | None = None,
        *,
        return_tensors: str = "pt",
        **kwargs: Any,
    ) -> BatchFeature:
        """Preprocess a batch.

        Args:
            images: one image or a list (PIL images, numpy arrays or tensors); None for texts only.
            texts: one text or a list, one per image; None for images only.
            return_tensors: "pt" (default), "np", ...
            **kwargs: passed to the underlying processor (they override the family's text defaults, e.g.
                `padding="max_length"`).

        Returns:
            A `BatchFeature` holding the model inputs.
        """
        if images is None and texts is None:
            raise ValueError("Give `images`, `texts`, or both.")
        options: dict[str, Any] = {}
        if isinstance(self.family, DecoderFamily):
            if images is None or texts is None:
                raise ValueError(f"A {self.family.name} model classifies image-text pairs: give `images` and `texts`.")
            texts = self._with_image_placeholders(texts)
        if texts is not None:
            options["padding"] = self.family.text_padding
            if self.max_length is not None:
                options.update(truncation=True, max_length=self.max_length)
        options.update(kwargs)
        out = self.processor(images=images, text=texts, return_tensors=return_tensors, **options)
        keep = set(self.model_input_names)
        return BatchFeature({k: v for k, v in out.items() if k in keep}, tensor_type=None)

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> Any:
        """Save the underlying transformers processor (reload it with `load_processor(save_directory)`)."""
        return self.processor.save_pretrained(save_directory, **kwargs)

    def __repr__(self) -> str:
        return (
            f"ImageTextProcessor(family={self.family.name!r}, padding={self.family.text_padding!r}, "
            f"max_length={self.max_length}, processor={type(self.processor).__name__})"
        )


def _backbone_config(config: PreTrainedConfig) -> PreTrainedConfig:
    """The dual encoder's config (unwrapping a saved `MITPForImageTextClassification`'s config)."""
    backbone = getattr(config, "backbone_config", None)
    return backbone if isinstance(backbone, PreTrainedConfig) else config


def _model_config(model: Any) -> PreTrainedConfig:
    """The backbone config of a model in memory: a PeftModel, a task model or a bare dual encoder."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    backbone = getattr(model, "backbone", None)
    return backbone.config if isinstance(backbone, PreTrainedModel) else model.config


def load_processor(
    name_or_path: str | os.PathLike | PreTrainedModel | None = None,
    *,
    text_name_or_path: str | os.PathLike | None = None,
    vision_name_or_path: str | os.PathLike | None = None,
    max_length: int | None = None,
    **kwargs: Any,
) -> ImageTextProcessor:
    """The preprocessing of a backbone, as an `ImageTextProcessor`.

    Give either `name_or_path`, or `text_name_or_path` and `vision_name_or_path`:

    - `name_or_path`: a dual-encoder checkpoint (`"openai/clip-vit-large-patch14"`, `"google/siglip-base-patch16-224"`,
      a `VisionTextDualEncoderModel` folder, a saved `MITPForImageTextClassification` with processor files, ...),
      loaded with `AutoProcessor`; or a model in memory (`MITPForImageTextClassification`, its `PeftModel`, or a dual
      encoder), whose checkpoint (or, for a text + vision pair, whose towers' checkpoints) it was loaded from; or
      `"offline"` (or a model built on it): the processor of the packaged offline backbone, without the Hub.
    - `text_name_or_path` + `vision_name_or_path`: the two checkpoints given to
      `MITPForImageTextClassification.from_text_vision_pretrained`; the text one's tokenizer and the vision one's
      image processor are joined in a `VisionTextDualEncoderProcessor`.

    Args:
        name_or_path: see above.
        text_name_or_path: the text tower's checkpoint (with `vision_name_or_path`).
        vision_name_or_path: the vision tower's checkpoint (with `text_name_or_path`).
        max_length: maximum text length in tokens; None: the tokenizer's `model_max_length`, else the text tower's
            `max_position_embeddings` when the family pads to a fixed length.
        **kwargs: Hub options for loading (`revision`, `token`, `cache_dir`, `local_files_only`, ...).

    Returns:
        An `ImageTextProcessor`; `processor(images, texts)` gives the model's inputs, and `processor.processor` is
        the transformers processor (save it next to a trained adapter with `processor.save_pretrained(dir)`).

    Raises:
        ValueError: neither or both ways are given, or a model in memory does not record where it came from.
        UnsupportedBackboneError: the backbone is not a supported dual encoder.
    """
    hub_kwargs = {k: kwargs.pop(k) for k in HUB_KWARGS if k in kwargs}
    if kwargs:
        raise TypeError(f"load_processor() got unexpected arguments {sorted(kwargs)}.")
    pair = (text_name_or_path, vision_name_or_path)
    if name_or_path is not None and any(p is not None for p in pair):
        raise ValueError("Give either `name_or_path`, or `text_name_or_path` and `vision_name_or_path`, not both.")

    from .offline_backbone import OFFLINE_BACKBONE_NAME, is_offline_backbone_name, offline_processor

    in_memory = isinstance(name_or_path, PreTrainedModel) or hasattr(name_or_path, "get_base_model")
    if in_memory and getattr(_model_config(name_or_path), "_name_or_path", None) == OFFLINE_BACKBONE_NAME:
        name_or_path = OFFLINE_BACKBONE_NAME
        in_memory = False
    if is_offline_backbone_name(name_or_path):  # the packaged offline backbone: its processor ships with it
        return ImageTextProcessor(offline_processor(), family_for("vision-text-dual-encoder"), max_length=max_length)

    if in_memory:
        config = _model_config(name_or_path)
        family = family_for(config.model_type)
        if isinstance(family, BackboneFamily) and family.text.layers is None:  # towers from two checkpoints
            pair = (
                getattr(config.text_config, "_name_or_path", "") or None,
                getattr(config.vision_config, "_name_or_path", "") or None,
            )
            if None in pair:
                raise ValueError(
                    "This model does not record the checkpoints its text and vision towers came from; call "
                    "`load_processor(text_name_or_path=..., vision_name_or_path=...)`."
                )
            name_or_path = None
        else:
            name_or_path = getattr(config, "_name_or_path", "") or None
            if name_or_path is None:
                raise ValueError(
                    "This model does not record the checkpoint it was loaded from; call "
                    "`load_processor(name_or_path)` with that checkpoint."
                )

    if name_or_path is None and None in pair:
        raise ValueError("Give `name_or_path`, or both `text_name_or_path` and `vision_name_or_path`.")
    checked = {k: v for k, v in hub_kwargs.items() if k in REACHABILITY_KWARGS}
    for name in (name_or_path, *pair):
        if name is not None:
            check_hub_reachable(name, **checked)
    if name_or_path is not None:
        config = _backbone_config(AutoConfig.from_pretrained(name_or_path, **hub_kwargs))
        family = family_for(config.model_type)
        try:
            processor = AutoProcessor.from_pretrained(name_or_path, **hub_kwargs)
        except (OSError, ValueError) as error:
            raise ValueError(
                f"Could not load a processor from {name_or_path}: {error}. A saved task model holds no processor "
                "unless you saved one there (`processor.save_pretrained(path)`); otherwise pass the backbone "
                "checkpoint, or `text_name_or_path` and `vision_name_or_path`."
            ) from error
        text_config = getattr(config, "text_config", None)
    else:
        family = family_for("vision-text-dual-encoder")
        tokenizer = AutoTokenizer.from_pretrained(pair[0], **hub_kwargs)
        image_processor = AutoImageProcessor.from_pretrained(pair[1], **hub_kwargs)
        processor = VisionTextDualEncoderProcessor(image_processor=image_processor, tokenizer=tokenizer)
        text_config = AutoConfig.from_pretrained(pair[0], **hub_kwargs)
        text_config = getattr(text_config, "text_config", None) or text_config

    if max_length is None and family.text_padding == "max_length":
        limit = getattr(getattr(processor, "tokenizer", None), "model_max_length", None)
        if limit is None or limit >= _NO_LIMIT:
            max_length = getattr(text_config, "max_position_embeddings", None)
    return ImageTextProcessor(processor, family, max_length=max_length)
