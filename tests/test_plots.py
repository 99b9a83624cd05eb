"""The PNGs a person reads: training curves and the memory hub's activation maps beside their example."""

from __future__ import annotations

import numpy as np
import torch

from peft_mitp.plots import activations_figure, plot_activations, training_curves_figure

LOSSES = [{"step": s, "loss": 2.0 / s, "epoch": s / 10} for s in range(1, 6)]


def _eval(step: int, accuracy: float) -> dict:
    return {"step": step, "eval_loss": 1.0, "eval_accuracy": accuracy, "eval_f1_macro": accuracy / 2,
            "eval_runtime": 0.1, "eval_samples_per_second": 10.0, "eval_epoch": 0.5}


def test_one_evaluation_is_drawn_as_a_marked_labelled_point_on_a_labelled_axis():
    fig = training_curves_figure([*LOSSES, _eval(5, 0.75)])
    eval_ax = fig.axes[1]
    assert eval_ax.get_ylabel()
    assert "one evaluation" in eval_ax.get_title() and "step 5" in eval_ax.get_title()
    lines = {line.get_label(): line for line in eval_ax.lines}
    assert set(lines) == {"accuracy", "f1_macro"}  # scores only: no runtime, throughput or epoch
    assert all(line.get_marker() == "o" for line in lines.values())
    assert any("accuracy 0.750" in text.get_text() for text in eval_ax.texts)


def test_several_evaluations_are_drawn_as_a_curve():
    fig = training_curves_figure([*LOSSES, _eval(2, 0.5), _eval(4, 0.6), _eval(5, 0.7)])
    eval_ax = fig.axes[1]
    accuracy = next(line for line in eval_ax.lines if line.get_label() == "accuracy")
    assert list(accuracy.get_xdata()) == [2, 4, 5] and "3 evaluations" in eval_ax.get_title()


def test_activation_maps_are_drawn_beside_the_image_question_and_prediction(tmp_path):
    maps = [(torch.rand(1, 4, 4).softmax(-1), torch.rand(1, 4, 4).softmax(-1)) for _ in range(2)]
    image = np.zeros((64, 64, 3), dtype=np.uint8)
    fig = activations_figure(maps, image=image, text="what color is the shape?", prediction="red")
    example = fig.axes[0]
    assert example.images and example.images[0].get_array().shape[:2] == (64, 64)
    assert "what color is the shape?" in example.get_title()
    assert example.get_xlabel() == "prediction: red"
    assert len([ax for ax in fig.axes if ax.get_title().startswith("pair ")]) == 4  # 2 pairs x 2 directions
    path = plot_activations(maps, tmp_path / "hub.png", image=image, text="q", prediction="red")
    assert path.read_bytes()[:4] == b"\x89PNG"
