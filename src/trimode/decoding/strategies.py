"""The three decoding modes as small strategies over one loop (see ``loop.py``).

A strategy sees one request: after the causal prefill it gets the prefill's last logits
(``start``); then it names the next forward it needs (``next_step``) and consumes that
forward's logits (``update``). It never touches tensors of other requests or the cache;
cropping after a rejected draft is requested through ``Sequence.rollback``.

ar (spec 4): one causal token per forward.
diffusion (spec 3): blocks ``[seed, MASK x (block_length - 1)]``; bidirectional, read-only
  denoising passes (the draft adapter on when it is a denoising adapter too); a causal
  commit pass (adapter off) writes clean KV and gives the next seed.
linear_spec (spec 5.1): a bidirectional draft (adapter on), a causal verify (adapter off),
  the longest agreeing prefix plus a bonus token, and a cache crop.
"""

from __future__ import annotations

import torch

from .sampling import confidence, pick, sample_from, target_log_probs
from .sequence import Sequence, Step


def ar_token(seq: Sequence, logits: torch.Tensor) -> int:
    """The token the causal logits of the last position choose (greedy or sampled)."""
    token = int(pick(logits[-1:], seq.params, seq.mask_token_id, seq.generator)[0])
    seq.note(len(seq.generated), logits[-1], token)
    return token


class ARStrategy:
    def start(self, seq: Sequence, logits: torch.Tensor) -> None:
        self._emit(seq, logits, "prefill")

    def next_step(self, seq: Sequence) -> Step:
        return Step([self.pending], "ar")

    def update(self, seq: Sequence, logits: torch.Tensor) -> None:
        self._emit(seq, logits[-1:], "ar")

    def _emit(self, seq: Sequence, logits: torch.Tensor, kind: str) -> None:
        self.pending = ar_token(seq, logits)
        seq.record(kind, [len(seq.generated)], [self.pending])
        seq.commit([self.pending])


def even_schedule(masks: int, steps: int) -> list[int]:
    """Tokens to unmask at each step when ``threshold`` is None (spec 3.3 quota)."""
    base, extra = divmod(masks, steps)
    return [base + (1 if s < extra else 0) for s in range(steps)]


class DiffusionStrategy:
    """Block diffusion with the reference's selection rule (spec 3.2, 3.3, 3.5).

    The last block keeps its full ``block_length`` (so a shorter ``max_tokens`` returns a
    prefix of a longer run); denoising stops once every slot within the limit is unmasked
    or a stop token has no mask to its left, and the finished row skips the commit pass.
    """

    def start(self, seq: Sequence, logits: torch.Tensor) -> None:
        seed = ar_token(seq, logits)
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

    def update(self, seq: Sequence, logits: torch.Tensor) -> None:
        if self.phase == "commit":
            seed = ar_token(seq, logits)
            seq.record("commit", [self.offset + len(self.block)], [seed])
            self._new_block(seq, seed)
            return
        chosen = self._select(seq, logits)
        seq.record("denoise", [self.offset + i for i in chosen], [self.block[i] for i in chosen])
        self._finish_block_if_done(seq)

    def _select(self, seq: Sequence, logits: torch.Tensor) -> list[int]:
        """Unmask the most confident masked slot plus every one reaching ``threshold``."""
        params = seq.params
        masked = torch.tensor([t == seq.mask_token_id for t in self.block])
        cand = pick(logits, params, seq.mask_token_id, seq.generator)
        conf = confidence(logits, cand).masked_fill(~masked, float("-inf"))
        if params.threshold is None:
            quota = max(self.schedule[min(self.passes, len(self.schedule) - 1)], 1)
            chosen = torch.topk(conf, min(quota, int(masked.sum()))).indices.tolist()
        else:
            order = torch.topk(conf, int(masked.sum())).indices.tolist()
            chosen = [order[0]] + [i for i in order[1:] if float(conf[i]) >= params.threshold]
        self.passes += 1
        for i in chosen:
            self.block[i] = int(cand[i])
            seq.note(self.offset + i, logits[i], self.block[i])
        return sorted(chosen)


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


class LinearSpecStrategy:
    """Self-speculation (spec 5.1), batched per row, lossless at any temperature.

    Verification rule: at temperature 0 the reference's exact match (accept draft i+1 while
    it equals the AR argmax at i). At temperature > 0 with a one-pass draft (threshold 0),
    speculative sampling (Leviathan et al. 2023): accept with probability min(1, p/q), else
    draw from the normalised max(p - q, 0); every draft slot is an independent draw from its
    own q, so this is exactly AR sampling and accepts at least as often as matching two
    independent samples. With a multi-pass draft (threshold > 0) later drafts depend on
    earlier ones in confidence order, so the reference's sample-and-match rule is used.
    """

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
        accepted = self._accept(seq, logits)
        seq.rollback = len(self.block) - len(accepted)
        if not seq.finished:
            self._new_block(seq, accepted[-1])

    def _accept(self, seq: Sequence, verify_logits: torch.Tensor) -> list[int]:
        """Verify the block's drafts against ``verify_logits`` ``[L, V]``, commit the accepted
        drafts plus the bonus token, and return them (the cache still holds all L slots)."""
        accepted = self._verified(seq, verify_logits)
        start = len(seq.generated)
        for j, token in enumerate(accepted):
            seq.note(start + j, verify_logits[j], token)
        used = seq.commit(accepted)
        seq.record("verify", list(range(start, start + used)), accepted[:used])
        seq.verifies += 1
        return accepted

    def _verified(self, seq: Sequence, verify_logits: torch.Tensor) -> list[int]:
        drafts = self.block[1:]
        if seq.params.temperature > 0 and self.draft_log_probs:
            return self._speculative_sampling(seq, verify_logits, drafts)
        ar = pick(verify_logits, seq.params, seq.mask_token_id, seq.generator).tolist()
        c = 0
        while c < len(drafts) and ar[c] == drafts[c]:
            c += 1
        return ar[: c + 1]

    def _speculative_sampling(self, seq: Sequence, logits: torch.Tensor,
                              drafts: list[int]) -> list[int]:
        target = target_log_probs(logits.cpu(), seq.params, seq.mask_token_id).exp()
        accepted: list[int] = []
        for j, token in enumerate(drafts):
            p, q = target[j], self.draft_log_probs[j + 1].exp()
            u = float(torch.rand((), generator=seq.generator, dtype=torch.float64))
            if u < min(1.0, float(p[token] / q[token])):
                accepted.append(token)
                continue
            residual = (p - q).clamp_min(0)
            total = float(residual.sum())
            accepted.append(sample_from(residual / total if total > 0 else p, seq.generator))
            return accepted
        accepted.append(sample_from(target[len(drafts)], seq.generator))
        return accepted

