"""The batched, on-device selection (decoding/select.py, decoding/rng.py) against the per-row
functions of sampling.py and the reference's selection rules."""

from __future__ import annotations

import pytest
import torch

from trimode.decoding import rng, sampling, select
from trimode.params import SamplingParams

MASK = 3


def _splitmix_finaliser(x: int) -> int:
    m = (1 << 64) - 1
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & m
    x = (x ^ (x >> 27)) * 0x94D049BB133111EB & m
    return x ^ (x >> 31)


def test_mix64_is_splitmix64_in_unsigned_arithmetic():
    values = [0, 1, 12345, (1 << 63) + 77, (1 << 64) - 1]
    got = rng.mix64(torch.tensor([v - (1 << 64) if v >= 1 << 63 else v for v in values]))
    assert [g & ((1 << 64) - 1) for g in got.tolist()] == [_splitmix_finaliser(v) for v in values]


def test_uniforms_depend_only_on_their_key():
    keys = rng.key(torch.tensor([7, 7, 8]), torch.tensor([0, 1, 0]), rng.PICK)
    u = rng.uniform(keys, 1000)
    alone = rng.uniform(rng.key(torch.tensor([7]), torch.tensor([1]), rng.PICK), 1000)
    assert torch.equal(u[1], alone[0])
    assert not torch.equal(u[0], u[1]) and not torch.equal(u[0], u[2])
    big = rng.uniform(keys[:1], 200_000)[0]
    assert 0 < float(big.min()) and float(big.max()) < 1
    assert abs(float(big.mean()) - 0.5) < 0.005 and abs(float(big.var()) - 1 / 12) < 0.002


def _rows(params: list[SamplingParams], seed0: int = 0) -> select.RowSampling:
    return select.RowSampling.of([(p, seed0 + i, 5, rng.PICK) for i, p in enumerate(params)],
                                 torch.device("cpu"))


def test_greedy_pick_equals_sampling_pick():
    torch.manual_seed(0)
    logits = torch.randn(9, 50)
    logits[2, MASK] = 100.0  # the mask id is never chosen
    params = [SamplingParams()] * 9
    want = sampling.pick(logits, params[0], MASK, None)
    assert torch.equal(select.pick(logits, _rows(params), MASK), want)
    assert int(want[2]) != MASK


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (5, 1.0), (0, 0.7), (7, 0.5), (100, 0.9)])
def test_target_log_probs_equal_per_row(top_k, top_p):
    torch.manual_seed(1)
    logits = torch.randn(6, 64) * 3
    params = [SamplingParams(temperature=t, top_k=top_k, top_p=top_p)
              for t in (0.5, 1.0, 1.7, 0.5, 2.0, 1.0)]
    params[3] = SamplingParams(temperature=0.8)  # a row without top-k/top-p among them
    got = select.target_log_probs(logits, _rows(params), MASK)
    for i, p in enumerate(params):
        want = sampling.target_log_probs(logits[i : i + 1], p, MASK)[0]
        assert torch.equal(got[i], want), i


def test_mixed_greedy_and_sampled_rows_keep_greedy_exact_and_rows_independent():
    torch.manual_seed(2)
    logits = torch.randn(5, 40)
    params = [SamplingParams(), SamplingParams(temperature=1.0, seed=1), SamplingParams(),
              SamplingParams(temperature=0.7, top_k=4), SamplingParams(temperature=1.0)]
    s = _rows(params)
    got = select.pick(logits, s, MASK)
    greedy = sampling.pick(logits, SamplingParams(), MASK, None)
    assert got[0] == greedy[0] and got[2] == greedy[2]
    for i in (1, 3, 4):  # a row's draw is the same alone as in the batch
        alone = select.pick(logits[i : i + 1], s.subset([i]), MASK)
        assert int(alone[0]) == int(got[i])


def test_sampled_picks_follow_the_target_distribution():
    torch.manual_seed(3)
    logits = torch.randn(1, 6) * 2
    p = SamplingParams(temperature=0.9, top_k=5)
    n = 40_000
    s = select.RowSampling.of([(p, 11, site, rng.PICK) for site in range(n)], torch.device("cpu"))
    tokens = select.pick(logits.expand(n, -1), s, MASK)
    freq = torch.bincount(tokens, minlength=6).double() / n
    want = sampling.target_log_probs(logits, p, MASK)[0].exp()
    assert freq[MASK] == 0
    assert torch.allclose(freq, want, atol=4 * (0.25 / n) ** 0.5)


def _reference_unmask(conf, masked, threshold, quota):
    """diffusion's per-row rule as tests/reference.py applies it: the quota (at least one)
    then, with a threshold, every slot reaching it (a threshold without steps has quota 1)."""
    conf = conf.masked_fill(~masked, float("-inf"))
    k = min(max(quota, 1), int(masked.sum()))
    if threshold is None:
        return sorted(torch.topk(conf, k).indices.tolist())
    order = torch.topk(conf, int(masked.sum())).indices.tolist()
    return sorted(order[:k] + [i for i in order[k:] if float(conf[i]) >= threshold])


def test_unmask_equals_the_per_row_rule_ties_included():
    gen = torch.Generator().manual_seed(4)
    for trial in range(200):
        rows, length = 7, int(torch.randint(2, 33, (), generator=gen))
        conf = torch.randint(0, 4, (rows, length), generator=gen).float() / 4  # many ties
        masked = torch.rand(rows, length, generator=gen) < 0.7
        masked[:, 0] = True
        thresholds = [None, 0.5, None, 0.75, 1.0, None, 0.0][:rows]
        quotas = [int(q) for q in torch.randint(0, 5, (rows,), generator=gen)]
        n_masked = masked.sum(-1).tolist()
        got = select.unmask(conf, masked, n_masked, thresholds, quotas)
        for r in range(rows):
            want = _reference_unmask(conf[r], masked[r], thresholds[r], quotas[r])
            assert got[r].nonzero().flatten().tolist() == want, (trial, r)


def test_draft_choice_is_stable_first_plus_threshold():
    conf = torch.tensor([[0.2, 0.9, 0.9, 0.1], [0.3, 0.3, 0.95, 0.99]])
    masked = torch.tensor([[False, True, True, True], [False, True, True, False]])
    got = select.draft_choice(conf, masked, torch.tensor([0.95, 0.9], dtype=torch.float64))
    assert got.tolist() == [[False, True, False, False], [False, False, True, False]]


def test_accepted_greedy_counts_leading_matches_within_the_real_drafts():
    target = torch.tensor([[5, 6, 7, 8], [5, 6, 7, 8], [5, 1, 7, 8], [5, 6, 7, 8]])
    drafts = torch.tensor([[5, 6, 7], [5, 9, 7], [5, 6, 7], [5, 6, 7]])
    n = torch.tensor([3, 3, 3, 2])
    assert select.accepted_greedy(target, drafts, n).tolist() == [3, 1, 1, 2]


def test_speculative_sampling_emits_the_target_distribution():
    """Drafts drawn from q, verified against p: the first emitted token follows p exactly
    (accepted draft or residual draw), and acceptance is min(1, p/q) on average."""
    torch.manual_seed(5)
    v, n = 5, 60_000
    p_logp = torch.log_softmax(torch.randn(2, v, dtype=torch.float64) * 1.5, -1)
    q_logp = torch.log_softmax(torch.randn(1, v, dtype=torch.float64) * 1.5, -1)
    seeds = torch.arange(n)
    drafts = (q_logp[0] + rng.gumbel(rng.key(seeds, torch.zeros_like(seeds), rng.PICK), v)).argmax(-1)
    c, token = select.speculative(p_logp.expand(n, -1, -1), q_logp.expand(n, -1, -1),
                                  drafts[:, None], torch.ones(n, dtype=torch.long), seeds,
                                  torch.full((n,), 100))
    first = torch.where(c == 1, drafts, token)
    freq = torch.bincount(first, minlength=v).double() / n
    assert torch.allclose(freq, p_logp[0].exp(), atol=4 * (0.25 / n) ** 0.5)
    accept = torch.minimum(p_logp[0].exp(), q_logp[0].exp()).sum()
    assert abs(float(c.double().mean()) - float(accept)) < 4 * (0.25 / n) ** 0.5
    # the bonus after an accepted draft follows the second target
    bonus = torch.bincount(token[c == 1], minlength=v).double() / int((c == 1).sum())
    assert torch.allclose(bonus, p_logp[1].exp(), atol=0.02)
