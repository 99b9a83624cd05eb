"""A different MITP adapter per sample in one batch (`adapter_names`), against one forward per sample and adapter."""

from __future__ import annotations

import pytest
import torch
from conftest import clip_inputs, tiny_clip
from peft import get_peft_model

from peft_mitp import MITPConfig, MITPForImageTextClassification

LAYOUT = dict(num_interaction_layers=2, prompt_length=4, hub_dim=16)


def three_adapters():
    """Adapters "a" (5 labels, the task model's head), "b" (3 labels) and "c" (5 labels, no memory) on one backbone."""
    torch.manual_seed(0)
    task = MITPForImageTextClassification.from_backbone(tiny_clip(0), num_labels=5)
    model = get_peft_model(task, MITPConfig(**LAYOUT, gate_init=0.5), adapter_name="a")
    model.add_adapter("b", MITPConfig(**LAYOUT, gate_init=0.3, num_labels=3))
    model.add_adapter("c", MITPConfig(**LAYOUT, gate_init=0.7, memory=False, consolidation="joint"))
    with torch.no_grad():  # as if trained: every hub's standardisers set, so its token consolidation takes part
        for name, buffer in model.named_buffers():
            if "mitp_hub" in name:
                buffer.uniform_(0.5, 1.5) if name.endswith(".scale") else buffer.normal_(std=0.3)
    return model.eval()


def alone(model, inputs, i, name):
    one = {k: v[i : i + 1] for k, v in inputs.items()}
    if name == "__base__":
        with model.disable_adapter():
            return model(**one)
    model.set_adapter(name)
    return model(**one)


def test_each_sample_gets_the_logits_of_its_own_adapter_run_alone():
    model = three_adapters()
    inputs = clip_inputs(batch=6, seed=3)
    names = ["a", "b", "__base__", "c", "b", "a"]
    labels = torch.tensor([4, 2, 1, 0, 1, 3])
    with torch.no_grad():
        mixed = model(**inputs, adapter_names=names, labels=labels, output_hub_activations=True)
        assert mixed.logits.shape == (6, 5)
        losses = []
        for i, name in enumerate(names):
            expected = alone(model, {**inputs, "labels": labels}, i, name)
            width = expected.logits.shape[-1]
            torch.testing.assert_close(mixed.logits[i, :width], expected.logits[0], atol=1e-6, rtol=1e-5)
            assert torch.isneginf(mixed.logits[i, width:]).all()  # beyond its own head
            losses.append(expected.loss)
    torch.testing.assert_close(mixed.loss, torch.stack(losses).mean(), atol=1e-6, rtol=1e-5)
    text_activation, _ = mixed.attentions[0]
    assert torch.equal(text_activation[2], torch.zeros_like(text_activation[2]))  # the base sample used no hub


def test_inside_disable_adapter_every_sample_runs_the_base_model():
    model = three_adapters()
    inputs = clip_inputs(batch=3, seed=3)
    with torch.no_grad(), model.disable_adapter():
        named = model(**inputs, adapter_names=["a", "b", "c"]).logits
        base = model(**inputs).logits
    assert torch.equal(named, base)


def test_the_adapters_differ_so_the_test_above_can_fail():
    model = three_adapters()
    inputs = clip_inputs(batch=3, seed=3)
    with torch.no_grad():
        a = model(**inputs, adapter_names=["a", "a", "a"]).logits
        c = model(**inputs, adapter_names=["c", "c", "c"]).logits
    assert not torch.allclose(a, c, atol=1e-3)


def test_a_decoder_vlm_runs_mixed_batches_too():
    from test_decoder_vlms import build, make_inputs

    torch.manual_seed(0)
    task = MITPForImageTextClassification.from_backbone(build("gemma3"), num_labels=3)
    model = get_peft_model(task, MITPConfig(**LAYOUT, gate_init=0.5), adapter_name="a")
    model.add_adapter("b", MITPConfig(**LAYOUT, gate_init=0.2, num_labels=4))
    model.eval()
    inputs = make_inputs("gemma3", task.backbone, padding="left")
    names = ["b", "a"]
    with torch.no_grad():
        mixed = model(**inputs, adapter_names=names).logits
        for i, name in enumerate(names):
            keep = inputs["attention_mask"][i].bool()
            one = {k: (v[i : i + 1, keep] if v.dim() == 2 else v[i : i + 1]) for k, v in inputs.items()}
            model.set_adapter(name)
            expected = model(**one).logits
            torch.testing.assert_close(mixed[i, : expected.shape[-1]], expected[0], atol=2e-5, rtol=1e-4)


def test_bad_adapter_names_are_refused_before_any_compute():
    model = three_adapters()
    inputs = clip_inputs(batch=2)
    with pytest.raises(ValueError, match="Trying to infer with non-existing adapter\\(s\\): nope"):
        model(**inputs, adapter_names=["a", "nope"])
    with pytest.raises(ValueError, match="names 3 samples but `input_ids` holds 2"):
        model(**inputs, adapter_names=["a", "b", "c"])
    with pytest.raises(TypeError, match="one per sample"):
        model(**inputs, adapter_names="a")
    model.train()
    with pytest.raises(ValueError, match="Cannot pass `adapter_names` when the model is in training mode"):
        model(**inputs, adapter_names=["a", "b"])
    model.eval()
    model.add_adapter("wide", MITPConfig(num_interaction_layers=3, prompt_length=4, hub_dim=16))
    with pytest.raises(ValueError, match="must share their interaction layers and prompt lengths"):
        model(**inputs, adapter_names=["a", "wide"])
    model.add_adapter("missing", MITPConfig(**LAYOUT, missing_modality=True))
    with pytest.raises(ValueError, match="missing_modality=True"):
        model(**inputs, adapter_names=["a", "missing"])
    with pytest.raises(ValueError, match="missing modalities"):
        model(**inputs, adapter_names=["a", "b"], image_present=torch.tensor([True, True]))


def test_packed_and_tiled_vision_towers_are_refused_in_mixed_batches():
    from test_decoder_vlms import build, make_inputs

    task = MITPForImageTextClassification.from_backbone(build("qwen2_vl"), num_labels=3)
    model = get_peft_model(task, MITPConfig(**LAYOUT), adapter_name="a").eval()
    with torch.no_grad(), pytest.raises(NotImplementedError, match="tiles, crops or packed patches"):
        model(**make_inputs("qwen2_vl", task.backbone), adapter_names=["a", "a"])
