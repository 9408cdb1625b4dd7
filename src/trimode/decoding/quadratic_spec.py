"""Fused self-speculation (NLD's quadratic mode): verify and draft in one forward.

Each cycle's single forward holds a causal *verify segment* and one bidirectional *draft
segment* per acceptance outcome, so whatever the verify decides, the next drafts are ready.
docs/spec.md 5.5 describes the idea (an O(B^2) layout); the exact layout below is trimode's.
"""

from __future__ import annotations

import torch

from .batch import Need, Result
from .sequence import Sequence, Step
from .strategy import Strategy
from .verify import accept, verify_need


def quadratic_layout(verify_length: int, block_length: int,
                     segments: list[int]) -> tuple[torch.Tensor, list[int]]:
    """Attention pattern ``[T, T]`` (bool, query x key) and position offsets ``[T]`` of one
    fused forward, ``T = verify_length + len(segments) * block_length``.

    The verify segment V = [seed, d_1 .. d_{L-1}] (L = ``verify_length``) sits at offsets
    0 .. L-1 and is causal. For each acceptance outcome k in ``segments`` (k drafts
    accepted, so the bonus token lands at offset k+1), a draft segment G_k of
    ``block_length`` masks sits at offsets k+1 .. k+block_length; it sees V_0 .. V_k (the
    prefix that outcome k accepts) and all of G_k, nothing else. V never sees any G. The
    cached prefix is visible to every query (handled by the cache). Example, L = 3,
    block_length = 2, segments = [0, 1, 2] (x = visible)::

                     V0 V1 V2 | G0 G0 | G1 G1 | G2 G2
        V0  (off 0)  x        |       |       |
        V1  (off 1)  x  x     |       |       |
        V2  (off 2)  x  x  x  |       |       |
        G0  (off 1)  x        | x  x  |       |
        G0  (off 2)  x        | x  x  |       |
        G1  (off 2)  x  x     |       | x  x  |
        G1  (off 3)  x  x     |       | x  x  |
        G2  (off 3)  x  x  x  |       |       | x  x
        G2  (off 4)  x  x  x  |       |       | x  x

    After the verify accepts c drafts, the KV of V_0 .. V_c is kept (cache slots equal
    positions there), everything after is cropped, the bonus is the AR prediction at V_c,
    and the next drafts are G_c's predictions at its slots 1 .. block_length-1 (slot 0 is
    the bonus position, whose token the verify already decided).
    """
    total = verify_length + len(segments) * block_length
    attention = torch.zeros(total, total, dtype=torch.bool)
    attention[:verify_length, :verify_length] = torch.ones(verify_length, verify_length).tril().bool()
    offsets = list(range(verify_length))
    for n, k in enumerate(segments):
        start = verify_length + n * block_length
        rows = slice(start, start + block_length)
        attention[rows, : k + 1] = True
        attention[rows, rows] = True
        offsets += [k + 1 + j for j in range(block_length)]
    return attention, offsets


class QuadraticSpecStrategy(Strategy):
    """One forward per cycle. Verification rules are linear_spec's (exact match at
    temperature 0, speculative sampling otherwise), so the output equals ``ar``'s.

    ``SamplingParams.draft_segments``: m keeps only the m outcomes nearest the last
    acceptance (pruned, B(m + 1) tokens per forward; default 1); None keeps a draft segment
    for every outcome (B + B^2 tokens per forward). When the verify lands on an outcome without a segment, the next cycle
    verifies the bonus alone and drafts again.
    """

    mode = "quadratic_spec"
    shrink_hint = "block_length or draft_segments"

    def begin(self, seq: Sequence, result: Result) -> None:
        seed = seq.take(result)
        seq.record("prefill", [0], [seed])
        seq.commit([seed])
        self.last_accepted = seq.block_length - 1
        self._new_cycle(seq, seed, drafts=[], draft_log_probs=None)

    def boundary(self, seq: Sequence) -> int | None:
        return self.block[0]  # every forward is a whole cycle

    def resume(self, seq: Sequence, token: int) -> None:
        self.last_accepted = seq.block_length - 1
        self._new_cycle(seq, token, drafts=[], draft_log_probs=None)

    def _new_cycle(self, seq: Sequence, seed: int, drafts: list[int],
                   draft_log_probs: torch.Tensor | None) -> None:
        length = max(1, min(1 + len(drafts), seq.remaining))
        self.block = [seed] + drafts[: length - 1]
        self.draft_log_probs = None if draft_log_probs is None else draft_log_probs[: length - 1]
        self.segments = self._segments(len(self.block), seq)
        self.width = min(seq.block_length, seq.remaining)  # draft segment length
        self.phase = "fused"

    def _segments(self, verify_length: int, seq: Sequence) -> list[int]:
        if seq.remaining <= verify_length:  # this cycle can finish the request: no drafts
            return []
        m = seq.params.draft_segments
        if m is None or m >= verify_length:
            return list(range(verify_length))
        centre = min(self.last_accepted, verify_length - 1)
        ranked = sorted(range(verify_length), key=lambda k: (abs(k - centre), -k))
        return sorted(ranked[:m])

    def next_step(self, seq: Sequence) -> Step:
        attention, offsets = quadratic_layout(len(self.block), self.width, self.segments)
        masks = [seq.mask_token_id] * (self.width * len(self.segments))
        adapter = [False] * len(self.block) + [True] * len(masks)
        return Step(self.block + masks, "fused", attention=attention, offsets=offsets,
                    adapter_tokens=adapter)

    def need(self, seq: Sequence, step: Step) -> Need:
        """The verify slots, then slots 1 .. width-1 of every draft segment (whose target
        log-probs stay on the device at temperature > 0, for the next cycle's verify)."""
        verify_length = len(self.block)
        drafts = [verify_length + n * self.width + j for n in range(len(self.segments))
                  for j in range(1, self.width)]
        keep = list(range(verify_length, verify_length + len(drafts))) \
            if seq.params.temperature > 0 else []
        return verify_need(seq, self.block, list(range(verify_length)) + drafts,
                           self.draft_log_probs, keep=keep)

    def apply(self, seq: Sequence, result: Result) -> None:
        verify_length = len(self.block)
        accepted = accept(seq, self.block, result)
        c = len(accepted) - 1
        if verify_length > 1:  # a bonus-only cycle has one outcome and says nothing
            self.last_accepted = c
        seq.rollback = len(self.block) + len(self.segments) * self.width - (c + 1)
        if seq.finished:
            return
        drafts, log_probs = self._drafts_for(seq, result, verify_length, c)
        self._new_cycle(seq, accepted[-1], drafts, log_probs)

    def _drafts_for(self, seq: Sequence, result: Result, verify_length: int,
                    c: int) -> tuple[list[int], torch.Tensor | None]:
        if c not in self.segments:
            return [], None
        start = self.segments.index(c) * (self.width - 1)
        drafts = result.tokens[verify_length + start : verify_length + start + self.width - 1]
        base = len(seq.generated)
        seq.record("draft", list(range(base, base + len(drafts))), drafts)
        log_probs = None if result.q is None else result.q[start : start + self.width - 1]
        return drafts, log_probs

    @classmethod
    def scratch_slots(cls, block_length: int, max_tokens: int,
                      draft_segments: int | None) -> int:
        block_length = min(block_length, max_tokens)  # blocks shrink to the tokens still needed
        segments = block_length if draft_segments is None else min(draft_segments, block_length)
        return block_length + segments * block_length + 1

    @classmethod
    def step_width(cls, block_length: int, max_tokens: int, draft_segments: int | None) -> int:
        return cls.scratch_slots(block_length, max_tokens, draft_segments) - 1
