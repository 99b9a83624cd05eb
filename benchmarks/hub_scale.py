"""How large the memory hub's generated prompts grow during training, with the hub as it is and as first written.

Trains MITP (the offline job's defaults, `TrainOptions`) on easy-VQA with the benchmark loop of `compare.py`
(`benchmarks/harness.py`: AdamW, warm-up + cosine, batch 32) and logs, at every hub call, the mean per-token norm of
each tower's read-out `R`, of the generated cross-modal term (carry minus read-out), and the entropy of the vision
side's activation. Then it reports test accuracy per question type.

`--hub before-fix` runs the generation as first written, `C = R + U (A H)` with the generation maps `U` starting at zero
and nothing bounding their output (the gates and the normalisation of `peft_mitp.hub.MemoryHub` bypassed); the default
runs the hub as shipped, `C = R + g * rms(R) * LN(U (A H))`. docs/benchmarks.md ("Why the cross term is normalised")
quotes both.

Run from the repository root (about 5 minutes per run on one CPU core):

    python benchmarks/hub_scale.py
    python benchmarks/hub_scale.py --hub before-fix
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python benchmarks/hub_scale.py`
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from benchmarks import harness  # noqa: E402
from benchmarks.methods import build_mitp  # noqa: E402


def use_hub_before_fix(model: nn.Module) -> None:
    """Make every hub of `model` generate `U (A H)` unnormalised and ungated, with `U` at zero (the first design)."""
    from peft_mitp.hub import MemoryHub

    for hub in model.modules():
        if isinstance(hub, MemoryHub) and hub.interaction:
            with torch.no_grad():
                for linear in (hub.text_out, hub.vision_out):
                    linear.weight.zero_()
                    linear.bias.zero_()
            hub.text_gate.requires_grad_(False)
            hub.vision_gate.requires_grad_(False)
            for gate in (getattr(hub, "text_memory_gate", None), getattr(hub, "vision_memory_gate", None)):
                if gate is not None:  # the first design carried each read-out whole
                    with torch.no_grad():
                        gate.fill_(1.0)
                    gate.requires_grad_(False)
            hub._generate = lambda mapped, readout, gate: mapped  # instance attribute shadows the static method


def record_hub_scale(model: nn.Module) -> list[dict[str, float]]:
    """Attach a forward hook to every hub of `model`; returns the list it appends one record per hub call to."""
    from peft_mitp.hub import MemoryHub

    records: list[dict[str, float]] = []

    def hook(hub: MemoryHub, args: tuple[torch.Tensor, torch.Tensor], out: Any) -> None:
        text, vision = (t.detach() for t in args)
        record = {"readout_text": float(text.norm(dim=-1).mean()), "readout_vision": float(vision.norm(dim=-1).mean())}
        if out.text_activation is not None:
            own_text, own_vision = (
                (hub.carry_only("text", text).detach(), hub.carry_only("vision", vision).detach())
                if hub.memory
                else (0.0, 0.0)
            )
            record["generated_text"] = float((out.text_prompts.detach() - own_text).norm(dim=-1).mean())
            record["generated_vision"] = float((out.vision_prompts.detach() - own_vision).norm(dim=-1).mean())
            activation = out.vision_activation.detach().clamp_min(1e-12)
            record["activation_entropy"] = float(-(activation * activation.log()).sum(-1).mean())
        records.append(record)

    for module in model.modules():
        if isinstance(module, MemoryHub):
            module.register_forward_hook(hook)
    return records


def run(hub: str, steps: int, max_train: int, max_test: int, batch_size: int, seed: int = 0) -> dict[str, Any]:
    """Train and evaluate one MITP model, logging the hub's scale; returns the metrics and the per-step records."""
    from peft_mitp.offline_backbone import build_offline_backbone

    splits, labels = harness.load_encoded_easy_vqa(max_train, max_test, seed)
    torch.manual_seed(seed)
    model = build_mitp(build_offline_backbone(), len(labels))
    if hub == "before-fix":
        use_hub_before_fix(model)
    records = record_hub_scale(model)
    start = time.perf_counter()
    harness.train(model, splits["train"], steps=steps, batch_size=batch_size, learning_rate=3e-3, seed=seed)
    train_s = time.perf_counter() - start
    pairs = len(records) // steps if steps else 0  # hub calls per training step (interaction pairs - 1)
    training = records[: steps * pairs]
    metrics = harness.evaluate(model, splits["test"])
    return {"hub": hub, "steps": steps, "train_s": train_s, "metrics": metrics, "pairs": pairs, "records": training}


def markdown(result: dict[str, Any]) -> str:
    """The hub's scale at a few points of training, and the accuracies."""
    steps, pairs, records = result["steps"], max(result["pairs"], 1), result["records"]
    lines = [
        f"Hub: {result['hub']}; {steps} steps; test accuracy {result['metrics']['accuracy']:.3f} ("
        + ", ".join(f"{k[len('accuracy_'):]} {v:.3f}" for k, v in result["metrics"].items() if k != "accuracy")
        + ")",
        "",
        "| step | read-out norm (text / vision) | generated term norm (text / vision) | vision activation entropy (nats) |",
        "| ---: | --- | --- | ---: |",
    ]
    for step in sorted({0, steps // 4, steps // 2, math.ceil(3 * steps / 4), steps - 1}):
        chunk = records[step * pairs : (step + 1) * pairs]
        if not chunk:
            continue

        def mean(key: str, rows: list[dict[str, float]] = chunk) -> str:
            values = [r[key] for r in rows if key in r]
            return f"{sum(values) / len(values):.2f}" if values else "–"

        lines.append(
            f"| {step + 1} | {mean('readout_text')} / {mean('readout_vision')} | "
            f"{mean('generated_text')} / {mean('generated_vision')} | {mean('activation_entropy')} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse arguments, train, print (and optionally write) the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hub", choices=["shipped", "before-fix"], default="shipped")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--max-train", type=int, default=8000)
    parser.add_argument("--max-test", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--output", type=Path, help="also write the table (.md) and the records (.json) here")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    with harness.torch_threads(args.threads):
        result = run(args.hub, args.steps, args.max_train, args.max_test, args.batch_size)
    report = markdown(result)
    print(report)
    if args.output:
        args.output.mkdir(parents=True, exist_ok=True)
        (args.output / f"hub_scale-{args.hub}.md").write_text(report)
        (args.output / f"hub_scale-{args.hub}.json").write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
