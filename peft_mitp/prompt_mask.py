"""The one function that extends an encoder layer's attention mask to cover appended prompt tokens."""

from __future__ import annotations

import torch


def _is_block_mask(mask: object) -> bool:
    return type(mask).__name__ == "BlockMask"


def extend_attention_mask(
    mask: torch.Tensor | None,
    *,
    seq_len: int,
    num_prompts: int,
    is_causal: bool,
    attn_implementation: str | None,
    dtype: torch.dtype,
    device: torch.device,
    prompts_seen: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Return the mask for a sequence of `seq_len` tokens followed by `num_prompts` prompt tokens.

    The rule, in every mask format: tokens keep their own pattern (causal or not, padding or not) and additionally
    see every prompt; prompts see every non-padding token and every prompt. Because prompts never attend padding and
    padding never changes what a real token sees, a padded batch gives the same outputs as an unpadded one.

    With `prompts_seen`, the tokens of the samples marked False additionally see no prompt (the mask is then
    materialised per sample).

    Formats, as transformers 5.x hands them to an encoder layer:
        - None with a bidirectional tower: stays None (everything attends everything).
        - None with a causal tower (SDPA applies causality itself when no padding exists): a causal mask is
          materialised first, otherwise the prompted layer would silently become bidirectional.
        - 4-D boolean (SDPA; True = attend) or 4-D additive float (eager; 0 = attend, a large negative = masked):
          extended in the same format.
        - 2-D (B, L) key-padding masks (flash attention): extended with ones; causal towers cannot express
          "tokens see the later prompts" in this format and are refused.
        - flex attention's BlockMask cannot be extended and is refused.

    Args:
        mask: the mask the encoder passed to the layer.
        seq_len: number of real tokens L.
        num_prompts: number of prompts M appended after them.
        is_causal: whether the tower is causal (the encoder passed `is_causal=True`).
        attn_implementation: the tower's `config._attn_implementation`.
        dtype: dtype of the hidden states (for additive masks built from None).
        device: device of the hidden states.
        prompts_seen: (B,) bool, False for samples whose tokens must not see the prompts (a mixed-adapter batch's
            samples without an adapter, `peft_mitp.mixed`): their tokens keep exactly their own pattern. None: every
            sample's tokens see the prompts.

    Returns:
        The extended mask, in the format it came in.
    """
    if _is_block_mask(mask):
        raise NotImplementedError(
            "MITP cannot extend flex attention's BlockMask to the prompt tokens. Load the backbone with "
            "attn_implementation='sdpa' (default) or 'eager'."
        )
    impl = attn_implementation or "eager"
    total = seq_len + num_prompts

    if mask is not None and mask.dim() == 2:
        if prompts_seen is not None:
            raise NotImplementedError(
                "Mixed-adapter batches need attention masks that can hide the prompts from some samples' tokens; flash "
                "attention's 2-D masks cannot. Load the backbone with attn_implementation='sdpa' or 'eager'."
            )
        if is_causal:
            raise NotImplementedError(
                "A causal text tower with a 2-D (flash-attention) mask cannot let text tokens see the appended "
                "prompts. Load the backbone with attn_implementation='sdpa' or 'eager' for MITP."
            )
        ones = torch.ones(mask.shape[0], num_prompts, dtype=mask.dtype, device=mask.device)
        return torch.cat([mask, ones], dim=1)

    if mask is None:
        if not is_causal and prompts_seen is None:
            return None
        if "flash" in impl:
            raise NotImplementedError(
                ("A causal text tower under flash attention cannot let text tokens see the appended prompts."
                 if is_causal else "Mixed-adapter batches cannot hide the prompts from some samples under flash "
                 "attention.")
                + " Load the backbone with attn_implementation='sdpa' or 'eager' for MITP."
            )
        allowed = torch.ones(seq_len, seq_len, dtype=torch.bool, device=device)
        allowed = (allowed.tril() if is_causal else allowed)[None, None]
        additive = impl == "eager"
    elif mask.dim() == 4:
        additive = mask.dtype != torch.bool
        allowed = mask if not additive else mask > torch.finfo(mask.dtype).min / 2
        dtype = mask.dtype if additive else dtype
    else:
        raise ValueError(f"MITP got an attention mask of unsupported shape {tuple(mask.shape)} (expected 2-D or 4-D).")

    batch, heads, rows, cols = allowed.shape
    if rows != seq_len or cols != seq_len:
        raise ValueError(
            f"The attention mask covers {rows}x{cols} positions but the layer sees {seq_len} tokens; MITP supports "
            "encoder self-attention masks only."
        )
    # A key is a real token if some query may attend it (true for causal and bidirectional padding masks alike).
    key_valid = allowed.any(dim=-2, keepdim=True)
    new = torch.ones(batch, heads, total, total, dtype=torch.bool, device=allowed.device)
    new[..., :seq_len, :seq_len] = allowed
    new[..., seq_len:, :seq_len] = key_valid.expand(batch, heads, num_prompts, seq_len)
    if prompts_seen is not None:
        new = new.expand(prompts_seen.shape[0], *new.shape[1:]).clone()
        new[~prompts_seen.to(new.device), :, :seq_len, seq_len:] = False
    if not additive:
        return new
    out = torch.zeros(new.shape, dtype=dtype, device=new.device)
    return out.masked_fill_(~new, torch.finfo(dtype).min)
