"""Reaching the Hugging Face Hub: one clear error, at once, when it cannot be reached.

Without a network, `huggingface_hub` retries a file it has not cached five times with back-off (about 25 s) and
transformers then raises a chain of tracebacks. The loading functions of this project call `check_hub_reachable`
first: a name that is a local folder, a file already in the cache, `HF_HUB_OFFLINE=1` or `local_files_only=True`
costs nothing; otherwise one request to the Hub endpoint (`HF_ENDPOINT`) decides, and a failure raises
`HubUnreachableError` naming the ways to work offline.
"""

from __future__ import annotations

import os
from typing import Any

__all__ = ["HUB_KWARGS", "REACHABILITY_KWARGS", "HubUnreachableError", "check_hub_reachable"]

HUB_KWARGS = ("revision", "token", "cache_dir", "local_files_only", "subfolder", "trust_remote_code")
"""The `from_pretrained` keywords that say where and how to fetch from the Hub; the project passes them through."""
REACHABILITY_KWARGS = ("local_files_only", "cache_dir", "revision", "subfolder")
"""The subset of `HUB_KWARGS` that `check_hub_reachable` takes."""

_REACHABLE: set[str] = set()  # endpoints that answered once in this process


class HubUnreachableError(ConnectionError):
    """The Hugging Face Hub cannot be reached and what was asked for is not in the local cache."""


def _offline_advice(name: str) -> str:
    return (
        f"To work offline: pass a local folder instead of the Hub id {name!r} (a model saved with save_pretrained), set "
        "HF_HUB_OFFLINE=1 to use only files already in the Hugging Face cache, or use the packaged offline backbone "
        "(peft_mitp.offline_backbone.build_offline_backbone(), `mitp train --backbone offline`)."
    )


def check_hub_reachable(
    name_or_path: str | os.PathLike[str] | Any,
    filename: str = "config.json",
    *,
    local_files_only: bool = False,
    cache_dir: str | os.PathLike[str] | None = None,
    revision: str | None = None,
    subfolder: str | None = None,
) -> None:
    """Raise `HubUnreachableError` at once when loading `name_or_path` would need the Hub and the Hub is unreachable.

    Args:
        name_or_path: a Hub id or a local folder (a folder, or anything that is not a string, is never checked).
        filename: a file the loader will read first; when it is in the local cache, huggingface_hub falls back to
            the cache by itself, so nothing is checked.
        local_files_only / cache_dir / revision / subfolder: as given to the loader.

    Raises:
        HubUnreachableError: the Hub endpoint (`HF_ENDPOINT`) does not answer and the file is not cached.
    """
    from huggingface_hub import constants, try_to_load_from_cache
    from huggingface_hub.utils import get_session

    if not isinstance(name_or_path, (str, os.PathLike)):
        return
    name = os.fspath(name_or_path)
    if local_files_only or constants.HF_HUB_OFFLINE or os.path.isdir(name) or os.path.isfile(name):
        return
    endpoint = constants.ENDPOINT
    if endpoint in _REACHABLE:
        return
    path_in_repo = f"{subfolder}/{filename}" if subfolder else filename
    try:
        if isinstance(try_to_load_from_cache(name, path_in_repo, cache_dir=cache_dir, revision=revision), str):
            return
    except Exception:  # not a valid repo id: the loader itself gives the right error
        return
    try:
        get_session().head(endpoint, timeout=constants.HF_HUB_ETAG_TIMEOUT, follow_redirects=False)
    except Exception as error:  # any failure to get an answer (refused, DNS, timeout, TLS) means unreachable
        reason = " ".join(f"{type(error).__name__}: {error}".split())
        raise HubUnreachableError(
            f"The Hugging Face Hub ({endpoint}) is unreachable ({reason}) and {name!r} is not in the local cache. "
            + _offline_advice(name)
        ) from None
    _REACHABLE.add(endpoint)
