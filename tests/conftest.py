"""Shared fixtures: tiny dual encoders built from configs (no downloads) and matching inputs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import CLIPConfig, CLIPModel

import peft_mitp

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

VOCAB = 99
EOS = VOCAB - 1
PAD = 0


def tiny_clip_config(text_layers: int = 4, vision_layers: int = 6) -> CLIPConfig:
    """A CLIP config small enough for CPU tests: text 32 wide, vision 48 wide, different depths."""
    return CLIPConfig(
        text_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=text_layers,
            num_attention_heads=4,
            vocab_size=VOCAB,
            max_position_embeddings=24,
            eos_token_id=EOS,
            bos_token_id=EOS - 1,
            pad_token_id=PAD,
        ),
        vision_config=dict(
            hidden_size=48,
            intermediate_size=96,
            num_hidden_layers=vision_layers,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=24,
    )


def tiny_clip(seed: int = 0, attn_implementation: str = "sdpa", **kwargs) -> CLIPModel:
    torch.manual_seed(seed)
    return CLIPModel._from_config(tiny_clip_config(**kwargs), attn_implementation=attn_implementation).eval()


def clip_inputs(batch: int = 4, length: int = 7, seed: int = 1) -> dict[str, torch.Tensor]:
    """Unpadded token ids ending in EOS, and random images."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, EOS - 1, (batch, length), generator=g)
    ids[:, -1] = EOS
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values": torch.randn(batch, 3, 32, 32, generator=g),
    }


def make_model(config: peft_mitp.MITPConfig | None = None, num_labels: int = 5, seed: int = 0, **clip_kwargs):
    from peft import get_peft_model

    base = peft_mitp.MITPForImageTextClassification.from_backbone(tiny_clip(seed, **clip_kwargs), num_labels=num_labels)
    torch.manual_seed(seed + 100)
    config = config or peft_mitp.MITPConfig(prompt_length=4, num_interaction_layers=2, hub_dim=16)
    return get_peft_model(base, config)


def run_python(code: str, cwd: Path, env: dict[str, str] | None = None, timeout: int = 240) -> str:
    """Run `code` in a fresh Python process (a new interpreter: nothing shared with the test process).

    The child gets the test process's torch thread count: float sums split over another number of threads round
    differently, and the fresh-process tests compare logits bit for bit.
    """
    full_env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode != 0:
        raise AssertionError(f"subprocess failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


@pytest.fixture(autouse=True)
def _torch_threads_unchanged():
    """Fail a test that leaves torch on another thread count: later bit-for-bit comparisons depend on it."""
    before = torch.get_num_threads()
    yield
    after = torch.get_num_threads()
    if after != before:
        torch.set_num_threads(before)
        pytest.fail(f"the test changed torch's thread count from {before} to {after} and did not restore it")


@pytest.fixture
def inputs() -> dict[str, torch.Tensor]:
    return clip_inputs()
