"""Numerics: half-precision backbones under a float32 adapter, awkward texts, an extreme hub softmax, torch.compile and
gradient checkpointing all give finite numbers, and the same numbers where they should.

`benchmarks/precision_report.py` measures how far bf16 / fp16 move logits and gradients from fp32; the table is in
docs/reliability.md.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from conftest import EOS, PAD, clip_inputs, tiny_clip
from peft import get_peft_model

import peft_mitp
from peft_mitp import MITPConfig, MITPForImageTextClassification

HALF = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16")]
# Largest |logit difference| to the fp32 model on the awkward batch: a few times the largest difference
# benchmarks/precision_report.py measures on this backbone (bf16 keeps 8 mantissa bits, fp16 11).
LOGIT_TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 3e-3}
MAX_POSITIONS = 24  # the tiny CLIP's text `max_position_embeddings`


def _model(
    dtype: torch.dtype = torch.float32,
    temperature: float | None = None,
    scale: float = 1.0,
    before_peft: Callable[[MITPForImageTextClassification], None] | None = None,
):
    """The tiny CLIP cast to `dtype` *before* the adapter is added (as `from_pretrained(..., dtype=...)` would), with
    its hub moved off its zero-initialised gates so the cross-modal path carries signal. The same weights
    for every dtype."""
    clip = tiny_clip().to(dtype)
    base = MITPForImageTextClassification.from_backbone(clip, num_labels=5)
    if before_peft is not None:
        before_peft(base)
    torch.manual_seed(100)
    config = MITPConfig(prompt_length=4, num_interaction_layers=3, hub_dim=16, temperature=temperature)
    model = get_peft_model(base, config)
    hub = model.base_model.mitp_hub["default"]
    with torch.no_grad():
        for param in hub.parameters():
            param.normal_(std=0.2)
        hub.text_in.weight.mul_(scale)
        hub.vision_in.weight.mul_(scale)
    return model


def _awkward_batch() -> dict[str, torch.Tensor]:
    """Four texts padded to the position limit: full length, half padding, only BOS + EOS, an all-zero mask."""
    batch = clip_inputs(batch=4, length=MAX_POSITIONS, seed=3)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    ids[1, 12:], mask[1, 12:] = PAD, 0
    ids[1, 11] = EOS
    ids[2, 0], ids[2, 1], ids[2, 2:], mask[2, 2:] = EOS - 1, EOS, PAD, 0  # special tokens and padding only
    mask[3] = 0  # no attended token at all: stock CLIP still returns finite features; so must MITP
    return batch


def _train(model: torch.nn.Module, batch: dict[str, torch.Tensor], dtype: torch.dtype, steps: int = 2) -> list:
    """A few Adam steps; asserts that the loss, every adapter gradient and every updated weight stay finite."""
    model.train()
    adapter = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(adapter, lr=1e-2)
    inputs = {**batch, "pixel_values": batch["pixel_values"].to(dtype)}
    labels = torch.arange(inputs["input_ids"].shape[0]) % 5
    losses = []
    for _ in range(steps):
        out = model(**inputs, labels=labels)
        out.loss.backward()
        assert torch.isfinite(out.logits).all() and torch.isfinite(out.loss)
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in adapter)
        optimizer.step()
        optimizer.zero_grad()
        assert all(torch.isfinite(p).all() for p in adapter)
        losses.append(out.loss.item())
    return losses


# ----------------------------------------------------------------------------------- half-precision backbones
@pytest.mark.parametrize("dtype", HALF)
def test_half_precision_backbone_trains_a_float32_adapter_on_awkward_texts(dtype):
    model = _model(dtype)
    adapter = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert adapter and all(p.dtype == torch.float32 for p in adapter.values())
    assert model.base_model.model.backbone.text_model.embeddings.token_embedding.weight.dtype == dtype
    _train(model, _awkward_batch(), dtype)


@pytest.mark.parametrize("autocast", [True, False], ids=["autocast", "no-autocast"])
@pytest.mark.parametrize(
    ("path", "low_cpu_mem_usage"),
    [
        ("get_peft_model", False),
        ("load-fp32-file", False),
        ("load-fp32-file", True),
        ("load-bf16-file", False),
        ("load-bf16-file", True),
    ],
    ids=["get_peft_model", "load-fp32-file", "load-fp32-file-low-cpu-mem", "load-bf16-file", "load-bf16-file-low-cpu-mem"],
)
def test_one_dtype_rule_for_prompts_hub_and_head_on_every_path(path, low_cpu_mem_usage, autocast, tmp_path):
    """Float32 prompts and hub with `autocast_adapter_dtype=True`, the backbone's dtype without; the head copy always in
    the dtype of the head it copies; whatever the adapter file holds and however it is loaded."""
    from peft import PeftModel

    def base():
        return MITPForImageTextClassification.from_backbone(tiny_clip().to(torch.bfloat16), num_labels=5)

    config = MITPConfig(prompt_length=4, num_interaction_layers=2, hub_dim=16)
    if path == "get_peft_model":
        model = get_peft_model(base(), config, autocast_adapter_dtype=autocast)
    else:
        saved = get_peft_model(MITPForImageTextClassification.from_backbone(tiny_clip(), num_labels=5), config)
        peft_mitp.save_adapter(saved, tmp_path, dtype=torch.float32 if path == "load-fp32-file" else torch.bfloat16)
        model = PeftModel.from_pretrained(
            base(), tmp_path, is_trainable=True, low_cpu_mem_usage=low_cpu_mem_usage, autocast_adapter_dtype=autocast
        )
    expected = torch.float32 if autocast else torch.bfloat16
    dtypes = {}
    for name, param in model.named_parameters():
        kind = next((k for k in ("mitp_prompt", "mitp_hub", "modules_to_save") if k in name), None)
        if kind:
            dtypes.setdefault(kind, set()).add(param.dtype)
    head = model.base_model.model.classifier.original_module.weight.dtype
    assert dtypes == {"mitp_prompt": {expected}, "mitp_hub": {expected}, "modules_to_save": {head}}
    _train(model, clip_inputs(seed=4), torch.bfloat16, steps=1)


@pytest.mark.parametrize("dtype", HALF)
def test_half_precision_logits_stay_close_to_float32(dtype):
    batch = _awkward_batch()
    with torch.no_grad():
        reference = _model(torch.float32).eval()(**batch).logits
        logits = _model(dtype).eval()(**{**batch, "pixel_values": batch["pixel_values"].to(dtype)}).logits
    assert logits.dtype == torch.float32  # the head is part of the float32 adapter
    assert (logits - reference).abs().max() < LOGIT_TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), *HALF])
def test_a_batch_of_one_trains(dtype):
    batch = clip_inputs(batch=1, length=5, seed=4)
    _train(_model(dtype), batch, dtype)


@pytest.mark.parametrize(
    ("temperature", "scale", "activation"),
    [
        (1e-4, 1.0, "one-hot"),
        (1e4, 1.0, "uniform"),
        (None, 1e3, "one-hot"),
        (1e-4, 1e3, "one-hot"),  # similarities of order 1e10
    ],
    ids=["temperature-1e-4", "temperature-1e4", "maps-x1e3", "maps-x1e3-temperature-1e-4"],
)
@pytest.mark.parametrize("dtype", HALF)
def test_extreme_hub_softmax_trains_without_nan(dtype, temperature, scale, activation):
    model = _model(dtype, temperature=temperature, scale=scale)
    batch = clip_inputs(batch=2, length=MAX_POSITIONS, seed=5)
    with torch.no_grad():
        out = model(**{**batch, "pixel_values": batch["pixel_values"].to(dtype)}, output_hub_activations=True)
    text_activation = out.attentions[0][0]
    assert torch.isfinite(text_activation).all()
    # The regime really is reached: rows of the activation are one-hot, or flat over the 4 vision prompts.
    expected = 1.0 if activation == "one-hot" else 0.25
    torch.testing.assert_close(text_activation.max(-1).values, torch.full((2, 4), expected), atol=1e-3, rtol=0)
    _train(model, batch, dtype, steps=1)


# ------------------------------------------------------------------------------------------------ torch.compile
def _with_perturbed_hub():
    model = _model().eval()
    batch = clip_inputs(seed=6)
    return model, batch


def _grads(model: torch.nn.Module, batch: dict[str, torch.Tensor], call: Callable | None = None) -> tuple:
    """Logits and adapter gradients of one training forward of `model` (run through `call`, e.g. its compiled form)."""
    model.zero_grad(set_to_none=True)
    out = (model if call is None else call)(**batch, labels=torch.arange(4))
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _assert_same(expected: tuple, actual: tuple) -> None:
    torch.testing.assert_close(actual[0], expected[0], atol=1e-6, rtol=1e-5)
    assert set(actual[1]) == set(expected[1])
    for name, grad in expected[1].items():
        torch.testing.assert_close(actual[1][name], grad, atol=1e-6, rtol=1e-5, msg=name)


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.slow
def test_compiled_hub_and_encoder_layers_give_the_same_logits_and_gradients(fresh_dynamo):
    model, batch = _with_perturbed_hub()
    expected = _grads(model, batch)
    graphs = []

    def aot_eager_recording(graph_module: torch.fx.GraphModule, example_inputs: list):
        graphs.append({str(node.target) for node in graph_module.graph.nodes})
        return torch._dynamo.lookup_backend("aot_eager")(graph_module, example_inputs)

    model.base_model.mitp_hub["default"].compile(backend=aot_eager_recording)  # in place: same state-dict keys
    for layer in model.modules():
        if isinstance(layer, peft_mitp.MITPLayer):
            layer.base_layer.compile(backend=aot_eager_recording)
    _assert_same(expected, _grads(model, batch))
    # Both really ran compiled: a graph of the hub (its softmax) and one of an encoder layer (its attention).
    assert any(any("softmax" in t for t in graph) for graph in graphs)
    assert any(any("scaled_dot_product_attention" in t for t in graph) for graph in graphs)
    assert "mitp_hub.default.text_in.weight" in {k.split("base_model.")[-1] for k in model.state_dict()}


@pytest.mark.slow
def test_compiling_the_whole_model_runs_the_lockstep_eagerly(fresh_dynamo):
    """`torch.compile(model)` works: the scheduler is marked `torch.compiler.disable`, so dynamo breaks the graph
    there and runs both towers and the hub eagerly; what comes after (head, loss) is compiled."""
    model, batch = _with_perturbed_hub()
    expected = _grads(model, batch)
    graphs = []

    def recording_backend(graph_module: torch.fx.GraphModule, example_inputs: list) -> torch.fx.GraphModule:
        graphs.append(graph_module)
        return graph_module

    compiled = torch.compile(model, backend=recording_backend)
    _assert_same(expected, _grads(model, batch, call=compiled))
    assert graphs, "nothing was compiled"
    traced = [str(node.target) for graph in graphs for node in graph.graph.nodes]
    assert not any("scaled_dot_product_attention" in target for target in traced), "a tower was traced"
    assert any("linear" in target for target in traced), "the head was not compiled"


def test_fullgraph_compile_of_the_whole_model_says_what_to_compile_instead(fresh_dynamo):
    model, batch = _with_perturbed_hub()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with pytest.raises(Exception, match=r"greenlets, which torch.compile cannot trace. Compile without fullgraph=True"):
        compiled(**batch)


# ----------------------------------------------------------------------------------- gradient checkpointing
def _count_mlp_calls(layer: torch.nn.Module) -> list[int]:
    """Calls of the layer's MLP: its hooks run inside the checkpointed `forward`, so a recomputation counts twice."""
    calls = [0]

    def count(*_):
        calls[0] += 1

    layer.mlp.register_forward_pre_hook(count)
    return calls


def _enable(model: torch.nn.Module, method: str, use_reentrant: bool) -> None:
    # transformers 5 renamed `gradient_checkpointing_enable` (still there, deprecated) to `activation_checkpointing_enable`.
    kwargs_name = method.replace("_enable", "_kwargs")
    getattr(model, method)(**{kwargs_name: {"use_reentrant": use_reentrant}})


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning")
@pytest.mark.parametrize(
    ("where", "method", "use_reentrant"),
    [
        ("peft-model", "gradient_checkpointing_enable", True),
        ("peft-model", "activation_checkpointing_enable", False),
        ("task-model-before-peft", "activation_checkpointing_enable", True),
    ],
)
def test_gradient_checkpointing_gives_the_same_gradients_and_recomputes_prompted_layers(where, method, use_reentrant):
    expected = _grads(_model().train(), clip_inputs(seed=7))
    if where == "peft-model":
        model = _model().train()
        _enable(model, method, use_reentrant)
    else:
        model = _model(before_peft=lambda task: _enable(task, method, use_reentrant)).train()
    text_layers = model.base_model.model.backbone.text_model.encoder.layers
    prompted = text_layers[model.peft_config["default"].text_layers[0]]
    assert isinstance(prompted, peft_mitp.MITPLayer) and prompted.base_layer.gradient_checkpointing
    below = text_layers[0]  # an extraction layer under the first interaction layer: runs without autograd
    prompted_calls, below_calls = _count_mlp_calls(prompted.base_layer), _count_mlp_calls(below)
    actual = _grads(model, clip_inputs(seed=7))
    _assert_same(expected, actual)
    assert prompted_calls == [2], "the prompted layer was not recomputed in backward"
    assert below_calls == [1], "a layer without autograd was checkpointed"

