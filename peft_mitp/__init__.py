"""peft_mitp: MITP (Memory-Inspired Temporal Prompt Interaction) as a Hugging Face PEFT method.

`import peft_mitp` registers MITP with peft; after that `peft.get_peft_model`, `PeftModel.from_pretrained` and
`PeftConfig.from_pretrained` understand `"peft_type": "MITP"`.
"""

from .card import write_model_card
from .config import MITPConfig, MITPPeftType
from .families import (
    BackboneFamily,
    TokenArgument,
    TowerSpec,
    UnsupportedBackboneError,
    register_family,
    supported_model_types,
)
from .fsdp import fsdp_layer_classes, prepare_fsdp
from .hub import HubOutput, MemoryHub
from .layer import MITPLayer
from .lockstep import LockstepError
from .model import MITPModel
from .modeling import MITPForImageTextClassification, MITPTaskConfig
from .processing import ImageTextProcessor, load_processor
from .quantization import quantize_backbone
from .registration import register
from .remote import HubUnreachableError
from .sharing import install_hooks, load_adapter_model, push_adapter_to_hub, save_adapter

register()

__version__ = "0.1.0"

__all__ = [
    "BackboneFamily",
    "HubOutput",
    "HubUnreachableError",
    "ImageTextProcessor",
    "LockstepError",
    "MITPConfig",
    "MITPForImageTextClassification",
    "MITPLayer",
    "MITPModel",
    "MITPPeftType",
    "MITPTaskConfig",
    "MemoryHub",
    "TokenArgument",
    "TowerSpec",
    "UnsupportedBackboneError",
    "fsdp_layer_classes",
    "install_hooks",
    "quantize_backbone",
    "load_adapter_model",
    "load_processor",
    "prepare_fsdp",
    "push_adapter_to_hub",
    "register",
    "register_family",
    "save_adapter",
    "supported_model_types",
    "write_model_card",
]
