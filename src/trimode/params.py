"""Per-request decoding settings, validated at construction.

Every knob is per request (mode, block_length, threshold, temperature, ...). Invalid values
raise :class:`FieldError` (a ValueError) naming the field and its allowed range, NaN included
(docs/cases.md B25). Defaults come from ``defaults.py``, shared with the CLI and the server.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .defaults import (AUTO, DRAFT_SEGMENTS, MAX_LOGPROBS, MAX_TOKENS, MODES, THRESHOLD, UNMASK,
                       UNMASK_POLICIES)


class FieldError(ValueError):
    """A bad value of one request field: ``field`` (e.g. ``"top_p"``) and ``message`` (the
    rule and the value). ``str()`` is ``"<field> <message>"``, so callers that show it
    need not change; callers that map fields to flags or JSON params read ``field``."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field} {message}")
        self.field = field
        self.message = message


class _ModeDefault:
    """The ``threshold`` a request gets when it gives none: ``defaults.THRESHOLD[mode]``, or
    None for a diffusion request that gives ``steps`` (its quota schedule); ``None`` stays the
    explicit request for diffusion's even schedule."""

    def __repr__(self) -> str:
        return "MODE_DEFAULT"

    def __reduce__(self) -> str:
        return "MODE_DEFAULT"


MODE_DEFAULT = _ModeDefault()


class ParamError(ValueError):
    """A request that cannot run, with ``field``: the one input the caller should change
    (e.g. ``max_tokens`` when prompt + max_tokens is over the context limit)."""

    def __init__(self, message: str, field: str):
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class SamplingParams:
    """How one request is decoded.

    mode: ``"ar"`` (causal, one token per forward), ``"diffusion"`` (block diffusion, spec 3),
        ``"linear_spec"`` (self-speculation, spec 5.1) or ``"quadratic_spec"`` (draft and
        verify fused in one forward, spec 5.5; see ``decoding/quadratic_spec.py``) or ``"auto"``
        (the engine picks ``ar`` or its parallel mode from the load at admission; see
        ``engine.AutoPolicy``). The output is always exactly what the chosen mode gives.
    max_tokens: generated-token limit, >= 1. Never exceeded in any mode.
    temperature: >= 0; 0 is greedy. top_k: 0 (off) or >= 1. top_p: in (0, 1].
    seed: makes sampling reproducible (same seed, same output, whatever the batch).
    stop_token_ids: extra ids that end the request like EOS (not returned).
    block_length: diffusion block / draft window, >= 1; None means the checkpoint's
        ``block_size``.
    threshold: in [0, 1]; diffusion unmasks every masked slot whose confidence reaches it
        (at least one per pass); None gives the even schedule (docs/spec.md 3.3). For
        linear_spec the draft threshold: 0 drafts in one pass (the reference default).
        Not given: the mode's default from ``defaults.THRESHOLD`` (diffusion 0.9, the
        speculative modes 0; diffusion with ``steps``: None), resolved when the mode is
        (``auto``: at admission).
    unmask: diffusion's unmasking policy, the order in which a denoising pass fills masked
        slots: ``"confidence"`` (the candidate's probability, the reference's; default),
        ``"margin"`` (top-1 minus top-2 probability), ``"entropy"`` (lowest entropy first),
        ``"random"`` (a random order keyed by ``seed`` and the position) or ``"leftmost"``.
        Scores use the model's raw distribution softmax(z) over the full vocabulary, as
        confidence does (docs/spec.md 3.3); see ``decoding/unmask.py``. Ignored by the other
        modes.
    steps: diffusion denoising passes per block, >= 1 (llama.cpp's ``--diffusion-steps`` per
        block): pass s unmasks the s-th quota of the even split of the block's masks over
        ``steps`` passes (at least one slot), in ``unmask`` order. With ``threshold`` None
        that is all it unmasks (the quota schedule; None steps = block_length, spec 3.3);
        with a threshold it also unmasks every slot whose confidence reaches it, so a block
        takes at most ``steps`` passes. None without a threshold: block_length passes; None
        with one: one slot per pass plus the threshold's (today's rule). Ignored by the
        other modes.
    draft_segments: quadratic_spec only: m >= 1 keeps draft segments for the m acceptance
        outcomes nearest the last acceptance (pruned layout, block_length * (m + 1) tokens
        per forward); None keeps one for every outcome (block_length + block_length^2).
        Default 1: the fastest on CPU in benchmarks/RESULTS.md.
    trace: record a per-forward trace in ``RequestOutput.metrics.trace``.
    logprobs: None (off) or 0 .. 20: record each generated token's log-probability (and
        this many most likely alternatives) under the model's raw distribution (fp32
        log-softmax of the logits, no temperature) *at the forward that chose it*: the AR
        step, the denoising pass that unmasked it, or the verify pass that accepted it.
    max_thinking_tokens: None (off) or an integer >= 0: at most this many tokens are
        generated inside ``<think>``; then ``</think>`` is forced, in every mode
        (``decoding/thinking.py``). Needs a tokenizer that spells the tags.
    """

    mode: str = "ar"
    max_tokens: int = MAX_TOKENS
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    block_length: int | None = None
    threshold: float | None = MODE_DEFAULT  # type: ignore[assignment]
    draft_segments: int | None = DRAFT_SEGMENTS
    trace: bool = False
    logprobs: int | None = None
    max_thinking_tokens: int | None = None
    unmask: str = UNMASK
    steps: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise FieldError("mode", f"must be one of {', '.join(MODES)}; got {self.mode!r}")
        if self.unmask not in UNMASK_POLICIES:
            raise FieldError("unmask", f"must be one of {', '.join(UNMASK_POLICIES)}; "
                             f"got {self.unmask!r}")
        if self.steps is not None:
            _check_int("steps", self.steps, low=1)
        if self.threshold is MODE_DEFAULT and self.mode != AUTO:
            quota = self.mode == "diffusion" and self.steps is not None
            object.__setattr__(self, "threshold", None if quota else THRESHOLD[self.mode])
        _check_int("max_tokens", self.max_tokens, low=1)
        _check_real("temperature", self.temperature, "must be 0 (greedy) or in [1e-4, inf)",
                    lambda v: v == 0 or v >= 1e-4)  # below 1e-4, z / T overflows to NaN
        _check_int("top_k", self.top_k, low=0)
        _check_real("top_p", self.top_p, "must be in (0, 1]", lambda v: 0 < v <= 1)
        if self.seed is not None:
            _check_int("seed", self.seed, low=0)
            if self.seed >= 2**63:
                raise FieldError("seed", f"must be an integer in [0, 2**63); got {self.seed}")
        if self.block_length is not None:
            _check_int("block_length", self.block_length, low=1)
        if self.threshold is not None and self.threshold is not MODE_DEFAULT:
            _check_real("threshold", self.threshold, "must be in [0, 1] or None",
                        lambda v: 0 <= v <= 1)
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, low=0)
            if self.logprobs > MAX_LOGPROBS:
                raise FieldError("logprobs", f"must be None or an integer in [0, {MAX_LOGPROBS}]; "
                                 f"got {self.logprobs}")
        if self.max_thinking_tokens is not None:
            _check_int("max_thinking_tokens", self.max_thinking_tokens, low=0)
        if self.draft_segments is not None:
            _check_int("draft_segments", self.draft_segments, low=1)
        if self.mode == "quadratic_spec" and self.threshold not in (None, 0):
            raise FieldError("threshold", "must be 0 or None for quadratic_spec (it drafts in "
                             f"one pass); got {self.threshold}")
        if not isinstance(self.stop_token_ids, (list, tuple, set, frozenset)):
            raise FieldError("stop_token_ids", "must be a list of integers >= 0; "
                             f"got {self.stop_token_ids!r}")
        if not isinstance(self.trace, bool):
            raise FieldError("trace", f"must be True or False; got {self.trace!r}")
        ids = tuple(self.stop_token_ids)
        for i in ids:
            _check_int("stop_token_ids", i, low=0)
        object.__setattr__(self, "stop_token_ids", ids)
        if self.mode in ("linear_spec", "quadratic_spec") and self.threshold is None:
            object.__setattr__(self, "threshold", 0.0)


def _check_int(name: str, value: object, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise FieldError(name, f"must be an integer >= {low}; got {value!r}")


def _check_real(name: str, value: object, rule: str, ok) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise FieldError(name, f"{rule}; got {value!r}")
    if math.isnan(value) or math.isinf(value) or not ok(value):
        raise FieldError(name, f"{rule}; got {value}")
