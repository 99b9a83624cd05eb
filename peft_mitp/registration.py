"""The one place that registers MITP with peft.

peft has no entry points and its `PeftType` is a closed enum, so `register_peft_method` refuses a third-party name.
The plugin fills peft's lookup tables itself, keyed by `MITPPeftType.MITP` (a `str` enum member equal to "MITP").
"""

from __future__ import annotations

import warnings

from peft import mapping as peft_mapping

from .config import MITPConfig, MITPPeftType
from .model import MITPModel

PREFIX = "mitp_"


def register() -> None:
    """Register MITP with peft; safe to call any number of times.

    After this, `get_peft_model`, `PeftConfig.from_pretrained`, `PeftModel.from_pretrained` and
    `AutoPeftModel.from_pretrained` understand `"peft_type": "MITP"`. `import peft_mitp` calls it.

    Warns (`UserWarning`) when a private peft / transformers name MITP relies on has moved
    (`peft_mitp.internals.missing_internals`): MITP would then misbehave in the way the warning names.

    Raises:
        RuntimeError: another method already uses the prefix `mitp_` or the type `MITP`.
    """
    from .internals import missing_internals

    for problem in missing_internals():
        warnings.warn(
            f"peft_mitp depends on a private name that this peft / transformers release changed: {problem}. "
            "Install the versions pinned in peft_mitp's pyproject.toml, or a peft_mitp release made for yours.",
            stacklevel=2,
        )
    registered_config = peft_mapping.PEFT_TYPE_TO_CONFIG_MAPPING.get(MITPPeftType.MITP)
    if registered_config is MITPConfig and peft_mapping.PEFT_TYPE_TO_TUNER_MAPPING.get(MITPPeftType.MITP) is MITPModel:
        return
    if registered_config is not None and registered_config.__module__ != MITPConfig.__module__:
        raise RuntimeError(
            f"peft already has a method registered as 'MITP' ({registered_config.__module__}); "
            "uninstall the other plugin or import only one of them."
        )
    for peft_type, prefix in peft_mapping.PEFT_TYPE_TO_PREFIX_MAPPING.items():
        # peft's own uniqueness check compares against the wrong side of the dict, so check the prefix here.
        if prefix == PREFIX and peft_type != MITPPeftType.MITP:
            raise RuntimeError(f"The parameter prefix {PREFIX!r} is already used by peft method {peft_type!r}.")
    peft_mapping.PEFT_TYPE_TO_CONFIG_MAPPING[MITPPeftType.MITP] = MITPConfig
    peft_mapping.PEFT_TYPE_TO_TUNER_MAPPING[MITPPeftType.MITP] = MITPModel
    peft_mapping.PEFT_TYPE_TO_PREFIX_MAPPING[MITPPeftType.MITP] = PREFIX

