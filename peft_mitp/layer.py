"""`MITPLayer`: temporal prompts inside one interaction layer of one tower."""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .lockstep import current_tower
from .prompt_mask import extend_attention_mask


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

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        tower = current_tower()
        adapter = None if (self.disable_adapters or tower is None) else self._active_prompt()
        if adapter is None:
            return self.base_layer(hidden_states, *args, **kwargs)
        if tower.name != self.mitp_tower:
            raise RuntimeError(f"A {self.mitp_tower}-tower interaction layer ran inside the {tower.name} tower.")

        pair = self.mitp_pair[adapter]
        carry = tower.request_prompts(pair)
        if pair == 0:
            # Nothing below the first interaction layer is trainable: never let gradient flow there.
            hidden_states = hidden_states.detach()
        prompts = self.mitp_prompt[adapter]
        prompts = prompts.unsqueeze(0).expand(hidden_states.shape[0], -1, -1)
        if carry is not None:
            prompts = prompts + carry.to(prompts.dtype)
        prompts = prompts.to(hidden_states.dtype)
        seq_len, num_prompts = hidden_states.shape[1], prompts.shape[1]

        args = list(args)
        mask = args[0] if args else kwargs.get("attention_mask")
        mask = extend_attention_mask(
            mask,
            seq_len=seq_len,
            num_prompts=num_prompts,
            is_causal=bool(kwargs.get("is_causal", False)),
            attn_implementation=tower.attn_implementation,
            dtype=hidden_states.dtype,
            device=hidden_states.device,
        )
        if args:
            args[0] = mask
        else:
            kwargs["attention_mask"] = mask

        output = self.base_layer(torch.cat([hidden_states, prompts], dim=1), *args, **kwargs)
        hidden = output[0] if isinstance(output, tuple) else output
        readout = hidden[:, seq_len:]
        tower.send_readout(pair, readout, self._mitp_hubs[adapter])
        hidden = hidden[:, :seq_len]
        if not isinstance(output, tuple):
            return hidden
        rest = tuple(
            t[..., :seq_len, :seq_len] if isinstance(t, torch.Tensor) and t.dim() == 4 else t for t in output[1:]
        )
        return (hidden, *rest)

    def __repr__(self) -> str:
        return "mitp." + super().__repr__()
