"""Per-request decoding state shared by all strategies, and the Step a strategy asks for.

A Sequence owns what is final: the committed tokens, the finish reason and the metrics.
``commit`` is the only way tokens become output, and it enforces the stop rules exactly:
nothing after the first stop token, never more than ``max_tokens``, never the mask id.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..outputs import ForwardTrace, RequestMetrics, TokenLogprob
from ..params import SamplingParams
from .batch import Need, Result
from .thinking import Thinking


@dataclass(frozen=True)
class Step:
    """One forward's worth of input for one request.

    tokens: the query tokens. kind: trace label. bidirectional: block-bidirectional over
    cache + tokens (else causal). write: commit the tokens' KV. adapter: draft adapter on.
    Fused layouts also give attention ``[T, T]`` bool (query x key among these tokens),
    offsets (each token's position relative to the cache length) and adapter_tokens
    (a per-token adapter flag). An image prefill gives embeds ``[k, d]``: the input
    embeddings of the tokens at ``embed_positions`` (k ascending indices into tokens).
    """

    tokens: list[int]
    kind: str
    bidirectional: bool = False
    write: bool = True
    adapter: bool = False
    attention: torch.Tensor | None = field(default=None, compare=False)
    offsets: list[int] | None = None
    adapter_tokens: list[bool] | None = None
    embeds: torch.Tensor | None = field(default=None, compare=False)
    embed_positions: tuple[int, ...] = ()


class Sequence:
    """One request being decoded."""

    # image requests (trimode.multimodal.requests): inputs, their [n_pads, d] features,
    # the pad id, and the keys prefix sharing compares
    images: list | None = None
    image_features: torch.Tensor | None = None
    image_pad_id: int | None = None
    share_keys: list | None = None
    # mode="auto" under the adaptive policy: the controller's state (engine/controller.py)
    auto = None
    # the thinking budget (thinking.py), when the request has max_thinking_tokens
    thinking: Thinking | None = None

    def __init__(self, prompt_ids: list[int], params: SamplingParams, stop_ids: set[int],
                 mask_token_id: int | None, block_length: int, denoise_adapter: bool = False):
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.stop_ids = stop_ids
        self.mask_token_id = mask_token_id
        self.block_length = block_length
        self.denoise_adapter = denoise_adapter  # draft adapter also on for diffusion denoising
        # random draws are keyed by (seed, draw, slot): see decoding/rng.py
        self.seed = params.seed if params.seed is not None else secrets.randbits(62)
        self.draws = 0  # selections made so far (one per forward this request took part in)
        self.forced_acceptance: int | None = None  # bench only: verification accepts exactly k
        self.generated: list[int] = []
        self.finish_reason: str | None = None
        self.metrics = RequestMetrics(trace=[] if params.trace else None)
        self.rollback = 0  # cache slots the loop must drop after this step (docs/spec.md 5.1 crop)
        self.verifies = 0
        self.last_verify: tuple[str, int, int] | None = None  # (mode, drafts, accepted)
        self.strategy = None
        self.logprobs: list[TokenLogprob] | None = [] if params.logprobs is not None else None
        self._noted: dict[int, TokenLogprob] = {}
        # engine bookkeeping: id, arrival time, pool row, tokens already streamed, hook
        self.request_id: str = ""
        self.arrival = time.perf_counter()
        self.row = -1
        self.chain: list[int] = []  # prefix-cache ids of its first full pages (engine/prefix.py)
        self.resume = 0  # preempted: cache positions to recompute when it runs again
        self.emitted = 0
        self.error: str | None = None
        self.on_step: Callable[["Sequence"], None] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def remaining(self) -> int:
        return self.params.max_tokens - len(self.generated)

    def commit(self, tokens: list[int]) -> int:
        """Append ``tokens`` in order until a stop token or ``max_tokens``; return how many
        were consumed (a stop token counts as generated but is not returned)."""
        used = 0
        if tokens and self.metrics.ttft_s is None and not self.finished:
            self.metrics.ttft_s = time.perf_counter() - self.arrival
        for tok in tokens:
            if self.finished:
                break
            if tok == self.mask_token_id:
                raise RuntimeError("internal error: mask token reached commit")
            used += 1
            self.metrics.generated_tokens += 1
            if tok in self.stop_ids:
                self.finish_reason = "stop"
                break
            if self.logprobs is not None:
                noted = self._noted.pop(len(self.generated), None)
                if noted is None or noted.token_id != tok:
                    raise RuntimeError(f"internal error: no logprob noted for token {tok} at "
                                       f"position {len(self.generated)}")
                self.logprobs.append(noted)
            self.generated.append(tok)
            if self.thinking is not None:
                self.thinking.commit(tok)
            if len(self.generated) >= self.params.max_tokens:
                self.finish_reason = "length"
        if used:
            tokens = self.metrics.mode_tokens
            tokens[self.params.mode] = tokens.get(self.params.mode, 0) + used
        return used

    @property
    def mode_ran(self) -> str:
        """The mode that committed most of the tokens (``auto`` may switch; the current mode
        before any token)."""
        tokens = self.metrics.mode_tokens
        return max(tokens, key=tokens.get) if tokens else self.params.mode

    def note_verify(self, drafts: int, accepted: int) -> None:
        """A verify checked ``drafts`` drafts and accepted the first ``accepted``."""
        self.metrics.note_verify(self.params.mode, drafts, accepted)
        self.last_verify = (self.params.mode, drafts, accepted)

    def need(self, slots: list[int], **kw) -> Need:
        """What this request needs from its next forward's logits at ``slots`` (see
        ``batch.Need`` for ``kw``); each call is one forward's draw site."""
        need = Need(self.params, self.seed, self.draws, slots, **kw)
        self.draws += 1
        return need

    def need_next(self, slot: int) -> Need:
        """``need`` of one slot choosing the token right after the committed text (an AR
        step, the prefill, diffusion's commit pass)."""
        return self.need([slot], forced=self.forced_ids([], 1))

    def forced_ids(self, ahead: list[int], n: int) -> list[int] | None:
        """The ids the next ``n`` positions must take under the thinking budget (-1: free;
        ``Thinking.forced``), or None when nothing is forced."""
        if self.thinking is None or self.thinking.budget is None:
            return None
        forced = self.thinking.forced(ahead, n, self.mask_token_id)
        return forced if any(f >= 0 for f in forced) else None

    def take(self, result: Result) -> int:
        """The single token a one-slot selection chose (AR step, prefill, commit pass)."""
        token = result.tokens[0]
        self.note(len(self.generated), result.logprob(0, token))
        return token

    def note(self, position: int, logprob: TokenLogprob | None) -> None:
        """Remember the log-probability of the token chosen for generated position
        ``position`` (used by ``commit`` when logprobs were requested)."""
        if self.logprobs is not None and logprob is not None:
            self._noted[position] = logprob

    def forced(self, accepted: int, drafts: int) -> int:
        """``accepted`` drafts, or exactly ``forced_acceptance`` of them in benchmarks that
        set it (random-weight runs at a realistic acceptance; never set by the API)."""
        return accepted if self.forced_acceptance is None else min(self.forced_acceptance, drafts)

    def finish(self, reason: str, error: str | None = None) -> None:
        """End the request now (``abort`` or ``error``) keeping what was committed."""
        if not self.finished:
            self.finish_reason = reason
            self.error = error

    def record(self, kind: str, positions: list[int], tokens: list[int]) -> None:
        if self.metrics.trace is not None:
            self.metrics.trace.append(ForwardTrace(kind, tuple(positions), tuple(tokens)))
