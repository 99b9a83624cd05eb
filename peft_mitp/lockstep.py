"""Lock-step execution of two stock tower forwards, with the memory hub between them.

MITP's hub needs both towers' read-outs of interaction pair k before either tower may run pair k+1, but dual
encoders run one whole tower, then the other. Instead of re-implementing each family's forward, each tower's stock
feature function runs as a coroutine (a greenlet). The wrapped interaction layers (`MITPLayer`) hand control back to
the scheduler here, asking for their prompts or handing in their read-outs; the scheduler runs the hub as soon as
both read-outs of a pair are in.

All per-forward state lives in `run_lockstep`'s local variables, so concurrent forwards in different threads do not
see each other. Greenlets share one OS thread, so grad mode and autocast are the same in both towers.

A tower whose weights below its first interaction layer are all frozen runs those layers without autograd (the
interaction layer turns the caller's grad mode back on); a tower with anything trainable there (LoRA, IA3, full
fine-tuning, a trainable embedding) runs in the caller's grad mode throughout, so gradient reaches those weights.
"""

from __future__ import annotations

import contextvars
from collections import deque
from collections.abc import Callable, Collection
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import greenlet
import torch

from .families import TokenArgument
from .hub import HubOutput, MemoryHub, ModalityPresence
from .mixed import current_mixed_batch, mixed_carry_only, mixed_hub_output

TOWERS = ("text", "vision")


@dataclass
class _PromptRequest:
    tower: str
    pair: int


@dataclass
class _Readout:
    tower: str
    pair: int
    readout: torch.Tensor
    hub: MemoryHub


class _Tower(greenlet.greenlet):
    """A tower forward running as a coroutine of the scheduler."""

    def __init__(
        self,
        name: str,
        fn: Callable[[], Any],
        grad_enabled: bool,
        attn_implementation: str | None,
        token_arguments: tuple[TokenArgument, ...] = (),
        frozen_below: bool = True,
    ) -> None:
        super().__init__(run=self._body)
        # A new greenlet starts in an empty contextvars context: give it a copy of the caller's, so context-local
        # settings (torch config patches, any library's ContextVars) reach the tower as they would without lock-step.
        self.gr_context = contextvars.copy_context()
        self.name = name
        self.fn = fn
        self.grad_enabled = grad_enabled
        # True: nothing below the tower's first interaction layer is trainable, so those layers run without autograd
        # and the first interaction layer cuts the graph at its input.
        self.frozen_below = frozen_below
        # What the tower's interaction layers need to extend their inputs by the prompts: the attention implementation
        # (mask format) and the per-token call arguments besides the mask (rotary embeddings, pairwise biases).
        self.attn_implementation = attn_implementation
        self.token_arguments = token_arguments

    def _body(self, *_: Any) -> Any:
        # With a frozen lower part, extraction layers below the first interaction layer run without autograd; the
        # first interaction layer turns the caller's grad mode back on (see `request_prompts`).
        with torch.no_grad() if self.frozen_below else nullcontext():
            return self.fn()

    def request_prompts(self, pair: int) -> torch.Tensor | None:
        """Called by an interaction layer: wait for the hub's carry into `pair` (None for the first pair)."""
        torch.set_grad_enabled(self.grad_enabled)
        return self.parent.switch(_PromptRequest(self.name, pair))

    def send_readout(self, pair: int, readout: torch.Tensor, hub: MemoryHub) -> None:
        """Called by an interaction layer after it ran: hand the prompts' read-out to the scheduler."""
        self.parent.switch(_Readout(self.name, pair, readout, hub))


def current_tower(kind: str | None = None) -> _Tower | _StreamPart | None:
    """The tower the caller runs in: a lock-step tower coroutine, or the `kind` part of a decoder VLM's forward
    (`run_stream`); None outside both."""
    current = greenlet.getcurrent()
    if isinstance(current, _Tower):
        return current
    stream = _STREAM.get()
    if stream is None or kind is None:
        return None
    return stream.parts[kind]


@dataclass
class LockstepResult:
    """Outputs of a lock-step forward.

    Attributes:
        text: what the text feature function returned (None when the text tower did not run).
        vision: what the vision feature function returned (None when the vision tower did not run).
        hub_outputs: the hub's outputs, one per pair that fed a next pair, in pair order.
        pairs: number of interaction pairs that ran.
        hub: the memory hub of the active adapter (None when no interaction layer ran: no adapter, or disabled).
        presence: with missing modalities (or, in training, an adapter with stand-ins), which samples each tower
            ran and which of its outputs were kept (after modality dropout); the caller completes the pooled
            features with `hub.fill_features`. None when every sample used both towers' outputs.
    """

    text: Any
    vision: Any
    hub_outputs: list[HubOutput] = field(default_factory=list)
    pairs: int = 0
    hub: MemoryHub | None = None
    presence: ModalityPresence | None = None


class LockstepError(RuntimeError):
    """The two towers' interaction layers did not pair up."""


# torch.compile cannot trace greenlet switches: `torch.compile(model)` gets a graph break here and runs the lock-step
# part eagerly (modules compiled on their own, such as the hub or encoder layers, stay compiled). docs/reliability.md.
_NOT_TRACED = (
    "MITP's lock-step scheduler switches between greenlets, which torch.compile cannot trace. Compile without "
    "fullgraph=True, or compile the memory hub and the encoder layers themselves (docs/reliability.md)."
)


def _not_traced(fn: Callable[..., Any]) -> Callable[..., Any]:
    try:
        return torch.compiler.disable(fn, reason=_NOT_TRACED)
    except TypeError:  # torch < 2.6 has no `reason`
        return torch.compiler.disable(fn)


@_not_traced
def run_lockstep(
    text_fn: Callable[[], Any] | None,
    vision_fn: Callable[[], Any] | None,
    attn_implementations: dict[str, str | None] | None = None,
    presence: ModalityPresence | None = None,
    token_arguments: dict[str, tuple[TokenArgument, ...]] | None = None,
    frozen_below: Collection[str] = TOWERS,
) -> LockstepResult:
    """Run `text_fn` and `vision_fn` (the stock tower forwards) in lock-step with the memory hub between them.

    The scheduler is driven by the layers' messages, not by counting layers: a tower that asks for the prompts of
    pair k waits until both towers handed in their read-outs of pair k-1, then receives the hub's carry. If one tower
    finishes while the other still waits, the layers did not pair up and `LockstepError` is raised. An exception in
    either tower ends the other one (nothing is left half-run) and propagates.

    With `presence` (some samples lack a modality), each tower runs only the samples that have its modality, and
    before each hub call the scheduler completes both read-outs to the whole batch with the hub's learned stand-ins
    (`MemoryHub.fill_readout`); each tower then receives the carry of its own rows. The hub mixes prompts only
    within a sample, so a sample's result does not depend on the other samples of the batch.

    Args:
        text_fn: runs the text tower and returns its features; None: no sample has a text (the tower is not run).
        vision_fn: runs the vision tower and returns its features; None: no sample has an image.
        attn_implementations: per tower, the `_attn_implementation` the interaction layers need for mask extension.
        presence: which samples each tower runs (its inputs hold exactly those rows); None: all samples, both towers.
        token_arguments: per tower, the per-token call arguments of its layers besides the attention mask
            (`ResolvedTower.token_arguments`), which the interaction layers extend by the prompts.
        frozen_below: the towers with nothing trainable below their first interaction layer: they run those layers
            without autograd. Default: both (a frozen backbone). Leave out a tower whose lower weights train (LoRA,
            IA3, full fine-tuning), or it gets no gradient: `MITPForImageTextClassification` derives this from its
            parameters on every forward.

    Returns:
        `LockstepResult`.
    """
    grad_enabled = torch.is_grad_enabled()
    impls = attn_implementations or {}
    per_token = token_arguments or {}
    fns = {"text": text_fn, "vision": vision_fn}
    if None in fns.values() and presence is None:
        raise ValueError("A tower without a feature function needs `presence` (which samples lack its modality).")
    towers = {
        name: _Tower(name, fn, grad_enabled, impls.get(name), per_token.get(name, ()), name in frozen_below)
        for name, fn in fns.items()
        if fn is not None
    }
    if not towers:
        raise ValueError("Neither tower has anything to run: every sample lacks both modalities.")
    results: dict[str, Any] = {name: None for name in fns}
    mixed = current_mixed_batch()
    hub: MemoryHub | None = None
    first_readout = True
    readouts: dict[int, dict[str, _Readout]] = {}
    carries: dict[tuple[str, int], torch.Tensor | None] = {}
    waiting: dict[str, int] = {}
    hub_outputs: dict[int, HubOutput] = {}
    pairs_run = dict.fromkeys(towers, 0)
    runnable: deque[tuple[str, Any]] = deque((name, None) for name in towers)

    def serve(name: str, pair: int) -> bool:
        """Answer `name`'s request for `pair` if the hub can produce it now."""
        if pair == 0:
            runnable.append((name, None))
            return True
        if (name, pair) not in carries:
            done = readouts.get(pair - 1, {})
            if len(done) < len(towers):
                return False
            pair_hub = next(iter(done.values())).hub
            if any(r.hub is not pair_hub for r in done.values()):
                raise LockstepError(f"Interaction pair {pair - 1} mixes two adapters' hubs; activate one adapter.")
            if isinstance(pair_hub, torch.nn.ModuleDict):  # a mixed-adapter batch: each adapter's hub, its samples
                out = mixed_hub_output(pair_hub, mixed, done["text"].readout, done["vision"].readout)
            elif presence is None:
                out = pair_hub(done["text"].readout, done["vision"].readout)
            else:
                filled = {
                    tower: pair_hub.fill_readout(tower, pair - 1, r.readout if r else None, presence)
                    for tower, r in ((t, done.get(t)) for t in TOWERS)
                }
                out = pair_hub(filled["text"], filled["vision"])
            hub_outputs[pair - 1] = out
            for tower, carry in (("text", out.text_prompts), ("vision", out.vision_prompts)):
                if presence is not None and carry is not None:
                    carry = carry[presence.ran[tower]]  # the tower runs only its own rows
                carries[(tower, pair)] = carry
            del readouts[pair - 1]
        runnable.append((name, carries.pop((name, pair))))
        return True

    try:
        while runnable:
            name, value = runnable.popleft()
            tower = towers[name]
            message = tower.switch(value)
            if tower.dead:
                results[name] = message
                continue
            if isinstance(message, _PromptRequest):
                pairs_run[name] = max(pairs_run[name], message.pair + 1)
                if not serve(name, message.pair):
                    waiting[name] = message.pair
            elif isinstance(message, _Readout):
                if name in readouts.get(message.pair, {}):
                    raise LockstepError(f"The {name} tower ran interaction pair {message.pair} twice in one forward.")
                if first_readout:
                    # The active adapter's hub is known from here on: it checks what it can serve.
                    first_readout = False
                    hub = message.hub
                    if not isinstance(hub, torch.nn.ModuleDict):  # mixed batches have no missing modalities
                        presence = hub.resolve_presence(presence, message.readout.shape[0])
                readouts.setdefault(message.pair, {})[name] = message
                runnable.append((name, None))
                other = "vision" if name == "text" else "text"
                if waiting.get(other) == message.pair + 1 and serve(other, message.pair + 1):
                    del waiting[other]
            else:  # pragma: no cover - only the layers switch to the scheduler
                raise LockstepError(f"Unexpected message from the {name} tower: {message!r}")
        if waiting:
            stuck = ", ".join(f"the {n} tower waits for pair {p}" for n, p in waiting.items())
            raise LockstepError(
                f"The towers' interaction layers did not pair up ({stuck}, but the other tower finished). Give "
                "`text_layers` and `vision_layers` the same number of entries."
            )
        if len(pairs_run) == 2 and pairs_run["text"] != pairs_run["vision"]:
            raise LockstepError(
                f"The text tower ran {pairs_run['text']} interaction layers but the vision tower ran "
                f"{pairs_run['vision']}: the towers' interaction layers did not pair up. Give `text_layers` and "
                "`vision_layers` the same number of entries."
            )
    finally:
        for tower in towers.values():
            if not tower.dead:
                tower.throw(greenlet.GreenletExit)
    return LockstepResult(
        text=results["text"],
        vision=results["vision"],
        hub_outputs=[hub_outputs[k] for k in sorted(hub_outputs)],
        pairs=max(pairs_run.values()),
        hub=hub,
        presence=presence,
    )


# ---------------------------------------------------------------------------------- decoder vision-language models
_STREAM: contextvars.ContextVar[_Stream | None] = contextvars.ContextVar("mitp_stream", default=None)


class _StreamPart:
    """One part (vision tower or language model) of a decoder VLM's forward, as its interaction layers see it."""

    def __init__(
        self,
        stream: _Stream,
        name: str,
        attn_implementation: str | None,
        token_arguments: tuple[TokenArgument, ...],
        frozen_below: bool,
        packed: bool = False,
    ) -> None:
        self.packed = packed
        self.stream = stream
        self.name = name
        self.attn_implementation = attn_implementation
        self.token_arguments = token_arguments
        self.frozen_below = frozen_below

    def request_prompts(self, pair: int) -> torch.Tensor | None:
        """Called by an interaction layer: the hub's carry into `pair` (None for the first pair)."""
        return self.stream.request(self.name, pair)

    def send_readout(self, pair: int, readout: torch.Tensor, hub: MemoryHub) -> None:
        """Called by an interaction layer after it ran: store the prompts' read-out in the hub's memory."""
        self.stream.store(self.name, pair, readout, hub)


class _Stream:
    """The state of one decoder-VLM forward: the vision read-outs kept for the language model's interaction layers.

    The vision tower runs all its interaction layers first; each gets its own read-out of the previous pair as
    carry (memory, no cross term: the language model has not run yet). The language model's pair k+1 then gets the
    hub's consolidation of its own read-out of pair k (memory) with the stored vision read-out of pair k+1, the
    vision layer paired with it.
    """

    def __init__(
        self,
        pairs: int,
        grad_enabled: bool,
        attn_implementations: dict[str, str | None],
        token_arguments: dict[str, tuple[TokenArgument, ...]],
        frozen_below: Collection[str],
        packed: Collection[str] = (),
    ) -> None:
        self.pairs = pairs
        self.grad_enabled = grad_enabled
        self.frozen_below = set(frozen_below)
        self.parts = {
            name: _StreamPart(self, name, attn_implementations.get(name), token_arguments.get(name, ()),
                              name in self.frozen_below, name in packed)
            for name in TOWERS
        }
        self.readouts: dict[str, dict[int, torch.Tensor]] = {name: {} for name in TOWERS}
        self.hub: MemoryHub | None = None
        self.hub_outputs: list[HubOutput] = []
        self.language_started = False
        # Vision rows (images, or tiles / crops of images) -> sample index; None: one row per sample.
        self.vision_rows: torch.Tensor | None = None

    def request(self, name: str, pair: int) -> torch.Tensor | None:
        torch.set_grad_enabled(self.grad_enabled)
        if name == "vision":
            if self.language_started:
                raise LockstepError(
                    "A vision interaction layer ran after the language model started: this model does not run its "
                    "vision tower before its language model, which MITP's decoder-VLM support needs."
                )
            if pair == 0:
                return None
            readout = self._readout("vision", pair - 1)
            if isinstance(self.hub, torch.nn.ModuleDict):  # a mixed-adapter batch: each sample's adapter's memory
                return mixed_carry_only(self.hub, current_mixed_batch(), "vision", readout)
            return self.hub.carry_only("vision", readout)
        self.language_started = True
        if pair == 0:
            return None
        text = self._readout("text", pair - 1)
        # The language model's pair k draws on the vision read-out of its paired layer, pair k: the vision tower has
        # run all its interaction layers by now. (The first vision read-out feeds no language pair; the first vision
        # prompts still reach the later read-outs through the vision tokens and the vision memory.)
        vision = self.readouts["vision"].get(pair)
        if vision is None:
            raise LockstepError(
                f"The language model asks for interaction pair {pair}, but the vision tower handed in no read-out of "
                f"pair {pair} (did the vision tower run? Give `pixel_values`). Give `text_layers` and "
                "`vision_layers` the same number of entries."
            )
        vision = self._per_sample(vision, text.shape[0])
        if isinstance(self.hub, torch.nn.ModuleDict):
            out = mixed_hub_output(self.hub, current_mixed_batch(), text, vision)
        else:
            out = self.hub(text, vision)
        self.hub_outputs.append(out)
        return out.text_prompts

    def _per_sample(self, vision: torch.Tensor, batch_size: int) -> torch.Tensor:
        """The vision read-out per sample: the mean over a sample's rows when an image is split into tiles / crops."""
        rows = self.vision_rows
        if rows is None:
            if vision.shape[0] != batch_size:
                raise ValueError(
                    f"The vision tower ran {vision.shape[0]} images for {batch_size} texts; MITP on this model needs "
                    "exactly one image per text."
                )
            return vision
        rows = rows.to(vision.device)
        if rows.shape[0] != vision.shape[0]:
            raise LockstepError(f"{rows.shape[0]} vision rows were expected, the vision tower ran {vision.shape[0]}.")
        counts = torch.bincount(rows, minlength=batch_size)
        if counts.shape[0] != batch_size or bool((counts == 0).any()):
            raise ValueError("Every text needs an image: some samples have none (check `pixel_values`).")
        total = vision.new_zeros((batch_size, *vision.shape[1:])).index_add(0, rows, vision)
        return total / counts.to(vision.dtype).view(-1, 1, 1)

    def _readout(self, name: str, pair: int) -> torch.Tensor:
        try:
            return self.readouts[name][pair]
        except KeyError:
            raise LockstepError(f"The {name} part skipped interaction pair {pair}.") from None

    def store(self, name: str, pair: int, readout: torch.Tensor, hub: MemoryHub) -> None:
        if self.hub is None:
            self.hub = hub
        elif hub is not self.hub:
            raise LockstepError(f"Interaction pair {pair} mixes two adapters' hubs; activate one adapter.")
        if pair in self.readouts[name]:
            raise LockstepError(f"The {name} part ran interaction pair {pair} twice in one forward.")
        self.readouts[name][pair] = readout
        if name == "vision" and pair == self.pairs - 1 and "text" in self.frozen_below:
            # Nothing above the last vision interaction layer needs a gradient: the language model's first
            # interaction layer cuts the graph at its input. Run the rest of the vision tower, the projector and the
            # language model's lower layers without autograd.
            torch.set_grad_enabled(False)


@dataclass
class StreamResult:
    """Outputs of a decoder-VLM forward under `run_stream`.

    Attributes:
        output: what the forward function returned.
        hub_outputs: the hub's outputs, one per language pair that fed a next pair, in pair order.
        hub: the active adapter's memory hub (None when no interaction layer ran).
        pairs: the interaction pairs the language model ran.
    """

    output: Any
    hub_outputs: list[HubOutput]
    hub: MemoryHub | None
    pairs: int


@_not_traced
def run_stream(
    fn: Callable[[], Any],
    *,
    pairs: int,
    attn_implementations: dict[str, str | None] | None = None,
    token_arguments: dict[str, tuple[TokenArgument, ...]] | None = None,
    frozen_below: Collection[str] = TOWERS,
    vision_rows: torch.Tensor | None = None,
    packed: Collection[str] = (),
) -> StreamResult:
    """Run a decoder VLM's stock forward `fn` with the memory hub between its vision tower and its language model.

    Args:
        fn: the stock forward (vision tower, projector, language model), run as it is.
        pairs: interaction pairs of the active adapter (the vision part's last read-out ends autograd until the
            language model's first interaction layer when that part is frozen below).
        attn_implementations: per part ("vision", "text" = the language model), for mask extension.
        token_arguments: per part, the per-token call arguments of its layers besides the attention mask.
        frozen_below: the parts with nothing trainable below their first interaction layer.
        vision_rows: (R,) the sample of each row the vision tower runs, when images are split into tiles or crops
            (their read-outs are averaged per sample before the hub); None: one row per sample.
        packed: the parts whose layers take packed (N, D) sequences split by `cu_seqlens`.

    Returns:
        `StreamResult`.

    Raises:
        LockstepError: the parts' interaction layers did not pair up.
    """
    grad_enabled = torch.is_grad_enabled()
    stream = _Stream(pairs, grad_enabled, attn_implementations or {}, token_arguments or {}, frozen_below, packed)
    stream.vision_rows = vision_rows
    token = _STREAM.set(stream)
    try:
        # Without autograd from the start only when neither part has trainable weights below its first interaction
        # layer (a LoRA on the language model needs it there even when no MITP layer turns it back on).
        with torch.no_grad() if stream.frozen_below >= set(TOWERS) else nullcontext():
            output = fn()
    finally:
        _STREAM.reset(token)
        torch.set_grad_enabled(grad_enabled)
    ran = {name: len(r) for name, r in stream.readouts.items()}
    if stream.hub is not None and ran["text"] != ran["vision"]:
        raise LockstepError(
            f"The language model ran {ran['text']} interaction layers but the vision tower ran {ran['vision']}: the "
            "parts' interaction layers did not pair up. Give `text_layers` and `vision_layers` the same number of "
            "entries (and `pixel_values` with every text)."
        )
    return StreamResult(output=output, hub_outputs=stream.hub_outputs, hub=stream.hub, pairs=ran["text"])
