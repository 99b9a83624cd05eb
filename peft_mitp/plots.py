"""PNG plots: training curves and the memory hub's activation maps."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def training_curves_figure(log_history: Sequence[dict]) -> Any:
    """The figure of `plot_training_curves`: training loss per logging step, every evaluation metric per evaluation.

    A run that evaluated once (a single-epoch job evaluates after training) has one point per metric: it is
    drawn as a marked, labelled point, and the panel's title says that there was one evaluation and at which step.

    Args:
        log_history: the Trainer's log history (dicts with "step" and "loss" or "eval_*" keys).

    Returns:
        A matplotlib `Figure` with two panels: loss, and evaluation metrics.
    """
    plt = _pyplot()
    train = [(e["step"], e["loss"]) for e in log_history if "loss" in e and "step" in e]
    evals = [e for e in log_history if any(k.startswith("eval_") for k in e)]
    metric_names = sorted(
        {k for e in evals for k in e if k.startswith("eval_") and not k.endswith(("_runtime", "per_second", "epoch"))}
    )
    steps = [e.get("step", 0) for e in evals]
    fig, (loss_ax, eval_ax) = plt.subplots(1, 2, figsize=(10, 4))
    if train:
        loss_ax.plot(*zip(*train, strict=True), label="train loss")
    if "eval_loss" in metric_names:
        loss_ax.plot(steps, [e.get("eval_loss") for e in evals], "o-", label="evaluation loss")
    loss_ax.set(xlabel="step", ylabel="loss", title="Loss")
    if loss_ax.lines:
        loss_ax.legend()
    scores = [name for name in metric_names if name != "eval_loss"]
    for name in scores:
        values = [e.get(name) for e in evals]
        label = name.removeprefix("eval_")
        eval_ax.plot(steps, values, "o-", markersize=8 if len(evals) == 1 else 5, label=label)
        if len(evals) == 1:
            eval_ax.annotate(f"{label} {values[0]:.3f}", (steps[0], values[0]), textcoords="offset points",
                             xytext=(8, 4))
    if len(evals) == 1:
        title = f"Evaluation (one evaluation, after step {steps[0]})"
        eval_ax.set_xlim(steps[0] - max(1, steps[0]) * 0.5, steps[0] + max(1, steps[0]) * 0.5)
    else:
        title = f"Evaluation ({len(evals)} evaluations)" if evals else "Evaluation (none recorded)"
    eval_ax.set(xlabel="step", ylabel="score on the evaluation split", title=title)
    if scores:
        eval_ax.legend()
    fig.tight_layout()
    return fig


def plot_training_curves(log_history: Sequence[dict], path: str | Path) -> Path:
    """Plot training loss per logging step and every evaluation metric per evaluation, from `Trainer.state.log_history`.

    Args:
        log_history: the Trainer's log history (dicts with "step" and "loss" or "eval_*" keys).
        path: where to write the PNG.

    Returns:
        The path written.
    """
    plt = _pyplot()
    fig = training_curves_figure(log_history)
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_confusion_matrix(
    labels: Sequence[int], predictions: Sequence[int], label_names: Sequence[str], path: str | Path,
    title: str | None = None,
) -> Path:
    """A confusion matrix as a PNG: rows are the true labels, columns the predicted ones, each cell a count.

    Args:
        labels: true class ids.
        predictions: predicted class ids, in the same order.
        label_names: class names, in id order.
        path: where to write the PNG.
        title: optional figure title.

    Returns:
        The path written.
    """
    import numpy as np

    plt = _pyplot()
    n = len(label_names)
    counts = np.zeros((n, n), dtype=np.int64)
    for true, predicted in zip(labels, predictions, strict=True):
        counts[true, predicted] += 1
    size = max(4.0, 0.45 * n + 2.5)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    drawn = ax.imshow(counts, cmap="Blues")
    ax.set_xticks(range(n), label_names, rotation=60, ha="right")
    ax.set_yticks(range(n), label_names)
    ax.set(xlabel="predicted label", ylabel="true label", title=title or "Confusion matrix")
    if n <= 30:
        for i in range(n):
            for j in range(n):
                if counts[i, j]:
                    ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=8,
                            color="white" if counts[i, j] > counts.max() / 2 else "black")
    fig.colorbar(drawn, ax=ax, label="examples")
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


def activations_figure(
    activations: Sequence[tuple[torch.Tensor, torch.Tensor]],
    sample: int = 0,
    title: str | None = None,
    *,
    image: Any = None,
    text: str | None = None,
    prediction: str | None = None,
) -> Any:
    """The figure of `plot_activations`: the example (image, text, prediction) beside the hub's activation maps.

    Args:
        activations / sample / title: as for `plot_activations`.
        image: the example's image (a PIL image or an array), drawn in a left column when given.
        text: the example's text (e.g. the question), written above the image.
        prediction: the predicted label, written under the image.

    Returns:
        A matplotlib `Figure`.

    Raises:
        ValueError: there is nothing to draw (see `drawable_activations`).
    """
    import textwrap

    plt = _pyplot()
    activations = drawable_activations(activations)
    if not activations:
        raise ValueError(
            "No hub activations to plot: the adapter has fewer than two interaction pairs or no interaction "
            "(`interaction=False`, `mitp train --no-interaction`)."
        )
    pairs = len(activations)
    example = image is not None or text is not None or prediction is not None
    fig = plt.figure(figsize=(8 + (3.5 if example else 0), max(3.2 * pairs, 4.0 if example else 0)))
    grid = fig.add_gridspec(pairs, 3 if example else 2, width_ratios=[1.1, 1, 1] if example else [1, 1])
    offset = 1 if example else 0
    if example:
        ax = fig.add_subplot(grid[:, 0])
        if image is not None:
            ax.imshow(image)
        ax.set_xticks([])
        ax.set_yticks([])
        if text is not None:
            ax.set_title("\n".join(textwrap.wrap(text, 30)), fontsize=10)
        if prediction is not None:
            ax.set_xlabel(f"prediction: {prediction}", fontsize=11, fontweight="bold")
    for k, (text_act, vision_act) in enumerate(activations):
        for column, act, rows, cols in (
            (offset, text_act, "text prompt", "vision prompt"),
            (offset + 1, vision_act, "vision prompt", "text prompt"),
        ):
            ax = fig.add_subplot(grid[k, column])
            drawn = ax.imshow(act[sample].float().cpu().numpy(), vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
            ax.set(xlabel=cols, ylabel=rows, title=f"pair {k} -> {k + 1}: {rows}s attend")
            fig.colorbar(drawn, ax=ax)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_activations(
    activations: Sequence[tuple[torch.Tensor, torch.Tensor]],
    path: str | Path,
    sample: int = 0,
    title: str | None = None,
    *,
    image: Any = None,
    text: str | None = None,
    prediction: str | None = None,
) -> Path:
    """Heat maps of the hub's activation vectors for one sample, one row of panels per interaction pair.

    Left panel of pair k: which vision prompts (columns) each text prompt (rows) drew from when the prompts of pair
    k+1 were generated; right panel: the same from the vision side. With `image`, `text` or `prediction`, the
    example itself is drawn in a column to the left of the maps.

    Args:
        activations: `output.attentions` of a forward with `output_hub_activations=True`.
        path: where to write the PNG.
        sample: which sample of the batch to draw.
        title: optional figure title.
        image / text / prediction: the example the maps belong to (see `activations_figure`).

    Returns:
        The path written.

    Raises:
        ValueError: there is nothing to draw (see `drawable_activations`).
    """
    plt = _pyplot()
    fig = activations_figure(activations, sample, title, image=image, text=text, prediction=prediction)
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
