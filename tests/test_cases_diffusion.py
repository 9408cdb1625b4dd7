"""Field cases for block diffusion on stub models (B01, B02, B03, B04, B11, B13 diffusion part).

Every expected value is derived here from the toy language and spec sections 3.2, 3.3 and
3.5, never read back from the engine. Stubs: ``tests/stubs.py``.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from stubs import (EOS, FIRST, MASK, PERFECT, Drafter, HashDenoiser, HashLM, ScriptLM,
                   StubModel, ar_greedy, kinds, logit_for, run, run_one, single_thread)
from trimode import SamplingParams

assert single_thread  # autouse fixture, imported for its effect

PROMPT = [9, 8, 7]


def diffusion(**kw) -> SamplingParams:
    """Diffusion params for these cases: the even schedule (threshold None) unless a case
    names a threshold (SamplingParams' own default is defaults.THRESHOLD["diffusion"])."""
    kw.setdefault("trace", True)
    kw.setdefault("threshold", None)
    return SamplingParams(mode="diffusion", **kw)


def trace_of(seq) -> list[tuple]:
    return [(t.kind, t.positions, t.tokens) for t in seq.metrics.trace]


# --------------------------------------------------------------------------------- B01

B01_PROMPT = [10, 11, 12]
A, B, C, D, E, Z = 20, 21, 22, 23, 24, 30


class EosAtFive:
    """B01 denoiser for the B01 prompt: offsets 1-4 prefer B..E (confidence 0.80..0.77),
    offset 5 EOS (0.95, the most confident), offsets 6.. Z (0.30). Other prompts: perfect."""

    def __call__(self, model, prefix, block):
        if prefix[: len(B01_PROMPT)] != B01_PROMPT:
            return PERFECT(model, prefix, block)
        out = torch.zeros(len(block), model.vocab)
        for i in range(1, len(block)):
            tok, conf = ((B, C, D, E)[i - 1], 0.80 - 0.01 * (i - 1)) if i <= 4 else \
                (EOS, 0.95) if i == 5 else (Z, 0.30)
            out[i, tok] = logit_for(conf)
        return out


def b01_model() -> StubModel:
    # The AR seed after the prompt is A (offset 0 of the first block comes from the prefill).
    return StubModel(ScriptLM(B01_PROMPT, [A, B, C, D, E]), EosAtFive())


@pytest.mark.parametrize("threshold", [0.9, None])
def test_b01_eos_inside_block_stops_after_masks_left_of_it_are_filled(threshold):
    model = b01_model()
    seq = run_one(model, B01_PROMPT, diffusion(max_tokens=128, block_length=32,
                                               threshold=threshold))
    assert seq.generated == [A, B, C, D, E]
    assert seq.finish_reason == "stop"
    assert MASK not in seq.generated and EOS not in seq.generated
    # EOS first (most confident), then B..E one per pass in confidence order; Z never
    # committed; no commit pass, so no further block was started.
    assert trace_of(seq) == [("prefill", (0,), (A,)), ("denoise", (5,), (EOS,)),
                             ("denoise", (1,), (B,)), ("denoise", (2,), (C,)),
                             ("denoise", (3,), (D,)), ("denoise", (4,), (E,))]
    assert seq.metrics.nfe == 6
    assert seq.metrics.generated_tokens == 6  # A..E plus the stop token
    causal = [r for call in model.calls for r in call if not r["bidirectional"]]
    assert len(causal) == 1  # the prefill only


def test_b01_threshold_zero_fills_block_and_cuts_at_eos():
    seq = run_one(b01_model(), B01_PROMPT, diffusion(max_tokens=128, block_length=32,
                                                      threshold=0.0))
    assert seq.generated == [A, B, C, D, E] and seq.finish_reason == "stop"
    assert trace_of(seq) == [("prefill", (0,), (A,)),
                             ("denoise", tuple(range(1, 32)), (B, C, D, E, EOS) + (Z,) * 26)]


def test_b01_eos_as_the_seed_ends_before_any_denoising():
    model = StubModel(ScriptLM(B01_PROMPT, [EOS, A, B]), EosAtFive())
    seq = run_one(model, B01_PROMPT, diffusion(max_tokens=128, block_length=32, threshold=0.9))
    assert seq.generated == [] and seq.finish_reason == "stop"
    assert kinds(seq) == ["prefill"] and seq.metrics.nfe == 1


def test_b01_early_stop_is_per_row_in_a_batch():
    """The reference stops denoising for every row once any row has a clean EOS (spec 3.5,
    a quirk); here the other row must decode exactly as alone, to max_tokens."""
    other = [33, 5, 6, 7, 8]
    model = b01_model()
    params = diffusion(max_tokens=128, block_length=32, threshold=0.9)
    first, second = run(model, [B01_PROMPT, other], params)
    assert first.generated == [A, B, C, D, E] and first.finish_reason == "stop"
    assert second.generated == ar_greedy(model.lm, other, 128)[0]
    assert second.finish_reason == "length"
    alone = run_one(b01_model(), other, params)
    assert trace_of(second) == trace_of(alone)


# --------------------------------------------------------------------------------- B02


def mask_model() -> StubModel:
    """Logits peak at the mask id (logit 30, p ~ 1) in every pass; the runner-up is the AR
    continuation (perfect drafter / AR choice), so greedy output must equal AR."""
    return StubModel(HashLM(), Drafter(mask_logit=30.0), causal_mask_logit=30.0)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("threshold", [None, 0.9, 0.0])
@pytest.mark.parametrize("max_tokens", [32, 64])
def test_b02_mask_never_committed_in_diffusion(temperature, threshold, max_tokens):
    model = mask_model()
    seq = run_one(model, PROMPT, diffusion(max_tokens=max_tokens, block_length=32,
                                           threshold=threshold, temperature=temperature, seed=3))
    assert MASK not in seq.generated
    blocks = math.ceil(max_tokens / 32)
    denoise = kinds(seq).count("denoise")
    # The mask's probability ~1 makes every confidence tiny: one slot per pass, 31 passes
    # per block (threshold 0: one pass per block); never more than block_length - 1.
    assert denoise == blocks * (1 if threshold == 0.0 else 31)
    if temperature == 0:
        assert seq.generated == ar_greedy(model.lm, PROMPT, max_tokens)[0]
        assert seq.finish_reason == "length"
        assert seq.metrics.nfe == 1 + denoise + (blocks - 1)  # prefill + denoise + commits
    else:
        assert len(seq.generated) <= max_tokens


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_b02_mask_never_chosen_in_ar(temperature):
    model = mask_model()
    seq = run_one(model, PROMPT, SamplingParams(mode="ar", max_tokens=32,
                                                temperature=temperature, seed=5))
    assert MASK not in seq.generated
    if temperature == 0:
        assert seq.generated == ar_greedy(model.lm, PROMPT, 32)[0]


# --------------------------------------------------------------------------------- B03

_PERM = list(range(32))
random.Random(0).shuffle(_PERM)


def conf_ordered(i: int) -> float:
    """Distinct confidences in [0.40, 0.87]: slot i's rank is _PERM[i]."""
    return 0.40 + 0.015 * _PERM[i]


def ordered_model() -> StubModel:
    return StubModel(HashLM(), Drafter(conf=conf_ordered))


@pytest.mark.parametrize("threshold", [1.0, 0.999999])
def test_b03_threshold_one_unmasks_one_token_per_pass_in_confidence_order(threshold):
    model = ordered_model()
    seq = run_one(model, PROMPT, diffusion(max_tokens=64, block_length=32, threshold=threshold))
    assert seq.generated == ar_greedy(model.lm, PROMPT, 64)[0]
    order = sorted(range(1, 32), key=lambda i: -conf_ordered(i))
    denoised = [t.positions for t in seq.metrics.trace if t.kind == "denoise"]
    assert denoised == [(i,) for i in order] + [(32 + i,) for i in order]
    assert kinds(seq) == ["prefill"] + ["denoise"] * 31 + ["commit"] + ["denoise"] * 31
    assert seq.metrics.nfe == 64


def test_b03_threshold_zero_fills_block_in_one_pass():
    model = ordered_model()
    seq = run_one(model, PROMPT, diffusion(max_tokens=64, block_length=32, threshold=0.0))
    assert seq.generated == ar_greedy(model.lm, PROMPT, 64)[0]
    assert [(t.kind, t.positions) for t in seq.metrics.trace] == [
        ("prefill", (0,)), ("denoise", tuple(range(1, 32))), ("commit", (32,)),
        ("denoise", tuple(range(33, 64)))]
    assert seq.metrics.nfe == 4


@pytest.mark.parametrize("bad", [1.5, -0.1, float("nan"), float("inf"), 2])
@pytest.mark.parametrize("mode", ["diffusion", "linear_spec"])
def test_b03_threshold_outside_unit_interval_is_rejected(bad, mode):
    with pytest.raises(ValueError, match="threshold"):
        SamplingParams(mode=mode, threshold=bad)


# --------------------------------------------------------------------------------- B04


def hash_model() -> StubModel:
    return StubModel(HashLM(), HashDenoiser())


@pytest.mark.parametrize("block_length,padded", [(32, 64), (24, 72)])
def test_b04_max_tokens_not_a_multiple_of_block_length(block_length, padded):
    params = diffusion(max_tokens=50, block_length=block_length, threshold=0.9)
    model = hash_model()
    seq = run_one(model, PROMPT, params)
    assert len(seq.generated) == 50 and seq.finish_reason == "length"
    assert MASK not in seq.generated
    again = run_one(hash_model(), PROMPT, params)
    assert again.generated == seq.generated and trace_of(again) == trace_of(seq)
    # Documented policy (DiffusionStrategy): the last block is denoised at full length and
    # truncated, so the result is a prefix of the run with max_tokens = ceil(50/bl)*bl.
    full = run_one(hash_model(), PROMPT, diffusion(max_tokens=padded, block_length=block_length,
                                                    threshold=0.9))
    assert seq.generated == full.generated[:50]
    assert seq.generated != ar_greedy(model.lm, PROMPT, 50)[0]  # the denoiser mattered
    # Every block forward has exactly block_length slots: internal padding is `padded`.
    rows = [r for call in model.calls[1:] for r in call]
    assert {r["n"] for r in rows} == {block_length}
    assert max(r["length"] + r["n"] for r in rows) == len(PROMPT) + padded


@pytest.mark.parametrize("bad", [0, -8])
def test_b04_block_length_must_be_positive(bad):
    with pytest.raises(ValueError, match="block_length"):
        SamplingParams(mode="diffusion", block_length=bad)


def test_b04_block_length_one_is_one_token_per_block():
    model = hash_model()  # the hash denoiser would change the output if it were ever used
    seq = run_one(model, PROMPT, diffusion(max_tokens=20, block_length=1))
    ar = run_one(model, PROMPT, SamplingParams(mode="ar", max_tokens=20))
    assert seq.generated == ar.generated == ar_greedy(model.lm, PROMPT, 20)[0]
    assert kinds(seq) == ["prefill"] + ["commit"] * 19
    assert seq.metrics.nfe == ar.metrics.nfe == 20


# --------------------------------------------------------------------------------- B11


def test_b11_default_block_length_is_the_checkpoint_block_size(tiny_llm):
    assert tiny_llm.config.block_size == 8  # what the fixture writes
    prompt = [5, 17, 42, 9]
    default = tiny_llm.generate(prompt, diffusion(max_tokens=20, threshold=0.9))[0]
    assert len(default.token_ids) == 20  # no EOS for this prompt: three blocks of 8
    commits = [t.positions for t in default.metrics.trace if t.kind == "commit"]
    assert commits == [(8,), (16,)]
    explicit = tiny_llm.generate(prompt, diffusion(max_tokens=20, threshold=0.9,
                                                   block_length=8))[0]
    assert default.token_ids == explicit.token_ids
    assert trace_of(default) == trace_of(explicit)
    spec = tiny_llm.generate(prompt, SamplingParams(mode="linear_spec", max_tokens=20,
                                                    trace=True))[0]
    first_draft = next(t for t in spec.metrics.trace if t.kind == "draft")
    assert first_draft.positions == tuple(range(1, 8))


# --------------------------------------------------------------------------------- B13


class SlotDrafter:
    """Slot i proposes FIRST + 10 + i: the committed token tells which logit row it came from."""

    def __call__(self, model, prefix, block):
        out = torch.zeros(len(block), model.vocab)
        for i in range(len(block)):
            out[i, FIRST + 10 + i] = logit_for(0.9)
        return out


def test_b13_diffusion_slot_i_comes_from_logit_i():
    model = StubModel(HashLM(), SlotDrafter())
    seq = run_one(model, PROMPT, diffusion(max_tokens=8, block_length=8, threshold=0.0))
    seed = HashLM().next(PROMPT)
    assert seq.generated == [seed] + [FIRST + 10 + i for i in range(1, 8)]
