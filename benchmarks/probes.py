"""Probes as their users run them: heads trained on cached, standardised features of the frozen offline backbone.

A probe's user computes the frozen backbone's pooled features once, standardises them with the training split's mean
and standard deviation, and trains a small head on them for many cheap epochs. This script does exactly that on the
offline job's own splits (`peft_mitp.data.load_easy_vqa(max_train=8000, max_test=1000, seed=0)`: 7,200 training,
800 validation and 1,000 test questions) and chooses each head's learning rate and number of epochs on the
**validation** split only; test accuracy is read once, at the chosen setting, for every seed.

Heads: `linear` (one linear layer on the concatenated pooled text and image features) and `mlp` (the late-fusion MLP:
one hidden layer of 512 with GELU). AdamW without weight decay, batch 32, linear warm-up over 5% of the steps then
cosine decay (the offline job's schedule).

`--heads tokens` adds MITP's own read-out as a probe: the default adapter's memory hub (token consolidation in 8 heads
of width 512, fusion MLP of 256, `peft_mitp.hub.MemoryHub`) and a linear head, trained on the cached output tokens and
pooled features of the frozen towers: MITP without its prompts, run the way a probe's user runs it. Its inputs are not
standardised up front (the hub standardises them itself, as inside MITP).

Run:

    python benchmarks/probes.py                       # 3 seeds, full grid; writes benchmarks/results/probes/
    python benchmarks/probes.py --quick               # a smoke run on a few hundred rows

The report gives, per head, the chosen learning rate and epochs, test accuracy per question type (mean and spread over
seeds), and the wall-clock cost split into the one feature pass and the head's training, so that docs/benchmarks.md
can compare probes with MITP at equal wall-clock.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import harness  # noqa: E402
from peft_mitp_cli.options import TrainOptions  # noqa: E402

HEADS = ("linear", "mlp")
ALL_HEADS = (*HEADS, "tokens")
LEARNING_RATES = (1e-3, 3e-3, 1e-2)
EPOCHS = (1, 2, 5, 10, 20, 40, 80)
SEEDS = (0, 1, 2)
BATCH_SIZE = 32


@torch.no_grad()
def pooled_features(backbone: nn.Module, split: harness.EncodedSplit, batch_size: int = 256) -> torch.Tensor:
    """The frozen backbone's concatenated pooled (text, image) features of every row of `split`, in row order."""
    from benchmarks.baselines import DualEncoderClassifier

    model = DualEncoderClassifier(backbone, num_labels=1).eval()
    out = []
    for rows in torch.arange(len(split)).split(batch_size):
        batch = split.batch(rows)
        batch.pop("labels")
        text, image = model.pooled_features(**batch)
        out.append(torch.cat([text, image], dim=-1).float())
    return torch.cat(out)


class TokenFeatures:
    """Cached inputs of the `tokens` probe: raw pooled features and the towers' output tokens, per row.

    Rows index distinct texts and images (the towers run once per distinct text and image); `self[rows]` selects rows.
    """

    def __init__(self, pooled: torch.Tensor, text: torch.Tensor, mask: torch.Tensor, image: torch.Tensor,
                 text_index: torch.Tensor, image_index: torch.Tensor) -> None:
        self.pooled, self.text, self.mask, self.image = pooled, text, mask, image
        self.text_index, self.image_index = text_index, image_index

    def __len__(self) -> int:
        return len(self.pooled)

    def __getitem__(self, rows: torch.Tensor) -> TokenFeatures:
        return TokenFeatures(self.pooled[rows], self.text, self.mask, self.image, self.text_index[rows],
                             self.image_index[rows])


@torch.no_grad()
def token_features(backbone: nn.Module, split: harness.EncodedSplit, pooled: torch.Tensor) -> TokenFeatures:
    """The frozen towers' last-layer tokens of every distinct text and image of `split`, and the rows' pooled features."""
    texts = backbone.text_model(input_ids=split.input_ids, attention_mask=split.attention_mask,
                                token_type_ids=split.token_type_ids).last_hidden_state
    images = torch.cat([backbone.vision_model(pixel_values=split.pixel_values[rows]).last_hidden_state
                        for rows in torch.arange(len(split.pixel_values)).split(256)])
    return TokenFeatures(pooled, texts, split.attention_mask, images, split.text_index, split.image_index)


class TokenHead(nn.Module):
    """MITP's read-out on cached tokens: the default adapter's hub (token consolidation, fusion) and a linear head."""

    def __init__(self, width: int, feature_dim: int, num_labels: int) -> None:
        super().__init__()
        from benchmarks.baselines import init_linear
        from peft_mitp.config import DEFAULT_FUSION_HIDDEN_SIZE
        from peft_mitp.hub import MemoryHub

        config = TrainOptions().mitp_config()
        self.hub = MemoryHub(width, width, hub_dim=config.hub_dim, interaction=False, memory=False,
                             token_heads=config.token_heads, fusion_hidden_size=DEFAULT_FUSION_HIDDEN_SIZE,
                             feature_dim=feature_dim)
        self.out = init_linear(nn.Linear(feature_dim, num_labels))

    def forward(self, x: TokenFeatures) -> torch.Tensor:
        mask = x.mask[x.text_index]
        scores = self.hub.consolidate_tokens(x.text[x.text_index], mask, x.image[x.image_index], None)
        return self.out(self.hub.readout(x.pooled, scores))


def make_head(kind: str, in_features: int, num_labels: int, hidden_size: int = 512) -> nn.Module:
    """A `linear` head or the late-fusion `mlp` head (one GELU hidden layer), initialised as the job's heads are."""
    from benchmarks.baselines import init_linear

    if kind == "linear":
        return init_linear(nn.Linear(in_features, num_labels))
    if kind == "mlp":
        return nn.Sequential(nn.Linear(in_features, hidden_size), nn.GELU(), init_linear(nn.Linear(hidden_size, num_labels)))
    raise ValueError(f"Unknown head {kind!r}; choose one of {HEADS}.")


def train_head(
    kind: str,
    features: torch.Tensor,
    labels: torch.Tensor,
    num_labels: int,
    *,
    learning_rate: float,
    epochs: int,
    seed: int,
) -> tuple[nn.Module, float]:
    """Train a head on (standardised) features; returns the head and its training time in seconds."""
    from transformers import get_cosine_schedule_with_warmup

    torch.manual_seed(seed)
    if kind == "tokens":
        head = TokenHead(features.text.shape[-1], features.pooled.shape[1], num_labels).train()
    else:
        head = make_head(kind, features.shape[1], num_labels)
    optimizer = torch.optim.AdamW(head.parameters(), lr=learning_rate, weight_decay=0.0)
    steps = epochs * math.ceil(len(labels) / BATCH_SIZE)
    schedule = get_cosine_schedule_with_warmup(optimizer, math.ceil(0.05 * steps), steps)
    order = harness.batch_order(len(labels), BATCH_SIZE, seed)
    started = time.perf_counter()
    for _ in range(steps):
        rows = next(order)
        loss = nn.functional.cross_entropy(head(features[rows]), labels[rows])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
    return head.eval(), time.perf_counter() - started


@torch.no_grad()
def accuracy(head: nn.Module, features: torch.Tensor, labels: torch.Tensor, groups: list[str]) -> dict[str, float]:
    """Overall and per-group accuracy, keyed as `harness.evaluate` keys them."""
    correct = (head(features).argmax(-1) == labels).float()
    metrics = {"accuracy": float(correct.mean())}
    for group in sorted(set(groups)):
        mask = torch.tensor([g == group for g in groups])
        metrics[f"accuracy_{group}"] = float(correct[mask].mean())
    return metrics


def run(
    *,
    max_train: int = 8000,
    max_test: int = 1000,
    heads: tuple[str, ...] = HEADS,
    learning_rates: tuple[float, ...] = LEARNING_RATES,
    epochs: tuple[int, ...] = EPOCHS,
    seeds: tuple[int, ...] = SEEDS,
    threads: int | None = 1,
) -> dict[str, Any]:
    """The whole probe benchmark; returns the report as a dict (see the module docstring)."""
    from peft_mitp.data import get_label_names, load_easy_vqa
    from peft_mitp.offline_backbone import build_offline_backbone, offline_processor

    with harness.torch_threads(threads):
        data = load_easy_vqa(max_train=max_train, max_test=max_test, seed=0)
        processor = offline_processor()
        splits = {name: harness.encode_split(data[name], processor) for name in ("train", "validation", "test")}
        num_labels = len(get_label_names(data))
        backbone = build_offline_backbone()
        started = time.perf_counter()
        raw = {name: pooled_features(backbone, split) for name, split in splits.items()}
        feature_seconds = time.perf_counter() - started
        train_feature_seconds = feature_seconds * len(splits["train"]) / sum(len(s) for s in splits.values())
        mean, std = raw["train"].mean(0), raw["train"].std(0).clamp_min(1e-6)
        standardised = {name: (f - mean) / std for name, f in raw.items()}
        tokens = {}
        if "tokens" in heads:
            tokens = {name: token_features(backbone, split, raw[name]) for name, split in splits.items()}
        labels = {name: split.labels for name, split in splits.items()}

        report: dict[str, Any] = {
            "machine": harness.machine_info(),
            "rows": {name: len(split) for name, split in splits.items()},
            "feature_seconds_all_splits": round(feature_seconds, 2),
            "feature_seconds_train": round(train_feature_seconds, 2),
            "grid": {"learning_rates": list(learning_rates), "epochs": list(epochs), "seeds": list(seeds)},
            "heads": {},
        }
        for kind in heads:
            features = tokens if kind == "tokens" else standardised
            search = []
            for lr in learning_rates:
                for n in epochs:
                    head, _ = train_head(kind, features["train"], labels["train"], num_labels,
                                         learning_rate=lr, epochs=n, seed=seeds[0])
                    val = accuracy(head, features["validation"], labels["validation"], splits["validation"].groups)
                    search.append({"learning_rate": lr, "epochs": n, "validation": val["accuracy"]})
            best = max(search, key=lambda r: (r["validation"], -r["epochs"]))
            per_epochs = {}
            for n in epochs:  # test accuracy at every epoch count, each at its own best validation rate
                rows = [r for r in search if r["epochs"] == n]
                per_epochs[n] = max(rows, key=lambda r: r["validation"])["learning_rate"]
            results = {}
            for n in sorted({best["epochs"], *epochs}):
                lr = per_epochs[n]
                runs = []
                for seed in seeds:
                    head, seconds = train_head(kind, features["train"], labels["train"], num_labels,
                                               learning_rate=lr, epochs=n, seed=seed)
                    test = accuracy(head, features["test"], labels["test"], splits["test"].groups)
                    runs.append({"seed": seed, "head_seconds": seconds, **test})
                results[n] = {"learning_rate": lr, "runs": runs, "summary": summarise(runs)}
            report["heads"][kind] = {"search": search, "chosen": best, "by_epochs": results}
    return report


def summarise(runs: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Mean, min and max over seeds of every numeric field but `seed`."""
    keys = [k for k in runs[0] if k != "seed"]
    return {
        k: {"mean": statistics.fmean(r[k] for r in runs), "min": min(r[k] for r in runs), "max": max(r[k] for r in runs)}
        for k in keys
    }


def markdown(report: dict[str, Any]) -> str:
    """The report as a Markdown table: one row per head and epoch count, the validation-chosen one marked."""
    lines = [
        f"Feature pass (frozen offline backbone, all {sum(report['rows'].values())} rows): "
        f"{report['feature_seconds_all_splits']:.1f} s; training split only: {report['feature_seconds_train']:.1f} s.",
        "",
        "| head | epochs | lr (chosen on validation) | head training (s) | test accuracy | yes/no | color | shape |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for kind, result in report["heads"].items():
        chosen = result["chosen"]["epochs"]
        for n, row in sorted(result["by_epochs"].items(), key=lambda kv: int(kv[0])):
            s = row["summary"]
            mark = " (chosen)" if int(n) == chosen else ""

            def cell(key: str, s: dict = s) -> str:
                v = s.get(key)
                return "" if v is None else f"{v['mean']:.3f} ({v['min']:.3f}-{v['max']:.3f})"

            lines.append(
                f"| {kind} | {n}{mark} | {row['learning_rate']:g} | {s['head_seconds']['mean']:.1f} | "
                f"{cell('accuracy')} | {cell('accuracy_yes/no')} | {cell('accuracy_color')} | {cell('accuracy_shape')} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Command line: run the probe benchmark and write `report.md` and `results.json`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: 400 training rows, 1 seed, 2 epoch counts")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--heads", nargs="+", choices=ALL_HEADS, default=list(HEADS), help="heads to run")
    parser.add_argument("--epochs", nargs="+", type=int, default=list(EPOCHS), help="epoch counts of the grid")
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "probes")
    args = parser.parse_args(argv)
    if args.quick:
        report = run(max_train=400, max_test=200, heads=tuple(args.heads), learning_rates=(1e-2,), epochs=(1, 2),
                     seeds=(0,), threads=args.threads)
    else:
        report = run(heads=tuple(args.heads), epochs=tuple(args.epochs), threads=args.threads)
    harness.write_report(args.output, report, markdown(report))
    return report


if __name__ == "__main__":
    main()
