"""The methods `benchmarks/compare.py` puts side by side, each as a builder around a frozen dual encoder.

Every builder takes its own copy of the backbone and the number of classes and returns a model whose forward takes
the batch (`input_ids`, `attention_mask`, `token_type_ids`, `pixel_values`, `labels`) and returns `loss` and
`logits`. The learning rate is per method and stated here (and in docs/benchmarks.md); everything else (data, batch
size, steps, schedule, seed) is shared.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from benchmarks.baselines import (
    DualEncoderClassifier,
    EarlyFusionForImageTextClassification,
    PMFForImageTextClassification,
)

__all__ = ["METHODS", "Method", "build_mitp", "lora_target_modules", "mitp_options"]


@dataclass(frozen=True)
class Method:
    """One row of the comparison.

    Attributes:
        name: short name (command line, tables).
        group: "MITP", "ablation" or "baseline".
        description: what it is, in a few words.
        build: (backbone, num_labels) -> model; the backbone is the method's own copy.
        learning_rate: AdamW learning rate of the method's trainable parameters (of its head, with a backbone rate).
        backbone_learning_rate: for methods that train the pretrained weights themselves (full fine-tuning).
    """

    name: str
    group: str
    description: str
    build: Callable[[nn.Module, int], nn.Module]
    learning_rate: float
    backbone_learning_rate: float | None = None


def mitp_options(**changes):
    """`peft_mitp.training.TrainOptions` of the offline job (`mitp train`'s defaults), with `changes` applied."""
    from peft_mitp.training import TrainOptions

    return dataclasses.replace(TrainOptions(), **changes)


def build_mitp(backbone: nn.Module, num_labels: int, **changes) -> nn.Module:
    """MITP with the offline job's adapter config (`TrainOptions().mitp_config()`), `changes` applied."""
    from peft import get_peft_model

    from peft_mitp import MITPForImageTextClassification

    base = MITPForImageTextClassification.from_backbone(backbone, num_labels=num_labels)
    return get_peft_model(base, mitp_options(**changes).mitp_config())


def lora_target_modules(backbone: nn.Module) -> list[str]:
    """The attention query and value projections of both towers, by the names this backbone's towers use.

    BERT-style towers call them `query` / `value`, CLIP and transformers 5's ViT `q_proj` / `v_proj`; a dual encoder
    can mix both (BERT + ViT), so every pair found is targeted.
    """
    names = {name.rsplit(".", 1)[-1] for name, _ in backbone.named_modules()}
    found = [name for pair in (("query", "value"), ("q_proj", "v_proj")) if set(pair) <= names for name in pair]
    if not found:
        raise ValueError("Found no attention query/value projections named query/value or q_proj/v_proj.")
    return found


def build_lora(backbone: nn.Module, num_labels: int, rank: int = 8) -> nn.Module:
    """LoRA (peft) on the query and value projections of every layer of both towers, plus a trainable linear head."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        lora_dropout=0.0,
        target_modules=lora_target_modules(backbone),
        modules_to_save=["classifier"],
    )
    backbone.requires_grad_(False)
    return get_peft_model(DualEncoderClassifier(backbone, num_labels), config)


def build_probe(backbone: nn.Module, num_labels: int, hidden_size: int | None = None) -> nn.Module:
    """A head on the frozen pooled features: linear (`hidden_size=None`) or the late-fusion MLP."""
    backbone.requires_grad_(False)
    return DualEncoderClassifier(backbone, num_labels, hidden_size=hidden_size)


def build_full_finetuning(backbone: nn.Module, num_labels: int) -> nn.Module:
    """Every weight of the backbone trainable, with the same linear head as MITP."""
    model = DualEncoderClassifier(backbone, num_labels)
    model.requires_grad_(True)
    return model


MITP_LR = mitp_options().learning_rate  # the offline job's default (chosen on its validation split)
# The learning rate of the other prompt-style baselines and of full fine-tuning's head: the job's earlier default,
# a standard choice for prompts and heads. Pinned here so that a change of the job's default moves only the methods
# that share MITP's parameters (MITP, its ablations, deep prompt tuning).
PROMPT_LR = 3e-3
# LoRA: the best of 3e-4, 1e-3, 3e-3 and 1e-2 at both budgets of the learning-rate sweep in docs/benchmarks.md.
LORA_LR = 3e-3

METHODS: dict[str, Method] = {
    m.name: m
    for m in [
        Method("mitp", "MITP", "MITP, the offline job's defaults", build_mitp, MITP_LR),
        Method(
            "mitp-no-interaction",
            "ablation",
            "MITP, interaction off (temporal prompts with memory, no cross-modal term, no token consolidation; the "
            "same fusion MLP before the head)",
            lambda b, n: build_mitp(b, n, interaction=False),
            MITP_LR,
        ),
        Method(
            "mitp-no-memory",
            "ablation",
            "MITP, memory off (no carry of a layer's read-out to the next)",
            lambda b, n: build_mitp(b, n, memory=False),
            MITP_LR,
        ),
        Method(
            "mitp-cosine",
            "ablation",
            "MITP, cosine similarity (temperature 0.1)",
            lambda b, n: build_mitp(b, n, similarity="cosine"),
            MITP_LR,
        ),
        Method(
            "mitp-dot", "ablation", "MITP, plain dot-product similarity", lambda b, n: build_mitp(b, n, similarity="dot"),
            MITP_LR,
        ),
        Method(
            "deep-prompt",
            "baseline",
            "deep prompt tuning without interaction (MITPConfig(interaction=False, memory=False))",
            lambda b, n: build_mitp(b, n, interaction=False, memory=False),
            MITP_LR,
        ),
        Method("linear-probe", "baseline", "linear head on frozen pooled features", build_probe, 1e-2),
        Method(
            "mlp-probe",
            "baseline",
            "late-fusion MLP (one hidden layer of 512, GELU) on frozen concatenated pooled features",
            lambda b, n: build_probe(b, n, hidden_size=512),
            1e-3,
        ),
        Method(
            "pmf",
            "baseline",
            "PMF: query/query-context/fusion-context prompts (4 each), MLP translators, last 2 layers",
            lambda b, n: PMFForImageTextClassification(b, n),
            PROMPT_LR,
        ),
        Method("lora", "baseline", "LoRA r=8 on query/value of both towers + linear head", build_lora, LORA_LR),
        Method(
            "early-fusion",
            "baseline",
            "PromptFuse-style: projected image tokens + 8 prompts into the frozen text tower",
            lambda b, n: EarlyFusionForImageTextClassification(b, n),
            PROMPT_LR,
        ),
        Method(
            "full-ft",
            "baseline",
            "full fine-tuning: every weight trainable (backbone lr 5e-5, head lr 3e-3)",
            build_full_finetuning,
            PROMPT_LR,
            backbone_learning_rate=5e-5,
        ),
    ]
}
