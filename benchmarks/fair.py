"""A fair side-by-side run: every method's learning rate chosen on the validation split, three seeds, per question type.

Each method trains on the offline job's own splits (`peft_mitp.data.load_easy_vqa(max_train=8000, max_test=1000,
seed=0)`: 7,200 training, 800 validation, 1,000 test questions) with the shared loop of `benchmarks/harness.py` for the
same number of steps (default 225 = one epoch of batch 32, the budget of `mitp train`). For each method:

1. seed 0 is trained at every learning rate of the grid and scored on **validation**;
2. the rate with the best validation accuracy is kept, and seeds 1 and 2 are trained at it;
3. test accuracy (overall and per question type) is reported for the chosen rate only, mean and spread over seeds,
   with the wall-clock seconds of training, so methods compare at equal steps and at equal wall-clock.

Every run is appended to `<output>/runs.jsonl` as it finishes, so runs split over processes (`--methods`) land in one
file and `--report` rebuilds the table from it.

Run (two processes, one torch thread each, on a 2-core machine):

    python benchmarks/fair.py --methods mitp mitp-no-interaction mitp-no-memory &
    python benchmarks/fair.py --methods deep-prompt lora
    python benchmarks/fair.py --report

MITP variants (the design levers of docs/method.md) run the same way, each an `MITPConfig` change of the offline
job's adapter, at the job's learning rate unless `--lrs` says otherwise:

    python benchmarks/fair.py --output benchmarks/results/levers --seeds 0 \
        --variant all-layers:text_layers=0-5,vision_layers=0-5 --variant joint:consolidation=joint

The probes, which users run on cached features, have their own script: `benchmarks/probes.py`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import harness  # noqa: E402
from peft_mitp_cli.options import TrainOptions  # noqa: E402

LEARNING_RATES = {
    # MITP's grid moved down with the hub's read-out to the head (2026-12-02): 3e-2 destabilises the fusion MLP.
    "mitp": (1e-3, 3e-3, 1e-2),
    "mitp-no-interaction": (1e-3, 3e-3, 1e-2),
    "mitp-no-memory": (1e-3, 3e-3, 1e-2),
    "deep-prompt": (3e-3, 1e-2, 3e-2),
    "lora": (1e-3, 3e-3, 1e-2),
    "pmf": (1e-3, 3e-3, 1e-2),
    "early-fusion": (1e-3, 3e-3, 1e-2),
}
SEEDS = (0, 1, 2)
OUTPUT = Path(__file__).parent / "results" / "fair"
MITP_LR = TrainOptions().learning_rate  # the offline job's rate, for variants without --lrs


def load_splits(max_train: int, max_test: int) -> tuple[dict[str, harness.EncodedSplit], int]:
    """The offline job's train / validation / test splits, encoded once; and the number of answers."""
    from peft_mitp.data import get_label_names, load_easy_vqa
    from peft_mitp.offline_backbone import offline_processor

    data = load_easy_vqa(max_train=max_train, max_test=max_test, seed=0)
    processor = offline_processor()
    splits = {name: harness.encode_split(data[name], processor) for name in ("train", "validation", "test")}
    return splits, len(get_label_names(data))


VARIANTS: dict[str, dict[str, Any]] = {}


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    """`NAME:key=value,key=value` -> (NAME, changes of the offline job's MITP options); `a-b` is an int range."""
    name, _, spec = text.partition(":")
    changes: dict[str, Any] = {}
    for item in filter(None, spec.split(",")):
        key, _, value = item.partition("=")
        if "-" in value and value.replace("-", "").isdigit():
            low, high = (int(v) for v in value.split("-"))
            changes[key] = list(range(low, high + 1))
        else:
            changes[key] = json.loads(value) if value[:1].isdigit() or value in ("true", "false") else value
    return name, changes


def build(method: str, num_labels: int) -> tuple[Any, float | None]:
    """The model of a method or variant around a fresh offline backbone, and its backbone learning rate."""
    from benchmarks.methods import METHODS, build_mitp
    from peft_mitp.offline_backbone import build_offline_backbone

    if method in VARIANTS:
        return build_mitp(build_offline_backbone(), num_labels, **VARIANTS[method]), None
    spec = METHODS[method]
    return spec.build(build_offline_backbone(), num_labels), spec.backbone_learning_rate


def run_one(method: str, splits: dict[str, harness.EncodedSplit], num_labels: int, *, learning_rate: float,
            seed: int, steps: int) -> dict[str, Any]:
    """Train `method` once and score it on validation and test."""
    torch.manual_seed(seed)
    model, backbone_learning_rate = build(method, num_labels)
    trainable, _ = harness.trainable_parameters(model)
    started = time.perf_counter()
    harness.train(model, splits["train"], steps=steps, batch_size=32, learning_rate=learning_rate,
                  backbone_learning_rate=backbone_learning_rate, seed=seed)
    seconds = time.perf_counter() - started
    return {
        "method": method,
        "changes": VARIANTS.get(method, {}),
        "learning_rate": learning_rate,
        "seed": seed,
        "steps": steps,
        "trainable": trainable,
        "train_seconds": seconds,
        "validation": harness.evaluate(model, splits["validation"]),
        "test": harness.evaluate(model, splits["test"]),
    }


def step_timing(methods: list[str], *, repeats: int, threads: int, output: Path) -> dict[str, float]:
    """Seconds per unit of work of each method, timed in alternation in this one process (see the module docstring).

    Units: one training step of batch 32 for every method in `methods`; `probe-features` is the probe's one-off
    feature pass over 32 rows (frozen backbone, no autograd) and `probe-head-step` one step of the MLP probe's head on
    cached features. The ratios are what the equal-wall-clock table uses; absolute seconds depend on the machine.
    """
    from benchmarks.probes import make_head, pooled_features
    from peft_mitp.offline_backbone import build_offline_backbone

    with harness.torch_threads(threads):
        splits, num_labels = load_splits(800, 100)
        batch = splits["train"].batch(list(range(32)))
        fns, names = [], []
        for method in methods:
            model, backbone_lr = build(method, num_labels)
            optimizer = harness.make_optimizer(model, 1e-3, backbone_lr)
            model.train()
            fns.append(lambda model=model, optimizer=optimizer: harness.train_step(model, optimizer, batch))
            names.append(method)
        backbone = build_offline_backbone()
        rows = splits["train"].subset(32)
        fns.append(lambda: pooled_features(backbone, rows))
        names.append("probe-features")
        head = make_head("mlp", 768, num_labels)
        head_optimizer = torch.optim.AdamW(head.parameters(), lr=1e-3)
        features, labels = torch.randn(32, 768), batch["labels"]

        def head_step() -> None:
            torch.nn.functional.cross_entropy(head(features), labels).backward()
            head_optimizer.step()
            head_optimizer.zero_grad(set_to_none=True)

        fns.append(head_step)
        names.append("probe-head-step")
        seconds = dict(zip(names, harness.paired_median_seconds(fns, repeats=repeats), strict=True))
    output.mkdir(parents=True, exist_ok=True)
    (output / "timing.json").write_text(json.dumps({"machine": harness.machine_info(), "seconds": seconds}, indent=2))
    return seconds


def chosen_rate(runs: list[dict[str, Any]], method: str) -> float | None:
    """The learning rate whose seed-0 run scored best on validation (ties: the smaller rate)."""
    search = [r for r in runs if r["method"] == method and r["seed"] == SEEDS[0]]
    if not search:
        return None
    best = max(search, key=lambda r: (r["validation"]["accuracy"], -r["learning_rate"]))
    return best["learning_rate"]


def read_runs(output: Path) -> list[dict[str, Any]]:
    """Every run recorded so far."""
    path = output / "runs.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def run_methods(methods: list[str], *, steps: int, output: Path, max_train: int, max_test: int,
                threads: int, seeds: tuple[int, ...] = SEEDS, lrs: tuple[float, ...] | None = None) -> None:
    """Search each method's rate on validation (seed 0), then train the other seeds at the chosen rate."""
    output.mkdir(parents=True, exist_ok=True)
    with harness.torch_threads(threads):
        splits, num_labels = load_splits(max_train, max_test)
        for method in methods:
            done = {(r["learning_rate"], r["seed"]) for r in read_runs(output) if r["method"] == method and r["steps"] == steps}
            for lr in lrs or LEARNING_RATES.get(method, (MITP_LR,)):
                if (lr, SEEDS[0]) not in done:
                    record(output, run_one(method, splits, num_labels, learning_rate=lr, seed=SEEDS[0], steps=steps))
            lr = chosen_rate([r for r in read_runs(output) if r["steps"] == steps], method)
            for seed in seeds[1:]:
                if (lr, seed) not in done:
                    record(output, run_one(method, splits, num_labels, learning_rate=lr, seed=seed, steps=steps))


def record(output: Path, run: dict[str, Any]) -> None:
    """Append one run to runs.jsonl and say so."""
    with (output / "runs.jsonl").open("a") as f:
        f.write(json.dumps(run) + "\n")
    print(f"{run['method']} lr={run['learning_rate']:g} seed={run['seed']}: validation "
          f"{run['validation']['accuracy']:.4f}, test {run['test']['accuracy']:.4f} "
          f"({run['train_seconds']:.0f} s)", flush=True)


def report(output: Path) -> str:
    """The Markdown table of every method at its validation-chosen rate (see the module docstring)."""
    runs = read_runs(output)
    lines = [
        "| method | lr (chosen on validation) | validation | test accuracy | yes/no | color | shape | training s | seeds |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for method in dict.fromkeys(r["method"] for r in runs):
        lr = chosen_rate(runs, method)
        kept = [r for r in runs if r["method"] == method and r["learning_rate"] == lr]

        def cell(split: str, key: str, kept: list = kept) -> str:
            values = [r[split][key] for r in kept]
            return f"{statistics.fmean(values):.3f} ({min(values):.3f}-{max(values):.3f})"

        seconds = statistics.fmean(r["train_seconds"] for r in kept)
        lines.append(
            f"| {method} | {lr:g} | {cell('validation', 'accuracy')} | {cell('test', 'accuracy')} | "
            f"{cell('test', 'accuracy_yes/no')} | {cell('test', 'accuracy_color')} | {cell('test', 'accuracy_shape')} | "
            f"{seconds:.0f} | {len(kept)} |"
        )
    lines += ["", "Learning-rate search (seed 0, validation accuracy):", "",
              "| method | " + " | ".join(["lr", "validation", "test"]) + " |", "| --- | ---: | ---: | ---: |"]
    for r in runs:
        if r["seed"] == SEEDS[0]:
            lines.append(f"| {r['method']} | {r['learning_rate']:g} | {r['validation']['accuracy']:.4f} | "
                         f"{r['test']['accuracy']:.4f} |")
    text = "\n".join(lines) + "\n"
    (output / "report.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> None:
    """Command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", choices=list(LEARNING_RATES), default=None)
    parser.add_argument("--variant", action="append", default=[], metavar="NAME:key=value,...",
                        help="an MITP variant: the offline job's adapter with these MITPConfig changes")
    parser.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS),
                        help="seeds; the first one searches the rate (default 0 1 2)")
    parser.add_argument("--lrs", nargs="+", type=float, help="learning-rate grid for every method run")
    parser.add_argument("--steps", type=int, default=225, help="training steps of batch 32 (225 = one epoch)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of this process")
    parser.add_argument("--max-train", type=int, default=8000)
    parser.add_argument("--max-test", type=int, default=1000)
    parser.add_argument("--output", type=Path, default=OUTPUT)
    parser.add_argument("--report", action="store_true", help="only rebuild report.md from runs.jsonl")
    parser.add_argument("--timing", action="store_true",
                        help="only time a training step of each method and the probe's costs, in alternation")
    parser.add_argument("--repeats", type=int, default=20, help="timed rounds for --timing")
    args = parser.parse_args(argv)
    for text in args.variant:
        name, changes = parse_variant(text)
        VARIANTS[name] = changes
    methods = (args.methods or []) + list(VARIANTS) or list(LEARNING_RATES)
    if args.timing:
        print(json.dumps(step_timing(methods, repeats=args.repeats, threads=args.threads, output=args.output), indent=2))
        return
    if args.seeds[0] != SEEDS[0]:
        parser.error(f"the first seed searches the rate and must be {SEEDS[0]}")
    if not args.report:
        run_methods(methods, steps=args.steps, output=args.output, max_train=args.max_train,
                    max_test=args.max_test, threads=args.threads, seeds=tuple(args.seeds),
                    lrs=tuple(args.lrs) if args.lrs else None)
    print(report(args.output))


if __name__ == "__main__":
    main()
