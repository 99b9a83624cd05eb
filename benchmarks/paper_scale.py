"""The paper-scale picture without weights: trainable parameters, training memory and FLOPs of MITP, PMF, LoRA and
full fine-tuning at CLIP ViT-L/14 shapes and at BERT-base + ViT-B/16 shapes.

Every model is built from its published configuration on the **meta device** (shapes, no memory, no weights) and
one training step is run there for real, operator by operator:

- trainable parameters: counted on the built model;
- peak training memory: parameters + optimizer state (AdamW, measured after a first step) + the peak of the tensors a
  second step creates (activations kept for backward, temporaries, gradients), tracked with
  `benchmarks.harness.TensorMemoryTracker` (every operator's output storage from creation until it is freed). All
  float32, batch `--batch-size`. It is an estimate of tensor memory: an allocator's caching and fragmentation, the CUDA
  context and workspace buffers come on top on a GPU;
- FLOPs of a training step (forward + backward) and of an inference forward, from `torch.utils.flop_counter`
  (matrix products and attention only), as ratios to full fine-tuning and to the frozen backbone alone: on a GPU,
  where these large matrix products dominate, step time follows them roughly.

Run from the repository root (about a minute on 2 CPU cores):

    python benchmarks/paper_scale.py
    python benchmarks/paper_scale.py --batch-size 32 --num-labels 101 --output benchmarks/results/paper_scale.md
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python benchmarks/paper_scale.py`
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from benchmarks import harness  # noqa: E402
from benchmarks.baselines import PMFForImageTextClassification  # noqa: E402
from benchmarks.methods import build_full_finetuning, build_lora, build_probe  # noqa: E402

META = torch.device("meta")


@dataclass(frozen=True)
class Shape:
    """A backbone at published shapes, with the input sizes used for the estimate."""

    name: str
    build: Callable[[], nn.Module]
    text_length: int
    image_size: int


def clip_vit_large_14() -> nn.Module:
    """CLIP ViT-L/14 (text 12 x 768, vision 24 x 1024, 224 px, 257 tokens) on the meta device."""
    from transformers import CLIPModel

    from benchmarks.gpu_clip_large import clip_config

    with META:
        return CLIPModel(clip_config(tiny=False))


def bert_base_vit_b16() -> nn.Module:
    """BERT-base + ViT-B/16 (12 x 768 each, 224 px, 197 tokens) as a `VisionTextDualEncoderModel`, on the meta device.

    The dual encoder PMF uses; projections of width 768 (identities in `from_text_vision_pretrained`).
    """
    from transformers import BertConfig, VisionTextDualEncoderConfig, VisionTextDualEncoderModel, ViTConfig

    config = VisionTextDualEncoderConfig.from_vision_text_configs(
        ViTConfig(image_size=224, patch_size=16), BertConfig(), projection_dim=768
    )
    with META:
        return VisionTextDualEncoderModel(config)


SHAPES = {
    "clip-vit-l14": Shape("CLIP ViT-L/14", clip_vit_large_14, text_length=77, image_size=224),
    "bert-base+vit-b16": Shape("BERT-base + ViT-B/16", bert_base_vit_b16, text_length=128, image_size=224),
}


def build_mitp_default(backbone: nn.Module, num_labels: int) -> nn.Module:
    """MITP with `MITPConfig()`'s defaults (the paper's configuration plus the hub's read-out to the head), its loss
    computed by the caller."""
    from peft import get_peft_model

    import peft_mitp

    base = peft_mitp.MITPForImageTextClassification.from_backbone(backbone, num_labels=num_labels)
    return get_peft_model(base, peft_mitp.MITPConfig())


METHODS: dict[str, Callable[[nn.Module, int], nn.Module]] = {
    "mitp": build_mitp_default,
    "pmf": lambda b, n: PMFForImageTextClassification(b, n),
    "lora": build_lora,
    "linear-probe": build_probe,
    "full-ft": build_full_finetuning,
}


def _inputs(shape: Shape, backbone: nn.Module, batch_size: int) -> dict[str, torch.Tensor]:
    # No attention mask: texts of full length need none, and the mask builders read values meta tensors lack.
    vocab = backbone.config.text_config.vocab_size
    inputs = {
        "input_ids": torch.randint(0, vocab, (batch_size, shape.text_length), device=META),
        "pixel_values": torch.randn(batch_size, 3, shape.image_size, shape.image_size, device=META),
    }
    return inputs


def _step(model: nn.Module, optimizer: torch.optim.Optimizer, inputs: dict, labels: torch.Tensor) -> None:
    # The loss is computed here: MITP's own loss checks label values, which meta tensors do not have.
    logits = model(**inputs).logits
    nn.functional.cross_entropy(logits.float(), labels).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def measure(shape: Shape, method: str, batch_size: int, num_labels: int) -> dict[str, Any]:
    """Trainable parameters, memory estimate and FLOPs of one method at one backbone shape (all on meta)."""
    backbone = shape.build()
    inputs = _inputs(shape, backbone, batch_size)
    labels = torch.randint(0, num_labels, (batch_size,), device=META)
    torch.manual_seed(0)
    model = METHODS[method](backbone, num_labels).to(META)  # adapters built on the CPU beside a meta backbone
    trainable, total = harness.trainable_parameters(model)
    param_bytes = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], foreach=False)
    model.train()
    with FlopCounterMode(display=False) as flops:
        _step(model, optimizer, inputs, labels)  # the first step also creates the optimizer state
    state_bytes = sum(
        t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)
    )
    with harness.TensorMemoryTracker() as tracker:
        _step(model, optimizer, inputs, labels)
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as inference_flops:
        model(**inputs)
    return {
        "trainable": trainable,
        "total": total,
        "param_gib": param_bytes / 2**30,
        "optimizer_gib": state_bytes / 2**30,
        "step_gib": tracker.peak_bytes / 2**30,
        "peak_gib": (param_bytes + state_bytes + tracker.peak_bytes) / 2**30,
        "train_flops": flops.get_total_flops(),
        "inference_flops": inference_flops.get_total_flops(),
    }


def backbone_inference_flops(shape: Shape, batch_size: int) -> int:
    """FLOPs of the frozen backbone alone (both towers' feature functions) for one batch."""
    from peft_mitp.families import family_for

    backbone = shape.build()
    inputs = _inputs(shape, backbone, batch_size)
    family = family_for(backbone.config.model_type)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        getattr(backbone, family.text_features)(input_ids=inputs["input_ids"])
        getattr(backbone, family.image_features)(pixel_values=inputs["pixel_values"])
    return counter.get_total_flops()


def run(batch_size: int = 32, num_labels: int = 101, shapes: list[str] | None = None) -> dict[str, Any]:
    """Measure every method at every shape; returns {shape: {"backbone_inference_flops", "methods": {...}}}."""
    results = {}
    for key in shapes or list(SHAPES):
        shape = SHAPES[key]
        results[key] = {
            "name": shape.name,
            "text_length": shape.text_length,
            "backbone_inference_flops": backbone_inference_flops(shape, batch_size),
            "methods": {method: measure(shape, method, batch_size, num_labels) for method in METHODS},
        }
    return results


def markdown(results: dict[str, Any], batch_size: int, num_labels: int) -> str:
    """One table per shape."""
    lines = []
    for shape in results.values():
        methods = shape["methods"]
        full = methods["full-ft"]
        lines += [
            f"#### {shape['name']} (batch {batch_size}, {shape['text_length']} text tokens, 224 px, {num_labels} "
            "classes, float32, AdamW)",
            "",
            "| method | trainable params | % of model | params (GiB) | optimizer state (GiB) | step tensors (GiB) | "
            "peak train memory (GiB) | x full FT | train FLOPs x full FT | inference FLOPs x backbone |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for name, m in methods.items():
            lines.append(
                f"| {name} | {m['trainable']:,} | {100 * m['trainable'] / m['total']:.2f}% | {m['param_gib']:.2f} | "
                f"{m['optimizer_gib']:.3f} | {m['step_gib']:.2f} | {m['peak_gib']:.2f} | "
                f"{m['peak_gib'] / full['peak_gib']:.2f}x | {m['train_flops'] / full['train_flops']:.2f}x | "
                f"{m['inference_flops'] / shape['backbone_inference_flops']:.3f}x |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse arguments, measure, print (and optionally write) the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-labels", type=int, default=101, help="classes (101: UPMC Food-101)")
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), help="backbone shapes (default: all)")
    parser.add_argument("--output", type=Path, help="also write the Markdown tables here")
    args = parser.parse_args(argv)
    results = run(args.batch_size, args.num_labels, args.shapes)
    report = markdown(results, args.batch_size, args.num_labels)
    print(report)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(report)
    return results


if __name__ == "__main__":
    main()
