"""Baselines MITP is compared with (benchmark code, not part of `peft_mitp`): see docs/benchmarks.md."""

from .common import DualEncoderClassifier, classification_output, init_linear, split_inputs
from .early_fusion import EarlyFusionForImageTextClassification
from .pmf import PMFExchange, PMFForImageTextClassification, PMFLayer

__all__ = [
    "DualEncoderClassifier",
    "EarlyFusionForImageTextClassification",
    "PMFExchange",
    "PMFForImageTextClassification",
    "PMFLayer",
    "classification_output",
    "init_linear",
    "split_inputs",
]
