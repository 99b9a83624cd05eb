"""Data-parallel and sharded training: Trainer under `torchrun` with 2 CPU processes (DDP or FSDP2, gloo) matches one
process; the supported FSDP wrap policy, and what it refuses."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import clip_inputs, make_model, tiny_clip
from peft import get_peft_model
from test_resume import final_adapter, train_env, write_train_script
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import BertConfig, VisionTextDualEncoderConfig, VisionTextDualEncoderModel, ViTConfig

import peft_mitp
from peft_mitp import MITPForImageTextClassification, MITPLayer

# 16 samples: one global batch of 16 per step, as 2 processes x 8 or 1 process x 16. Every step sees the whole data
# set in both runs, so shuffling cannot make them differ; only the order of float additions does.
GLOBAL_BATCH = ["--samples", "16", "--max-steps", "6", "--save-steps", "100"]


def _torchrun(script: Path, out: Path, *extra: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    return subprocess.Popen(
        [*command, str(script), "--out", str(out), *GLOBAL_BATCH, "--batch", "8", *extra],
        env=train_env(), cwd=script.parent, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def _finish(process: subprocess.Popen) -> None:
    try:
        output, _ = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, output


def _run_info(out: Path) -> dict:
    return json.loads((out / "run.json").read_text())


@pytest.mark.slow
def test_two_cpu_processes_give_the_adapter_of_one_process_with_the_same_global_batch(tmp_path):
    script = write_train_script(tmp_path)
    runs = {
        "ddp": _torchrun(script, tmp_path / "ddp"),
        # Non-reentrant gradient checkpointing recomputes layers during backward, inside DDP's backward.
        "ddp_checkpointed": _torchrun(script, tmp_path / "ddp_checkpointed", "--gradient-checkpointing"),
        "single": subprocess.Popen(
            [sys.executable, str(script), "--out", str(tmp_path / "single"), *GLOBAL_BATCH, "--batch", "16"],
            env=train_env(), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        ),
    }
    for process in runs.values():
        _finish(process)

    assert _run_info(tmp_path / "single")["world_size"] == 1
    expected = final_adapter(tmp_path / "single")
    # The hub's gates start at zero: they moved far beyond the tolerance below, so the cross-modal term took part.
    assert expected["base_model.mitp_hub.text_gate"].abs().max() > 1e-3
    for name in ("ddp", "ddp_checkpointed"):
        info = _run_info(tmp_path / name)
        # Really data-parallel: DDP over gloo, 2 ranks, and no search for unused parameters (DDP would fail a step if
        # a trainable tensor got no gradient, e.g. the hub's maps while its gates are still zero).
        assert (info["world_size"], info["wrapper"], info["backend"]) == (2, "DistributedDataParallel", "gloo")
        assert info["find_unused_parameters"] is False
        assert (info["checkpointed_layers"] > 0) == (name == "ddp_checkpointed")
        got = final_adapter(tmp_path / name)
        assert set(got) == set(expected)
        # Gradients are averaged over the ranks in a different order of additions than one process sums them:
        # after 6 AdamW steps the adapters agree to ~6e-7 (observed).
        for key, tensor in expected.items():
            torch.testing.assert_close(got[key], tensor, atol=1e-5, rtol=1e-4, msg=f"{name}: {key}")


@pytest.mark.slow
def test_missing_modality_adapter_with_modality_dropout_trains_under_ddp(tmp_path):
    script = write_train_script(tmp_path)
    ddp = _torchrun(script, tmp_path / "ddp", "--missing-modality")
    _finish(ddp)
    info = _run_info(tmp_path / "ddp")
    # The stand-ins take part in every training step (zero gradient when no sample lacks a modality): DDP without
    # `find_unused_parameters` accepts them, whatever the dropout drew on each rank.
    assert (info["world_size"], info["find_unused_parameters"]) == (2, False)
    adapter = final_adapter(tmp_path / "ddp")
    assert {"base_model.mitp_hub.stand_ins.features.vision", "base_model.mitp_hub.stand_ins.readouts.text"} <= set(
        adapter
    )
    assert torch.count_nonzero(adapter["base_model.mitp_hub.stand_ins.features.vision"]) > 0  # trained from zero


# ------------------------------------------------------------------------------------------------------------- FSDP
def _single_process(script: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(script), "--out", str(out), *GLOBAL_BATCH, "--batch", "16"],
        env=train_env(), cwd=script.parent, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


@pytest.mark.slow
def test_fsdp2_on_two_cpu_processes_gives_the_adapter_of_one_process(tmp_path):
    script = write_train_script(tmp_path)
    runs = {
        "fsdp": _torchrun(script, tmp_path / "fsdp", "--fsdp"),
        # FSDP's own activation checkpointing: the encoder layers inside the MITPLayers recompute during backward.
        "fsdp_checkpointed": _torchrun(
            script, tmp_path / "fsdp_checkpointed", "--fsdp", "--fsdp-activation-checkpointing"
        ),
        "single": _single_process(script, tmp_path / "single"),
    }
    for process in runs.values():
        _finish(process)

    expected = final_adapter(tmp_path / "single")
    # The hub's gates start at zero: they moved far beyond the tolerance below, so the cross-modal term took part.
    assert expected["base_model.mitp_hub.text_gate"].abs().max() > 1e-3
    for name in ("fsdp", "fsdp_checkpointed"):
        info = _run_info(tmp_path / name)
        # Really sharded: FSDP2 over gloo on 2 ranks, one unit per encoder layer of both towers (4 text + 6 vision,
        # the 4 inside MITPLayers included), none around an MITPLayer, and each rank holds half the frozen weights.
        assert (info["world_size"], info["wrapper"], info["backend"]) == (2, "FSDPPeftModel", "gloo")
        assert info["fsdp_version"] == 2
        assert info["fsdp_units"].count("CLIPEncoderLayer") == 10 and "MITPLayer" not in info["fsdp_units"]
        assert info["frozen_local_fraction"] == pytest.approx(0.5, abs=0.01)
        assert info["checkpoint_wrapped"] == (["CLIPEncoderLayer"] * 10 if name == "fsdp_checkpointed" else [])
        # The sharded model computes the same losses (observed: to 1.2e-7).
        assert info["losses"] == pytest.approx(_run_info(tmp_path / "single")["losses"], abs=1e-6)
        got = final_adapter(tmp_path / name)
        assert set(got) == set(expected)
        # Gradients are reduce-scattered over the ranks, summed in another order than one process sums them: after 6
        # AdamW steps the adapters agree to ~5e-6 (observed; the parameters moved by about 0.1).
        for key, tensor in expected.items():
            torch.testing.assert_close(got[key], tensor, atol=1e-5, rtol=1e-4, msg=f"{name}: {key}")


def test_prepare_fsdp_wraps_the_encoder_layers_and_keeps_the_model_the_same():
    model = make_model()
    batch = clip_inputs()
    model.eval()
    with torch.no_grad():
        before = model(**batch).logits
    keys = set(model.state_dict())
    logit_scale = model.base_model.model.backbone.logit_scale.detach().clone()

    config = peft_mitp.prepare_fsdp(model, {"fsdp_activation_checkpointing": True, "reshard_after_forward": False})

    assert peft_mitp.fsdp_layer_classes(model) == [type(model.base_model.model.backbone.text_model.encoder.layers[0])]
    assert config == {
        "activation_checkpointing": True,  # the user's settings stay, read without transformers' `fsdp_` prefix
        "reshard_after_forward": False,
        "version": 2,
        "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "transformer_layer_cls_to_wrap": ["CLIPEncoderLayer"],
        "state_dict_type": "FULL_STATE_DICT",
    }
    # fully_shard refuses 0-d parameters: CLIP's logit_scale (unused by MITP) is now a buffer with the same key and
    # value; nothing else moved and the logits are the same.
    backbone = model.base_model.model.backbone
    assert "logit_scale" in dict(backbone.named_buffers()) and "logit_scale" not in dict(backbone.named_parameters())
    assert torch.equal(backbone.logit_scale, logit_scale)
    assert set(model.state_dict()) == keys
    assert all(p.dim() > 0 for p in model.parameters())
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, before)
    # Idempotent: a second call finds nothing left to move and returns the same settings.
    assert peft_mitp.prepare_fsdp(model, config) == config


def test_fsdp_layer_classes_of_a_backbone_joined_from_two_towers_name_both_encoder_layers():
    torch.manual_seed(0)
    backbone = VisionTextDualEncoderModel(
        VisionTextDualEncoderConfig.from_vision_text_configs(
            ViTConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                      image_size=32, patch_size=8),
            BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       vocab_size=99, max_position_embeddings=16),
            projection_dim=24,
        )
    )
    model = get_peft_model(
        MITPForImageTextClassification.from_backbone(backbone, num_labels=3),
        peft_mitp.MITPConfig(prompt_length=2, num_interaction_layers=2, hub_dim=8),
    )
    assert [cls.__name__ for cls in peft_mitp.fsdp_layer_classes(model)] == ["BertLayer", "ViTLayer"]
    assert peft_mitp.prepare_fsdp(model)["transformer_layer_cls_to_wrap"] == ["BertLayer", "ViTLayer"]


@pytest.mark.parametrize(
    ("classes", "holder"),
    [(["MITPLayer"], "is MITP's interaction layer"), ("CLIPEncoder", "holds MITP interaction layers"),
     (["CLIPEncoderLayer", "CLIPVisionModel"], "holds MITP interaction layers")],
)
def test_prepare_fsdp_refuses_a_wrap_policy_around_an_mitp_layer(classes, holder):
    model = make_model()
    with pytest.raises(ValueError, match="never around an MITPLayer") as error:
        peft_mitp.prepare_fsdp(model, {"transformer_layer_cls_to_wrap": classes})
    assert holder in str(error.value) and "['CLIPEncoderLayer'] instead" in str(error.value)
    # Refused before anything changed.
    assert "logit_scale" in dict(model.base_model.model.backbone.named_parameters())


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        ({"version": 1}, "FSDP2 .* only, got `version`=1"),
        ({"fsdp_version": "1"}, "FSDP2 .* only"),
        ({"auto_wrap_policy": "SIZE_BASED_WRAP"}, "may wrap an MITPLayer"),
        ({"state_dict_type": "SHARDED_STATE_DICT"}, "writes no adapter_model.safetensors"),
        ({"transformer_layer_cls_to_wrap": "CLIPEncoderLayers"}, "no module class of this model"),
    ],
)
def test_prepare_fsdp_refuses_settings_mitp_does_not_support(settings, match):
    with pytest.raises(ValueError, match=match):
        peft_mitp.prepare_fsdp(make_model(), settings)


def test_prepare_fsdp_refuses_what_is_not_an_mitp_model_or_a_trainable_scalar():
    with pytest.raises(TypeError, match="need a model with an MITP adapter"):
        peft_mitp.prepare_fsdp(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="no MITP adapter yet"):
        peft_mitp.prepare_fsdp(MITPForImageTextClassification.from_backbone(tiny_clip(), num_labels=2))
    with pytest.raises(TypeError, match="must be a dict"):
        peft_mitp.prepare_fsdp(make_model(), ["CLIPEncoderLayer"])
    model = make_model()
    model.base_model.model.backbone.logit_scale.requires_grad_(True)
    with pytest.raises(ValueError, match=r"cannot shard 0-d parameters.*logit_scale"):
        peft_mitp.prepare_fsdp(model)


# --------------------------------------------------------------------- activation checkpointing around an MITPLayer
class _Checkpointed(nn.Module):
    """What an activation-checkpoint wrapper around an MITPLayer does: recompute it in backward."""

    def __init__(self, layer: nn.Module, use_reentrant: bool) -> None:
        super().__init__()
        self.layer, self.use_reentrant = layer, use_reentrant

    def forward(self, hidden_states, *args, **kwargs):
        # Reentrant checkpointing takes no keyword arguments: bind them.
        return checkpoint(functools.partial(self.layer, **kwargs), hidden_states, *args, use_reentrant=self.use_reentrant)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_a_checkpoint_wrapper_around_an_mitp_layer_is_refused_when_it_recomputes(use_reentrant):
    model = make_model()
    layers = model.base_model.model.backbone.text_model.encoder.layers
    # The second interaction layer: the first one starts in no-grad mode (nothing below it trains), where
    # checkpointing records nothing to recompute.
    index = [i for i, layer in enumerate(layers) if isinstance(layer, MITPLayer)][1]
    layers[index] = _Checkpointed(layers[index], use_reentrant)
    # The forward runs the MITPLayer inside the lock-step, as always; the recomputation in backward would run it
    # outside, without prompts (reentrant checkpointing would then silently give the prompts no gradient).
    loss = model(**clip_inputs(), labels=torch.tensor([0, 1, 2, 3])).loss
    with pytest.raises(RuntimeError, match="re-run during backward, outside MITP's lock-step forward"):
        loss.backward()
