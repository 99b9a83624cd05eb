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


TOKEN_SCORE_LIMIT = 1e4
"""Bound of each token-consolidation score (`MemoryHub.consolidate_tokens`)."""


def _token_mask(mask: torch.Tensor | None, tokens: torch.Tensor) -> torch.Tensor:
    """(B, L) bool mask of real tokens, on the tokens' device (all True when `mask` is None)."""
    if mask is None:
        return torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
    return mask.to(device=tokens.device).bool()


STD_FLOOR = 0.1
"""`Standardizer`: no channel's standard deviation is taken below this fraction of the median channel's."""


class Standardizer(nn.Module):
    """Per-channel standardisation whose statistics are taken from the first training batch (ActNorm-style).

    Frozen towers keep a few channels at large, nearly constant values (BERT and CLIP both do); a layer norm over each
    token leaves them dominant. This module subtracts each channel's mean and divides by its standard deviation, both
    measured on the first training batch with at least two rows that passes through it (all processes together under
    `torch.distributed`), and keeps them fixed: they are buffers, saved, loaded and switched with the adapter, not
    trained (the maps after it learn any rescaling; an optimizer's steps on them would undo the standardisation of
    the wide channels). Until that first training batch, `scale` is zero and the output is zero.

    Args:
        width: number of channels.
    """

    def __init__(self, width: int) -> None:
        super().__init__()
        self.register_buffer("shift", torch.zeros(width))
        self.register_buffer("scale", torch.zeros(width))

    @property
    def initialised(self) -> bool:
        """Whether the statistics were taken (or loaded)."""
        if self.scale.is_meta:  # shapes only (cost estimates on the meta device): nothing to measure
            return True
        return bool(self.scale.ne(0).any())

    @torch.no_grad()
    def initialise(self, rows: torch.Tensor) -> None:
        """Take mean and standard deviation per channel from `rows` (N, width)."""
        # In float64 (MPS has none: float32 there), so that the statistics do not depend on how the rows are split
        # over processes (DDP, FSDP).
        rows = rows.detach().to(torch.float32 if rows.device.type == "mps" else torch.float64)
        stats = torch.stack([rows.sum(0), rows.pow(2).sum(0), rows.new_full(rows.shape[-1:], rows.shape[0])])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(stats)
        if float(stats[2, 0]) < 2:  # one row has no spread: wait for a batch with more (every process agrees)
            return
        mean = stats[0] / stats[2].clamp_min(1)
        std = (stats[1] / stats[2].clamp_min(1) - mean.pow(2)).clamp_min(0).sqrt()
        # A channel (nearly) constant in that batch gets the scale of a typical channel, not an enormous one that would
        # amplify any later change in it (a quantized backbone's rounding, a shift in the data) a thousandfold.
        floor = max(float(std.median()) * STD_FLOOR, 1e-6)
        self.shift.copy_(mean.to(self.shift.dtype))
        self.scale.copy_((1 / std.clamp_min(floor)).to(self.scale.dtype))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Standardise `x` (..., width); `mask` (same leading shape, bool) marks the rows that count for the first
        batch's statistics (padding does not)."""
        if self.training and not self.initialised:
            self.initialise(x.reshape(-1, x.shape[-1]) if mask is None else x[mask])
        return (x - self.shift) * self.scale


class MemoryReadout(nn.Module):
    r"""What the memory hub hands the classification head (`MITPConfig(token_consolidation=..., fusion_hidden_size=...)`).

    **Token consolidation** (the hub's last consolidation, on the tokens both towers end with): the text tokens
    $X_t$ and the image tokens $X_v$ are standardised per channel (`Standardizer`), mapped into the hub's shared space
    by the hub's own maps ($W_t$, $W_v$, shared with the prompt consolidation) and split into `heads` heads; per head,
    $S = \mathrm{sim}(W_t X_t, W_v X_v) / 	au$ (one row per text token), the activation $A = \mathrm{softmax}(S)$ over the
    image tokens, and the activated similarity $\sum_j A_{ij} S_{ij}$ of each text token, averaged over the real text
    tokens: `heads` numbers per sample that say how well what the text names is found in the image.

    **Fusion**: a one-hidden-layer MLP (GELU) on the standardised pooled features of both towers and those numbers,
    whose output is added to the pooled features the head reads. It is the non-linear step a yes/no question needs
    ("is there *not* a red shape?" flips the answer the similarity gives); without token consolidation it is a
    late-fusion MLP on the pooled features (the `interaction=False` ablation keeps it, so the ablation has the same head).

    Args:
        feature_dim: width of the concatenated pooled features the head reads.
        heads: number of similarity heads (0: no token consolidation).
        hidden_size: width of the fusion MLP (0: none; the similarities then go through one linear map).
        text_width / vision_width: hidden widths of the towers (for the token standardisers).
    """

    def __init__(self, feature_dim: int, heads: int, hidden_size: int, text_width: int, vision_width: int) -> None:
        super().__init__()
        self.heads = heads
        self.features = Standardizer(feature_dim)
        if heads:
            self.text_tokens = Standardizer(text_width)
            self.vision_tokens = Standardizer(vision_width)
        inputs = feature_dim + heads
        if hidden_size:
            self.fusion = nn.Sequential(nn.Linear(inputs, hidden_size), nn.GELU(), nn.Linear(hidden_size, feature_dim))
        else:
            self.fusion = nn.Linear(heads, feature_dim) if heads else None

    def forward(self, features: torch.Tensor, scores: torch.Tensor | None) -> torch.Tensor:
        """`features` (B, D) plus the fusion of their standardised values and the similarities `scores` (B, heads),
        in the read-out's dtype (the adapter's float32 under a half-precision backbone, whose range the sum may
        exceed)."""
        if self.fusion is None:
            return features
        dtype = self.features.shift.dtype
        features = features.to(dtype)
        if isinstance(self.fusion, nn.Linear):
            return features + self.fusion(scores.to(dtype))
        parts = [self.features(features)]
        if self.heads:
            parts.append(scores.to(dtype))
        return features + self.fusion(torch.cat(parts, dim=-1))


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

    Generation (gated residual memory plus the activated other modality, mapped back to each tower's width,
    normalised and brought to the scale of that tower's read-out, then gated):
        $C_t = m_t \odot R_t + g_t \odot \mathrm{rms}(R_t)\,\mathrm{LN}(U_t Z_t)$,
        $C_v = m_v \odot R_v + g_v \odot \mathrm{rms}(R_v)\,\mathrm{LN}(U_v Z_v)$,
    with $\mathrm{rms}(R)$ the root mean square of each read-out token (a measured scale, not differentiated), LN
    without parameters, $g$ a learned per-channel gate and $m$ a learned per-channel memory gate (starting at
    `memory_gate_init`: a read-out carried whole, at the scale of the towers' hidden states, into the next layer's
    prompts disturbs the frozen layers above it; docs/benchmarks.md, "Does the interaction carry the task?").

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
        token_heads: number of heads of the token consolidation after the last pair (`MemoryReadout`); 0: none.
            Needs `interaction` (it uses the hub's maps).
        fusion_hidden_size: width of the fusion MLP of `MemoryReadout`; 0: none.
        feature_dim: width of the pooled features the head reads (needed when either of the two above is set).
        memory_gate_init: initial value of every channel of the memory gates $m$ (1.0: the read-out carried whole).
            None: no memory gates (an adapter with one pair carries nothing, so it gets none).
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
        token_heads: int = 0,
        fusion_hidden_size: int = 0,
        feature_dim: int = 0,
        memory_gate_init: float | None = 1.0,
    ) -> None:
        super().__init__()
        if direction not in ("both", "vision_to_text"):
            raise ValueError(f"`direction` must be 'both' or 'vision_to_text', got {direction!r}.")
        if token_heads and hub_dim % token_heads:
            raise ValueError(f"`hub_dim`={hub_dim} must be divisible by the number of token heads ({token_heads}).")
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
        if interaction or token_heads:
            # The mapping connection into the shared space: used by the prompt consolidation between pairs and by the
            # token consolidation after the last pair.
            self.text_in = nn.Linear(text_width, hub_dim)
            self.vision_in = nn.Linear(vision_width, hub_dim)
        if interaction:
            self.text_out = nn.Linear(hub_dim, text_width)
            self.text_gate = nn.Parameter(torch.empty(text_width))
            if direction == "both":
                self.vision_out = nn.Linear(hub_dim, vision_width)
                self.vision_gate = nn.Parameter(torch.empty(vision_width))
        self.memory_gate_init = memory_gate_init
        if memory and memory_gate_init is not None:
            self.text_memory_gate = nn.Parameter(torch.full((text_width,), float(memory_gate_init)))
            self.vision_memory_gate = nn.Parameter(torch.full((vision_width,), float(memory_gate_init)))
        self.reset_parameters()
        self.readout = None
        if token_heads or fusion_hidden_size:
            self.readout = MemoryReadout(feature_dim, token_heads, fusion_hidden_size, text_width, vision_width)
        # Held by the hub so that they live in `mitp_hub[adapter]`: saved, loaded and switched with the adapter.
        self.stand_ins = stand_ins
        self.modality_dropout = modality_dropout

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialise the maps as `nn.Linear` does and the gates at `gate_init` (0: no cross-modal term at the start)."""
        for name in ("text_in", "vision_in", "text_out", "vision_out"):
            if hasattr(self, name):
                getattr(self, name).reset_parameters()
        for name in ("text_memory_gate", "vision_memory_gate"):
            if hasattr(self, name):
                nn.init.constant_(getattr(self, name), self.memory_gate_init)
        if not self.interaction:
            return
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
        text_carry = self.carry_only("text", text_readout)
        vision_carry = self.carry_only("vision", vision_readout)
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

    @property
    def token_heads(self) -> int:
        """Number of token-consolidation heads (0: the hub does not consolidate the towers' output tokens)."""
        return self.readout.heads if self.readout is not None else 0

    def consolidate_tokens(
        self,
        text_tokens: torch.Tensor,
        text_mask: torch.Tensor | None,
        vision_tokens: torch.Tensor,
        vision_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """The hub's last consolidation, on the tokens both towers end with (see `MemoryReadout`).

        Args:
            text_tokens: (B, L_t, d_text) the text tower's output tokens.
            text_mask: (B, L_t) 1 for real tokens (None: all real).
            vision_tokens: (B, L_v, d_vision) the vision tower's output tokens.
            vision_mask: (B, L_v) 1 for real patches (None: all real).

        Returns:
            (B, token_heads) the activated similarity of each head, averaged over the real text tokens.
        """
        readout, weight = self.readout, self.text_in.weight
        heads = readout.heads
        text_tokens = text_tokens.to(device=weight.device, dtype=weight.dtype)
        vision_tokens = vision_tokens.to(device=weight.device, dtype=weight.dtype)
        text_mask = _token_mask(text_mask, text_tokens)
        vision_mask = _token_mask(vision_mask, vision_tokens)
        text = self.text_in(readout.text_tokens(text_tokens, text_mask))
        vision = self.vision_in(readout.vision_tokens(vision_tokens, vision_mask))
        batch, text_len, vision_len = text.shape[0], text.shape[1], vision.shape[1]
        text = text.view(batch, text_len, heads, -1).transpose(1, 2)  # (B, H, L_t, d)
        vision = vision.view(batch, vision_len, heads, -1).transpose(1, 2)  # (B, H, L_v, d)
        if self.similarity == "cosine":
            scores = F.normalize(text, dim=-1) @ F.normalize(vision, dim=-1).transpose(-1, -2)
        else:
            scores = text @ vision.transpose(-1, -2)
            if self.similarity == "scaled_dot":
                scores = scores / math.sqrt(text.shape[-1])
        scores = scores / self.temperature  # (B, H, L_t, L_v)
        hidden = ~vision_mask[:, None, None, :]
        if self.activation == "hard":
            activation = F.one_hot(scores.masked_fill(hidden, float("-inf")).argmax(-1), vision_len).to(scores.dtype)
        else:
            activation = torch.softmax(scores.float().masked_fill(hidden, float("-inf")), dim=-1).to(scores.dtype)
        per_token = (activation * scores.masked_fill(hidden, 0)).sum(-1)  # (B, H, L_t)
        real = text_mask[:, None, :].to(per_token.dtype)
        consolidated = (per_token * real).sum(-1) / real.sum(-1).clamp_min(1)
        # Far above what training produces (a few hundred at most on the offline job), the limit keeps an extreme
        # hub (maps blown up, temperature near zero) from sending a half-precision tower gradients it cannot hold.
        return consolidated.clamp(-TOKEN_SCORE_LIMIT, TOKEN_SCORE_LIMIT)

    def carry_only(self, tower: str, readout: torch.Tensor) -> torch.Tensor | None:
        """The carry of `tower` into its next pair without a cross term: its own read-out through the memory gate, or
        None with `memory=False`. The vision side of a decoder VLM (`direction="vision_to_text"`) gets this."""
        if not self.memory:
            return None
        gate = getattr(self, f"{tower}_memory_gate", None)
        return readout if gate is None else readout * gate.to(device=readout.device, dtype=readout.dtype)

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
            f"consolidation={self.consolidation!r}, gate_init={self.gate_init}, token_heads={self.token_heads}"
        )
