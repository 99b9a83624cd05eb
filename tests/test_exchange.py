"""The cross-modal exchange works: through the memory hub, each tower's output depends on the other modality.

These tests read the towers' pooled outputs (what the head sees) after a few training steps on a tiny CLIP, so they
fail if the hub's generated term stops reaching the next interaction layer, if a gate or map never learns, or if the
ablation switches stop meaning what they say.
"""

from __future__ import annotations

import pytest
import torch
from conftest import clip_inputs, make_model

import peft_mitp
from peft_mitp.hub import MemoryHub


def _train(model, inputs, steps: int, lr: float = 1e-2) -> list[dict[str, torch.Tensor]]:
    """`steps` AdamW steps on a fixed batch; returns each step's gradients of the hub's tensors."""
    labels = torch.arange(inputs["input_ids"].shape[0]) % 5
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    hub = model.base_model.mitp_hub["default"]
    grads = []
    model.train()
    for _ in range(steps):
        model(**inputs, labels=labels).loss.backward()
        grads.append({name: p.grad.detach().clone() for name, p in hub.named_parameters()})
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    return grads


def _pooled(model, inputs) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        text, image, _ = model.base_model.model.pooled_features(**inputs)
    return text, image


def _config(**changes) -> peft_mitp.MITPConfig:
    return peft_mitp.MITPConfig(prompt_length=4, num_interaction_layers=3, hub_dim=16, **changes)


@pytest.mark.parametrize("consolidation", ["cross", "joint"])
def test_after_training_each_towers_output_depends_on_the_other_modality_through_the_hub(consolidation):
    model = make_model(_config(consolidation=consolidation), seed=3)
    inputs = clip_inputs(batch=4)
    _train(model, inputs, steps=3)
    text, image = _pooled(model, inputs)
    other_images = {**inputs, "pixel_values": inputs["pixel_values"].flip(0)}
    other_texts = {**inputs, "input_ids": inputs["input_ids"].flip(0)}
    text_new_image, _ = _pooled(model, other_images)
    _, image_new_text = _pooled(model, other_texts)
    # Changing only the images changes the text tower's pooled output, and changing only the texts the image tower's.
    assert (text_new_image - text).norm(dim=-1).min() > 1e-4 * text.norm(dim=-1).max()
    assert (image_new_text - image).norm(dim=-1).min() > 1e-4 * image.norm(dim=-1).max()


def test_without_interaction_each_towers_output_ignores_the_other_modality():
    model = make_model(_config(interaction=False), seed=3)
    inputs = clip_inputs(batch=4)
    _train(model, inputs, steps=3)
    text, image = _pooled(model, inputs)
    text_new_image, _ = _pooled(model, {**inputs, "pixel_values": inputs["pixel_values"].flip(0)})
    _, image_new_text = _pooled(model, {**inputs, "input_ids": inputs["input_ids"].flip(0)})
    torch.testing.assert_close(text_new_image, text, atol=0, rtol=0)
    torch.testing.assert_close(image_new_text, image, atol=0, rtol=0)


def test_a_fresh_adapter_with_closed_gates_is_not_yet_cross_modal():
    model = make_model(_config(), seed=3)
    inputs = clip_inputs(batch=4)
    text, _ = _pooled(model, inputs)
    text_new_image, _ = _pooled(model, {**inputs, "pixel_values": inputs["pixel_values"].flip(0)})
    torch.testing.assert_close(text_new_image, text, atol=0, rtol=0)


def test_every_hub_tensor_gets_a_gradient_by_the_second_step():
    model = make_model(_config(), seed=3)
    grads = _train(model, clip_inputs(batch=4), steps=2)
    # Step 1: only the gates (the maps wait behind closed gates); step 2: every tensor.
    assert all(g.abs().sum() > 0 for name, g in grads[0].items() if "gate" in name)
    assert all(g.abs().sum() == 0 for name, g in grads[0].items() if "gate" not in name)
    assert grads[1] and all(g.abs().sum() > 0 for g in grads[1].values()), {
        n: float(g.abs().sum()) for n, g in grads[1].items()
    }


def test_open_gates_give_every_hub_tensor_a_gradient_at_the_first_step():
    model = make_model(_config(gate_init=0.5), seed=3)
    grads = _train(model, clip_inputs(batch=4), steps=1)
    assert all(g.abs().sum() > 0 for g in grads[0].values())


def test_joint_activation_shares_each_prompt_between_both_modalities():
    torch.manual_seed(0)
    hub = MemoryHub(8, 12, hub_dim=6, consolidation="joint", gate_init=1.0)
    text, vision = torch.randn(2, 3, 8), torch.randn(2, 5, 12)
    out = hub(text, vision)
    # The returned activation is the share drawn from the other modality: between 0 and 1 per prompt, not 1.
    drawn = out.text_activation.sum(-1)
    assert out.text_activation.shape == (2, 3, 5) and out.vision_activation.shape == (2, 5, 3)
    assert (drawn > 0).all() and (drawn < 1).all()
    cross = MemoryHub(8, 12, hub_dim=6, consolidation="cross", gate_init=1.0)
    cross.load_state_dict(hub.state_dict())
    torch.testing.assert_close(cross(text, vision).text_activation.sum(-1), torch.ones(2, 3))
    assert not torch.allclose(cross(text, vision).text_prompts, out.text_prompts)


def test_consolidation_and_gate_init_are_checked_and_saved(tmp_path):
    with pytest.raises(ValueError, match="consolidation"):
        peft_mitp.MITPConfig(consolidation="both")
    with pytest.raises(ValueError, match="gate_init"):
        peft_mitp.MITPConfig(gate_init="open")
    model = make_model(_config(consolidation="joint", gate_init=0.25))
    hub = model.base_model.mitp_hub["default"]
    assert hub.consolidation == "joint"
    torch.testing.assert_close(hub.text_gate, torch.full_like(hub.text_gate, 0.25))
    model.save_pretrained(tmp_path)
    loaded = peft_mitp.MITPConfig.from_pretrained(tmp_path)
    assert (loaded.consolidation, loaded.gate_init) == ("joint", 0.25)


def test_data_parallel_replication_is_refused_with_a_pointer_to_ddp():
    model = make_model(_config())
    layer = next(m for m in model.modules() if type(m).__name__ == "MITPLayer")
    with pytest.raises(RuntimeError, match="DistributedDataParallel"):
        layer._replicate_for_data_parallel()


def test_a_hub_in_another_dtype_than_the_towers_gives_the_towers_dtype():
    model = make_model(_config(gate_init=0.5), seed=3)
    inputs = clip_inputs(batch=2)
    with torch.no_grad():
        reference = model(**inputs).logits
        model.base_model.mitp_hub["default"].double()
        logits = model(**inputs).logits
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, reference, atol=1e-5, rtol=1e-5)


def test_the_model_card_says_what_the_activation_runs_over(tmp_path):
    for consolidation, words in (("cross", "the other modality's prompts"), ("joint", "both modalities' prompts")):
        model = make_model(_config(consolidation=consolidation, gate_init=0.25))
        model.save_pretrained(tmp_path / consolidation)
        card = (tmp_path / consolidation / "README.md").read_text()
        assert f"activation runs over {words}" in card and "gates initialised at 0.25" in card
