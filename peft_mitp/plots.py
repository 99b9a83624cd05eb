"""PNG plots: training curves and the memory hub's activation maps."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def plot_training_curves(log_history: Sequence[dict], path: str | Path) -> Path:
    """Plot training loss per logging step and every evaluation metric per evaluation, from `Trainer.state.log_history`.

    Args:
        log_history: the Trainer's log history (dicts with "step" and "loss" or "eval_*" keys).
        path: where to write the PNG.

    Returns:
        The path written.
    """
    plt = _pyplot()
    train = [(e["step"], e["loss"]) for e in log_history if "loss" in e and "step" in e]
    evals = [e for e in log_history if any(k.startswith("eval_") for k in e)]
    metric_names = sorted(
        {k for e in evals for k in e if k.startswith("eval_") and not k.endswith(("_runtime", "per_second"))}
    )
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    if train:
        axes[0].plot(*zip(*train, strict=True), label="train loss")
    if "eval_loss" in metric_names:
        axes[0].plot([e["step"] for e in evals], [e["eval_loss"] for e in evals], "o-", label="eval loss")
    axes[0].set(xlabel="step", ylabel="loss", title="Loss")
    axes[0].legend()
    for name in metric_names:
        if name != "eval_loss":
            axes[1].plot([e["step"] for e in evals], [e.get(name) for e in evals], "o-", label=name.removeprefix("eval_"))
    axes[1].set(xlabel="step", title="Evaluation metrics")
    if len(metric_names) > 1:
        axes[1].legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def drawable_activations(
    activations: Sequence[tuple[torch.Tensor | None, torch.Tensor | None]] | None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The pairs of `output.attentions` that have activation maps (none without interaction: `interaction=False`).

    Args:
        activations: `output.attentions` of a forward with `output_hub_activations=True` (None or empty without pairs
            that feed a next pair).

    Returns:
        The (text, vision) activation pairs that can be drawn, in pair order; empty when there is nothing to draw.
    """
    return [(t, v) for t, v in activations or () if t is not None and v is not None]


def plot_activations(
    activations: Sequence[tuple[torch.Tensor, torch.Tensor]], path: str | Path, sample: int = 0, title: str | None = None
) -> Path:
    """Heat maps of the hub's activation vectors for one sample, one row of panels per interaction pair.

    Left panel of pair k: which vision prompts (columns) each text prompt (rows) drew from when the prompts of pair
    k+1 were generated; right panel: the same from the vision side.

    Args:
        activations: `output.attentions` of a forward with `output_hub_activations=True`.
        path: where to write the PNG.
        sample: which sample of the batch to draw.
        title: optional figure title (e.g. the question).

    Returns:
        The path written.

    Raises:
        ValueError: there is nothing to draw (see `drawable_activations`).
    """
    plt = _pyplot()
    activations = drawable_activations(activations)
    if not activations:
        raise ValueError(
            "No hub activations to plot: the adapter has fewer than two interaction pairs or no interaction "
            "(`interaction=False`, `mitp train --no-interaction`)."
        )
    pairs = len(activations)
    fig, axes = plt.subplots(pairs, 2, figsize=(8, 3.2 * pairs), squeeze=False)
    for k, (text_act, vision_act) in enumerate(activations):
        for ax, act, rows, cols in (
            (axes[k][0], text_act, "text prompt", "vision prompt"),
            (axes[k][1], vision_act, "vision prompt", "text prompt"),
        ):
            image = ax.imshow(act[sample].float().cpu().numpy(), vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
            ax.set(xlabel=cols, ylabel=rows, title=f"pair {k} -> {k + 1}: {rows}s attend")
            fig.colorbar(image, ax=ax)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
