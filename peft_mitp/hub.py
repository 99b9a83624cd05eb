"""The memory hub: consolidation and activation of temporal prompts between the two towers."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class HubOutput:
    """What the hub produces after interaction pair k.

    Attributes:
        text_prompts: carry for the text prompts of pair k+1, shape (B, M_t, d_text).
        vision_prompts: carry for the vision prompts of pair k+1, shape (B, M_v, d_vision).
        text_activation: (B, M_t, M_v): how much each text prompt drew from each vision prompt (None when
            interaction is off).
        vision_activation: (B, M_v, M_t): the same from the vision side.
    """

    text_prompts: torch.Tensor | None
    vision_prompts: torch.Tensor | None
    text_activation: torch.Tensor | None = None
    vision_activation: torch.Tensor | None = None


class MemoryHub(nn.Module):
    r"""Shared memory hub of one MITP adapter.

    Given the prompt read-outs of interaction pair k, $R_t \in \mathbb{R}^{B \times M_t \times d_t}$ (text) and
    $R_v \in \mathbb{R}^{B \times M_v \times d_v}$ (vision), the hub computes the carry into pair k+1:

    Consolidation (mapping connection into a shared width $d_h$, then similarity):
        $H_t = W_t\,\mathrm{LN}(R_t) + b_t$, $H_v = W_v\,\mathrm{LN}(R_v) + b_v$ (LN without parameters),
        $S = \mathrm{sim}(H_t, H_v) / \tau \in \mathbb{R}^{B \times M_t \times M_v}$ with sim one of
        scaled dot $H_t H_v^\top / \sqrt{d_h}$, cosine, or dot.

    Activation (softmax over the similarities, one direction per modality):
        $A_{t \leftarrow v} = \mathrm{softmax}_\text{row}(S)$, $A_{v \leftarrow t} = \mathrm{softmax}_\text{row}(S^\top)$.

    Generation (residual memory plus the activated other modality, mapped back to each tower's width):
        $C_t = R_t + U_t (A_{t \leftarrow v} H_v)$, $C_v = R_v + U_v (A_{v \leftarrow t} H_t)$.

    The layers of pair k+1 add their own learned prompts $E^{k+1}$ to the carry: $P^{k+1} = E^{k+1} + C^{k+1}$.
    With `memory=False` the residual $R$ is dropped; with `interaction=False` the cross term is dropped (and no maps
    are created). The generation maps $U$ start at zero, so a fresh adapter behaves like temporal prompts without
    interaction and learns how much to draw from the other modality.

    Args:
        text_width: hidden width of the text tower.
        vision_width: hidden width of the vision tower.
        hub_dim: width of the shared space (the rank of the mapping connection, shared over layers).
        similarity: "scaled_dot", "cosine" or "dot".
        temperature: similarities are divided by it before the activation.
        activation: "softmax" or "hard" (top-1, an ablation).
        interaction: whether the cross-modal term exists.
        memory: whether each tower's own read-out is carried to the next pair.
    """

    def __init__(
        self,
        text_width: int,
        vision_width: int,
        hub_dim: int = 512,
        similarity: str = "scaled_dot",
        temperature: float = 1.0,
        activation: str = "softmax",
        interaction: bool = True,
        memory: bool = True,
    ) -> None:
        super().__init__()
        self.text_width = text_width
        self.vision_width = vision_width
        self.hub_dim = hub_dim
        self.similarity = similarity
        self.temperature = temperature
        self.activation = activation
        self.interaction = interaction
        self.memory = memory
        if interaction:
            self.text_in = nn.Linear(text_width, hub_dim)
            self.vision_in = nn.Linear(vision_width, hub_dim)
            self.text_out = nn.Linear(hub_dim, text_width)
            self.vision_out = nn.Linear(hub_dim, vision_width)
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialise the maps: consolidation maps as `nn.Linear` does, generation maps at zero."""
        if not self.interaction:
            return
        for linear in (self.text_in, self.vision_in):
            linear.reset_parameters()
        for linear in (self.text_out, self.vision_out):
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)

    def similarities(self, text_hidden: torch.Tensor, vision_hidden: torch.Tensor) -> torch.Tensor:
        """Consolidation: (B, M_t, d_h) x (B, M_v, d_h) -> (B, M_t, M_v), already divided by the temperature."""
        if self.similarity == "cosine":
            scores = F.normalize(text_hidden, dim=-1) @ F.normalize(vision_hidden, dim=-1).transpose(1, 2)
        else:
            scores = text_hidden @ vision_hidden.transpose(1, 2)
            if self.similarity == "scaled_dot":
                scores = scores / math.sqrt(self.hub_dim)
        return scores / self.temperature

    def activate(self, scores: torch.Tensor) -> torch.Tensor:
        """Activation: row-wise softmax (or one-hot top-1 for the 'hard' ablation), computed in float32."""
        if self.activation == "hard":
            return F.one_hot(scores.argmax(dim=-1), scores.shape[-1]).to(scores.dtype)
        return torch.softmax(scores.float(), dim=-1).to(scores.dtype)

    def forward(self, text_readout: torch.Tensor, vision_readout: torch.Tensor) -> HubOutput:
        """Consolidate pair k's read-outs and generate the carry into pair k+1 (see the class docstring)."""
        if text_readout.shape[0] != vision_readout.shape[0]:
            raise ValueError(
                f"The text tower has batch size {text_readout.shape[0]} but the vision tower has "
                f"{vision_readout.shape[0]}: give as many images as texts."
            )
        param_dtype = self.text_in.weight.dtype if self.interaction else text_readout.dtype
        # The hub may be float32 while a bf16/fp16 backbone feeds it: compute in the hub's dtype.
        text_readout = text_readout.to(param_dtype)
        vision_readout = vision_readout.to(param_dtype)
        text_carry = text_readout if self.memory else None
        vision_carry = vision_readout if self.memory else None
        if not self.interaction:
            return HubOutput(text_carry, vision_carry)

        text_hidden = self.text_in(F.layer_norm(text_readout, (self.text_width,)))
        vision_hidden = self.vision_in(F.layer_norm(vision_readout, (self.vision_width,)))
        scores = self.similarities(text_hidden, vision_hidden)
        text_activation = self.activate(scores)
        vision_activation = self.activate(scores.transpose(1, 2))
        text_cross = self.text_out(text_activation @ vision_hidden)
        vision_cross = self.vision_out(vision_activation @ text_hidden)
        return HubOutput(
            text_prompts=text_cross if text_carry is None else text_carry + text_cross,
            vision_prompts=vision_cross if vision_carry is None else vision_carry + vision_cross,
            text_activation=text_activation,
            vision_activation=vision_activation,
        )

    def extra_repr(self) -> str:
        return (
            f"text_width={self.text_width}, vision_width={self.vision_width}, hub_dim={self.hub_dim}, "
            f"similarity={self.similarity!r}, temperature={self.temperature}, activation={self.activation!r}, "
            f"interaction={self.interaction}, memory={self.memory}"
        )
