"""Training-step memory and FLOPs of MITP against LoRA on one decoder vision-language model, side by side.

The model is a LLaVA of modest size built from its config with random weights (no download): a CLIP vision tower of 8
layers of width 256 on 64x64 images (64 patches) and a Llama language model of 8 layers of width 256, so the shapes
are those of a real decoder VLM, scaled down. Both methods train on the same batch (4 samples: 64 image tokens and 16
text tokens each) in one process, alternately:

- MITP: the default `MITPConfig()` layout (4 pairs, 8 prompts, hub 512), head on the language model's last token;
- LoRA r=8 on every attention projection (q, k, v, o) of both parts, with the same linear head
  (`modules_to_save`), on the same `MITPForImageTextClassification` task model with its adapter disabled.

Measured: the tensor memory a training step adds on top of the model (`harness.TensorMemoryTracker`: activations kept
for backward, temporaries, gradients, optimizer state), and the FLOPs of one forward + backward
(`torch.utils.flop_counter.FlopCounterMode`). Ratios MITP / LoRA are reported; nothing here depends on wall-clock.

Run from the repository root: `python benchmarks/decoder_vlm_cost.py` (under a minute on 2 cores). Writes
`benchmarks/results/decoder_vlm_cost/report.md` and `results.json`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModel, LlavaConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python benchmarks/decoder_vlm_cost.py`

from benchmarks import harness  # noqa: E402
from peft_mitp import MITPConfig, MITPForImageTextClassification  # noqa: E402

OUTPUT = Path(__file__).parent / "results" / "decoder_vlm_cost"
IMAGE_TOKEN = 1000
WIDTH = 256


def build_task_model(seed: int = 0) -> MITPForImageTextClassification:
    """The scaled-down LLaVA, wrapped for classification (10 classes)."""
    config = LlavaConfig(
        text_config={"model_type": "llama", "hidden_size": WIDTH, "intermediate_size": 4 * WIDTH,
                     "num_hidden_layers": 8, "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 2048},
        vision_config={"model_type": "clip_vision_model", "hidden_size": WIDTH, "intermediate_size": 4 * WIDTH,
                       "num_hidden_layers": 8, "num_attention_heads": 4, "image_size": 64, "patch_size": 8},
        image_token_id=IMAGE_TOKEN,
        vision_feature_layer=-2,
    )
    torch.manual_seed(seed)
    return MITPForImageTextClassification.from_backbone(AutoModel.from_config(config).eval(), num_labels=10)


def batch(size: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    text = torch.randint(2, 1000, (size, 16), generator=g)
    ids = torch.cat([torch.ones(size, 1, dtype=torch.long), torch.full((size, 64), IMAGE_TOKEN), text], dim=1)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "pixel_values": torch.randn(size, 3, 64, 64, generator=g), "labels": torch.randint(0, 10, (size,))}


def methods() -> dict[str, torch.nn.Module]:
    mitp = get_peft_model(build_task_model(), MITPConfig())
    lora = get_peft_model(build_task_model(), LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], modules_to_save=["classifier"]))
    return {"MITP": mitp, "LoRA r=8": lora}


def measure(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, float]:
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)

    def step() -> None:
        model(**inputs).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # the optimizer state exists from here on
    tracker = harness.TensorMemoryTracker()
    with tracker:
        step()
    with FlopCounterMode(display=False) as flops:
        model(**inputs).loss.backward()
    optimizer.zero_grad(set_to_none=True)
    return {"trainable": sum(p.numel() for p in trainable), "step_peak_mib": tracker.peak_bytes / 2**20,
            "train_gflops": flops.get_total_flops() / 1e9}


def main() -> None:
    torch.set_num_threads(1)
    inputs = batch()
    results = {name: measure(model, inputs) for name, model in methods().items()}
    mitp, lora = results["MITP"], results["LoRA r=8"]
    lines = [
        "| method | trainable parameters | training-step tensor memory (MiB) | forward + backward GFLOPs |",
        "| --- | ---: | ---: | ---: |",
        *[f"| {name} | {r['trainable']:,} | {r['step_peak_mib']:.1f} | {r['train_gflops']:.2f} |"
          for name, r in results.items()],
        f"| MITP / LoRA | | {mitp['step_peak_mib'] / lora['step_peak_mib']:.2f}x | "
        f"{mitp['train_gflops'] / lora['train_gflops']:.2f}x |",
    ]
    text = "\n".join(lines)
    harness.write_report(OUTPUT, {"results": results, "machine": harness.machine_info()}, text)


if __name__ == "__main__":
    main()
