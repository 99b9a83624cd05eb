"""Missing modalities: learned stand-ins for a missing tower, per-sample independence, modality dropout, errors."""

from __future__ import annotations

import pytest
import torch
from conftest import clip_inputs, make_model, tiny_clip
from datasets import Dataset
from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file
from transformers import Trainer, TrainingArguments

import peft_mitp
from peft_mitp.hub import ModalityPresence

STAND_INS = (
    "stand_ins.readouts.text",
    "stand_ins.readouts.vision",
    "stand_ins.features.text",
    "stand_ins.features.vision",
)


def _config(**overrides) -> peft_mitp.MITPConfig:
    kwargs = dict(prompt_length=4, num_interaction_layers=3, hub_dim=16, missing_modality=True)
    return peft_mitp.MITPConfig(**{**kwargs, **overrides})


def _model(seed: int = 0, **overrides):
    """A missing-modality adapter with every adapter tensor random (the zero-initialised parts too, and the hub's
    standardisers, so that the token consolidation takes part)."""
    model = make_model(_config(**overrides), seed=seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "mitp_hub" in name:
                param.normal_(std=0.3)
        for name, buffer in model.named_buffers():
            if "mitp_hub" in name:
                buffer.uniform_(0.5, 1.5) if name.endswith(".scale") else buffer.normal_(std=0.3)
    return model.eval()


def _rows(inputs: dict, rows) -> dict:
    return {k: v[rows] for k, v in inputs.items()}


def _logits(model, **inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def test_mode_off_adds_no_parameters_and_mode_on_adds_only_the_stand_ins():
    off = make_model(_config(missing_modality=False))
    on = make_model(_config())
    trainable_off = {n for n, p in off.named_parameters() if p.requires_grad}
    trainable_on = {n for n, p in on.named_parameters() if p.requires_grad}
    assert not any("stand_ins" in n for n in trainable_off)
    assert trainable_on - trainable_off == {f"base_model.mitp_hub.default.{s}" for s in STAND_INS}
    hub = on.base_model.mitp_hub["default"]
    # 3 interaction pairs: the read-outs of pairs 0 and 1 feed the hub, the last pair's feed nothing.
    assert hub.stand_ins.readouts["text"].shape == (2, 4, 32)
    assert hub.stand_ins.readouts["vision"].shape == (2, 4, 48)
    assert hub.stand_ins.features["text"].shape == hub.stand_ins.features["vision"].shape == (24,)


def test_without_interaction_there_are_only_pooled_feature_stand_ins():
    model = make_model(_config(interaction=False))
    names = {n for n, _ in model.base_model.mitp_hub["default"].named_parameters() if n.startswith("stand_ins.")}
    assert names == {"stand_ins.features.text", "stand_ins.features.vision"}


def test_complete_samples_ignore_the_stand_ins_in_eval_and_in_training():
    off, on = make_model(_config(missing_modality=False)), make_model(_config())
    with torch.no_grad():
        for p in off.base_model.mitp_hub["default"].parameters():
            p.normal_(std=0.3)
    set_peft_model_state_dict(on, get_peft_model_state_dict(off))
    inputs = clip_inputs(seed=4)
    for mode in ("eval", "train"):
        getattr(off, mode)(), getattr(on, mode)()
        assert torch.equal(_logits(on, **inputs), _logits(off, **inputs)), mode


@pytest.mark.parametrize("missing", ["image", "text"])
def test_each_sample_in_a_batch_with_missing_modalities_gets_its_logits_alone(missing):
    model = _model()
    inputs = clip_inputs(batch=4, seed=7)
    present = torch.tensor([True, False, True, False])
    mask = {"image_present": present} if missing == "image" else {"text_present": present}
    mixed = _logits(model, **inputs, **mask)
    # The hub mixes prompts only within a sample: complete samples get exactly their logits without the others ...
    complete = _logits(model, **_rows(inputs, present))
    torch.testing.assert_close(mixed[present], complete, atol=1e-6, rtol=1e-6)
    # ... and each incomplete sample gets the logits it gets alone, with the modality simply not given.
    drop = "pixel_values" if missing == "image" else ("input_ids", "attention_mask")
    for i in (1, 3):
        alone_inputs = {k: v for k, v in _rows(inputs, slice(i, i + 1)).items() if k not in drop}
        torch.testing.assert_close(mixed[i : i + 1], _logits(model, **alone_inputs), atol=1e-6, rtol=1e-6)
    # Missing samples use the stand-ins: their logits differ from the complete-sample logits.
    full = _logits(model, **inputs)
    assert not torch.allclose(mixed[~present], full[~present], atol=1e-3)


def test_missing_samples_logits_do_not_depend_on_their_pixels_or_tokens():
    model = _model()
    inputs = clip_inputs(batch=4, seed=8)
    image_present = torch.tensor([True, False, True, True])
    text_present = torch.tensor([True, True, True, False])
    reference = _logits(model, **inputs, image_present=image_present, text_present=text_present)
    changed = {k: v.clone() for k, v in inputs.items()}
    changed["pixel_values"][1] = torch.randn(3, 32, 32) * 10
    changed["input_ids"][3] = torch.randint(1, 90, (7,))
    changed["attention_mask"][3, 2:] = 0
    assert torch.equal(_logits(model, **changed, image_present=image_present, text_present=text_present), reference)


def test_a_batch_without_images_never_runs_the_vision_tower():
    model = _model()
    inputs = clip_inputs(batch=3, seed=9)
    calls = []
    vision = model.base_model.model.backbone.vision_model
    handle = vision.register_forward_pre_hook(lambda *_: calls.append(1))
    text_only = _logits(model, input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    handle.remove()
    assert calls == []
    masked = _logits(model, **inputs, image_present=torch.zeros(3, dtype=torch.bool))
    torch.testing.assert_close(text_only, masked, atol=1e-6, rtol=1e-6)
    # Without images every sample has the same image stand-ins; the logits still follow the texts.
    assert not torch.allclose(text_only[0], text_only[1], atol=1e-4)


def test_inputs_may_hold_rows_only_for_the_samples_that_have_the_modality():
    model = _model()
    inputs = clip_inputs(batch=4, seed=10)
    present = torch.tensor([False, True, True, False])
    full_rows = _logits(model, **inputs, image_present=present)
    present_rows = _logits(
        model,
        input_ids=inputs["input_ids"],
        attention_mask=inputs["attention_mask"],
        pixel_values=inputs["pixel_values"][present],
        image_present=present,
    )
    assert torch.equal(full_rows, present_rows)


def test_stand_ins_receive_gradients_only_from_samples_that_lack_the_modality():
    model = _model().train()
    inputs = clip_inputs(batch=4, seed=11)
    labels = torch.tensor([0, 1, 2, 3])
    hub = model.base_model.mitp_hub["default"]
    stand_ins = dict(hub.stand_ins.named_parameters())

    model(**inputs, labels=labels).loss.backward()  # everything present: the stand-ins take part, unused
    for name, param in stand_ins.items():
        assert param.grad is not None and torch.count_nonzero(param.grad) == 0, name
    model.zero_grad()

    out = model(
        **inputs,
        labels=labels,
        image_present=torch.tensor([True, False, True, True]),
        text_present=torch.tensor([True, True, False, True]),
    )
    out.loss.backward()
    for name, param in stand_ins.items():
        assert param.grad is not None and torch.count_nonzero(param.grad) > 0, name


def test_stand_ins_are_saved_loaded_and_switched_per_adapter(tmp_path):
    trained = _model(seed=1)
    trained.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    for name in STAND_INS:
        assert f"base_model.mitp_hub.{name}" in tensors, sorted(tensors)
    inputs = clip_inputs(batch=4, seed=12)
    mask = {
        "image_present": torch.tensor([True, False, True, True]),
        "text_present": torch.tensor([True, True, False, True]),
    }
    expected = _logits(trained, **inputs, **mask)

    base = peft_mitp.MITPForImageTextClassification.from_backbone(tiny_clip(seed=1), num_labels=5)
    for low_cpu_mem_usage in (False, True):
        loaded = PeftModel.from_pretrained(base, tmp_path, low_cpu_mem_usage=low_cpu_mem_usage).eval()
        assert loaded.peft_config["default"].missing_modality
        assert torch.equal(_logits(loaded, **inputs, **mask), expected)
        base = loaded.unload()

    # A second adapter brings its own stand-ins; switching adapters switches them, loading leaves the first intact.
    other = _model(seed=1)  # the same backbone and adapter as `trained`, except for the stand-ins
    stand_ins = other.base_model.mitp_hub["default"].stand_ins
    with torch.no_grad():
        for param in stand_ins.parameters():
            param.add_(1.0)
    before = {n: p.clone() for n, p in stand_ins.named_parameters()}
    other_logits = _logits(other, **inputs, **mask)
    assert not torch.allclose(other_logits, expected, atol=1e-3)
    other.load_adapter(tmp_path, adapter_name="trained")
    other.set_adapter("trained")
    assert torch.equal(_logits(other, **inputs, **mask), expected)
    other.set_adapter("default")
    assert torch.equal(_logits(other, **inputs, **mask), other_logits)
    for name, param in stand_ins.named_parameters():
        assert torch.equal(param, before[name]), name


def test_modality_dropout_drops_one_modality_never_both_and_only_from_complete_samples():
    torch.manual_seed(0)
    n = 4000
    text = torch.ones(n, dtype=torch.bool)
    text[:1000] = False  # these lack their text already
    vision = torch.ones(n, dtype=torch.bool)
    vision[1000:2000] = False  # these lack their image already
    dropped = ModalityPresence.from_masks(text, vision).with_modality_dropout(0.4)
    kept_text, kept_vision = dropped.kept["text"], dropped.kept["vision"]
    assert bool((kept_text | kept_vision).all())  # never both
    assert torch.equal(kept_vision[:1000], vision[:1000]) and torch.equal(kept_text[1000:2000], text[1000:2000])
    assert torch.equal(dropped.ran["text"], text) and torch.equal(dropped.ran["vision"], vision)  # towers still run
    complete = slice(2000, n)
    lost_image = (~kept_vision[complete]).float().mean().item()
    lost_text = (~kept_text[complete]).float().mean().item()
    # 2000 complete samples, 0.4 of them lose one modality, each side half of those (5 standard deviations).
    assert 0.2 - 0.045 < lost_image < 0.2 + 0.045 and 0.2 - 0.045 < lost_text < 0.2 + 0.045


def test_modality_dropout_acts_in_training_only_and_gives_the_missing_modality_logits():
    model = _model(modality_dropout=1.0)  # every sample loses its image or its text
    inputs = clip_inputs(batch=8, seed=13)
    full = _logits(model, **inputs)
    torch.testing.assert_close(_logits(model, **inputs), full)  # eval: no dropout
    everything = torch.ones(8, dtype=torch.bool)
    without_image = _logits(model, **inputs, image_present=~everything)
    without_text = _logits(model, **inputs, text_present=~everything)
    model.train()
    torch.manual_seed(3)
    dropped = _logits(model, **inputs)
    lost_image = [torch.allclose(dropped[i], without_image[i], atol=1e-6) for i in range(8)]
    lost_text = [torch.allclose(dropped[i], without_text[i], atol=1e-6) for i in range(8)]
    assert all(a != b for a, b in zip(lost_image, lost_text, strict=True))  # exactly one modality lost per sample
    assert any(lost_image) and any(lost_text)


def _dataset(n: int) -> Dataset:
    batch = clip_inputs(batch=n, length=6, seed=14)
    present = torch.arange(n) % 4 != 0  # every fourth sample has no image
    return Dataset.from_dict(
        {
            "input_ids": batch["input_ids"].tolist(),
            "attention_mask": batch["attention_mask"].tolist(),
            "pixel_values": batch["pixel_values"].tolist(),
            "image_present": present.tolist(),
            "labels": (batch["input_ids"][:, 0] % 3).tolist(),
        }
    ).with_format("torch")


def test_trainer_passes_presence_masks_through_and_trains_the_stand_ins(tmp_path):
    model = make_model(_config(modality_dropout=0.3), num_labels=3)
    before = {n: p.detach().clone() for n, p in model.base_model.mitp_hub["default"].stand_ins.named_parameters()}
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=8,
        max_steps=4,
        learning_rate=1e-2,
        report_to=[],
        label_names=["labels"],
        use_cpu=True,
        disable_tqdm=True,
        save_strategy="no",
    )
    Trainer(model=model, args=args, train_dataset=_dataset(32)).train()
    for name, param in model.base_model.mitp_hub["default"].stand_ins.named_parameters():
        assert not torch.equal(param, before[name]), name


def test_missing_modality_inputs_without_the_mode_raise_clear_errors():
    inputs = clip_inputs(batch=2)
    mask = torch.tensor([True, False])
    off = make_model(_config(missing_modality=False))
    with pytest.raises(ValueError, match=r"1 of 2 samples have no image .*`missing_modality=False`.*=True\)"):
        off(**inputs, image_present=mask)
    with pytest.raises(ValueError, match=r"2 of 2 samples have no text \(`input_ids` is missing"):
        off(pixel_values=inputs["pixel_values"])
    with pytest.raises(ValueError, match=r"`image_present` / `text_present` were given, but .*missing_modality=False"):
        off(**inputs, text_present=torch.ones(2, dtype=torch.bool))

    on = make_model(_config())
    with on.disable_adapter(), pytest.raises(ValueError, match="no MITP adapter is active"):
        on(**inputs, image_present=mask)
    plain = peft_mitp.MITPForImageTextClassification.from_backbone(tiny_clip(), num_labels=3)
    with pytest.raises(ValueError, match="no MITP adapter is active"):
        plain(input_ids=inputs["input_ids"])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"image_present": torch.tensor([False, True]), "text_present": torch.tensor([False, True])},
         r"Sample\(s\) \[0\] have neither an image nor a text"),
        ({"image_present": torch.tensor([True, True, False])},
         r"`input_ids` has 2 rows, but the batch has 3 samples \(from `image_present`\) of which 3 have their text"),
        ({"image_present": torch.tensor([True, False]), "text_present": torch.tensor([True, True, True])},
         "`image_present` has 2 entries but `text_present` has 3"),
        ({"image_present": torch.tensor([0.0, 1.0])}, r"`image_present` must be a \(batch,\) tensor of booleans"),
        ({"image_present": torch.ones(2, 1, dtype=torch.bool)}, r"got shape \(2, 1\)"),
        ({"text_present": torch.tensor([2, 1])}, r"`text_present` must hold booleans or 0/1"),
        ({"pixel_values": None, "image_present": torch.tensor([True, False])},
         r"`image_present` marks 1 sample\(s\) as having their image, but `pixel_values` is None"),
        ({"pixel_values": torch.randn(3, 3, 32, 32), "image_present": torch.tensor([True, False])},
         r"`pixel_values` has 3 rows, but the batch has 2 samples \(from `image_present`\) of which 1 have"),
        ({"input_ids": None, "pixel_values": None}, "Both `input_ids` and `pixel_values` are missing"),
    ],
)
def test_bad_presence_inputs_raise_clear_errors(overrides, message):
    model = make_model(_config())
    inputs = {**clip_inputs(batch=2), **overrides}
    if inputs["input_ids"] is None:
        inputs.pop("attention_mask")
    with pytest.raises(ValueError, match=message):
        model(**inputs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"modality_dropout": 0.2}, r"`modality_dropout`=0.2 drops modalities, which needs .*`missing_modality=True`"),
        ({"missing_modality": True, "modality_dropout": 1.5}, r"`modality_dropout` must lie in \[0, 1\]"),
        ({"missing_modality": True, "modality_dropout": -0.1}, r"`modality_dropout` must lie in \[0, 1\]"),
    ],
)
def test_bad_missing_modality_config_raises_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        peft_mitp.MITPConfig(**kwargs)
