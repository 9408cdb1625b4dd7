"""Per-forward events of one request, for live views (the server's ``trimode_events`` stream).

An ``EventRecorder`` is an ``on_step`` hook: after every forward a request took part in, it
turns what the decoder recorded (``Sequence.record``: the positions this forward produced,
unmasked, drafted or accepted; the request needs ``SamplingParams.trace``), the committed
text and the strategy's current block (read as ``visual.py`` reads it) into one
``ForwardEvent``: the block's slots (masked, provisional, committed), which slots were
drafted, accepted or rejected, the tokens committed, and the running metrics. Reads the
strategy, never changes it. Knows nothing about tokenizers or HTTP: token ids only.
"""

from __future__ import annotations

from dataclasses import dataclass

from .sequence import Sequence

MASKED, PROVISIONAL, COMMITTED, REJECTED = "masked", "provisional", "committed", "rejected"


@dataclass(frozen=True)
class Slot:
    """One position of the block. state: masked / provisional (a denoised or drafted token
    not yet output) / committed / rejected (only a rejected draft is left there).
    forward: the forward that decided ``token`` (unmasked, drafted, accepted or produced
    it). rejected: the draft token this event's forward rejected here, if any."""

    position: int
    state: str
    token: int | None
    forward: int | None
    rejected: int | None = None


@dataclass(frozen=True)
class ForwardEvent:
    """One forward of one request. forward: 1-based (the request's nfe after it). kind:
    ``prefill``, ``ar``, ``denoise``, ``commit``, ``draft``, ``verify`` or ``fused``
    (quadratic_spec: verify and the next drafts in one forward). Positions are offsets in
    the generated text. committed: token ids this forward appended to the output (a stop
    token is not output), so the events' ``committed`` lists, concatenated, are the output."""

    forward: int
    kind: str
    mode: str
    block_start: int
    slots: tuple[Slot, ...]
    drafted: tuple[int, ...]
    accepted: tuple[int, ...]
    rejected: tuple[int, ...]
    committed: tuple[int, ...]
    nfe: int
    generated_tokens: int
    tokens_per_forward: float
    acceptance_length: float | None
    finished: bool = False  # never an update's "finished": the stream goes on


class EventRecorder:
    """``on_step(seq)`` hook calling ``deliver(event)`` once per forward with records."""

    def __init__(self, deliver):
        self.deliver = deliver
        self.traced = 0  # trace entries already turned into events
        self.emitted = 0  # committed tokens already reported
        self.tokens: dict[int, tuple[int, int]] = {}  # position -> (token, forward) this block
        self.block = (0, 0)  # the strategy's block after the last forward: [start, end)
        self.window = (0, 0)  # the slots the last event showed

    def __call__(self, seq: Sequence) -> None:
        trace = seq.metrics.trace
        if trace is None:
            raise RuntimeError("EventRecorder needs SamplingParams(trace=True)")
        records, self.traced = trace[self.traced:], len(trace)
        if not records:
            return  # a failed forward: the update says why
        forward, generated = seq.metrics.nfe, seq.generated
        committed, self.emitted = generated[self.emitted:], len(generated)
        drafted, accepted, rejected = [], [], {}
        for r in records:
            if r.kind == "verify":
                self._verify(r, forward, accepted, rejected)
            else:
                if r.kind in ("denoise", "draft"):
                    drafted += r.positions
                self.tokens.update((p, (t, forward)) for p, t in zip(r.positions, r.tokens))
        verified = any(r.kind == "verify" for r in records)
        self.window = self._window(seq, verified)
        fused = records[0].kind != "prefill" and seq.strategy.phase == "fused"
        kind = "fused" if fused else records[0].kind
        self.deliver(self._event(seq, forward, kind, drafted, accepted, rejected, committed))

    def _verify(self, record, forward: int, accepted: list, rejected: dict) -> None:
        """Accepted drafts keep their token; a different token at a draft's slot (the bonus)
        and every draft after the last verified position are rejected."""
        for p, t in zip(record.positions, record.tokens):
            draft = self.tokens.get(p)
            if draft is not None and draft[1] != forward and p > self.block[0]:
                if draft[0] == t:
                    accepted.append(p)
                else:
                    rejected[p] = draft[0]
            self.tokens[p] = (t, forward)
        last = max(record.positions, default=self.block[0])
        for p in [p for p in self.tokens if p > last]:
            rejected[p] = self.tokens.pop(p)[0]

    def _window(self, seq: Sequence, verified: bool) -> tuple[int, int]:
        """The slots shown: the strategy's current block; after a verify, the verified block
        and the next one together (so accepted and rejected drafts stay in view)."""
        window = seq.strategy.block_window(seq)
        if window is None:  # ar: the block_length-aligned window of the last token
            last = max(self.tokens, default=0)
            start = last // seq.block_length * seq.block_length
            new = (start, last + 1)
        elif seq.finished:
            new = self.block  # a finished request starts no new block
        else:
            new = window
        shown = (self.block[0], max(self.block[1], new[1])) if verified else new
        self.block = new
        self.tokens = {p: v for p, v in self.tokens.items() if p >= shown[0]}
        return shown

    def _event(self, seq: Sequence, forward: int, kind: str, drafted, accepted, rejected,
               committed) -> ForwardEvent:
        start, end = self.window
        g = len(seq.generated)
        if seq.finished:  # nothing after the output (and its stop token) will ever be used
            stop = 1 if seq.finish_reason == "stop" and self.tokens.get(g, (None,))[0] \
                in seq.stop_ids else 0
            end = max(g + stop, max(rejected, default=-1) + 1)
        slots = []
        for p in range(start, end):
            token, by = self.tokens.get(p, (None, None))
            if token is None:
                state = REJECTED if p in rejected and seq.finished else MASKED
            else:
                state = COMMITTED if p < g or p == g and seq.finished and token in seq.stop_ids \
                    else PROVISIONAL
            slots.append(Slot(p, state, token, by, rejected.get(p)))
        m = seq.metrics
        return ForwardEvent(forward, kind, seq.params.mode, start, tuple(slots), tuple(drafted),
                            tuple(accepted), tuple(sorted(rejected)), tuple(committed), m.nfe,
                            m.generated_tokens, m.tokens_per_forward,
                            (m.generated_tokens - 1) / seq.verifies if seq.verifies else None)
