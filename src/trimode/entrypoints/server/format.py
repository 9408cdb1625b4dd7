"""OpenAI response objects: choices, stream chunks, logprobs, usage and the ``trimode`` object.

Logprobs follow OpenAI's two formats: completions (``tokens``, ``token_logprobs``,
``top_logprobs``, ``text_offset``) and chat (``content: [{token, logprob, bytes,
top_logprobs}]``). In the parallel modes a token's logprob is the one the engine recorded when
it committed the token (the AR verifier's distribution in the speculative modes, the
denoiser's at unmasking time in diffusion). Logprobs below -9999 are reported as -9999 so
the JSON stays valid (a probability of 0 is -inf), as vLLM does. Chat ``bytes`` are each
token's raw bytes (``Tokenizer.token_bytes``): a token that is part of a multi-byte character
has its ``token`` shown as U+FFFD but its real bytes, so joining the bytes of all tokens
gives the exact output bytes, even where the text is not valid UTF-8 (diffusion).
"""

from __future__ import annotations

from dataclasses import dataclass, field

FLOOR = -9999.0


@dataclass
class Choice:
    """Everything one choice has produced so far."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list | None = None  # TokenLogprob, aligned with token_ids
    finish_reason: str | None = None
    mode: str | None = None
    metrics: object | None = None
    reasoning: str | None = None  # the reasoning text when a reasoning parser is on, else None

    def add(self, event, tokenizer) -> None:
        self.text += event.text
        if self.reasoning is not None:
            self.reasoning += event.reasoning
        self.token_ids += event.token_ids
        if event.logprobs is not None:
            self.logprobs = (self.logprobs or []) + list(event.logprobs)
        self.finish_reason = event.finish_reason or self.finish_reason
        self.mode = event.mode or self.mode
        self.metrics = event.metrics or self.metrics

    def trimode(self) -> dict:
        m = self.metrics
        return {"mode": self.mode, "nfe": getattr(m, "nfe", 0),
                "tokens_per_forward": round(getattr(m, "tokens_per_forward", 0.0), 4),
                "acceptance_length": _round(getattr(m, "acceptance_length", None)),
                **step_metrics(m)}


def step_metrics(m) -> dict:
    """Per draft slot proposed / accepted, per-mode acceptance, tokens and switches."""
    if not hasattr(m, "draft_proposed"):
        return {}
    return {"draft_slots": {"proposed": list(m.draft_proposed), "accepted": list(m.draft_accepted)},
            "acceptance_rate": {k: round(v, 4) for k, v in m.acceptance_rate.items()},
            "mode_tokens": dict(m.mode_tokens), "mode_switches": m.mode_switches}


def _round(x):
    return None if x is None else round(x, 4)


def _lp(x: float) -> float:
    x = float(x)
    return FLOOR if x != x or x < FLOOR else x  # NaN or -inf -> floor


def logprobs(entries, endpoint: str, tokenizer, offset: int = 0) -> dict | None:
    """OpenAI logprobs for TokenLogprob entries; ``offset``: characters already sent
    (completions' text_offset)."""
    if entries is None:
        return None
    piece = lambda i: tokenizer.decode([i])  # noqa: E731
    raw = lambda i: list(tokenizer.token_bytes(i))  # noqa: E731  (exact, even mid-character)
    if endpoint == "chat":
        return {"content": [
            {"token": piece(e.token_id), "logprob": _lp(e.logprob), "bytes": raw(e.token_id),
             "top_logprobs": [{"token": piece(t), "logprob": _lp(lp), "bytes": raw(t)}
                              for t, lp in e.top]} for e in entries]}
    tokens = [piece(e.token_id) for e in entries]
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t)
    return {"tokens": tokens, "token_logprobs": [_lp(e.logprob) for e in entries],
            "top_logprobs": [{piece(t): _lp(lp) for t, lp in e.top} for e in entries],
            "text_offset": offsets}


def full_choice(c: Choice, endpoint: str, tokenizer) -> dict:
    out = {"index": c.index, "logprobs": logprobs(c.logprobs, endpoint, tokenizer),
           "finish_reason": c.finish_reason,
           "trimode": c.trimode()}
    if endpoint == "chat":
        out["message"] = {"role": "assistant", "content": c.text}
        if c.reasoning is not None:  # vLLM's and DeepSeek's field
            out["message"]["reasoning_content"] = c.reasoning or None
    else:
        out["text"] = c.text
    return out


def chunk(meta: dict, obj: str, choices: list[dict]) -> dict:
    return {**meta, "object": obj, "choices": choices}


def chunk_choice(c: Choice, event, endpoint: str, tokenizer) -> dict:
    """One stream chunk's choice: this event's text and logprobs; the last one carries
    finish_reason and the choice's ``trimode`` object."""
    sent_before = len(c.text) - len(event.text)
    out = {"index": c.index,
           "logprobs": logprobs(event.logprobs, endpoint, tokenizer, sent_before),
           "finish_reason": event.finish_reason}
    if endpoint == "chat":
        out["delta"] = {"content": event.text} if event.text else {}
        if getattr(event, "reasoning", ""):
            out["delta"] = {"reasoning_content": event.reasoning, **out["delta"]}
    else:
        out["text"] = event.text
    if event.finish_reason is not None:
        out["trimode"] = c.trimode()
    return out


def usage(prompt_tokens: int, choices: list[Choice], reasoning_tokens: int | None = None) -> dict:
    """OpenAI usage; ``reasoning_tokens`` (generated ids inside ``<think> ... </think>``,
    tags excluded) when the tokenizer spells the tags."""
    completion = sum(len(c.token_ids) for c in choices)
    out = {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
           "total_tokens": prompt_tokens + completion}
    if reasoning_tokens is not None:
        out["completion_tokens_details"] = {"reasoning_tokens": reasoning_tokens}
    return out


def summary(choices: list[Choice]) -> dict:
    """The response's ``trimode`` object: mode used and metrics summed over its choices."""
    ms = [c.metrics for c in choices if c.metrics is not None]
    nfe = sum(m.nfe for m in ms)
    generated = sum(m.generated_tokens for m in ms)
    accepted = [m.acceptance_length for m in ms if m.acceptance_length is not None]
    modes = sorted({c.mode for c in choices if c.mode})
    tokens: dict[str, int] = {}
    for m in ms:
        for mode, n in getattr(m, "mode_tokens", {}).items():
            tokens[mode] = tokens.get(mode, 0) + n
    return {"mode": modes[0] if len(modes) == 1 else modes, "nfe": nfe,
            "tokens_per_forward": round(generated / nfe, 4) if nfe else 0.0,
            "acceptance_length": round(sum(accepted) / len(accepted), 4) if accepted else None,
            "mode_tokens": tokens, "mode_switches": sum(getattr(m, "mode_switches", 0) for m in ms)}
