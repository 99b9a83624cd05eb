"""peft_mitp: MITP (Memory-Inspired Temporal Prompt Interaction) as a Hugging Face PEFT method.

`import peft_mitp` registers MITP with peft; after that `peft.get_peft_model`, `PeftModel.from_pretrained` and
`PeftConfig.from_pretrained` understand `"peft_type": "MITP"`.
"""

from .config import MITPConfig, MITPPeftType
from .families import BackboneFamily, TowerSpec, UnsupportedBackboneError, register_family, supported_model_types
from .hub import HubOutput, MemoryHub
from .layer import MITPLayer
from .lockstep import LockstepError
from .model import MITPModel
from .modeling import MITPForImageTextClassification, MITPTaskConfig
from .registration import register

register()

__version__ = "0.1.0"

__all__ = [
    "BackboneFamily",
    "HubOutput",
    "LockstepError",
    "MITPConfig",
    "MITPForImageTextClassification",
    "MITPLayer",
    "MITPModel",
    "MITPPeftType",
    "MITPTaskConfig",
    "MemoryHub",
    "TowerSpec",
    "UnsupportedBackboneError",
    "register",
    "register_family",
    "supported_model_types",
]
