"""Quantized frozen backbones: torchao int8 weight-only and bitsandbytes 8-bit / 4-bit on CPU, adapter in float32."""

from __future__ import annotations

import pytest
import torch
from conftest import clip_inputs, run_python, tiny_clip
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torchao.quantization import Int8WeightOnlyConfig  # a test dependency (pyproject.toml [dev])
from transformers import BitsAndBytesConfig, TorchAoConfig

from peft_mitp import MITPConfig, MITPForImageTextClassification, quantize_backbone
from peft_mitp.quantization import quantized_linear_count

ADAPTER = dict(num_interaction_layers=2, prompt_length=4, hub_dim=16)


def encoder_linears(task: MITPForImageTextClassification) -> int:
    """6 linear layers (q, k, v, out, fc1, fc2) in each CLIP encoder layer of both towers."""
    return 6 * sum(len(tower.layers) for tower in task.mitp_towers().values())


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-clip")
    tiny_clip(0).save_pretrained(folder)
    return folder


def trained_adapter(task: MITPForImageTextClassification, folder) -> dict[str, torch.Tensor]:
    """Train a few steps on `task`, save the adapter to `folder`; return the inputs and the logits after training."""
    model = get_peft_model(task, MITPConfig(**ADAPTER))
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        model(**clip_inputs(), labels=torch.tensor([0, 1, 2, 0])).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval().save_pretrained(folder)
    return model


def test_torchao_quantizes_the_encoder_layers_only_and_the_adapter_trains_in_float32():
    torch.manual_seed(0)
    task = quantize_backbone(MITPForImageTextClassification.from_backbone(tiny_clip(0), num_labels=3))
    assert quantized_linear_count(task) == encoder_linears(task)  # not the projections, not the head
    assert type(task.backbone.visual_projection.weight) is torch.nn.Parameter
    frozen = {k: v.dequantize() if hasattr(v, "dequantize") else v.clone() for k, v in task.backbone.state_dict().items()}
    model = get_peft_model(task, MITPConfig(**ADAPTER))
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert {p.dtype for p in trainable.values()} == {torch.float32}
    optimizer = torch.optim.Adam(trainable.values(), lr=1e-2)
    before = {n: p.detach().clone() for n, p in trainable.items()}
    for _ in range(2):
        model(**clip_inputs(), labels=torch.tensor([0, 1, 2, 0])).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(not torch.equal(before[n], p) for n, p in trainable.items())
    for key, value in task.backbone.state_dict().items():
        if "mitp_prompt" not in key:
            now = value.dequantize() if hasattr(value, "dequantize") else value
            assert torch.equal(now, frozen[key.replace(".base_layer", "")]), key


def test_bitsandbytes_8bit_loading_keeps_projections_and_trains(clip_folder):
    task = MITPForImageTextClassification.from_pretrained(
        clip_folder, num_labels=3, quantization_config=BitsAndBytesConfig(load_in_8bit=True)
    )
    assert quantized_linear_count(task) == encoder_linears(task)
    assert task.backbone.visual_projection.weight.dtype == torch.float32
    model = get_peft_model(task, MITPConfig(**ADAPTER))
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    model(**clip_inputs(), labels=torch.tensor([0, 1, 2, 0])).loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad and "mitp_hub" not in n)


@pytest.mark.parametrize("backend", ["torchao", "bnb-int8"])
def test_a_quantized_backbone_gives_logits_close_to_full_precision_for_the_same_adapter(clip_folder, tmp_path, backend):
    torch.manual_seed(0)
    full = trained_adapter(MITPForImageTextClassification.from_pretrained(clip_folder, num_labels=3), tmp_path / "a")
    inputs = clip_inputs(seed=5)
    with torch.no_grad():
        expected = full(**inputs).logits
    config = TorchAoConfig(Int8WeightOnlyConfig()) if backend == "torchao" else BitsAndBytesConfig(load_in_8bit=True)
    base = MITPForImageTextClassification.from_pretrained(clip_folder, num_labels=3, quantization_config=config)
    quantized = PeftModel.from_pretrained(base, tmp_path / "a").eval()
    with torch.no_grad():
        logits = quantized(**inputs).logits
    # Measured on this tiny model: largest differences 5.3e-2 (torchao) and 1.1e-1 (bitsandbytes 8-bit); before the
    # hub's read-out to the head they were 5.4e-3 and 1.2e-2. The read-out standardises the pooled features by their
    # spread over inputs, which on this tiny random CLIP is small (about 0.03), so the same rounding moves it more.
    # The bound is docs/reliability.md's stated tolerance.
    torch.testing.assert_close(logits, expected, atol=0.12, rtol=0)
    assert not torch.equal(logits, expected)  # the weights really are quantized


def test_a_saved_adapter_reloads_on_a_quantized_backbone_in_a_fresh_process_with_identical_logits(clip_folder, tmp_path):
    inputs = clip_inputs(seed=7)
    save_file(inputs, str(tmp_path / "inputs.safetensors"))
    expected = {}
    for backend in ("torchao", "bnb"):
        config = TorchAoConfig(Int8WeightOnlyConfig()) if backend == "torchao" else BitsAndBytesConfig(load_in_8bit=True)
        torch.manual_seed(0)
        base = MITPForImageTextClassification.from_pretrained(clip_folder, num_labels=3, quantization_config=config)
        model = trained_adapter(base, tmp_path / backend)
        with torch.no_grad():
            expected[backend] = model(**inputs).logits
    run_python(
        f"""
import torch, peft_mitp
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import BitsAndBytesConfig, TorchAoConfig
from torchao.quantization import Int8WeightOnlyConfig
logits = {{}}
for backend in ("torchao", "bnb"):
    config = TorchAoConfig(Int8WeightOnlyConfig()) if backend == "torchao" else BitsAndBytesConfig(load_in_8bit=True)
    base = peft_mitp.MITPForImageTextClassification.from_pretrained({str(clip_folder)!r}, quantization_config=config)
    model = PeftModel.from_pretrained(base, backend).eval()
    with torch.no_grad():
        logits[backend] = model(**load_file("inputs.safetensors")).logits
save_file(logits, "logits.safetensors")
""",
        cwd=tmp_path,
    )
    reloaded = load_file(tmp_path / "logits.safetensors")
    for backend, logits in expected.items():
        assert torch.equal(reloaded[backend], logits), backend


def test_the_offline_backbone_loads_in_4_bits_and_trains():
    task = MITPForImageTextClassification.from_pretrained(
        "offline", num_labels=13, quantization_config=BitsAndBytesConfig(load_in_4bit=True)
    )
    assert quantized_linear_count(task) == 72  # 6 + 6 encoder layers of 6 linear layers; the CNN stem untouched
    assert task.backbone.config._name_or_path == "offline"  # load_processor still recognises it
    from peft_mitp.training import TrainOptions

    model = get_peft_model(task, TrainOptions().mitp_config())
    batch = {"input_ids": torch.randint(1000, 2000, (2, 8)), "attention_mask": torch.ones(2, 8, dtype=torch.long),
             "pixel_values": torch.randn(2, 3, 64, 64)}
    loss = model(**batch, labels=torch.tensor([0, 5])).loss
    loss.backward()
    assert torch.isfinite(loss)


def test_bad_quantization_requests_are_refused_with_what_works(clip_folder, tmp_path):
    from transformers import GPTQConfig

    with pytest.raises(TypeError, match="BitsAndBytesConfig` or `TorchAoConfig"):
        MITPForImageTextClassification.from_pretrained(clip_folder, num_labels=3,
                                                       quantization_config=GPTQConfig(bits=4))
    task = MITPForImageTextClassification.from_backbone(tiny_clip(0), num_labels=3)
    from torchao.quantization import Float8WeightOnlyConfig

    with pytest.raises(TypeError, match="Int8WeightOnlyConfig"):
        quantize_backbone(task, Float8WeightOnlyConfig())
    with pytest.raises(TypeError, match="MITPForImageTextClassification"):
        quantize_backbone(tiny_clip(0))
    task.backbone.text_model.encoder.layers[0].mlp.fc1.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="quantize a frozen backbone only"):
        quantize_backbone(task)
    task.save_pretrained(tmp_path / "task")
    with pytest.raises(ValueError, match="applies to a backbone checkpoint"):
        MITPForImageTextClassification.from_pretrained(tmp_path / "task", quantization_config=TorchAoConfig(
            Int8WeightOnlyConfig()))
