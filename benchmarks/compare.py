"""MITP side by side with the methods users would pick instead, on one frozen backbone and one data set.

Trains and evaluates, on identical data (easy-VQA), backbone (the offline MiniLM + EfficientNet-Lite0 dual encoder),
batch size, step budgets, schedule and seeds, every method of `benchmarks/methods.py`: MITP with the offline job's
defaults, its ablations (interaction off, memory off, cosine and dot similarity), deep prompt tuning without
interaction, a linear probe, a late-fusion MLP probe, PMF, LoRA on both towers, PromptFuse-style early fusion and full
fine-tuning. For each it reports trainable parameters, test accuracy (overall and per question type) at every step
budget, training step time, inference time per sample, and peak training memory, each also as a ratio to MITP; the
frozen backbone alone is timed as the inference reference.

Each method runs in a fresh Python process, one after the other (so that its memory peak is its own and a failure
stays contained); the parent process encodes the data and builds the backbone once and hands both over as files.

Run from the repository root:

    python benchmarks/compare.py --quick        # a few minutes on an idle 2-core machine: small subsets, few steps
    python benchmarks/compare.py                # the full comparison (hours on 2 cores; see docs/benchmarks.md)
    python benchmarks/compare.py --quick --methods mitp linear-probe full-ft

It prints Markdown tables and writes them, the raw numbers (JSON) and an accuracy-against-budget plot (PNG) to
`--output` (default `benchmarks/results/compare-quick` or `.../compare-full`).
"""

from __future__ import annotations

import argparse
import ast
import copy
import dataclasses
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python benchmarks/compare.py`
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from benchmarks import harness  # noqa: E402
from benchmarks.methods import METHODS  # noqa: E402

REFERENCE = "backbone"  # the frozen backbone alone: inference reference
GROUPS = ("yes/no", "color", "shape")


@dataclass
class Settings:
    """One benchmark configuration (the command-line flags; `--quick` and the default are presets)."""

    max_train: int | None = None
    max_test: int | None = 2000
    budgets: list[int] = field(default_factory=lambda: [100, 500])
    batch_size: int = 64
    seeds: list[int] = field(default_factory=lambda: [0])
    repeats: int = 10
    memory_steps: int = 3
    threads: int = os.cpu_count() or 2
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    data_seed: int = 0
    learning_rates: dict[str, float] = field(default_factory=dict)
    mitp_options: dict[str, Any] = field(default_factory=dict)


def resolve_method(name: str, settings: Settings) -> Any:
    """`METHODS[name]` with the settings' overrides: a learning rate, and for "mitp" changed `TrainOptions` fields."""
    from benchmarks.methods import build_mitp

    method = METHODS[name]
    if name == "mitp" and settings.mitp_options:
        options = dict(settings.mitp_options)
        learning_rate = options.pop("learning_rate", method.learning_rate)
        method = dataclasses.replace(
            method,
            description=f"{method.description}, with {settings.mitp_options}",
            build=lambda b, n: build_mitp(b, n, **options),
            learning_rate=learning_rate,
        )
    if name in settings.learning_rates:
        method = dataclasses.replace(method, learning_rate=settings.learning_rates[name])
    return method


QUICK = {"max_train": 2000, "max_test": 300, "budgets": [15, 45], "batch_size": 16, "repeats": 5}


# ------------------------------------------------------------------------------------------------------------- worker
def _measure_backbone(backbone: torch.nn.Module, inputs: dict[str, torch.Tensor], repeats: int) -> dict[str, Any]:
    """Inference time of the frozen backbone alone: both towers' stock feature functions, no head."""
    from benchmarks.baselines import split_inputs
    from peft_mitp.families import family_for

    family = family_for(backbone.config.model_type)
    text, vision = split_inputs(family, inputs)

    def forward() -> None:
        getattr(backbone, family.text_features)(**text)
        getattr(backbone, family.image_features)(**vision)

    with torch.no_grad():
        seconds = harness.median_seconds(forward, repeats)
    return {"trainable": 0, "total": harness.trainable_parameters(backbone)[1],
            "inference_s_per_sample": seconds / len(inputs["input_ids"])}


def _measure_costs(model: torch.nn.Module, method: Any, batch: dict[str, torch.Tensor], settings: Settings) -> dict:
    """Parameters, memory (read first), autograd layers, step time and inference time of a freshly built model."""
    trainable, total = harness.trainable_parameters(model)
    optimizer = harness.make_optimizer(model, method.learning_rate, method.backbone_learning_rate)
    inputs = {k: v for k, v in batch.items() if k != "labels"}

    def step() -> None:
        harness.train_step(model, optimizer, batch)

    model.train()
    row: dict[str, Any] = {"trainable": trainable, "total": total}
    row["memory"] = harness.measure_peak_rss(lambda: [step() for _ in range(settings.memory_steps)])
    row["memory_breakdown"] = harness.profile_step_memory(step)
    row["autograd_layers"] = harness.autograd_layers(model, batch)
    model.train()
    row["step_s"] = harness.median_seconds(step, settings.repeats)
    model.eval()
    with torch.no_grad():
        row["inference_s_per_sample"] = harness.median_seconds(lambda: model(**inputs), settings.repeats) / len(
            inputs["input_ids"]
        )
    config = getattr(model, "peft_config", {}).get("default")
    if hasattr(config, "text_layers"):
        row["interaction_layers"] = {"text": config.text_layers, "vision": config.vision_layers}
    return row


def _paired_references(
    model: torch.nn.Module,
    method: Any,
    batch: dict[str, torch.Tensor],
    backbone_file: Path,
    num_labels: int,
    settings: Settings,
    with_full_finetuning: bool,
) -> dict[str, float]:
    """The ratios the targets are about, timed in alternation in this process (steady under a drifting load).

    Inference of `model` against the frozen backbone alone (a fresh copy); with `with_full_finetuning`, also the
    training step of `model` against a full fine-tuning model built on another fresh copy.
    """
    from benchmarks.baselines import split_inputs
    from peft_mitp.families import family_for

    inputs = {k: v for k, v in batch.items() if k != "labels"}
    backbone = torch.load(backbone_file, weights_only=False)
    family = family_for(backbone.config.model_type)
    text, vision = split_inputs(family, inputs)

    def backbone_forward() -> None:
        getattr(backbone, family.text_features)(**text)
        getattr(backbone, family.image_features)(**vision)

    model.eval()
    with torch.no_grad():
        own, reference = harness.paired_median_seconds(
            [lambda: model(**inputs), backbone_forward], settings.repeats
        )
    out = {"inference_vs_backbone": own / reference}
    # Compute against time: a FLOP ratio well below the time ratio points at overhead outside the matrix products.
    with torch.no_grad(), FlopCounterMode(display=False) as own_flops:
        model(**inputs)
    with torch.no_grad(), FlopCounterMode(display=False) as reference_flops:
        backbone_forward()
    out["inference_flops_vs_backbone"] = own_flops.get_total_flops() / reference_flops.get_total_flops()
    if with_full_finetuning:
        full_method = METHODS["full-ft"]
        full = full_method.build(backbone, num_labels)
        optimizers = [
            harness.make_optimizer(model, method.learning_rate, method.backbone_learning_rate),
            harness.make_optimizer(full, full_method.learning_rate, full_method.backbone_learning_rate),
        ]
        model.train()
        full.train()
        own, reference = harness.paired_median_seconds(
            [lambda: harness.train_step(model, optimizers[0], batch), lambda: harness.train_step(full, optimizers[1], batch)],
            settings.repeats,
        )
        out["step_vs_full_finetuning"] = own / reference
    return out


def run_method(name: str, settings: Settings, data: dict[str, Any], backbone_file: Path) -> dict[str, Any]:
    """Everything measured for one method (call it in a fresh process: the memory peak is read first thing).

    Args:
        name: a key of `METHODS`, or "backbone" for the frozen backbone's inference time alone.
        settings: the benchmark configuration.
        data: {"splits": {"train", "test"}: EncodedSplit, "labels": [...]}.
        backbone_file: the frozen backbone, saved with `torch.save`.

    Returns:
        The method's row: parameters, memory, times, and per budget and seed the test metrics.
    """
    train, test = data["splits"]["train"], data["splits"]["test"]
    num_labels = len(data["labels"])
    batch = train.batch(next(harness.batch_order(len(train), settings.batch_size, settings.seeds[0])))
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if name == REFERENCE:
        return _measure_backbone(torch.load(backbone_file, weights_only=False), inputs, settings.repeats)
    method = resolve_method(name, settings)
    torch.manual_seed(settings.seeds[0])
    model = method.build(torch.load(backbone_file, weights_only=False), num_labels)
    row = _measure_costs(model, method, batch, settings)
    row["paired"] = _paired_references(
        model, method, batch, backbone_file, num_labels, settings, with_full_finetuning=name == "mitp"
    )
    del model
    gc.collect()
    row["runs"] = []
    for seed in settings.seeds:
        for steps in settings.budgets:
            torch.manual_seed(seed)
            model = method.build(torch.load(backbone_file, weights_only=False), num_labels)
            start = time.perf_counter()
            losses = harness.train(
                model,
                train,
                steps=steps,
                batch_size=settings.batch_size,
                learning_rate=method.learning_rate,
                backbone_learning_rate=method.backbone_learning_rate,
                seed=seed,
            )
            train_s = time.perf_counter() - start
            metrics = harness.evaluate(model, test)
            tail = losses[-max(1, len(losses) // 10) :]
            row["runs"].append(
                {"seed": seed, "steps": steps, "train_s": train_s, "final_loss": sum(tail) / len(tail), **metrics}
            )
            del model
    return row


def _worker_main(name: str, workdir: Path) -> None:
    settings = Settings(**json.loads((workdir / "settings.json").read_text()))
    torch.set_num_threads(settings.threads)
    data = torch.load(workdir / "data.pt", weights_only=False)
    row = run_method(name, settings, data, workdir / "backbone.pt")
    (workdir / f"result-{name}.json").write_text(json.dumps(row))


# ------------------------------------------------------------------------------------------------------------- parent
def prepare(settings: Settings, workdir: Path) -> dict[str, Any]:
    """Encode the data and build the backbone once, into `workdir`; returns a description of the data."""
    from peft_mitp.offline_backbone import build_offline_backbone

    splits, labels = harness.load_encoded_easy_vqa(settings.max_train, settings.max_test, settings.data_seed)
    torch.save({"splits": splits, "labels": labels}, workdir / "data.pt")
    torch.save(build_offline_backbone(), workdir / "backbone.pt")
    (workdir / "settings.json").write_text(json.dumps(dataclasses.asdict(settings)))
    test = splits["test"]
    return {
        "train_rows": len(splits["train"]),
        "test_rows": len(test),
        "test_rows_per_type": {g: test.groups.count(g) for g in GROUPS},
        "majority_test_accuracy": float((test.labels == torch.mode(splits["train"].labels).values).float().mean()),
        "question_prior": harness.question_prior(splits["train"], test),
        "labels": labels,
    }


def run_all(settings: Settings) -> dict[str, Any]:
    """Run every method in its own process, one after the other; returns the raw results."""
    started = time.time()
    info = harness.machine_info()
    with tempfile.TemporaryDirectory(prefix="mitp-compare-") as tmp:
        workdir = Path(tmp)
        data_info = prepare(settings, workdir)
        rows: dict[str, Any] = {}
        loads: dict[str, Any] = {}
        for name in [REFERENCE, *settings.methods]:
            loads[name] = os.getloadavg()
            t0 = time.time()
            proc = subprocess.run(
                [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--workdir", str(workdir)],
                capture_output=True,
                text=True,
                env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
            )
            if proc.returncode != 0:
                rows[name] = {"error": proc.stderr[-3000:]}
                print(f"[{name}] FAILED:\n{proc.stderr[-3000:]}", file=sys.stderr, flush=True)
                continue
            rows[name] = json.loads((workdir / f"result-{name}.json").read_text())
            print(f"[{name}] done in {time.time() - t0:.0f}s (load average {loads[name][0]:.2f})", flush=True)
    info_end = harness.machine_info()
    return {
        "settings": dataclasses.asdict(settings),
        "data": data_info,
        "machine": info,
        "loadavg_end": info_end["loadavg"],
        "loadavg_per_method": loads,
        "wall_s": time.time() - started,
        "rows": rows,
    }


def merge(runs: list[dict[str, Any]], take: list[list[str] | None] | None = None) -> dict[str, Any]:
    """One report from several runs of the same command with different `--methods` (e.g. split over two cores).

    Training is deterministic for a given seed and data, so a method that ran in several runs must have the same
    accuracies in each: that is checked (it proves the runs are the same setting), and a mismatch is an error. Each
    method keeps its row from the first run it appears in; MITP's comes from the first run. Times and memory of methods
    from different runs were measured in different processes at different times (the alternating columns are always
    within one process); the report says which run each method came from.

    Args:
        runs: the results of `run_all` (results.json), in order of preference.
        take: per run, the methods to use from it (None: all); a method left out of a run is neither used nor
            checked there (e.g. a row made before a change to that method's code).

    Raises:
        ValueError: the runs differ in anything but `methods`, or a method's accuracies differ between runs.
    """
    if not runs:
        raise ValueError("Nothing to merge: give at least one results.json.")
    take = take or [None] * len(runs)
    if len(take) != len(runs):
        raise ValueError(f"`take` names methods for {len(take)} runs but {len(runs)} runs were given.")
    left_out = [
        sorted(set(run["rows"]) - set(names) - {REFERENCE}) if names else []
        for run, names in zip(runs, take, strict=True)
    ]
    runs = [
        run if names is None else {**run, "rows": {n: r for n, r in run["rows"].items() if n in names or n == REFERENCE}}
        for run, names in zip(runs, take, strict=True)
    ]
    for run, names in zip(runs, take, strict=True):
        missing = sorted(set(names or ()) - set(run["rows"]))
        if missing:
            raise ValueError(f"Asked to take {missing} from a run that has only {sorted(run['rows'])}.")
    first = runs[0]

    def setting(run: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in run["settings"].items() if k != "methods"}

    for index, run in enumerate(runs[1:], start=2):
        if setting(run) != setting(first) or run["data"] != first["data"]:
            raise ValueError(
                f"Run {index} was made with other settings or data than run 1 ({setting(run)} vs {setting(first)}); "
                "only runs of the same command with different --methods can be merged."
            )
    rows: dict[str, Any] = {}
    sources: dict[str, int] = {}
    for index, run in enumerate(runs, start=1):
        for name, row in run["rows"].items():
            if name not in rows:
                rows[name], sources[name] = row, index
                continue
            if name == REFERENCE or "error" in row or "error" in rows[name]:
                continue
            accuracies = [{k: v for k, v in r.items() if k != "train_s"} for r in row["runs"]]
            kept = [{k: v for k, v in r.items() if k != "train_s"} for r in rows[name]["runs"]]
            if accuracies != kept:
                raise ValueError(
                    f"{name} trained to different results in run {sources[name]} and run {index}: the runs are not "
                    "the same setting (or training is not deterministic here), so they cannot be merged."
                )
    methods = [name for name in rows if name != REFERENCE]
    return {
        **first,
        "settings": {**first["settings"], "methods": methods},
        "rows": rows,
        "loadavg_end": runs[-1]["loadavg_end"],
        "wall_s": sum(run["wall_s"] for run in runs),
        "merged_from": [
            {
                "date": run["machine"]["date"],
                "loadavg": run["machine"]["loadavg"],
                "wall_s": run["wall_s"],
                "methods": [n for n in run["rows"] if sources.get(n) == index],
                "also_ran": [n for n in run["rows"] if n != REFERENCE and sources.get(n) != index],
                "left_out": left_out[index - 1],
            }
            for index, run in enumerate(runs, start=1)
        ],
    }


# -------------------------------------------------------------------------------------------------------------- report
def _median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarise(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per method: medians over seeds of the metrics at each budget, plus the cost numbers."""
    settings = results["settings"]
    out = {}
    for name, row in results["rows"].items():
        if "error" in row:
            out[name] = {"error": True}
            continue
        summary = {k: row.get(k) for k in ("trainable", "total", "step_s", "inference_s_per_sample")}
        summary["peak_mib"] = row.get("memory", {}).get("peak_mib")
        summary["profiler_peak_mib"] = row.get("memory_breakdown", {}).get("step_peak_mib")
        summary["breakdown"] = row.get("memory_breakdown", {})
        summary["autograd_layers"] = row.get("autograd_layers")
        summary["interaction_layers"] = row.get("interaction_layers")
        summary["paired"] = row.get("paired", {})
        budgets = {}
        for steps in settings["budgets"]:
            runs = [r for r in row.get("runs", []) if r["steps"] == steps]
            if runs:
                keys = [k for k in runs[0] if k.startswith("accuracy") or k in ("train_s", "final_loss")]
                budgets[steps] = {k: _median([r[k] for r in runs]) for k in keys}
        summary["budgets"] = budgets
        out[name] = summary
    return out


def _ratio(value: float | None, reference: float | None) -> str:
    if value is None or not reference:
        return "–"
    return f"{value / reference:.2f}x"


def _layers(layers: dict[str, list[int]] | None) -> str:
    if not layers:
        return "–"

    def span(indices: list[int]) -> str:
        if not indices:
            return "none"
        return f"{indices[0]}-{indices[-1]}" if indices == list(range(indices[0], indices[-1] + 1)) else str(indices)

    return f"text {span(layers['text'])}, vision {span(layers['vision'])}"


def _backbone_ratio(summary: dict[str, Any], reference: dict[str, Any]) -> str:
    """Inference time against the frozen backbone: the alternating measurement when there is one."""
    paired = (summary.get("paired") or {}).get("inference_vs_backbone")
    if paired is not None:
        return f"{paired:.2f}x"
    sequential = _ratio(summary.get("inference_s_per_sample"), reference.get("inference_s_per_sample"))
    return sequential if sequential == "–" else sequential + " (seq.)"


def _merged_lines(results: dict[str, Any]) -> list[str]:
    """For a merged report (`merge`): which run each method comes from."""
    runs = results.get("merged_from")
    if not runs:
        return []
    lines = [
        "",
        f"Merged from {len(runs)} runs of the same command with different `--methods` (each method's accuracies are "
        "identical in every run it ran in, which `merge` checks); time and memory ratios between methods of different "
        "runs compare processes run at different times, the alternating columns are always within one process:",
        "",
    ]
    for index, run in enumerate(runs, start=1):
        also = f" (also ran, same accuracies: {', '.join(run['also_ran'])})" if run["also_ran"] else ""
        if run.get("left_out"):
            also += f" (left out: {', '.join(run['left_out'])})"
        lines.append(
            f"- run {index}: {run['date']}, load average at start {run['loadavg'][0]:.2f}, "
            f"{run['wall_s'] / 60:.1f} min: {', '.join(run['methods']) or 'nothing new'}{also}"
        )
    return lines


def _epochs(steps: int, settings: dict[str, Any], data: dict[str, Any]) -> str:
    """A step budget in passes over the training rows."""
    return f"{steps * settings['batch_size'] / data['train_rows']:.2g}"


def _flops_ratio(summary: dict[str, Any]) -> str:
    """Inference FLOPs (matrix products, attention, convolutions) against the frozen backbone's, on the timed batch."""
    ratio = (summary.get("paired") or {}).get("inference_flops_vs_backbone")
    return "–" if ratio is None else f"{ratio:.2f}x"


def targets(summary: dict[str, dict[str, Any]], budgets: list[int]) -> list[tuple[str, str, bool | None]]:
    """The issue's targets for MITP: (target, measured, met) — met is None when it could not be measured."""
    mitp, full, ref = summary.get("mitp", {}), summary.get("full-ft", {}), summary.get(REFERENCE, {})
    out: list[tuple[str, str, bool | None]] = []

    def ratio_target(label: str, key: str, other: dict, limit: float) -> None:
        a, b = mitp.get(key), other.get(key)
        if a is None or not b:
            out.append((label, "not measured", None))
            return
        out.append((label, f"{a / b:.2f}x ({a:.4g} vs {b:.4g})", a / b <= limit))

    ratio_target("peak training memory <= 0.4x full fine-tuning (RSS above the built model)", "peak_mib", full, 0.4)
    ratio_target("peak training memory <= 0.4x full fine-tuning (profiler, tensors)", "profiler_peak_mib", full, 0.4)
    ratio_target("training step time <= 0.5x full fine-tuning (one after the other)", "step_s", full, 0.5)
    paired = mitp.get("paired", {})
    if "step_vs_full_finetuning" in paired:
        ratio = paired["step_vs_full_finetuning"]
        out.append(("training step time <= 0.5x full fine-tuning (timed in alternation)", f"{ratio:.2f}x", ratio <= 0.5))
    ratio_target("inference time <= 1.15x the frozen backbone alone (one after the other)", "inference_s_per_sample",
                 ref, 1.15)
    if "inference_vs_backbone" in paired:
        ratio = paired["inference_vs_backbone"]
        out.append(("inference time <= 1.15x the frozen backbone alone (timed in alternation)", f"{ratio:.2f}x",
                    ratio <= 1.15))
    for steps in budgets:
        own = mitp.get("budgets", {}).get(steps, {}).get("accuracy")
        if own is None:
            out.append((f"accuracy >= every baseline but full FT at {steps} steps", "not measured", None))
            continue
        above = {
            name: s["budgets"][steps]["accuracy"]
            for name, s in summary.items()
            if name not in ("mitp", "full-ft", REFERENCE)
            and not s.get("error")
            and steps in s.get("budgets", {})
            and s["budgets"][steps]["accuracy"] > own
        }
        # MITP's own ablations are not baselines: they are named, but they do not decide the target.
        better = sorted(f"{n} {a:.3f}" for n, a in above.items() if n not in METHODS or METHODS[n].group != "ablation")
        ablations = sorted(f"{n} {a:.3f}" for n, a in above.items() if n in METHODS and METHODS[n].group == "ablation")
        measured = f"MITP {own:.3f}; " + ("baselines above: " + ", ".join(better) if better else "no baseline above it")
        if ablations:
            measured += "; ablations above: " + ", ".join(ablations)
        out.append((f"accuracy >= every baseline but full FT at {steps} steps", measured, not better))
    layers, pairs = mitp.get("autograd_layers"), mitp.get("interaction_layers")
    if layers and pairs:
        ok = all(not layers[k] or min(layers[k]) >= pairs[k][0] for k in ("text", "vision"))
        out.append(
            (
                "no gradient below the first interaction layer",
                f"layers with autograd: {_layers(layers)}; first interaction layers: text {pairs['text'][0]}, "
                f"vision {pairs['vision'][0]}",
                ok,
            )
        )
    return out


def markdown(results: dict[str, Any]) -> str:
    """The report: settings, machine, and the tables."""
    settings, data, machine = results["settings"], results["data"], results["machine"]
    summary = summarise(results)
    budgets = settings["budgets"]
    longest = max(budgets)
    mitp = summary.get("mitp", {})
    ref = summary.get(REFERENCE, {})
    lines = [
        f"Data: easy-VQA, {data['train_rows']} training rows, {data['test_rows']} test rows "
        f"({', '.join(f'{g}: {n}' for g, n in data['test_rows_per_type'].items())}); majority-class test accuracy "
        f"{data['majority_test_accuracy']:.3f}. Batch size {settings['batch_size']}, budgets {budgets} steps, "
        f"seeds {settings['seeds']}, timing medians over {settings['repeats']} repeats, {settings['threads']} torch "
        "threads.",
        "",
        f"Machine: {machine['cpu']}, nproc {machine['nproc']}; load average (1/5/15 min) at start "
        f"{'/'.join(f'{x:.2f}' for x in machine['loadavg'])}, at end "
        f"{'/'.join(f'{x:.2f}' for x in results['loadavg_end'])}; Python {machine['python']}, torch "
        f"{machine['torch']}, transformers {machine['transformers']}, peft {machine['peft']}; {machine['date']}; "
        f"wall time {results['wall_s'] / 60:.1f} min"
        + (" (the merged runs' wall times added up; they overlapped)." if results.get("merged_from") else "."),
        *_merged_lines(results),
        "",
        f"### Accuracy and cost ({longest} steps)",
        "",
        "| method | trainable params | x MITP | test acc | yes/no | color | shape | train step (ms) | x MITP | "
        "inference (ms/sample) | x MITP | x backbone (alternating) | inference FLOPs x backbone | peak train mem (MiB) | "
        "x MITP |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    prior = data.get("question_prior")
    if prior:
        lines.append(
            f"| question-only prior (no image) | 0 | – | {prior['accuracy']:.3f} | "
            + " | ".join(f"{prior.get(f'accuracy_{g}', float('nan')):.3f}" for g in GROUPS)
            + " | – | – | – | – | – | – | – | – |"
        )
    for name, s in summary.items():
        if s.get("error"):
            lines.append(f"| {name} | failed |" + " |" * 14)
            continue
        if name == REFERENCE:
            inf = s["inference_s_per_sample"]
            lines.append(
                f"| frozen backbone alone | 0 | – | – | – | – | – | – | – | {inf * 1e3:.2f} | "
                f"{_ratio(inf, mitp.get('inference_s_per_sample'))} | 1.00x | 1.00x | – | – |"
            )
            continue
        acc = s["budgets"].get(longest, {})
        lines.append(
            f"| {name} | {s['trainable']:,} | {_ratio(s['trainable'], mitp.get('trainable'))} | "
            f"{acc.get('accuracy', float('nan')):.3f} | "
            + " | ".join(f"{acc.get(f'accuracy_{g}', float('nan')):.3f}" for g in GROUPS)
            + f" | {s['step_s'] * 1e3:.0f} | {_ratio(s['step_s'], mitp.get('step_s'))} | "
            f"{s['inference_s_per_sample'] * 1e3:.2f} | {_ratio(s['inference_s_per_sample'], mitp.get('inference_s_per_sample'))} | "
            f"{_backbone_ratio(s, ref)} | {_flops_ratio(s)} | "
            f"{s['peak_mib']:.0f} | {_ratio(s['peak_mib'], mitp.get('peak_mib'))} |"
        )
    lines += [
        "",
        "The question-only prior answers each test question with the answer most often given to the same question "
        "text in training: a method that matches it on a question type answers that type without the image.",
        "",
        "Times are medians over repeats on one fixed batch, each method in its own process, one after the other; "
        "\"x backbone (alternating)\" times the method's inference and the frozen backbone's in alternation in the same "
        "process, which a drifting machine load does not skew (\"seq.\": no such measurement in this run, the ratio of "
        "the sequential medians); \"inference FLOPs x backbone\" counts the same batch's matrix products, attention and "
        "convolutions (`torch.utils.flop_counter`), so a time ratio well above it is overhead outside that compute.",
        "",
        "### Test accuracy against training budget",
        "",
        "| method | "
        + " | ".join(f"{b} steps ({_epochs(b, settings, data)} epochs)" for b in budgets)
        + " | "
        + " | ".join(f"rank @{b}" for b in budgets)
        + " |",
        "| --- | " + " | ".join("---:" for _ in budgets * 2) + " |",
    ]
    trained = {n: s for n, s in summary.items() if n != REFERENCE and not s.get("error")}
    ranks = {}
    for b in budgets:
        order = sorted(trained, key=lambda n: -trained[n]["budgets"].get(b, {}).get("accuracy", -1))
        ranks[b] = {n: i + 1 for i, n in enumerate(order)}
    for name, s in trained.items():
        accs = [s["budgets"].get(b, {}).get("accuracy") for b in budgets]
        lines.append(
            f"| {name} | " + " | ".join("–" if a is None else f"{a:.3f}" for a in accs) + " | "
            + " | ".join(str(ranks[b][name]) for b in budgets) + " |"
        )
    lines += [
        "",
        "### Training memory: what one step adds on top of the model",
        "",
        "RSS: peak resident memory during the first "
        f"{settings['memory_steps']} training steps of a fresh process, above its resident memory just before them "
        "(the built model, data and runtime). Profiler: tensor bytes at the step's peak by category (torch profiler "
        "memory timeline, one step after those), parameters excluded. Layers with autograd: encoder layers whose "
        "output required grad in a training forward (backward runs through them and keeps their activations).",
        "",
        "| method | RSS peak (MiB) | x MITP | x full FT | profiler peak (MiB) | activations | gradients | optimizer state "
        "| temporaries + other | layers with autograd |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    full = summary.get("full-ft", {})
    for name, s in trained.items():
        b = s["breakdown"] or {}
        other = sum(b.get(k, 0) for k in ("temporary_mib", "input_mib", "autograd_detail_mib", "unknown_mib"))
        prof = s["profiler_peak_mib"]
        lines.append(
            f"| {name} | {s['peak_mib']:.0f} | {_ratio(s['peak_mib'], mitp.get('peak_mib'))} | "
            f"{_ratio(s['peak_mib'], full.get('peak_mib'))} | "
            + ("– | – | – | – | –" if prof is None else
               f"{prof:.0f} | {b.get('activation_mib', 0):.0f} | {b.get('gradient_mib', 0):.1f} | "
               f"{b.get('optimizer_state_mib', 0):.1f} | {other:.0f}")
            + f" | {_layers(s['autograd_layers'])} |"
        )
    lines += ["", "### Targets (MITP)", "", "| target | measured | met |", "| --- | --- | --- |"]
    for label, measured, met in targets(summary, budgets):
        lines.append(f"| {label} | {measured} | {'–' if met is None else ('yes' if met else '**no**')} |")
    lines += ["", "### Methods and learning rates", "", "| method | what | learning rate |", "| --- | --- | --- |"]
    resolved = Settings(**{**settings, "methods": list(trained)})
    for name in trained:
        m = resolve_method(name, resolved)
        lr = f"{m.learning_rate:g}" + (f" (backbone {m.backbone_learning_rate:g})" if m.backbone_learning_rate else "")
        lines.append(f"| {name} | {m.description} | {lr} |")
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: Path) -> None:
    """Accuracy against budget, one line per method (PNG)."""
    from peft_mitp.plots import _pyplot

    plt = _pyplot()
    summary = summarise(results)
    budgets = results["settings"]["budgets"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours = plt.get_cmap("tab20").colors  # one colour per method (the default cycle repeats after 10)
    for index, (name, s) in enumerate(summary.items()):
        if name == REFERENCE or s.get("error"):
            continue
        accs = [s["budgets"].get(b, {}).get("accuracy") for b in budgets]
        style = {"linewidth": 2.5, "color": "black"} if name == "mitp" else {"linewidth": 1, "color": colours[index % 20]}
        ax.plot(budgets, accs, "os^vD"[index % 5] + "-", label=name, **style)
    ax.axhline(results["data"]["majority_test_accuracy"], color="grey", linestyle=":", label="majority class")
    prior = results["data"].get("question_prior")
    if prior:
        ax.axhline(prior["accuracy"], color="grey", linestyle="--", label="question-only prior")
    ax.set_xlabel(f"training steps (batch {results['settings']['batch_size']})")
    ax.set_ylabel("test accuracy")
    ax.set_xscale("log")
    ax.set_xticks(budgets, [str(b) for b in budgets])
    ax.minorticks_off()
    ax.set_title("easy-VQA, offline backbone: accuracy against budget")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    """Parse arguments; run the comparison (or, with `--worker`, one method) and write the report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"small subsets and few steps: {QUICK}")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), help="methods to run (default: all)")
    parser.add_argument("--budgets", nargs="+", type=int, help="training budgets in steps")
    parser.add_argument("--max-train", type=int, help="training rows to sample (before the validation split)")
    parser.add_argument("--max-test", type=int, help="test rows to sample")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--seeds", nargs="+", type=int)
    parser.add_argument("--repeats", type=int, help="timed repeats per measurement (medians)")
    parser.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    parser.add_argument("--lr", nargs="+", default=[], metavar="METHOD=LR", help="override methods' learning rates")
    parser.add_argument(
        "--mitp-option", nargs="+", default=[], metavar="FIELD=VALUE",
        help="change fields of the `TrainOptions` MITP runs with (e.g. hub_dim=512 learning_rate=0.01); ablations keep "
        "the defaults",
    )
    parser.add_argument("--output", type=Path, help="folder for the report (default: benchmarks/results/compare-*)")
    parser.add_argument(
        "--merge", nargs="+", metavar="RESULTS",
        help="write one report from the results.json (or their folders) of runs of the same command with different "
        "--methods, instead of running anything; RESULTS:m1,m2 takes only those methods from that run",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker_main(args.worker, args.workdir)
        return None
    if args.merge:
        paths, take = [], []
        for item in map(str, args.merge):
            path, _, names = item.rpartition(":") if ":" in item and "/" not in item.rpartition(":")[2] else (item, "", "")
            path = Path(path)
            paths.append(path / "results.json" if path.is_dir() else path)
            take.append(names.split(",") if names else None)
        missing = [str(path) for path in paths if not path.is_file()]
        if missing:
            parser.error(f"--merge: no results file at {missing}; give the results.json (or folder) compare.py wrote")
        try:
            results = merge([json.loads(path.read_text()) for path in paths], take)
        except ValueError as error:
            parser.error(f"--merge: {error}")
        output = args.output or ROOT / "benchmarks" / "results" / "compare-merged"
        return _write(results, output)
    settings = Settings(**(QUICK if args.quick else {}))
    for key in ("methods", "budgets", "max_train", "max_test", "batch_size", "seeds", "repeats", "threads"):
        value = getattr(args, key)
        if value is not None:
            setattr(settings, key, value)
    settings.learning_rates = {k: float(v) for k, v in (item.split("=", 1) for item in args.lr)}
    unknown = sorted(set(settings.learning_rates) - set(METHODS))
    if unknown:
        parser.error(f"--lr names unknown methods {unknown}; choose from {list(METHODS)}")
    settings.mitp_options = {k: ast.literal_eval(v) for k, v in (item.split("=", 1) for item in args.mitp_option)}
    if "mitp" not in settings.methods:
        settings.methods = ["mitp", *settings.methods]  # every ratio is to MITP
    output = args.output or ROOT / "benchmarks" / "results" / ("compare-quick" if args.quick else "compare-full")
    output.mkdir(parents=True, exist_ok=True)
    return _write(run_all(copy.deepcopy(settings)), output)


def _write(results: dict[str, Any], output: Path) -> dict[str, Any]:
    """Write the report, the raw results and the plot into `output`, and print the report."""
    output.mkdir(parents=True, exist_ok=True)
    report = markdown(results)
    (output / "results.json").write_text(json.dumps(results, indent=1))
    (output / "report.md").write_text(report)
    plot(results, output / "accuracy_vs_budget.png")
    print(report)
    print(f"Wrote {output}/report.md, results.json and accuracy_vs_budget.png")
    return results


if __name__ == "__main__":
    main()
