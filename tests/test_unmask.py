"""Diffusion's unmasking policies and ``steps``: the batched device selection equals the slow
reference decoder token for token (fp32, temperature 0), for every policy, with blocks that
straddle ``max_tokens``, and with every policy in one batch; plus validation."""

from __future__ import annotations

import random

import pytest
import torch

from conftest import EOS, MASK
from reference import ref_diffusion
from trimode import SamplingParams
from trimode.decoding import select, unmask
from trimode.defaults import UNMASK_POLICIES
from trimode.params import FieldError

PROMPTS = [[5, 9, 14], [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50], [77, 6, 30, 31, 12, 90]]
# (threshold, steps): the threshold rule, the quota schedule over 2 passes, both, and the
# even schedule of block_length passes
SCHEDULES = [(0.6, None), (None, 2), (0.8, 3), (None, None)]


def check_equal(llm, oracle, prompts, params_list):
    outs = llm.generate(prompts, params_list)  # one batch
    for prompt, p, out in zip(prompts, params_list, outs):
        ids, nfe = ref_diffusion(oracle, prompt, p.max_tokens, p.block_length, p.threshold,
                                 {EOS}, MASK, unmask=p.unmask, steps=p.steps, seed=p.seed)
        assert out.token_ids == ids, (prompt, p)
        assert out.metrics.nfe == nfe, (prompt, p)
    return outs


@pytest.mark.parametrize("policy", UNMASK_POLICIES)
@pytest.mark.parametrize("threshold, steps", SCHEDULES)
def test_policy_equals_reference(tiny, tiny_llm, policy, threshold, steps):
    """block_length 5 and max_tokens 12: the last block straddles the limit."""
    params = SamplingParams(mode="diffusion", max_tokens=12, block_length=5, threshold=threshold,
                            steps=steps, unmask=policy, seed=7)
    check_equal(tiny_llm, tiny[1], PROMPTS, [params] * len(PROMPTS))


def test_mixed_policies_in_one_batch_equal_reference_and_single_runs(tiny, tiny_llm):
    rng = random.Random(3)
    prompts, params = [], []
    for i, policy in enumerate(UNMASK_POLICIES * 2):
        threshold, steps = SCHEDULES[i % len(SCHEDULES)]
        prompts.append([rng.randrange(4, 96) for _ in range(rng.randrange(2, 12))])
        params.append(SamplingParams(mode="diffusion", max_tokens=9, block_length=4 + i % 3,
                                     threshold=threshold, steps=steps, unmask=policy, seed=i))
    batched = check_equal(tiny_llm, tiny[1], prompts, params)
    for prompt, p, out in zip(prompts[:5], params, batched):
        assert tiny_llm.generate([prompt], p)[0].token_ids == out.token_ids


def test_policies_unmask_in_different_orders(tiny_llm):
    """The policies are really different rules: over a few prompts their first denoising
    passes unmask different slots (the trace's positions)."""
    orders = {}
    for policy in UNMASK_POLICIES:
        params = SamplingParams(mode="diffusion", max_tokens=8, block_length=8, threshold=None,
                                unmask=policy, seed=1, trace=True)
        outs = tiny_llm.generate(PROMPTS, params)
        orders[policy] = [tuple(t.positions for t in out.metrics.trace if t.kind == "denoise")
                          for out in outs]
    assert len({str(v) for v in orders.values()}) == len(UNMASK_POLICIES)
    for passes in orders["leftmost"]:  # left to right, one slot per pass
        assert list(passes) == [(i,) for i in range(1, len(passes) + 1)]


def test_steps_bounds_passes_per_block(tiny_llm):
    """The quota schedule: a block of 8 (7 masks) takes exactly ``steps`` passes (llama.cpp's
    get_num_transfer_tokens: 7 over 3 passes is 3, 2, 2)."""
    params = SamplingParams(mode="diffusion", max_tokens=8, block_length=8, steps=3, trace=True)
    assert params.threshold is None  # steps without a threshold: the quota schedule
    out = tiny_llm.generate([PROMPTS[1]], params)[0]
    passes = [len(t.positions) for t in out.metrics.trace if t.kind == "denoise"]
    assert out.finish_reason == "length" and passes == [3, 2, 2]
    with_threshold = SamplingParams(mode="diffusion", max_tokens=8, block_length=8, steps=3,
                                    threshold=0.0, trace=True)
    out = tiny_llm.generate([PROMPTS[1]], with_threshold)[0]
    assert [len(t.positions) for t in out.metrics.trace if t.kind == "denoise"] == [7]


def test_random_order_depends_on_the_seed_only(tiny_llm):
    params = [SamplingParams(mode="diffusion", max_tokens=16, block_length=16, steps=15,
                             unmask="random", seed=s, trace=True) for s in (1, 2, 1)]
    outs = tiny_llm.generate([PROMPTS[0]] * 3, params)
    order = [[t.positions for t in o.metrics.trace if t.kind == "denoise"] for o in outs]
    assert order[0] == order[2] != order[1]


def test_priority_scores_by_hand():
    z = torch.tensor([[3.0, 1.0, 0.0, 9.0], [1.0, 1.0, 1.0, 0.0]])  # id 3 is the mask
    p = torch.softmax(z, -1)
    assert torch.allclose(unmask.margin(z, 3), torch.stack([p[0, 0] - p[0, 1], p[1, 0] - p[1, 1]]))
    assert torch.allclose(unmask.entropy(z), -(p * p.log()).sum(-1))
    conf = torch.tensor([[0.5, 0.25]])
    where = (torch.tensor([0, 0]), torch.tensor([0, 1]))
    left = unmask.priority(z, conf, where, ["leftmost"], [0], [0], 3)
    assert left.tolist() == [[0.0, -1.0]]
    rand = unmask.priority(z, conf, where, ["random"], [5], [10], 3)
    assert rand.dtype == torch.float64 and ((rand > 0) & (rand < 1)).all()
    same = unmask.priority(z[1:], conf[:, 1:], (where[0][1:], torch.tensor([0])), ["random"], [5], [11], 3)
    assert same[0, 0] == rand[0, 1]  # keyed by the position (offset + slot), not the slot


def test_unmask_with_a_policy_score_ties_included():
    gen = torch.Generator().manual_seed(5)
    for trial in range(100):
        length = int(torch.randint(2, 20, (), generator=gen))
        conf = torch.randint(0, 4, (4, length), generator=gen).float() / 4
        score = torch.randint(0, 3, (4, length), generator=gen).double()  # many ties
        masked = torch.rand(4, length, generator=gen) < 0.7
        masked[:, 0] = True
        thresholds, quotas = [None, 0.5, 0.75, None], [2, 1, 3, 0]
        n = masked.sum(-1).tolist()
        got = select.unmask(conf, masked, n, thresholds, quotas, score)
        for r in range(4):
            s = score[r].masked_fill(~masked[r], float("-inf"))
            k = min(max(quotas[r], 1), n[r])
            if thresholds[r] is None:
                want = torch.topk(s, k).indices.tolist()
            else:
                order = torch.topk(s, n[r]).indices.tolist()
                want = order[:k] + [i for i in order[k:] if conf[r, i] >= thresholds[r]]
            assert got[r].nonzero().flatten().tolist() == sorted(want), (trial, r)


@pytest.mark.parametrize("kwargs, field", [
    (dict(unmask="best"), "unmask"), (dict(unmask=None), "unmask"), (dict(steps=0), "steps"),
    (dict(steps=True), "steps"), (dict(steps=2.5), "steps"),
])
def test_bad_values_name_the_field(kwargs, field):
    with pytest.raises(FieldError) as info:
        SamplingParams(mode="diffusion", **kwargs)
    assert info.value.field == field
    assert ("confidence, margin, entropy, random, leftmost" if field == "unmask"
            else "integer >= 1") in str(info.value)


def test_threshold_resolution_with_steps():
    assert SamplingParams(mode="diffusion").threshold == 0.9
    assert SamplingParams(mode="diffusion", steps=4).threshold is None
    assert SamplingParams(mode="diffusion", steps=4, threshold=0.5).threshold == 0.5
    assert SamplingParams(mode="linear_spec", steps=4).threshold == 0.0  # ignored there


def test_sampled_policies_do_not_depend_on_the_batch(tiny_llm):
    """At temperature > 0 a seeded request gives the same tokens alone or beside others."""
    params = [SamplingParams(mode="diffusion", max_tokens=10, block_length=4, temperature=0.9,
                             unmask=policy, steps=2 if i % 2 else None, seed=20 + i)
              for i, policy in enumerate(UNMASK_POLICIES)]
    prompts = [PROMPTS[i % 3] for i in range(len(params))]
    batched = tiny_llm.generate(prompts, params)
    for prompt, p, out in zip(prompts, params, batched):
        assert tiny_llm.generate([prompt], p)[0].token_ids == out.token_ids


def test_huge_steps_is_one_slot_per_pass(tiny_llm):
    """steps beyond the block's masks behaves as one mask per pass (and allocates nothing
    per step: a request may send any integer >= 1)."""
    big, one = (SamplingParams(mode="diffusion", max_tokens=9, block_length=4, steps=s, seed=1)
                for s in (10**15, 3))
    a, b = tiny_llm.generate([PROMPTS[0]] * 2, [big, one])
    assert a.token_ids == b.token_ids and a.metrics.nfe == b.metrics.nfe


@pytest.mark.parametrize("policy", UNMASK_POLICIES)
def test_thinking_budget_holds_with_every_policy(policy):
    """The forced ``</think>`` (thinking budget) is kept whatever order slots unmask in."""
    from test_thinking import MULTI, PERFECT, PROMPT, StubModel, ThinkLM, check_closed_within, one

    from stubs import HashDenoiser

    lm, prompt = ThinkLM(MULTI), PROMPT + list(MULTI.open)
    for drafter in (PERFECT, HashDenoiser()):
        for threshold, steps in ((0.9, None), (None, 3), (0.5, 2)):
            seq = one(StubModel(lm, drafter), MULTI, prompt, mode="diffusion", max_tokens=40,
                      block_length=8, threshold=threshold, steps=steps, unmask=policy, seed=2,
                      max_thinking_tokens=5)
            check_closed_within(MULTI, prompt, seq.generated, 5)
