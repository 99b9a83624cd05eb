"""Sharing MITP adapters: the plugin's model card on save and push, half-precision files, one-call loading.

peft has no hook for a method's model card, and `PeftModel.push_to_hub` is transformers' `PushToHubMixin.push_to_hub`,
which saves into a temporary folder and then overwrites README.md with the card already on the Hub or a generic
transformers template. `install_hooks` therefore wraps four `PeftModel` methods, and only for models whose adapters are
MITP adapters; every other model goes to peft's own code unchanged. It runs when the first MITP adapter is created
(`MITPModel.inject_adapter`), not at `import peft_mitp`, so importing the plugin changes no peft class:

- `create_or_update_model_card` (called by `save_pretrained` and by `Trainer.create_model_card`) writes the MITP card
  (`peft_mitp.card.write_model_card`) instead of peft's template;
- `save_pretrained` writes safetensors even when asked for `safe_serialization=False` (with a warning): peft would
  write a pickled `adapter_model.bin`, which MITP's loading refuses;
- `push_to_hub` becomes `push_adapter_to_hub`: save, write the card, upload with `huggingface_hub`;
- `load_adapter` runs MITP's adapter-file checks also when loading into an existing adapter name (Trainer's
  `resume_from_checkpoint`).

Each wrapper keeps the signature of the method it wraps (`inspect.signature` shows the original's).

A subclass of `PeftModel` would not do: `get_peft_model` and `PeftModel.from_pretrained` return plain `PeftModel`s.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import tempfile
import warnings
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import CommitInfo, HfApi, ModelCard
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, RevisionNotFoundError
from peft import PeftConfig, PeftModel
from safetensors.torch import load_file, save_file
from torch import nn

from .adapter_files import check_adapter_weights, check_hub_weights
from .card import TRAINING_INFO_FILE, read_training_info, write_model_card
from .config import MITPConfig
from .modeling import MITPForImageTextClassification
from .remote import check_hub_reachable

ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
_SAVE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Training details last seen by `save_pretrained` (from its folder's mitp_training.json) or passed to a save or push,
# per model: a later `push_to_hub` of the same model carries them (the CLI saves, then pushes).
_TRAINING_INFO: weakref.WeakKeyDictionary[nn.Module, dict[str, Any]] = weakref.WeakKeyDictionary()


def is_mitp_model(model: Any) -> bool:
    """Whether `model` is a `PeftModel` whose adapters are MITP adapters."""
    configs = getattr(model, "peft_config", None)
    return isinstance(configs, Mapping) and any(isinstance(c, MITPConfig) for c in configs.values())


# ---------------------------------------------------------------------------------------------------- the head
def sync_adapter_head(task_model: nn.Module, config: MITPConfig) -> None:
    """Record the task model's head in a new adapter's config, or check (and if needed size) it for a loaded one.

    Called by `MITPModel` when an adapter is injected. A new adapter (`config.num_labels` None) records `num_labels`,
    `id2label` (real names only) and `problem_type`, so the adapter file says which head it needs. A loaded adapter
    sizes a placeholder head (`MITPForImageTextClassification.from_pretrained` without `num_labels`, as
    `AutoPeftModel` builds it); on a real head of another size it gets its own head copy of its size (adapters on one
    task model may have heads of different sizes), and it is refused, with the fix, on another problem type.

    Raises:
        ValueError: a new adapter on a placeholder head, or a loaded adapter of another problem type.
    """
    pending = getattr(task_model, "mitp_head_pending", False)
    head = task_model.config
    if config.num_labels is None:
        if pending:
            raise ValueError(
                "The task model's classification head is a placeholder: it was built by "
                "`MITPForImageTextClassification.from_pretrained(...)` without `num_labels`. To create a new "
                "adapter, pass `num_labels=` (or `id2label=`) there; a trained adapter loaded with "
                "`PeftModel.from_pretrained` brings its own head size."
            )
        config.num_labels = head.num_labels
        names = head.id2label or {}
        real_names = any(name != f"LABEL_{i}" for i, name in names.items())
        config.id2label = {int(i): name for i, name in names.items()} if real_names else None
        config.problem_type = head.problem_type
        return
    if pending:
        task_model.set_head(config.num_labels, id2label=config.id2label, problem_type=config.problem_type)
        return
    single = "single_label_classification"
    if (head.problem_type or single) != (config.problem_type or single):
        raise ValueError(
            f"This MITP adapter was trained as {config.problem_type or single} with {config.num_labels} labels, but "
            f"the task model's head is {head.problem_type or single}. Build the base with "
            f"`num_labels={config.num_labels}`"
            + (f", problem_type={config.problem_type!r}" if config.problem_type else "")
            + ", or let `peft_mitp.load_adapter_model(adapter)` build it. Adapters on one task model may differ in "
            "head size but share its problem type."
        )
    # Another head size is fine: the adapter's own copy of the head is sized to it (`MITPModel.inject_adapter`).


# ---------------------------------------------------------------------------------------------------- saving
def _match_config_permissions(save_directory: str | os.PathLike[str]) -> None:
    """Give each adapter weight file in the folder the permissions of the `adapter_config.json` beside it.

    safetensors writes through a private temporary file (mode 600) that it renames; every other file of the adapter
    gets the user's umask (usually 644), so a shared adapter folder would hold weights that only the owner can read.
    """
    folder = Path(save_directory)
    for weights in (*folder.glob(ADAPTER_WEIGHTS_NAME), *folder.glob(f"*/{ADAPTER_WEIGHTS_NAME}")):
        config = weights.with_name("adapter_config.json")
        if config.exists():
            os.chmod(weights, config.stat().st_mode & 0o777)


def save_adapter(
    model: PeftModel,
    save_directory: str | os.PathLike[str],
    *,
    dtype: torch.dtype | None = torch.bfloat16,
    selected_adapters: list[str] | None = None,
    training_info: str | os.PathLike[str] | Mapping[str, Any] | None = None,
) -> list[Path]:
    """Save an MITP adapter like `model.save_pretrained`, with its tensors stored in `dtype` (half the file in bf16).

    peft 0.21's `save_pretrained` has no dtype option: this saves normally, then rewrites each adapter file with its
    floating-point tensors cast to `dtype`. Loading casts them back: the prompts and the hub to float32 (as every MITP
    adapter is kept), the head to the task model's dtype, with `PeftModel.from_pretrained` (also with
    `low_cpu_mem_usage=True`), `load_adapter` or `load_adapter_model`.

    Args:
        model: the `PeftModel` holding the MITP adapter(s).
        save_directory: the folder; "default" goes to its top level, other adapters to subfolders named after them.
        dtype: `torch.bfloat16` (default; float32's range, so no overflow), `torch.float16`, `torch.float32`, or
            None (keep the adapter's dtype, like `save_pretrained`).
        selected_adapters: adapters to save (None: all).
        training_info: training details for the model card, also written to `mitp_training.json` in the folder.

    Returns:
        The paths of the written adapter weight files.

    Raises:
        ValueError: an unsupported `dtype`.
    """
    if dtype is not None and dtype not in _SAVE_DTYPES:
        raise ValueError(f"`dtype`={dtype} is not supported; use one of {list(_SAVE_DTYPES)} or None.")
    folder = Path(save_directory)
    if training_info is not None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / TRAINING_INFO_FILE).write_text(json.dumps(read_training_info(training_info), indent=2))
    model.save_pretrained(folder, selected_adapters=selected_adapters, safe_serialization=True)
    names = selected_adapters if selected_adapters is not None else list(model.peft_config)
    files = [folder / (name if name != "default" else "") / ADAPTER_WEIGHTS_NAME for name in names]
    if dtype is not None:
        for file in files:
            tensors = load_file(file)
            cast = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
            save_file(cast, file, metadata={"format": "pt"})
        _match_config_permissions(folder)
    return files


def _refusal(error: HfHubHTTPError, repo_id: str, action: str) -> HfHubHTTPError:
    """The client's error with what to do about it, for the statuses a push is refused with."""
    status = error.response.status_code if error.response is not None else None
    hints = {
        401: "no valid token was sent. Log in with `hf auth login`, set HF_TOKEN, or pass `token=` (a token with "
        "write access)",
        403: f"the token may not write to {repo_id!r}. Push to your own namespace or an organisation you can "
        "write to, or use a token with write access",
    }
    if status not in hints:
        return error
    message = f"{action} {repo_id!r} was refused ({status}): {hints[status]}.\nServer: {error}"
    return HfHubHTTPError(message, response=error.response, server_message=error.server_message)


def push_adapter_to_hub(
    model: PeftModel,
    repo_id: str,
    *,
    training_info: str | os.PathLike[str] | Mapping[str, Any] | None = None,
    dtype: torch.dtype | None = None,
    commit_message: str | None = None,
    commit_description: str | None = None,
    private: bool | None = None,
    token: bool | str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    tags: list[str] | None = None,
) -> CommitInfo:
    """Upload an MITP adapter with its model card to the Hub; what `model.push_to_hub` does for MITP adapters.

    Creates the repo if needed (`private` applies then), saves the adapter(s) into a temporary folder, writes the MITP
    model card (the MITP block regenerated; metadata keys, tags and text a person wrote in the card already on the
    Hub kept) and `mitp_training.json` when training details are known, and uploads everything as one commit. Pushing
    again to the same repo makes a new commit that updates the files.

    Args:
        model: the `PeftModel` holding the MITP adapter(s).
        repo_id: "namespace/name" (or "name" for your own namespace).
        training_info: training details for the card (dict or JSON path; format in `docs/sharing.md`). None: the
            ones the last `save_pretrained` of this model found in its folder's `mitp_training.json`, if any.
        dtype: store the tensors in this dtype (`torch.bfloat16` halves the file; see `save_adapter`); None keeps it.
        commit_message / commit_description / private / token / revision / create_pr: as for any Hub upload;
            `token=None` uses the logged-in token or HF_TOKEN.
        tags: extra Hub tags for the card.

    Returns:
        The `huggingface_hub.CommitInfo` of the commit (`.oid` is its sha).

    Raises:
        huggingface_hub.errors.HfHubHTTPError: the Hub refused; for 401/403 the message says what to do.
    """
    api = HfApi()
    try:
        repo_id = api.create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
    except HfHubHTTPError as error:
        raise _refusal(error, repo_id, "Creating the repo") from error
    info = read_training_info(training_info) if training_info is not None else _TRAINING_INFO.get(model, {})
    with tempfile.TemporaryDirectory() as tmp:
        save_adapter(model, tmp, dtype=dtype, training_info=info or None)
        existing = _remote_card(api, repo_id, revision, token)
        if existing is not None:
            existing.save(Path(tmp) / "README.md")
        write_model_card(model, tmp, info, repo_id=repo_id, tags=tags)
        if revision is not None and not revision.startswith("refs/pr"):
            api.create_branch(repo_id, branch=revision, token=token, exist_ok=True)
        try:
            return api.upload_folder(
                repo_id=repo_id,
                folder_path=tmp,
                commit_message=commit_message or "Upload MITP adapter",
                commit_description=commit_description,
                token=token,
                revision=revision,
                create_pr=create_pr,
            )
        except HfHubHTTPError as error:
            raise _refusal(error, repo_id, "Pushing the MITP adapter to") from error


def _remote_card(api: HfApi, repo_id: str, revision: str | None, token: bool | str | None) -> ModelCard | None:
    try:
        path = api.hf_hub_download(repo_id, "README.md", revision=revision, token=token)
    except (EntryNotFoundError, RevisionNotFoundError):
        return None
    return ModelCard.load(path, ignore_metadata_errors=True)


# ---------------------------------------------------------------------------------------------------- loading
def load_adapter_model(
    adapter: str | os.PathLike[str],
    *,
    base_model: str | os.PathLike[str] | MITPForImageTextClassification | None = None,
    adapter_name: str = "default",
    is_trainable: bool = False,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    revision: str | None = None,
    base_revision: str | None = None,
    token: bool | str | None = None,
    subfolder: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    local_files_only: bool = False,
    **base_kwargs: Any,
) -> PeftModel:
    """Load an MITP adapter and the model it was trained on, from a Hub id or a folder, in one call.

    Reads the adapter's config, builds the base with `MITPForImageTextClassification.from_pretrained` from the
    recorded `base_model_name_or_path` (a saved task model, or a bare dual encoder given the head size the adapter
    recorded), then loads the adapter with `PeftModel.from_pretrained`. Being part of `peft_mitp`, it has already
    registered MITP with peft.

    Args:
        adapter: Hub id or folder of the adapter.
        base_model: use this base instead of the recorded one: a Hub id or folder, or an already built
            `MITPForImageTextClassification` (then `dtype`, `base_revision` and `base_kwargs` are not used).
        adapter_name: name to load the adapter under.
        is_trainable: False (default): inference, everything frozen, eval mode. True: resume training.
        dtype: dtype of the base model (e.g. `torch.bfloat16`); the adapter stays float32 whatever its file holds.
            None: transformers' default.
        device: move the loaded model there (e.g. "cuda").
        revision: revision (branch, tag, sha) of the adapter repo.
        base_revision: revision of the base model; None: the one the adapter recorded (`revision` in its config).
        token: Hub token for private repos (adapter and base); None: the logged-in token or HF_TOKEN.
        subfolder: subfolder of the adapter repo (peft's folder for a non-default adapter).
        cache_dir / local_files_only: as for any Hub download.
        **base_kwargs: passed to the base model's `from_pretrained` (`attn_implementation`, ...).

    Returns:
        The `peft.PeftModel`.

    Raises:
        HubUnreachableError: the adapter or its base model is a Hub id, not cached, and the Hub cannot be reached.
        TypeError: the adapter is not an MITP adapter.
        ValueError: the adapter records no base model and none was given, or the head does not fit.
    """
    hub_kwargs: dict[str, Any] = {"revision": revision, "token": token, "cache_dir": cache_dir, "subfolder": subfolder}
    hub_kwargs = {k: v for k, v in hub_kwargs.items() if v is not None}
    if local_files_only:
        hub_kwargs["local_files_only"] = True
    check_hub_reachable(adapter, "adapter_config.json", local_files_only=local_files_only, cache_dir=cache_dir,
                        revision=revision, subfolder=subfolder)
    try:
        config = PeftConfig.from_pretrained(os.fspath(adapter), **hub_kwargs)
    except ValueError as error:
        # peft turns every download error into "Can't find 'adapter_config.json'"; the Hub's own error says why
        # (missing repo, private repo without a token, unknown revision).
        if isinstance(error.__cause__, HfHubHTTPError):
            raise error.__cause__ from None
        raise
    if not isinstance(config, MITPConfig):
        raise TypeError(
            f"{adapter} holds a {config.peft_type} adapter, not an MITP one: load it with `PeftModel.from_pretrained`."
        )
    if isinstance(base_model, nn.Module):
        task = base_model
    else:
        source = base_model or config.base_model_name_or_path
        if not source:
            raise ValueError(
                f"The adapter {adapter} does not record its base model (`base_model_name_or_path` is None: it was "
                "created on a model built from a config, not loaded with `from_pretrained`). Pass "
                "`base_model=<Hub id, folder or MITPForImageTextClassification>`."
            )
        head: dict[str, Any] = {}
        if config.id2label:
            head["id2label"] = config.id2label
        elif config.num_labels:
            head["num_labels"] = config.num_labels
        if config.problem_type:
            head["problem_type"] = config.problem_type
        base_hub = {k: v for k, v in hub_kwargs.items() if k in ("token", "cache_dir", "local_files_only")}
        if base_revision or config.revision:
            base_hub["revision"] = base_revision or config.revision
        if dtype is not None:
            base_kwargs["dtype"] = dtype
        task = MITPForImageTextClassification.from_pretrained(os.fspath(source), **head, **base_hub, **base_kwargs)
    model = PeftModel.from_pretrained(
        task, os.fspath(adapter), adapter_name=adapter_name, is_trainable=is_trainable, **hub_kwargs
    )
    if device is not None:
        model.to(device)
    return model


# ---------------------------------------------------------------------------------------------------- hooks
# Keywords of transformers' `push_to_hub` (4.x and 5.x) and of the `save_pretrained` it calls that shape how files are
# written, not what is uploaded: an adapter is a few MB (never sharded), always safetensors, always staged in a
# temporary folder. They are accepted and have nothing to do.
_SAVE_ONLY_PUSH_KEYWORDS = ("max_shard_size", "safe_serialization", "use_temp_dir")
_PUSH_ONLY_MITP_KEYWORDS = ("training_info", "dtype")
SAFETENSORS_ONLY = (
    "MITP adapters are always saved as safetensors (MITP loads nothing else; docs/reliability.md): "
    "`safe_serialization=False` is ignored."
)


def _push_arguments(signature: inspect.Signature, model: PeftModel, args: tuple, kwargs: dict[str, Any]) -> dict:
    """Map a `push_to_hub` call, in any form transformers' signature accepts, to `push_adapter_to_hub`'s keywords.

    Binds the call against the wrapped `push_to_hub`'s own signature (so positional arguments land on the parameter
    they name, and a call transformers would refuse is refused with the same `TypeError`), drops the keywords that only
    shape saving (`_SAVE_ONLY_PUSH_KEYWORDS`, warning on `safe_serialization=False`) and keeps MITP's own
    `training_info=` and `dtype=`.
    """
    kwargs = dict(kwargs)
    own = {k: kwargs.pop(k) for k in _PUSH_ONLY_MITP_KEYWORDS if k in kwargs}
    ignored = {k: kwargs.pop(k) for k in _SAVE_ONLY_PUSH_KEYWORDS if k in kwargs and k not in signature.parameters}
    arguments = dict(signature.bind(model, *args, **kwargs).arguments)
    for index, (name, parameter) in enumerate(signature.parameters.items()):
        if index == 0:
            arguments.pop(name, None)  # the model
        elif parameter.kind is inspect.Parameter.VAR_KEYWORD:
            arguments.update(arguments.pop(name, {}))
        elif parameter.kind is inspect.Parameter.VAR_POSITIONAL and arguments.pop(name, ()):
            raise TypeError(f"push_to_hub() got extra positional arguments: {args}.")
    ignored.update({k: arguments.pop(k) for k in _SAVE_ONLY_PUSH_KEYWORDS if k in arguments})
    if ignored.get("safe_serialization") is False:
        warnings.warn(SAFETENSORS_ONLY, UserWarning, stacklevel=3)
    return {**arguments, **own}


def install_hooks() -> None:
    """Make `PeftModel.save_pretrained` / `push_to_hub` write the MITP model card for MITP adapters (idempotent).

    Wraps `PeftModel.create_or_update_model_card`, `PeftModel.save_pretrained` (MITP adapters are always written as
    safetensors, the only format MITP loads; `safe_serialization=False` warns), `PeftModel.push_to_hub` and
    `PeftModel.load_adapter` (the MITP file checks also when loading into an existing adapter name, as Trainer's
    `resume_from_checkpoint` does); models without MITP adapters keep peft's and transformers' behaviour.
    The first MITP adapter created (`get_peft_model`, `PeftModel.from_pretrained`) calls this.
    """
    if getattr(PeftModel.create_or_update_model_card, "_mitp_hook", False):
        return
    peft_card = PeftModel.create_or_update_model_card
    transformers_push = PeftModel.push_to_hub

    @functools.wraps(peft_card)
    def create_or_update_model_card(self: PeftModel, output_dir: str) -> None:
        if not is_mitp_model(self):
            return peft_card(self, output_dir)
        info = read_training_info(output_dir)
        if info:
            _TRAINING_INFO[self] = info
        write_model_card(self, output_dir, info or _TRAINING_INFO.get(self))

    peft_save = PeftModel.save_pretrained
    save_signature = inspect.signature(peft_save)
    push_signature = inspect.signature(transformers_push)

    @functools.wraps(peft_save)
    def save_pretrained(self: PeftModel, *args: Any, **kwargs: Any) -> Any:
        if is_mitp_model(self):
            # peft would write a pickled adapter_model.bin, which MITP's loading refuses: write safetensors anyway.
            bound = save_signature.bind(self, *args, **kwargs)
            if bound.arguments.get("safe_serialization", True) is False:
                warnings.warn(SAFETENSORS_ONLY, UserWarning, stacklevel=2)
                bound.arguments["safe_serialization"] = True
                args, kwargs = bound.args[1:], bound.kwargs
            if "save_embedding_layers" not in bound.arguments:
                # MITP never changes a vocabulary. peft's "auto" asks the Hub whether the base model's config.json
                # exists (a request on every save, and two warnings for a base that is not on the Hub: "offline").
                kwargs = {**kwargs, "save_embedding_layers": False}
            result = peft_save(self, *args, **kwargs)
            _match_config_permissions(save_signature.bind(self, *args, **kwargs).arguments["save_directory"])
            return result
        return peft_save(self, *args, **kwargs)

    @functools.wraps(transformers_push)
    def push_to_hub(self: PeftModel, *args: Any, **kwargs: Any) -> Any:
        if not is_mitp_model(self):
            return transformers_push(self, *args, **kwargs)
        return push_adapter_to_hub(self, **_push_arguments(push_signature, self, args, kwargs))

    peft_load = PeftModel.load_adapter
    load_signature = inspect.signature(peft_load)

    @functools.wraps(peft_load)
    def load_adapter(self: PeftModel, *args: Any, **kwargs: Any) -> Any:
        arguments = load_signature.bind(self, *args, **kwargs).arguments
        config = self.peft_config.get(arguments["adapter_name"])
        if is_mitp_model(self) and isinstance(config, MITPConfig):
            # peft reads the config (where MITP checks the files) only for a new adapter name; loading into an
            # existing one (Trainer's `resume_from_checkpoint`) would read a pickle or a gate-less hub unchecked.
            extra = arguments.get("kwargs", {})
            hub = {k: extra[k] for k in ("revision", "token", "cache_dir", "local_files_only") if k in extra}
            path = check_adapter_weights(arguments["model_id"], subfolder=extra.get("subfolder"), **hub)
            check_hub_weights(path, config.interaction)
        return peft_load(self, *args, **kwargs)

    create_or_update_model_card._mitp_hook = True  # type: ignore[attr-defined]
    push_to_hub.__doc__ = (
        "Push the adapter to the Hub. For MITP adapters (after `import peft_mitp`) this is "
        "`peft_mitp.sharing.push_adapter_to_hub`, which also accepts `training_info=` and `dtype=`.\n\n"
        + (transformers_push.__doc__ or "")
    )
    PeftModel.create_or_update_model_card = create_or_update_model_card
    PeftModel.save_pretrained = save_pretrained
    PeftModel.push_to_hub = push_to_hub
    PeftModel.load_adapter = load_adapter
