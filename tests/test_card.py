"""The model card reads right: its title, its backbone words, a metrics table of metrics, its layer sentence."""

from __future__ import annotations

import re

from conftest import tiny_clip
from peft import get_peft_model

from peft_mitp import MITPConfig, MITPForImageTextClassification
from peft_mitp.card import build_model_card, parameter_counts

LABELS = {0: "soup", 1: "salad", 2: "cake"}
INFO = {
    "dataset": "easy_vqa",
    "epochs": 1.0,
    "metrics": {
        "test_accuracy": 0.875, "test_f1_macro": 0.5, "test_loss": 0.4, "test_accuracy_yes_no": 0.8,
        "test_runtime": 1.5, "test_samples_per_second": 60.0, "test_steps_per_second": 2.0, "validation_epoch": 1.0,
        "training_seconds": 95.7, "total_seconds": 125.1, "trainable_parameters": 1, "total_parameters": 2,
    },
}


def _model(config: MITPConfig | None = None):
    base = MITPForImageTextClassification.from_backbone(tiny_clip(), id2label=LABELS)
    return get_peft_model(base, config or MITPConfig(prompt_length=2, num_interaction_layers=2, hub_dim=16))


def _metric_rows(text: str) -> dict[str, str]:
    table = text.split("| metric | value |", 1)[1].split("\n\n", 1)[0]
    return {k: v for k, v in re.findall(r"^\| (\S+) \| (\S+) \|$", table, flags=re.M) if k != "---"}


def test_title_is_the_adapters_name_not_its_folder_name(tmp_path):
    model = _model()
    assert build_model_card(model, INFO, repo_id="someone/mitp-food101").text.split("\n# ", 1)[1].startswith(
        "mitp-food101\n"
    )
    # `mitp train` saves into <output>/adapter: "adapter" says nothing; the card names what it is instead.
    title = build_model_card(model, INFO, repo_id=str(tmp_path / "run" / "adapter")).text.split("\n# ", 1)[1]
    assert title.splitlines()[0] == "MITP adapter for easy_vqa on clip"


def test_backbone_family_is_named_once():
    text = build_model_card(_model(), INFO).text
    assert "clip dual encoder" in text.lower() and "dual encoder dual encoder" not in text
    assert "dual-encoder dual encoder" not in text


def test_metrics_table_holds_metrics_only_and_timings_are_said_in_words():
    text = build_model_card(_model(), INFO).text
    rows = _metric_rows(text)
    assert set(rows) == {"test_accuracy", "test_f1_macro", "test_loss", "test_accuracy_yes_no"}
    assert "- **Training time**: 95.7 s in the training loop, 125.1 s for the whole job" in text


def test_one_parameter_count_agrees_with_parameter_counts():
    model = _model()
    counts = parameter_counts(model)
    text = build_model_card(model, INFO).text
    assert f"**{counts['trainable']:,}**" in text and f"{counts['total']:,} parameters of the whole model" in text
    assert counts["total"] == counts["trainable"] + counts["backbone"]
    assert "trainable_parameters" not in _metric_rows(text) and "| total_parameters" not in text


def test_layer_sentence_when_every_layer_of_a_tower_interacts():
    # tiny CLIP: text 4 layers, vision 6 layers.
    every_text = MITPConfig(prompt_length=2, text_layers=[0, 1, 2, 3], vision_layers=[1, 2, 4, 5], hub_dim=16)
    text = build_model_card(_model(every_text), INFO).text
    assert "Every text layer is an interaction layer; the other 2 vision layers are frozen extraction layers." in text
    some = build_model_card(_model(), INFO).text
    assert "The other 2 text layers and 4 vision layers are frozen extraction layers." in some
