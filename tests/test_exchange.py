"""The cross-modal exchange works: through the memory hub, each tower's output depends on the other modality.

These tests read the towers' pooled outputs (what the head sees) after a few training steps on a tiny CLIP, so they
fail if the hub's generated term stops reaching the next interaction layer, if a gate or map never learns, or if the
ablation switches stop meaning what they say.
"""

from __future__ import annotations

import pytest
import torch
from conftest import clip_inputs, make_model, tiny_clip

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
    return peft_mitp.MITPConfig(**{"prompt_length": 4, "num_interaction_layers": 3, "hub_dim": 16, **changes})


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
    # Step 1: everything but the maps back into the towers, which wait behind closed gates (the maps into the shared
    # space learn from the token consolidation at once); step 2: every tensor.
    behind_gates = {"text_out.weight", "text_out.bias", "vision_out.weight", "vision_out.bias"}
    assert set(grads[0]) > behind_gates
    assert all(g.abs().sum() > 0 for name, g in grads[0].items() if name not in behind_gates), {
        n: float(g.abs().sum()) for n, g in grads[0].items()
    }
    assert all(grads[0][name].abs().sum() == 0 for name in behind_gates)
    assert grads[1] and all(g.abs().sum() > 0 for g in grads[1].values()), {
        n: float(g.abs().sum()) for n, g in grads[1].items()
    }


def _scores(model, inputs) -> torch.Tensor:
    """The hub's token consolidation (B, heads) for `inputs`, from the towers' output tokens."""
    task = model.base_model.model
    hub = model.base_model.mitp_hub["default"]
    with torch.no_grad():
        run = task._run_towers(dict(inputs))
        mask = run.token_masks["text"]
        return hub.consolidate_tokens(run.tokens["text"], mask, run.tokens["vision"], run.token_masks["vision"])


def test_the_token_consolidation_reaches_the_head_and_depends_on_both_modalities():
    # One pair: no prompt exchange between pairs at all, so only the token consolidation can make the head's
    # features depend on image and text together.
    model = make_model(_config(num_interaction_layers=1), seed=3)
    inputs = clip_inputs(batch=4)
    _train(model, inputs, steps=3)
    scores = _scores(model, inputs)
    assert scores.shape == (4, 8)
    new_image = _scores(model, {**inputs, "pixel_values": inputs["pixel_values"].flip(0)})
    new_text = _scores(model, {**inputs, "input_ids": inputs["input_ids"].flip(0)})
    assert (new_image - scores).abs().amax(-1).min() > 1e-4
    assert (new_text - scores).abs().amax(-1).min() > 1e-4
    # ... and the head reads it: the logits move with the similarities alone (pooled features held fixed).
    task, hub = model.base_model.model, model.base_model.mitp_hub["default"]
    features = torch.randn(4, sum(task.mitp_feature_dims()))
    with torch.no_grad():
        torch.testing.assert_close(hub.readout(features, scores), hub.readout(features, scores))
        assert not torch.allclose(hub.readout(features, scores), hub.readout(features, new_image))


def test_without_interaction_there_is_no_token_consolidation_but_the_same_fusion_head():
    model = make_model(_config(interaction=False), seed=3)
    hub = model.base_model.mitp_hub["default"]
    assert hub.token_heads == 0 and not hasattr(hub, "text_in")
    with_interaction = make_model(_config(), seed=3).base_model.mitp_hub["default"]
    assert with_interaction.token_heads == 8
    shapes = lambda h: [p.shape for p in h.readout.fusion.parameters()]  # noqa: E731
    assert shapes(hub)[1:] == shapes(with_interaction)[1:]  # the same MLP, less the similarities' input columns
    with pytest.raises(ValueError, match="needs `interaction=True`"):
        _config(interaction=False, token_consolidation=True)


def test_matching_tokens_score_higher_than_mismatching_ones():
    # With the maps set to the identity, a text token found among the image's tokens gives a higher activated
    # similarity than one that is not: consolidation by similarity, softmax activation.
    torch.manual_seed(0)
    hub = MemoryHub(8, 8, hub_dim=8, token_heads=1, feature_dim=4)
    with torch.no_grad():
        for linear in (hub.text_in, hub.vision_in):
            linear.weight.copy_(torch.eye(8))
            linear.bias.zero_()
        for standardizer in (hub.readout.text_tokens, hub.readout.vision_tokens):
            standardizer.scale.fill_(1.0)
    words = torch.eye(8) * 3
    image = torch.stack([words[0], words[1], words[2]])[None]  # the image "contains" words 0, 1, 2
    found = hub.consolidate_tokens(words[None, [1]], None, image, None)
    missing = hub.consolidate_tokens(words[None, [5]], None, image, None)
    assert found.item() > missing.item() + 1
    # Padding counts for nothing: a padded text token and a masked image token change no score.
    padded = hub.consolidate_tokens(words[None, [1, 5]], torch.tensor([[1, 0]]), image, None)
    torch.testing.assert_close(padded, found)
    masked = hub.consolidate_tokens(
        words[None, [1]], None, torch.cat([image, words[None, [5]]], 1), torch.tensor([[1, 1, 1, 0]])
    )
    torch.testing.assert_close(masked, found)


def test_the_standardizer_takes_the_first_training_batch_statistics_and_keeps_them():
    from peft_mitp.hub import Standardizer

    standardizer = Standardizer(3)
    x = torch.tensor([[1.0, 10.0, -5.0], [3.0, 30.0, -5.0], [100.0, 100.0, 100.0]])
    mask = torch.tensor([True, True, False])
    standardizer.eval()
    assert (standardizer(x) == 0).all() and not standardizer.initialised  # nothing measured outside training
    standardizer.train()
    out = standardizer(x, mask)
    torch.testing.assert_close(out[:2, :2], torch.tensor([[-1.0, -1.0], [1.0, 1.0]]))
    assert standardizer.initialised and not list(standardizer.parameters())  # buffers, not trained
    standardizer(x * 7)  # a later batch does not move the statistics
    torch.testing.assert_close(standardizer(x, mask)[:2, :2], out[:2, :2])


def test_the_memory_gate_starts_closed_and_learns():
    model = make_model(_config(), seed=3)
    hub = model.base_model.mitp_hub["default"]
    assert (hub.text_memory_gate == 0).all() and (hub.vision_memory_gate == 0).all()
    readout = torch.randn(2, 4, hub.text_width)
    assert (hub.carry_only("text", readout) == 0).all()
    grads = _train(model, clip_inputs(batch=4), steps=1)
    assert grads[0]["text_memory_gate"].abs().sum() > 0 and grads[0]["vision_memory_gate"].abs().sum() > 0
    whole = make_model(_config(memory_gate_init=1.0), seed=3).base_model.mitp_hub["default"]
    torch.testing.assert_close(whole.carry_only("text", readout), readout)


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


def test_an_adapter_saved_before_the_read_out_loads_and_computes_what_it_computed(tmp_path):
    import json

    from peft import PeftModel

    # What the hub computed before the read-out to the head: no token consolidation, no fusion MLP, read-outs carried
    # whole. Its saved config has none of the three fields.
    old = make_model(_config(token_consolidation=False, fusion_hidden_size=0, memory_gate_init=None, gate_init=0.5), seed=3)
    _train(old, clip_inputs(batch=4), steps=2)
    old.save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    record = json.loads(path.read_text())
    for key in ("token_consolidation", "fusion_hidden_size", "memory_gate_init"):
        del record[key]
    path.write_text(json.dumps(record))
    inputs = clip_inputs(batch=4)
    with torch.no_grad():
        expected = old(**inputs).logits
        fresh = peft_mitp.MITPForImageTextClassification.from_backbone(tiny_clip(3), num_labels=5)
        loaded = PeftModel.from_pretrained(fresh, tmp_path)
        torch.testing.assert_close(loaded(**inputs).logits, expected, atol=0, rtol=0)
    config = loaded.peft_config["default"]
    assert (config.token_consolidation, config.fusion_hidden_size, config.memory_gate_init) == (False, 0, None)


def test_the_standardizer_waits_for_a_batch_with_some_spread():
    from peft_mitp.hub import Standardizer

    standardizer = Standardizer(3).train()
    one = torch.tensor([[1.0, 2.0, 3.0]])
    assert (standardizer(one) == 0).all() and not standardizer.initialised  # a batch of one has no spread
    standardizer(torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 5.0]]))
    assert standardizer.initialised
    # The constant middle channel gets a tenth of the median channel's spread, not an enormous scale.
    torch.testing.assert_close(standardizer.scale, torch.tensor([1.0, 10.0, 1.0]))


def test_head_features_are_what_the_head_reads():
    model = make_model(_config(), seed=3)
    inputs = clip_inputs(batch=4)
    _train(model, inputs, steps=1)  # sets the standardisers, so the read-out takes part
    task = model.base_model.model
    with torch.no_grad():
        features = task.head_features(**inputs)
        text, image, _ = task.pooled_features(**inputs)
        assert not torch.allclose(features, torch.cat([text, image], -1))  # the read-out is added
        torch.testing.assert_close(task.classifier(features), model(**inputs).logits)


def test_a_hub_width_the_heads_do_not_divide_is_refused_where_the_consolidation_runs():
    config = _config(hub_dim=12)  # a config alone is fine: an old adapter's may not know the token heads
    with pytest.raises(ValueError, match="must be divisible by `token_heads`=8"):
        make_model(config)
    assert make_model(_config(hub_dim=12, token_consolidation=False)).base_model.mitp_hub["default"].token_heads == 0
    with pytest.raises(ValueError, match="divisible"):
        _config(hub_dim=12, token_consolidation=True)
