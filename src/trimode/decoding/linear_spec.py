"""linear_spec (docs/spec.md section 5.1): a bidirectional draft (adapter on), a causal
verify (adapter off), the longest agreeing prefix plus a bonus token, and a cache crop.
"""

from __future__ import annotations

import torch

from .batch import Need, Result
from .sequence import Sequence, Step
from .strategy import Strategy
from .verify import accept, verify_need


def draft_with_seed_copy(block: list[int]) -> Step:
    """Step arguments of a linear_spec draft pass whose slot 1 comes from the base model.

    ``block`` = ``[seed, MASK x (L-1)]`` runs bidirectionally with the adapter on, as in spec
    5.1, plus one extra query: a copy of the seed at the seed's position that sees only the
    cached prefix and itself, adapter off. Its logits are exactly the causal (ar) logits after
    the seed, i.e. what the verify pass will compare draft 1 against, so draft 1 is always
    right at temperature 0 and is drawn from the target distribution otherwise. A draft
    adapter's own slot-1 guess agrees with ar only about 80% of the time on the embedded model
    (benchmarks/sections/training.md), and a miss there ends the cycle. Used for one-pass
    drafts (threshold 0, the default); multi-pass drafts keep spec 5.1's layout.
    """
    length = len(block)
    attention = torch.zeros(length + 1, length + 1, dtype=torch.bool)
    attention[:length, :length] = True
    attention[length, length] = True
    return Step(block + [block[0]], "draft", bidirectional=True, write=False, adapter=True,
                attention=attention,
                offsets=list(range(length)) + [0], adapter_tokens=[True] * length + [False])


class LinearSpecStrategy(Strategy):
    """Self-speculation (spec 5.1), batched per row, lossless at any temperature.

    Verification rule: at temperature 0 the reference's exact match (accept draft i+1 while
    it equals the AR argmax at i). At temperature > 0 with a one-pass draft (threshold 0),
    speculative sampling (Leviathan et al. 2023): accept with probability min(1, p/q), else
    draw from the normalised max(p - q, 0); every draft slot is an independent draw from its
    own q, so this is exactly AR sampling and accepts at least as often as matching two
    independent samples. With a multi-pass draft (threshold > 0) later drafts depend on
    earlier ones in confidence order, so the reference's sample-and-match rule is used
    (``verify.py``).
    """

    mode = "linear_spec"

    def begin(self, seq: Sequence, result: Result) -> None:
        seed = seq.take(result)
        seq.record("prefill", [0], [seed])
        seq.commit([seed])
        self._new_block(seq, seed)

    def boundary(self, seq: Sequence) -> int | None:
        fresh = all(t == seq.mask_token_id for t in self.block[1:])
        return self.block[0] if fresh and (self.phase == "draft" or len(self.block) == 1) else None

    def resume(self, seq: Sequence, token: int) -> None:
        self._new_block(seq, token)

    def _new_block(self, seq: Sequence, seed: int) -> None:
        length = max(1, min(seq.block_length, seq.remaining))
        self.block = [seed] + [seq.mask_token_id] * (length - 1)
        self.draft_log_probs: torch.Tensor | None = None  # [L - 1, V], on the device
        self.phase = "draft" if length > 1 else "verify"

    def next_step(self, seq: Sequence) -> Step:
        if self.phase == "draft":
            if self.block[1] != seq.mask_token_id or seq.params.threshold != 0:
                return Step(list(self.block), "draft", bidirectional=True, write=False,
                            adapter=True)
            return draft_with_seed_copy(self.block)
        return Step(list(self.block), "verify")

    def need(self, seq: Sequence, step: Step) -> Need:
        if self.phase == "verify":
            return verify_need(seq, self.block, list(range(len(self.block))), self.draft_log_probs)
        masked = [i for i, t in enumerate(self.block) if t == seq.mask_token_id]
        # with the causal seed copy (the last query), slot 1's logits come from it
        slots = [len(self.block) if i == 1 and len(step.tokens) > len(self.block) else i
                 for i in masked]
        forced = seq.forced_ids(self.block[1:], len(self.block) - 1)  # block slot i: forced[i - 1]
        forced = forced and [forced[i - 1] for i in masked]
        if seq.params.threshold != 0:
            return seq.need(slots, choose=True, draft=True, threshold=seq.params.threshold,
                            forced=forced)
        keep = list(range(len(slots))) if seq.params.temperature > 0 else []
        return seq.need(slots, keep=keep, forced=forced)

    def apply(self, seq: Sequence, result: Result) -> None:
        if self.phase == "draft":
            self._draft(seq, result)
        else:
            self._verify(seq, result)

    def _draft(self, seq: Sequence, result: Result) -> None:
        mask_id = seq.mask_token_id
        masked = [i for i, t in enumerate(self.block) if t == mask_id]
        chosen = result.chosen if seq.params.threshold != 0 else range(len(masked))
        if seq.params.threshold == 0 and seq.params.temperature > 0:
            self.draft_log_probs = result.q
        for k in chosen:
            self.block[masked[k]] = result.tokens[k]
        base = len(seq.generated) - 1
        done = sorted(masked[k] for k in chosen)
        seq.record("draft", [base + i for i in done], [self.block[i] for i in done])
        if all(t != mask_id for t in self.block):
            self.phase = "verify"

    def _verify(self, seq: Sequence, result: Result) -> None:
        accepted = accept(seq, self.block, result)
        seq.rollback = len(self.block) - len(accepted)
        if not seq.finished:
            self._new_block(seq, accepted[-1])

    @classmethod
    def scratch_slots(cls, block_length: int, max_tokens: int,
                      draft_segments: int | None) -> int:
        return 2 * min(block_length, max_tokens) + 1  # blocks shrink to the tokens still needed
