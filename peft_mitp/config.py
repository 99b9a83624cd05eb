"""`MITPConfig`: what an MITP adapter is made of, with the paper's defaults."""

from __future__ import annotations

import difflib
import enum
import functools
import os
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from peft.config import PeftConfig

from .adapter_files import adapt_legacy_hub, check_adapter_weights, check_hub_weights

SIMILARITIES = ("scaled_dot", "cosine", "dot")
ACTIVATIONS = ("softmax", "hard")
CONSOLIDATIONS = ("cross", "joint")
PROBLEM_TYPES = ("single_label_classification", "multi_label_classification")


class MITPPeftType(str, enum.Enum):
    """The plugin's own PEFT type.

    peft's `PeftType` is a closed enum, so the plugin keys peft's lookup tables with a member of this `str` enum. It
    hashes and compares equal to the plain string `"MITP"` read back from `adapter_config.json`, and has `.value`,
    which some peft code paths call.
    """

    MITP = "MITP"


DEFAULT_FUSION_HIDDEN_SIZE = 256
"""`MITPConfig(fusion_hidden_size=None)` on a dual encoder (docs/benchmarks.md, "Does the interaction carry the task?")."""


def _check_layer_list(name: str, layers: list[int] | None) -> list[int] | None:
    if layers is None:
        return None
    if isinstance(layers, int) or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
        raise ValueError(f"`{name}` must be a list of layer indices (ints), got {layers!r}.")
    layers = list(layers)
    if not layers:
        raise ValueError(f"`{name}` is empty: give at least one layer index, or None for the default pairing.")
    if any(i < 0 for i in layers):
        raise ValueError(f"`{name}` has negative indices {[i for i in layers if i < 0]}: indices count from 0.")
    duplicated = sorted({i for i in layers if layers.count(i) > 1})
    if duplicated:
        raise ValueError(f"`{name}` lists layer(s) {duplicated} more than once: each interaction layer appears once.")
    if layers != sorted(layers):
        raise ValueError(
            f"`{name}`={layers} is not in ascending order: interaction pairs run from the lowest layer up, "
            f"so list them as {sorted(layers)}."
        )
    return layers


@dataclass
class MITPConfig(PeftConfig):
    """Configuration of an MITP adapter (Memory-Inspired Temporal Prompt Interaction, arXiv 2401.14856).

    MITP puts `prompt_length` temporal prompts into chosen *interaction layers* of both towers of a frozen dual
    encoder. After each pair of interaction layers a shared memory hub reads the prompts out, consolidates them by
    cross-modal similarity, activates them with a softmax and generates the next pair's prompts in both directions.
    The defaults reproduce the paper's budget: about 2.0M trainable parameters on CLIP ViT-L/14 with 101 classes.

    Every field below is saved in `adapter_config.json`. `text_layers`, `vision_layers` and `target_modules` are
    resolved against the backbone when the adapter is created, so the saved file always names concrete layers.

    Example:

        ```py
        >>> import peft_mitp
        >>> from peft import get_peft_model
        >>> base = peft_mitp.MITPForImageTextClassification.from_backbone(clip_model, num_labels=101)
        >>> model = get_peft_model(base, peft_mitp.MITPConfig(prompt_length=8, similarity="cosine"))
        ```
    """

    prompt_length: int = field(
        default=8,
        metadata={
            "help": "Number of temporal prompts per interaction layer (text tower; also the vision tower unless "
            "`vision_prompt_length` is set). More prompts carry more information between the towers at a small "
            "cost in compute; 4 to 16 is the useful range."
        },
    )
    vision_prompt_length: int | None = field(
        default=None,
        metadata={"help": "Number of vision prompts when it should differ from `prompt_length` (None: the same)."},
    )
    text_layers: list[int] | None = field(
        default=None,
        metadata={
            "help": "Text-tower interaction layers (0-based, ascending). None: the last `num_interaction_layers` "
            "layers of the shallower tower, paired evenly with the deeper one (CLIP ViT-L/14: text 8..11 with "
            "vision 16, 18, 20, 22). Set it to move the interaction lower (more capacity, more backward cost)."
        },
    )
    vision_layers: list[int] | None = field(
        default=None,
        metadata={"help": "Vision-tower interaction layers (0-based, ascending); pair k is `text_layers[k]` with "
                  "`vision_layers[k]`, so both lists must have the same length. None: derived as for `text_layers`."},
    )
    num_interaction_layers: int = field(
        default=4,
        metadata={"help": "How many interaction pairs the default pairing uses when the layer lists are None."},
    )
    hub_dim: int = field(
        default=512,
        metadata={
            "help": "Width of the memory hub's shared space. The hub maps each tower into it and back (the "
            "'mapping connection'), shared across all interaction layers; this is the low-rank size that sets most "
            "of the adapter's parameters. 512 gives the paper's ~2.0M on CLIP ViT-L/14; lower it for smaller budgets."
        },
    )
    similarity: Literal["scaled_dot", "cosine", "dot"] = field(
        default="scaled_dot",
        metadata={"help": "Consolidation similarity between the two modalities' prompts: 'scaled_dot' "
                  "(dot / sqrt(hub_dim)), 'cosine' or 'dot'."},
    )
    temperature: float | None = field(
        default=None,
        metadata={"help": "Similarities are divided by this before the activation softmax. None: 1.0 for "
                  "'scaled_dot' and 'dot', 0.1 for 'cosine' (cosine similarities lie in [-1, 1])."},
    )
    activation: Literal["softmax", "hard"] = field(
        default="softmax",
        metadata={"help": "Activation over similarities: 'softmax' (the paper) or 'hard' (top-1, an ablation)."},
    )
    consolidation: Literal["cross", "joint"] = field(
        default="cross",
        metadata={
            "help": "What each prompt's activation softmax runs over. 'cross': the other modality's prompts (each "
            "prompt always draws a full unit of the other modality). 'joint': both modalities' prompts, so how much a "
            "prompt draws from the other modality grows with how well it matches there. Measured on the offline job "
            "(docs/benchmarks.md, 'Does the interaction carry the task?'): no gain in accuracy there."
        },
    )
    gate_init: float = field(
        default=0.0,
        metadata={
            "help": "Initial value of the hub's per-channel gates on the generated cross-modal term. 0: a fresh "
            "adapter starts as temporal prompts without interaction, and the hub's maps get their first gradient at "
            "the second step. A positive value lets the cross term act, and every hub tensor learn, from the first "
            "step."
        },
    )
    token_consolidation: bool | None = field(
        default=None,
        metadata={
            "help": "Whether the memory hub, after the last interaction pair, also consolidates the tokens both towers "
            "end with: every text token's similarity with every image token in `token_heads` heads of the hub's "
            "shared space, a softmax over the image tokens, and the activated similarities averaged over the text "
            "tokens reach the classification head (through the fusion MLP, `fusion_hidden_size`). This is what "
            "answers questions that need the text matched against the image (docs/benchmarks.md). None: on for "
            "dual encoders with `interaction=True`, off for decoder vision-language models (not available there "
            "yet) and without interaction."
        },
    )
    token_heads: int = field(
        default=8,
        metadata={"help": "Number of heads of the token consolidation; `hub_dim` must be divisible by it."},
    )
    fusion_hidden_size: int | None = field(
        default=None,
        metadata={
            "help": "Width of the hub's fusion MLP (one GELU hidden layer) on the standardised pooled features of "
            "both towers and the token similarities; its output is added to the pooled features the linear head "
            "reads. 0: no fusion MLP (the similarities, if any, reach the head through one linear map). Kept with "
            "`interaction=False`, so that the ablation has the same head. None: 256 for dual encoders, 0 for decoder "
            "vision-language models (not measured there)."
        },
    )
    interaction: bool = field(
        default=True,
        metadata={"help": "Ablation switch. False: no cross-modal term; each tower's prompts only carry its own "
                  "read-out forward (temporal prompts without interaction)."},
    )
    memory: bool = field(
        default=True,
        metadata={"help": "Ablation switch. False: a layer's read-out is not carried to the next interaction layer; "
                  "each layer starts from its own learned prompts plus the cross-modal term."},
    )
    memory_gate_init: float = field(
        default=0.0,
        metadata={
            "help": "Initial value of the hub's per-channel memory gates, which scale each tower's read-out before it "
            "is carried into the next interaction layer's prompts (with `memory=True`). 1.0 carries the read-out "
            "whole, at the scale of the towers' hidden states, which disturbs the frozen layers above it and the "
            "output tokens the token consolidation reads (docs/method.md). 0: the memory starts closed and opens as "
            "far as training finds it useful."
        },
    )
    prompt_init_std: float = field(
        default=0.02,
        metadata={"help": "Standard deviation of the Gaussian that initialises the learned prompts."},
    )
    target_modules: list[str] | None = field(
        default=None,
        metadata={"help": "Filled in when the adapter is created: the full names of the wrapped interaction "
                  "layers. Leave it None; choose layers with `text_layers` / `vision_layers`."},
    )
    # ---- The backbone this adapter was built for (docs/reliability.md, "Loading checks") ---------------------------
    backbone: dict[str, Any] | None = field(
        default=None,
        metadata={
            "help": "Filled in when the adapter is created: the backbone it was built for, as {'model_type', "
            "'text_model_type', 'vision_model_type', 'text_width', 'vision_width', 'text_depth', 'vision_depth'}. "
            "Loading the adapter onto a backbone that differs in any of them raises a ValueError naming both. "
            "Leave it None (adapters saved without it are not checked)."
        },
    )
    modules_to_save: list[str] | None = field(
        default_factory=lambda: ["classifier"],
        metadata={"help": "Modules of the task model trained and saved with the adapter (the classification head)."},
    )

    # ---- The head this adapter was trained with (docs/sharing.md) ------------------------------------------------
    num_labels: int | None = field(
        default=None,
        metadata={
            "help": "Filled in when the adapter is created: the size of the task model's classification head. "
            "Loading checks it against the base model, and `peft_mitp.load_adapter_model` / `AutoPeftModel` use it "
            "to build the right head around a bare dual-encoder checkpoint. Leave it None."
        },
    )
    id2label: dict[int, str] | None = field(
        default=None,
        metadata={"help": "Filled in when the adapter is created: the class names, when the task model has real "
                  "ones (None for transformers' default 'LABEL_i' names). Leave it None."},
    )
    problem_type: str | None = field(
        default=None,
        metadata={"help": "Filled in when the adapter is created: the task model's `problem_type` (None or "
                  "'single_label_classification': cross-entropy; 'multi_label_classification': BCE). Leave it None."},
    )

    # ---- Missing modalities (docs/reliability.md, "Missing modalities") ------------------------------------------
    missing_modality: bool = field(
        default=False,
        metadata={
            "help": "Let a sample lack its image or its text. The adapter then holds learned stand-ins (in its memory "
            "hub) for the missing tower's prompt read-outs at every interaction pair and for its pooled feature; "
            "forward accepts `image_present` / `text_present` masks or `pixel_values=None` / `input_ids=None`. "
            "Off: no extra parameters and every sample needs both modalities."
        },
    )
    modality_dropout: float = field(
        default=0.0,
        metadata={
            "help": "Training only, with `missing_modality=True`: the probability that a sample with both "
            "modalities loses one of them (image or text, equally likely; never both) for a training step, so the "
            "stand-ins and the head learn to cope with a missing modality. 0.1 to 0.3 is a useful range when "
            "modalities go missing at inference time."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = MITPPeftType.MITP
        for name in ("prompt_length", "num_interaction_layers", "hub_dim", "token_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer (>= 1), got {value!r}.")
        value = self.fusion_hidden_size
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise ValueError(
                f"`fusion_hidden_size` must be an integer >= 0 (0: no fusion MLP) or None, got {value!r}."
            )
        if self.token_consolidation is not None and not isinstance(self.token_consolidation, bool):
            raise ValueError(f"`token_consolidation` must be True, False or None, got {self.token_consolidation!r}.")
        if self.token_consolidation and not self.interaction:
            raise ValueError(
                "`token_consolidation=True` compares the two towers' tokens, which is a cross-modal interaction: it "
                "needs `interaction=True`. Leave it None (or False) for the `interaction=False` ablation."
            )
        if self.token_consolidation and self.hub_dim % self.token_heads:
            raise ValueError(
                f"`hub_dim`={self.hub_dim} must be divisible by `token_heads`={self.token_heads} (each head takes "
                "an equal slice of the hub's shared space)."
            )
        for name in ("temperature", "prompt_init_std", "modality_dropout", "memory_gate_init"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ValueError(f"`{name}` must be a number, got {value!r}.")
        if self.vision_prompt_length is not None and (
            not isinstance(self.vision_prompt_length, int) or self.vision_prompt_length < 1
        ):
            raise ValueError(
                f"`vision_prompt_length` must be a positive integer or None, got {self.vision_prompt_length!r}."
            )
        self.text_layers = _check_layer_list("text_layers", self.text_layers)
        self.vision_layers = _check_layer_list("vision_layers", self.vision_layers)
        if (
            self.text_layers is not None
            and self.vision_layers is not None
            and len(self.text_layers) != len(self.vision_layers)
        ):
            raise ValueError(
                f"`vision_layers` has {len(self.vision_layers)} entries but `text_layers` has "
                f"{len(self.text_layers)}: interaction pair k joins text_layers[k] with vision_layers[k], so give "
                "both lists the same length (or leave one None to derive it)."
            )
        if self.similarity not in SIMILARITIES:
            raise ValueError(f"`similarity`={self.similarity!r} is unknown; choose one of {list(SIMILARITIES)}.")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"`activation`={self.activation!r} is unknown; choose one of {list(ACTIVATIONS)}.")
        if self.consolidation not in CONSOLIDATIONS:
            raise ValueError(
                f"`consolidation`={self.consolidation!r} is unknown; choose one of {list(CONSOLIDATIONS)}."
            )
        if isinstance(self.gate_init, bool) or not isinstance(self.gate_init, (int, float)) or self.gate_init != self.gate_init:
            raise ValueError(f"`gate_init` must be a number, got {self.gate_init!r}.")
        self.gate_init = float(self.gate_init)
        if self.temperature is not None and not self.temperature > 0:
            raise ValueError(f"`temperature` must be > 0 (or None for the default), got {self.temperature!r}.")
        if not self.prompt_init_std >= 0:
            raise ValueError(f"`prompt_init_std` must be >= 0, got {self.prompt_init_std!r}.")
        for name in ("interaction", "memory", "missing_modality", "inference_mode"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"`{name}` must be True or False, got {getattr(self, name)!r}.")
        for name in ("target_modules", "modules_to_save"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, str)
                or not isinstance(value, (list, tuple, set))
                or not all(isinstance(v, str) for v in value)
            ):
                raise ValueError(f"`{name}` must be a list of module names or None, got {value!r}.")
        if self.backbone is not None and not isinstance(self.backbone, dict):
            raise ValueError(
                f"`backbone` is filled in when the adapter is created (a record of the backbone's shape), got "
                f"{self.backbone!r}; leave it None. The checkpoint to build on is the task model's, not a config field."
            )
        if self.problem_type is not None and self.problem_type not in PROBLEM_TYPES:
            raise ValueError(
                f"`problem_type`={self.problem_type!r} is not supported; use None or one of {list(PROBLEM_TYPES)}."
            )
        # The recorded head (docs/sharing.md); JSON turns id2label's int keys into strings.
        if self.num_labels is not None and (
            not isinstance(self.num_labels, int) or isinstance(self.num_labels, bool) or self.num_labels < 1
        ):
            raise ValueError(f"`num_labels` must be a positive integer or None, got {self.num_labels!r}.")
        if self.id2label is not None:
            if not isinstance(self.id2label, dict):
                raise ValueError(f"`id2label` must be a dict {{class index: name}} or None, got {self.id2label!r}.")
            try:
                self.id2label = {int(k): str(v) for k, v in self.id2label.items()}
            except ValueError:
                raise ValueError(f"`id2label` keys must be class indices, got {sorted(self.id2label)!r}.") from None
            if self.num_labels is not None and len(self.id2label) != self.num_labels:
                raise ValueError(f"`num_labels`={self.num_labels} but `id2label` has {len(self.id2label)} entries.")
        # Missing modalities.
        if isinstance(self.modality_dropout, bool) or not 0.0 <= self.modality_dropout <= 1.0:
            raise ValueError(f"`modality_dropout` must lie in [0, 1], got {self.modality_dropout!r}.")
        if self.modality_dropout > 0 and not self.missing_modality:
            raise ValueError(
                f"`modality_dropout`={self.modality_dropout} drops modalities, which needs the stand-ins of "
                "`missing_modality=True`: set both (or leave `modality_dropout` at 0)."
            )

    @property
    def text_prompt_length(self) -> int:
        """Number of prompts in the text tower."""
        return self.prompt_length

    @property
    def vision_prompts(self) -> int:
        """Number of prompts in the vision tower."""
        return self.vision_prompt_length or self.prompt_length

    @property
    def effective_temperature(self) -> float:
        """The temperature in use: the configured one, or the similarity's default."""
        if self.temperature is not None:
            return float(self.temperature)
        return 0.1 if self.similarity == "cosine" else 1.0

    # ---- Loading checks (docs/reliability.md, "Loading checks") ------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        subfolder: str | None = None,
        check_weights: bool = True,
        **kwargs: Any,
    ) -> MITPConfig:
        """Load an MITP adapter's config, refusing what peft would otherwise accept quietly.

        peft calls this from `PeftModel.from_pretrained` and `PeftModel.load_adapter`, before it reads the adapter's
        weights. On top of peft's loading, it refuses:

        - an `adapter_config.json` of another peft method (peft would hand back, say, a `LoraConfig`);
        - fields this version of `MITPConfig` does not know (peft would drop them with a warning);
        - with `check_weights`, an adapter whose `adapter_model.safetensors` is missing, truncated, or present only as
          a pickled `adapter_model.bin` (see `peft_mitp.adapter_files.check_adapter_weights`), or whose memory hub lacks the
          gates this version's hub has (`peft_mitp.adapter_files.check_hub_weights`).

        Args:
            pretrained_model_name_or_path: a local adapter directory or a Hub repo id.
            subfolder: the adapter's subfolder inside it, if any.
            check_weights: also check the weights file (default True). Pass False to read the config of a directory
                that holds no weights.
            **kwargs: as for `peft.PeftConfig.from_pretrained` (`revision`, `token`, `cache_dir`, ...).

        Returns:
            The `MITPConfig`.

        Raises:
            ValueError: the config belongs to another peft method, or the weights file is not a complete safetensors
                file or is a pickle.
            TypeError: the config has fields `MITPConfig` does not know.
            FileNotFoundError: with `check_weights`, there is no `adapter_model.safetensors`.
        """
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        if not isinstance(config, MITPConfig):
            where = os.path.join(str(pretrained_model_name_or_path), subfolder or "").rstrip("/")
            peft_type = getattr(config.peft_type, "value", config.peft_type)
            raise ValueError(
                f"{where}/adapter_config.json describes a {peft_type} adapter, not an MITP one. Load it with "
                f"`peft.PeftModel.from_pretrained(<the model it was trained on>, {where!r})` (peft picks "
                "the method from the file), or point to a directory saved from an MITP adapter."
            )
        if check_weights:
            path = check_adapter_weights(pretrained_model_name_or_path, subfolder=subfolder, **cls._split_kwargs(kwargs)[0])
            check_hub_weights(path, config.interaction)
            adapt_legacy_hub(path, config)
        return config


# ---- Unknown fields (docs/reliability.md, "Loading checks") --------------------------------------------------------
# peft's `PeftConfig.from_peft_type` catches "got an unexpected keyword argument", drops the unknown keys of an
# `adapter_config.json` and only warns. An MITP field this version does not know may change what the adapter computes
# (a newer release's option, a hand edit), so MITP refuses it with its own TypeError, which peft re-raises.
def _refuse_unknown_fields(init: Any) -> Any:
    @functools.wraps(init)
    def __init__(self: MITPConfig, *args: Any, **kwargs: Any) -> None:
        known = {f.name for f in fields(type(self)) if f.init}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            hints = []
            for name in unknown:
                close = difflib.get_close_matches(name, sorted(known), n=1)
                hints.append(f"{name!r} (did you mean {close[0]!r}?)" if close else repr(name))
            raise TypeError(
                f"{type(self).__name__} has no field(s) {', '.join(hints)} (docs/api.md lists its fields). An "
                "adapter_config.json with fields this version of peft_mitp does not know was saved by a newer "
                "peft_mitp or edited by hand: upgrade peft_mitp (`pip install -U peft-mitp`), or delete those keys "
                "from the file if you are sure they do not matter. MITP does not drop them silently, since they may "
                "change what the adapter computes."
            )
        init(self, *args, **kwargs)

    return __init__


MITPConfig.__init__ = _refuse_unknown_fields(MITPConfig.__init__)
