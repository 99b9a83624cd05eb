"""Every backbone family and every stand-alone tower in `peft_mitp.families`, on tiny configs (no downloads).

Each registered dual-encoder family and each `TOWER_LAYER_PATHS` tower (inside a `VisionTextDualEncoderModel`) is
checked for: stock features with the adapter disabled, padding invariance, the text tower's causality inside a
prompted layer, a training step that moves only adapter tensors, and a save / fresh-process load. Then the refusals,
`from_text_vision_pretrained` and the processor helper.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_python
from peft import get_peft_model
from safetensors.torch import load_file, save_file
from transformers import (
    AutoConfig,
    AutoModel,
    BertConfig,
    BertModel,
    BertTokenizer,
    ChineseCLIPImageProcessor,
    ChineseCLIPProcessor,
    CLIPConfig,
    CLIPModel,
    ElectraConfig,
    ElectraModel,
    VisionTextDualEncoderConfig,
    VisionTextDualEncoderProcessor,
    ViTConfig,
    ViTImageProcessor,
    ViTModel,
)
from transformers.utils import logging as hf_logging

from peft_mitp import MITPConfig, MITPForImageTextClassification, UnsupportedBackboneError
from peft_mitp.families import (
    REFUSED,
    TOWER_LAYER_PATHS,
    TOWER_TOKEN_ARGUMENTS,
    families,
    family_for,
    pooled,
    supported_model_types,
)
from peft_mitp.layer import MITPLayer, extend_token_argument
from peft_mitp.processing import ImageTextProcessor, load_processor

hf_logging.set_verbosity_error()  # tiny random models: the "newly initialised weights" notices are expected

VOCAB, EOS, IMAGE = 99, 98, 32
# Text and vision widths and depths differ on purpose: the hub's width maps and the pairing must follow the towers.
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4)
VISION = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4, image_size=IMAGE,
              patch_size=8)
CLIP_TEXT = dict(TEXT, vocab_size=VOCAB, max_position_embeddings=24, eos_token_id=EOS, bos_token_id=EOS - 1,
                 pad_token_id=0)
ROBERTA_TEXT = dict(TEXT, vocab_size=VOCAB, max_position_embeddings=30, pad_token_id=1)
ADAPTER = dict(prompt_length=3, num_interaction_layers=2, hub_dim=16)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Run these many tiny forwards on one intra-op thread: on a busy 2-core machine, a second thread only waits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@dataclass(frozen=True)
class Case:
    """A tiny backbone: how to build its config, and the facts about it the tests check.

    `causal`: the text tower is causal. `pad`: the padding token id. `attn`: the attention implementation.
    """

    config: object
    causal: bool = False
    pad: int = 0
    attn: str = "sdpa"


def _dual(model_type: str, text: dict, vision: dict, **top) -> object:
    return lambda: AutoConfig.for_model(model_type, text_config=text, vision_config=vision, **top)


FAMILIES: dict[str, Case] = {
    "clip": Case(_dual("clip", CLIP_TEXT, VISION, projection_dim=24), causal=True),
    "metaclip_2": Case(_dual("metaclip_2", CLIP_TEXT, VISION, projection_dim=24), causal=True),
    # SigLIP: text head width (projection_size) differs from both tower widths; no projections.
    "siglip": Case(
        _dual("siglip", dict(TEXT, vocab_size=VOCAB, max_position_embeddings=24, projection_size=40), VISION)
    ),
    "siglip2": Case(
        _dual("siglip2", dict(TEXT, vocab_size=VOCAB, max_position_embeddings=24), dict(VISION, num_patches=16))
    ),
    "chinese_clip": Case(_dual("chinese_clip", dict(TEXT, vocab_size=VOCAB, max_position_embeddings=24), VISION,
                               projection_dim=24)),
    "altclip": Case(_dual("altclip", dict(ROBERTA_TEXT, project_dim=36), VISION, projection_dim=24), pad=1),
    "owlvit": Case(_dual("owlvit", CLIP_TEXT, VISION, projection_dim=24), causal=True),
    "owlv2": Case(_dual("owlv2", CLIP_TEXT, VISION, projection_dim=24), causal=True),
    "clipseg": Case(_dual("clipseg", CLIP_TEXT, VISION, projection_dim=24), causal=True),
    # AIMv2's text tower is causal through its padding mask only; under SDPA an all-ones mask is dropped and the
    # stock tower turns bidirectional (docs/backbones.md), so it is checked under eager attention.
    "aimv2": Case(_dual("aimv2", CLIP_TEXT, VISION, projection_dim=24), causal=True, attn="eager"),
    "blip": Case(
        _dual("blip", dict(TEXT, vocab_size=VOCAB, max_position_embeddings=24, encoder_hidden_size=48), VISION,
              projection_dim=24),
        attn="eager",
    ),
    "flava": Case(
        lambda: AutoConfig.for_model(
            "flava",
            text_config=dict(TEXT, vocab_size=VOCAB, max_position_embeddings=24),
            image_config=VISION,
            multimodal_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64),
            image_codebook_config=dict(hidden_size=8, num_blocks_per_group=1, vocab_size=16),
            projection_dim=24,
            hidden_size=32,
        ),
        attn="eager",
    ),
    # TIPSv2 requires equal tower widths.
    "tipsv2": Case(_dual("tipsv2", dict(TEXT, vocab_size=VOCAB, max_position_embeddings=24),
                         dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, image_size=IMAGE,
                              patch_size=8))),
}

TEXT_TOWERS: dict[str, tuple[dict, bool, int]] = {  # model_type -> (config, causal, pad)
    "bert": (dict(TEXT, vocab_size=VOCAB, max_position_embeddings=24), False, 0),
    "roberta": (ROBERTA_TEXT, False, 1),
    "xlm-roberta": (ROBERTA_TEXT, False, 1),
    "xlm-roberta-xl": (ROBERTA_TEXT, False, 1),
    "camembert": (ROBERTA_TEXT, False, 1),
    "ernie": (dict(TEXT, vocab_size=VOCAB, max_position_embeddings=24), False, 0),
    "data2vec-text": (ROBERTA_TEXT, False, 1),
    "megatron-bert": (dict(TEXT, vocab_size=VOCAB, max_position_embeddings=24), False, 0),
    "mpnet": (ROBERTA_TEXT, False, 1),
    "jina_embeddings_v3": (ROBERTA_TEXT, False, 1),
    "clip_text_model": (CLIP_TEXT, True, 0),
}
VISION_TOWERS = ("vit", "deit", "pixio", "dinov2", "dinov2_with_registers", "dinov3_vit", "clip_vision_model",
                 "siglip_vision_model", "aimv2_vision_model", "mlcd_vision_model")


def _tower_config(model_type: str, values: dict) -> object:
    known = AutoConfig.for_model(model_type)
    return AutoConfig.for_model(model_type, **{k: v for k, v in values.items() if hasattr(known, k)})


EAGER_ONLY = {"megatron-bert", "mpnet"}  # no SDPA in transformers 5.24


def _pair_case(text: str, vision: str) -> Case:
    text_values, causal, pad = TEXT_TOWERS[text]
    return Case(
        lambda: VisionTextDualEncoderConfig.from_vision_text_configs(
            _tower_config(vision, VISION), _tower_config(text, text_values), projection_dim=24
        ),
        causal=causal,
        pad=pad,
        attn="eager" if text in EAGER_ONLY else "sdpa",
    )


# Every stand-alone tower once: text towers with a ViT, vision towers with a BERT.
CASES: dict[str, Case] = {
    **FAMILIES,
    **{f"{t}+vit": _pair_case(t, "vit") for t in TEXT_TOWERS},
    **{f"bert+{v}": _pair_case("bert", v) for v in VISION_TOWERS if v != "vit"},
}


def build(name: str, seed: int = 0):
    """The tiny backbone of a case (same seed, same weights)."""
    case = CASES[name]
    torch.manual_seed(seed)
    return AutoModel.from_config(case.config(), attn_implementation=case.attn).eval()


def make_inputs(name: str, batch: int = 3, length: int = 6, seed: int = 1) -> dict[str, torch.Tensor]:
    """Unpadded token ids ending in EOS (no id is a padding id), and images as the family's processor gives them."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, EOS - 2, (batch, length), generator=g)
    ids[:, -1] = EOS
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if name == "siglip2":  # NaFlex: flattened patches, their mask and the patch grid
        inputs["pixel_values"] = torch.randn(batch, 16, 3 * 8 * 8, generator=g)
        inputs["pixel_attention_mask"] = torch.ones(batch, 16, dtype=torch.long)
        inputs["spatial_shapes"] = torch.tensor([[4, 4]] * batch)
    else:
        inputs["pixel_values"] = torch.randn(batch, 3, IMAGE, IMAGE, generator=g)
    return inputs


def make_model(name: str, seed: int = 0, base: MITPForImageTextClassification | None = None):
    """An MITP adapter on the case's backbone, with a randomised hub (an untrained one is nearly a no-op)."""
    base = base or MITPForImageTextClassification.from_backbone(build(name), num_labels=5)
    torch.manual_seed(seed + 100)
    model = get_peft_model(base, MITPConfig(**ADAPTER))
    with torch.no_grad():
        for p in model.base_model.mitp_hub["default"].parameters():
            p.normal_(std=0.2)
    return model.eval()


def _stock_features(backbone, inputs, family):
    text_names, vision_names = set(family.text_inputs), set(family.vision_inputs)
    text = getattr(backbone, family.text_features)(**{k: v for k, v in inputs.items() if k in text_names})
    image = getattr(backbone, family.image_features)(**{k: v for k, v in inputs.items() if k in vision_names})
    return pooled(text, family.features_token), pooled(image, family.features_token)


def _last_text_layer_output(model, inputs):
    """The text tower's last encoder layer output (prompts already stripped), via a hook."""
    task = model.base_model.model
    captured = {}
    layer = task.mitp_towers()["text"].layers[-1]
    handle = layer.register_forward_hook(lambda m, a, out: captured.__setitem__("h", out[0] if isinstance(out, tuple)
                                                                                 else out))
    try:
        with torch.no_grad():
            logits = model(**inputs).logits
    finally:
        handle.remove()
    return captured["h"], logits


# ---------------------------------------------------------------------------------------------------- the table


def test_every_family_and_tower_in_the_table_has_a_tiny_case_here():
    from peft_mitp.families import supported_decoder_model_types  # tests/test_decoder_vlms.py has their cases

    assert set(supported_model_types()) - set(supported_decoder_model_types()) == set(FAMILIES) | {
        "vision-text-dual-encoder"}
    assert set(TOWER_LAYER_PATHS) - {"mitp_convstem_vit"} == set(TEXT_TOWERS) | set(VISION_TOWERS)
    assert not set(REFUSED) & (set(TOWER_LAYER_PATHS) | set(supported_model_types()))


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_routed_inputs_are_parameters_of_the_feature_functions(name):
    family = family_for(name)
    cls = type(build(name))
    for method, names in ((family.text_features, family.text_inputs), (family.image_features, family.vision_inputs)):
        parameters = inspect.signature(getattr(cls, method)).parameters
        assert set(names) <= set(parameters), (method, set(names) - set(parameters))


# ---------------------------------------------------------------------------------------------- per backbone


@pytest.mark.parametrize("name", sorted(CASES))
def test_disabled_adapter_gives_the_stock_pooled_features(name):
    model = make_model(name)
    task = model.base_model.model
    inputs = make_inputs(name)
    with torch.no_grad(), model.disable_adapter():
        text, image, _ = task.pooled_features(**inputs)
    stock_text, stock_image = _stock_features(build(name), inputs, task.family)
    torch.testing.assert_close(text, stock_text, atol=1e-5, rtol=0)
    torch.testing.assert_close(image, stock_image, atol=1e-5, rtol=0)
    # The head is sized from the family's feature widths, and the hub from the towers' widths.
    assert (text.shape[-1], image.shape[-1]) == task.family.feature_dims(task.backbone.config)
    towers = task.mitp_towers()
    hub = model.base_model.mitp_hub["default"]
    assert (hub.text_width, hub.vision_width) == (towers["text"].width, towers["vision"].width)
    with torch.no_grad():
        adapted = model(**inputs).logits
        with model.disable_adapter():
            assert not torch.allclose(adapted, model(**inputs).logits, atol=1e-6)  # the adapter does act


@pytest.mark.parametrize("name", sorted(CASES))
def test_padding_does_not_change_real_tokens_or_logits(name):
    model = make_model(name)
    inputs = make_inputs(name)
    padded = dict(inputs)
    padded["input_ids"] = torch.cat([inputs["input_ids"], torch.full((3, 3), CASES[name].pad)], dim=1)
    padded["attention_mask"] = torch.cat([inputs["attention_mask"], torch.zeros(3, 3, dtype=torch.long)], dim=1)
    hidden, logits = _last_text_layer_output(model, inputs)
    hidden_padded, logits_padded = _last_text_layer_output(model, padded)
    torch.testing.assert_close(hidden_padded[:, :6], hidden, atol=1e-5, rtol=1e-5)
    if family_for(model.base_model.model.backbone.config.model_type).text_padding == "longest":
        torch.testing.assert_close(logits_padded, logits, atol=1e-5, rtol=1e-5)
    # else (SigLIP): the stock tower pools the last position, so only fixed-length padding is meaningful.


@pytest.mark.parametrize("name", sorted(CASES))
def test_prompted_text_layer_keeps_the_text_towers_causality(name):
    """Changing token 3 leaves tokens 0..2 of the first prompted text layer alone iff the tower is causal."""
    model = make_model(name)
    task = model.base_model.model
    first = model.peft_config["default"].text_layers[0]
    layer = task.mitp_towers()["text"].layers[first]
    assert isinstance(layer, MITPLayer)
    captured = []
    handle = layer.register_forward_hook(lambda m, a, out: captured.append(out[0] if isinstance(out, tuple) else out))
    inputs = make_inputs(name, batch=1)
    changed = {**inputs, "input_ids": inputs["input_ids"].clone()}
    changed["input_ids"][0, 3] = inputs["input_ids"][0, 3] % (EOS - 5) + 3
    with torch.no_grad():
        model(**inputs)
        model(**changed)
    handle.remove()
    before, after = captured
    assert torch.allclose(before[:, :3], after[:, :3], atol=1e-6) == CASES[name].causal
    assert not torch.allclose(before[:, 3:], after[:, 3:])


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_training_step_changes_only_adapter_tensors(name):
    model = make_model(name)
    model.train()
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(**make_inputs(name), labels=torch.tensor([0, 1, 2])).loss.backward()
    optimizer.step()
    after = model.state_dict()
    changed = {k for k, v in after.items() if not torch.equal(v, before[k])}
    # Besides the trained tensors, only the hub's standardisers change: they take the first training batch's
    # statistics (buffers of the adapter, docs/method.md).
    standardisers = {k for k in changed - trainable if ".readout." in k and k.endswith((".shift", ".scale"))}
    assert changed - standardisers <= trainable, sorted(changed - trainable)
    assert standardisers or not any(".readout." in k for k in after)
    assert all(("mitp_" in k) or (".classifier." in k) for k in changed), sorted(changed)
    prompts = {k for k in trainable if "mitp_prompt" in k}
    assert len(prompts) == 2 * ADAPTER["num_interaction_layers"] and prompts <= changed
    assert any("mitp_hub" in k for k in changed) and any("classifier" in k for k in changed)


@pytest.mark.slow
def test_save_then_load_in_one_fresh_process_gives_identical_logits_for_every_backbone(tmp_path):
    names = sorted(FAMILIES) + ["bert+vit", "mpnet+vit", "jina_embeddings_v3+vit", "bert+dinov3_vit",
                                "bert+mlcd_vision_model"]
    expected = {}
    for name in names:
        base = MITPForImageTextClassification.from_backbone(build(name), num_labels=5)
        base.save_pretrained(tmp_path / name / "base")  # before peft wraps its layers
        model = make_model(name, base=base)
        model.train()
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        model(**make_inputs(name), labels=torch.tensor([0, 1, 2])).loss.backward()
        optimizer.step()
        model.eval()
        model.save_pretrained(tmp_path / name / "adapter")
        inputs = make_inputs(name, seed=9)
        save_file(inputs, str(tmp_path / name / "inputs.safetensors"))
        with torch.no_grad():
            expected[name] = model(**inputs).logits
    # A saved task model reloads with the default attention (SDPA where supported): name the tested one.
    attention = {name: CASES[name].attn for name in names}
    run_python(
        f"""
import torch, peft_mitp
from peft import PeftModel
from safetensors.torch import load_file, save_file
torch.set_num_threads(1)
logits = {{}}
for name, attention in {attention!r}.items():
    base = peft_mitp.MITPForImageTextClassification.from_pretrained(f"{{name}}/base", attn_implementation=attention)
    model = PeftModel.from_pretrained(base, f"{{name}}/adapter").eval()
    with torch.no_grad():
        logits[name] = model(**load_file(f"{{name}}/inputs.safetensors")).logits
save_file(logits, "logits.safetensors")
""",
        cwd=tmp_path,
    )
    reloaded = load_file(tmp_path / "logits.safetensors")
    for name in names:
        assert torch.equal(reloaded[name], expected[name]), name


# ------------------------------------------------------------------------------------ per-token layer arguments


@pytest.mark.parametrize("name", ["bert+dinov3_vit", "bert+mlcd_vision_model", "jina_embeddings_v3+vit"])
def test_rotary_embeddings_grow_by_identity_rows_for_the_prompts(name):
    model = make_model(name)
    task = model.base_model.model
    kind = "text" if name.startswith("jina") else "vision"
    assert TOWER_TOKEN_ARGUMENTS[task.mitp_towers()[kind].module.config.model_type][0].kind == "rotary"
    layer = task.mitp_towers()[kind].layers[model.peft_config["default"].text_layers[0] if kind == "text"
                                              else model.peft_config["default"].vision_layers[0]]
    calls = []

    def record(module, args, kwargs):  # MLCD passes the embeddings by position, DINOv3 and Jina by keyword
        bound = inspect.signature(module.forward).bind(*args, **kwargs).arguments
        calls.append((args[0].shape[1], bound["position_embeddings"]))

    hook = layer.base_layer.register_forward_pre_hook(record, with_kwargs=True)
    with torch.no_grad():
        model(**make_inputs(name))
        with model.disable_adapter():
            model(**make_inputs(name))
    hook.remove()
    (prompted_len, (cos, sin)), (plain_len, (cos0, sin0)) = calls
    m = ADAPTER["prompt_length"]
    assert prompted_len == plain_len + m
    assert cos.shape[-2] == cos0.shape[-2] + m
    torch.testing.assert_close(cos[..., : cos0.shape[-2], :], cos0)
    torch.testing.assert_close(sin[..., : sin0.shape[-2], :], sin0)
    assert torch.all(cos[..., -m:, :] == 1) and torch.all(sin[..., -m:, :] == 0)


def test_extend_token_argument_kinds():
    def no_mask(mask):
        raise AssertionError("only the 'mask' kind extends masks")

    cos, sin = torch.rand(5, 4), torch.rand(5, 4)
    new_cos, new_sin = extend_token_argument("rotary", (cos, sin), seq_len=6, num_prompts=2, extend_mask=no_mask)
    assert new_cos.shape == (7, 4) and torch.equal(new_cos[:5], cos) and torch.equal(new_sin[5:], torch.zeros(2, 4))
    bias = torch.rand(2, 3, 6, 6)
    new_bias = extend_token_argument("pairwise", bias, seq_len=6, num_prompts=2, extend_mask=no_mask)
    assert new_bias.shape == (2, 3, 8, 8) and torch.equal(new_bias[..., :6, :6], bias)
    assert not new_bias[..., 6:, :].any() and not new_bias[..., :, 6:].any()
    assert extend_token_argument("mask", "m", seq_len=6, num_prompts=2, extend_mask=lambda m: m + "+") == "m+"
    with pytest.raises(ValueError, match=r"does not end in \(6, 6\)"):
        extend_token_argument("pairwise", torch.rand(2, 5, 5), seq_len=6, num_prompts=2, extend_mask=no_mask)
    with pytest.raises(ValueError, match="Unknown per-token argument kind"):
        extend_token_argument("bogus", bias, seq_len=6, num_prompts=2, extend_mask=no_mask)


# ------------------------------------------------------------------------------------------------- refusals


def test_align_is_refused_naming_the_reason_the_supported_families_and_how_to_add_one():
    config = AutoConfig.for_model(
        "align",
        text_config=dict(TEXT, vocab_size=VOCAB, max_position_embeddings=24),
        vision_config=dict(image_size=IMAGE, hidden_dim=32, num_channels=3),
        projection_dim=16,
    )
    with torch.device("meta"):
        align = AutoModel.from_config(config)
    with pytest.raises(UnsupportedBackboneError) as error:
        MITPForImageTextClassification.from_backbone(align, num_labels=3)
    message = str(error.value)
    assert "'align'" in message and "EfficientNet" in message
    assert "clip" in message and "siglip2" in message and "vision-text-dual-encoder" in message
    assert "register_family" in message and "docs/backbones.md" in message


def test_a_single_encoder_is_refused_pointing_to_from_text_vision_pretrained():
    bert = BertModel(BertConfig(**TEXT, vocab_size=VOCAB))
    with pytest.raises(UnsupportedBackboneError, match=r"single encoder.*from_text_vision_pretrained"):
        MITPForImageTextClassification.from_backbone(bert, num_labels=3)
    with pytest.raises(UnsupportedBackboneError, match="video"):
        family_for("xclip")


def test_a_dual_encoder_with_an_unusable_tower_is_refused_when_wrapped():
    from transformers import VisionTextDualEncoderModel

    electra = ElectraModel(ElectraConfig(**TEXT, vocab_size=VOCAB, embedding_size=32))
    backbone = VisionTextDualEncoderModel(vision_model=ViTModel(ViTConfig(**VISION)), text_model=electra)
    with pytest.raises(UnsupportedBackboneError, match=r"text tower of model_type 'electra'.*pooler_output"):
        MITPForImageTextClassification.from_backbone(backbone, num_labels=3)


# --------------------------------------------------------------------------------- from_text_vision_pretrained

WORDS = ["a", "photo", "of", "the", "cat", "dog", "red", "blue", "green", "circle", "square", "what", "shape",
         "color", "is"]


@pytest.fixture(scope="module")
def towers(tmp_path_factory) -> dict[str, Path]:
    """A tiny BERT (with its WordPiece tokenizer), a tiny ViT (with its image processor) and a tiny CLIP, saved."""
    root = tmp_path_factory.mktemp("towers")
    (root / "bert").mkdir()
    (root / "bert" / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    tokenizer = BertTokenizer.from_pretrained(root / "bert")
    torch.manual_seed(0)
    BertModel(BertConfig(**TEXT, vocab_size=len(tokenizer), max_position_embeddings=24)).save_pretrained(root / "bert")
    tokenizer.save_pretrained(root / "bert")
    ViTModel(ViTConfig(**VISION)).save_pretrained(root / "vit")
    ViTImageProcessor(size={"height": IMAGE, "width": IMAGE}).save_pretrained(root / "vit")
    clip = CLIPModel(CLIPConfig(text_config=CLIP_TEXT, vision_config=VISION, projection_dim=24))
    clip.save_pretrained(root / "clip")
    ElectraModel(ElectraConfig(**TEXT, vocab_size=VOCAB, embedding_size=32)).save_pretrained(root / "electra")
    return {name: root / name for name in ("bert", "vit", "clip", "electra")}


def _images(count: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (40, 40, 3), dtype=np.uint8) for _ in range(count)]


def test_from_text_vision_pretrained_joins_the_towers_through_identity_projections(towers):
    model = MITPForImageTextClassification.from_text_vision_pretrained(towers["bert"], towers["vit"], num_labels=4)
    backbone = model.backbone
    assert backbone.config.model_type == "vision-text-dual-encoder"
    assert backbone.config.projection_dim == 48  # the wider tower's width
    assert not any(p.requires_grad for p in backbone.parameters())  # projections frozen with the towers
    inputs = load_processor(model)(_images(2), ["a photo of the cat", "red circle"])
    text, image, _ = model.pooled_features(**inputs)
    bert, vit = BertModel.from_pretrained(towers["bert"]).eval(), ViTModel.from_pretrained(towers["vit"]).eval()
    with torch.no_grad():
        bert_pooled = bert(**{k: inputs[k] for k in ("input_ids", "attention_mask", "token_type_ids")}).pooler_output
        vit_pooled = vit(pixel_values=inputs["pixel_values"]).pooler_output
    # The features are the towers' own pooled outputs; the narrower text features are zero-padded.
    torch.testing.assert_close(text[:, :32], bert_pooled, atol=1e-6, rtol=0)
    assert not text[:, 32:].any()
    torch.testing.assert_close(image, vit_pooled, atol=1e-6, rtol=0)
    assert model.classifier.in_features == 96


def test_from_text_vision_pretrained_with_a_narrower_projection_is_seeded_and_semi_orthogonal(towers, tmp_path):
    model = MITPForImageTextClassification.from_text_vision_pretrained(
        towers["bert"], towers["vit"], num_labels=4, projection_dim=16
    )
    again = MITPForImageTextClassification.from_text_vision_pretrained(
        towers["bert"], towers["vit"], num_labels=4, projection_dim=16
    )
    for projection in ("text_projection", "visual_projection"):
        weight = getattr(model.backbone, projection).weight
        torch.testing.assert_close(weight @ weight.T, torch.eye(16), atol=1e-5, rtol=0)
        assert torch.equal(weight, getattr(again.backbone, projection).weight)  # the same call, the same backbone
    inputs = make_inputs("bert+vit", batch=2)
    inputs["input_ids"] = inputs["input_ids"] % len(WORDS) + 5
    model.save_pretrained(tmp_path)
    reloaded = MITPForImageTextClassification.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).logits, model(**inputs).logits)
    peft_model = get_peft_model(model, MITPConfig(**ADAPTER))
    peft_model(**inputs, labels=torch.tensor([0, 3])).loss.backward()
    assert all(p.grad is not None for n, p in peft_model.named_parameters() if "mitp_prompt" in n)


def test_from_text_vision_pretrained_takes_a_tower_out_of_a_dual_encoder_checkpoint(towers):
    model = MITPForImageTextClassification.from_text_vision_pretrained(towers["bert"], towers["clip"], num_labels=2)
    clip = CLIPModel.from_pretrained(towers["clip"])
    assert type(model.backbone.vision_model).__name__ == "CLIPVisionModel"
    stock = clip.vision_model.state_dict()
    tower = model.backbone.vision_model.state_dict()
    assert set(tower) == set(stock)
    assert all(torch.equal(value, stock[key]) for key, value in tower.items())


def test_from_text_vision_pretrained_refuses_an_unusable_tower_before_loading_it(towers):
    with pytest.raises(UnsupportedBackboneError, match=r"'electra'.*pooler_output.*TOWER_LAYER_PATHS"):
        MITPForImageTextClassification.from_text_vision_pretrained(towers["electra"], towers["vit"], num_labels=2)
    with pytest.raises(ValueError, match="`projection_dim` must be a positive integer"):
        MITPForImageTextClassification.from_text_vision_pretrained(
            towers["bert"], towers["vit"], num_labels=2, projection_dim=0
        )


# --------------------------------------------------------------------------------------------- preprocessing


def test_processor_for_a_text_vision_pair_feeds_the_model(towers):
    model = MITPForImageTextClassification.from_text_vision_pretrained(towers["bert"], towers["vit"], num_labels=3)
    processor = load_processor(text_name_or_path=towers["bert"], vision_name_or_path=towers["vit"])
    assert isinstance(processor.processor, VisionTextDualEncoderProcessor)
    batch = processor(_images(3), ["a red circle", "what shape is the blue square", "cat"])
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "pixel_values"}
    assert batch["pixel_values"].shape == (3, 3, IMAGE, IMAGE)
    assert batch["input_ids"].shape == (3, 8) and batch["attention_mask"][2].tolist() == [1, 1, 1, 0, 0, 0, 0, 0]
    assert model(**batch, labels=torch.tensor([0, 1, 2])).loss.isfinite()
    # The model remembers its towers' checkpoints: the same processor from the model alone.
    same = load_processor(model)(_images(3), ["a red circle", "what shape is the blue square", "cat"])
    assert all(torch.equal(same[k], batch[k]) for k in batch)


def test_processor_for_a_dual_encoder_checkpoint_uses_its_auto_processor(towers, tmp_path):
    config = AutoConfig.for_model(
        "chinese_clip", text_config=dict(TEXT, vocab_size=len(WORDS) + 5, max_position_embeddings=24),
        vision_config=VISION, projection_dim=24,
    )
    AutoModel.from_config(config).save_pretrained(tmp_path)
    ChineseCLIPProcessor(
        image_processor=ChineseCLIPImageProcessor(size={"shortest_edge": IMAGE}, crop_size={"height": IMAGE,
                                                                                              "width": IMAGE}),
        tokenizer=BertTokenizer.from_pretrained(towers["bert"]),
    ).save_pretrained(tmp_path)
    processor = load_processor(tmp_path)
    assert isinstance(processor.processor, ChineseCLIPProcessor) and processor.family.name == "chinese-clip"
    batch = processor(_images(2), ["a cat", "a red square"])
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "pixel_values"}
    model = MITPForImageTextClassification.from_pretrained(tmp_path, num_labels=2)
    assert model(**batch).logits.shape == (2, 2)
    assert load_processor(model).processor.__class__ is ChineseCLIPProcessor


def test_processor_pads_to_the_maximum_length_for_last_token_pooling_families(towers):
    pair = VisionTextDualEncoderProcessor(
        image_processor=ViTImageProcessor(size={"height": IMAGE, "width": IMAGE}),
        tokenizer=BertTokenizer.from_pretrained(towers["bert"]),
    )
    siglip = ImageTextProcessor(pair, families()["siglip"], max_length=12)
    batch = siglip(_images(2), ["a cat", "a red square"])
    assert batch["input_ids"].shape == (2, 12)
    assert "token_type_ids" not in batch  # SigLIP's text tower does not take them
    longest = ImageTextProcessor(pair, families()["vision-text-dual-encoder"], max_length=12)
    assert longest(_images(2), ["a cat", "a red square"])["input_ids"].shape == (2, 5)
    with pytest.raises(ValueError, match="pass `max_length=`"):
        ImageTextProcessor(pair, families()["siglip"])


@pytest.mark.slow
def test_the_parameter_table_in_the_docs_is_the_scripts_output(monkeypatch):
    import importlib.util
    import sys

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("param_table", root / "benchmarks" / "param_table.py")
    param_table = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "param_table", param_table)  # its dataclasses look their module up
    spec.loader.exec_module(param_table)
    rows = [param_table.count(c) for c in param_table.CHECKPOINTS]
    clip_large = rows[0]
    # The paper's 2.0M plus the hub's read-out to the head (docs/method.md, "Parameter budget").
    assert clip_large["checkpoint"].startswith("openai/clip-vit-large-patch14") and 2.8e6 <= clip_large["total"] <= 2.9e6
    decoder_rows = [param_table.count(c) for c in param_table.DECODER_CHECKPOINTS]
    # every family has its real-size row
    assert {r["family"] for r in rows} | {r["family"] for r in decoder_rows} == set(supported_model_types())
    docs = (root / "docs" / "backbones.md").read_text()
    assert param_table.markdown(rows) in docs
    assert param_table.decoder_markdown(decoder_rows) in docs


def test_processor_arguments_are_checked():
    with pytest.raises(ValueError, match="Give `name_or_path`, or both"):
        load_processor(text_name_or_path="somewhere")
    with pytest.raises(ValueError, match="not both"):
        load_processor("a", text_name_or_path="b", vision_name_or_path="c")
