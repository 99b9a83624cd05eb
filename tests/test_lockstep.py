"""Lock-step forward: stock features when disabled, padding invariance, mask formats, scheduler faults."""

from __future__ import annotations

import contextvars

import greenlet
import pytest
import torch
from conftest import EOS, PAD, clip_inputs, make_model, tiny_clip

import peft_mitp
from peft_mitp.hub import MemoryHub
from peft_mitp.lockstep import LockstepError, current_tower, run_lockstep
from peft_mitp.prompt_mask import extend_attention_mask


def test_disabled_adapter_gives_stock_clip_features(inputs):
    model = make_model()
    clip = tiny_clip()  # same seed: the same weights as the wrapped backbone
    task = model.base_model.model
    with model.disable_adapter():
        text, image, _ = task.pooled_features(**inputs)
    stock_text = clip.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    stock_image = clip.get_image_features(pixel_values=inputs["pixel_values"])
    torch.testing.assert_close(text, stock_text.pooler_output, atol=1e-5, rtol=0)
    torch.testing.assert_close(image, stock_image.pooler_output, atol=1e-5, rtol=0)


def test_enabled_adapter_changes_features(inputs):
    model = make_model()
    with torch.no_grad():
        model.base_model.mitp_hub["default"].text_gate.fill_(1.0)  # open the cross-modal term (it starts closed)
    task = model.base_model.model
    with torch.no_grad():
        text, image, _ = task.pooled_features(**inputs)
        with model.disable_adapter():
            text0, image0, _ = task.pooled_features(**inputs)
    assert not torch.allclose(text, text0, atol=1e-4)
    assert not torch.allclose(image, image0, atol=1e-4)


def test_wrapping_does_not_touch_backbone_weights():
    before = tiny_clip().state_dict()
    model = make_model()
    after = {
        k.replace(".base_layer.", "."): v
        for k, v in model.base_model.model.backbone.state_dict().items()
        if "mitp_" not in k
    }
    assert set(after) == set(before)
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), name


def _randomize_hub(model):
    with torch.no_grad():
        for p in model.base_model.mitp_hub["default"].parameters():
            p.normal_(std=0.2)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_padding_does_not_change_logits(attn):
    model = make_model(attn_implementation=attn)
    _randomize_hub(model)
    model.eval()
    short = clip_inputs(batch=3, length=5, seed=3)
    # Right-pad to 9 tokens: the EOS stays where it was, padding follows it.
    padded_ids = torch.full((3, 9), PAD)
    padded_ids[:, :5] = short["input_ids"]
    padded_mask = torch.zeros(3, 9, dtype=torch.long)
    padded_mask[:, :5] = 1
    with torch.no_grad():
        alone = model(**short).logits
        padded = model(input_ids=padded_ids, attention_mask=padded_mask, pixel_values=short["pixel_values"]).logits
    torch.testing.assert_close(padded, alone, atol=1e-5, rtol=1e-5)


def test_mixed_lengths_in_one_batch_match_each_sample_alone():
    model = make_model()
    _randomize_hub(model)
    model.eval()
    a = clip_inputs(batch=1, length=4, seed=5)
    b = clip_inputs(batch=1, length=8, seed=6)
    ids = torch.full((2, 8), PAD)
    ids[0, :4], ids[1] = a["input_ids"][0], b["input_ids"][0]
    mask = (ids != PAD).long()
    pixels = torch.cat([a["pixel_values"], b["pixel_values"]])
    with torch.no_grad():
        batch = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
        alone = torch.cat([model(**a).logits, model(**b).logits])
    torch.testing.assert_close(batch, alone, atol=1e-5, rtol=1e-5)


def test_eager_and_sdpa_give_the_same_logits():
    inputs = clip_inputs(batch=3, length=6, seed=8)
    inputs["attention_mask"][0, 4:] = 0
    inputs["input_ids"][0, 3] = EOS
    logits = []
    for attn in ("eager", "sdpa"):
        model = make_model(attn_implementation=attn)
        _randomize_hub(model)  # same seed in both: identical adapters
        model.eval()
        with torch.no_grad():
            logits.append(model(**inputs).logits)
    torch.testing.assert_close(logits[0], logits[1], atol=1e-5, rtol=1e-5)


def test_causal_text_tower_keeps_causality_with_prompts():
    """In the first prompted text layer, changing token 4 must leave tokens 0..3 alone (the mask stays causal)."""
    model = make_model()
    _randomize_hub(model)
    task = model.base_model.model
    assert model.peft_config["default"].text_layers[0] == 2
    captured = {}
    handle = task.backbone.text_model.encoder.layers[2].register_forward_hook(
        lambda module, args, out: captured.__setitem__("h", out)
    )
    inputs = clip_inputs(batch=1, length=6, seed=2)
    changed = {k: v.clone() for k, v in inputs.items()}
    changed["input_ids"][0, 4] = changed["input_ids"][0, 4] % (EOS - 3) + 1
    with torch.no_grad():
        model(**inputs)
        first = captured["h"].clone()
        model(**changed)
        second = captured["h"]
    handle.remove()
    torch.testing.assert_close(first[:, :4], second[:, :4], atol=1e-6, rtol=0)
    assert not torch.allclose(first[:, 4:], second[:, 4:])


def test_extend_mask_formats_agree():
    seq, m = 5, 3
    causal_bool = torch.ones(seq, seq, dtype=torch.bool).tril()[None, None].repeat(2, 1, 1, 1)
    causal_bool[1, :, :, 3:] = False  # sample 1 has two padding tokens
    additive = torch.zeros(2, 1, seq, seq).masked_fill(~causal_bool, torch.finfo(torch.float32).min)
    kwargs = dict(seq_len=seq, num_prompts=m, is_causal=True, dtype=torch.float32, device=torch.device("cpu"))
    as_bool = extend_attention_mask(causal_bool, attn_implementation="sdpa", **kwargs)
    as_float = extend_attention_mask(additive, attn_implementation="eager", **kwargs)
    assert torch.equal(as_float == 0, as_bool)
    # tokens see all prompts, prompts see real tokens only, and the token block is unchanged
    assert as_bool[..., :seq, seq:].all()
    assert as_bool[1, 0, seq:, :3].all() and not as_bool[1, 0, seq:, 3:seq].any()
    assert torch.equal(as_bool[..., :seq, :seq], causal_bool)
    from_none = extend_attention_mask(None, attn_implementation="sdpa", **kwargs)
    assert torch.equal(from_none[0], as_bool[0])
    assert extend_attention_mask(None, attn_implementation="sdpa", **{**kwargs, "is_causal": False}) is None


def test_extend_mask_flash_2d_and_refusals():
    kwargs = dict(seq_len=4, num_prompts=2, dtype=torch.float32, device=torch.device("cpu"))
    mask = torch.tensor([[1, 1, 1, 0]])
    out = extend_attention_mask(mask, is_causal=False, attn_implementation="flash_attention_2", **kwargs)
    assert out.tolist() == [[1, 1, 1, 0, 1, 1]]
    with pytest.raises(NotImplementedError, match="sdpa"):
        extend_attention_mask(mask, is_causal=True, attn_implementation="flash_attention_2", **kwargs)

    class BlockMask:  # flex attention's type, by name
        pass

    with pytest.raises(NotImplementedError, match="flex attention"):
        extend_attention_mask(BlockMask(), is_causal=False, attn_implementation="flex_attention", **kwargs)


def _fake_tower(pairs: int, hub: MemoryHub, log: list, width: int):
    def run():
        tower = current_tower()
        for k in range(pairs):
            carry = tower.request_prompts(k)
            log.append((tower.name, k, None if carry is None else tuple(carry.shape)))
            tower.send_readout(k, torch.randn(2, 3, width), hub)
        return tower.name

    return run


def test_scheduler_serves_each_pair_after_both_readouts():
    hub = MemoryHub(8, 12, hub_dim=4)
    log: list = []
    result = run_lockstep(_fake_tower(3, hub, log, 8), _fake_tower(3, hub, log, 12))
    assert (result.text, result.vision, result.pairs) == ("text", "vision", 3)
    assert len(result.hub_outputs) == 2  # the last pair's read-outs feed no next pair
    assert ("text", 0, None) in log and ("text", 2, (2, 3, 8)) in log and ("vision", 1, (2, 3, 12)) in log
    # pair k+1 of either tower never starts before both towers handed in pair k
    order = [(name, k) for name, k, _ in log]
    assert order.index(("text", 1)) > order.index(("vision", 0))
    assert order.index(("vision", 1)) > order.index(("text", 0))


def test_scheduler_refuses_towers_that_do_not_pair_up():
    hub = MemoryHub(8, 12, hub_dim=4)
    with pytest.raises(LockstepError, match="did not pair up"):
        run_lockstep(_fake_tower(3, hub, [], 8), _fake_tower(2, hub, [], 12))
    with pytest.raises(LockstepError, match="the text tower waits for pair 2"):
        run_lockstep(_fake_tower(3, hub, [], 8), _fake_tower(1, hub, [], 12))


def test_exception_in_one_tower_ends_the_other():
    hub = MemoryHub(8, 12, hub_dim=4)
    finished = []

    def vision():
        tower = current_tower()
        try:
            tower.request_prompts(0)
            tower.send_readout(0, torch.randn(2, 3, 12), hub)
            tower.request_prompts(1)
        except greenlet.GreenletExit:
            finished.append("vision ended")
            raise

    def text():
        tower = current_tower()
        tower.request_prompts(0)
        raise RuntimeError("boom in text")

    grad_before = torch.is_grad_enabled()
    with pytest.raises(RuntimeError, match="boom in text"):
        run_lockstep(text, vision)
    assert finished == ["vision ended"]
    assert torch.is_grad_enabled() == grad_before


def test_forward_outside_peft_is_the_stock_model(inputs):
    task = peft_mitp.MITPForImageTextClassification.from_backbone(tiny_clip(), num_labels=3)
    with torch.no_grad():
        text, image, hub_outputs = task.pooled_features(**inputs)
    assert hub_outputs == []
    stock = tiny_clip().get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
    torch.testing.assert_close(image, stock, atol=1e-5, rtol=0)


def test_missing_modality_and_unknown_inputs_raise_clear_errors(inputs):
    model = make_model()
    with pytest.raises(ValueError, match="`pixel_values` is missing"):
        model(input_ids=inputs["input_ids"])
    with pytest.raises(ValueError, match="`input_ids` is missing"):
        model(pixel_values=inputs["pixel_values"])
    with pytest.raises(TypeError, match="unexpected input 'bogus'"):
        model(**inputs, bogus=torch.ones(1))


def test_hub_activations_are_returned_per_pair(inputs):
    model = make_model(peft_mitp.MITPConfig(prompt_length=4, vision_prompt_length=3, num_interaction_layers=3, hub_dim=8))
    out = model(**inputs, output_hub_activations=True)
    assert len(out.attentions) == 2
    text_act, vision_act = out.attentions[0]
    assert text_act.shape == (4, 4, 3) and vision_act.shape == (4, 3, 4)
    torch.testing.assert_close(text_act.sum(-1), torch.ones(4, 4))


def test_fresh_hub_carries_each_readout_unchanged():
    hub = MemoryHub(8, 12, hub_dim=4)
    text, vision = torch.randn(2, 3, 8), torch.randn(2, 5, 12)
    out = hub(text, vision)
    # The gates start at zero: a fresh adapter is temporal prompts without interaction.
    torch.testing.assert_close(out.text_prompts, text, atol=0, rtol=0)
    torch.testing.assert_close(out.vision_prompts, vision, atol=0, rtol=0)
    assert out.text_activation.shape == (2, 3, 5) and out.vision_activation.shape == (2, 5, 3)


def test_generated_term_stays_at_the_scale_of_the_readout_however_large_the_maps_grow():
    hub = MemoryHub(8, 12, hub_dim=4)
    text, vision = 30 * torch.randn(2, 3, 8), 0.1 * torch.randn(2, 5, 12)
    with torch.no_grad():
        hub.text_gate.fill_(0.5)
        hub.vision_gate.fill_(2.0)
        for linear in (hub.text_out, hub.vision_out):
            linear.weight.mul_(1e4)
    out = hub(text, vision)
    # Per token: |generated| = gate * rms(read-out) * |LN(.)| = gate * |read-out| (LN output has unit RMS).
    torch.testing.assert_close((out.text_prompts - text).norm(dim=-1), 0.5 * text.norm(dim=-1), rtol=1e-3, atol=0)
    torch.testing.assert_close((out.vision_prompts - vision).norm(dim=-1), 2.0 * vision.norm(dim=-1), rtol=1e-3, atol=0)
    # The gates learn: they get a gradient even while they are zero (the maps do not, until a gate opens).
    hub.zero_grad()
    with torch.no_grad():
        hub.text_gate.zero_()
    hub(text, vision).text_prompts.sum().backward()
    assert hub.text_gate.grad.abs().sum() > 0
    assert hub.text_out.weight.grad.abs().sum() == 0


_SETTING: contextvars.ContextVar[str] = contextvars.ContextVar("_SETTING", default="unset")


def test_towers_see_the_callers_context_variables(inputs):
    model = make_model()
    task = model.base_model.model
    seen = {}
    for kind, layers in (
        ("text", task.backbone.text_model.encoder.layers),
        ("vision", task.backbone.vision_model.encoder.layers),
    ):
        for index in (0, len(layers) - 1):  # below the interaction layers, and an interaction layer
            layers[index].register_forward_hook(
                lambda m, a, out, key=(kind, index): seen.__setitem__(key, _SETTING.get())
            )
    token = _SETTING.set("from the caller")
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        _SETTING.reset(token)
    assert len(seen) == 4 and set(seen.values()) == {"from the caller"}
    assert _SETTING.get() == "unset"


def test_adapter_names_are_honoured_not_ignored(inputs):
    """peft once dropped `adapter_names` silently for MITP; tests/test_mixed_batches.py checks mixed batches fully."""
    model = make_model()
    model.add_adapter("second", peft_mitp.MITPConfig(prompt_length=4, num_interaction_layers=2, hub_dim=16,
                                                     gate_init=0.5))
    model.eval()
    with torch.no_grad():
        named = model(**inputs, adapter_names=["second"] * 4).logits
        active = model(**inputs, adapter_names=None).logits  # None is every forward's default: the active adapter
        model.set_adapter("second")
        second = model(**inputs).logits
    assert torch.allclose(named, second, atol=1e-6) and not torch.allclose(named, active, atol=1e-4)


def _causal_by_attribute_model(attn: str):
    """BERT with `is_decoder=True` (causal through its attention modules' `is_causal`, no call argument) + ViT."""
    from peft import get_peft_model
    from transformers import AutoConfig, AutoModel, VisionTextDualEncoderConfig

    text = AutoConfig.for_model(
        "bert", hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, vocab_size=EOS + 1,
        max_position_embeddings=24, is_decoder=True,
    )
    vision = AutoConfig.for_model(
        "vit", hidden_size=48, intermediate_size=96, num_hidden_layers=6, num_attention_heads=4, image_size=32,
        patch_size=8,
    )
    torch.manual_seed(0)
    backbone = AutoModel.from_config(
        VisionTextDualEncoderConfig.from_vision_text_configs(vision, text, projection_dim=24), attn_implementation=attn
    )
    base = peft_mitp.MITPForImageTextClassification.from_backbone(backbone.eval(), num_labels=5)
    torch.manual_seed(100)
    model = get_peft_model(base, peft_mitp.MITPConfig(prompt_length=3, num_interaction_layers=2, hub_dim=16))
    _randomize_hub(model)
    return model.eval()


def test_a_text_tower_causal_by_attribute_lets_its_tokens_see_the_prompts():
    # Under SDPA without padding the encoder passes no mask and no `is_causal`; eager gets a causal mask. Both must
    # give tokens that see the prompts and keep causality, i.e. the same outputs.
    inputs = clip_inputs(batch=2, length=6, seed=2)
    changed = {**inputs, "input_ids": inputs["input_ids"].clone()}
    changed["input_ids"][:, 3] = inputs["input_ids"][:, 3] % (EOS - 3) + 1
    outputs = {}
    for attn in ("sdpa", "eager"):
        model = _causal_by_attribute_model(attn)
        layer = model.base_model.model.backbone.text_model.encoder.layer[model.peft_config["default"].text_layers[0]]
        captured = []
        layer.register_forward_hook(
            lambda m, a, out, captured=captured: captured.append(out[0] if isinstance(out, tuple) else out)
        )
        with torch.no_grad():
            logits = model(**inputs).logits
            model(**changed)
        outputs[attn] = (captured[0], logits)
        torch.testing.assert_close(captured[0][:, :3], captured[1][:, :3], atol=1e-6, rtol=0)  # still causal
        assert not torch.allclose(captured[0][:, 3:], captured[1][:, 3:])
    torch.testing.assert_close(outputs["sdpa"][0], outputs["eager"][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outputs["sdpa"][1], outputs["eager"][1], atol=1e-5, rtol=1e-5)
