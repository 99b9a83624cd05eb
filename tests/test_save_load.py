"""Saving and loading adapters: fresh-process reload, file contents, and peft's traps for shared hubs."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import clip_inputs, make_model, run_python, tiny_clip
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

import peft_mitp
from peft_mitp import MITPConfig, MITPForImageTextClassification

CONFIG = dict(prompt_length=4, num_interaction_layers=2, hub_dim=16)


def _trained(seed=0, steps=2, config=None, num_labels=5):
    base = MITPForImageTextClassification.from_backbone(tiny_clip(), num_labels=num_labels)
    torch.manual_seed(seed)
    model = get_peft_model(base, config or MITPConfig(**CONFIG))
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    batch = clip_inputs(seed=seed + 20)
    for _ in range(steps):
        model(**batch, labels=torch.arange(4) % num_labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def _adapter_state(model, name="default"):
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(model, adapter_name=name)


def test_save_then_load_in_a_fresh_process_gives_identical_logits(tmp_path):
    MITPForImageTextClassification.from_backbone(tiny_clip(), num_labels=5).save_pretrained(tmp_path / "base")
    model = _trained()
    model.save_pretrained(tmp_path / "adapter")
    inputs = clip_inputs(seed=99)
    save_file(inputs, str(tmp_path / "inputs.safetensors"))
    with torch.no_grad():
        expected = model(**inputs).logits
    run_python(
        """
import torch, peft_mitp
from peft import PeftModel, get_peft_model_state_dict
from safetensors.torch import load_file, save_file
base = peft_mitp.MITPForImageTextClassification.from_pretrained("base")
model = PeftModel.from_pretrained(base, "adapter").eval()
with torch.no_grad():
    logits = model(**load_file("inputs.safetensors")).logits
save_file({"logits": logits, **get_peft_model_state_dict(model)}, "reloaded.safetensors")
""",
        cwd=tmp_path,
    )
    reloaded = load_file(tmp_path / "reloaded.safetensors")
    assert torch.equal(reloaded.pop("logits"), expected)
    state = _adapter_state(model)
    assert set(reloaded) == set(state)
    for key, tensor in state.items():
        assert torch.equal(reloaded[key], tensor), key


def test_adapter_file_holds_only_adapter_tensors(tmp_path):
    model = _trained(steps=0)
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert all(("mitp_" in k) or (".classifier." in k) for k in tensors), sorted(tensors)
    assert any("mitp_hub" in k for k in tensors) and any("mitp_prompt" in k for k in tensors)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # Plus the hub's standardisers: buffers (not trained), saved with the adapter (docs/method.md).
    buffers = sum(b.numel() for n, b in model.named_buffers() if "mitp_hub" in n)
    assert buffers > 0
    assert sum(t.numel() for t in tensors.values()) == trainable + buffers
    size = os.path.getsize(tmp_path / "adapter_model.safetensors")
    assert 4 * (trainable + buffers) <= size <= 4 * (trainable + buffers) + 8192  # float32 payload plus the header


def test_loading_with_is_trainable_resumes_training_and_without_freezes_everything(tmp_path):
    base_dir = tmp_path / "base"
    MITPForImageTextClassification.from_backbone(tiny_clip(), num_labels=5).save_pretrained(base_dir)
    _trained().save_pretrained(tmp_path / "adapter")

    frozen = PeftModel.from_pretrained(MITPForImageTextClassification.from_pretrained(base_dir), tmp_path / "adapter")
    assert not any(p.requires_grad for p in frozen.parameters())  # the tuner-level hub included

    model = PeftModel.from_pretrained(
        MITPForImageTextClassification.from_pretrained(base_dir), tmp_path / "adapter", is_trainable=True
    )
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("mitp_hub" in n for n in trainable) and any("mitp_prompt" in n for n in trainable)
    assert any("classifier" in n for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(**clip_inputs(), labels=torch.arange(4)).loss.backward()
    optimizer.step()
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)


def test_second_adapter_from_the_same_file_keeps_the_first_hub_intact(tmp_path):
    first = _trained(seed=0)
    first.save_pretrained(tmp_path / "a")
    second = _trained(seed=1)
    second.save_pretrained(tmp_path / "b")
    inputs = clip_inputs(seed=7)
    with torch.no_grad():
        logits_a, logits_b = first(**inputs).logits, second(**inputs).logits
    hub_a = {k: v.clone() for k, v in first.base_model.mitp_hub["default"].state_dict().items()}

    first.load_adapter(tmp_path / "b", adapter_name="other")
    for key, value in first.base_model.mitp_hub["default"].state_dict().items():
        assert torch.equal(value, hub_a[key]), key
    with torch.no_grad():
        assert torch.equal(first(**inputs).logits, logits_a)
        first.set_adapter("other")
        assert torch.equal(first(**inputs).logits, logits_b)
        first.set_adapter("default")
        assert torch.equal(first(**inputs).logits, logits_a)
    first.delete_adapter("other")
    assert "other" not in first.base_model.mitp_hub


@pytest.mark.parametrize("form", ["keyword", "positional"])
def test_save_pretrained_without_safe_serialization_still_writes_safetensors_that_load(tmp_path, form):
    model = _trained(steps=1)
    model.add_adapter("second", MITPConfig(**CONFIG))
    with pytest.warns(UserWarning, match="always saved as safetensors"):
        if form == "keyword":
            model.save_pretrained(tmp_path, safe_serialization=False)
        else:
            model.save_pretrained(tmp_path, False)
    for folder in (tmp_path, tmp_path / "second"):
        assert (folder / "adapter_model.safetensors").is_file() and not (folder / "adapter_model.bin").exists()
    base = MITPForImageTextClassification.from_backbone(tiny_clip(), num_labels=5)
    loaded = PeftModel.from_pretrained(base, tmp_path).eval()
    inputs = clip_inputs(seed=99)
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, model(**inputs).logits)


def test_input_embeddings_are_the_text_towers_and_save_embedding_layers_saves_and_loads_them(tmp_path):
    model = _trained(steps=1)
    task = model.base_model.model
    embeddings = task.backbone.text_model.embeddings.token_embedding
    assert task.get_input_embeddings() is embeddings and model.get_input_embeddings() is embeddings
    with torch.no_grad():
        embeddings.weight.mul_(2.0)  # as if trained along
    model.save_pretrained(tmp_path, save_embedding_layers=True)
    assert any("token_embedding" in key for key in load_file(tmp_path / "adapter_model.safetensors"))
    base = MITPForImageTextClassification.from_backbone(tiny_clip(), num_labels=5)
    loaded = PeftModel.from_pretrained(base, tmp_path).eval()
    assert torch.equal(loaded.get_input_embeddings().weight, embeddings.weight)
    inputs = clip_inputs(seed=99)
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, model(**inputs).logits)


def test_set_adapter_moves_trainability_to_the_new_adapters_hub():
    model = _trained(steps=0)
    model.add_adapter("second", MITPConfig(**CONFIG))
    hubs = model.base_model.mitp_hub
    assert all(p.requires_grad for p in hubs["default"].parameters())
    assert not any(p.requires_grad for p in hubs["second"].parameters())
    model.set_adapter("second")
    assert not any(p.requires_grad for p in hubs["default"].parameters())
    assert all(p.requires_grad for p in hubs["second"].parameters())
    with pytest.raises(ValueError, match="more than one active adapter at a time"):
        model.base_model.set_adapter(["default", "second"])


def test_deleting_the_active_adapter_makes_the_next_ones_prompts_hub_and_head_trainable_together(inputs):
    model = _trained(steps=0)
    model.add_adapter("second", MITPConfig(**CONFIG))
    model.delete_adapter("default")
    assert model.active_adapter == "second"
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".second" in n for n in trainable)
    hub = {n for n in trainable if ".mitp_hub.second." in n}
    assert hub == {f"base_model.mitp_hub.second.{n}" for n, _ in model.base_model.mitp_hub["second"].named_parameters()}
    assert any("mitp_prompt.second" in n for n in trainable) and any("classifier" in n for n in trainable)
    # and all of them train: two steps move every trainable tensor (the hub's maps get gradient from the second on)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if n in trainable}
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        model(**inputs, labels=torch.tensor([0, 1, 2, 3])).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert {n for n, p in model.named_parameters() if n in trainable and not torch.equal(p, before[n])} == trainable


def test_unload_returns_the_task_model_with_the_trained_head(inputs):
    model = _trained()
    trained_head = model.base_model.model.classifier.modules_to_save["default"].weight.detach().clone()
    task = model.unload()
    assert isinstance(task, MITPForImageTextClassification)
    assert not any(isinstance(m, peft_mitp.MITPLayer) for m in task.modules())
    assert torch.equal(task.classifier.weight, trained_head)
    stock = tiny_clip().get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
    with torch.no_grad():
        _, image, _ = task.pooled_features(**inputs)
    torch.testing.assert_close(image, stock, atol=1e-5, rtol=0)


def test_merge_is_refused_with_a_clear_error():
    model = _trained(steps=0)
    with pytest.raises(NotImplementedError, match=r"cannot be merged.*unload\(\)"):
        model.merge_and_unload()


def test_bf16_backbone_keeps_a_float32_adapter_and_trains(inputs):
    clip = tiny_clip().to(torch.bfloat16)
    base = MITPForImageTextClassification.from_backbone(clip, num_labels=5)
    model = get_peft_model(base, MITPConfig(**CONFIG))
    adapter = [p for n, p in model.named_parameters() if "mitp_" in n]
    assert adapter and all(p.dtype == torch.float32 for p in adapter)
    batch = {**inputs, "pixel_values": inputs["pixel_values"].to(torch.bfloat16)}
    out = model(**batch, labels=torch.arange(4))
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for n, p in model.named_parameters() if "mitp_prompt" in n)


def test_low_cpu_mem_usage_load_matches_normal_load(tmp_path, inputs):
    model = _trained()
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        expected = model(**inputs).logits
    base = MITPForImageTextClassification.from_backbone(tiny_clip(), num_labels=5)
    loaded = PeftModel.from_pretrained(base, tmp_path, low_cpu_mem_usage=True).eval()
    assert not any(p.device.type == "meta" for p in loaded.parameters())
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, expected)


def test_task_model_round_trips_through_save_pretrained(tmp_path, inputs):
    task = MITPForImageTextClassification.from_backbone(tiny_clip(), num_labels=3, problem_type="multi_label_classification")
    task.save_pretrained(tmp_path)
    again = MITPForImageTextClassification.from_pretrained(tmp_path)
    assert again.config.problem_type == "multi_label_classification" and again.config.num_labels == 3
    with torch.no_grad():
        assert torch.equal(again(**inputs).logits, task(**inputs).logits)
    from transformers import AutoConfig

    assert isinstance(AutoConfig.from_pretrained(tmp_path), peft_mitp.MITPTaskConfig)


def test_multi_label_loss_is_bce_and_label_shapes_are_checked(inputs):
    task = MITPForImageTextClassification.from_backbone(tiny_clip(), num_labels=3, problem_type="multi_label_classification")
    labels = torch.tensor([[1.0, 0.0, 1.0]] * 4)
    out = task(**inputs, labels=labels)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(out.logits, labels)
    torch.testing.assert_close(out.loss, expected)
    with pytest.raises(ValueError, match=r"shape \(batch, num_labels\)"):
        task(**inputs, labels=torch.tensor([0, 1, 2, 0]))
    single = MITPForImageTextClassification.from_backbone(tiny_clip(), num_labels=3)
    with pytest.raises(ValueError, match="class indices"):
        single(**inputs, labels=labels)
    with pytest.raises(ValueError, match=r"must lie in 0..2"):
        single(**inputs, labels=torch.tensor([0, 1, 2, 3]))


def test_adapter_weights_are_written_with_the_same_permissions_as_the_other_files(tmp_path):
    model = _trained(steps=0)
    model.save_pretrained(tmp_path / "plain")
    peft_mitp.save_adapter(model, tmp_path / "bf16")
    for folder in (tmp_path / "plain", tmp_path / "bf16"):
        config_mode = (folder / "adapter_config.json").stat().st_mode & 0o777
        assert (folder / "adapter_model.safetensors").stat().st_mode & 0o777 == config_mode, folder.name


def test_loading_into_an_existing_adapter_name_runs_the_mitp_file_checks(tmp_path):
    """Trainer's `resume_from_checkpoint` calls `load_adapter(checkpoint, "default")` on the live model: peft then skips
    the config (where MITP checks the files), so a pickled or truncated checkpoint must be refused there too."""
    import safetensors.torch

    model = make_model()
    model.save_pretrained(tmp_path / "good")
    model.load_adapter(str(tmp_path / "good"), "default", is_trainable=True)  # a good checkpoint still resumes

    pickled = tmp_path / "pickled"
    model.save_pretrained(pickled)
    weights = safetensors.torch.load_file(pickled / "adapter_model.safetensors")
    torch.save(weights, pickled / "adapter_model.bin")
    (pickled / "adapter_model.safetensors").unlink()
    with pytest.raises(ValueError, match="pickled"):
        model.load_adapter(str(pickled), "default", is_trainable=True)

    truncated = tmp_path / "truncated"
    model.save_pretrained(truncated)
    data = (truncated / "adapter_model.safetensors").read_bytes()
    (truncated / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a complete safetensors file"):
        model.load_adapter(str(truncated), "default", is_trainable=True)
