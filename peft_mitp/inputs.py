"""The task model's inputs and head options: routed to the towers, checked against each other and the model, split by
modality.

Everything here runs before either tower starts, so a bad batch is refused with an error that names the input and the
fix, and nothing is computed (docs/reliability.md, "Bad input"). `MITPForImageTextClassification.forward` calls these
functions in data-flow order: `check_label_rows`, `route_inputs`, `check_input_types`, `check_input_shapes`,
`split_by_presence`; `from_backbone`, `from_pretrained` and `set_head` call `check_head_options`.
"""

from __future__ import annotations

from typing import Any

import torch

from .families import BackboneFamily, ResolvedTower
from .hub import ModalityPresence

__all__ = ["check_head_options", "check_input_shapes", "check_input_types", "check_label_rows", "route_inputs",
           "split_by_presence"]

# Missing modalities: per tower, (the input that carries the modality, the forward's presence mask, the noun).
_MODALITY_INPUTS = {
    "text": ("input_ids", "text_present", "text"),
    "vision": ("pixel_values", "image_present", "image"),
}
# Text inputs with one entry per token, checked against `input_ids`' (batch, length) before the towers run.
_PER_TOKEN_TEXT_INPUTS = ("attention_mask", "token_type_ids", "position_ids")


_INTEGER_TEXT_INPUTS = ("input_ids", "token_type_ids", "position_ids")


def check_head_options(
    num_labels: Any = None, id2label: Any = None, classifier_dropout: Any = None
) -> None:
    """Refuse head options of the wrong type or range (`from_backbone`, `from_pretrained`, `set_head`).

    Raises:
        ValueError: naming the option, the value and what it should be.
    """
    if num_labels is not None and (not isinstance(num_labels, int) or isinstance(num_labels, bool) or num_labels < 1):
        raise ValueError(f"`num_labels` must be a positive integer (the number of classes), got {num_labels!r}.")
    if id2label is not None:
        if not isinstance(id2label, dict) or not id2label:
            raise ValueError(f"`id2label` must be a non-empty dict {{class index: name}}, got {id2label!r}.")
        try:
            keys = sorted(int(k) for k in id2label)
        except (TypeError, ValueError):
            raise ValueError(f"`id2label` keys must be class indices 0..N-1, got {list(id2label)!r}.") from None
        if keys != list(range(len(keys))):
            raise ValueError(f"`id2label` keys must be the class indices 0..{len(keys) - 1}, got {keys}.")
    if classifier_dropout is not None and (
        isinstance(classifier_dropout, bool)
        or not isinstance(classifier_dropout, (int, float))
        or not 0 <= classifier_dropout < 1
    ):
        raise ValueError(f"`classifier_dropout` must be a number in [0, 1), got {classifier_dropout!r}.")


def check_input_types(text_inputs: dict[str, Any], vision_inputs: dict[str, Any]) -> None:
    """Refuse inputs that are not tensors of the kind the towers take, naming the input and the fix.

    Token ids, segment ids and positions must be integer tensors; `pixel_values` a floating-point tensor (what the
    image processor returns: raw 0-255 integer pixels would be read as huge values); every other tensor input a tensor.
    """
    for inputs in (text_inputs, vision_inputs):
        for name, value in inputs.items():
            if isinstance(value, bool) or name == "interpolate_pos_encoding":
                continue
            if not isinstance(value, torch.Tensor):
                raise TypeError(
                    f"`{name}` must be a torch tensor, got {type(value).__name__}. Call the processor with "
                    "`return_tensors='pt'` (or `torch.as_tensor(...)`)."
                )
            if name in _INTEGER_TEXT_INPUTS and (value.is_floating_point() or value.is_complex()):
                raise TypeError(f"`{name}` must hold integers (token ids / positions), got dtype {value.dtype}.")
            if name == "pixel_values" and not value.is_floating_point():
                raise TypeError(
                    f"`pixel_values` must be a floating-point tensor as the image processor returns it (normalised "
                    f"pixels), got dtype {value.dtype}. Run the images through the backbone's image processor."
                )


def check_input_shapes(
    family: BackboneFamily,
    towers: dict[str, ResolvedTower],
    text_inputs: dict[str, Any],
    vision_inputs: dict[str, Any],
) -> None:
    """Refuse images and texts the towers cannot take, before either tower starts.

    Every per-token text input (`attention_mask`, `token_type_ids`, `position_ids`) must match `input_ids`'
    (batch, length), and every other vision tensor input must have one row per image: a mismatch would otherwise
    run silently (a shorter mask broadcast or ignored) or fail deep inside a tower.

    The limits come from the towers' own configs where they have them (`num_channels`, `image_size` of the
    vision tower; `max_position_embeddings` of a text tower with absolute positions), so every family is checked
    the same way and the message names the config field. `interpolate_pos_encoding=True` lifts the image-size
    check (the family's vision tower then interpolates its position embeddings).
    """
    pixels = vision_inputs.get("pixel_values")
    if isinstance(pixels, torch.Tensor) and pixels.dim():
        for name, value in vision_inputs.items():
            mismatched = isinstance(value, torch.Tensor) and value.dim() and value.shape[0] != pixels.shape[0]
            if name != "pixel_values" and mismatched:
                raise ValueError(
                    f"`{name}` has {value.shape[0]} rows (shape {tuple(value.shape)}) but `pixel_values` has "
                    f"{pixels.shape[0]} images: give one row per image, as the image processor returns them."
                )
    if isinstance(pixels, torch.Tensor) and family.pixel_values_layout == "images":
        vision_config = towers["vision"].module.config
        if pixels.dim() != 4:
            raise ValueError(
                f"`pixel_values` must be a (batch, channels, height, width) tensor, got shape "
                f"{tuple(pixels.shape)}. Prepare images with the backbone's image processor."
            )
        channels = getattr(vision_config, "num_channels", None)
        if isinstance(channels, int) and pixels.shape[1] != channels:
            raise ValueError(
                f"`pixel_values` has {pixels.shape[1]} channels (shape {tuple(pixels.shape)}), but the "
                f"{family.name} vision tower takes {channels} (its config's `num_channels`). Convert the "
                "images first (e.g. `image.convert('RGB')` for grayscale or RGBA), then run the image processor."
            )
        size = getattr(vision_config, "image_size", None)
        if isinstance(size, int):
            size = (size, size)
        if (
            isinstance(size, (list, tuple))
            and tuple(pixels.shape[-2:]) != tuple(size)
            and not vision_inputs.get("interpolate_pos_encoding", False)
        ):
            hint = (
                ", or pass `interpolate_pos_encoding=True` to run it at another size"
                if "interpolate_pos_encoding" in family.vision_inputs
                else ""
            )
            raise ValueError(
                f"`pixel_values` holds {pixels.shape[-2]}x{pixels.shape[-1]} images, but the {family.name} "
                f"vision tower takes {size[0]}x{size[1]} (its config's `image_size`). Resize them with the "
                f"backbone's image processor{hint}."
            )
    input_ids = text_inputs.get("input_ids")
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() != 2:
            raise ValueError(
                f"`input_ids` must be a (batch, length) tensor of token ids, got shape {tuple(input_ids.shape)}."
            )
        batch, length = input_ids.shape
        for name in _PER_TOKEN_TEXT_INPUTS:
            value = text_inputs.get(name)
            if not isinstance(value, torch.Tensor):
                continue
            # Position ids broadcast over the batch when given once.
            rows = (batch, 1) if name == "position_ids" else (batch,)
            if value.dim() != 2 or value.shape[0] not in rows or value.shape[1] != length:
                raise ValueError(
                    f"`{name}` has shape {tuple(value.shape)} but `input_ids` has {tuple(input_ids.shape)}: every "
                    f"per-token text input needs one row of {length} entries per text (batch {batch}). Tokenize "
                    "the texts once and pass the tokenizer's outputs together (`**tokenizer(texts, padding=True, "
                    "return_tensors='pt')`)."
                )
        text_config = towers["text"].module.config
        vocab = getattr(text_config, "vocab_size", None)
        # Meta tensors (FLOP counts) hold no values, and a traced forward cannot branch on them.
        known = input_ids.numel() and input_ids.device.type != "meta" and not torch.compiler.is_compiling()
        if isinstance(vocab, int) and known and (input_ids.min() < 0 or input_ids.max() >= vocab):
            raise ValueError(
                f"`input_ids` holds token ids {int(input_ids.min())}..{int(input_ids.max())}, but the {family.name} "
                f"text tower's vocabulary has {vocab} (ids 0..{vocab - 1}, its config's `vocab_size`). Tokenize with "
                "this backbone's own tokenizer (`peft_mitp.load_processor`)."
            )
        limit = getattr(text_config, "max_position_embeddings", None)
        absolute = getattr(text_config, "position_embedding_type", "absolute") == "absolute"
        if isinstance(limit, int) and absolute and input_ids.shape[1] > limit:
            raise ValueError(
                f"`input_ids` has {input_ids.shape[1]} tokens per text, but the {family.name} text tower "
                f"takes at most {limit} (its config's `max_position_embeddings`). Truncate when tokenizing: "
                f"`tokenizer(..., truncation=True, max_length={limit})`."
            )

def route_inputs(
    family: BackboneFamily, inputs: dict[str, Any], model_name: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Route the forward's inputs to the text and the vision tower, as the family table says.

    Raises:
        TypeError: an input neither tower takes (the message lists what the forward accepts).
        ValueError: neither `input_ids` nor `pixel_values` is given.
    """
    text, vision = {}, {}
    for name, value in inputs.items():
        if value is None:
            continue
        if name in family.text_inputs:
            text[name] = value
        elif name in family.vision_inputs:
            vision[name] = value
        else:
            accepted = sorted(
                set(family.text_inputs)
                | set(family.vision_inputs)
                | {"labels", "image_present", "text_present"}
            )
            raise TypeError(
                f"{model_name}.forward() got the unexpected input {name!r} for a {family.name} "
                f"backbone; it accepts {accepted}."
            )
    if "input_ids" not in text and "pixel_values" not in vision:
        raise ValueError(
            "Both `input_ids` and `pixel_values` are missing: MITP classifies image-text pairs; tokenize the "
            "text and process the image first."
        )
    return text, vision

def split_by_presence(
    inputs: dict[str, dict[str, Any]],
    masks: dict[str, torch.Tensor | None],
    device: torch.device,
) -> tuple[dict[str, dict[str, Any] | None], ModalityPresence | None]:
    """Which samples have which modality, and each tower's inputs cut down to the samples that have it.

    Args:
        inputs: per tower ("text", "vision"), its routed inputs.
        masks: per tower, the forward's presence mask (`text_present`, `image_present`) or None.

    Returns:
        Per tower its inputs (None: no sample has that modality, the tower is not run), and the presence (None
        when every sample has both modalities and no mask was given: the plain path).
    """
    primary = {tower: inputs[tower].get(_MODALITY_INPUTS[tower][0]) for tower in inputs}
    if all(m is None for m in masks.values()) and all(p is not None for p in primary.values()):
        return inputs, None
    given: dict[str, torch.Tensor] = {}
    for tower, value in masks.items():
        if value is None:
            continue
        mask_name, noun = _MODALITY_INPUTS[tower][1:]
        mask = torch.as_tensor(value, device=device)
        if mask.dim() != 1 or mask.is_floating_point():
            raise ValueError(
                f"`{mask_name}` must be a (batch,) tensor of booleans or 0/1 integers (True: the sample has its "
                f"{noun}); got shape {tuple(mask.shape)} and dtype {mask.dtype}."
            )
        if mask.dtype != torch.bool:
            if ((mask != 0) & (mask != 1)).any():
                raise ValueError(f"`{mask_name}` must hold booleans or 0/1, got values {mask.unique().tolist()}.")
            mask = mask.bool()
        given[tower] = mask
    # The batch size comes from the masks when given (inputs may then hold only the rows of present samples).
    sizes = {_MODALITY_INPUTS[t][1]: m.shape[0] for t, m in given.items()}
    sizes = sizes or {_MODALITY_INPUTS[t][0]: p.shape[0] for t, p in primary.items() if p is not None}
    if len(set(sizes.values())) > 1:
        raise ValueError(
            f"`image_present` has {sizes['image_present']} entries but `text_present` has "
            f"{sizes['text_present']}: give one entry per sample in both."
        )
    batch_size = next(iter(sizes.values()))
    present = {
        tower: given.get(tower, torch.full((batch_size,), primary[tower] is not None, device=device))
        for tower in inputs
    }
    neither = (~(present["text"] | present["vision"])).nonzero().flatten().tolist()
    if neither:
        raise ValueError(
            f"Sample(s) {neither} have neither an image nor a text: every sample needs at least one modality "
            "(check `image_present` / `text_present`)."
        )
    routed: dict[str, dict[str, Any] | None] = {}
    for tower, tower_inputs in inputs.items():
        input_name, mask_name, noun = _MODALITY_INPUTS[tower]
        mask, value, count = present[tower], primary[tower], int(present[tower].sum())
        if value is None:
            if count:
                raise ValueError(
                    f"`{mask_name}` marks {count} sample(s) as having their {noun}, but `{input_name}` is None: "
                    f"give `{input_name}` for those samples."
                )
            routed[tower] = None
            continue
        rows = value.shape[0]
        if rows == batch_size and count != batch_size:
            # One row per sample: keep the rows of the samples that have this modality.
            cut = mask.to(value.device)
            tower_inputs = {
                k: v[cut] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == batch_size else v
                for k, v in tower_inputs.items()
            }
        elif rows != count:
            raise ValueError(
                f"`{input_name}` has {rows} rows, but the batch has {batch_size} samples (from "
                f"{' and '.join(f'`{k}`' for k in sizes)}) of which {count} have their {noun}: give one row per "
                "sample (rows of samples without it are ignored) or one row per sample that has it, in batch "
                "order."
            )
        routed[tower] = tower_inputs if count else None
    return routed, ModalityPresence.from_masks(present["text"], present["vision"])


def check_label_rows(labels: Any, *batch_inputs: Any) -> None:
    """Refuse labels with another number of rows than the batch before the towers run (`loss` checks the rest).

    The batch size is read from the first of `input_ids`, `pixel_values`, `image_present`, `text_present` that is
    given; with presence masks (missing modalities) the masks' length is the batch size.
    """
    if not isinstance(labels, torch.Tensor) or labels.dim() == 0:
        return
    sizes = [x.shape[0] for x in batch_inputs if isinstance(x, torch.Tensor) and x.dim()]
    masks = [x.shape[0] for x in batch_inputs[2:] if isinstance(x, torch.Tensor) and x.dim()]
    batch = (masks or sizes or [None])[0]
    if batch is not None and labels.shape[0] != batch:
        raise ValueError(
            f"`labels` has {labels.shape[0]} rows (shape {tuple(labels.shape)}) but the batch has {batch} samples: "
            "give one label (single-label) or one row of 0/1 labels (multi-label) per sample."
        )
