"""The per-step ``auto`` controller (engine/controller.py, AdaptivePolicy) and the step
metrics it feeds.

A stub model whose drafts are right or wrong on a schedule (``stubs.ScheduleDrafter``) makes
the running acceptance known: the controller must leave ar for a speculative mode while the
drafts are right and come back once they turn wrong, and every output must still be ar's
exactly (the toy language checks the cache too: a stale or over-cropped cache changes the
text). Counts of drafts proposed and accepted per slot follow from the schedule.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
from scipy.stats import chisquare

from stubs import MASK, PERFECT, ContextFreeStub, HashLM, ScheduleDrafter, StubModel, ar_greedy
from trimode import SamplingParams
from trimode.engine import AdaptivePolicy, Engine, EngineConfig, ForwardCost
from trimode.engine.auto import expected_tokens

# one forward of 1 query token costs 1; of 2..64 tokens, 1.5 (per row, rows add linearly)
STEEP = ForwardCost(tuple((r, t, r * (1.0 if t == 1 else 1.5)) for r in (1, 64)
                          for t in (1, 2, 64)))
FLAT = ForwardCost(tuple((r, t, r * (1.0 if t == 1 else 1.1)) for r in (1, 64)
                         for t in (1, 2, 64)))


def engine_with(model, rows=8, **policy):
    return Engine(model, EngineConfig(max_num_seqs=rows,
                                      auto=AdaptivePolicy(cost=STEEP, **policy)))


def run(engine, arrivals, check=None):
    """``arrivals``: (step, prompt, params); returns ({index: Sequence}, {index: modes per
    step}) where the modes are what each request ran in each decode step."""
    ids, modes, step = {}, {}, 0
    pending = sorted(enumerate(arrivals), key=lambda a: a[1][0])
    while pending or engine.has_unfinished():
        while pending and pending[0][1][0] <= step:
            k, (_, prompt, params) = pending.pop(0)
            ids[k] = engine.add_request(prompt, params, on_step=lambda s, k=k: modes.setdefault(
                k, []).append((len(s.generated), s.params.mode)))
        engine.step()
        if check:
            check(engine)
        step += 1
        assert step < 5000, "no progress"
    return {k: engine.output(r) for k, r in ids.items()}, modes


def test_expected_tokens_model():
    assert expected_tokens("ar", 8, 0.9, 1) == 1
    assert expected_tokens("linear_spec", 4, 0.0, 1) == 1  # (bonus + exact first draft) / 2
    assert expected_tokens("linear_spec", 4, 1.0, 1) == 2  # 4 tokens in 2 forwards
    assert expected_tokens("quadratic_spec", 4, 1.0, 1) == 4
    assert expected_tokens("quadratic_spec", 4, 0.0, 1) == 1
    assert expected_tokens("quadratic_spec", 4, 0.5, None) == pytest.approx(1.875)


def test_forward_cost_interpolates_and_loads(tmp_path):
    assert STEEP.seconds(1, 1) == 1 and STEEP.seconds(1, 8) == 1.5
    assert STEEP.seconds(32, 1) == pytest.approx(32.0)  # linear between measured rows
    assert STEEP.seconds(128, 2) == pytest.approx(2 * 64 * 1.5)  # proportional above
    assert ForwardCost.builtin().seconds(1, 64) == 2.0
    path = tmp_path / "forward_cost.json"
    path.write_text('{"forward_cost": [{"batch_size": 1, "tokens": 1, "seconds": 0.5}]}')
    assert ForwardCost.load(tmp_path).seconds(1, 1) == 0.5
    assert AdaptivePolicy.from_bench(tmp_path / "crossover.json").cost.points == ((1, 1, 0.5),)
    path.write_text("{}")
    with pytest.raises(ValueError, match="forward_cost.json"):
        ForwardCost.load(path)
    with pytest.raises(ValueError, match="block_lengths"):
        AdaptivePolicy(block_lengths=(1,))
    with pytest.raises(ValueError, match="modes"):
        AdaptivePolicy(modes=("diffusion",))


def test_switches_when_acceptance_crosses_break_even():
    """Drafts right for positions < 30, wrong after: the prior sends the request to a
    speculative mode, right drafts keep it there, and within a few cycles of the first
    wrong drafts it is back in ar (idle_decay 1: no drift back to the prior)."""
    lm = HashLM()
    model = StubModel(lm, drafter=ScheduleDrafter(lambda pos: pos < 30))
    prompt = [5, 6, 7, 8]
    params = SamplingParams(mode="auto", max_tokens=60, trace=True)
    out, modes = run(engine_with(model, idle_decay=1.0), [(0, prompt, params)])
    seq, steps = out[0], modes[0]
    assert seq.generated == ar_greedy(lm, prompt, 60)[0]
    early = {m for n, m in steps if 2 <= n < 20}
    late = [m for n, m in steps if n >= 50]
    assert early and "ar" not in early, steps
    assert late and set(late) == {"ar"}, steps
    switch_back = min(n for n, m in steps if m == "ar" and n > 10)
    assert switch_back <= 30 + 3 * 16, steps  # a few cycles after the drafts turn wrong
    assert seq.metrics.mode_switches >= 2
    tokens = seq.metrics.mode_tokens
    assert sum(tokens.values()) == 60 and tokens["ar"] > 0 and len(tokens) >= 2


def test_idle_estimate_drifts_back_and_probes_again():
    lm = HashLM()
    model = StubModel(lm, drafter=ScheduleDrafter(lambda pos: pos < 20 or pos >= 70))
    prompt = [9, 10]
    params = SamplingParams(mode="auto", max_tokens=110)
    out, modes = run(engine_with(model, idle_decay=0.8, share=False), [(0, prompt, params)])
    assert out[0].generated == ar_greedy(lm, prompt, 110)[0]
    runs = [m for i, (_, m) in enumerate(modes[0]) if i == 0 or modes[0][i - 1][1] != m]
    assert runs.count("ar") >= 2 and len(runs) >= 4, modes[0]  # spec, ar, spec again, ...


def mixed_arrivals():
    """Auto requests of different prompts, lengths and arrival steps next to fixed-mode
    ones, so the batch (and the best width) changes from step to step."""
    auto = lambda n, **kw: SamplingParams(mode="auto", max_tokens=n, **kw)  # noqa: E731
    return [(0, [5, 6, 7], auto(40)), (0, [8], auto(25)),
            (1, [9, 10, 11, 12, 13], SamplingParams(mode="linear_spec", block_length=6,
                                                     max_tokens=20)),
            (2, [14, 15], auto(33, block_length=5)),
            (3, [16, 17, 18], SamplingParams(mode="ar", max_tokens=15)),
            (3, [19, 20], SamplingParams(mode="quadratic_spec", block_length=3, max_tokens=18)),
            (6, [21, 22, 23, 24], auto(30)), (9, [25], auto(12)),
            (12, [26, 27], SamplingParams(mode="diffusion", block_length=4, max_tokens=8))]


def test_auto_equals_ar_in_a_batch_with_mixed_loads():
    lm = HashLM(eos_every=50, min_context=20)
    model = StubModel(lm, drafter=ScheduleDrafter(lambda pos: (pos // 9) % 3 != 2))
    engine = engine_with(model)

    def check(engine):
        for s in engine.running:  # every row's cache holds exactly its text (the pending
            # token's KV is written by the next forward; diffusion keeps blocks its own way)
            if s.params.mode != "diffusion":
                assert model.cached_tokens(engine.pool.cache, s.row) == \
                    s.prompt_ids + s.generated[:-1], s.request_id

    arrivals = mixed_arrivals()
    out, modes = run(engine, arrivals, check)
    used, switches = Counter(), 0
    for k, (_, prompt, params) in enumerate(arrivals):
        if params.mode == "diffusion":
            continue
        want, reason = ar_greedy(lm, prompt, params.max_tokens)
        assert out[k].generated == want and out[k].finish_reason == reason, k
        if params.mode == "auto":
            used.update(m for _, m in modes[k][1:])  # decode steps (the prefill runs as ar)
            switches += out[k].metrics.mode_switches
    # while fixed rows pad the forward anyway, auto rows use the width: both spec modes
    assert used["linear_spec"] > 0 and used["quadratic_spec"] > 0 and switches >= 6, used
    assert engine.pool.live == 0


def test_auto_is_deterministic():
    def once():
        lm = HashLM(eos_every=50, min_context=20)
        model = StubModel(lm, drafter=ScheduleDrafter(lambda pos: (pos // 9) % 3 != 2))
        out, modes = run(engine_with(model), mixed_arrivals())
        return ({k: (s.generated, s.metrics.mode_switches, s.metrics.mode_tokens)
                 for k, s in out.items()}, modes)

    assert once() == once()


def test_step_metrics_count_the_schedule():
    """Perfect drafts: every verify accepts every draft, so slot i's accepted equals its
    proposed, per request and engine-wide; a never-right drafter gives zero accepted beyond
    linear_spec's exact first slot."""
    lm = HashLM()
    records = []
    engine = Engine(StubModel(lm, drafter=PERFECT), EngineConfig(max_num_seqs=4))
    engine.step_observers.append(records.append)
    rid = engine.add_request([5, 6], SamplingParams(mode="linear_spec", block_length=4,
                                                    max_tokens=13))
    while engine.has_unfinished():
        engine.step()
    m = engine.output(rid).metrics
    # 1 token from the prefill, then 4 per cycle: 3 cycles of 3 drafts
    assert m.draft_proposed == [3, 3, 3] and m.draft_accepted == [3, 3, 3]
    assert m.acceptance_rate == {"linear_spec": 1.0} and m.mode_tokens == {"linear_spec": 13}
    assert sum(r.drafts.get("linear_spec", [[0, 0]])[0][0] for r in records) == 3
    assert [r.rows for r in records] == [1] * len(records) == [1] * engine.steps
    assert records[0].query_tokens == 2 and records[1].query_tokens == 5  # prefill, draft+copy
    assert engine.acceptance.rates() == {"linear_spec": 1.0}
    d = m.to_dict()
    assert d["draft_slots"] == {"proposed": [3, 3, 3], "accepted": [3, 3, 3]}

    wrong = Engine(StubModel(lm, drafter=ScheduleDrafter(lambda pos: False)),
                   EngineConfig(max_num_seqs=1))
    rid = wrong.add_request([5, 6], SamplingParams(mode="linear_spec", block_length=4,
                                                   max_tokens=7))
    while wrong.has_unfinished():
        wrong.step()
    m = wrong.output(rid).metrics  # 2 tokens per cycle: 3 cycles, the last of block 2
    assert m.draft_proposed == [3, 2, 2] and m.draft_accepted == [3, 0, 0]


P = [0.5, 0.3, 0.2, 0.0]  # target over ids 0..2 (3: EOS, never), context-free
Q = [0.2, 0.2, 0.6, 0.0]  # draft


def test_auto_samples_from_ar_distribution():
    """At temperature 1, auto switching among ar and the speculative modes still draws
    every position from the target (chi-square per position, and pairs across a verify)."""
    ninf = float("-inf")
    logits = lambda p, mask: __import__("torch").tensor(  # noqa: E731
        [math.log(x) if x > 0 else ninf for x in p] + [mask])
    model = ContextFreeStub(logits(P, ninf), logits(Q, ninf), mask=4, eos=3)
    model.max_forwards = 10_000
    n, length = 600, 6
    engine = Engine(model, EngineConfig(max_num_seqs=64, auto=AdaptivePolicy(
        cost=FLAT, block_lengths=(3,), prior=0.5, decay=0.5, idle_decay=0.5)))
    ids = [engine.add_request([0], SamplingParams(mode="auto", temperature=1.0, max_tokens=length,
                                                  seed=i)) for i in range(n)]
    while engine.has_unfinished():
        engine.step()
    tokens = np.array([engine.output(r).generated for r in ids])
    tokens_by_mode = Counter()
    for r in ids:
        tokens_by_mode.update(engine.output(r).metrics.mode_tokens)
    assert tokens_by_mode["ar"] > 0 and tokens_by_mode["ar"] < n * length, tokens_by_mode
    for k in range(length):
        counts = np.bincount(tokens[:, k], minlength=3)[:3]
        assert chisquare(counts, np.array(P[:3]) * n).pvalue > 0.001, (k, counts)
    pairs = np.bincount(tokens[:, 1] * 3 + tokens[:, 2], minlength=9)
    assert chisquare(pairs, np.outer(P[:3], P[:3]).ravel() * n).pvalue > 0.001


def test_prometheus_step_metrics_are_counted():
    """The server's Prometheus registry observes every engine step: a known schedule gives
    known counts (a linear_spec request of block 4 whose
    drafts right only before position 8)."""
    from prometheus_client.parser import text_string_to_metric_families

    from trimode.entrypoints.server.metrics import Metrics

    engine = Engine(StubModel(HashLM(), drafter=ScheduleDrafter(lambda pos: pos < 8)),
                    EngineConfig(max_num_seqs=4, auto=AdaptivePolicy(cost=STEEP, idle_decay=1.0)))
    metrics = Metrics(engine)
    engine.add_request([5, 6], SamplingParams(mode="linear_spec", block_length=4, max_tokens=13))
    auto = engine.add_request([7, 8], SamplingParams(mode="auto", max_tokens=40))
    while engine.has_unfinished():
        engine.step()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(metrics.render().decode())
               for s in f.samples}
    get = lambda name, **labels: samples.get((name, tuple(sorted(labels.items()))), 0)  # noqa: E731
    assert get("trimode_step_duration_seconds_count") == engine.steps
    m = engine.output(auto).metrics
    want = Counter()
    for seq in (engine.output("0"), engine.output(auto)):
        for mode, (p, a) in seq.metrics.mode_drafts.items():
            want[mode, "p"] += p
            want[mode, "a"] += a
    for mode in ("linear_spec", "quadratic_spec"):
        slots = [get("trimode_draft_slot_proposed_total", mode=mode, slot=str(i)) for i in range(1, 20)]
        accepted = [get("trimode_draft_slot_accepted_total", mode=mode, slot=str(i))
                    for i in range(1, 20)]
        assert sum(slots) == want[mode, "p"] and sum(accepted) == want[mode, "a"], mode
    # the fixed request (prompt at positions 0, 1): cycle 1 drafts positions 3..5, all right
    # (4 tokens); from then on only slot 1 (the exact seed copy) passes: 2 tokens a cycle,
    # and the last cycle (2 tokens left) drafts one slot
    first = engine.output("0").metrics
    assert first.draft_proposed == [5, 4, 4] and first.draft_accepted == [5, 1, 1]
    switches = sum(v for (name, _), v in samples.items()
                   if name == "trimode_auto_mode_switches_total")
    assert switches == m.mode_switches >= 2
    rates = {dict(k[1])["mode"]: v for k, v in samples.items()
             if k[0] == "trimode_draft_acceptance_rate"}
    assert rates and rates == pytest.approx(engine.acceptance.rates())
    rows = get("trimode_step_rows_sum")
    assert rows == sum(o.metrics.nfe for o in (engine.output("0"), engine.output(auto)))
