"""Quantized frozen backbones (QLoRA-style): the backbone stored and run in 8 bits, the adapter in full precision.

MITP trains nothing in the backbone, so its encoder layers' linear weights can be quantized while the prompts, the
memory hub and the head stay float32. Two backends are supported (docs/reliability.md, "Quantized backbones"):

- **torchao** int8 weight-only (`torchao.quantization.Int8WeightOnlyConfig`, CPU and GPU): `quantize_backbone` quantizes
  the linear layers inside both towers' encoder layers of a model in memory; `from_pretrained(...,
  quantization_config=TorchAoConfig(...))` loads the checkpoint and does the same. (transformers' own torchao loading
  cannot run on dual encoders: it asks `VisionTextDualEncoderModel` for input embeddings it does not have, and
  stumbles on CLIP's bias-free projections.)
- **bitsandbytes** 8-bit (`BitsAndBytesConfig(load_in_8bit=True)`, its CPU backend here, CUDA where a GPU is lent):
  passed to transformers' loading, with the modules outside the encoder layers (projections, poolers, the offline
  backbone's CNN stem) kept in full precision.
"""

from __future__ import annotations

import copy
import tempfile
from typing import Any

import torch
from torch import nn

__all__ = [
    "TORCHAO_LINEAR_TYPES",
    "quantization_config",
    "quantize_backbone",
    "quantized_linear_count",
    "skip_modules_outside_layers",
]

TORCHAO_LINEAR_TYPES = ("Int8WeightOnlyConfig", "Int8DynamicActivationInt8WeightConfig")
"""torchao configs `quantize_backbone` accepts (weight-only int8 runs on CPU; dynamic int8 needs int8 matmuls)."""


def quantization_config(name: str) -> Any:
    """The transformers quantization config of a `mitp train --quantization` name (None for "none").

    Raises:
        ValueError: an unknown name.
    """
    if name == "none":
        return None
    from transformers import BitsAndBytesConfig, TorchAoConfig

    if name == "int8":
        from torchao.quantization import Int8WeightOnlyConfig

        return TorchAoConfig(Int8WeightOnlyConfig())
    if name == "bnb-int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    if name == "bnb-nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    raise ValueError(f"Unknown quantization {name!r}; use 'none', 'int8', 'bnb-int8' or 'bnb-nf4'.")


def _encoder_linears(task_model: nn.Module) -> dict[str, nn.Linear]:
    """The `nn.Linear` modules inside the towers' encoder layers, by name relative to the task model."""
    towers = task_model.mitp_towers()
    found: dict[str, nn.Linear] = {}
    for tower in towers.values():
        for index, layer in enumerate(tower.layers):
            for name, module in layer.named_modules():
                if isinstance(module, nn.Linear) and "mitp_" not in name:
                    found[f"{tower.layers_path}.{index}.{name}"] = module
    return found


def quantize_backbone(task_model: nn.Module, config: Any = None) -> nn.Module:
    """Quantize the linear layers of both towers' encoder layers in place with torchao; the rest stays as it is.

    Call it on an `MITPForImageTextClassification` (before or after `get_peft_model`). Only frozen backbone weights
    are touched: prompts, the memory hub and the head stay in their dtype, so training and saving work as on a
    full-precision backbone.

    Args:
        task_model: the task model (or its `PeftModel`).
        config: a torchao config (`torchao.quantization.Int8WeightOnlyConfig()`, the default), or a
            `transformers.TorchAoConfig` (its `quant_type` is used).

    Returns:
        `task_model`.

    Raises:
        ImportError: torchao is not installed (`pip install torchao`).
        TypeError: `config` is not a torchao config MITP has tested.
        ValueError: a weight to quantize is trainable (quantize only a frozen backbone).
    """
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError as error:
        raise ImportError("Quantizing a backbone with torchao needs `pip install torchao`.") from error
    base = task_model.get_base_model() if hasattr(task_model, "get_base_model") else task_model
    if not hasattr(base, "mitp_towers"):
        raise TypeError(
            f"`quantize_backbone` takes an `MITPForImageTextClassification` (or its PeftModel), got "
            f"{type(task_model).__name__}."
        )
    if config is None:
        config = Int8WeightOnlyConfig()
    config = getattr(config, "quant_type", config)
    if type(config).__name__ not in TORCHAO_LINEAR_TYPES:
        raise TypeError(
            f"MITP quantizes backbones with torchao's {' or '.join(TORCHAO_LINEAR_TYPES)}, got "
            f"{type(config).__name__}. Use `torchao.quantization.Int8WeightOnlyConfig()` (runs on CPU and GPU)."
        )
    targets = _encoder_linears(base)
    trainable = [name for name, module in targets.items() if module.weight.requires_grad]
    if trainable:
        raise ValueError(
            f"{len(trainable)} of the weights to quantize are trainable (e.g. {trainable[0]}): quantize a frozen "
            "backbone only (MITP trains no backbone weight)."
        )
    chosen = set(map(id, targets.values()))
    quantize_(base, config, filter_fn=lambda module, _name: id(module) in chosen)
    return task_model


def quantized_linear_count(model: nn.Module) -> int:
    """How many linear layers of `model` hold quantized weights (torchao tensor subclasses or bitsandbytes)."""
    count = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        quantized = weight is not None and (
            type(weight) not in (torch.Tensor, nn.Parameter) or weight.dtype in (torch.int8, torch.uint8)
        )
        if isinstance(module, nn.Linear) and quantized:
            count += 1
    return count


def skip_modules_outside_layers(model_type: str) -> list[str]:
    """Module names bitsandbytes must keep in full precision for MITP: everything that is not an encoder layer.

    bitsandbytes quantizes every `nn.Linear` it finds (and the offline backbone's convolutional stem would break);
    MITP needs only the encoder layers quantized, and the projections feed the head.
    """
    names = ["visual_projection", "text_projection", "pooler", "pooler.dense", "head", "logit_scale"]
    if model_type == "vision-text-dual-encoder":
        names += ["stem", "projection"]
    return names


def load_quantized(
    name_or_path: Any, quantization_config: Any, config: Any, load: Any, **kwargs: Any
) -> nn.Module:
    """Load a backbone with a bitsandbytes config: transformers' loading, outside modules kept in full precision.

    Args:
        name_or_path: checkpoint, as for `from_pretrained`.
        quantization_config: a `transformers.BitsAndBytesConfig`.
        config: the checkpoint's config.
        load: `AutoModel.from_pretrained`.
        **kwargs: the other loading keywords.

    Raises:
        ValueError: the backend could not load this family (the message names what works).
    """
    quantization_config = copy.deepcopy(quantization_config)  # the caller's config stays as it was
    skip = list(getattr(quantization_config, "llm_int8_skip_modules", None) or [])
    quantization_config.llm_int8_skip_modules = sorted(set(skip) | set(skip_modules_outside_layers(config.model_type)))
    try:
        return load(name_or_path, config=config, quantization_config=quantization_config, **kwargs)
    except (RuntimeError, ValueError, ImportError, NotImplementedError) as error:
        raise ValueError(
            f"Loading the {config.model_type!r} checkpoint {name_or_path} with {type(quantization_config).__name__} "
            f"failed: {error}. What MITP has run: bitsandbytes 8-bit (`BitsAndBytesConfig(load_in_8bit=True)`) on "
            "CPU and GPU, and torchao int8 weight-only (`TorchAoConfig(Int8WeightOnlyConfig())`, or load without "
            "quantization and call `peft_mitp.quantize_backbone(task_model)`)."
        ) from error


def saved_for_quantized_loading(backbone: nn.Module) -> tempfile.TemporaryDirectory:
    """Save an in-memory backbone to a temporary folder, so bitsandbytes can load it quantized (the offline one)."""
    folder = tempfile.TemporaryDirectory(prefix="mitp-quantize-")
    backbone.save_pretrained(folder.name)
    return folder
