"""The main job: fine-tune an MITP adapter on a text-image data set with `transformers.Trainer`.

`mitp train` (see `peft_mitp.cli`) is a thin front for `train(TrainOptions(...))`; the examples call the same
functions. Everything here runs offline: the default backbone is built from packaged weights
(`peft_mitp.offline_backbone`) and the default data set is easy-VQA (`peft_mitp.data.load_easy_vqa`).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset, DatasetDict
from transformers.trainer_callback import ProgressCallback

from peft_mitp_cli.options import OFFLINE_BACKBONE, TrainOptions

from .card import TRAINING_INFO_FILE, parameter_counts
from .modeling import MITPForImageTextClassification
from .processing import ImageTextProcessor, load_processor
from .quantization import quantization_config, quantize_backbone

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
ADAPTER_DIR = "adapter"


# ---------------------------------------------------------------------------------------------------- building
def build_task_model(
    label_names: list[str],
    multi_label: bool,
    backbone: str = OFFLINE_BACKBONE,
    text_backbone: str | None = None,
    vision_backbone: str | None = None,
    **from_pretrained_kwargs: Any,
) -> tuple[MITPForImageTextClassification, Any]:
    """The task model around a frozen dual encoder, and the processor that prepares its inputs.

    Args:
        label_names: class names, in id order.
        multi_label: BCE over independent labels instead of cross-entropy.
        backbone: "offline" (packaged MiniLM + EfficientNet-Lite0 tower), or a dual-encoder checkpoint.
        text_backbone / vision_backbone: separately pre-trained towers, combined into a dual encoder.
        **from_pretrained_kwargs: passed to the backbone's `from_pretrained` (`dtype`, `revision`, ...).

    Returns:
        `(task_model, processor)`; the processor is called as `processor(text=[...], images=[...],
        return_tensors="pt", padding=True)`.
    """
    head = {
        "id2label": dict(enumerate(label_names)),
        "problem_type": "multi_label_classification" if multi_label else "single_label_classification",
    }
    if text_backbone and vision_backbone:
        quantization = from_pretrained_kwargs.get("quantization_config")
        torchao = type(quantization).__name__ == "TorchAoConfig"
        if torchao:  # quantized after loading (transformers' torchao loading cannot run on dual encoders)
            from_pretrained_kwargs = {k: v for k, v in from_pretrained_kwargs.items() if k != "quantization_config"}
        model = MITPForImageTextClassification.from_text_vision_pretrained(
            text_backbone, vision_backbone, **head, **from_pretrained_kwargs
        )
        if torchao:
            quantize_backbone(model, quantization)
        return model, load_processor(text_name_or_path=text_backbone, vision_name_or_path=vision_backbone)
    if backbone == OFFLINE_BACKBONE:
        from .offline_backbone import offline_processor

        model = MITPForImageTextClassification.from_pretrained(OFFLINE_BACKBONE, **head, **from_pretrained_kwargs)
        return model, offline_processor()
    model = MITPForImageTextClassification.from_pretrained(backbone, **head, **from_pretrained_kwargs)
    return model, load_processor(backbone)


def load_data(options: TrainOptions) -> tuple[DatasetDict, list[str], bool]:
    """The data set as a `DatasetDict` (train / validation / test), its class names and whether it is multi-label."""
    from .data import DATASETS, get_label_names, load_easy_vqa, load_prepared, read_meta

    if options.dataset == "easy_vqa":
        data = load_easy_vqa(max_train=options.max_train_samples, max_test=options.max_eval_samples, seed=options.seed)
        return _cap(data, options), get_label_names(data), False
    if options.dataset in DATASETS:
        if options.data_dir is None:
            raise ValueError(
                f"--dataset {options.dataset} needs --data-dir: the folder of the public distribution (see "
                "docs/data.md for the expected layout) or one converted by `mitp convert`."
            )
        source = Path(options.data_dir)
        prepared = source if (source / "mitp_dataset.json").exists() else source / "mitp-prepared"
        if not (prepared / "mitp_dataset.json").exists():
            DATASETS[options.dataset].converter(source, prepared)
        data = load_prepared(prepared)
    else:
        prepared = Path(options.dataset)
        if not (prepared / "mitp_dataset.json").exists():
            raise ValueError(
                f"--dataset {options.dataset!r} is neither a known data set (easy_vqa, {', '.join(DATASETS)}) nor a "
                "converted folder (one with mitp_dataset.json)."
            )
        data = load_prepared(prepared)
    data = _cap(data, options)
    return data, get_label_names(data), bool(read_meta(prepared).get("multi_label", False))


def _cap(data: DatasetDict, options: TrainOptions) -> DatasetDict:
    limits = {"train": options.max_train_samples, "validation": options.max_eval_samples, "test": options.max_eval_samples}
    out = {}
    for split, ds in data.items():
        limit = limits.get(split)
        out[split] = ds.shuffle(seed=options.seed).select(range(min(limit, len(ds)))) if limit else ds
    return DatasetDict(out)


class ImageTextCollator:
    """Turns rows with `image`, `text` and `label`/`labels` into model inputs with the backbone's processor.

    Processing happens per batch, in the DataLoader, so nothing is pre-computed or cached on disk.

    Args:
        processor: a `peft_mitp.ImageTextProcessor` (from `peft_mitp.load_processor`), or any transformers
            processor called as `processor(text=texts, images=images, return_tensors="pt", padding=True)`.
        multi_label: read `labels` (lists of 0/1) instead of `label` (class index).
        max_length: truncate texts to this many tokens (None: the tokenizer's limit).
    """

    def __init__(self, processor: Any, multi_label: bool = False, max_length: int | None = None) -> None:
        self.processor = processor
        self.multi_label = multi_label
        self.max_length = max_length

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        images = [row["image"].convert("RGB") for row in rows]
        texts = [row["text"] for row in rows]
        kwargs: dict[str, Any] = {"truncation": True}
        if self.max_length is not None:
            kwargs["max_length"] = self.max_length
        if isinstance(self.processor, ImageTextProcessor):
            batch = dict(self.processor(images, texts, **kwargs))  # it knows the family's padding rule
        else:
            batch = dict(self.processor(text=texts, images=images, return_tensors="pt", padding=True, **kwargs))
        if "label" in rows[0] or "labels" in rows[0]:
            if self.multi_label:
                batch["labels"] = torch.tensor([row["labels"] for row in rows], dtype=torch.float32)
            else:
                batch["labels"] = torch.tensor([row["label"] for row in rows], dtype=torch.long)
        return batch


# ---------------------------------------------------------------------------------------------------- training
def job_header(options: TrainOptions, data: DatasetDict, label_names: list[str], trainable: int, total: int) -> str:
    """What `train` is about to do, in a few lines: data set and split sizes, backbone, parameters, device, output."""
    if options.text_backbone and options.vision_backbone:
        backbone = f"{options.text_backbone} (text) + {options.vision_backbone} (vision)"
    elif options.backbone == OFFLINE_BACKBONE:
        backbone = f"{OFFLINE_BACKBONE} (packaged all-MiniLM-L6-v2 text tower + EfficientNet-Lite0 vision tower)"
    else:
        backbone = options.backbone
    splits = ", ".join(f"{split} {len(rows):,}" for split, rows in data.items())
    device = f"cuda ({torch.cuda.get_device_name()})" if torch.cuda.is_available() else "cpu"
    steps = (
        f"{options.max_steps} steps" if options.max_steps > 0
        else f"{options.epochs:g} epoch(s) of {math.ceil(len(data['train']) / options.batch_size)} steps"
    )
    return "\n".join([
        f"mitp train: {options.dataset} ({splits} examples; {len(label_names)} labels)",
        f"  backbone: {backbone}",
        f"  parameters: {trainable:,} trainable of {total:,} ({100 * trainable / total:.2f}%)",
        f"  schedule: {steps}, batch {options.batch_size}, learning rate {options.learning_rate:g}",
        f"  device: {device}, torch threads: {torch.get_num_threads()}",
        f"  output: {Path(options.output_dir).resolve()}",
    ])


class LabelledProgressCallback(ProgressCallback):
    """The Trainer's progress bars with a label ("train", "evaluate validation", ...), and its logs with numbers as
    numbers (JSON), not quoted strings. Set `.label` before an evaluation to name its bar."""

    label = "evaluate"

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        super().on_train_begin(args, state, control, **kwargs)
        if self.training_bar is not None:
            self.training_bar.set_description("train")

    def on_prediction_step(self, args: Any, state: Any, control: Any, eval_dataloader: Any = None, **kwargs: Any) -> None:
        fresh = self.prediction_bar is None
        super().on_prediction_step(args, state, control, eval_dataloader=eval_dataloader, **kwargs)
        if fresh and self.prediction_bar is not None:
            self.prediction_bar.set_description(self.label)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        if state.is_world_process_zero and self.training_bar is not None and logs:
            shown = {k: float(f"{v:.4g}") if isinstance(v, float) else v for k, v in logs.items() if k != "total_flos"}
            self.training_bar.write(json.dumps(shown))


def train(options: TrainOptions) -> dict[str, Any]:
    """Fine-tune an MITP adapter, evaluate it, and save adapter, model card, metrics and plots.

    Returns:
        The final metrics (validation and test), as also written to `<output_dir>/metrics.json`.
    """
    from peft import get_peft_model
    from transformers import Trainer, TrainingArguments, set_seed

    from .metrics import make_compute_metrics

    evaluates_midway = options.eval_steps is not None or (options.max_steps <= 0 and options.epochs > 1)
    if options.quantization == "bnb-nf4" and evaluates_midway and not torch.cuda.is_available():
        # bitsandbytes 0.50's CPU 4-bit layers fail in a training forward that follows a no-grad forward: refuse
        # before any compute instead of failing after the first evaluation (docs/reliability.md).
        raise ValueError(
            "--quantization bnb-nf4 on CPU cannot evaluate between training steps (--eval-steps, or more than one "
            "epoch): bitsandbytes' CPU 4-bit layers fail to train after an evaluation. Train one epoch without "
            "--eval-steps, or use --quantization bnb-int8 or int8."
        )

    set_seed(options.seed)
    output = Path(options.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    data, label_names, multi_label = load_data(options)
    quantization = quantization_config(options.quantization)
    base, processor = build_task_model(
        label_names, multi_label, options.backbone, options.text_backbone, options.vision_backbone,
        **({"quantization_config": quantization} if quantization is not None else {}),
    )
    model = get_peft_model(base, options.mitp_config())
    counts = parameter_counts(model)  # the model card's count (peft's total counts the replaced head twice)
    trainable, total = counts["trainable"], counts["total"]
    print(job_header(options, data, label_names, trainable, total), flush=True)

    eval_split = "validation" if "validation" in data else "test"
    steps_per_epoch = math.ceil(len(data["train"]) / options.batch_size)
    # One evaluation at the end is enough for a single epoch or a step budget; longer runs evaluate (and checkpoint)
    # every epoch.
    eval_strategy = "steps" if options.eval_steps else ("epoch" if evaluates_midway else "no")
    args = TrainingArguments(
        output_dir=str(output / "checkpoints"),
        num_train_epochs=options.epochs,
        max_steps=options.max_steps,
        per_device_train_batch_size=options.batch_size,
        per_device_eval_batch_size=options.batch_size * 2,
        learning_rate=options.learning_rate,
        weight_decay=options.weight_decay,
        warmup_steps=int(options.warmup_ratio * (options.max_steps if options.max_steps > 0 else steps_per_epoch * options.epochs)),
        lr_scheduler_type="cosine",
        eval_strategy=eval_strategy,
        eval_steps=options.eval_steps,
        save_strategy=eval_strategy,
        save_steps=options.eval_steps,
        save_total_limit=1,
        logging_steps=max(1, min(20, steps_per_epoch // 10)),
        report_to=[],
        label_names=["labels"],
        remove_unused_columns=False,
        dataloader_num_workers=options.num_workers,
        bf16=options.precision == "bf16",
        fp16=options.precision == "fp16",
        use_cpu=not torch.cuda.is_available(),
        seed=options.seed,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=data["train"],
        eval_dataset=data[eval_split],
        data_collator=ImageTextCollator(processor, multi_label=multi_label),
        compute_metrics=make_compute_metrics(multi_label),
    )
    progress = LabelledProgressCallback()
    if trainer.pop_callback(ProgressCallback) is not None:  # None with disable_tqdm: the Trainer prints plain logs
        trainer.add_callback(progress)
    training_seconds = trainer.train().metrics["train_runtime"]
    progress.label = f"evaluate {eval_split}"
    metrics: dict[str, Any] = {f"validation_{k.removeprefix('eval_')}": v for k, v in _final_evaluation(trainer).items()}
    if "test" in data and eval_split != "test":
        progress.label = "evaluate test"
        test = trainer.predict(data["test"], metric_key_prefix="test")
        metrics.update(test.metrics)
        if "question_type" in data["test"].column_names and not multi_label:
            metrics.update(_per_group_accuracy(test.predictions, test.label_ids, data["test"]["question_type"]))
    # Two clocks: the Trainer's training loop alone, and the whole job (data, backbone, training, evaluations).
    metrics["training_seconds"] = round(training_seconds, 1)
    metrics["total_seconds"] = round(time.monotonic() - started, 1)
    metrics["trainable_parameters"] = trainable
    metrics["total_parameters"] = total

    adapter_dir = output / ADAPTER_DIR
    info = {
        "base_model": (
            f"{options.text_backbone} + {options.vision_backbone}" if options.text_backbone else options.backbone
        ),
        "backbone": options.backbone,
        "text_backbone": options.text_backbone,
        "vision_backbone": options.vision_backbone,
        "dataset": options.dataset,
        "label_names": label_names,
        "multi_label": multi_label,
        "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))},
        "epochs": options.epochs,
        "options": asdict(options),
    }
    adapter_dir.mkdir(parents=True, exist_ok=True)
    (adapter_dir / TRAINING_INFO_FILE).write_text(json.dumps(info, indent=2))
    model.save_pretrained(adapter_dir)
    (output / METRICS_FILE).write_text(json.dumps(metrics, indent=2))
    checkpoints = output / "checkpoints"
    if checkpoints.is_dir() and not any(checkpoints.iterdir()):
        checkpoints.rmdir()  # the Trainer makes it up front; keep it only when a run saved checkpoints in it
    _write_plots(trainer.state.log_history, model, data[eval_split], processor, multi_label, output, label_names)
    if options.push_to_hub:
        model.push_to_hub(options.push_to_hub)
    return metrics


def _final_evaluation(trainer: Any) -> dict[str, float]:
    """The evaluation of the trained adapter: the Trainer's own, when its last scheduled evaluation ran after the last
    step (the same numbers; evaluating again would only cost time), else a fresh `trainer.evaluate()`."""
    evaluations = [entry for entry in trainer.state.log_history if "eval_loss" in entry]
    if evaluations and evaluations[-1].get("step") == trainer.state.global_step:
        return {key: value for key, value in evaluations[-1].items() if key.startswith("eval_")}
    return trainer.evaluate()


def _per_group_accuracy(predictions: Any, labels: Any, groups: list[str]) -> dict[str, float]:
    predicted = torch.as_tensor(predictions[0] if isinstance(predictions, tuple) else predictions).argmax(-1)
    labels = torch.as_tensor(labels)
    out = {}
    for group in sorted(set(groups)):
        mask = torch.tensor([g == group for g in groups])
        out[f"test_accuracy_{group.replace('/', '_')}"] = (predicted[mask] == labels[mask]).float().mean().item()
    return out


def _write_plots(
    log_history: list[dict], model: Any, eval_data: Dataset, processor: Any, multi_label: bool, output: Path,
    label_names: list[str],
) -> None:
    from .plots import drawable_activations, plot_activations, plot_training_curves

    plot_training_curves(log_history, output / "training_curves.png")
    row = eval_data[0]
    batch = ImageTextCollator(processor, multi_label)([row])
    batch.pop("labels", None)
    model.eval()
    with torch.no_grad():
        out = model(**batch, output_hub_activations=True)
    activations = drawable_activations(out.attentions)
    if not activations:
        logger.info(
            "No hub activation plot: the adapter has no cross-modal term to draw (interaction off, or one interaction "
            "pair)."
        )
        return
    prediction = label_names[int(out.logits[0].argmax())] if not multi_label else None
    plot_activations(activations, output / "hub_activations.png", image=row["image"].convert("RGB"), text=row["text"],
                     prediction=prediction)


# ---------------------------------------------------------------------------------------------------- loading back
def _adapter_folder(path: str | Path) -> Path:
    path = Path(path)
    return path / ADAPTER_DIR if (path / ADAPTER_DIR / "adapter_config.json").exists() else path


def load_training_info(adapter_dir: str | Path) -> dict[str, Any]:
    """What `train` recorded next to the adapter (backbone, data set, label names, metrics, options)."""
    info_path = _adapter_folder(adapter_dir) / TRAINING_INFO_FILE
    if not info_path.exists():
        raise FileNotFoundError(
            f"{info_path} is missing: `mitp evaluate/predict/explain` need an adapter saved by `mitp train` (it "
            "records the backbone and label names there). For other adapters use peft_mitp's Python API."
        )
    return json.loads(info_path.read_text())


def load_trained(adapter_dir: str | Path, **from_pretrained_kwargs: Any) -> tuple[Any, Any, dict[str, Any]]:
    """Rebuild backbone, task model and adapter saved by `train`.

    Returns:
        `(peft_model, processor, training_info)`.
    """
    from peft import PeftModel

    info = load_training_info(adapter_dir)
    adapter_dir = _adapter_folder(adapter_dir)
    quantization = quantization_config(info.get("options", {}).get("quantization", "none"))
    if quantization is not None:  # the backbone the adapter was trained on
        from_pretrained_kwargs.setdefault("quantization_config", quantization)
    base, processor = build_task_model(
        info["label_names"],
        info["multi_label"],
        info["backbone"],
        info.get("text_backbone"),
        info.get("vision_backbone"),
        **from_pretrained_kwargs,
    )
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    return model, processor, info


def evaluate_adapter(
    adapter_dir: str | Path,
    options: TrainOptions,
    split: str = "test",
    confusion_matrix_path: str | Path | None = None,
) -> dict[str, Any]:
    """Metrics of a trained adapter on one split of a data set, overall and per class (and per question type).

    Args:
        adapter_dir: the output folder of `train` (or its `adapter/` folder).
        options: the data options (data set, caps, batch size).
        split: "train", "validation" or "test".
        confusion_matrix_path: where to write a confusion-matrix PNG (single-label data sets; None: none).

    Returns:
        The overall metrics (as `compute_classification_metrics`), `per_class_accuracy` and `per_class_support`
        (label name -> accuracy on the examples of that class, and their number; for multi-label: how often that
        label's yes/no was right), `per_question_type_accuracy` for data sets with question types (easy-VQA), and
        `confusion_matrix` (the PNG's path) when one was written.
    """
    from tqdm.auto import tqdm

    from .metrics import compute_classification_metrics

    model, processor, info = load_trained(adapter_dir)
    data, _, multi_label = load_data(options)
    if split not in data:
        raise ValueError(f"The data set has no split {split!r}; it has {sorted(data)}.")
    collate = ImageTextCollator(processor, multi_label=multi_label)
    rows, logits, labels = data[split], [], []
    for start in tqdm(range(0, len(rows), options.batch_size), desc=f"evaluate {split}"):
        batch = collate([rows[i] for i in range(start, min(start + options.batch_size, len(rows)))])
        labels.append(batch.pop("labels"))
        with torch.no_grad():
            logits.append(model(**batch).logits.float())
    all_logits, all_labels = torch.cat(logits), torch.cat(labels)
    metrics: dict[str, Any] = compute_classification_metrics(
        all_logits.numpy(), all_labels.numpy(), multi_label=multi_label
    )
    names = info["label_names"]
    if multi_label:
        right = (all_logits > 0).long() == all_labels.long()
        metrics["per_class_accuracy"] = {name: right[:, i].float().mean().item() for i, name in enumerate(names)}
        metrics["per_class_support"] = {name: int(all_labels[:, i].sum()) for i, name in enumerate(names)}
        return metrics
    predicted = all_logits.argmax(-1)
    metrics["per_class_accuracy"], metrics["per_class_support"] = {}, {}
    for i, name in enumerate(names):
        of_class = all_labels == i
        if of_class.any():
            metrics["per_class_accuracy"][name] = (predicted[of_class] == i).float().mean().item()
            metrics["per_class_support"][name] = int(of_class.sum())
    if "question_type" in rows.column_names:
        groups = rows["question_type"]
        metrics["per_question_type_accuracy"] = {
            group: (predicted[mask] == all_labels[mask]).float().mean().item()
            for group in sorted(set(groups))
            for mask in [torch.tensor([g == group for g in groups])]
        }
    if confusion_matrix_path is not None:
        from .plots import plot_confusion_matrix

        path = plot_confusion_matrix(all_labels.tolist(), predicted.tolist(), names, confusion_matrix_path,
                                     title=f"{options.dataset}, {split} split ({len(rows)} examples)")
        metrics["confusion_matrix"] = str(path)
    return metrics


def predict(model: Any, processor: Any, label_names: list[str], images: list[Any], texts: list[str], multi_label: bool, top_k: int = 3) -> list[list[tuple[str, float]]]:
    """Top-k labels with scores (softmax probabilities, or sigmoid for multi-label) for image-text pairs."""
    batch = ImageTextCollator(processor)([{"image": i, "text": t} for i, t in zip(images, texts, strict=True)])
    with torch.no_grad():
        logits = model(**batch).logits.float()
    scores = logits.sigmoid() if multi_label else logits.softmax(-1)
    values, indices = scores.topk(min(top_k, scores.shape[-1]), dim=-1)
    return [
        [(label_names[i], round(v, 4)) for v, i in zip(vs.tolist(), ids.tolist(), strict=True)]
        for vs, ids in zip(values, indices, strict=True)
    ]
