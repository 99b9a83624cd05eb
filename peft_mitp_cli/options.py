"""The options of the main job (`mitp train`): one dataclass, each field a flag, a config-file key and a help text.

This module imports only the standard library, so the command line can build its parser (and answer `--help`)
without importing torch, transformers or peft.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

OFFLINE_BACKBONE = "offline"
"""`--backbone` value of the packaged offline backbone (MiniLM text tower + EfficientNet-Lite0 vision tower)."""

DATASET_NAMES = ("easy_vqa", "food101", "mmimdb", "snli_ve")
SPLITS = ("train", "validation", "test")
SIMILARITIES = ("scaled_dot", "cosine", "dot")
ACTIVATIONS = ("softmax", "hard")
CONSOLIDATIONS = ("cross", "joint")
PRECISIONS = ("fp32", "bf16", "fp16")
QUANTIZATIONS = ("none", "int8", "bnb-int8", "bnb-nf4")
"""`--quantization`: the frozen backbone's encoder layers in full precision, torchao int8 weight-only, or bitsandbytes
8-bit / 4-bit NF4 (`peft_mitp.quantization.quantization_config`)."""
ADAPTER_OPTIONS = (
    "prompt_length", "text_layers", "vision_layers", "num_interaction_layers", "hub_dim", "similarity", "temperature",
    "activation", "consolidation", "gate_init", "interaction", "memory", "memory_gate_init", "token_heads",
    "fusion_hidden_size",
)
"""The options that are `MITPConfig` fields of the same name and meaning (`backbone` is not: here it names the
checkpoint, in `MITPConfig` the record of the backbone an adapter was built for)."""
JOB_ADAPTER_DEFAULTS = {"num_interaction_layers": 3}
"""Where the job's adapter defaults depart from `MITPConfig`'s paper-scale ones (4 pairs, hub 512 on CLIP ViT-L/14):
the offline backbone has 6 layers of width 384 per tower. Every other adapter option defaults to `MITPConfig`'s value
(tests/test_cli.py checks it)."""


def _opt(default: Any, help: str, **metadata: Any) -> Any:
    return field(default=default, metadata={"help": help, **metadata})


@dataclass
class TrainOptions:
    """Everything `mitp train` can be told; each field is also a command-line flag and a config-file key.

    Every field's help text is in its `metadata["help"]` (the command line shows it, with the default, under
    `mitp train --help`).

    Args:
        backbone: a dual-encoder checkpoint (Hub id or folder), or "offline" for the packaged default.
        text_backbone / vision_backbone: a separately pre-trained text encoder and vision encoder (PMF style);
            used instead of `backbone` when both are given.
        dataset: "easy_vqa", one of the paper's data sets ("food101", "mmimdb", "snli_ve"), or a folder made by
            `mitp convert` / `peft_mitp.data.convert_*`.
        data_dir: for the paper's data sets: the public distribution's folder (converted on first use into
            `<data_dir>/mitp-prepared`), or an already converted folder.
        max_train_samples / max_eval_samples: cap the splits (None: use everything). The defaults (8,000 training
            questions, 1,000 evaluation questions, two epochs of batch 32) keep the offline default job within about
            five minutes on 2 CPU cores; raise them for the full data set.
        prompt_length, text_layers, vision_layers, num_interaction_layers, hub_dim, similarity, temperature,
        activation, consolidation, gate_init, interaction, memory, memory_gate_init, token_heads,
        fusion_hidden_size: the `MITPConfig` (see docs/method.md).
        token_consolidation: True (default): `MITPConfig(token_consolidation=None)`, on wherever MITP offers it;
            False: off.
        epochs, batch_size, learning_rate, weight_decay, warmup_ratio, max_steps, seed: the Trainer schedule.
        precision: "fp32", "bf16" or "fp16" (mixed precision of the Trainer; the adapter stays float32).
        quantization: "none", "int8" (torchao weight-only), "bnb-int8" or "bnb-nf4" (bitsandbytes): the frozen
            backbone's encoder layers stored and run quantized (docs/reliability.md, "Quantized backbones").
        output_dir: where the adapter, metrics, plots and checkpoints go.
        push_to_hub: a Hub repo id to push the adapter (with its model card) to after training.
        eval_steps: evaluate every N steps (None: once per epoch).
        num_workers: DataLoader workers.
    """

    backbone: str = _opt(
        OFFLINE_BACKBONE,
        f"dual-encoder checkpoint (Hub id or folder), or '{OFFLINE_BACKBONE}': the packaged MiniLM + "
        "EfficientNet-Lite0 backbone (no Hub access needed)",
    )
    text_backbone: str | None = _opt(None, "separately pre-trained text encoder (Hub id or folder), with --vision-backbone")
    vision_backbone: str | None = _opt(None, "separately pre-trained vision encoder (Hub id or folder), with --text-backbone")
    dataset: str = _opt("easy_vqa", f"one of {', '.join(DATASET_NAMES)}, or a folder converted by `mitp convert`")
    data_dir: str | None = _opt(None, "folder of the public distribution of a paper data set (or a converted folder)")
    max_train_samples: int | None = _opt(8000, "use at most this many training examples")
    max_eval_samples: int | None = _opt(1000, "use at most this many validation and test examples each")
    prompt_length: int = _opt(8, "temporal prompts per interaction layer")
    text_layers: list[int] | None = _opt(None, "text-tower interaction layers, 0-based", shown_default="the last "
                                         "--num-interaction-layers of the shallower tower")
    vision_layers: list[int] | None = _opt(None, "vision-tower interaction layers, 0-based, paired with --text-layers",
                                           shown_default="spread evenly over the deeper tower")
    num_interaction_layers: int = _opt(JOB_ADAPTER_DEFAULTS["num_interaction_layers"],
                                       "interaction pairs when the layer lists are derived")
    hub_dim: int = _opt(512, "width of the memory hub's shared space (sets most of the adapter's size)")
    similarity: str = _opt("scaled_dot", "consolidation similarity between the two modalities' prompts",
                           choices=SIMILARITIES)
    temperature: float | None = _opt(None, "divide similarities by this before the activation (None: 1.0, or 0.1 for "
                                     "cosine)")
    activation: str = _opt("softmax", "activation over similarities ('hard': top-1, an ablation)", choices=ACTIVATIONS)
    consolidation: str = _opt("cross", "what each prompt's activation softmax runs over: the other modality's prompts "
                              "('cross') or both modalities' ('joint')", choices=CONSOLIDATIONS)
    gate_init: float = _opt(0.0, "initial value of the hub's gates on the generated cross-modal term (0: a fresh "
                            "adapter starts without a cross term)")
    interaction: bool = _opt(True, "ablation: no cross-modal term in the hub", flag="--no-interaction")
    memory: bool = _opt(True, "ablation: do not carry a tower's read-out to the next interaction layer",
                        flag="--no-memory")
    memory_gate_init: float = _opt(0.0, "initial value of the hub's gates on the carried read-outs (1: carried whole)")
    token_consolidation: bool = _opt(True, "ablation: the hub does not consolidate the towers' output tokens for the "
                                     "head (on by default where available: dual encoders with interaction)",
                                     flag="--no-token-consolidation")
    token_heads: int = _opt(8, "heads of the token consolidation (hub width must be divisible by it)")
    fusion_hidden_size: int | None = _opt(None, "width of the hub's fusion MLP before the head (0: none; None: 256 on "
                                          "dual encoders)")
    epochs: float = _opt(2.0, "training epochs (ignored when --max-steps is positive)")
    batch_size: int = _opt(32, "training batch size (evaluation uses twice this)")
    learning_rate: float = _opt(3e-3, "peak learning rate of the cosine schedule (AdamW); the offline default was "
                                "chosen on the job's validation split (docs/cli.md)")
    weight_decay: float = _opt(0.0, "AdamW weight decay")
    warmup_ratio: float = _opt(0.05, "fraction of the training steps spent warming the learning rate up")
    max_steps: int = _opt(-1, "stop after this many optimizer steps (-1: train --epochs epochs)")
    seed: int = _opt(0, "random seed (data order, sampling of the capped splits, initialisation)")
    precision: str = _opt("fp32", "mixed precision of the Trainer (the adapter stays float32)", choices=PRECISIONS)
    quantization: str = _opt("none", "store and run the frozen backbone's encoder layers quantized: 'int8' (torchao "
                             "weight-only), 'bnb-int8' or 'bnb-nf4' (bitsandbytes); the adapter stays float32",
                             choices=QUANTIZATIONS)
    output_dir: str = _opt("mitp-output", "where the adapter, metrics and plots are written")
    push_to_hub: str | None = _opt(None, "push the adapter and its model card to this Hub repo after training",
                                   metavar="REPO_ID")
    eval_steps: int | None = _opt(None, "evaluate every N steps (None: once per epoch, or once at the end of a "
                                  "single epoch)")
    num_workers: int = _opt(0, "DataLoader worker processes (0: load in the training process)")

    def mitp_config(self) -> Any:
        """The adapter configuration these options describe (a `peft_mitp.MITPConfig`).

        Every option of `ADAPTER_OPTIONS` is passed on; the job's own defaults differ from
        `MITPConfig`'s only in `JOB_ADAPTER_DEFAULTS`, and every `MITPConfig` field without an option keeps its
        default.
        """
        from peft_mitp.config import MITPConfig

        # The token consolidation is on by default wherever MITP offers it (None), so that `--no-interaction` or a
        # decoder VLM needs no second flag; `--no-token-consolidation` turns it off.
        return MITPConfig(
            **{name: getattr(self, name) for name in ADAPTER_OPTIONS},
            token_consolidation=None if self.token_consolidation else False,
        )
