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


# ---- Missing modalities (docs/reliability.md, "Missing modalities") ----------------------------------------------
# How each tower's modality is named in the task model's inputs, for error messages.
_MODALITY_WORDS = {
    "text": ("text", "`input_ids`", "`text_present`"),
    "vision": ("image", "`pixel_values`", "`image_present`"),
}


@dataclass(frozen=True)
class ModalityPresence:
    """Which samples of a batch have which modality, in a lock-step forward where some may lack one.

    Attributes:
        ran: tower name ("text" / "vision") -> (B,) bool: the samples that tower runs. The tower's inputs hold exactly
            these rows, in batch order; a tower with no row is not run at all.
        kept: tower name -> (B,) bool: the samples whose tower outputs are used; every other sample gets the hub's
            learned stand-ins for that tower. Always within `ran`; modality dropout removes samples from it during
            training (their tower still runs, its outputs are discarded).
    """

    ran: dict[str, torch.Tensor]
    kept: dict[str, torch.Tensor]

    @classmethod
    def from_masks(cls, text: torch.Tensor, vision: torch.Tensor) -> ModalityPresence:
        """Presence from (B,) bool masks of the samples that have a text / an image."""
        return cls(ran={"text": text, "vision": vision}, kept={"text": text, "vision": vision})

    @classmethod
    def full(cls, batch_size: int, device: torch.device) -> ModalityPresence:
        """Every sample has both modalities."""
        every = torch.ones(batch_size, dtype=torch.bool, device=device)
        return cls.from_masks(every, every)

    @property
    def batch_size(self) -> int:
        """Number of samples B."""
        return self.ran["text"].shape[0]

    def with_modality_dropout(self, probability: float) -> ModalityPresence:
        """Drop one modality of each sample that has both, with `probability`; image or text equally likely.

        A sample never loses both modalities, and a sample that already lacks one keeps the other. Uses torch's
        global random generator (seeded by `transformers.set_seed` / `torch.manual_seed`).
        """
        text, vision = self.kept["text"], self.kept["vision"]
        device = text.device
        drop = (torch.rand(self.batch_size, device=device) < probability) & text & vision
        drop_image = torch.rand(self.batch_size, device=device) < 0.5
        return ModalityPresence(
            ran=self.ran,
            kept={"text": text & ~(drop & ~drop_image), "vision": vision & ~(drop & drop_image)},
        )

    def describe(self) -> str:
        """What is missing, in the words of the task model's inputs (for error messages)."""
        parts = []
        for tower in ("vision", "text"):
            missing = int((~self.kept[tower]).sum())
            if missing:
                noun, inputs, mask = _MODALITY_WORDS[tower]
                parts.append(
                    f"{missing} of {self.batch_size} samples have no {noun} ({inputs} is missing, or "
                    f"{mask} is False for them)"
                )
        return "; ".join(parts) or "`image_present` / `text_present` were given"


class ModalityStandIns(nn.Module):
    """Learned stand-ins for a modality a sample lacks (`MITPConfig(missing_modality=True)`).

    A missing tower is not run for a sample; the memory hub then receives, for that sample, these learned read-outs
    in place of the missing tower's prompt read-outs at every interaction pair that feeds a next pair, and the head
    receives a learned pooled feature in place of the missing tower's.

    Args:
        text_prompts: number of text prompts M_t.
        vision_prompts: number of vision prompts M_v.
        text_width: hidden width of the text tower.
        vision_width: hidden width of the vision tower.
        text_feature_dim: width of the pooled text features the head reads.
        vision_feature_dim: width of the pooled image features the head reads.
        readout_pairs: number of interaction pairs whose read-outs feed the hub (pairs - 1); 0 when there is no
            cross-modal interaction (a tower's read-outs then only feed its own next prompts, which a missing tower
            does not run), so no read-out stand-ins exist.
    """

    def __init__(
        self,
        *,
        text_prompts: int,
        vision_prompts: int,
        text_width: int,
        vision_width: int,
        text_feature_dim: int,
        vision_feature_dim: int,
        readout_pairs: int,
    ) -> None:
        super().__init__()
        self.prompt_lengths = {"text": text_prompts, "vision": vision_prompts}
        self.widths = {"text": text_width, "vision": vision_width}
        self.readout_pairs = readout_pairs
        self.readouts = nn.ParameterDict()
        if readout_pairs > 0:
            for tower in ("text", "vision"):
                shape = (readout_pairs, self.prompt_lengths[tower], self.widths[tower])
                self.readouts[tower] = nn.Parameter(torch.empty(shape))
        self.features = nn.ParameterDict(
            {
                "text": nn.Parameter(torch.empty(text_feature_dim)),
                "vision": nn.Parameter(torch.empty(vision_feature_dim)),
            }
        )
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Read-outs ~ N(0, 1), pooled features at zero."""
        # The hub layer-norms read-outs before using them, so only their direction matters; unit scale gives them
        # the gradient size of a typical normalised read-out. Zero features: a missing modality starts as "no
        # evidence" for the head.
        for param in self.readouts.values():
            nn.init.normal_(param)
        for param in self.features.values():
            nn.init.zeros_(param)

    def readout(self, tower: str, pair: int, batch_size: int) -> torch.Tensor:
        """Stand-in read-out of `tower` at interaction `pair`, expanded to (B, M, d)."""
        if tower in self.readouts:
            return self.readouts[tower][pair].expand(batch_size, -1, -1)
        # No interaction: the read-out only feeds the missing tower's own next prompts, which never run.
        feature = self.features[tower]
        shape = (batch_size, self.prompt_lengths[tower], self.widths[tower])
        return torch.zeros(shape, dtype=feature.dtype, device=feature.device)

    def extra_repr(self) -> str:
        return f"readout_pairs={self.readout_pairs}, prompt_lengths={self.prompt_lengths}, widths={self.widths}"


class MemoryHub(nn.Module):
    r"""Shared memory hub of one MITP adapter.

    Given the prompt read-outs of interaction pair k, $R_t \in \mathbb{R}^{B \times M_t \times d_t}$ (text) and
    $R_v \in \mathbb{R}^{B \times M_v \times d_v}$ (vision), the hub computes the carry into pair k+1:

    Consolidation (mapping connection into a shared width $d_h$, then similarity):
        $H_t = W_t\,\mathrm{LN}(R_t) + b_t$, $H_v = W_v\,\mathrm{LN}(R_v) + b_v$ (LN without parameters),
        $S = \mathrm{sim}(H_t, H_v) / \tau \in \mathbb{R}^{B \times M_t \times M_v}$ with sim one of
        scaled dot $H_t H_v^\top / \sqrt{d_h}$, cosine, or dot.

    Activation (softmax over the similarities, one direction per modality):
        $A_{t \leftarrow v} = \mathrm{softmax}_\text{row}(S)$, $A_{v \leftarrow t} = \mathrm{softmax}_\text{row}(S^\top)$,
        and the activated memory $Z_t = A_{t \leftarrow v} H_v$, $Z_v = A_{v \leftarrow t} H_t$ (`consolidation="cross"`).
        With `consolidation="joint"` each prompt's softmax runs over both modalities' prompts,
        $[A_{t \leftarrow v}, A_{t \leftarrow t}] = \mathrm{softmax}_\text{row}([S, \mathrm{sim}(H_t, H_t)/\tau])$ and
        $Z_t = A_{t \leftarrow v} H_v + A_{t \leftarrow t} H_t$ (the same for vision): the share a prompt takes from the
        other modality then grows with how well it matches there, which a softmax over the other modality alone
        cannot express (it always sums to one over the other modality's prompts).

    Generation (residual memory plus the activated other modality, mapped back to each tower's width, normalised and
    brought to the scale of that tower's read-out, then gated):
        $C_t = R_t + g_t \odot \mathrm{rms}(R_t)\,\mathrm{LN}(U_t Z_t)$,
        $C_v = R_v + g_v \odot \mathrm{rms}(R_v)\,\mathrm{LN}(U_v Z_v)$,
    with $\mathrm{rms}(R)$ the root mean square of each read-out token (a measured scale, not differentiated), LN
    without parameters and $g$ a learned per-channel gate.

    The layers of pair k+1 add their own learned prompts $E^{k+1}$ to the carry: $P^{k+1} = E^{k+1} + C^{k+1}$.
    With `memory=False` the residual $R$ is dropped; with `interaction=False` the cross term is dropped (and no maps
    are created). The gates $g$ start at `gate_init` (default 0, so a fresh adapter behaves like temporal prompts
    without interaction and learns how much to draw from the other modality; the maps then get their first gradient
    at the second step, once the gates have moved). The normalisation keeps the cross term at the scale of the
    tower's own hidden states however large the maps grow in training: without it, the generated prompts grew to
    more than ten times the hidden states' norm on the offline benchmark and colour accuracy fell from 0.82 to 0.20
    (`benchmarks/hub_scale.py`; docs/benchmarks.md, "Why the cross term is normalised").

    Args:
        text_width: hidden width of the text tower.
        vision_width: hidden width of the vision tower.
        hub_dim: width of the shared space (the rank of the mapping connection, shared over layers).
        similarity: "scaled_dot", "cosine" or "dot".
        temperature: similarities are divided by it before the activation.
        activation: "softmax" or "hard" (top-1, an ablation).
        interaction: whether the cross-modal term exists.
        memory: whether each tower's own read-out is carried to the next pair.
        stand_ins: learned stand-ins for a missing modality (`MITPConfig(missing_modality=True)`); None: every
            sample must have both modalities.
        modality_dropout: training only: probability that a sample with both modalities loses one of them.
        consolidation: "cross" (each prompt's activation runs over the other modality's prompts) or "joint" (over
            both modalities' prompts).
        gate_init: initial value of every gate channel.
        direction: "both" (dual encoders: each tower's next prompts draw on the other) or "vision_to_text" (decoder
            vision-language models: the vision tower runs to the end before the language model starts, so only the
            language model's prompts draw on the stored vision read-outs; the vision side keeps its own memory and
            has no generation map or gate).
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
        stand_ins: ModalityStandIns | None = None,
        modality_dropout: float = 0.0,
        consolidation: str = "cross",
        gate_init: float = 0.0,
        direction: str = "both",
    ) -> None:
        super().__init__()
        if direction not in ("both", "vision_to_text"):
            raise ValueError(f"`direction` must be 'both' or 'vision_to_text', got {direction!r}.")
        self.direction = direction
        self.text_width = text_width
        self.vision_width = vision_width
        self.hub_dim = hub_dim
        self.similarity = similarity
        self.temperature = temperature
        self.activation = activation
        self.interaction = interaction
        self.memory = memory
        self.consolidation = consolidation
        self.gate_init = gate_init
        if interaction:
            self.text_in = nn.Linear(text_width, hub_dim)
            self.vision_in = nn.Linear(vision_width, hub_dim)
            self.text_out = nn.Linear(hub_dim, text_width)
            self.text_gate = nn.Parameter(torch.empty(text_width))
            if direction == "both":
                self.vision_out = nn.Linear(hub_dim, vision_width)
                self.vision_gate = nn.Parameter(torch.empty(vision_width))
            self.reset_parameters()
        # Held by the hub so that they live in `mitp_hub[adapter]`: saved, loaded and switched with the adapter.
        self.stand_ins = stand_ins
        self.modality_dropout = modality_dropout

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialise the maps as `nn.Linear` does and the gates at `gate_init` (0: no cross-modal term at the start)."""
        if not self.interaction:
            return
        for linear in (self.text_in, self.vision_in, self.text_out, getattr(self, "vision_out", None)):
            if linear is not None:
                linear.reset_parameters()
        for gate in (self.text_gate, getattr(self, "vision_gate", None)):
            if gate is not None:
                nn.init.constant_(gate, self.gate_init)

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
        if self.interaction:
            # The hub may be float32 while a bf16/fp16 backbone feeds it, and with `device_map` the towers may sit on
            # other devices than the hub: compute on the hub's device, in its dtype.
            weight = self.text_in.weight
            text_readout = text_readout.to(device=weight.device, dtype=weight.dtype)
            vision_readout = vision_readout.to(device=weight.device, dtype=weight.dtype)
        text_carry = text_readout if self.memory else None
        vision_carry = vision_readout if self.memory else None
        if not self.interaction:
            return HubOutput(text_carry, vision_carry)

        text_hidden = self.text_in(F.layer_norm(text_readout, (self.text_width,)))
        vision_hidden = self.vision_in(F.layer_norm(vision_readout, (self.vision_width,)))
        scores = self.similarities(text_hidden, vision_hidden)
        both = self.direction == "both"
        vision_activation = vision_mixed = None
        if self.consolidation == "joint":
            # Each prompt's activation runs over both modalities' prompts: the share it takes from the other modality
            # grows with how well it matches there, against how well it matches its own modality.
            text_scores = torch.cat([scores, self.similarities(text_hidden, text_hidden)], dim=-1)
            text_joint = self.activate(text_scores)
            text_mixed = text_joint @ torch.cat([vision_hidden, text_hidden], dim=1)
            text_activation = text_joint[..., : vision_hidden.shape[1]]
            if both:
                vision_scores = torch.cat(
                    [scores.transpose(1, 2), self.similarities(vision_hidden, vision_hidden)], dim=-1
                )
                vision_joint = self.activate(vision_scores)
                vision_mixed = vision_joint @ torch.cat([text_hidden, vision_hidden], dim=1)
                vision_activation = vision_joint[..., : text_hidden.shape[1]]
        else:
            text_activation = self.activate(scores)
            text_mixed = text_activation @ vision_hidden
            if both:
                vision_activation = self.activate(scores.transpose(1, 2))
                vision_mixed = vision_activation @ text_hidden
        text_cross = self._generate(self.text_out(text_mixed), text_readout, self.text_gate)
        vision_prompts = vision_carry
        if both:
            vision_cross = self._generate(self.vision_out(vision_mixed), vision_readout, self.vision_gate)
            vision_prompts = vision_cross if vision_carry is None else vision_carry + vision_cross
        return HubOutput(
            text_prompts=text_cross if text_carry is None else text_carry + text_cross,
            vision_prompts=vision_prompts,
            text_activation=text_activation,
            vision_activation=vision_activation,
        )

    def carry_only(self, tower: str, readout: torch.Tensor) -> torch.Tensor | None:
        """The carry of `tower` into its next pair without a cross term: its own read-out (memory), or None with
        `memory=False`. The vision side of a decoder VLM (`direction="vision_to_text"`) gets this."""
        return readout if self.memory else None

    @staticmethod
    def _generate(mapped: torch.Tensor, readout: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """The gated cross term: `mapped` normalised, at the read-out's per-token scale (see the class docstring)."""
        scale = readout.detach().pow(2).mean(dim=-1, keepdim=True).sqrt()
        return gate * scale * F.layer_norm(mapped, mapped.shape[-1:])

    # ---- Missing modalities (docs/reliability.md, "Missing modalities") ------------------------------------------
    def resolve_presence(self, presence: ModalityPresence | None, batch_size: int) -> ModalityPresence | None:
        """Check that this hub can serve a batch with missing modalities, and apply modality dropout in training.

        Called by the lock-step scheduler when the first read-out of a forward arrives.

        Args:
            presence: which samples have which modality, or None when every sample has both.
            batch_size: number of samples (used when `presence` is None).

        Returns:
            The presence to use: None (no stand-ins needed), or `presence` with modality dropout applied. In training
            with stand-ins, always a presence, so that the stand-ins take part in every training step (DDP without
            `find_unused_parameters` needs a gradient for every trainable parameter at every step).

        Raises:
            ValueError: a modality is missing but this hub has no stand-ins (`missing_modality=False`).
        """
        if self.stand_ins is None:
            if presence is not None:
                raise ValueError(
                    f"{presence.describe()}, but the active MITP adapter was created with `missing_modality=False`, "
                    "so it has no stand-ins for a missing modality. Give every sample both an image and a text, or "
                    "create the adapter with `MITPConfig(missing_modality=True)` (see docs/reliability.md)."
                )
            return None
        if not self.training:
            return presence
        if presence is None:
            presence = ModalityPresence.full(batch_size, self.stand_ins.features["text"].device)
        if self.modality_dropout > 0:
            presence = presence.with_modality_dropout(self.modality_dropout)
        return presence

    def fill_readout(
        self, tower: str, pair: int, readout: torch.Tensor | None, presence: ModalityPresence
    ) -> torch.Tensor:
        """`tower`'s read-out of `pair` for the whole batch: its own rows where kept, the stand-in elsewhere.

        Args:
            tower: "text" or "vision".
            pair: the interaction pair.
            readout: (rows run, M, d) read-out of the tower, or None when the tower did not run at all.
            presence: which samples the tower ran and which of its outputs are kept.

        Returns:
            (B, M, d) in the hub's dtype.
        """
        stand_in = self.stand_ins.readout(tower, pair, presence.batch_size)
        if readout is None:
            return stand_in
        full = stand_in.index_put((presence.ran[tower],), readout.to(device=stand_in.device, dtype=stand_in.dtype))
        return torch.where(presence.kept[tower][:, None, None], full, stand_in)

    def fill_features(self, tower: str, features: torch.Tensor | None, presence: ModalityPresence) -> torch.Tensor:
        """`tower`'s pooled features for the whole batch: its own rows where kept, the learned stand-in elsewhere.

        Args:
            tower: "text" or "vision".
            features: (rows run, D) pooled features, or None when the tower did not run at all.
            presence: which samples the tower ran and which of its outputs are kept.

        Returns:
            (B, D) in the dtype of `features` (the stand-in's when None).
        """
        stand_in = self.stand_ins.features[tower]
        if features is not None:
            stand_in = stand_in.to(features.dtype)
        stand_in = stand_in.expand(presence.batch_size, -1)
        if features is None:
            return stand_in
        full = stand_in.index_put((presence.ran[tower],), features)
        return torch.where(presence.kept[tower][:, None], full, stand_in)

    def extra_repr(self) -> str:
        return (
            f"text_width={self.text_width}, vision_width={self.vision_width}, hub_dim={self.hub_dim}, "
            f"similarity={self.similarity!r}, temperature={self.temperature}, activation={self.activation!r}, "
            f"interaction={self.interaction}, memory={self.memory}, modality_dropout={self.modality_dropout}, "
            f"consolidation={self.consolidation!r}, gate_init={self.gate_init}"
        )
