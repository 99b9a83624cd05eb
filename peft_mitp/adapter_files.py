"""Checks of an adapter's files before peft reads them: safetensors only, complete, and a hub this version computes.

`MITPConfig.from_pretrained` runs them, so `PeftModel.from_pretrained` and `PeftModel.load_adapter` (and Trainer's
`resume_from_checkpoint`, which loads through them) refuse a bad adapter with an error naming the file. This module
imports nothing of the tuner, so the config can use it without an import circle.
"""

from __future__ import annotations

import os
from contextlib import suppress
from typing import Any

__all__ = ["adapt_legacy_hub", "check_adapter_weights", "check_hub_weights"]


def check_adapter_weights(
    model_id: str | os.PathLike, subfolder: str | None = None, **hub_kwargs: Any
) -> str:
    """Check that an adapter's weights are a complete `adapter_model.safetensors`, and return its local path.

    peft's own loading would fall back to a pickled `adapter_model.bin` (read with `torch.load(weights_only=True)`),
    fail on a missing local file with a Hub repo-id validation error, and report a truncated file without naming it.
    MITP loads weights from safetensors only, so this refuses all three with an error naming the file.
    `MITPConfig.from_pretrained` calls it, so `PeftModel.from_pretrained` and `PeftModel.load_adapter` check before
    peft reads the weights.

    Args:
        model_id: a local adapter directory or a Hub repo id (the file is downloaded into the cache, where peft finds
            it next).
        subfolder: the adapter's subfolder inside it, if any.
        **hub_kwargs: passed to `huggingface_hub.hf_hub_download` for a Hub repo (`revision`, `token`, `cache_dir`,
            ...).

    Returns:
        The local path of `adapter_model.safetensors`.

    Raises:
        FileNotFoundError: there is no `adapter_model.safetensors`.
        ValueError: there is only a pickled `adapter_model.bin`, or the safetensors file is incomplete (truncated) or
            not a safetensors file.
    """
    from huggingface_hub import file_exists, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError
    from peft.utils.constants import SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME
    from safetensors import SafetensorError, safe_open

    local = os.path.join(model_id, subfolder) if subfolder else os.fspath(model_id)
    refuse_pickle = (
        f"{{where}} holds only a pickled `{WEIGHTS_NAME}`. MITP loads adapter weights from safetensors only "
        f"(pickle files can run code when loaded). Convert it where you trust it: `safetensors.torch.save_file("
        f"torch.load('{WEIGHTS_NAME}', weights_only=True), '{SAFETENSORS_WEIGHTS_NAME}')`, or save the adapter again "
        "with `model.save_pretrained(...)` (safetensors is its default)."
    )
    if os.path.isdir(local):
        path = os.path.join(local, SAFETENSORS_WEIGHTS_NAME)
        if not os.path.isfile(path):
            if os.path.isfile(os.path.join(local, WEIGHTS_NAME)):
                raise ValueError(refuse_pickle.format(where=f"The adapter directory {local}"))
            raise FileNotFoundError(
                f"The adapter directory {local} has no `{SAFETENSORS_WEIGHTS_NAME}` (it holds "
                f"{sorted(os.listdir(local))}). Save the adapter with `model.save_pretrained({local!r})`, or copy the "
                "whole directory it was saved to, weights included."
            )
    else:
        try:
            path = hf_hub_download(os.fspath(model_id), SAFETENSORS_WEIGHTS_NAME, subfolder=subfolder, **hub_kwargs)
        except EntryNotFoundError as exc:
            in_repo = f"{subfolder}/{WEIGHTS_NAME}" if subfolder else WEIGHTS_NAME
            pickled = False
            with suppress(Exception):  # offline or unreachable: report the missing safetensors file
                pickled = file_exists(
                    os.fspath(model_id),
                    in_repo,
                    revision=hub_kwargs.get("revision"),
                    repo_type=hub_kwargs.get("repo_type"),
                    token=hub_kwargs.get("token"),
                )
            if pickled:
                raise ValueError(refuse_pickle.format(where=f"The Hub repo {model_id}")) from exc
            raise FileNotFoundError(
                f"No `{SAFETENSORS_WEIGHTS_NAME}` found for the adapter {model_id!r}"
                f"{f' (subfolder {subfolder!r})' if subfolder else ''}: {type(exc).__name__}. Push the adapter with "
                "`model.push_to_hub(...)`, or check the repo id, the revision and, offline, the local cache."
            ) from exc
    try:
        with safe_open(path, framework="pt") as weights:
            count = len(list(weights.keys()))
    except (SafetensorError, OSError) as exc:
        raise ValueError(
            f"{path} is not a complete safetensors file ({exc}). It was probably truncated by an interrupted save, "
            "copy or download: save or download the adapter again."
        ) from exc
    if count == 0:
        raise ValueError(f"{path} holds no tensors: save the adapter again with `model.save_pretrained(...)`.")
    return path


_HUB_GATES = ("text_gate", "vision_gate")


def check_hub_weights(path: str, interaction: bool) -> None:
    """Refuse an adapter file whose memory hub lacks the gates this version's hub has (`MemoryHub`).

    Before the hub's generated term was normalised and gated (docs/method.md), a hub had no gates; peft would load such
    a file with a warning and leave the gates at zero, silently turning the adapter into one without interaction.

    Args:
        path: the local `adapter_model.safetensors` (as `check_adapter_weights` returns it).
        interaction: the adapter config's `interaction` (a hub without interaction has no maps and no gates).

    Raises:
        ValueError: the file holds hub maps but not both gates.
    """
    from safetensors import safe_open

    if not interaction:
        return
    with safe_open(path, framework="pt") as weights:
        keys = list(weights.keys())
    hub_keys = [key for key in keys if ".mitp_hub." in key]
    # A decoder VLM's hub (direction vision -> language) has no vision generation map and no vision gate; a hub with one
    # pair has no generation maps at all (only the maps of its token consolidation).
    both = any(".mitp_hub.vision_out." in key for key in hub_keys)
    generates = any(".mitp_hub.text_out." in key for key in hub_keys)
    gates = _HUB_GATES if both else _HUB_GATES[:1]
    missing = [gate for gate in gates if not any(key.endswith(f"mitp_hub.{gate}") for key in hub_keys)]
    if generates and missing:
        raise ValueError(
            f"{path} holds a memory hub without {missing}: it was saved by a peft_mitp version from before the hub's "
            "generated term was normalised and gated, and this version's hub computes something else with it "
            "(docs/method.md, the generation step). Train the adapter again with this version."
        )


def adapt_legacy_hub(path: str, config: Any) -> bool:
    """Make `config` describe the hub an adapter saved before the hub's read-out to the head was added (2026-12-02).

    Such a file has neither read-out tensors nor memory gates. Loaded with this version's defaults, the new
    tensors would stay at their initial values (peft only warns about missing keys) and change what the adapter
    computes. So its config is set to what that version ran: no token consolidation, no fusion MLP, read-outs carried
    whole without memory gates. The adapter then computes exactly what it computed when it was saved.

    Args:
        path: the local `adapter_model.safetensors`.
        config: the adapter's `MITPConfig` (changed in place).

    Returns:
        Whether the config was changed.
    """
    from safetensors import safe_open

    with safe_open(path, framework="pt") as weights:
        keys = list(weights.keys())
    hub_keys = [key for key in keys if ".mitp_hub." in key]
    if any(".mitp_hub.readout." in key or "_memory_gate" in key for key in hub_keys):
        return False
    # (A file of this version without either, e.g. `fusion_hidden_size=0` with one pair, gets the values it has.)
    if config.token_consolidation is False and config.fusion_hidden_size == 0 and config.memory_gate_init is None:
        return False
    config.token_consolidation = False
    config.fusion_hidden_size = 0
    config.memory_gate_init = None
    return True
