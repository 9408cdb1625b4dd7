"""linear_spec (docs/spec.md section 5.1): a bidirectional draft (adapter on), a causal
verify (adapter off), the longest agreeing prefix plus a bonus token, and a cache crop.
"""

from __future__ import annotations

import torch

from .ar import ar_token
from .sampling import confidence, pick, target_log_probs
from .sequence import Sequence, Step
from .strategy import Strategy
from .verify import accept


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

    def start(self, seq: Sequence, logits: torch.Tensor) -> None:
        seed = ar_token(seq, logits)
        seq.record("prefill", [0], [seed])
        seq.commit([seed])
        self._new_block(seq, seed)

    def _new_block(self, seq: Sequence, seed: int) -> None:
        length = max(1, min(seq.block_length, seq.remaining))
        self.block = [seed] + [seq.mask_token_id] * (length - 1)
        self.draft_log_probs: dict[int, torch.Tensor] = {}
        self.phase = "draft" if length > 1 else "verify"

    def next_step(self, seq: Sequence) -> Step:
        if self.phase == "draft":
            if self.block[1] != seq.mask_token_id or seq.params.threshold != 0:
                return Step(list(self.block), "draft", bidirectional=True, write=False,
                            adapter=True)
            return draft_with_seed_copy(self.block)
        return Step(list(self.block), "verify")

    def update(self, seq: Sequence, logits: torch.Tensor) -> None:
        if self.phase == "draft":
            if logits.shape[0] > len(self.block):  # the causal seed copy gives slot 1
                logits = torch.cat([logits[:1], logits[-1:], logits[2 : len(self.block)]])
            self._draft(seq, logits)
        else:
            self._verify(seq, logits)

    def _draft(self, seq: Sequence, logits: torch.Tensor) -> None:
        params = seq.params
        mask_id = seq.mask_token_id
        masked = [i for i, t in enumerate(self.block) if t == mask_id]
        cand = pick(logits, params, mask_id, seq.generator)
        if params.threshold == 0:
            chosen = masked
            if params.temperature > 0:
                logp = target_log_probs(logits.cpu(), params, mask_id)
                self.draft_log_probs = {i: logp[i] for i in masked}
        else:
            conf = confidence(logits, cand)[masked]
            order = torch.argsort(conf, descending=True, stable=True).tolist()
            chosen = [masked[order[0]]] + [masked[o] for o in order[1:]
                                           if float(conf[o]) >= params.threshold]
        for i in chosen:
            self.block[i] = int(cand[i])
        base = len(seq.generated) - 1
        seq.record("draft", [base + i for i in sorted(chosen)], [self.block[i] for i in sorted(chosen)])
        if all(t != mask_id for t in self.block):
            self.phase = "verify"

    def _verify(self, seq: Sequence, logits: torch.Tensor) -> None:
        accepted = accept(seq, self.block, self.draft_log_probs, logits)
        seq.rollback = len(self.block) - len(accepted)
        if not seq.finished:
            self._new_block(seq, accepted[-1])

    @classmethod
    def scratch_slots(cls, block_length: int, max_tokens: int,
                      draft_segments: int | None) -> int:
        return 2 * min(block_length, max_tokens) + 1  # blocks shrink to the tokens still needed
