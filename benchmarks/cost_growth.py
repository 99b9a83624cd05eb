"""How MITP's training cost grows, against full fine-tuning: step time and training memory against batch size, text
length and the number of interaction layers, on the offline backbone.

For each point a fresh model is built on a copy of the frozen offline backbone (`build_offline_backbone()`) and fed a
synthetic batch (random question tokens between [CLS] and [SEP], random 64 px images): MITP with the offline job's
defaults (`TrainOptions`: 3 interaction layers, 8 prompts, hub width 256) except where the sweep changes them, and
full fine-tuning (every weight trainable, same head). Measured per point:

- step time: median over `--repeats` training steps (forward, backward, clipping, AdamW step) after a warm-up step,
  MITP's and full fine-tuning's steps timed in alternation, so that load drifting on a shared machine hits both alike
  (full fine-tuning does not depend on the number of interaction layers: there it is re-measured as the reference);
- training memory: what training adds on top of the model's parameters, as tensor bytes: the AdamW state (measured
  after the warm-up step) plus the peak of the tensors one training step creates (activations kept for backward,
  temporaries, gradients), from `benchmarks.harness.TensorMemoryTracker`.

The frozen backbone's own parameters (same for both) are not counted. With more interaction layers MITP back-propagates
through more of each tower (from the first interaction layer up), which is where its memory grows.

Run from the repository root:

    python benchmarks/cost_growth.py --quick     # a couple of minutes on 2 cores
    python benchmarks/cost_growth.py             # the full sweep

It prints a Markdown table and writes it (`cost_growth.md`), the numbers (`cost_growth.json`) and a plot
(`cost_growth.png`) to `--output` (default `benchmarks/results`).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python benchmarks/cost_growth.py`
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from benchmarks import harness  # noqa: E402
from benchmarks.methods import METHODS, build_full_finetuning, build_mitp  # noqa: E402

NUM_LABELS = 13  # easy-VQA's answers
DEFAULTS = {"batch_size": 16, "text_length": 16, "interaction_layers": 3}
FULL = {"batch_size": [8, 16, 32, 64, 128], "text_length": [8, 16, 32, 64, 128], "interaction_layers": [1, 2, 3, 4, 5, 6]}
QUICK = {"batch_size": [8, 16, 32], "text_length": [8, 32], "interaction_layers": [1, 3, 6]}


def synthetic_batch(batch_size: int, text_length: int, image_size: int = 64, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random question tokens between [CLS] (101) and [SEP] (102), random images, random labels."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 30000, (batch_size, text_length), generator=generator)
    ids[:, 0], ids[:, -1] = 101, 102
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "token_type_ids": torch.zeros_like(ids),
        "pixel_values": torch.randn(batch_size, 3, image_size, image_size, generator=generator),
        "labels": torch.randint(0, NUM_LABELS, (batch_size,), generator=generator),
    }


def _prepare(model: nn.Module, learning_rate: float, backbone_lr: float | None, batch: dict) -> dict[str, Any]:
    """Warm a model up (one step creates the optimizer state) and measure its training memory on `batch`."""
    optimizer = harness.make_optimizer(model, learning_rate, backbone_lr)
    model.train()
    harness.train_step(model, optimizer, batch)
    state = sum(
        t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)
    )
    with harness.TensorMemoryTracker() as tracker:
        harness.train_step(model, optimizer, batch)
    return {
        "step": lambda: harness.train_step(model, optimizer, batch),
        "memory_mib": (state + tracker.peak_bytes) / 2**20,
        "optimizer_mib": state / 2**20,
        "step_tensors_mib": tracker.peak_bytes / 2**20,
    }


def measure_point(models: dict[str, tuple[nn.Module, float, float | None]], batch: dict, repeats: int) -> dict:
    """Training memory of each model, then their step times timed in alternation (medians).

    Args:
        models: name -> (model, learning rate, backbone learning rate or None).
        batch: the training batch.
        repeats: timed steps per model.

    Returns:
        name -> {"step_s", "memory_mib", "optimizer_mib", "step_tensors_mib"}.
    """
    prepared = {name: _prepare(model, lr, backbone_lr, batch) for name, (model, lr, backbone_lr) in models.items()}
    seconds = harness.paired_median_seconds([p.pop("step") for p in prepared.values()], repeats, warmup=0)
    return {name: {"step_s": s, **p} for (name, p), s in zip(prepared.items(), seconds, strict=True)}


def sweep(backbone: nn.Module, values: dict[str, list[int]], repeats: int) -> list[dict[str, Any]]:
    """Every point of every sweep, MITP and full fine-tuning timed in alternation at each point."""
    rows = []
    mitp, full = METHODS["mitp"], METHODS["full-ft"]
    for variable, points in values.items():
        for value in points:
            setting = {**DEFAULTS, variable: value}
            batch = synthetic_batch(setting["batch_size"], setting["text_length"])
            torch.manual_seed(0)
            models = {
                "mitp": (
                    build_mitp(copy.deepcopy(backbone), NUM_LABELS, num_interaction_layers=setting["interaction_layers"]),
                    mitp.learning_rate,
                    None,
                ),
                # full fine-tuning does not depend on the number of interaction layers; it is the reference each time
                "full-ft": (
                    build_full_finetuning(copy.deepcopy(backbone), NUM_LABELS),
                    full.learning_rate,
                    full.backbone_learning_rate,
                ),
            }
            for method, measured in measure_point(models, batch, repeats).items():
                rows.append({"variable": variable, "value": value, "method": method, **setting, **measured})
                print(rows[-1], flush=True)
            del models
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    """One table: per sweep point, MITP and full fine-tuning side by side, and their ratios."""
    lines = [
        "| sweep | value | MITP step (ms) | full FT step (ms) | MITP / full FT | MITP memory (MiB) | full FT memory (MiB) "
        "| MITP / full FT |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for variable in DEFAULTS:
        full_rows = [r for r in rows if r["variable"] == variable and r["method"] == "full-ft"]
        for row in (r for r in rows if r["variable"] == variable and r["method"] == "mitp"):
            full = next(f for f in full_rows if f["value"] == row["value"])
            lines.append(
                f"| {variable.replace('_', ' ')} | {row['value']} | {row['step_s'] * 1e3:.0f} | {full['step_s'] * 1e3:.0f} | "
                f"{row['step_s'] / full['step_s']:.2f}x | {row['memory_mib']:.0f} | {full['memory_mib']:.0f} | "
                f"{row['memory_mib'] / full['memory_mib']:.2f}x |"
            )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Step time (top) and training memory (bottom) against each swept variable, MITP and full fine-tuning."""
    from peft_mitp.plots import _pyplot

    plt = _pyplot()
    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    for col, variable in enumerate(DEFAULTS):
        for method, style in (("mitp", "o-"), ("full-ft", "s--")):
            points = sorted((r["value"], r) for r in rows if r["variable"] == variable and r["method"] == method)
            if not points:
                continue
            xs = [v for v, _ in points]
            axes[0][col].plot(xs, [r["step_s"] * 1e3 for _, r in points], style, label=method)
            axes[1][col].plot(xs, [r["memory_mib"] for _, r in points], style, label=method)
        axes[0][col].set_title(variable.replace("_", " "))
        axes[1][col].set_xlabel(variable.replace("_", " "))
        axes[0][col].set_ylabel("train step (ms)")
        axes[1][col].set_ylabel("training memory above the model (MiB)")
        for row in axes:
            if row[col].lines:
                row[col].legend(fontsize=8)
            if variable != "interaction_layers":
                row[col].set_xscale("log", base=2)
    fig.suptitle("MITP against full fine-tuning, offline backbone (2 CPU cores)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Parse arguments, run the sweeps and write the table, JSON and plot."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"fewer points: {QUICK}")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per point (default 5, quick 3)")
    parser.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    from peft_mitp.offline_backbone import build_offline_backbone

    with harness.torch_threads(args.threads):
        info = harness.machine_info()
        backbone = build_offline_backbone()
        rows = sweep(backbone, QUICK if args.quick else FULL, args.repeats or (3 if args.quick else 5))
        info_end = harness.machine_info()
    report = (
        f"Machine: {info['cpu']}, nproc {info['nproc']}, {info['torch_threads']} torch threads; load average at start "
        f"{'/'.join(f'{x:.2f}' for x in info['loadavg'])}, at end {'/'.join(f'{x:.2f}' for x in info_end['loadavg'])}; "
        f"torch {info['torch']}; {info['date']}. Defaults: {DEFAULTS}.\n\n" + markdown(rows)
    )
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "cost_growth.md").write_text(report)
    (args.output / "cost_growth.json").write_text(json.dumps({"machine": info, "loadavg_end": info_end["loadavg"],
                                                              "rows": rows}, indent=1))
    plot(rows, args.output / "cost_growth.png")
    print(report)
    return rows


if __name__ == "__main__":
    main()
