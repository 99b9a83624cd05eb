"""Training: only adapter tensors change, no gradient below the first interaction layer, ablations, Trainer."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import clip_inputs, make_model, tiny_clip
from datasets import Dataset
from transformers import Trainer, TrainingArguments

import peft_mitp


def _train_step(model, inputs, labels, lr=0.05):
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    out = model(**inputs, labels=labels)
    out.loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return out.loss.item()


def test_training_step_changes_only_prompts_hub_and_head(inputs):
    model = make_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _train_step(model, inputs, torch.tensor([0, 1, 2, 3]))
    _train_step(model, inputs, torch.tensor([0, 1, 2, 3]))  # second step: the hub's input maps get gradient too
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert changed == trainable
    assert all(("mitp_prompt" in n) or ("mitp_hub" in n) or ("classifier.modules_to_save" in n) for n in changed)
    assert any("mitp_hub.default.text_in" in n for n in changed)
    for name, param in model.named_parameters():
        if "backbone" in name and "mitp_" not in name:
            assert torch.equal(param, before[name]), name  # bit-identical


def test_no_gradient_below_the_first_interaction_layer(inputs):
    model = make_model()
    task = model.base_model.model
    # Even when the embeddings' outputs require grad (as `enable_input_require_grads` does for checkpointing),
    # nothing below the first interaction layer may enter the autograd graph.
    embedded = []
    task.backbone.text_model.embeddings.register_forward_hook(
        lambda m, a, out: embedded.append(out.detach().requires_grad_(True)) or embedded[-1]
    )
    seen = {}
    for kind, layers, first in (
        ("text", task.backbone.text_model.encoder.layers, 2),
        ("vision", task.backbone.vision_model.encoder.layers, 3),
    ):
        for index in range(first + 1):
            layers[index].register_forward_pre_hook(
                lambda m, args, kind=kind, index=index: seen.__setitem__((kind, index), args[0].requires_grad)
            )
    out = model(**inputs, labels=torch.tensor([0, 1, 2, 3]))
    out.loss.backward()
    assert embedded[0].grad is None  # no gradient reached the embeddings
    assert seen == {
        ("text", 0): True, ("text", 1): False, ("text", 2): False,
        ("vision", 0): False, ("vision", 1): False, ("vision", 2): False, ("vision", 3): False,
    }
    assert model.peft_config["default"].text_layers[0] == 2
    assert all(p.grad is None for n, p in model.named_parameters() if "mitp_" not in n and "classifier" not in n)


@pytest.mark.parametrize("pairs", [1, 2, 3])
def test_every_trainable_tensor_gets_a_gradient_in_one_step(pairs, inputs):
    # DDP without `find_unused_parameters` fails on a trainable tensor that takes no part in the loss.
    model = make_model(peft_mitp.MITPConfig(prompt_length=4, num_interaction_layers=pairs, hub_dim=16)).train()
    model(**inputs, labels=torch.tensor([0, 1, 2, 3])).loss.backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert sum("mitp_prompt" in n for n in trainable) == 2 * pairs
    assert [n for n, p in trainable.items() if p.grad is None] == []
    hub = model.base_model.mitp_hub["default"]
    # Every hub has its read-out (token consolidation through the maps into the shared space, fusion MLP).
    assert any("mitp_hub.default.text_in" in n for n in trainable)
    assert any("mitp_hub.default.readout.fusion" in n for n in trainable)
    generation = [n for n, _ in hub.named_parameters() if n.startswith(("text_out", "vision_out")) or "gate" in n]
    if pairs == 1:  # one pair: no read-out feeds a next pair, so no generation maps, gates or memory gates
        assert generation == []
    else:
        assert "text_out.weight" in generation and "text_memory_gate" in generation


CONFIGS = [
    {"similarity": "scaled_dot"},
    {"similarity": "cosine"},
    {"similarity": "dot", "temperature": 2.0},
    {"activation": "hard"},
    {"interaction": False},
    {"memory": False},
    {"interaction": False, "memory": False},
    {"vision_prompt_length": 2},
]


@pytest.mark.parametrize("overrides", CONFIGS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_every_ablation_and_similarity_runs_forward_and_backward(overrides, inputs):
    config = peft_mitp.MITPConfig(prompt_length=4, num_interaction_layers=3, hub_dim=16, **overrides)
    model = make_model(config)
    labels = torch.tensor([0, 1, 2, 3])
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(5):
        loss = model(**inputs, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    prompts = [p for n, p in model.named_parameters() if "mitp_prompt" in n]
    assert prompts and all(p.requires_grad for p in prompts)
    hub = model.base_model.mitp_hub["default"]
    assert hub.interaction == config.interaction and hub.memory == config.memory
    if not config.interaction:  # no maps and no token consolidation; the fusion MLP (and memory gates) only
        names = {n.split(".")[0] for n, _ in hub.named_parameters()}
        assert names <= {"readout", "text_memory_gate", "vision_memory_gate"} and "readout" in names
        assert hub.token_heads == 0


def _toy_dataset(n: int, seed: int) -> Dataset:
    """Label = (first token is even) + 2 * (image brightness > 0): needs both modalities."""
    batch = clip_inputs(batch=n, length=6, seed=seed)
    brightness = torch.randn(n).sign()
    pixels = batch["pixel_values"] * 0.5 + brightness[:, None, None, None]
    labels = (batch["input_ids"][:, 0] % 2 == 0).long() + 2 * (brightness > 0).long()
    return Dataset.from_dict(
        {
            "input_ids": batch["input_ids"].tolist(),
            "attention_mask": batch["attention_mask"].tolist(),
            "pixel_values": pixels.tolist(),
            "labels": labels.tolist(),
            "unused": ["x"] * n,
        }
    ).with_format("torch")


def _args(out, **kwargs):
    return TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=16,
        learning_rate=3e-2,
        logging_steps=1,
        save_strategy="steps",
        save_steps=10,
        report_to=[],
        label_names=["labels"],
        seed=0,
        use_cpu=True,
        disable_tqdm=True,
        **kwargs,
    )


def test_trainer_learns_saves_adapter_only_checkpoints_and_resumes(tmp_path):
    train = _toy_dataset(96, seed=11)
    model = make_model(num_labels=4)
    trainer = Trainer(model=model, args=_args(tmp_path / "run", max_steps=30), train_dataset=train)
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
    checkpoint = tmp_path / "run" / "checkpoint-20"
    files = set(os.listdir(checkpoint))
    assert {"adapter_model.safetensors", "adapter_config.json"} <= files
    assert not any(f.startswith(("model", "pytorch_model")) for f in files)
    assert json.loads((checkpoint / "adapter_config.json").read_text())["peft_type"] == "MITP"

    resumed_model = make_model(num_labels=4)
    resumed = Trainer(model=resumed_model, args=_args(tmp_path / "run", max_steps=30), train_dataset=train)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 30
    steps = [e["step"] for e in resumed.state.log_history if "loss" in e]
    assert steps == list(range(1, 31))  # 1..20 restored from the checkpoint, 21..30 trained now
    # The resumed run ends at the same adapter as the uninterrupted one (same seed, same data order, CPU).
    for (name, a), (_, b) in zip(model.named_parameters(), resumed_model.named_parameters(), strict=True):
        if a.requires_grad:
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)


def test_building_wrapping_and_running_the_task_model_raises_no_deprecation_warning(inputs, tmp_path):
    """The project's own calls (and peft's reads of the task model) must not trigger transformers' deprecations."""
    import warnings

    from peft import PeftModel

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = make_model()
        model(**inputs, labels=torch.tensor([0, 1, 2, 3])).loss.backward()
        model.eval()
        with torch.no_grad():
            model(**inputs, output_hub_activations=True)
        model.save_pretrained(tmp_path)
        base = peft_mitp.MITPForImageTextClassification.from_backbone(tiny_clip(), num_labels=5)
        PeftModel.from_pretrained(base, tmp_path)  # what mitp evaluate / predict / explain do
    deprecations = [w for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))]
    assert not deprecations, [f"{w.filename}:{w.lineno}: {w.message}" for w in deprecations]


def test_training_progress_is_labelled_and_logs_numbers_as_numbers(capsys):
    from transformers import TrainerControl, TrainerState

    from peft_mitp.training import LabelledProgressCallback

    progress, state = LabelledProgressCallback(), TrainerState(max_steps=2, is_world_process_zero=True)
    progress.on_train_begin(None, state, TrainerControl())
    assert progress.training_bar.desc.startswith("train")
    progress.on_log(None, state, TrainerControl(), logs={"loss": 0.123456, "learning_rate": 0.001, "epoch": 1,
                                                          "total_flos": 3.0})
    progress.on_train_end(None, state, TrainerControl())
    logged = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert logged == {"loss": 0.1235, "learning_rate": 0.001, "epoch": 1}
