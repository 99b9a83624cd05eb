"""Bad input fails early with an error that says what is wrong and how to fix it; nothing unsafe is ever loaded.

Covered elsewhere, not repeated here: bad `MITPConfig` values (prompt length <= 0, duplicated / unordered / negative
layer indices, layer lists of different lengths, unknown similarity or activation) in `test_config.py`; layer
indices beyond a tower's depth in `test_config.py`; missing `pixel_values` / `input_ids` and unknown inputs in
`test_lockstep.py` (and `test_missing_modality.py` for adapters that accept a missing modality); labels of the wrong
shape for the problem type in `test_save_load.py`. docs/reliability.md has the whole table.
"""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import clip_inputs, make_model, run_python, tiny_clip, tiny_clip_config
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import (
    BertConfig,
    BertModel,
    CLIPModel,
    VisionTextDualEncoderConfig,
    VisionTextDualEncoderModel,
    ViTConfig,
)

import peft_mitp
from peft_mitp import MITPConfig, MITPForImageTextClassification

PACKAGE = Path(peft_mitp.__file__).parent
# Modules whose loaders unpickle (and so can run code stored in a file).
PICKLERS = ("pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib")


def _task(backbone: torch.nn.Module | None = None, num_labels: int = 5) -> MITPForImageTextClassification:
    return MITPForImageTextClassification.from_backbone(backbone if backbone is not None else tiny_clip(), num_labels)


def _tiny_bert_vit(text_layers: int = 2, vision_layers: int = 3) -> VisionTextDualEncoderModel:
    """A BERT + ViT `VisionTextDualEncoderModel`: text 32 wide (16 positions), vision 48 wide on 32x32 images."""
    torch.manual_seed(0)
    config = VisionTextDualEncoderConfig.from_vision_text_configs(
        ViTConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=vision_layers, num_attention_heads=4,
                  image_size=32, patch_size=8),
        BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=text_layers, num_attention_heads=4,
                   vocab_size=99, max_position_embeddings=16),
        projection_dim=24,
    )
    return VisionTextDualEncoderModel(config).eval()


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved MITP adapter of the tiny CLIP (text 32 wide x 4 layers, vision 48 wide x 6 layers)."""
    path = tmp_path_factory.mktemp("adapter")
    make_model().save_pretrained(path)
    return path


def _copy(adapter_dir: Path, tmp_path: Path) -> Path:
    target = tmp_path / "adapter"
    shutil.copytree(adapter_dir, target)
    return target


# ---------------------------------------------------------------------------------------------- bad forward inputs
def test_unsupported_backbone_is_refused_naming_the_supported_model_types():
    bert = BertModel(BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4))
    with pytest.raises(peft_mitp.UnsupportedBackboneError) as info:
        MITPForImageTextClassification.from_backbone(bert, num_labels=3)
    message = str(info.value)
    # It names the refused model type and the supported ones (docs/backbones.md has how to add a family).
    assert "'bert'" in message and "clip" in message and "vision-text-dual-encoder" in message


def test_wrong_channel_count_names_the_vision_configs_num_channels():
    model = make_model()
    gray = clip_inputs()
    gray["pixel_values"] = gray["pixel_values"][:, :1]
    with pytest.raises(ValueError, match=r"`pixel_values` has 1 channels .* takes 3 \(its config's `num_channels`\)"):
        model(**gray)


def test_wrong_image_size_names_image_size_unless_position_encodings_are_interpolated():
    model = make_model().eval()
    big = clip_inputs()
    big["pixel_values"] = torch.randn(4, 3, 48, 48)
    with pytest.raises(ValueError, match=r"48x48 images, but the clip vision tower takes 32x32 .*`image_size`.*"
                                         r"interpolate_pos_encoding=True"):
        model(**big)
    with torch.no_grad():
        logits = model(**big, interpolate_pos_encoding=True).logits
    assert logits.shape == (4, 5) and torch.isfinite(logits).all()


def test_pixel_values_without_a_channel_axis_are_refused():
    model = make_model()
    flat = clip_inputs()
    flat["pixel_values"] = flat["pixel_values"][:, 0]
    with pytest.raises(ValueError, match=r"\(batch, channels, height, width\) tensor, got shape \(4, 32, 32\)"):
        model(**flat)


def test_image_checks_read_any_familys_vision_config():
    """A BERT + ViT dual encoder is checked from ViTConfig's own `image_size` / `num_channels` fields."""
    model = get_peft_model(_task(_tiny_bert_vit()), MITPConfig(prompt_length=2, num_interaction_layers=2, hub_dim=8))
    ids = torch.randint(1, 98, (2, 6))
    with pytest.raises(ValueError, match=r"16x16 images, but the vision-text-dual-encoder vision tower takes 32x32"):
        model(input_ids=ids, pixel_values=torch.randn(2, 3, 16, 16))
    with pytest.raises(ValueError, match=r"4 channels .* takes 3"):
        model(input_ids=ids, pixel_values=torch.randn(2, 4, 32, 32))


def test_text_longer_than_the_position_embeddings_is_refused_with_the_truncation_fix():
    """BERT would fail with a bare `IndexError` deep in its embeddings; CLIP with its own message."""
    bert_vit = get_peft_model(_task(_tiny_bert_vit()), MITPConfig(prompt_length=2, num_interaction_layers=2, hub_dim=8))
    with pytest.raises(ValueError, match=r"17 tokens per text, but the vision-text-dual-encoder text tower takes at "
                                         r"most 16 .*truncation=True, max_length=16"):
        bert_vit(input_ids=torch.randint(1, 98, (2, 17)), pixel_values=torch.randn(2, 3, 32, 32))
    clip = make_model()
    with pytest.raises(ValueError, match=r"25 tokens per text.*at most 24"):
        clip(**clip_inputs(length=25))


def test_one_dimensional_input_ids_are_refused():
    model = make_model()
    inputs = clip_inputs()
    with pytest.raises(ValueError, match=r"`input_ids` must be a \(batch, length\) tensor"):
        model(input_ids=inputs["input_ids"][0], pixel_values=inputs["pixel_values"][:1])


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("attention_mask", lambda ids: torch.ones_like(ids)[:3]),  # fewer texts: CLIP ran it silently
        ("attention_mask", lambda ids: torch.ones_like(ids)[:, :6]),  # shorter than the texts: ran silently too
        ("attention_mask", lambda ids: torch.ones_like(ids)[0]),
        ("position_ids", lambda ids: torch.arange(5).expand(ids.shape[0], 5)),
    ],
    ids=["mask-batch", "mask-length", "mask-1d", "position-ids-length"],
)
def test_per_token_text_inputs_that_disagree_with_input_ids_are_refused_before_the_towers_run(name, value):
    model = make_model()
    inputs = clip_inputs()
    calls = []
    model.base_model.model.backbone.text_model.embeddings.register_forward_hook(lambda *a: calls.append(1))
    with pytest.raises(ValueError, match=rf"`{name}` has shape .* but `input_ids` has \(4, 7\)"):
        model(**{**inputs, name: value(inputs["input_ids"])})
    assert calls == []
    with torch.no_grad():  # position ids given once for the whole batch broadcast, as in transformers
        model(**inputs, position_ids=torch.arange(7)[None])


def test_labels_for_another_number_of_samples_are_refused_before_the_towers_run():
    model = make_model()
    calls = []
    model.base_model.model.backbone.text_model.embeddings.register_forward_hook(lambda *a: calls.append(1))
    with pytest.raises(ValueError, match=r"`labels` has 3 rows \(shape \(3,\)\) but the batch has 4 samples"):
        model(**clip_inputs(), labels=torch.tensor([0, 1, 2]))
    assert calls == []


def test_vision_inputs_with_another_number_of_rows_than_pixel_values_are_refused():
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.for_model(
        "siglip2",
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         vocab_size=99, max_position_embeddings=24),
        vision_config=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                           num_patches=16, patch_size=8),
    )
    torch.manual_seed(0)
    model = get_peft_model(_task(AutoModel.from_config(config).eval()), MITPConfig(prompt_length=2,
                                                                                    num_interaction_layers=1))
    ids = torch.randint(1, 98, (2, 5))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": torch.randn(2, 16, 192),
              "pixel_attention_mask": torch.ones(2, 16, dtype=torch.long), "spatial_shapes": torch.tensor([[4, 4]] * 2)}
    with torch.no_grad():
        model(**inputs)
    with pytest.raises(ValueError, match=r"`spatial_shapes` has 1 rows .* but `pixel_values` has 2 images"):
        model(**{**inputs, "spatial_shapes": inputs["spatial_shapes"][:1]})


# ------------------------------------------------------------------------- adapters built for another backbone
def test_the_adapter_records_the_backbone_it_was_built_for(adapter_dir):
    saved = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert saved["backbone"] == {
        "model_type": "clip",
        "text_model_type": "clip_text_model",
        "vision_model_type": "clip_vision_model",
        "text_width": 32,
        "vision_width": 48,
        "text_depth": 4,
        "vision_depth": 6,
    }


def _wider_text_clip() -> CLIPModel:
    config = tiny_clip_config()
    config.text_config.hidden_size = 64
    return CLIPModel(config).eval()


@pytest.mark.parametrize(
    ("backbone", "differs"),
    [
        (_wider_text_clip, "text_width=32.*text_width=64.*differ in text_width"),
        (lambda: tiny_clip(text_layers=6), "text_depth=4.*text_depth=6.*differ in text_depth"),
        (_tiny_bert_vit, "model_type='clip'.*model_type='vision-text-dual-encoder'.*differ in model_type"),
    ],
    ids=["wider", "deeper", "other-family"],
)
def test_loading_onto_another_backbone_names_both_backbones(adapter_dir, backbone, differs):
    with pytest.raises(ValueError, match=r"built for another backbone. It was built for: .*" + differs):
        PeftModel.from_pretrained(_task(backbone()), adapter_dir)


def test_adding_an_adapter_built_for_another_backbone_is_refused_too(adapter_dir):
    model = get_peft_model(_task(_wider_text_clip()), MITPConfig(prompt_length=4, num_interaction_layers=2, hub_dim=16))
    with pytest.raises(ValueError, match="built for another backbone"):
        model.load_adapter(adapter_dir, adapter_name="other")


# ------------------------------------------------------------------------------------- broken adapter directories
def test_missing_weights_file_names_the_directory_and_the_file(adapter_dir, tmp_path):
    broken = _copy(adapter_dir, tmp_path)
    (broken / "adapter_model.safetensors").unlink()
    # peft alone would fail with a Hub repo-id validation error about the local path.
    with pytest.raises(FileNotFoundError, match=rf"{broken} has no `adapter_model.safetensors` .*save_pretrained"):
        PeftModel.from_pretrained(_task(), broken)


@pytest.mark.parametrize("keep", [0.5, 0.01], ids=["half", "header-only"])
def test_truncated_weights_file_is_refused_naming_the_file(adapter_dir, tmp_path, keep):
    broken = _copy(adapter_dir, tmp_path)
    weights = broken / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: max(4, int(len(data) * keep))])
    with pytest.raises(ValueError, match=rf"{weights} is not a complete safetensors file .*truncated"):
        PeftModel.from_pretrained(_task(), broken)


def test_an_adapter_whose_hub_has_no_gates_is_refused(adapter_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    old = _copy(adapter_dir, tmp_path)
    weights = old / "adapter_model.safetensors"
    tensors = load_file(weights)
    assert {"base_model.mitp_hub.text_gate", "base_model.mitp_hub.vision_gate"} <= set(tensors)
    # A hub saved before the generated term was gated: peft alone would load it with a warning, gates left at zero.
    save_file({k: v for k, v in tensors.items() if not k.endswith("_gate")}, weights, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"{weights} holds a memory hub without \['text_gate', 'vision_gate'\].*again"):
        PeftModel.from_pretrained(_task(), old)


def test_a_config_of_another_peft_method_is_refused_by_mitp_and_by_peft(tmp_path, adapter_dir):
    lora = get_peft_model(_task(), LoraConfig(target_modules=["q_proj", "v_proj"], r=2))
    lora.save_pretrained(tmp_path / "lora")
    with pytest.raises(ValueError, match=r"describes a LORA adapter, not an MITP one"):
        MITPConfig.from_pretrained(tmp_path / "lora")
    mitp = PeftModel.from_pretrained(_task(), adapter_dir)
    with pytest.raises(ValueError, match=r"Cannot combine adapters with different peft types"):
        mitp.load_adapter(tmp_path / "lora", adapter_name="other")
    # A LoRA trained on some other model: peft names the layers it cannot find.
    bert = BertModel(BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4))
    get_peft_model(bert, LoraConfig(target_modules=["query", "value"], r=2)).save_pretrained(tmp_path / "bert_lora")
    with pytest.raises(ValueError, match=r"Target modules .* not found in the base model"):
        PeftModel.from_pretrained(_task(), tmp_path / "bert_lora")


def test_unknown_config_fields_are_refused_instead_of_dropped(adapter_dir, tmp_path):
    edited = _copy(adapter_dir, tmp_path)
    config = json.loads((edited / "adapter_config.json").read_text())
    config["memory_decay"] = 0.5  # a field from some other version of the plugin
    (edited / "adapter_config.json").write_text(json.dumps(config))
    message = r"MITPConfig has no field\(s\) 'memory_decay'.*upgrade peft_mitp"
    with pytest.raises(TypeError, match=message):
        PeftModel.from_pretrained(_task(), edited)
    with pytest.raises(TypeError, match=message):  # the path AutoPeftModel takes
        PeftConfig.from_pretrained(edited)


def test_a_misspelt_field_suggests_the_right_name():
    with pytest.raises(TypeError, match=r"has no field\(s\) 'promt_length' \(did you mean 'prompt_length'\?\)"):
        MITPConfig(promt_length=4)


def test_the_config_alone_can_be_read_without_weights(adapter_dir, tmp_path):
    only_config = tmp_path / "config_only"
    only_config.mkdir()
    shutil.copy(adapter_dir / "adapter_config.json", only_config)
    with pytest.raises(FileNotFoundError, match="has no `adapter_model.safetensors`"):
        MITPConfig.from_pretrained(only_config)
    assert MITPConfig.from_pretrained(only_config, check_weights=False).prompt_length == 4


def test_loading_without_importing_the_plugin_fails_with_peft_key_error(adapter_dir, tmp_path):
    """peft has no plugin entry points: the adapter config cannot name the plugin to import.

    `AutoPeftModel` would import `auto_mapping["parent_library"]` ("peft_mitp.modeling") when the allowlist permits,
    but it parses the config first, and that already needs the "MITP" type registered. After `import peft_mitp` the
    same calls work.
    """
    base = tmp_path / "base"
    _task().save_pretrained(base)
    adapter = tmp_path / "adapter"
    get_peft_model(MITPForImageTextClassification.from_pretrained(base), MITPConfig(prompt_length=4, hub_dim=8,
                   num_interaction_layers=2)).save_pretrained(adapter)
    assert json.loads((adapter / "adapter_config.json").read_text())["auto_mapping"]["parent_library"] == (
        "peft_mitp.modeling"
    )
    out = run_python(
        f"""
import sys
from peft import AutoPeftModel, PeftConfig
for load in (lambda: PeftConfig.from_pretrained({str(adapter)!r}),
             lambda: AutoPeftModel.from_pretrained({str(adapter)!r}, import_allowlist=["peft_mitp"])):
    try:
        load()
    except Exception as exc:
        print("error:", type(exc).__name__, exc)
print("imported by peft:", "peft_mitp" in sys.modules)
import peft_mitp
model = AutoPeftModel.from_pretrained({str(adapter)!r}, import_allowlist=["peft_mitp"])
print("after import:", type(model.base_model.model).__name__)
""",
        cwd=tmp_path,
    )
    assert out.count("error: KeyError 'MITP'") == 2, out
    assert "imported by peft: False" in out
    assert "after import: MITPForImageTextClassification" in out


# ------------------------------------------------------------------------------------------ nothing unsafe loaded
def test_an_adapter_with_only_a_pickled_bin_is_refused(adapter_dir, tmp_path):
    pickled = _copy(adapter_dir, tmp_path)
    weights = load_file(pickled / "adapter_model.safetensors")
    torch.save(weights, pickled / "adapter_model.bin")
    (pickled / "adapter_model.safetensors").unlink()
    # peft alone would read it with torch.load; MITP refuses before peft gets there.
    with pytest.raises(ValueError, match=r"holds only a pickled `adapter_model.bin`. MITP loads adapter weights from "
                                         r"safetensors only"):
        PeftModel.from_pretrained(_task(), pickled)


def test_a_bin_next_to_the_safetensors_file_is_never_unpickled(adapter_dir, tmp_path, inputs):
    both = _copy(adapter_dir, tmp_path)
    (both / "adapter_model.bin").write_bytes(b"not a pickle: unpickling this would fail")
    reference = PeftModel.from_pretrained(_task(), adapter_dir).eval()
    loaded = PeftModel.from_pretrained(_task(), both).eval()
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, reference(**inputs).logits)


def test_hub_repos_are_checked_too(adapter_dir, tmp_path, monkeypatch):
    try:  # rootdir-relative import when `tests/` is a package, plain import when pytest puts `tests/` on sys.path
        from tests.hubserver import LocalHub, configure_client
    except ImportError:
        from hubserver import LocalHub, configure_client
    from huggingface_hub import HfApi

    pickled = _copy(adapter_dir, tmp_path)
    torch.save(load_file(pickled / "adapter_model.safetensors"), pickled / "adapter_model.bin")
    (pickled / "adapter_model.safetensors").unlink()
    with LocalHub(tmp_path / "hub", tokens={"hf_test_token": "testuser"}) as hub:
        configure_client(monkeypatch, hub.endpoint, tmp_path / "hf_home")
        api = HfApi(token="hf_test_token")
        for repo, folder in (("testuser/good", adapter_dir), ("testuser/pickled", pickled)):
            api.create_repo(repo)
            api.upload_folder(repo_id=repo, folder_path=folder)
        assert isinstance(PeftModel.from_pretrained(_task(), "testuser/good"), PeftModel)
        with pytest.raises(ValueError, match=r"The Hub repo testuser/pickled holds only a pickled"):
            PeftModel.from_pretrained(_task(), "testuser/pickled")


def _is_true(node: ast.Call, keyword: str) -> bool:
    return any(k.arg == keyword and isinstance(k.value, ast.Constant) and k.value.value is True for k in node.keywords)


def _unsafe_calls(tree: ast.AST) -> list[str]:
    """Code (not strings or comments) that could unpickle data or run remote code."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [alias.name for alias in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
            found += [f"import {n}" for n in names if n and n.split(".")[0] in PICKLERS]
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            owner = getattr(func.value, "id", "") if isinstance(func, ast.Attribute) else ""
            if owner == "torch" and name == "load" and not _is_true(node, "weights_only"):
                found.append(f"line {node.lineno}: torch.load without weights_only=True")
            if owner in PICKLERS:
                found.append(f"line {node.lineno}: {owner}.{name}")
            if _is_true(node, "trust_remote_code"):
                found.append(f"line {node.lineno}: trust_remote_code=True")
            if _is_true(node, "allow_pickle"):
                found.append(f"line {node.lineno}: allow_pickle=True")
        elif isinstance(node, ast.arguments):
            positional = node.posonlyargs + node.args
            defaults = list(zip(positional[len(positional) - len(node.defaults):], node.defaults, strict=True))
            defaults += [(a, d) for a, d in zip(node.kwonlyargs, node.kw_defaults, strict=True) if d is not None]
            for arg, default in defaults:
                if arg.arg == "trust_remote_code" and isinstance(default, ast.Constant) and default.value is True:
                    found.append(f"line {default.lineno}: trust_remote_code defaults to True")
    return found


def test_the_scan_catches_each_unsafe_pattern():
    unsafe = """
import pickle
from joblib import load
torch.load(path)
torch.load(path, weights_only=False)
AutoModel.from_pretrained(name, trust_remote_code=True)
def build(trust_remote_code=True): ...
numpy.load(path, allow_pickle=True)
"""
    assert len(_unsafe_calls(ast.parse(unsafe))) == 7
    assert _unsafe_calls(ast.parse("torch.load(path, map_location='cpu', weights_only=True)\n'pickle in a string'")) == []


def test_the_package_never_unpickles_or_trusts_remote_code():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 5
    found = {str(f.relative_to(PACKAGE)): _unsafe_calls(ast.parse(f.read_text(), str(f))) for f in files}
    assert {name: calls for name, calls in found.items() if calls} == {}


# ---- Every argument, every kind of bad value: a clear error naming the argument, before any compute -----------------
@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", "warm"), ("prompt_init_std", "x"), ("modality_dropout", "x"), ("interaction", "yes"),
        ("interaction", 0), ("memory", "no"), ("missing_modality", "x"), ("inference_mode", "x"),
        ("id2label", "cats"), ("id2label", {"a": "cat"}), ("problem_type", "regression"), ("modules_to_save", "classifier"),
        ("modules_to_save", 3), ("target_modules", 3), ("backbone", "offline"), ("gate_init", float("nan")),
        ("consolidation", "both"),
    ],
)
def test_every_bad_adapter_option_is_refused_naming_it(field, value):
    with pytest.raises(ValueError, match=f"`{field}`"):
        peft_mitp.MITPConfig(**{field: value})


def test_num_labels_and_id2label_must_agree_in_the_adapter_config():
    with pytest.raises(ValueError, match="`num_labels`=3 but `id2label` has 1"):
        peft_mitp.MITPConfig(num_labels=3, id2label={0: "a"})


@pytest.mark.parametrize(
    "options",
    [
        {"num_labels": 0}, {"num_labels": "3"}, {"num_labels": 2.5}, {"num_labels": True},
        {"id2label": {1: "a", 2: "b"}}, {"id2label": {}}, {"num_labels": 3, "classifier_dropout": 1.5},
        {"num_labels": 3, "classifier_dropout": "x"},
    ],
)
def test_every_bad_head_option_is_refused_by_from_backbone_and_set_head(options):
    name = next(k for k in options if k != "num_labels" or len(options) == 1)
    with pytest.raises(ValueError, match=f"`{name}`"):
        MITPForImageTextClassification.from_backbone(tiny_clip(), **options)
    head_options = {k: v for k, v in options.items() if k != "classifier_dropout"}
    if name != "classifier_dropout":
        model = MITPForImageTextClassification.from_backbone(tiny_clip(), num_labels=4)
        with pytest.raises(ValueError, match=f"`{name}`"):
            model.set_head(**head_options)
        assert model.classifier.out_features == 4  # nothing was changed


def test_from_backbone_refuses_what_is_not_a_model():
    with pytest.raises(TypeError, match="from_pretrained"):
        MITPForImageTextClassification.from_backbone("openai/clip-vit-base-patch32", num_labels=3)


@pytest.mark.parametrize(
    ("name", "make", "error", "match"),
    [
        ("input_ids", lambda x: x["input_ids"].float(), TypeError, "must hold integers"),
        ("input_ids", lambda x: x["input_ids"].tolist(), TypeError, "return_tensors='pt'"),
        ("input_ids", lambda x: x["input_ids"] + 1000, ValueError, "vocab_size"),
        ("pixel_values", lambda x: (x["pixel_values"] * 255).long(), TypeError, "floating-point"),
        ("pixel_values", lambda x: x["pixel_values"].numpy(), TypeError, "return_tensors='pt'"),
        ("output_hub_activations", lambda x: "yes", TypeError, "True or False"),
    ],
)
def test_every_bad_forward_input_is_refused_before_the_towers_run(name, make, error, match):
    model = make_model()
    inputs = clip_inputs()
    calls = []
    layer = model.base_model.model.backbone.text_model.encoder.layers[0]
    handle = layer.register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises(error, match=match):
        model(**{**inputs, name: make(inputs)})
    handle.remove()
    assert calls == []  # nothing ran
