"""What the engine reports about a request: ``RequestUpdate`` (one step's news) and the final
``RequestOutput`` built from a finished Sequence."""

from __future__ import annotations

from dataclasses import dataclass

from ..decoding.sequence import Sequence
from ..outputs import RequestMetrics, RequestOutput, TokenLogprob


@dataclass
class RequestUpdate:
    """What one engine step did for one request.

    new_token_ids: tokens committed in this step, in order; never revised (a stop token is
        not included). new_logprobs: aligned with them when logprobs were requested.
    token_ids: every token committed so far. finished / finish_reason: ``stop``, ``length``,
    ``abort`` or ``error`` (``error`` says why). mode: the mode that runs (auto resolved).
    metrics: running totals (nfe, generated_tokens, tokens_per_forward, acceptance_length).
    """

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprob] | None
    token_ids: list[int]
    finished: bool
    finish_reason: str | None
    mode: str
    metrics: RequestMetrics
    error: str | None = None


def to_output(seq: Sequence, prompt: str | None, text: str) -> RequestOutput:
    return RequestOutput(prompt, seq.prompt_ids, text, list(seq.generated), seq.finish_reason,
                         seq.metrics, seq.mode_ran, seq.logprobs, seq.error)
