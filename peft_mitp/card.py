"""The model card of an MITP adapter: YAML metadata for the Hub plus a description of the adapter in words.

`write_model_card` is what `PeftModel.save_pretrained` and `PeftModel.push_to_hub` use for MITP adapters once
`peft_mitp` is imported (see `peft_mitp.sharing.install_hooks`): it replaces peft's generic template card. Training
details come from a `mitp_training.json` next to the adapter (the format is in `docs/sharing.md`) or are passed in.
"""

from __future__ import annotations

import json
import os
import re
import textwrap
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import huggingface_hub
import peft
import torch
import transformers
from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from torch import nn

from .config import MITPConfig

TRAINING_INFO_FILE = "mitp_training.json"
"""Name of the file, next to the adapter, that holds what training recorded (format: `docs/sharing.md`)."""

CARD_TAGS = ("mitp", "peft", "image-text-classification", "multimodal")
"""Tags every MITP model card carries (the backbone's model type and the user's tags are added)."""

PAPER_URL = "https://arxiv.org/abs/2401.14856"
# Metric names (as the Hub's metric ids) recognised in training metrics such as "test_accuracy" or "eval_f1_macro".
_KNOWN_METRICS = ("accuracy", "f1", "precision", "recall")
# Metadata keys this module writes; other keys of an existing card (language, model-index, ...) are kept.
_OWN_KEYS = ("base_model", "library_name", "tags", "license", "datasets", "metrics")
_MAX_LISTED_LABELS = 50


def read_training_info(source: str | os.PathLike[str] | Mapping[str, Any] | None) -> dict[str, Any]:
    """Training details for the model card, from a dict, a `mitp_training.json` file, or the folder holding one.

    Args:
        source: a mapping (used as is), a path to a JSON file, a folder (its `mitp_training.json` is read if
            present), or None.

    Returns:
        The details as a dict; empty when `source` is None or the folder has no `mitp_training.json`.

    Raises:
        FileNotFoundError: `source` names a file that does not exist.
        ValueError: the file is not a JSON object.
    """
    if source is None:
        return {}
    if isinstance(source, Mapping):
        return dict(source)
    path = Path(source)
    if path.is_dir():
        path = path / TRAINING_INFO_FILE
        if not path.exists():
            return {}
    if not path.exists():
        raise FileNotFoundError(f"Training info file {path} does not exist.")
    info = json.loads(path.read_text())
    if not isinstance(info, dict):
        raise ValueError(f"{path} must hold a JSON object (see docs/sharing.md), got {type(info).__name__}.")
    return info


def hub_model_id(name: Any) -> str | None:
    """`name` if it reads as a Hub repo id (`namespace/name`, not a local path), else None.

    The Hub refuses a card whose `base_model` or `datasets` entry is not a repo id (e.g. a local folder), so only ids
    of this form go into the card's metadata.
    """
    if not isinstance(name, str) or name.count("/") != 1 or name.startswith((".", "/", "~")) or os.path.exists(name):
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def _primary_adapter(model: nn.Module, adapter_name: str | None) -> str:
    if adapter_name is not None:
        if adapter_name not in model.peft_config:
            raise ValueError(f"Unknown adapter {adapter_name!r}; this model has {sorted(model.peft_config)}.")
        return adapter_name
    return "default" if "default" in model.peft_config else model.active_adapter


def _parameter_counts(model: nn.Module, adapter_name: str) -> dict[str, int]:
    """Parameters of one adapter as saved (prompts, hub, head) and of the frozen backbone."""
    from peft import get_peft_model_state_dict

    counts = {"prompts": 0, "hub": 0, "head": 0}
    for key, tensor in get_peft_model_state_dict(model, adapter_name=adapter_name).items():
        part = "hub" if "mitp_hub" in key else "prompts" if "mitp_prompt" in key else "head"
        counts[part] += tensor.numel()
    task = model.get_base_model()
    counts["backbone"] = sum(p.numel() for n, p in task.backbone.named_parameters() if "mitp_" not in n)
    return counts


def _default_label_names(id2label: Mapping[int, str] | None) -> bool:
    return not id2label or all(name == f"LABEL_{i}" for i, name in id2label.items())


def _metric_ids(metrics: Mapping[str, Any]) -> list[str]:
    found = set()
    for name in metrics:
        for metric in _KNOWN_METRICS:
            if re.search(rf"(^|_){metric}(_|$)", name):
                found.add(metric)
    return sorted(found)


def _format_number(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    return f"{value:,}" if isinstance(value, int) else f"{value:.4f}"


def _switch(on: bool, on_text: str, off_text: str) -> str:
    return f"on ({on_text})" if on else f"**off** ({off_text})"


def _configuration_lines(config: MITPConfig) -> list[str]:
    pairs = ", ".join(f"text {t} with vision {v}" for t, v in zip(config.text_layers or [], config.vision_layers or [], strict=True))
    similarity = {
        "scaled_dot": "scaled dot product (divided by sqrt of the hub width)",
        "cosine": "cosine similarity",
        "dot": "dot product",
    }.get(config.similarity, config.similarity)
    activation = {
        "softmax": "softmax over the similarities (the paper)",
        "hard": "hard top-1 activation (an ablation)",
    }.get(config.activation, config.activation)
    lines = [
        f"- **Interaction layers**: {len(config.text_layers or [])} pairs, {pairs} (0-based). The other layers of "
        "both towers are frozen extraction layers.",
        f"- **Temporal prompts**: {config.text_prompt_length} per text interaction layer and "
        f"{config.vision_prompts} per vision interaction layer, initialised from N(0, {config.prompt_init_std}^2).",
        f"- **Memory hub**: a shared space of width {config.hub_dim} (the mapping connection between the towers, "
        f"shared by all interaction pairs); similarity: {similarity}, temperature {config.effective_temperature:g}; "
        f"activation: {activation}."
        if len(config.text_layers or []) != 1
        else "- **Memory hub**: none (one interaction pair: no read-out is carried to a next pair).",
        "- **Ablation switches**: interaction "
        + _switch(config.interaction, "each tower's next prompts take in the other modality", "no cross-modal term")
        + "; memory "
        + _switch(config.memory, "a layer's read-out carries on to the next interaction layer", "no carry")
        + ".",
    ]
    if getattr(config, "missing_modality", False):
        lines.append(
            "- **Missing modalities**: on (learned stand-ins replace a missing image or text; modality dropout "
            f"{getattr(config, 'modality_dropout', 0.0):g} in training)."
        )
    return lines


def _usage(repo: str, base: str | None, num_labels: int, multi_label: bool, processor: str | None) -> str:
    load = f"""\
        import peft_mitp  # registers MITP with peft: import it before loading any MITP adapter

        model = peft_mitp.load_adapter_model("{repo}")  # builds the base model with its head, then loads the adapter
        """
    processor_line = (
        f'processor = AutoProcessor.from_pretrained("{processor}")  # the backbone\'s processor'
        if processor
        else "processor = ...  # the processor of the backbone this adapter was trained on"
    )
    decision = (
        "predicted = [model.config.id2label[i] for i in (logits.sigmoid()[0] > 0.5).nonzero().flatten().tolist()]"
        if multi_label
        else "predicted = model.config.id2label[logits.argmax(-1).item()]"
    )
    classify = f"""\
        import torch
        from transformers import AutoProcessor

        {processor_line}
        inputs = processor(text=["the text of the pair"], images=[image], return_tensors="pt", padding=True)
        with torch.no_grad():
            logits = model(**inputs).logits
        {decision}
        """
    base_id = base or "<base model id or path>"
    peft_way = f"""\
        import peft_mitp
        from peft import AutoPeftModel, PeftModel

        base = peft_mitp.MITPForImageTextClassification.from_pretrained("{base_id}", num_labels={num_labels})
        model = PeftModel.from_pretrained(base, "{repo}")
        # or, rebuilding the base from the adapter's config:
        model = AutoPeftModel.from_pretrained("{repo}", import_allowlist=["peft_mitp"])
        """
    return "\n".join(
        [
            "## Usage",
            "",
            "```bash",
            "pip install peft-mitp",
            "```",
            "",
            "```python",
            textwrap.dedent(load).rstrip(),
            "```",
            "",
            "Classify an image-text pair (`image` is a PIL image):",
            "",
            "```python",
            textwrap.dedent(classify).rstrip(),
            "```",
            "",
            "With peft's own loaders (`import peft_mitp` first: peft has no plugin entry points):",
            "",
            "```python",
            textwrap.dedent(peft_way).rstrip(),
            "```",
        ]
    )


def _merge_metadata(ours: dict[str, Any], existing: ModelCard | None) -> dict[str, Any]:
    """Keep an existing card's other metadata keys and its tags (except stale `base_model:` tags)."""
    if existing is None:
        return ours
    merged = {k: v for k, v in existing.data.to_dict().items() if k not in _OWN_KEYS}
    merged.update(ours)
    old_tags = [t for t in (existing.data.tags or []) if not str(t).startswith("base_model:")]
    merged["tags"] = list(dict.fromkeys([*ours.get("tags", []), *old_tags]))
    for key in ("base_model", "license", "datasets", "metrics"):  # set by hand where this card knows none
        if key not in ours and existing.data.get(key) is not None:
            merged[key] = existing.data.get(key)
    return merged


def build_model_card(
    model: nn.Module,
    training_info: str | os.PathLike[str] | Mapping[str, Any] | None = None,
    *,
    repo_id: str | None = None,
    adapter_name: str | None = None,
    tags: list[str] | None = None,
    existing: ModelCard | None = None,
) -> ModelCard:
    """Build the model card of an MITP adapter (without writing it).

    Args:
        model: the `PeftModel` holding the MITP adapter(s).
        training_info: training details (a dict, a `mitp_training.json`, or its folder); see `docs/sharing.md`.
        repo_id: Hub id or local path the usage snippet loads from; None: `"<hub id or path of this adapter>"`.
        adapter_name: the adapter the card describes; None: "default" if present, else the active adapter. Other
            adapters of the model are listed in a table (peft saves them in subfolders named after them).
        tags: extra Hub tags.
        existing: a card already in place (on the Hub or in the folder): its metadata keys that this card does not set
            (language, model-index, ...) and its tags are kept; its text is replaced.

    Returns:
        A `huggingface_hub.ModelCard` (YAML front matter + markdown).
    """
    info = read_training_info(training_info)
    name = _primary_adapter(model, adapter_name)
    config = model.peft_config[name]
    if not isinstance(config, MITPConfig):
        raise TypeError(f"Adapter {name!r} is a {config.peft_type} adapter, not MITP: its card is peft's.")
    task = model.get_base_model()
    backbone_type = task.config.backbone_config.model_type
    base = info.get("base_model") or config.base_model_name_or_path or getattr(task, "name_or_path", None) or None
    base_id = hub_model_id(base)
    num_labels = config.num_labels or task.config.num_labels
    id2label = config.id2label or (None if _default_label_names(task.config.id2label) else task.config.id2label)
    problem_type = config.problem_type or task.config.problem_type
    multi_label = problem_type == "multi_label_classification"
    dataset = info.get("dataset")
    metrics = {k: v for k, v in (info.get("metrics") or {}).items() if isinstance(v, (int, float))}

    metadata: dict[str, Any] = {"library_name": "peft"}
    if base_id:
        metadata["base_model"] = base_id
    metadata["tags"] = list(
        dict.fromkeys([*CARD_TAGS, backbone_type, *(tags or []), *([f"base_model:adapter:{base_id}"] if base_id else [])])
    )
    if info.get("license"):
        metadata["license"] = info["license"]
    if hub_model_id(dataset):
        metadata["datasets"] = [dataset]
    if _metric_ids(metrics):
        metadata["metrics"] = _metric_ids(metrics)
    metadata = _merge_metadata(metadata, existing)

    counts = _parameter_counts(model, name)
    adapter_total = counts["prompts"] + counts["hub"] + counts["head"]
    whole = counts["backbone"] + adapter_total
    repo = repo_id or "<hub id or path of this adapter>"
    title = repo_id.rstrip("/").split("/")[-1] if repo_id else f"MITP adapter on {base or backbone_type}"
    task_words = "multi-label (independent sigmoid per label)" if multi_label else "single-label"
    lines = [
        f"# {title}",
        "",
        f"An [MITP]({PAPER_URL}) (Memory-Inspired Temporal Prompt Interaction) adapter for {task_words} image-text "
        f"classification into {num_labels} classes, on a frozen {task.family.name} dual encoder"
        + (f" (`{base}`)" if base else "")
        + ". Temporal prompts in a few interaction layers of both towers are read out after "
        "each pair of layers by a shared memory hub, which consolidates them by cross-modal similarity and activates "
        "them to generate the next pair's prompts. Only the prompts, the hub and a linear head are trained.",
        "",
    ]
    if info.get("description"):
        lines += [str(info["description"]), ""]
    lines += ["## MITP configuration", "", *_configuration_lines(config)]
    head_loss = "BCE-with-logits" if multi_label else "cross-entropy"
    lines += [
        f"- **Head**: linear on the concatenated pooled text and image features, {num_labels} outputs, "
        f"trained with {head_loss}.",
        "",
        "## Size",
        "",
        "| part | parameters |",
        "| --- | ---: |",
        f"| temporal prompts | {counts['prompts']:,} |",
        f"| memory hub | {counts['hub']:,} |",
        f"| classification head | {counts['head']:,} |",
        f"| **adapter (trainable)** | **{adapter_total:,}** |",
        f"| frozen backbone | {counts['backbone']:,} |",
        "",
        f"The adapter is {100 * adapter_total / whole:.2f}% of the {whole:,} parameters of the whole model "
        "(backbone + adapter).",
        "",
    ]
    if id2label:
        shown = [f"{i}: {id2label[i]}" for i in sorted(id2label)[:_MAX_LISTED_LABELS]]
        more = f" (and {len(id2label) - _MAX_LISTED_LABELS} more)" if len(id2label) > _MAX_LISTED_LABELS else ""
        lines += ["## Labels", "", ", ".join(shown) + more, ""]
    if info:
        lines += ["## Training", ""]
        if dataset:
            lines.append(f"- **Data set**: {dataset}")
        if info.get("epochs") is not None:
            lines.append(f"- **Epochs**: {info['epochs']}")
        if metrics:
            lines += ["", "| metric | value |", "| --- | ---: |"]
            lines += [f"| {k} | {_format_number(v)} |" for k, v in sorted(metrics.items())]
        lines.append("")
    others = [n for n in model.peft_config if n != name and isinstance(model.peft_config[n], MITPConfig)]
    if others:
        lines += [
            "## Other adapters in this folder",
            "",
            "peft saves each further adapter in a subfolder named after it; load one with "
            '`peft_mitp.load_adapter_model(repo, subfolder="<name>")` or '
            '`model.load_adapter(repo, adapter_name="<name>", subfolder="<name>")`.',
            "",
            "| adapter | interaction pairs | prompts (text/vision) | hub width | parameters |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        for other in others:
            c = model.peft_config[other]
            n = _parameter_counts(model, other)
            lines.append(
                f"| {other} | {len(c.text_layers or [])} | {c.text_prompt_length}/{c.vision_prompts} | {c.hub_dim} "
                f"| {n['prompts'] + n['hub'] + n['head']:,} |"
            )
        lines.append("")
    processor = info.get("processor") or hub_model_id(getattr(task.config.backbone_config, "_name_or_path", None))
    lines += [_usage(repo, base, num_labels, multi_label, processor), ""]
    from . import __version__

    lines += [
        "## Framework versions",
        "",
        f"- peft-mitp {__version__}",
        f"- PEFT {peft.__version__}",
        f"- Transformers {transformers.__version__}",
        f"- huggingface_hub {huggingface_hub.__version__}",
        f"- PyTorch {torch.__version__}",
        "",
    ]
    yaml = ModelCardData(**metadata).to_yaml()
    return ModelCard(f"---\n{yaml}\n---\n\n" + "\n".join(lines))


def write_model_card(
    model: nn.Module,
    path: str | os.PathLike[str],
    training_info: str | os.PathLike[str] | Mapping[str, Any] | None = None,
    *,
    repo_id: str | None = None,
    adapter_name: str | None = None,
    tags: list[str] | None = None,
) -> ModelCard:
    """Write the MITP model card to `path/README.md`, replacing peft's generic card.

    `PeftModel.save_pretrained` and `PeftModel.push_to_hub` call this for MITP adapters (after `import peft_mitp`);
    call it yourself to rewrite a card, e.g. with training details gathered later.

    Args:
        model: the `PeftModel` holding the MITP adapter(s).
        path: the adapter folder.
        training_info: training details (a dict or a JSON file); None reads `path/mitp_training.json` if present.
        repo_id: Hub id the usage snippet loads from; None: `path` as given.
        adapter_name / tags: see `build_model_card`.

    Returns:
        The written `ModelCard`. Metadata keys of a README already in the folder that this card does not set, and
        its tags, are kept.
    """
    folder = Path(path)
    readme = folder / "README.md"
    existing = ModelCard.load(readme, ignore_metadata_errors=True) if readme.exists() else None
    card = build_model_card(
        model,
        training_info if training_info is not None else folder,
        repo_id=repo_id or os.fspath(path),
        adapter_name=adapter_name,
        tags=tags,
        existing=existing,
    )
    folder.mkdir(parents=True, exist_ok=True)
    card.save(readme)
    return card
