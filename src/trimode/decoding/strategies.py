"""The three decoding modes as small strategies over one loop (see ``loop.py``).

A strategy sees one request: after the causal prefill it gets the prefill's choice
(``begin``); then it names the next forward it needs (``next_step``), what it needs from that
forward's logits (``need``: which slots, which selection rule) and consumes the selection,
computed on the device for all rows at once (``apply``; see ``batch.py``). It never touches
tensors of other requests or the cache; cropping after a rejected draft is requested through
``Sequence.rollback``.

ar (spec 4): one causal token per forward.
diffusion (spec 3): blocks ``[seed, MASK x (block_length - 1)]``; bidirectional, read-only
  denoising passes (the draft adapter on when it is a denoising adapter too); a causal
  commit pass (adapter off) writes clean KV and gives the next seed.
linear_spec (spec 5.1): a bidirectional draft (adapter on), a causal verify (adapter off),
  the longest agreeing prefix plus a bonus token, and a cache crop.
"""

from __future__ import annotations

import torch

from .batch import Need, Result, Strategy
from .sequence import Sequence, Step


class ARStrategy(Strategy):
    def begin(self, seq: Sequence, result: Result) -> None:
        self._emit(seq, result, "prefill")

    def next_step(self, seq: Sequence) -> Step:
        return Step([self.pending], "ar")

    def need(self, seq: Sequence, step: Step) -> Need:
        return seq.need([len(step.tokens) - 1])

    def apply(self, seq: Sequence, result: Result) -> None:
        self._emit(seq, result, "ar")

    def _emit(self, seq: Sequence, result: Result, kind: str) -> None:
        self.pending = seq.take(result)
        seq.record(kind, [len(seq.generated)], [self.pending])
        seq.commit([self.pending])


def even_schedule(masks: int, steps: int) -> list[int]:
    """Tokens to unmask at each step when ``threshold`` is None (spec 3.3 quota)."""
    base, extra = divmod(masks, steps)
    return [base + (1 if s < extra else 0) for s in range(steps)]


class DiffusionStrategy(Strategy):
    """Block diffusion with the reference's selection rule (spec 3.2, 3.3, 3.5).

    The last block keeps its full ``block_length`` (so a shorter ``max_tokens`` returns a
    prefix of a longer run); denoising stops once every slot within the limit is unmasked
    or a stop token has no mask to its left, and the finished row skips the commit pass.
    A denoising pass needs logits at the masked slots only: their candidates and
    confidences, and the choice among them, are computed on the device (``batch.py``).
    """

    def begin(self, seq: Sequence, result: Result) -> None:
        seed = seq.take(result)
        seq.record("prefill", [0], [seed])
        self._new_block(seq, seed)

    def _new_block(self, seq: Sequence, seed: int) -> None:
        length = seq.block_length
        self.offset = len(seq.generated)
        self.block = [seed] + [seq.mask_token_id] * (length - 1)
        self.limit = min(length, seq.remaining)
        self.schedule = even_schedule(length - 1, length)
        self.passes = 0
        self._finish_block_if_done(seq)

    def _finish_block_if_done(self, seq: Sequence) -> None:
        mask_id = seq.mask_token_id
        first_mask = next((i for i, t in enumerate(self.block) if t == mask_id), len(self.block))
        stop = next((i for i in range(first_mask) if self.block[i] in seq.stop_ids), None)
        if stop is not None and stop < self.limit:
            end = stop + 1
        elif first_mask >= self.limit:
            end = self.limit
        else:
            self.phase = "denoise"
            return
        seq.commit(self.block[:end])
        self.phase = "commit"

    def next_step(self, seq: Sequence) -> Step:
        if self.phase == "denoise":
            return Step(list(self.block), "denoise", bidirectional=True, write=False,
                        adapter=seq.denoise_adapter)
        return Step(list(self.block), "commit")

    def need(self, seq: Sequence, step: Step) -> Need:
        if self.phase == "commit":
            return seq.need([len(self.block) - 1])
        masked = [i for i, t in enumerate(self.block) if t == seq.mask_token_id]
        quota = self.schedule[min(self.passes, len(self.schedule) - 1)]
        return seq.need(masked, choose=True, threshold=seq.params.threshold, quota=quota)

    def apply(self, seq: Sequence, result: Result) -> None:
        if self.phase == "commit":
            seed = seq.take(result)
            seq.record("commit", [self.offset + len(self.block)], [seed])
            self._new_block(seq, seed)
            return
        masked = [i for i, t in enumerate(self.block) if t == seq.mask_token_id]
        self.passes += 1
        for k in result.chosen:  # indices into the masked slots, ascending
            i = masked[k]
            self.block[i] = result.tokens[k]
            seq.note(self.offset + i, result.logprob(k, self.block[i]))
        chosen = [masked[k] for k in result.chosen]
        seq.record("denoise", [self.offset + i for i in chosen], [self.block[i] for i in chosen])
        self._finish_block_if_done(seq)


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
    earlier ones in confidence order, so the reference's sample-and-match rule is used.
    """

    def begin(self, seq: Sequence, result: Result) -> None:
        seed = seq.take(result)
        seq.record("prefill", [0], [seed])
        seq.commit([seed])
        self._new_block(seq, seed)

    def _new_block(self, seq: Sequence, seed: int) -> None:
        length = max(1, min(seq.block_length, seq.remaining))
        self.block = [seed] + [seq.mask_token_id] * (length - 1)
        self.draft_log_probs: torch.Tensor | None = None  # [L - 1, V] on the device
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
            return self.verify_need(seq, list(range(len(self.block))))
        masked = [i for i, t in enumerate(self.block) if t == seq.mask_token_id]
        # the causal seed copy (last query) gives slot 1's logits
        slots = [len(self.block) if i == 1 and len(step.tokens) > len(self.block) else i
                 for i in masked]
        if seq.params.threshold != 0:
            return seq.need(slots, choose=True, draft=True, threshold=seq.params.threshold)
        keep = list(range(len(slots))) if seq.params.temperature > 0 else []
        return seq.need(slots, keep=keep)

    def verify_need(self, seq: Sequence, slots: list[int]) -> Need:
        """The verify segment (``slots`` first, in block order) checking ``block[1:]``."""
        sampled = seq.params.temperature > 0 and len(self.block) > 1
        return seq.need(slots, verify=len(self.block), drafts=self.block[1:],
                        q=self.draft_log_probs if sampled else None)

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
        accepted = self._accept(seq, result)
        seq.rollback = len(self.block) - len(accepted)
        if not seq.finished:
            self._new_block(seq, accepted[-1])

    def _accept(self, seq: Sequence, result: Result) -> list[int]:
        """Commit the drafts the verify accepted plus the bonus token, and return them
        (the cache still holds all L slots)."""
        accepted = self._verified(seq, result)
        start = len(seq.generated)
        for j, token in enumerate(accepted):
            seq.note(start + j, result.logprob(j, token))
        used = seq.commit(accepted)
        seq.record("verify", list(range(start, start + used)), accepted[:used])
        seq.verifies += 1
        return accepted

    def _verified(self, seq: Sequence, result: Result) -> list[int]:
        drafts = self.block[1:]
        if result.accepted is not None:  # speculative sampling on the device
            c = seq.forced(result.accepted, len(drafts))
            return drafts[:c] + ([result.final] if c == result.accepted else [result.tokens[c]])
        ar = result.tokens[: len(self.block)]
        c = 0
        while c < len(drafts) and ar[c] == drafts[c]:
            c += 1
        c = seq.forced(c, len(drafts))
        return drafts[:c] + [ar[c]]
