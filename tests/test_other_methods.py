"""The task model as a base for other peft methods and for full fine-tuning: gradient reaches every trainable weight.

The lock-step runs a tower's lower layers without autograd only when nothing there trains; these tests compare each
training setup against the stock backbone's feature functions and the same head, run without the lock-step.
"""

from __future__ import annotations

import pytest
import torch
from conftest import clip_inputs, make_model, tiny_clip
from peft import IA3Config, LoraConfig, get_peft_model

import peft_mitp
from peft_mitp.families import pooled

LABELS = torch.tensor([0, 1, 2, 3])


def _task_model() -> peft_mitp.MITPForImageTextClassification:
    return peft_mitp.MITPForImageTextClassification.from_backbone(tiny_clip(), num_labels=5)


def _lora(task):
    return get_peft_model(task, LoraConfig(target_modules=["q_proj", "v_proj"], modules_to_save=["classifier"]))


def _ia3(task):
    config = IA3Config(
        target_modules=["k_proj", "v_proj", "fc2"], feedforward_modules=["fc2"], modules_to_save=["classifier"]
    )
    return get_peft_model(task, config)


def _full_finetuning(task):
    return task.requires_grad_(True)


def _stock_loss(task, inputs) -> torch.Tensor:
    """The backbone's stock feature functions, concatenated, through the task model's head: no lock-step."""
    backbone, family = task.backbone, task.family
    text = getattr(backbone, family.text_features)(
        input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
    )
    image = getattr(backbone, family.image_features)(pixel_values=inputs["pixel_values"])
    features = torch.cat([pooled(text, family.features_token), pooled(image, family.features_token)], dim=-1)
    return torch.nn.functional.cross_entropy(task.classifier(task.dropout(features)), LABELS)


def _loss_and_grads(model, loss_fn) -> tuple[torch.Tensor, dict[str, torch.Tensor | None]]:
    model.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


@pytest.mark.parametrize("build", [_lora, _ia3, _full_finetuning], ids=["lora", "ia3", "full-finetuning"])
def test_other_methods_train_the_backbone_with_the_stock_loss_and_gradients(build):
    model = build(_task_model()).train()
    task = model if isinstance(model, peft_mitp.MITPForImageTextClassification) else model.base_model.model
    inputs = clip_inputs()
    backbone_trainable = [n for n, p in task.backbone.named_parameters() if p.requires_grad]
    assert backbone_trainable

    loss, grads = _loss_and_grads(model, lambda: model(**inputs, labels=LABELS).loss)
    stock_loss, stock_grads = _loss_and_grads(model, lambda: _stock_loss(task, inputs))
    torch.testing.assert_close(loss, stock_loss, atol=1e-6, rtol=1e-6)
    assert grads.keys() == stock_grads.keys()
    for name, grad in stock_grads.items():
        if grad is None:  # unused by the features (CLIP's `logit_scale`)
            assert grads[name] is None, name
            continue
        assert grads[name] is not None, f"{name} got no gradient through the lock-step"
        torch.testing.assert_close(grads[name], grad, atol=1e-6, rtol=1e-5, msg=name)

    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):  # LoRA's A matrices get gradient once B has left zero
        model(**inputs, labels=LABELS).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    moved = {n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])}
    expected = {n for n, g in stock_grads.items() if g is not None}
    assert moved == expected
    assert any(n.startswith("backbone.") or ".backbone." in n for n in moved)


def test_a_trainable_embedding_below_the_first_interaction_layer_trains_with_and_without_the_adapter():
    model = make_model().train()
    task = model.base_model.model
    embeddings = task.backbone.text_model.embeddings
    embeddings.requires_grad_(True)
    inputs = clip_inputs()

    loss, grads = _loss_and_grads(model, lambda: model(**inputs, labels=LABELS).loss)
    assert grads["base_model.model.backbone.text_model.embeddings.token_embedding.weight"].abs().sum() > 0
    assert all(g is not None for g in grads.values())

    # Inside `disable_adapter()` the stock forward runs, and the embedding still trains, exactly as without MITP.
    with model.disable_adapter():
        disabled_loss = model(**inputs, labels=LABELS).loss
        stock_loss = _stock_loss(task, inputs)
        torch.testing.assert_close(disabled_loss, stock_loss, atol=1e-6, rtol=1e-6)
        (token,) = embeddings.token_embedding.parameters()
        (disabled_grad,) = torch.autograd.grad(disabled_loss, [token])
        (stock_grad,) = torch.autograd.grad(stock_loss, [token])
    assert disabled_grad.abs().sum() > 0
    torch.testing.assert_close(disabled_grad, stock_grad, atol=1e-6, rtol=1e-5)


def test_a_frozen_tower_still_runs_its_lower_layers_without_autograd_beside_a_trainable_one():
    model = make_model().train()
    task = model.base_model.model
    task.backbone.text_model.embeddings.requires_grad_(True)  # the text tower trains from its embeddings up
    first = {
        "text": model.peft_config["default"].text_layers[0],
        "vision": model.peft_config["default"].vision_layers[0],
    }
    recorded = {}
    for kind, layers in (
        ("text", task.backbone.text_model.encoder.layers),
        ("vision", task.backbone.vision_model.encoder.layers),
    ):
        for index in range(first[kind]):
            layers[index].register_forward_hook(
                lambda m, a, out, key=(kind, index): recorded.__setitem__(
                    key, (out[0] if isinstance(out, tuple) else out).requires_grad
                )
            )
    model(**clip_inputs(), labels=LABELS).loss.backward()
    assert {key for key, grad in recorded.items() if grad} == {("text", i) for i in range(first["text"])}
    assert {key for key, grad in recorded.items() if not grad} == {("vision", i) for i in range(first["vision"])}
