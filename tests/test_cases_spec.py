"""Field cases for self-speculation (linear_spec) on stub models and the tiny checkpoint:
B02/B03 (draft path), B12, B13, B14, B15, B16.

Expected values are derived from the toy language and spec 5.1, with this engine's
documented policy near max_tokens: the block shrinks to the tokens still allowed
(``LinearSpecStrategy._new_block``), so a verify never accepts past max_tokens.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch
from scipy.stats import chi2_contingency, chisquare

from stubs import (ADVERSARIAL, EOS, MASK, PARTIAL3, PERFECT, WRONG, ContextFreeStub, Drafter,
                   HashLM, RowDrafter, ScriptLM, StubModel, ar_greedy, kinds, make_seq, run,
                   run_one, single_thread, verify_sizes)
from trimode import SamplingParams
from trimode.engine.decode import decode
from trimode.decoding.sequence import Sequence

assert single_thread  # autouse fixture, imported for its effect

PROMPT = [9, 8, 7]
DRAFTERS = {"perfect": (PERFECT, None), "adversarial": (ADVERSARIAL, 0), "partial": (PARTIAL3, 3)}


def spec(**kw) -> SamplingParams:
    kw.setdefault("trace", True)
    return SamplingParams(mode="linear_spec", **kw)


def expected_cycles(block_length: int, max_tokens: int, right: int | None):
    """(tokens per verify, nfe) for a drafter whose first ``right`` drafts per cycle are
    correct (None: all), on a language without EOS: one prefill (emits the seed), then per
    cycle a draft pass (when the block has a mask) and a verify accepting the correct
    drafts plus the bonus token. Draft 1 is always correct: the draft pass takes it from
    the causal copy of the seed (``linear_spec.draft_with_seed_copy``), not the drafter."""
    emitted, sizes, nfe = 1, [], 1
    while emitted < max_tokens:
        length = min(block_length, max_tokens - emitted)
        ok = length - 1 if right is None else min(max(right, 1), length - 1)
        sizes.append(ok + 1)
        nfe += 2 if length > 1 else 1
        emitted += ok + 1
    return sizes, nfe


# --------------------------------------------------------------------------------- B12 / B13


def test_b12_b13_perfect_drafter_accepts_every_draft_plus_bonus():
    model = StubModel(HashLM(), PERFECT)
    seq = run_one(model, PROMPT, spec(max_tokens=64, block_length=8))
    assert seq.generated == ar_greedy(model.lm, PROMPT, 64)[0]
    ar = run_one(model, PROMPT, SamplingParams(mode="ar", max_tokens=64))
    assert seq.generated == ar.generated
    # 1 (prefill seed) + 7 cycles of 8 (7 drafts + bonus) = 57; the last block shrinks to 7.
    assert verify_sizes(seq) == [8] * 7 + [7]
    assert seq.metrics.acceptance_length == 63 / 8 == 7.875
    assert seq.metrics.nfe == 17
    assert seq.finish_reason == "length"


def test_b12_adversarial_drafter_is_lossless_and_keeps_only_the_causal_draft_one():
    model = StubModel(HashLM(), ADVERSARIAL)
    seq = run_one(model, PROMPT, spec(max_tokens=64, block_length=8))
    assert seq.generated == ar_greedy(model.lm, PROMPT, 64)[0]
    assert WRONG not in seq.generated
    # every drafter slot is wrong; draft 1 comes from the causal seed copy, so each cycle
    # accepts it plus the bonus: 31 cycles of 2, then a 1-slot block (nothing to draft)
    assert verify_sizes(seq) == [2] * 31 + [1]
    assert seq.metrics.acceptance_length == 63 / 32
    # prefill + 31 x (draft + verify) + the last verify
    assert seq.metrics.nfe == 64 <= 2 * 64 + 1


def test_b13_partial_drafter_accepts_four_per_cycle():
    model = StubModel(HashLM(), PARTIAL3)
    seq = run_one(model, PROMPT, spec(max_tokens=64, block_length=8))
    assert seq.generated == ar_greedy(model.lm, PROMPT, 64)[0]
    assert verify_sizes(seq) == [4] * 15 + [3]
    assert seq.metrics.acceptance_length == 63 / 16
    assert seq.metrics.nfe == 33


@pytest.mark.parametrize("name", list(DRAFTERS))
@pytest.mark.parametrize("block_length", [8, 32])
def test_b12_acceptance_and_nfe_match_derivation(name, block_length):
    drafter, right = DRAFTERS[name]
    model = StubModel(HashLM(), drafter)
    seq = run_one(model, PROMPT, spec(max_tokens=64, block_length=block_length))
    sizes, nfe = expected_cycles(block_length, 64, right)
    assert seq.generated == ar_greedy(model.lm, PROMPT, 64)[0]
    assert verify_sizes(seq) == sizes
    assert seq.metrics.acceptance_length == pytest.approx(63 / len(sizes), abs=0)
    assert seq.metrics.nfe == nfe


# --------------------------------------------------------------------------------- B14

A, B, C, D, F = 20, 21, 22, 23, 24


@pytest.mark.parametrize("stop", [EOS, 25])  # the checkpoint's EOS, or a request stop id
def test_b14_eos_accepted_mid_block_ends_the_request(stop):
    model = StubModel(ScriptLM(PROMPT, [A, B, stop, C, D, F, F, F, F, F]), PERFECT)
    seen = []
    seq = run_one(model, PROMPT, spec(max_tokens=64, block_length=8, stop_token_ids=(25,)),
                  on_step=lambda s: seen.append(list(s.generated)))
    assert seq.generated == [A, B]
    assert seq.finish_reason == "stop"
    assert all(C not in g and D not in g for g in seen)  # no streamed view ever held C or D
    verify = [t for t in seq.metrics.trace if t.kind == "verify"]
    assert [(t.positions, t.tokens) for t in verify] == [((1, 2), (B, stop))]
    assert seq.metrics.generated_tokens == 3  # A, B and the stop token
    assert seq.metrics.nfe == 3  # prefill, draft, verify


def test_b14_eos_as_bonus_token_ends_the_request():
    # Drafts: B right, then WRONG: the verify accepts B and its bonus is EOS.
    model = StubModel(ScriptLM(PROMPT, [A, B, EOS, C, D]), Drafter(right=1))
    seq = run_one(model, PROMPT, spec(max_tokens=64, block_length=8))
    assert seq.generated == [A, B] and seq.finish_reason == "stop"
    assert verify_sizes(seq) == [2]


def test_b14_eos_as_first_token_ends_before_any_cycle():
    model = StubModel(ScriptLM(PROMPT, [EOS, C, D]), PERFECT)
    seq = run_one(model, PROMPT, spec(max_tokens=64, block_length=8))
    assert seq.generated == [] and seq.finish_reason == "stop"
    assert seq.metrics.nfe == 1 and seq.verifies == 0


# --------------------------------------------------------------------------------- B15

B15_RUNS = [(8, 64), (8, 9), (8, 8), (8, 7), (8, 2), (32, 64), (32, 33), (32, 32), (32, 31)]


@pytest.mark.parametrize("name", list(DRAFTERS))
@pytest.mark.parametrize("block_length,max_tokens", B15_RUNS)
def test_b15_cache_after_every_verify_holds_exactly_the_verified_text(name, block_length,
                                                                      max_tokens):
    drafter, right = DRAFTERS[name]
    model = StubModel(HashLM(), drafter)
    seq = make_seq(PROMPT, spec(max_tokens=max_tokens, block_length=block_length))
    checked = Counter()

    def before_forward(cache):  # state after the loop applied the previous step's crop
        if seq.strategy is None:
            return  # the prefill
        text = PROMPT + seq.generated[:-1]  # the last emitted token (bonus) is not cached yet
        assert int(cache.lengths[0]) == len(text)
        assert model.cached_tokens(cache, 0) == text
        checked["forward"] += 1

    def on_step(s):  # right after a verify, before the crop: what the crop will keep
        if s.metrics.trace[-1].kind != "verify":
            return
        kept = int(model.cache.lengths[0]) - s.rollback
        assert s.rollback >= 0
        assert kept == len(PROMPT) + len(s.generated) - 1
        assert model.cached_tokens(model.cache, 0, kept) == PROMPT + s.generated[:-1]
        checked["verify"] += 1

    model.before_forward = before_forward
    decode(model, [seq], on_step)
    sizes, nfe = expected_cycles(block_length, max_tokens, right)
    assert seq.generated == ar_greedy(model.lm, PROMPT, max_tokens)[0]
    assert seq.finish_reason == "length"
    assert verify_sizes(seq) == sizes and seq.metrics.nfe == nfe
    assert checked["verify"] == seq.verifies == len(sizes)
    assert checked["forward"] == nfe - 1
    if name == "adversarial":
        assert seq.metrics.nfe <= 2 * len(seq.generated) + 1


def test_b15_rows_with_different_rollbacks_in_one_batch():
    """Three rows, three drafters: each row is cropped by its own amount in the same step."""
    prompts = [[11, 12], [13, 14, 15, 16, 17], [18]]
    drafter = RowDrafter({tuple(prompts[0]): PERFECT, tuple(prompts[1]): ADVERSARIAL,
                          tuple(prompts[2]): PARTIAL3})
    model = StubModel(HashLM(), drafter)
    seqs = run(model, prompts, spec(max_tokens=40, block_length=8))
    for prompt, seq, right in zip(prompts, seqs, (None, 0, 3)):
        assert seq.generated == ar_greedy(model.lm, prompt, 40)[0]
        assert verify_sizes(seq) == expected_cycles(8, 40, right)[0]


# --------------------------------------------------------------------------------- B02 / B03


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("threshold", [0.0, 0.9])
def test_b02_mask_never_drafted_or_emitted(temperature, threshold):
    model = StubModel(HashLM(), Drafter(mask_logit=30.0), causal_mask_logit=30.0)
    seq = run_one(model, PROMPT, spec(max_tokens=32, block_length=32, threshold=threshold,
                                      temperature=temperature, seed=7))
    assert MASK not in seq.generated
    drafts = [t for t in seq.metrics.trace if t.kind == "draft"]
    assert all(MASK not in t.tokens for t in drafts)
    per_cycle = [len(run_) for run_ in "".join(k[0] for k in kinds(seq)).split("v") if run_]
    assert max(per_cycle) <= 31  # draft passes per cycle never exceed block_length - 1
    if temperature == 0:
        # The runner-up of every draft slot is the AR continuation: one cycle of 31 tokens.
        assert seq.generated == ar_greedy(model.lm, PROMPT, 32)[0]
        assert verify_sizes(seq) == [31]
        assert seq.metrics.nfe == (3 if threshold == 0 else 32)


def test_b03_draft_threshold_one_terminates_and_equals_ar():
    conf = lambda i: 0.40 + 0.05 * ((3 * i) % 8)  # noqa: E731  distinct per slot, < 1
    model = StubModel(HashLM(), Drafter(conf=conf))
    seq = run_one(model, PROMPT, spec(max_tokens=64, block_length=8, threshold=1.0))
    assert seq.generated == ar_greedy(model.lm, PROMPT, 64)[0]
    # One slot per draft pass, in confidence order; 7 cycles of 7 draft passes + verify,
    # then a 7-slot block (6 draft passes + verify), plus the prefill.
    first = [t.positions for t in seq.metrics.trace[1:8]]
    assert first == [(i,) for i in sorted(range(1, 8), key=lambda i: -conf(i))]
    assert verify_sizes(seq) == [8] * 7 + [7]
    assert seq.metrics.nfe == 1 + 7 * 8 + 7 == 64


# --------------------------------------------------------------------------------- B16

P6 = [0.40, 0.30, 0.15, 0.10, 0.05, 0.00]
# The draft q differs from p, puts mass on tokens p never emits (3, 5), and loses 9% of its
# mass (token 0, which p likes most) to top-p: a verifier that uses q without the same
# temperature / top-p processing as the draft sampling (the wrong q) visibly biases token 0.
Q6 = [0.12, 0.02, 0.26, 0.30, 0.00, 0.30]
EOS6, MASK6 = 6, 7


def processed(p: list[float], temperature: float, top_p: float) -> np.ndarray:
    """softmax(log p / T), then keep the smallest set of best tokens whose mass before each
    kept token is < top_p; renormalise (computed here independently of trimode)."""
    p = np.asarray(p, dtype=np.float64)
    w = np.where(p > 0, p, 0.0) ** (1 / temperature)
    w /= w.sum()
    out = np.zeros_like(w)
    before = 0.0
    for i in np.argsort(-w, kind="stable"):
        if before >= top_p or w[i] == 0:
            break
        out[i] = w[i]
        before += w[i]
    return out / out.sum()


def toy_logits(p, mask_logit: float) -> torch.Tensor:
    ninf = float("-inf")
    return torch.tensor([math.log(x) if x > 0 else ninf for x in p] + [ninf, mask_logit])


def sample_toy(mode: str, n: int, seed0: int, threshold: float | None = None):
    # The draft also puts 5/6 of its mass on the mask id: it must be excluded from q too.
    model = ContextFreeStub(toy_logits(P6, float("-inf")), toy_logits(Q6, math.log(5.0)),
                            mask=MASK6, eos=EOS6)
    seqs = [make_seq([0], SamplingParams(mode=mode, temperature=0.7, top_p=0.9, max_tokens=4,
                                         block_length=4, threshold=threshold, seed=seed0 + i,
                                         trace=True),
                     eos=EOS6, mask=MASK6) for i in range(n)]
    decode(model, seqs)
    assert all(len(s.generated) == 4 and s.finish_reason == "length" for s in seqs)
    return np.array([s.generated for s in seqs]), seqs


def test_b16_processed_target_of_the_toy():
    target = processed(P6, 0.7, 0.9)
    np.testing.assert_allclose(target, [0.52374, 0.34730, 0.12896, 0, 0, 0], atol=1e-4)


@pytest.fixture(scope="module")
def toy_samples():
    n = 4000
    return {"ar": sample_toy("ar", n, 1_000_000),
            "spec": sample_toy("linear_spec", n, 0, threshold=0.0),
            "spec_multipass": sample_toy("linear_spec", n // 2, 2_000_000, threshold=0.5)}


@pytest.mark.parametrize("run_name", ["ar", "spec", "spec_multipass"])
def test_b16_marginals_match_processed_target(toy_samples, run_name):
    tokens, seqs = toy_samples[run_name]
    target = processed(P6, 0.7, 0.9)
    for k in range(4):
        counts = np.bincount(tokens[:, k], minlength=8)
        assert counts[3:].sum() == 0, (k, counts)  # zero-probability tokens never emitted
        assert chisquare(counts[:3], target[:3] * len(tokens)).pvalue > 0.001, (k, counts)
    # Joint of two speculated positions (same verify): the target is context-free, so the
    # joint is the product of the marginals.
    pairs = np.bincount(tokens[:, 1] * 3 + tokens[:, 2], minlength=9)
    assert chisquare(pairs, np.outer(target[:3], target[:3]).ravel() * len(tokens)).pvalue > 0.001
    if run_name != "ar":  # drafts were both accepted and rejected: the rule was exercised
        sizes = Counter(n for s in seqs for n in verify_sizes(s))
        assert sizes[1] > 0 and sum(v for k, v in sizes.items() if k > 1) > 0


@pytest.mark.parametrize("run_name", ["spec", "spec_multipass"])
def test_b16_spec_matches_ar_run(toy_samples, run_name):
    ar, _ = toy_samples["ar"]
    sp, _ = toy_samples[run_name]
    for k in range(4):
        table = np.array([np.bincount(sp[:, k], minlength=3)[:3],
                          np.bincount(ar[:, k], minlength=3)[:3]])
        assert chi2_contingency(table).pvalue > 0.001, (k, table)


def exact_joint(oracle, prompt: list[int], depth: int, top_k: int) -> dict[tuple, float]:
    """Exact probabilities of the first ``depth`` tokens (EOS ends a branch) at temperature
    1 with top-k, mask id excluded, from the transformers oracle."""
    from reference import logits_of

    out: dict[tuple, float] = {}

    def walk(prefix: tuple, prob: float):
        z = logits_of(oracle, prompt + list(prefix))[-1].double()
        z[MASK] = float("-inf")
        top = torch.topk(z, top_k)
        probs = torch.softmax(top.values, -1)
        for tok, p in zip(top.indices.tolist(), probs.tolist()):
            if tok == EOS or len(prefix) + 1 == depth:
                out[prefix + (tok,)] = out.get(prefix + (tok,), 0.0) + prob * p
            else:
                walk(prefix + (tok,), prob * p)

    walk((), 1.0)
    return out


def tv_bound(p: np.ndarray, n: int, two_sample: bool = False, delta: float = 1e-4) -> float:
    """E[TV] <= 0.5 * sum sqrt(v * p (1 - p) / n) (v = 2 for two samples) plus the McDiarmid
    deviation at confidence 1 - delta (one sample moves TV by at most 1/n)."""
    v = 2.0 if two_sample else 1.0
    mean = 0.5 * np.sqrt(v * p * (1 - p) / n).sum()
    return float(mean + math.sqrt(v * math.log(1 / delta) / (2 * n)))


def first_token(outcomes: list[tuple], probs: np.ndarray) -> np.ndarray:
    firsts = sorted({o[0] for o in outcomes})
    return np.array([sum(q for o, q in zip(outcomes, probs) if o[0] == t) for t in firsts])


def test_b16_tiny_checkpoint_spec_samples_the_ar_distribution(tiny, tiny_llm):
    """First 3 generated tokens at temperature 1 (top_k 4, so the joint has at most 64
    outcomes and is computed exactly from the oracle): linear_spec, quadratic_spec and ar
    all match the
    exact joint and first-token distributions, and each other, within the TV bound above
    (failure probability <= 1e-4 each for a correct sampler) and by chi-square."""
    from conftest import EOS as T_EOS, MASK as T_MASK

    prompt = [4, 90, 33, 21, 8]  # a spread-out joint, 14% of it through an EOS
    exact = exact_joint(tiny[1], prompt, depth=3, top_k=4)
    outcomes = sorted(exact)
    p = np.array([exact[o] for o in outcomes])
    assert abs(p.sum() - 1) < 1e-9 and p.max() < 0.2 and len(p) == 64
    n = 3000
    empirical = {}
    for mode, seed0 in (("linear_spec", 0), ("quadratic_spec", 5 * 10**5), ("ar", 10**6)):
        seqs = [Sequence(prompt, SamplingParams(mode=mode, temperature=1.0, top_k=4,
                                                max_tokens=6, block_length=8, seed=seed0 + i,
                                                trace=True),
                         {T_EOS}, T_MASK, 8) for i in range(n)]
        decode(tiny_llm.model, seqs)
        counts = Counter(tuple((s.generated + [T_EOS] * (s.finish_reason == "stop"))[:3])
                         for s in seqs)
        assert set(counts) <= set(outcomes)
        q = np.array([counts[o] for o in outcomes]) / n
        empirical[mode] = q
        assert 0.5 * np.abs(q - p).sum() < tv_bound(p, n), mode
        pf, qf = first_token(outcomes, p), first_token(outcomes, q)
        assert 0.5 * np.abs(qf - pf).sum() < tv_bound(pf, n), mode
        big = p * n >= 5  # chi-square goodness of fit, outcomes expected < 5 times pooled
        obs, exp = list(q[big] * n), list(p[big] * n)
        if (~big).any():
            obs.append(q[~big].sum() * n)
            exp.append(p[~big].sum() * n)
        assert chisquare(obs, exp).pvalue > 0.001, mode
        if mode != "ar":  # drafts were both accepted and rejected
            sizes = Counter(k for s in seqs for k in verify_sizes(s))
            assert sizes[1] > 0 and sum(v for k, v in sizes.items() if k > 1) > 0
    for mode in ("linear_spec", "quadratic_spec"):
        tv_modes = 0.5 * np.abs(empirical[mode] - empirical["ar"]).sum()
        assert tv_modes < tv_bound(p, n, two_sample=True), mode
