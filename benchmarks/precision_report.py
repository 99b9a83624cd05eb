"""How far a bf16 or fp16 backbone moves MITP's logits and adapter gradients from the fp32 ones.

The adapter (prompts, memory hub, head) stays in float32 whatever the backbone's dtype (`MITPModel` upcasts it and
the hub casts its inputs). This script builds one randomly initialised CLIP-shaped dual encoder with an MITP adapter
whose hub is perturbed away from its zero-initialised gates (so the cross-modal path matters), builds the
same weights with the backbone in each dtype (cast before the adapter is added, so the adapter stays float32) and
each attention implementation, runs one training step's forward and backward on the same batch, and prints a
Markdown table of

- the largest absolute logit difference to fp32 (and the largest fp32 logit, for scale),
- per adapter tensor, the change of its gradient norm relative to the norm of the whole fp32 adapter gradient (the
  largest over tensors),
- whether every logit, the loss and every adapter gradient stayed finite, and whether the adapter stayed float32.

The batch mixes the awkward inputs the precision tests cover: padded texts, a text of only special tokens and a text
at the position-embedding limit. The hub cases (`CASES`) push its softmax to one-hot or flat rows (temperature 1e-4 or
1e4), scale its consolidation maps by 1e3, or both.

Run from the repository root: `python benchmarks/precision_report.py` (the tiny backbone, every hub case: about a
minute on 2 CPU cores; fp16 matmuls are slow on CPU); `--size small --cases default` uses a wider, deeper backbone.
The tables in docs/reliability.md come from exactly these two commands.
"""

from __future__ import annotations

import argparse

import torch
from peft import get_peft_model
from transformers import CLIPConfig, CLIPModel

import peft_mitp

SIZES = {
    # text width / depth, vision width / depth, heads, image side, patch, text positions
    "tiny": dict(text=(32, 4), vision=(48, 6), heads=4, image=32, patch=8, positions=24),
    "small": dict(text=(256, 6), vision=(384, 8), heads=8, image=64, patch=8, positions=40),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Hub settings: name -> (softmax temperature, factor on the consolidation maps `text_in` / `vision_in`).
CASES = {
    "default": (None, 1.0),
    "temperature 1e-4": (1e-4, 1.0),  # saturated activations (one-hot rows)
    "temperature 1e4": (1e4, 1.0),  # flat activations (uniform rows)
    "maps x1e3": (None, 1e3),  # large hub features: large similarities and large carried prompts
    "maps x1e3, temperature 1e-4": (1e-4, 1e3),  # similarities of order 1e10
}
VOCAB = 99


def build(size: str, attn: str, dtype: torch.dtype, case: str, seed: int) -> torch.nn.Module:
    """The task model on a `dtype` backbone with an MITP adapter, hub perturbed.

    The backbone is cast before the adapter is added, as a user loading it with `dtype=torch.bfloat16` would: peft
    then keeps the adapter in float32. The same seed gives the same weights (and adapter) for every dtype.
    """
    spec = SIZES[size]
    config = CLIPConfig(
        text_config=dict(
            hidden_size=spec["text"][0], intermediate_size=2 * spec["text"][0], num_hidden_layers=spec["text"][1],
            num_attention_heads=spec["heads"], vocab_size=VOCAB, max_position_embeddings=spec["positions"],
            eos_token_id=VOCAB - 1, bos_token_id=VOCAB - 2, pad_token_id=0,
        ),
        vision_config=dict(
            hidden_size=spec["vision"][0], intermediate_size=2 * spec["vision"][0], num_hidden_layers=spec["vision"][1],
            num_attention_heads=spec["heads"], image_size=spec["image"], patch_size=spec["patch"],
        ),
        projection_dim=spec["text"][0],
    )
    temperature, scale = CASES[case]
    torch.manual_seed(seed)
    clip = CLIPModel._from_config(config, attn_implementation=attn).eval().to(dtype)
    task = peft_mitp.MITPForImageTextClassification.from_backbone(clip, num_labels=7)
    model = get_peft_model(
        task, peft_mitp.MITPConfig(prompt_length=8, num_interaction_layers=3, hub_dim=32, temperature=temperature)
    )
    hub = model.base_model.mitp_hub["default"]
    with torch.no_grad():
        for param in hub.parameters():
            param.normal_(std=0.2)
        hub.text_in.weight.mul_(scale)
        hub.vision_in.weight.mul_(scale)
    return model


def batch(size: str, seed: int) -> dict[str, torch.Tensor]:
    """Six samples: padded texts, a special-tokens-only text, a text at the position limit."""
    spec = SIZES[size]
    g = torch.Generator().manual_seed(seed)
    length = spec["positions"]
    ids = torch.randint(1, VOCAB - 2, (6, length), generator=g)
    mask = torch.ones_like(ids)
    for row, real in enumerate([length, length // 2, 5, 2, length, 3]):
        ids[row, real - 1] = VOCAB - 1  # EOS closes the real text
        ids[row, real:] = 0
        mask[row, real:] = 0
    ids[3, 0] = VOCAB - 2  # row 3: BOS, EOS and padding only
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "pixel_values": torch.randn(6, 3, spec["image"], spec["image"], generator=g),
        "labels": torch.arange(6) % 7,
    }


def step(model: torch.nn.Module, inputs: dict[str, torch.Tensor], dtype: torch.dtype) -> tuple:
    """Forward and backward once; return (logits, loss, {adapter parameter: gradient norm})."""
    model.zero_grad(set_to_none=True)
    out = model(**{**inputs, "pixel_values": inputs["pixel_values"].to(dtype)})
    out.loss.backward()
    grads = {n: p.grad.float().norm() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    return out.logits.detach().float(), out.loss.detach().float(), grads


def report(size: str, case: str, seed: int) -> list[str]:
    """Markdown table rows for one backbone size and hub case."""
    inputs = batch(size, seed)
    rows = []
    for attn in ("sdpa", "eager"):
        reference = build(size, attn, torch.float32, case, seed)
        ref_logits, _, ref_grads = step(reference, inputs, torch.float32)
        ref_total = torch.stack(list(ref_grads.values())).norm()
        for name, dtype in DTYPES.items():
            if dtype is torch.float32:
                continue
            model = build(size, attn, dtype, case, seed)
            logits, loss, grads = step(model, inputs, dtype)
            finite = bool(torch.isfinite(logits).all() and torch.isfinite(loss) and all(
                torch.isfinite(g) for g in grads.values()))
            logit_diff = (logits - ref_logits).abs().max().item()
            # Per adapter tensor, the change of its gradient norm, relative to the whole adapter gradient's norm.
            grad_diff = max(((grads[n] - g).abs() / ref_total).item() for n, g in ref_grads.items())
            adapter_fp32 = all(p.dtype == torch.float32 for n, p in model.named_parameters() if p.requires_grad)
            rows.append(
                f"| {size} | {case} | {attn} | {name} | {logit_diff:.2e} | "
                f"{ref_logits.abs().max().item():.2f} | {grad_diff:.2e} | {'yes' if finite else 'NO'} | "
                f"{'yes' if adapter_fp32 else 'NO'} |"
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), nargs="+", default=["tiny"], help="backbone size(s)")
    parser.add_argument("--cases", choices=sorted(CASES), nargs="+", default=list(CASES), help="hub settings")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(
        "| backbone | hub | attention | dtype | max abs logit diff vs fp32 | max abs fp32 logit | "
        "max adapter grad-norm diff / fp32 grad norm | all finite | adapter fp32 |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for size in args.size:
        for case in args.cases:
            for row in report(size, case, args.seed):
                print(row, flush=True)


if __name__ == "__main__":
    main()
