"""Per-forward state stays per forward: models used alternately, nested or from several threads give the logits (and
gradients) each forward gives alone.

The lock-step scheduler keeps prompts, read-outs and carries in its local variables (docs/lockstep.md): nothing of a
forward is stored on the model, so two forwards in flight at the same time, in one thread or in two, cannot see each
other's state. These tests force the overlap rather than hoping for it.
"""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import clip_inputs, make_model
from torch.utils.hooks import RemovableHandle

import peft_mitp
from peft_mitp import MITPConfig

ITERATIONS = 12


def _model(seed: int, **config) -> torch.nn.Module:
    """A tiny CLIP with an MITP adapter whose hub is moved off its zero-initialised gates."""
    model = make_model(MITPConfig(**{"prompt_length": 4, "num_interaction_layers": 3, "hub_dim": 16, **config}),
                       seed=seed).eval()
    with torch.no_grad():
        for param in model.base_model.mitp_hub["default"].parameters():
            param.normal_(std=0.2)
    return model


def _second_text_interaction_layer(model: torch.nn.Module) -> torch.nn.Module:
    """The wrapped layer of interaction pair 1 in the text tower: by then the hub has produced a carry in flight."""
    layers = model.base_model.model.backbone.text_model.encoder.layers
    layer = layers[model.peft_config["default"].text_layers[1]]
    assert isinstance(layer, peft_mitp.MITPLayer)
    return layer.base_layer


@pytest.fixture(scope="module")
def models() -> tuple[torch.nn.Module, torch.nn.Module]:
    # Different seeds and prompt lengths: any state carried over from the other model would change the logits.
    return _model(seed=0), _model(seed=1, prompt_length=3, vision_prompt_length=5)


def test_two_models_used_alternately_give_their_own_logits(models):
    first, second = models
    inputs = [clip_inputs(batch=b, seed=s) for b, s in ((4, 10), (2, 11), (3, 12))]
    with torch.no_grad():
        alone = {(id(m), i): m(**x).logits for m in models for i, x in enumerate(inputs)}
        for step in range(6):
            for model in (first, second) if step % 2 else (second, first):
                i = step % len(inputs)
                assert torch.equal(model(**inputs[i]).logits, alone[(id(model), i)])


def test_a_forward_nested_inside_another_forward_leaves_both_intact(models):
    """Model B runs to completion while model A's towers are paused mid-forward, with a hub carry in flight."""
    first, second = models
    outer_inputs, inner_inputs = clip_inputs(batch=4, seed=13), clip_inputs(batch=2, seed=14)
    with torch.no_grad():
        outer_alone, inner_alone = first(**outer_inputs).logits, second(**inner_inputs).logits
    inner_results = []
    hook = _second_text_interaction_layer(first).register_forward_pre_hook(
        lambda *_: inner_results.append(second(**inner_inputs).logits)
    )
    try:
        with torch.no_grad():
            outer = first(**outer_inputs).logits
    finally:
        hook.remove()
    assert len(inner_results) == 1
    assert torch.equal(inner_results[0], inner_alone)
    assert torch.equal(outer, outer_alone)


def _run_in_threads(work, barrier: threading.Barrier) -> None:
    """Run `work(0)` and `work(1)` in two threads; re-raise the first failure (after releasing the other thread)."""
    errors: list[BaseException] = []

    def guarded(index: int) -> None:
        try:
            work(index)
        except BaseException as exc:
            errors.append(exc)
            barrier.abort()  # do not leave the other thread waiting for a partner that is gone

    threads = [threading.Thread(target=guarded, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


def _force_overlap(model: torch.nn.Module) -> tuple[threading.Barrier, RemovableHandle]:
    """Make every forward of `model` wait mid-forward (text pair 1, a carry in flight) until another thread's forward
    is there too: the two threads' forwards are then certainly in flight at the same time."""
    barrier = threading.Barrier(2, timeout=120)  # the timeout only ends a deadlock; no test measures time

    def wait(*_) -> None:  # a pre-hook's return value would replace the layer's inputs: return nothing
        barrier.wait()

    return barrier, _second_text_interaction_layer(model).register_forward_pre_hook(wait)


def test_one_model_used_from_two_threads_gives_each_thread_its_own_logits(models):
    model = models[0]
    inputs = [clip_inputs(batch=4, seed=20), clip_inputs(batch=2, seed=21)]
    with torch.no_grad():
        expected = [model(**x).logits for x in inputs]
    results: dict[int, list[torch.Tensor]] = {0: [], 1: []}

    def work(index: int) -> None:
        with torch.no_grad():  # grad mode is per thread
            for _ in range(ITERATIONS):
                results[index].append(model(**inputs[index]).logits)

    barrier, handle = _force_overlap(model)
    try:
        _run_in_threads(work, barrier)
    finally:
        handle.remove()
    for index in (0, 1):
        assert len(results[index]) == ITERATIONS
        assert all(torch.equal(logits, expected[index]) for logits in results[index])


def test_training_forwards_in_two_threads_give_each_thread_its_own_gradients(models):
    model = models[0]
    adapter = [p for p in model.parameters() if p.requires_grad]
    inputs = [clip_inputs(batch=4, seed=30), clip_inputs(batch=3, seed=31)]
    labels = [torch.tensor([0, 1, 2, 3]), torch.tensor([4, 0, 1])]

    def gradients(index: int) -> list[torch.Tensor]:
        loss = model(**inputs[index], labels=labels[index]).loss
        return list(torch.autograd.grad(loss, adapter))  # not `.backward()`: the threads share `.grad`

    expected = [gradients(0), gradients(1)]
    results: dict[int, list[list[torch.Tensor]]] = {0: [], 1: []}

    def work(index: int) -> None:
        for _ in range(ITERATIONS // 3):
            results[index].append(gradients(index))

    barrier, handle = _force_overlap(model)
    try:
        _run_in_threads(work, barrier)
    finally:
        handle.remove()
    for index in (0, 1):
        assert len(results[index]) == ITERATIONS // 3
        for grads in results[index]:
            assert all(torch.equal(g, e) for g, e in zip(grads, expected[index], strict=True))
