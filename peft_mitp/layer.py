"""`MITPLayer`: temporal prompts inside one interaction layer of one tower."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .families import TokenArgumentKind
from .lockstep import current_tower
from .mixed import current_mixed_batch
from .prompt_mask import extend_attention_mask

_RECOMPUTED_OUTSIDE_LOCKSTEP = (
    "An MITP interaction layer of the {tower} tower was re-run during backward, outside MITP's lock-step forward, "
    "where it would run without its prompts and its hub exchange (wrong gradients). An activation-checkpoint wrapper "
    "sits around the MITPLayer or a module holding it: FSDP's `activation_checkpointing` with "
    "`transformer_layer_cls_to_wrap` naming MITPLayer or an encoder, `checkpoint_wrapper`, or `torch.utils.checkpoint` "
    "around it. Checkpoint the encoder layers an MITPLayer wraps instead: `model.activation_checkpointing_enable()`, "
    "or under FSDP `fsdp_config=peft_mitp.prepare_fsdp(model, {{'activation_checkpointing': True}})` "
    "(docs/reliability.md)."
)


def _in_backward() -> bool:
    """True while autograd runs a backward pass (where checkpoint wrappers recompute their forward)."""
    return torch._C._current_graph_task_id() != -1


class MITPLayer(nn.Module, BaseTunerLayer):
    """Wraps one encoder layer of a frozen tower and runs it with temporal prompts appended.

    Inside a lock-step forward (`MITPForImageTextClassification`), the layer:

    1. asks the scheduler for the hub's carry into its interaction pair (nothing for the first pair),
    2. appends the prompts `E + carry` (E: this layer's learned prompts, shape (M, width)) after the tokens and
       extends the attention mask so that tokens see the prompts and prompts see the real tokens,
    3. runs the wrapped layer, strips the prompt positions (so callers, pooling and `output_hidden_states` see the
       original sequence), and hands the prompts' read-out to the scheduler for the memory hub.

    Outside a lock-step forward, with adapters disabled, or when the active adapter does not use this layer, it is
    the wrapped layer, unchanged.

    Args:
        base_layer: the encoder layer to wrap.
        adapter_name: name of the first adapter.
        tower: "text" or "vision".
        pair: index of this layer's interaction pair for that adapter.
        prompt_length: number of prompts M.
        width: hidden width of the tower.
        init_std: standard deviation of the prompts' Gaussian initialisation.
        hubs: the tuner's `ModuleDict` of memory hubs, held by reference (not registered here, so it is saved once).
    """

    adapter_layer_names = ("mitp_prompt",)
    other_param_names = ("mitp_pair",)
    # Names of the wrapped layer's positional parameters after the hidden states, read from its signature once.
    _mitp_positional_names: tuple[str, ...] | None = None

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        *,
        tower: str,
        pair: int,
        prompt_length: int,
        width: int,
        init_std: float,
        hubs: nn.ModuleDict,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.mitp_prompt = nn.ParameterDict({})
        self.mitp_pair: dict[str, int] = {}
        self.mitp_tower = tower
        self.width = width
        object.__setattr__(self, "_mitp_hubs", hubs)
        self._active_adapter = adapter_name
        self.merged_adapters = []
        self.update_layer(adapter_name, pair=pair, prompt_length=prompt_length, init_std=init_std)

    def update_layer(self, adapter_name: str, *, pair: int, prompt_length: int, init_std: float) -> None:
        """Add (or replace) `adapter_name`'s prompts in this layer."""
        device, dtype = self._get_base_layer_device_and_dtype(self.get_base_layer())
        weight = torch.empty(prompt_length, self.width, device=device, dtype=torch.float32)
        if weight.device.type != "meta":
            nn.init.normal_(weight, std=init_std)
        self.mitp_prompt[adapter_name] = nn.Parameter(weight)
        self.mitp_pair[adapter_name] = pair
        self.set_adapter(self.active_adapters)

    def _get_base_layer_device_and_dtype(self, base_layer: nn.Module) -> tuple[torch.device | None, torch.dtype | None]:
        # Encoder layers have no `.weight` of their own (peft only looks there): use their first parameter.
        param = next(base_layer.parameters(), None)
        if param is None:
            return None, None
        return param.device, param.dtype

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Refused: prompts are extra tokens, there are no weights to fold into the frozen layer."""
        raise NotImplementedError(
            "MITP adds prompt tokens and a memory hub; there is nothing to merge into the base weights. Use "
            "`model.unload()` to get the plain task model back, or keep the adapter loaded."
        )

    def unmerge(self) -> None:
        """Nothing to unmerge: MITP never merges."""

    def _active_prompt(self) -> str | None:
        active = [name for name in self.active_adapters if name in self.mitp_prompt]
        if len(active) > 1:
            raise ValueError(
                f"MITP runs one adapter at a time but {active} are active; call `model.set_adapter(name)` with one."
            )
        return active[0] if active else None

    def _uses_active_adapter(self) -> bool:
        return any(name in self.mitp_prompt for name in self.active_adapters)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        tower = current_tower(self.mitp_tower)
        if tower is None and not self.disable_adapters and _in_backward() and self._uses_active_adapter():
            raise RuntimeError(_RECOMPUTED_OUTSIDE_LOCKSTEP.format(tower=self.mitp_tower))
        mixed = current_mixed_batch() if (tower is not None and not self.disable_adapters) else None
        if mixed is not None:
            # One adapter per sample (`adapter_names`): the adapters share this layer's pair and prompt length.
            adapter = next((name for name in mixed.adapters if name in self.mitp_prompt), None)
        else:
            adapter = None if (self.disable_adapters or tower is None) else self._active_prompt()
        if adapter is None:
            return self.base_layer(hidden_states, *args, **kwargs)
        if tower.name != self.mitp_tower:
            raise RuntimeError(f"A {self.mitp_tower}-tower interaction layer ran inside the {tower.name} tower.")

        pair = self.mitp_pair[adapter]
        carry = tower.request_prompts(pair)
        if pair == 0 and tower.frozen_below:
            # Nothing below the first interaction layer is trainable: never let gradient flow there (the input may
            # still require grad, e.g. after `enable_input_require_grads`).
            hidden_states = hidden_states.detach()
        if getattr(tower, "packed", False):
            if mixed is not None:
                raise NotImplementedError("Mixed-adapter batches do not support packed vision towers (Qwen2-VL).")
            return self._forward_packed(tower, adapter, pair, carry, hidden_states, args, kwargs)
        visible = None
        if mixed is not None:
            if hidden_states.shape[0] != len(mixed.names):
                raise ValueError(
                    f"`adapter_names` names {len(mixed.names)} samples but the {self.mitp_tower} tower runs "
                    f"{hidden_states.shape[0]} rows: mixed-adapter batches need one image and one text per sample."
                )
            index, visible = mixed.table_index()
            table = torch.stack([self.mitp_prompt[name] for name in mixed.adapters])
            prompts = table[index.to(table.device)] * visible.to(table.device, table.dtype)[:, None, None]
        else:
            prompts = self.mitp_prompt[adapter]
            prompts = prompts.unsqueeze(0).expand(hidden_states.shape[0], -1, -1)
        if carry is not None:
            # The carry comes from the hub, which may live on another device or in another dtype (`device_map`).
            prompts = prompts + carry.to(device=prompts.device, dtype=prompts.dtype)
        prompts = prompts.to(device=hidden_states.device, dtype=hidden_states.dtype)
        seq_len, num_prompts = hidden_states.shape[1], prompts.shape[1]

        args, kwargs = self._name_arguments(args, kwargs)
        is_causal = kwargs.get("is_causal")
        if is_causal is None and (tower.attn_implementation or "eager") != "eager":
            # A tower causal by attribute (e.g. BERT with `is_decoder=True`) gets no `is_causal` argument and, under
            # SDPA without padding, no mask: its attention applies causality itself, which would hide the appended
            # prompts from every token. Materialise the causal mask with the prompts instead. (Eager attention reads
            # only the mask, so there a causal tower always gets one.)
            is_causal = any(getattr(m, "is_causal", False) is True for m in self.get_base_layer().modules())
        is_causal = bool(is_causal)

        def extend_mask(mask: Any) -> Any:
            return extend_attention_mask(
                mask,
                seq_len=seq_len,
                num_prompts=num_prompts,
                is_causal=is_causal,
                attn_implementation=tower.attn_implementation,
                dtype=hidden_states.dtype,
                device=hidden_states.device,
                # Samples without an adapter ("__base__") in a mixed batch: their tokens must not see the prompts.
                prompts_seen=visible,
            )

        # The mask is `attention_mask` wherever it sits in the call (BLIP's text layers take it third, by keyword);
        # a layer whose parameters cannot be named gets the old convention: the first argument after the states.
        if args and "attention_mask" not in kwargs:
            args[0] = extend_mask(args[0])
        else:
            mask = extend_mask(kwargs.get("attention_mask"))
            if mask is not None or "attention_mask" in kwargs:
                kwargs["attention_mask"] = mask
        for argument in tower.token_arguments:
            if kwargs.get(argument.name) is not None:
                kwargs[argument.name] = extend_token_argument(
                    argument.kind,
                    kwargs[argument.name],
                    seq_len=seq_len,
                    num_prompts=num_prompts,
                    extend_mask=extend_mask,
                )

        extended = torch.cat([hidden_states, prompts], dim=1)
        collected = _captured_hidden_states()
        captured_before = len(collected) if collected is not None else 0
        output = self.base_layer(extended, *args, **kwargs)
        hidden = output[0] if isinstance(output, tuple) else output
        readout = hidden[:, seq_len:]
        # In a mixed-adapter batch the scheduler gets every adapter's hub and runs each on its own samples.
        tower.send_readout(pair, readout, self._mitp_hubs if mixed is not None else self._mitp_hubs[adapter])
        stripped = hidden[:, :seq_len]
        if not torch.is_grad_enabled():
            # The scheduler ended autograd after this read-out (a decoder VLM's last vision pair): nothing downstream
            # needs this layer's graph.
            stripped = stripped.detach()
        if collected is not None:
            # transformers records `output_hidden_states` with a hook on the wrapped layer's class, so it saw the
            # sequence with the prompts: record what the caller sees instead (a VLM that reads a middle vision layer,
            # LLaVA's `vision_feature_layer=-2`, takes its image tokens from there).
            for index in range(captured_before, len(collected)):
                if collected[index] is extended:
                    collected[index] = hidden_states
                elif collected[index] is hidden:
                    collected[index] = stripped
        hidden = stripped
        if not isinstance(output, tuple):
            return hidden
        rest = tuple(
            t[..., :seq_len, :seq_len] if isinstance(t, torch.Tensor) and t.dim() == 4 else t for t in output[1:]
        )
        return (hidden, *rest)

    def _forward_packed(
        self,
        tower: Any,
        adapter: str,
        pair: int,
        carry: torch.Tensor | None,
        hidden_states: torch.Tensor,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        """The layer on packed images: (N, D) states split by `cu_seqlens`; each image's prompts go after its patches.

        Attention stays within each image's segment, so each image's prompts see its patches and its patches see its
        prompts; rotary embeddings give the prompts the identity rotation.
        """
        args, kwargs = self._name_arguments(args, kwargs)
        if args or kwargs.get("cu_seqlens") is None:
            raise ValueError("A packed interaction layer needs `cu_seqlens` by name (Qwen2-VL's vision blocks).")
        bounds = kwargs["cu_seqlens"]
        images = bounds.shape[0] - 1
        prompts = self.mitp_prompt[adapter].unsqueeze(0).expand(images, -1, -1)
        if carry is not None:
            prompts = prompts + carry.to(device=prompts.device, dtype=prompts.dtype)
        prompts = prompts.to(device=hidden_states.device, dtype=hidden_states.dtype)
        num_prompts = prompts.shape[1]
        lengths = (bounds[1:] - bounds[:-1]).tolist()
        # Positions of the patches and of the prompts in the extended sequence.
        offsets = torch.arange(images, device=bounds.device) * num_prompts
        new_bounds = bounds + torch.cat([offsets.new_zeros(1), offsets + num_prompts])
        is_patch = torch.ones(hidden_states.shape[0] + images * num_prompts, dtype=torch.bool,
                              device=hidden_states.device)
        for end in new_bounds[1:].tolist():
            is_patch[end - num_prompts : end] = False
        extended = hidden_states.new_empty(is_patch.shape[0], hidden_states.shape[1])
        extended[is_patch] = hidden_states
        extended[~is_patch] = prompts.reshape(-1, prompts.shape[-1])
        kwargs["cu_seqlens"] = new_bounds.to(bounds.dtype)
        if kwargs.get("max_seqlen") is not None:
            kwargs["max_seqlen"] = max(lengths) + num_prompts
        for argument in tower.token_arguments:
            value = kwargs.get(argument.name)
            if value is not None and argument.kind == "rotary":
                cos, sin = value
                new_cos = cos.new_ones(is_patch.shape[0], *cos.shape[1:])
                new_sin = sin.new_zeros(is_patch.shape[0], *sin.shape[1:])
                new_cos[is_patch], new_sin[is_patch] = cos, sin
                kwargs[argument.name] = type(value)((new_cos, new_sin))
        output = self.base_layer(extended, **kwargs)
        hidden = output[0] if isinstance(output, tuple) else output
        readout = hidden[~is_patch].reshape(images, num_prompts, -1)
        tower.send_readout(pair, readout, self._mitp_hubs[adapter])
        stripped = hidden[is_patch]
        if not torch.is_grad_enabled():
            stripped = stripped.detach()
        return stripped if not isinstance(output, tuple) else (stripped, *output[1:])

    def _name_arguments(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[list[Any], dict[str, Any]]:
        """The layer call's arguments after the hidden states, by parameter name where the signature allows it.

        Returns (positional arguments, keyword arguments): normally ([], all of them by name), so the attention mask
        and the per-token arguments are found whether the encoder passed them by position or by keyword. Layers whose
        positional parameters cannot be named (e.g. `forward(self, *args)`) keep their arguments as they came.
        """
        names = self._mitp_positional_names
        if names is None:
            names = _positional_parameter_names(self.get_base_layer())
            self._mitp_positional_names = names
        if not args:
            return [], dict(kwargs)
        if names == () or len(args) > len(names) or any(name in kwargs for name in names[: len(args)]):
            return list(args), dict(kwargs)
        return [], {**dict(zip(names, args, strict=False)), **kwargs}

    def _replicate_for_data_parallel(self) -> MITPLayer:
        # `nn.DataParallel` copies modules per device; the layers reach the hub through an unregistered reference,
        # so every replica would run the original hub on the first device. Refuse it instead of computing wrongly.
        raise RuntimeError(
            "MITP does not support `torch.nn.DataParallel` (its replicas would share one memory hub on one device). "
            "Use DistributedDataParallel: `torchrun --nproc-per-node N train.py` or `accelerate launch` "
            "(transformers.Trainer does it for you); see docs/reliability.md."
        )

    def __repr__(self) -> str:
        return "mitp." + super().__repr__()


def _captured_hidden_states() -> list[Any] | None:
    """The hidden states transformers is recording in the current forward (`output_hidden_states`), or None.

    transformers 5 records them with forward hooks on the layer classes into a context-local collector
    (`transformers.utils.output_capturing._active_collector`, listed in `peft_mitp.internals`).
    """
    from transformers.utils import output_capturing

    collector = getattr(output_capturing, "_active_collector", None)
    collected = collector.get() if collector is not None else None
    if not isinstance(collected, dict):
        return None
    states = collected.get("hidden_states")
    return states if isinstance(states, list) else None


def _positional_parameter_names(layer: nn.Module) -> tuple[str, ...]:
    """Names of the layer's positional-or-keyword parameters after the hidden states (() when they cannot be named)."""
    try:
        parameters = list(inspect.signature(layer.forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return ()
    names = []
    for parameter in parameters:
        if parameter.kind is not inspect.Parameter.POSITIONAL_OR_KEYWORD:
            if parameter.kind is inspect.Parameter.POSITIONAL_ONLY:
                return ()
            break
        names.append(parameter.name)
    return tuple(names)


def extend_token_argument(
    kind: TokenArgumentKind,
    value: Any,
    *,
    seq_len: int,
    num_prompts: int,
    extend_mask: Callable[[Any], Any],
) -> Any:
    """Extend one per-token layer argument from L tokens to L tokens followed by M prompts (see `TokenArgument`).

    Args:
        kind: "rotary" (a (cos, sin) pair, tokens on dim -2: the prompts get the identity rotation, cos 1 and sin 0),
            "pairwise" (an additive (..., L, L) bias: zero for prompt rows and columns) or "mask" (a second attention
            mask, extended like `attention_mask`).
        value: the argument as the encoder passed it.
        seq_len: L, the number of tokens the layer sees without prompts.
        num_prompts: M.
        extend_mask: extends an attention mask with this layer's rule (`extend_attention_mask`, already bound).

    Returns:
        The extended argument, in the structure it came in.

    Raises:
        ValueError: the value does not have the shape its kind promises.
    """
    if kind == "rotary":
        cos, sin = value
        if cos.shape[-2] > seq_len:
            raise ValueError(
                f"Rotary embeddings cover {cos.shape[-2]} positions but the layer sees {seq_len} tokens; check the "
                "tower's `token_arguments` in peft_mitp/families.py."
            )
        shape = (*cos.shape[:-2], num_prompts, cos.shape[-1])
        cos = torch.cat([cos, cos.new_ones(shape)], dim=-2)
        sin = torch.cat([sin, sin.new_zeros(shape)], dim=-2)
        return type(value)((cos, sin))
    if kind == "pairwise":
        if value.dim() < 2 or value.shape[-1] != seq_len or value.shape[-2] != seq_len:
            raise ValueError(
                f"A pairwise bias of shape {tuple(value.shape)} does not end in ({seq_len}, {seq_len}) for the "
                f"layer's {seq_len} tokens; check the tower's `token_arguments` in peft_mitp/families.py."
            )
        return nn.functional.pad(value, (0, num_prompts, 0, num_prompts))
    if kind == "mask":
        return extend_mask(value)
    raise ValueError(f"Unknown per-token argument kind {kind!r}; use 'rotary', 'pairwise' or 'mask'.")
