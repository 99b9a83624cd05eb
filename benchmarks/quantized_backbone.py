"""A quantized frozen backbone against the full-precision one: weight memory and training-step time, side by side.

On the offline backbone (MiniLM text tower + EfficientNet-Lite0 / MiniLM-layer vision tower) with the offline job's
adapter (`TrainOptions().mitp_config()`), four backbones are built in one process: full precision, torchao int8
weight-only, bitsandbytes 8-bit and bitsandbytes 4-bit NF4 (`mitp train --quantization none|int8|bnb-int8|bnb-nf4`).
For each:

- frozen-weight memory: the bytes of the backbone's parameters and buffers as stored (a quantized tensor counts its
  integer data and its scales);
- training-step time: a step of batch 32 on the job's own data (forward, backward, AdamW), the four timed in
  alternation (`harness.paired_median_seconds`, one torch thread), so machine load hits all alike (timed before any
  no-grad forward: bitsandbytes 0.50's CPU 4-bit layers fail in a training forward after an inference one);
- the logits of one adapter (trained 20 steps on the full-precision backbone) on each quantized backbone against
  full precision: the largest absolute difference on 256 validation questions, and how many predictions change.

The accuracy of the default job on a quantized backbone is a separate run of the job itself:
`mitp train --quantization int8 --output-dir runs/int8` (docs/benchmarks.md quotes it).

Run from the repository root: `python benchmarks/quantized_backbone.py` (a few minutes on 2 cores). Writes
`benchmarks/results/quantized_backbone/report.md` and `results.json`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python benchmarks/quantized_backbone.py`

from benchmarks import harness  # noqa: E402
from peft_mitp import MITPForImageTextClassification  # noqa: E402
from peft_mitp.quantization import quantization_config, quantized_linear_count  # noqa: E402
from peft_mitp.training import TrainOptions  # noqa: E402

OUTPUT = Path(__file__).parent / "results" / "quantized_backbone"
BACKENDS = ("none", "int8", "bnb-int8", "bnb-nf4")


def stored_bytes(tensor: torch.Tensor) -> int:
    """Bytes a (possibly quantized) tensor holds: its own storage, or its inner tensors' for a tensor subclass."""
    flatten = getattr(tensor, "__tensor_flatten__", None)
    if flatten is not None and type(tensor) not in (torch.Tensor, torch.nn.Parameter):
        names, _ = flatten()
        return sum(stored_bytes(getattr(tensor, name)) for name in names)
    total = tensor.numel() * tensor.element_size()
    for extra in ("SCB", "quant_state"):  # bitsandbytes keeps its scales beside the weight
        state = getattr(tensor, extra, None)
        if isinstance(state, torch.Tensor):
            total += state.numel() * state.element_size()
        elif state is not None and hasattr(state, "absmax"):
            total += state.absmax.numel() * state.absmax.element_size()
    return total


def backbone_bytes(task: MITPForImageTextClassification) -> int:
    return sum(stored_bytes(t) for t in (*task.backbone.parameters(), *task.backbone.buffers()))


def build(backend: str, num_labels: int) -> MITPForImageTextClassification:
    torch.manual_seed(0)
    config = quantization_config(backend)
    kwargs = {"quantization_config": config} if config is not None else {}
    return MITPForImageTextClassification.from_pretrained("offline", num_labels=num_labels, **kwargs)


def main() -> None:
    from peft import get_peft_model, set_peft_model_state_dict
    from peft.utils import get_peft_model_state_dict

    from benchmarks.fair import load_splits

    torch.set_num_threads(1)
    splits, num_labels = load_splits(8000, 1000)
    train, validation = splits["train"], splits["validation"]
    models = {}
    for backend in BACKENDS:
        task = build(backend, num_labels)
        torch.manual_seed(1)
        models[backend] = get_peft_model(task, TrainOptions().mitp_config())
    # One adapter, trained on the full-precision backbone, then copied onto each quantized one.
    reference = models["none"]
    optimizer = torch.optim.AdamW([p for p in reference.parameters() if p.requires_grad], lr=3e-2)
    for step in range(20):
        rows = torch.arange(step * 32, (step + 1) * 32)
        reference(**train.batch(rows)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    batch = train.batch(torch.arange(32))
    steps = {}
    for backend, model in models.items():
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

        def step(model: torch.nn.Module = model, opt: torch.optim.Optimizer = opt) -> None:
            model(**batch).loss.backward()
            opt.step()
            opt.zero_grad()

        steps[backend] = step
    seconds = dict(zip(BACKENDS, harness.paired_median_seconds([steps[b] for b in BACKENDS], repeats=10), strict=True))
    state = get_peft_model_state_dict(reference)
    logits = {}
    for backend, model in models.items():
        set_peft_model_state_dict(model, state)
        model.eval()
        with torch.no_grad():
            logits[backend] = torch.cat([
                model(**{k: v for k, v in validation.batch(torch.arange(i, i + 64)).items() if k != "labels"}).logits
                for i in range(0, 256, 64)
            ])
    full_bytes = backbone_bytes(models["none"].base_model.model)
    results = {}
    for backend, model in models.items():
        task = model.base_model.model
        results[backend] = {
            "quantized_linear_layers": quantized_linear_count(task),
            "backbone_mib": backbone_bytes(task) / 2**20,
            "memory_ratio": backbone_bytes(task) / full_bytes,
            "step_seconds": seconds[backend],
            "step_ratio": seconds[backend] / seconds["none"],
            "max_logit_difference": float((logits[backend] - logits["none"]).abs().max()),
            "changed_predictions": int((logits[backend].argmax(-1) != logits["none"].argmax(-1)).sum()),
        }
    lines = [
        "| backbone | quantized linear layers | backbone weights (MiB) | vs full | training step (s, batch 32) | vs full "
        "| largest logit difference | changed predictions (of 256) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        *[
            f"| {b} | {r['quantized_linear_layers']} | {r['backbone_mib']:.1f} | {r['memory_ratio']:.2f}x | "
            f"{r['step_seconds']:.3f} | {r['step_ratio']:.2f}x | {r['max_logit_difference']:.4f} | "
            f"{r['changed_predictions']} |"
            for b, r in results.items()
        ],
    ]
    harness.write_report(OUTPUT, {"results": results, "machine": harness.machine_info()}, "\n".join(lines))


if __name__ == "__main__":
    main()
