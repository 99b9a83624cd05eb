"""Trainable parameters of the default `MITPConfig` on each family's main published checkpoint, with 101 classes.

Each backbone is built from its published shapes on the meta device (no weights are downloaded or allocated), wrapped
in `MITPForImageTextClassification.from_backbone(..., num_labels=101)` and given `peft.get_peft_model(...,
MITPConfig())`. The script prints a markdown table (pasted into docs/backbones.md) with the paper's 2.0M and PMF's
2.5M next to it, then the same for the decoder vision-language families (their language model's last token feeds the
head; the vision column counts the vision layers whose output the model uses). Run from the repository root: `python benchmarks/param_table.py` (about a minute on 2 cores).

The shapes are those of the checkpoints' `config.json` files (the Hub is not reachable from this project's
machines, so they are written out here; only the widths, depths and feature widths change the trainable count, the
vocabularies and MLP widths change the backbone column).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from peft import get_peft_model
from transformers import AutoConfig, AutoModel, PreTrainedModel, VisionTextDualEncoderConfig
from transformers.utils import logging

from peft_mitp import MITPConfig, MITPForImageTextClassification

NUM_LABELS = 101


def _tower(hidden: int, layers: int, heads: int, mlp: int, **extra: object) -> dict:
    return dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=mlp, **extra)


BERT_BASE = _tower(768, 12, 12, 3072, vocab_size=30522, max_position_embeddings=512)
VIT_B16 = _tower(768, 12, 12, 3072, image_size=224, patch_size=16)
CLIP_B_TEXT = _tower(512, 12, 8, 2048, vocab_size=49408, max_position_embeddings=77)


@dataclass(frozen=True)
class Checkpoint:
    """A family's main published checkpoint: its name and how to build its config."""

    family: str
    checkpoint: str
    config: Callable[[], object]


def _dual(model_type: str, text: dict, vision: dict, **top: object) -> Callable[[], object]:
    return lambda: AutoConfig.for_model(model_type, text_config=text, vision_config=vision, **top)


def _pair(text_type: str, text: dict, vision_type: str, vision: dict) -> Callable[[], object]:
    return lambda: VisionTextDualEncoderConfig.from_vision_text_configs(
        AutoConfig.for_model(vision_type, **vision), AutoConfig.for_model(text_type, **text), projection_dim=768
    )


CHECKPOINTS = [
    Checkpoint(
        "clip",
        "openai/clip-vit-large-patch14 (the paper's)",
        _dual("clip", _tower(768, 12, 12, 3072, vocab_size=49408, max_position_embeddings=77),
              _tower(1024, 24, 16, 4096, image_size=224, patch_size=14), projection_dim=768),
    ),
    Checkpoint(
        "metaclip_2",
        "facebook/metaclip-2-worldwide-huge-quickgelu",
        _dual("metaclip_2", _tower(1024, 24, 16, 4096, vocab_size=901629, max_position_embeddings=77),
              _tower(1280, 32, 16, 5120, image_size=224, patch_size=14), projection_dim=1024),
    ),
    Checkpoint(
        "siglip",
        "google/siglip-base-patch16-224",
        _dual("siglip", _tower(768, 12, 12, 3072, vocab_size=32000, max_position_embeddings=64, projection_size=768),
              VIT_B16),
    ),
    Checkpoint(
        "siglip",
        "google/siglip-so400m-patch14-384",
        _dual("siglip", _tower(1152, 27, 16, 4304, vocab_size=32000, max_position_embeddings=64,
                               projection_size=1152),
              _tower(1152, 27, 16, 4304, image_size=384, patch_size=14)),
    ),
    Checkpoint(
        "siglip2",
        "google/siglip2-base-patch16-naflex",
        _dual("siglip2", _tower(768, 12, 12, 3072, vocab_size=256000, max_position_embeddings=64,
                                projection_size=768),
              _tower(768, 12, 12, 3072, patch_size=16, num_patches=256)),
    ),
    Checkpoint(
        "chinese_clip",
        "OFA-Sys/chinese-clip-vit-base-patch16",
        _dual("chinese_clip", _tower(768, 12, 12, 3072, vocab_size=21128, max_position_embeddings=512), VIT_B16,
              projection_dim=512),
    ),
    Checkpoint(
        "altclip",
        "BAAI/AltCLIP",
        _dual("altclip", _tower(1024, 24, 16, 4096, vocab_size=250002, max_position_embeddings=514, project_dim=768,
                                pad_token_id=1, type_vocab_size=1),
              _tower(1024, 24, 16, 4096, image_size=224, patch_size=14), projection_dim=768),
    ),
    Checkpoint(
        "owlvit",
        "google/owlvit-base-patch32",
        _dual("owlvit", dict(CLIP_B_TEXT, max_position_embeddings=16),
              _tower(768, 12, 12, 3072, image_size=768, patch_size=32), projection_dim=512),
    ),
    Checkpoint(
        "owlv2",
        "google/owlv2-base-patch16-ensemble",
        _dual("owlv2", dict(CLIP_B_TEXT, max_position_embeddings=16),
              _tower(768, 12, 12, 3072, image_size=960, patch_size=16), projection_dim=512),
    ),
    Checkpoint("clipseg", "CIDAS/clipseg-rd64-refined", _dual("clipseg", CLIP_B_TEXT, VIT_B16, projection_dim=512)),
    Checkpoint(
        "aimv2",
        "apple/aimv2-large-patch14-224-lit",
        _dual("aimv2", _tower(768, 12, 6, 2048, vocab_size=49408, max_position_embeddings=77),
              _tower(1024, 24, 8, 2816, image_size=224, patch_size=14), projection_dim=768),
    ),
    Checkpoint(
        "blip",
        "Salesforce/blip-itm-base-coco (its shapes; see the BLIP note)",
        _dual("blip", _tower(768, 12, 12, 3072, vocab_size=30524, max_position_embeddings=512),
              _tower(768, 12, 12, 3072, image_size=384, patch_size=16), projection_dim=512),
    ),
    Checkpoint(
        "flava",
        "facebook/flava-full",
        lambda: AutoConfig.for_model(
            "flava", text_config=BERT_BASE, image_config=VIT_B16, multimodal_config=_tower(768, 6, 12, 3072),
            projection_dim=768,
        ),
    ),
    Checkpoint("tipsv2", "google/tipsv2-b14", lambda: AutoConfig.for_model("tipsv2")),  # its defaults are b14's
    Checkpoint(
        "vision-text-dual-encoder",
        "google-bert/bert-base-uncased + google/vit-base-patch16-224-in21k (PMF's towers)",
        _pair("bert", BERT_BASE, "vit", VIT_B16),
    ),
]


def _decoder(model_type: str, text: dict, vision: dict, **top: object) -> Callable[[], object]:
    def build() -> object:
        config = AutoConfig.for_model(model_type)
        text_config = {**config.text_config.to_dict(), **text}
        vision_config = {**config.vision_config.to_dict(), **vision}
        for sub in (text_config, vision_config):
            sub.pop("layer_types", None)
        fields = {**config.to_dict(), **top, "text_config": text_config, "vision_config": vision_config}
        fields.pop("model_type", None)
        return type(config)(**fields)

    return build


CLIP_L_336 = _tower(1024, 24, 16, 4096, image_size=336, patch_size=14)
SIGLIP_SO400M = _tower(1152, 27, 16, 4304, patch_size=14)
LLAMA2_7B = _tower(4096, 32, 32, 11008, num_key_value_heads=32, vocab_size=32064)
MISTRAL_7B = dict(_tower(4096, 32, 32, 14336, num_key_value_heads=8, vocab_size=32064), model_type="mistral")

# Decoder vision-language models: each family's main published checkpoint (shapes from its config.json).
DECODER_CHECKPOINTS = [
    Checkpoint("llava", "llava-hf/llava-1.5-7b-hf",
               _decoder("llava", LLAMA2_7B, CLIP_L_336, vision_feature_layer=-2)),
    Checkpoint("llava_next", "llava-hf/llava-v1.6-mistral-7b-hf",
               _decoder("llava_next", MISTRAL_7B, CLIP_L_336, vision_feature_layer=-2)),
    Checkpoint("llava_onevision", "llava-hf/llava-onevision-qwen2-0.5b-ov-hf",
               _decoder("llava_onevision", _tower(896, 24, 14, 4864, num_key_value_heads=2, vocab_size=151647),
                        _tower(1152, 26, 16, 4304, image_size=384, patch_size=14), vision_feature_layer=-1)),
    Checkpoint("paligemma", "google/paligemma-3b-pt-224",
               _decoder("paligemma", _tower(2048, 18, 8, 16384, num_key_value_heads=1, head_dim=256,
                                            vocab_size=257216),
                        {**SIGLIP_SO400M, "image_size": 224, "projection_dim": 2048}, projection_dim=2048)),
    Checkpoint("gemma3", "google/gemma-3-4b-it",
               _decoder("gemma3", _tower(2560, 34, 8, 10240, num_key_value_heads=4, head_dim=256, vocab_size=262208),
                        {**SIGLIP_SO400M, "image_size": 896})),
    Checkpoint("idefics3", "HuggingFaceM4/Idefics3-8B-Llama3",
               _decoder("idefics3", _tower(4096, 32, 32, 14336, num_key_value_heads=8, vocab_size=128259),
                        {**SIGLIP_SO400M, "image_size": 364}, scale_factor=2)),
    Checkpoint("smolvlm", "HuggingFaceTB/SmolVLM-256M-Instruct",
               _decoder("smolvlm", _tower(576, 30, 9, 1536, num_key_value_heads=3, vocab_size=49280),
                        _tower(768, 12, 12, 3072, image_size=512, patch_size=16), scale_factor=4)),
    Checkpoint("qwen2_vl", "Qwen/Qwen2-VL-2B-Instruct",
               _decoder("qwen2_vl", _tower(1536, 28, 12, 8960, num_key_value_heads=2, vocab_size=151936),
                        dict(depth=32, embed_dim=1280, num_heads=16, hidden_size=1536))),
    Checkpoint("vipllava", "llava-hf/vip-llava-7b-hf",
               _decoder("vipllava", LLAMA2_7B, CLIP_L_336, vision_feature_layers=[-2, -5, -8, -11, 6])),
    Checkpoint("aya_vision", "CohereLabs/aya-vision-8b",
               _decoder("aya_vision", _tower(4096, 32, 32, 14336, num_key_value_heads=8, vocab_size=256000),
                        {**SIGLIP_SO400M, "image_size": 364}, vision_feature_layer=-1)),
    Checkpoint("cohere2_vision", "CohereLabs/command-a-vision-07-2025",
               _decoder("cohere2_vision", _tower(12288, 64, 96, 36864, num_key_value_heads=8, vocab_size=256000),
                        {**SIGLIP_SO400M, "image_size": 512})),
    Checkpoint("internvl", "OpenGVLab/InternVL3-1B-hf",
               _decoder("internvl", _tower(896, 24, 14, 4864, num_key_value_heads=2, vocab_size=151674),
                        _tower(1024, 24, 16, 4096, image_size=[448, 448], patch_size=[14, 14]))),
    Checkpoint("deepseek_vl", "deepseek-community/deepseek-vl-1.3b-chat",
               _decoder("deepseek_vl", _tower(2048, 24, 16, 5632, num_key_value_heads=16, vocab_size=102400),
                        _tower(1024, 24, 16, 4096, image_size=384, patch_size=16))),
    Checkpoint("janus", "deepseek-community/Janus-Pro-1B",
               _decoder("janus", _tower(2048, 24, 16, 5632, num_key_value_heads=16, vocab_size=102400),
                        _tower(1024, 24, 16, 4096, image_size=384, patch_size=16, projection_dim=2048))),
    Checkpoint("qwen2_5_vl", "Qwen/Qwen2.5-VL-3B-Instruct",
               _decoder("qwen2_5_vl", _tower(2048, 36, 16, 11008, num_key_value_heads=2, vocab_size=151936),
                        dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                             out_hidden_size=2048))),
]


def decoder_markdown(rows: list[dict]) -> str:
    """The decoder-VLM table as markdown (the "text" part is the language model)."""
    header = ("language model layers x width", "vision layers used x width", "interaction layers (language / vision)")
    return "\n".join(_table(rows, header, backbone_format=",.0f", share_digits=3))


def _on_meta(config: object) -> PreTrainedModel:
    with torch.device("meta"):
        return AutoModel.from_config(config)


def count(checkpoint: Checkpoint, config: MITPConfig | None = None) -> dict:
    """Build one checkpoint's shapes on the meta device and count the adapter's trainable parameters.

    Returns:
        A dict with the towers' depths and widths, the interaction layers, the trainable parameters split into
        prompts, hub and head, their total, and the backbone's parameter count.
    """
    backbone = _on_meta(checkpoint.config())
    backbone_params = sum(p.numel() for p in backbone.parameters())
    base = MITPForImageTextClassification.from_backbone(backbone, num_labels=NUM_LABELS)
    towers = base.mitp_towers()
    model = get_peft_model(base, config or MITPConfig())
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    adapter = model.peft_config["default"]
    return {
        "family": checkpoint.family,
        "checkpoint": checkpoint.checkpoint,
        "text": f"{len(towers['text'].layers)} x {towers['text'].width}",
        "vision": f"{towers['vision'].usable_depth or len(towers['vision'].layers)} x {towers['vision'].width}",
        "layers": f"{adapter.text_layers} / {adapter.vision_layers}",
        "prompts": sum(v for n, v in trainable.items() if "mitp_prompt" in n),
        "hub": sum(v for n, v in trainable.items() if "mitp_hub" in n),
        "head": sum(v for n, v in trainable.items() if "classifier" in n),
        "total": sum(trainable.values()),
        "backbone": backbone_params,
    }


def _table(rows: list[dict], parts: tuple[str, str, str], backbone_format: str, share_digits: int) -> list[str]:
    """The lines of a parameter table; `parts` name the three tower columns."""
    lines = [
        f"| family | checkpoint | {parts[0]} | {parts[1]} | {parts[2]} "
        "| prompts | hub | head | trainable | backbone | trainable / backbone |",
        "| --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['family']} | {r['checkpoint']} | {r['text']} | {r['vision']} | {r['layers']} | "
            f"{r['prompts']:,} | {r['hub']:,} | {r['head']:,} | **{r['total'] / 1e6:.2f}M** | "
            f"{r['backbone'] / 1e6:{backbone_format}}M | {100 * r['total'] / r['backbone']:.{share_digits}f}% |"
        )
    return lines


def markdown(rows: list[dict]) -> str:
    """The table as markdown, with the paper's and PMF's budgets as the last rows."""
    lines = _table(rows, ("text layers x width", "vision layers x width", "interaction layers (text / vision)"),
                   backbone_format=".0f", share_digits=2)
    lines.append("| MITP paper | CLIP ViT-L/14 | 12 x 768 | 24 x 1024 | | | | | **2.0M** (reported) | | |")
    lines.append(
        "| PMF (Li et al. 2023) | BERT-base + ViT-B/16 | 12 x 768 | 12 x 768 | last 2 | | | | **2.5M** (from its "
        "code) | | |"
    )
    return "\n".join(lines)


def main() -> None:
    logging.set_verbosity_error()
    print(markdown([count(c) for c in CHECKPOINTS]))
    print()
    print(decoder_markdown([count(c) for c in DECODER_CHECKPOINTS]))


if __name__ == "__main__":
    main()
