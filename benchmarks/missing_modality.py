"""Missing modalities on easy-VQA: accuracy with the image removed, the text removed, and both present.

Trains an MITP adapter with learned stand-ins for a missing modality (`MITPConfig(missing_modality=True)`) on the
offline data set (easy-VQA, `peft_mitp.data.load_easy_vqa`) with the offline backbone
(`peft_mitp.offline_backbone.build_offline_backbone`), once with modality dropout and once without (the comparison),
then scores the test split three ways:

- full: every sample has its image and its question;
- image removed: `pixel_values=None`, the vision tower does not run, the adapter's stand-ins take its place;
- text removed: `input_ids=None`, the same for the text tower.

easy-VQA needs both modalities (majority class 37.3% on the full test split, best text-only 67.0%, see
shared/design/offline.md), so neither single modality can reach the full-modality accuracy. The script also reports,
on the same test subset, the majority answer and a text-only lookup (the most frequent training answer to the same
question text): the references for "image removed".

Run from the repository root:

    python benchmarks/missing_modality.py --quick      # 2 to 3 minutes on 2 CPU cores
    python benchmarks/missing_modality.py              # larger subsets, longer training
    python benchmarks/missing_modality.py --quick --threads 1   # on a busy machine: one thread is much faster

It prints a Markdown table and writes the numbers as JSON (`--output`). Results: docs/reliability.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from datetime import date

import numpy as np
import torch
from peft import get_peft_model

import peft_mitp
from peft_mitp.data import load_easy_vqa
from peft_mitp.offline_backbone import build_offline_backbone, offline_processor, pixel_values_from_arrays


@dataclass
class Settings:
    """One benchmark configuration; every field is also a command-line flag (`--max-train 4000`).

    Args:
        max_train / max_test: easy-VQA questions drawn for training (before the validation split) and testing.
        steps / batch_size / learning_rate: AdamW, linear decay to zero.
        modality_dropout: the dropout of the adapter under test.
        prompt_length / num_interaction_layers / hub_dim: the rest of its `MITPConfig`.
        seed: data draw, initialisation, batch order and dropout draws.
        compare_without_dropout: also train the same adapter with `modality_dropout=0` (doubles the training time).
        threads: torch threads (0: torch's default).
    """

    max_train: int = 8000
    max_test: int = 2000
    steps: int = 600
    batch_size: int = 32
    learning_rate: float = 5e-3
    modality_dropout: float = 0.3
    prompt_length: int = 4
    num_interaction_layers: int = 2
    hub_dim: int = 128
    seed: int = 0
    compare_without_dropout: bool = True
    threads: int = 0


QUICK = {"max_train": 2000, "max_test": 300, "steps": 80, "batch_size": 32}


def encode(split, tokenizer) -> dict[str, torch.Tensor]:
    """Tensors of one split: token ids (padded to the split's longest question), pixel values, labels."""
    tokens = tokenizer(list(split["text"]), padding=True, return_tensors="pt")
    images = np.stack([np.asarray(image.convert("RGB")) for image in split["image"]])
    return {
        "input_ids": tokens["input_ids"],
        "attention_mask": tokens["attention_mask"],
        "token_type_ids": tokens["token_type_ids"],
        "pixel_values": pixel_values_from_arrays(images),
        "labels": torch.tensor(split["label"]),
    }


TEXT_KEYS = ("input_ids", "attention_mask", "token_type_ids")


def batch_of(data: dict[str, torch.Tensor], rows: torch.Tensor, remove: str | None = None) -> dict[str, torch.Tensor]:
    """The model inputs of `rows`, with one modality removed ("image" or "text") or none."""
    batch = {k: v[rows] for k, v in data.items() if k != "labels"}
    if remove == "image":
        batch.pop("pixel_values")
    elif remove == "text":
        for key in TEXT_KEYS:
            batch.pop(key)
    return batch


def train_adapter(
    backbone, data: dict[str, torch.Tensor], settings: Settings, modality_dropout: float, num_labels: int
) -> tuple[torch.nn.Module, list[float]]:
    """An MITP adapter with stand-ins, trained with AdamW on `data` for `settings.steps` steps."""
    torch.manual_seed(settings.seed)
    task = peft_mitp.MITPForImageTextClassification.from_backbone(backbone, num_labels=num_labels)
    config = peft_mitp.MITPConfig(
        prompt_length=settings.prompt_length,
        num_interaction_layers=settings.num_interaction_layers,
        hub_dim=settings.hub_dim,
        missing_modality=True,
        modality_dropout=modality_dropout,
    )
    model = get_peft_model(task, config)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=settings.learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / settings.steps)
    generator = torch.Generator().manual_seed(settings.seed)
    n = data["labels"].shape[0]
    order = torch.randperm(n, generator=generator)
    cursor = 0
    model.train()
    losses = []
    for _ in range(settings.steps):
        if cursor + settings.batch_size > n:
            order, cursor = torch.randperm(n, generator=generator), 0
        rows = order[cursor : cursor + settings.batch_size]
        cursor += settings.batch_size
        loss = model(**batch_of(data, rows), labels=data["labels"][rows]).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    return model, losses


@torch.no_grad()
def accuracy(model, data: dict[str, torch.Tensor], remove: str | None, batch_size: int = 128) -> float:
    """Test accuracy with one modality removed from every sample ("image", "text") or none."""
    correct = 0
    n = data["labels"].shape[0]
    for start in range(0, n, batch_size):
        rows = torch.arange(start, min(start + batch_size, n))
        logits = model(**batch_of(data, rows, remove)).logits
        correct += (logits.argmax(-1) == data["labels"][rows]).sum().item()
    return correct / n


def majority(train_labels: torch.Tensor, test_labels: torch.Tensor) -> float:
    """Accuracy of always answering the most frequent training answer."""
    return (test_labels == train_labels.mode().values).float().mean().item()


def question_lookup(train, test) -> float:
    """Text-only reference: answer each test question with the most frequent training answer to the same text."""
    answers: dict[str, Counter] = defaultdict(Counter)
    for text, label in zip(train["text"], train["label"], strict=True):
        answers[text][label] += 1
    fallback = Counter(train["label"]).most_common(1)[0][0]
    hits = [
        (answers[text].most_common(1)[0][0] if text in answers else fallback) == label
        for text, label in zip(test["text"], test["label"], strict=True)
    ]
    return sum(hits) / len(hits)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"small run (2 to 3 minutes on 2 CPU cores): {QUICK}")
    for name, value in asdict(Settings()).items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        else:
            parser.add_argument(flag, type=type(value), default=None)
    parser.add_argument("--output", default="missing_modality_results.json", help="where to write the numbers")
    args = parser.parse_args()
    values = asdict(Settings())
    if args.quick:
        values.update(QUICK)
    values.update({k: v for k, v in vars(args).items() if k in values and v is not None})
    settings = Settings(**values)
    if settings.threads:
        # On a shared, busy machine one thread per process is much faster than several spinning ones.
        torch.set_num_threads(settings.threads)

    started = time.perf_counter()
    torch.manual_seed(settings.seed)
    data = load_easy_vqa(max_train=settings.max_train, max_test=settings.max_test, seed=settings.seed)
    label_names = data["train"].features["label"].names
    tokenizer = offline_processor().tokenizer
    train, test = encode(data["train"], tokenizer), encode(data["test"], tokenizer)
    backbone = build_offline_backbone(seed=0)
    print(f"data and backbone ready in {time.perf_counter() - started:.0f} s", flush=True)

    runs = {f"modality_dropout={settings.modality_dropout}": settings.modality_dropout}
    if settings.compare_without_dropout:
        runs["modality_dropout=0"] = 0.0
    results = {}
    for name, dropout in runs.items():
        t0 = time.perf_counter()
        model, losses = train_adapter(backbone, train, settings, dropout, len(label_names))
        train_seconds = time.perf_counter() - t0
        scores = {
            "full": accuracy(model, test, None),
            "image removed": accuracy(model, test, "image"),
            "text removed": accuracy(model, test, "text"),
        }
        results[name] = {**scores, "train_seconds": train_seconds, "losses": losses}
        print(f"{name}: {scores} (trained in {train_seconds:.0f} s)", flush=True)
        backbone = model.unload().backbone  # the same frozen backbone, prompts removed, for the next run

    report = {
        "settings": asdict(settings),
        "majority_class_test_accuracy": majority(train["labels"], test["labels"]),
        "question_lookup_test_accuracy": question_lookup(data["train"], data["test"]),
        "results": results,
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
        "total_seconds": time.perf_counter() - started,
    }
    with open(args.output, "w") as f:
        json.dump(report, f, indent=2)
    print()
    print(
        f"easy-VQA test subset of {settings.max_test}: majority class {report['majority_class_test_accuracy']:.1%}, "
        f"text-only question lookup {report['question_lookup_test_accuracy']:.1%}"
    )
    print("| adapter | full | image removed | text removed |")
    print("| --- | --- | --- | --- |")
    for name, scores in results.items():
        print(f"| {name} | {scores['full']:.1%} | {scores['image removed']:.1%} | {scores['text removed']:.1%} |")
    print(f"\ntotal {report['total_seconds']:.0f} s; numbers in {args.output}")


if __name__ == "__main__":
    main()
