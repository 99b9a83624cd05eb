"""The shared measuring machinery of the benchmarks: data, one training loop, evaluation, time and memory.

Every method in `benchmarks/compare.py` goes through exactly these functions, so the only differences between two
rows of its tables are the methods themselves (and the learning rate each one states).

- Data: easy-VQA (`peft_mitp.data.load_easy_vqa`) encoded once with the offline backbone's processor, exactly as
  `peft_mitp.training.ImageTextCollator` encodes a batch (each distinct image and question once; a batch gathers rows
  and trims the padding to its longest question, as the collator's `padding=True` does).
- Training: a plain PyTorch loop, AdamW (no weight decay) with linear warm-up over 5% of the steps and a cosine decay
  (the schedule of `peft_mitp.training.train`), gradient clipping at norm 1.0 (Trainer's default), the same seeded
  batch order for every method.
- Time: the median over repeated calls of a training step (forward, backward, clipping, optimizer step) and of an
  inference forward, on a fixed batch, after warm-up calls.
- Memory: the peak resident set size during training steps above the resident set just before them (the built model,
  its data and the Python runtime are in that baseline), measured in a process that has done nothing else yet; and
  the torch profiler's memory timeline of one training step, by category (activations, gradients, optimizer state).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = [
    "EncodedSplit",
    "TensorMemoryTracker",
    "autograd_layers",
    "encode_split",
    "evaluate",
    "find_backbone",
    "load_encoded_easy_vqa",
    "machine_info",
    "make_optimizer",
    "measure_peak_rss",
    "median_seconds",
    "paired_median_seconds",
    "profile_step_memory",
    "question_prior",
    "trainable_parameters",
    "train",
    "train_step",
]


# ---------------------------------------------------------------------------------------------------------------- data
@dataclass
class EncodedSplit:
    """One split of an image-text data set, encoded once for the offline backbone.

    Attributes:
        pixel_values: (I, 3, H, W) every distinct image of the split, processed once.
        image_index: (N,) row -> index into `pixel_values`.
        input_ids / attention_mask / token_type_ids: (T, L) every distinct text, tokenized once (padded to the
            longest text of the split); `token_type_ids` is None for tokenizers without segments (CLIP).
        text_index: (N,) row -> index into the text tensors.
        labels: (N,) class indices.
        groups: (N,) a group name per row (easy-VQA's question type: "yes/no", "color", "shape").
    """

    pixel_values: torch.Tensor
    image_index: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    token_type_ids: torch.Tensor | None
    text_index: torch.Tensor
    labels: torch.Tensor
    groups: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, rows: torch.Tensor | list[int]) -> dict[str, torch.Tensor]:
        """The model inputs (and `labels`) of `rows`, with text padding trimmed to the batch's longest text."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        texts = self.text_index[rows]
        mask = self.attention_mask[texts]
        length = int(mask.sum(1).max())
        batch = {"input_ids": self.input_ids[texts, :length], "attention_mask": mask[:, :length]}
        if self.token_type_ids is not None:
            batch["token_type_ids"] = self.token_type_ids[texts, :length]
        batch["pixel_values"] = self.pixel_values[self.image_index[rows]]
        batch["labels"] = self.labels[rows]
        return batch

    def subset(self, count: int) -> EncodedSplit:
        """The first `count` rows (for smoke tests)."""
        return EncodedSplit(
            self.pixel_values,
            self.image_index[:count],
            self.input_ids,
            self.attention_mask,
            self.token_type_ids,
            self.text_index[:count],
            self.labels[:count],
            self.groups[:count],
        )


def encode_split(dataset: Any, processor: Any, group_column: str = "question_type") -> EncodedSplit:
    """Encode a split of `peft_mitp.data` rows (`image`, `text`, `label`) once, as `ImageTextCollator` would.

    Args:
        dataset: a `datasets.Dataset` with an `image` column (`datasets.Image`), `text` and `label`.
        processor: the backbone's processor (`peft_mitp.offline_backbone.offline_processor()`).
        group_column: the column whose values group the rows for per-group accuracy (None-like if absent).

    Returns:
        The `EncodedSplit`.
    """
    import datasets

    paths = [image["path"] for image in dataset.cast_column("image", datasets.Image(decode=False))["image"]]
    distinct_paths = sorted(set(paths))
    image_position = {path: i for i, path in enumerate(distinct_paths)}
    from PIL import Image

    images = []
    for path in distinct_paths:
        with Image.open(path) as image:
            images.append(image.convert("RGB"))
    pixel_values = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    texts = dataset["text"]
    distinct_texts = sorted(set(texts))
    text_position = {text: i for i, text in enumerate(distinct_texts)}
    tokens = processor.tokenizer(distinct_texts, padding=True, truncation=True, return_tensors="pt")
    groups = dataset[group_column] if group_column in dataset.column_names else ["all"] * len(dataset)
    return EncodedSplit(
        pixel_values=pixel_values,
        image_index=torch.tensor([image_position[p] for p in paths]),
        input_ids=tokens["input_ids"],
        attention_mask=tokens["attention_mask"],
        token_type_ids=tokens.get("token_type_ids"),
        text_index=torch.tensor([text_position[t] for t in texts]),
        labels=torch.tensor(dataset["label"]),
        groups=list(groups),
    )


def load_encoded_easy_vqa(
    max_train: int | None, max_test: int | None, seed: int = 0
) -> tuple[dict[str, EncodedSplit], list[str]]:
    """easy-VQA (`peft_mitp.data.load_easy_vqa`) train and test splits, encoded once; and the answer names."""
    from peft_mitp.data import get_label_names, load_easy_vqa
    from peft_mitp.offline_backbone import offline_processor

    data = load_easy_vqa(max_train=max_train, max_test=max_test, seed=seed)
    processor = offline_processor()
    splits = {name: encode_split(data[name], processor) for name in ("train", "test")}
    return splits, get_label_names(data)


def question_prior(train: EncodedSplit, test: EncodedSplit) -> dict[str, float]:
    """Accuracy of answering from the question alone: each test question gets the answer most often given to the same
    question text in training (the overall most frequent answer for a question never seen in training).

    A method whose accuracy on a question type equals this prior answers that type without looking at the image.

    Returns:
        Metrics as `evaluate` returns them ("accuracy", "accuracy_<group>").
    """

    def keys(split: EncodedSplit) -> list[tuple[int, ...]]:
        texts = [tuple(ids[mask.bool()].tolist()) for ids, mask in zip(split.input_ids, split.attention_mask, strict=True)]
        return [texts[i] for i in split.text_index.tolist()]

    counts: dict[tuple[int, ...], torch.Tensor] = {}
    num_labels = int(max(train.labels.max(), test.labels.max())) + 1
    for key, label in zip(keys(train), train.labels.tolist(), strict=True):
        counts.setdefault(key, torch.zeros(num_labels, dtype=torch.long))[label] += 1
    overall = int(torch.bincount(train.labels, minlength=num_labels).argmax())
    predicted = torch.tensor([int(counts[k].argmax()) if k in counts else overall for k in keys(test)])
    correct = (predicted == test.labels).float()
    metrics = {"accuracy": float(correct.mean())}
    for group in sorted(set(test.groups)):
        mask = torch.tensor([g == group for g in test.groups])
        metrics[f"accuracy_{group}"] = float(correct[mask].mean())
    return metrics


def batch_order(num_rows: int, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Row indices of successive training batches: seeded reshuffles, epoch after epoch, dropping no row."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        yield from torch.randperm(num_rows, generator=generator).split(batch_size)


# ------------------------------------------------------------------------------------------------------------ training
def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; a parameter shared by several modules counts once."""
    seen: dict[int, nn.Parameter] = {}
    for param in model.parameters():
        seen.setdefault(id(param), param)
    trainable = sum(p.numel() for p in seen.values() if p.requires_grad)
    return trainable, sum(p.numel() for p in seen.values())


def make_optimizer(
    model: nn.Module, learning_rate: float, backbone_learning_rate: float | None = None
) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters, without weight decay (as `peft_mitp.training.TrainOptions`).

    Args:
        model: the model.
        learning_rate: for every trainable parameter, or for those outside the backbone when
            `backbone_learning_rate` is given.
        backbone_learning_rate: for trainable parameters whose name contains "backbone." (full fine-tuning: the
            pretrained weights want a much smaller step than a fresh head).
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if backbone_learning_rate is None:
        groups = [{"params": [p for _, p in named], "lr": learning_rate}]
    else:
        groups = [
            {"params": [p for n, p in named if "backbone." in n], "lr": backbone_learning_rate},
            {"params": [p for n, p in named if "backbone." not in n], "lr": learning_rate},
        ]
        groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, weight_decay=0.0)


def train_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor], max_grad_norm: float = 1.0
) -> float:
    """One training step (forward, backward, gradient clipping, optimizer step, gradients freed); returns the loss."""
    loss = model(**batch).loss
    loss.backward()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def train(
    model: nn.Module,
    split: EncodedSplit,
    *,
    steps: int,
    batch_size: int,
    learning_rate: float,
    backbone_learning_rate: float | None = None,
    seed: int = 0,
    warmup_ratio: float = 0.05,
) -> list[float]:
    """Train `model` for `steps` steps with the shared loop (see the module docstring); returns the losses."""
    from transformers import get_cosine_schedule_with_warmup

    optimizer = make_optimizer(model, learning_rate, backbone_learning_rate)
    schedule = get_cosine_schedule_with_warmup(optimizer, math.ceil(warmup_ratio * steps), steps)
    model.train()
    losses = []
    order = batch_order(len(split), batch_size, seed)
    for _ in range(steps):
        losses.append(train_step(model, optimizer, split.batch(next(order))))
        schedule.step()
    model.eval()
    return losses


@torch.no_grad()
def evaluate(model: nn.Module, split: EncodedSplit, batch_size: int = 128) -> dict[str, float]:
    """Accuracy on `split`, overall ("accuracy") and per group ("accuracy_<group>", e.g. "accuracy_yes/no")."""
    model.eval()
    predictions = []
    for rows in torch.arange(len(split)).split(batch_size):
        batch = split.batch(rows)
        batch.pop("labels")
        predictions.append(model(**batch).logits.argmax(-1))
    correct = (torch.cat(predictions) == split.labels).float()
    metrics = {"accuracy": float(correct.mean())}
    for group in sorted(set(split.groups)):
        mask = torch.tensor([g == group for g in split.groups])
        metrics[f"accuracy_{group}"] = float(correct[mask].mean())
    return metrics


def write_report(output: Path, report: dict[str, Any], text: str) -> None:
    """Write a benchmark's `results.json` and `report.md` into `output` (created if needed), and print the report."""
    output.mkdir(parents=True, exist_ok=True)
    (output / "results.json").write_text(json.dumps(report, indent=2))
    (output / "report.md").write_text(text)
    print(text)


# ---------------------------------------------------------------------------------------------------------------- time
@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run the block with `threads` torch threads (None or 0: leave the count alone), then restore the old count.

    Benchmarks called as functions (from tests or notebooks) must not leave the caller's process on another thread
    count: results computed afterwards would round differently from those of a fresh process with the default count.
    """
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def median_seconds(fn: Callable[[], Any], repeats: int, warmup: int = 2) -> float:
    """Median wall-clock seconds of `fn()` over `repeats` calls, after `warmup` calls that are not timed."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def paired_median_seconds(fns: list[Callable[[], Any]], repeats: int, warmup: int = 1) -> list[float]:
    """Median seconds of each of `fns`, timed in alternation (a, b, a, b, ...) after `warmup` rounds.

    On a shared machine the load drifts; alternating the calls exposes every function to the same drift, so the ratio
    of two medians is far steadier than that of two measurements made one after the other.
    """
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, bucket in zip(fns, times, strict=True):
            start = time.perf_counter()
            fn()
            bucket.append(time.perf_counter() - start)
    return [statistics.median(bucket) for bucket in times]


# -------------------------------------------------------------------------------------------------------------- memory
def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _release_free_memory() -> None:
    gc.collect()
    with contextlib.suppress(OSError):  # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap pages back, so that reuse does not hide growth


def measure_peak_rss(fn: Callable[[], Any]) -> dict[str, float]:
    """Peak resident memory while `fn()` runs, above the resident memory just before it (Linux).

    The kernel's high-water mark is reset first (`/proc/self/clear_refs`, value 5), so what the process did before
    (loading, building the model) does not count; freed heap memory is handed back first, so that `fn` cannot reuse
    it unseen. Call it in a fresh process for numbers that compare across methods. Falls back to
    `resource.getrusage(RUSAGE_SELF).ru_maxrss` minus the resident memory before, where the reset is not allowed.

    Returns:
        {"peak_mib": peak above the baseline, "baseline_mib": resident memory before, "absolute_peak_mib": the
        process's peak during `fn`, "method": how the peak was read}.
    """
    import resource

    _release_free_memory()
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
        method = "VmHWM after clear_refs"
    except OSError:
        method = "ru_maxrss (no reset)"
    before = _status_kib("VmRSS")
    fn()
    peak = _status_kib("VmHWM") if method.startswith("VmHWM") else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "peak_mib": (peak - before) / 1024,
        "baseline_mib": before / 1024,
        "absolute_peak_mib": peak / 1024,
        "method": method,
    }


def profile_step_memory(step: Callable[[], Any]) -> dict[str, float]:
    """Tensor memory of one call of `step` by category, at its peak, from the torch profiler's memory timeline.

    Uses `torch.profiler` with `profile_memory=True` and its (private) memory timeline, which labels every tensor as
    parameter, optimizer state, input, temporary, activation, gradient or autograd detail. Run a warm-up step first
    so that the optimizer state exists. Returns MiB per category at the moment the step's tensors peak, and
    "step_peak_mib": the peak of everything except parameters (what training adds on top of the model).
    Empty when the private API is unavailable.
    """
    from torch.profiler import ProfilerActivity, profile

    try:
        from torch.profiler._memory_profiler import _CATEGORY_TO_INDEX, MemoryProfileTimeline
    except ImportError:
        return {}
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        step()
    try:
        _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline("cpu")
    except Exception:  # the private API moved: no breakdown rather than no benchmark
        return {}
    names = {index + 1: (category.name.lower() if category is not None else "unknown")
             for category, index in _CATEGORY_TO_INDEX.items()}
    parameter_column = next(i for i, name in names.items() if name == "parameter")
    # "unknown" holds tensors the profiler could not label; frozen parameters are labelled "parameter".
    above = [sum(row) - row[parameter_column] for row in sizes]
    peak_row = sizes[max(range(len(sizes)), key=above.__getitem__)]
    out = {f"{names[i]}_mib": peak_row[i] / 2**20 for i in names}
    out["step_peak_mib"] = max(above) / 2**20
    return out


class TensorMemoryTracker(TorchDispatchMode):
    """Live bytes of the tensors that operators create while it is active, and their peak.

    Every operator's output storage is counted once, from its creation until it is freed (the storage's Python object
    dies with the storage). Parameters and anything created before the tracker started are not counted, so the peak is
    what a step adds on top of the model: activations kept for backward, temporaries, gradients and, in the first
    optimizer step, the optimizer state. Works on the meta device too (storages there have sizes but no memory),
    which is how `benchmarks/paper_scale.py` measures paper-sized models without weights.

    Example:

        ```py
        >>> with TensorMemoryTracker() as tracker:
        ...     train_step(model, optimizer, batch)
        >>> tracker.peak_bytes
        ```
    """

    def __init__(self) -> None:
        super().__init__()
        self.live_bytes = 0
        self.peak_bytes = 0
        self._live: dict[int, Any] = {}

    def _track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self._live:
            return
        size = storage.nbytes()
        self.live_bytes += size
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)

        def freed(_: Any, key: int = key, size: int = size) -> None:
            self.live_bytes -= size
            self._live.pop(key, None)

        self._live[key] = weakref.ref(storage, freed)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        # Views and in-place results share an input's storage (a transposed weight is the weight): not new memory.
        inputs = {
            value.untyped_storage()._cdata
            for value in tree_flatten((args, kwargs))[0]
            if isinstance(value, torch.Tensor)
        }
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor) and value.untyped_storage()._cdata not in inputs:
                self._track(value)
        return out


def find_backbone(model: nn.Module) -> nn.Module:
    """The dual encoder inside a benchmark model (through a peft wrapper if there is one)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.backbone


def autograd_layers(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, list[int]]:
    """Which encoder layers of each tower record an autograd graph in a training forward of `model`.

    A layer records a graph when its output requires grad: then backward runs through it and its activations are
    kept for that. Layers whose output needs no grad ran without autograd (MITP: every layer below the first
    interaction layer).

    Returns:
        {"text": [layer indices], "vision": [layer indices]}.
    """
    from peft_mitp.families import family_for, resolve_tower

    backbone = find_backbone(model)
    family = family_for(backbone.config.model_type)
    recorded: dict[str, list[int]] = {"text": [], "vision": []}
    handles = []
    for kind in ("text", "vision"):
        for index, layer in enumerate(resolve_tower(backbone, getattr(family, kind), kind).layers):

            def hook(_module: nn.Module, _args: Any, output: Any, kind: str = kind, index: int = index) -> None:
                hidden = output[0] if isinstance(output, tuple) else output
                if hidden.requires_grad and index not in recorded[kind]:
                    recorded[kind].append(index)

            handles.append(layer.register_forward_hook(hook))
    try:
        model.train()
        model(**batch).loss.backward()
    finally:
        for handle in handles:
            handle.remove()
        model.zero_grad(set_to_none=True)
    return {kind: sorted(indices) for kind, indices in recorded.items()}


# ------------------------------------------------------------------------------------------------------------- machine
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict[str, Any]:
    """Where and with what a benchmark ran: CPU, core count, load average, library versions, date, git commit."""
    import peft
    import transformers

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False,
            cwd=os.path.dirname(os.path.abspath(__file__)),
        ).stdout.strip()
    except OSError:
        commit = ""
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": _cpu_model(),
        "nproc": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "loadavg": os.getloadavg(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "git_commit": commit,
    }
