"""Time MITP training and inference on CLIP ViT-L/14 shapes on a GPU, against full fine-tuning and LoRA.

One command, a few minutes on one modern GPU. The backbone is `CLIPModel` built from CLIP ViT-L/14's published
configuration with random weights (no download: timing and memory do not depend on the weight values), in bf16 by
default; the trainable adapter weights (MITP's prompts and hub, LoRA's matrices) and the heads stay float32, as peft
keeps them; full fine-tuning trains the bf16 weights directly (AdamW state in bf16). Per method it reports trainable
parameters, the median training step time (forward, backward, clipping, AdamW step), the median inference time per
sample, and the peak memory a training step needs above the loaded weights (`torch.cuda.max_memory_allocated`; on the
CPU the tensor bytes of `benchmarks.harness.TensorMemoryTracker`); the frozen backbone alone is the inference
reference.

    python benchmarks/gpu_clip_large.py                          # cuda, bf16, batch 32, 77 tokens, 224 px
    python benchmarks/gpu_clip_large.py --batch-size 64 --repeats 20
    python benchmarks/gpu_clip_large.py --device cpu --tiny      # smoke check: a tiny CLIP on the CPU, seconds
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python benchmarks/gpu_clip_large.py`
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from benchmarks import harness  # noqa: E402
from benchmarks.methods import build_full_finetuning, build_lora  # noqa: E402
from benchmarks.paper_scale import build_mitp_default  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def clip_config(tiny: bool) -> Any:
    """CLIP ViT-L/14's configuration, or (tiny) a CLIP small enough for a CPU smoke check."""
    from transformers import CLIPConfig

    if tiny:
        return CLIPConfig(
            text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                             vocab_size=99, max_position_embeddings=24),
            vision_config=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=6, num_attention_heads=4,
                               image_size=32, patch_size=8),
            projection_dim=24,
        )
    return CLIPConfig(
        text_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
        vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                           image_size=224, patch_size=14),
        projection_dim=768,
    )


METHODS: dict[str, Callable[[nn.Module, int], nn.Module]] = {
    "mitp": build_mitp_default,
    "lora": build_lora,
    "full-ft": build_full_finetuning,
}


class Clock:
    """Wall-clock timing and peak-memory reading that synchronise the device first."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        """Wait for queued device work."""
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def median_seconds(self, fn: Callable[[], Any], repeats: int, warmup: int = 3) -> float:
        """Median seconds of `fn()` over `repeats` synchronised calls, after `warmup` calls."""

        def timed() -> None:
            fn()
            self.sync()

        return harness.median_seconds(timed, repeats, warmup)

    def step_memory_bytes(self, fn: Callable[[], Any]) -> int:
        """Peak bytes `fn()` allocates above what was allocated before it."""
        if self.cuda:
            self.sync()
            torch.cuda.reset_peak_memory_stats(self.device)
            before = torch.cuda.memory_allocated(self.device)
            fn()
            self.sync()
            return torch.cuda.max_memory_allocated(self.device) - before
        with harness.TensorMemoryTracker() as tracker:
            fn()
        return tracker.peak_bytes


def make_inputs(config: Any, batch_size: int, device: torch.device, num_labels: int) -> dict[str, torch.Tensor]:
    """Full-length random texts (77 tokens for CLIP-L, ending in the end-of-text id) and random images."""
    text, vision = config.text_config, config.vision_config
    length = text.max_position_embeddings
    ids = torch.randint(1, text.vocab_size - 2, (batch_size, length), device=device)
    ids[:, -1] = text.eos_token_id if text.eos_token_id < text.vocab_size else text.vocab_size - 1
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values": torch.randn(batch_size, 3, vision.image_size, vision.image_size, device=device),
        "labels": torch.randint(0, num_labels, (batch_size,), device=device),
    }


def build_backbone(config: Any, device: torch.device, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """A randomly initialised CLIP on `device` in `dtype`, frozen and in eval mode."""
    from transformers import CLIPModel

    torch.manual_seed(seed)
    with device:
        model = CLIPModel(config)
    model.to(dtype)
    model.requires_grad_(False)
    return model.eval()


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Measure the frozen backbone and every method; returns one row per method."""
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    config = clip_config(args.tiny)
    clock = Clock(device)
    batch = make_inputs(config, args.batch_size, device, args.num_labels)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    rows = []

    backbone = build_backbone(config, device, dtype)
    with torch.no_grad():
        seconds = clock.median_seconds(
            lambda: (backbone.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]),
                     backbone.get_image_features(pixel_values=inputs["pixel_values"])),
            args.repeats,
        )
    rows.append({"method": "frozen backbone", "trainable": 0, "inference_ms_per_sample": seconds * 1e3 / args.batch_size})
    backbone = None  # free it before the methods build their own copies

    for name, build in METHODS.items():
        start = time.perf_counter()
        torch.manual_seed(0)
        model = build(build_backbone(config, device, dtype), args.num_labels).to(device)
        trainable, _ = harness.trainable_parameters(model)
        optimizer = harness.make_optimizer(model, 1e-4)
        model.train()

        def step(model: nn.Module = model, optimizer: torch.optim.Optimizer = optimizer) -> None:
            harness.train_step(model, optimizer, batch)

        step()  # creates the optimizer state, so that the memory below is a steady-state step
        memory = clock.step_memory_bytes(step)
        step_s = clock.median_seconds(step, args.repeats)
        model.eval()
        with torch.no_grad():
            inference_s = clock.median_seconds(lambda model=model: model(**inputs), args.repeats)
        rows.append(
            {
                "method": name,
                "trainable": trainable,
                "step_ms": step_s * 1e3,
                "inference_ms_per_sample": inference_s * 1e3 / args.batch_size,
                "step_memory_gib": memory / 2**30,
                "wall_s": time.perf_counter() - start,
            }
        )
        print(rows[-1], flush=True)
        del model, optimizer, step
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def table(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    """The rows as Markdown, with ratios to MITP, full fine-tuning and the frozen backbone."""
    by = {r["method"]: r for r in rows}
    mitp, full, ref = by["mitp"], by["full-ft"], by["frozen backbone"]
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    lines = [
        f"{'tiny CLIP' if args.tiny else 'CLIP ViT-L/14'} on {device}, {args.dtype}, batch {args.batch_size}, "
        f"medians over {args.repeats} repeats",
        "",
        "| method | trainable params | train step (ms) | x full FT | inference (ms/sample) | x backbone | "
        "step memory above weights (GiB) | x full FT |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        if row is ref:
            lines.append(f"| frozen backbone | 0 | – | – | {row['inference_ms_per_sample']:.3f} | 1.00x | – | – |")
            continue
        lines.append(
            f"| {row['method']} | {row['trainable']:,} | {row['step_ms']:.1f} | {row['step_ms'] / full['step_ms']:.2f}x | "
            f"{row['inference_ms_per_sample']:.3f} | {row['inference_ms_per_sample'] / ref['inference_ms_per_sample']:.2f}x"
            f" | {row['step_memory_gib']:.3f} | {row['step_memory_gib'] / full['step_memory_gib']:.2f}x |"
        )
    lines.append("")
    lines.append(
        f"MITP / full FT: step time {mitp['step_ms'] / full['step_ms']:.2f}x (target <= 0.5x), step memory "
        f"{mitp['step_memory_gib'] / full['step_memory_gib']:.2f}x (target <= 0.4x); MITP inference / backbone "
        f"{mitp['inference_ms_per_sample'] / ref['inference_ms_per_sample']:.2f}x (target <= 1.15x)."
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Parse arguments, measure and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--dtype", choices=list(DTYPES), default="bf16", help="backbone weights' dtype")
    parser.add_argument("--batch-size", type=int, default=None, help="default 32 (tiny: 4)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (default 10; tiny: 2)")
    parser.add_argument("--num-labels", type=int, default=101, help="classes (101: UPMC Food-101)")
    parser.add_argument("--tiny", action="store_true", help="a tiny CLIP config: a smoke check that runs on the CPU")
    args = parser.parse_args(argv)
    args.batch_size = args.batch_size or (4 if args.tiny else 32)
    args.repeats = args.repeats or (2 if args.tiny else 10)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("CUDA is not available here; run with `--device cpu --tiny` for a smoke check.")
    rows = run(args)
    print(table(rows, args))
    return rows


if __name__ == "__main__":
    main()
