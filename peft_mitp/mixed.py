"""A different MITP adapter per sample in one batch: `model(**batch, adapter_names=["food", "snli", "__base__", ...])`.

As with peft's LoRA, several adapters are loaded on one backbone (`load_adapter`) and each sample names the adapter it
runs with; `"__base__"` runs a sample without any adapter. The backbone runs once for the whole batch in one
lock-step forward: each interaction layer appends every sample's own prompts (a "__base__" sample's tokens do not see
the prompt positions, so it gets the stock output), each adapter's hub consolidates its own samples' read-outs, and
each sample is classified by its adapter's head.

Contract (docs/api.md, "Mixed-adapter batches"):

- inference only (`model.eval()`), as for peft's LoRA;
- the adapters of one batch share their interaction layers and prompt lengths (their hubs, prompts and heads may
  differ in everything else, heads in size too);
- `logits` has as many columns as the widest head of the batch; a sample's columns beyond its own head's size are
  `-inf` (so `softmax` and `argmax` ignore them); `loss`, with `labels`, is the mean over samples of each sample's
  loss under its own head;
- no missing modalities (`image_present` / `text_present`), no packed or tiled images (Qwen2-VL, LLaVA-NeXT tiles,
  Idefics3 crops).
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from .hub import HubOutput

BASE = "__base__"
"""The name of a sample that runs without any adapter (peft's convention)."""

__all__ = ["BASE", "MixedBatch", "current_mixed_batch", "mixed_batch", "mixed_carry_only", "mixed_hub_output"]


@dataclass(frozen=True)
class MixedBatch:
    """Which adapter each sample of the current forward runs with.

    Attributes:
        names: the adapter name of each sample, in batch order.
        groups: adapter name -> (rows,) indices of its samples (`BASE` included when used), in first-use order.
    """

    names: tuple[str, ...]
    groups: dict[str, torch.Tensor]

    @property
    def adapters(self) -> list[str]:
        """The adapters used (without `BASE`)."""
        return [name for name in self.groups if name != BASE]

    def table_index(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(index into `adapters` per sample, 0 for base samples; whether each sample has an adapter)."""
        order = {name: i for i, name in enumerate(self.adapters)}
        index = torch.tensor([order.get(name, 0) for name in self.names])
        active = torch.tensor([name != BASE for name in self.names])
        return index, active


_MIXED: contextvars.ContextVar[MixedBatch | None] = contextvars.ContextVar("mitp_mixed_batch", default=None)


def current_mixed_batch() -> MixedBatch | None:
    """The mixed-adapter batch of the running forward, or None."""
    return _MIXED.get()


@contextmanager
def mixed_batch(names: Sequence[str]) -> Iterator[MixedBatch]:
    """Run the forwards inside with one adapter per sample (`names`, already checked by the tuner)."""
    groups: dict[str, list[int]] = {}
    for row, name in enumerate(names):
        groups.setdefault(name, []).append(row)
    batch = MixedBatch(tuple(names), {name: torch.tensor(rows) for name, rows in groups.items()})
    token = _MIXED.set(batch)
    try:
        yield batch
    finally:
        _MIXED.reset(token)


def _scatter(parts: dict[str, torch.Tensor | None], groups: dict[str, torch.Tensor], size: int) -> torch.Tensor | None:
    """Each group's rows put back in batch order (zeros for rows no group filled); None when no group has any."""
    present = {name: part for name, part in parts.items() if part is not None}
    if not present:
        return None
    first = next(iter(present.values()))
    full = first.new_zeros((size, *first.shape[1:]))
    for name, part in present.items():
        full = full.index_copy(0, groups[name].to(part.device), part)
    return full


def mixed_hub_output(hubs: Any, batch: MixedBatch, text: torch.Tensor, vision: torch.Tensor) -> HubOutput:
    """Each adapter's hub on its own samples' read-outs; the carries and activations back in batch order.

    Base samples get zero carries (their prompts are hidden from their tokens anyway).
    """
    outputs = {name: hubs[name](text[rows.to(text.device)], vision[rows.to(vision.device)])
               for name, rows in batch.groups.items() if name != BASE}
    size = text.shape[0]
    return HubOutput(
        text_prompts=_scatter({n: o.text_prompts for n, o in outputs.items()}, batch.groups, size),
        vision_prompts=_scatter({n: o.vision_prompts for n, o in outputs.items()}, batch.groups, size),
        text_activation=_scatter({n: o.text_activation for n, o in outputs.items()}, batch.groups, size),
        vision_activation=_scatter({n: o.vision_activation for n, o in outputs.items()}, batch.groups, size),
    )


def mixed_carry_only(hubs: Any, batch: MixedBatch, tower: str, readout: torch.Tensor) -> torch.Tensor | None:
    """`MemoryHub.carry_only` per sample: each sample's adapter's hub decides whether its read-out is carried.

    Returns None when no adapter of the batch carries memory; base samples and samples of memory-less adapters get
    zeros.
    """
    parts = {name: hubs[name].carry_only(tower, readout[rows.to(readout.device)])
             for name, rows in batch.groups.items() if name != BASE}
    return _scatter(parts, batch.groups, readout.shape[0])
