"""Throughput of a mixed-adapter batch against one batch per adapter, side by side.

Three MITP adapters (the offline job's layout, different seeds, heads of 13, 7 and 3 labels) on the offline backbone.
The same 48 validation questions are classified two ways, timed in alternation in one process
(`harness.paired_median_seconds`, one torch thread):

- mixed: one forward of 48 samples with `adapter_names` (16 per adapter, interleaved);
- per adapter: three forwards of 16 samples, `set_adapter(name)` before each (what serving without mixed batches
  does).

The mixed forward runs the backbone once for all 48; the per-adapter forwards run it three times on a third of the
batch each, so the difference is the per-call overhead and the efficiency of larger matrix products.

Run from the repository root: `python benchmarks/mixed_batches.py` (about a minute). Writes
`benchmarks/results/mixed_batches/report.md` and `results.json`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python benchmarks/mixed_batches.py`

from benchmarks import harness  # noqa: E402
from peft_mitp import MITPForImageTextClassification  # noqa: E402
from peft_mitp.training import TrainOptions  # noqa: E402

OUTPUT = Path(__file__).parent / "results" / "mixed_batches"
HEADS = {"vqa": 13, "seven": 7, "three": 3}


def main() -> None:
    import dataclasses

    from peft import get_peft_model

    from benchmarks.fair import load_splits

    torch.set_num_threads(1)
    splits, num_labels = load_splits(8000, 1000)
    validation = splits["validation"]
    torch.manual_seed(0)
    task = MITPForImageTextClassification.from_pretrained("offline", num_labels=num_labels)
    model = None
    for seed, (name, labels) in enumerate(HEADS.items()):
        torch.manual_seed(seed)
        config = dataclasses.replace(TrainOptions().mitp_config(), num_labels=labels, gate_init=0.1 * (seed + 1))
        if model is None:
            model = get_peft_model(task, config, adapter_name=name)
        else:
            model.add_adapter(name, config)
    model.eval()
    batch = {k: v for k, v in validation.batch(torch.arange(48)).items() if k != "labels"}
    names = [list(HEADS)[i % 3] for i in range(48)]
    groups = {name: torch.tensor([i for i, n in enumerate(names) if n == name]) for name in HEADS}

    @torch.no_grad()
    def mixed() -> None:
        model(**batch, adapter_names=names)

    @torch.no_grad()
    def per_adapter() -> None:
        for name, rows in groups.items():
            model.set_adapter(name)
            model(**{k: v[rows] for k, v in batch.items()})

    mixed_s, separate_s = harness.paired_median_seconds([mixed, per_adapter], repeats=15)
    results = {
        "samples": 48,
        "adapters": len(HEADS),
        "mixed_seconds": mixed_s,
        "per_adapter_seconds": separate_s,
        "mixed_samples_per_second": 48 / mixed_s,
        "per_adapter_samples_per_second": 48 / separate_s,
        "throughput_ratio": separate_s / mixed_s,
    }
    text = "\n".join([
        "| 48 questions, 3 adapters | seconds (median of 15) | samples / s |",
        "| --- | ---: | ---: |",
        f"| one mixed batch (`adapter_names`) | {mixed_s:.3f} | {48 / mixed_s:.1f} |",
        f"| one batch of 16 per adapter (`set_adapter`) | {separate_s:.3f} | {48 / separate_s:.1f} |",
        f"| mixed / per adapter throughput | | {separate_s / mixed_s:.2f}x |",
    ])
    harness.write_report(OUTPUT, {"results": results, "machine": harness.machine_info()}, text)


if __name__ == "__main__":
    main()
