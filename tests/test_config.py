"""MITPConfig validation, default pairing and the paper's parameter budget."""

from __future__ import annotations

import pytest
import torch
from peft import PeftConfig, get_peft_model
from transformers import CLIPConfig, CLIPModel

import peft_mitp
from peft_mitp.model import default_pairing


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"prompt_length": 0}, "`prompt_length` must be a positive integer"),
        ({"prompt_length": -3}, "`prompt_length` must be a positive integer"),
        ({"vision_prompt_length": 0}, "`vision_prompt_length` must be a positive integer"),
        ({"hub_dim": 0}, "`hub_dim` must be a positive integer"),
        ({"text_layers": [1, 1]}, "more than once"),
        ({"text_layers": [-1, 2]}, "negative indices"),
        ({"text_layers": [3, 2]}, "not in ascending order"),
        ({"text_layers": []}, "is empty"),
        ({"text_layers": [1, 2], "vision_layers": [1, 2, 3]}, "`vision_layers` has 3 entries but `text_layers` has 2"),
        ({"similarity": "euclid"}, "`similarity`='euclid' is unknown"),
        ({"activation": "sigmoid"}, "`activation`='sigmoid' is unknown"),
        ({"temperature": 0.0}, "`temperature` must be > 0"),
        ({"prompt_init_std": -1.0}, "`prompt_init_std` must be >= 0"),
    ],
)
def test_bad_config_values_raise_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        peft_mitp.MITPConfig(**kwargs)


def test_default_pairing_matches_clip_large_layout():
    config = peft_mitp.MITPConfig()
    assert default_pairing(config, text_depth=12, vision_depth=24) == ([8, 9, 10, 11], [16, 18, 20, 22])


def test_pairing_maps_a_list_given_for_one_tower_to_the_other():
    config = peft_mitp.MITPConfig(vision_layers=[10, 20])
    assert default_pairing(config, text_depth=12, vision_depth=24) == ([5, 10], [10, 20])


def test_out_of_range_layer_names_tower_and_valid_range():
    config = peft_mitp.MITPConfig(text_layers=[10, 12])
    with pytest.raises(ValueError, match=r"text tower has 12 layers \(valid indices 0..11\)"):
        default_pairing(config, text_depth=12, vision_depth=24)


def test_too_many_interaction_layers_for_the_shallower_tower():
    with pytest.raises(ValueError, match="exceeds the shallower tower's depth"):
        default_pairing(peft_mitp.MITPConfig(num_interaction_layers=13), text_depth=12, vision_depth=24)


def test_out_of_range_layers_are_refused_at_injection():
    from conftest import make_model

    with pytest.raises(ValueError, match="out of range"):
        make_model(peft_mitp.MITPConfig(text_layers=[2, 9]))


def test_config_round_trips_through_json(tmp_path):
    config = peft_mitp.MITPConfig(prompt_length=6, similarity="cosine", text_layers=[1, 2], vision_layers=[3, 4])
    config.save_pretrained(tmp_path)
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, peft_mitp.MITPConfig)
    assert loaded.peft_type == "MITP"
    assert (loaded.prompt_length, loaded.similarity, loaded.text_layers) == (6, "cosine", [1, 2])
    assert loaded.effective_temperature == pytest.approx(0.1)


def test_registration_is_idempotent():
    from peft import mapping

    peft_mitp.register()
    peft_mitp.register()
    assert mapping.PEFT_TYPE_TO_CONFIG_MAPPING["MITP"] is peft_mitp.MITPConfig
    assert mapping.PEFT_TYPE_TO_TUNER_MAPPING["MITP"] is peft_mitp.MITPModel
    assert list(mapping.PEFT_TYPE_TO_PREFIX_MAPPING.values()).count("mitp_") == 1


def clip_large_on_meta() -> CLIPModel:
    """CLIP ViT-L/14 built from its published shapes on the meta device: no weights, no memory."""
    config = CLIPConfig(
        text_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
        vision_config=dict(
            hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
            image_size=224, patch_size=14,
        ),
        projection_dim=768,
    )
    with torch.device("meta"):
        return CLIPModel(config)


def _clip_large_breakdown(config: peft_mitp.MITPConfig) -> tuple[int, dict[str, int]]:
    base = peft_mitp.MITPForImageTextClassification.from_backbone(clip_large_on_meta(), num_labels=101)
    model = get_peft_model(base, config)
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    total = sum(trainable.values())
    breakdown = {
        "prompts": sum(v for n, v in trainable.items() if "mitp_prompt" in n),
        "hub": sum(v for n, v in trainable.items() if "mitp_hub" in n and ".readout." not in n),
        "read-out": sum(v for n, v in trainable.items() if ".readout." in n),
        "head": sum(v for n, v in trainable.items() if "classifier" in n),
    }
    print(f"\nMITP on CLIP ViT-L/14, 101 classes: {total:,} trainable = {breakdown}")
    assert sum(breakdown.values()) == total
    assert model.peft_config["default"].vision_layers == [16, 18, 20, 22]
    return total, breakdown


def test_the_paper_budget_config_on_clip_large_has_the_papers_two_million_parameters():
    # The hub as the paper describes it, without the read-out to the head (docs/method.md, "Parameter budget").
    paper = peft_mitp.MITPConfig(token_consolidation=False, fusion_hidden_size=0, memory_gate_init=None)
    total, breakdown = _clip_large_breakdown(paper)
    assert 1.8e6 <= total <= 2.2e6
    assert breakdown["read-out"] == 0
    assert breakdown["head"] == (768 + 768) * 101 + 101


def test_the_default_config_on_clip_large_adds_the_read_out_to_the_papers_budget():
    total, breakdown = _clip_large_breakdown(peft_mitp.MITPConfig())
    features = 768 + 768
    # Fusion MLP: (features + 8 similarities) -> 256 -> features; the standardisers are buffers, not trained.
    assert breakdown["read-out"] == (features + 8) * 256 + 256 + 256 * features + features
    paper_total, paper = _clip_large_breakdown(
        peft_mitp.MITPConfig(token_consolidation=False, fusion_hidden_size=0, memory_gate_init=None)
    )
    assert breakdown["hub"] == paper["hub"] + 768 + 1024  # + the memory gates
    assert total == paper_total + breakdown["read-out"] + 768 + 1024
    assert 2.8e6 <= total <= 2.9e6
