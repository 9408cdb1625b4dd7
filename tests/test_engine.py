"""The continuous-batching engine (engine.py): mixed modes in one batch, arrivals at any
step, the KV pool (exact, bounded, never leaking), cancellation, streaming, "auto", logprobs.

Every equality here is exact: at temperature 0 a request's tokens in any batch, arriving at
any step, equal its tokens alone (B09, B24); the pool's rows hold exactly a clean causal
forward of each request's committed text after every step (B08, B15).
"""

from __future__ import annotations

import asyncio
import random

import pytest
import torch

from conftest import assert_cache_equals_causal
from stubs import Drafter, HashLM, StubModel
from trimode import SamplingParams
from trimode.engine import AsyncEngine, AutoPolicy, Engine, EngineConfig
from trimode.engine.kv_pool import kv_bytes_per_token

MIXED = [  # (prompt, params): all four modes, different block lengths, prompts, max_tokens
    ([5, 6, 7], SamplingParams(mode="ar", max_tokens=9)),
    ([8, 9, 10, 11, 12, 13, 14], SamplingParams(mode="diffusion", block_length=4, threshold=0.5,
                                                 max_tokens=10)),
    ([15, 16], SamplingParams(mode="linear_spec", block_length=5, max_tokens=12)),
    ([17, 18, 19, 20, 21], SamplingParams(mode="quadratic_spec", block_length=3, max_tokens=7)),
    ([22], SamplingParams(mode="diffusion", block_length=7, threshold=None, max_tokens=7)),
    ([23, 24, 25, 26], SamplingParams(mode="linear_spec", block_length=2, max_tokens=5,
                                      threshold=0.9)),
]


@pytest.fixture(scope="module")
def model(tiny_llm):
    return tiny_llm.model


def alone(model, prompt, params):
    engine = Engine(model, EngineConfig(max_num_seqs=1))
    rid = engine.add_request(prompt, params)
    while engine.has_unfinished():
        engine.step()
    return engine.output(rid).generated, engine.output(rid).metrics.nfe


def run_engine(engine, arrivals, check=None):
    """``arrivals``: list of (step index, prompt, params). Returns {index: Sequence}."""
    ids, step = {}, 0
    pending = sorted(enumerate(arrivals), key=lambda x: x[1][0])
    while pending or engine.has_unfinished():
        while pending and pending[0][1][0] <= step:
            k, (_, prompt, params) = pending.pop(0)
            ids[k] = engine.add_request(prompt, params)
        engine.step()
        if check:
            check(engine)
        step += 1
        assert step < 10_000, "no progress"
    return {k: engine.output(r) for k, r in ids.items()}


def check_pool_exact(model):
    def check(engine):
        pool = engine.pool
        assert pool.live == len(engine.running)
        for row, seq in enumerate(engine.running):
            assert seq.row == row
            text = (seq.prompt_ids + seq.generated)[: int(pool.cache.lengths[row])]
            assert_cache_equals_causal(model, pool.cache, text, row)
        assert int(pool.cache.lengths[pool.live:].sum()) == 0
    return check


def test_mixed_modes_in_one_batch_equal_each_alone(model):
    expected = [alone(model, p, s) for p, s in MIXED]
    engine = Engine(model, EngineConfig(max_num_seqs=8))
    out = run_engine(engine, [(0, p, s) for p, s in MIXED], check_pool_exact(model))
    for k, (tokens, nfe) in enumerate(expected):
        assert out[k].generated == tokens, MIXED[k][1].mode
        assert out[k].metrics.nfe == nfe
    assert engine.pool.live == 0 and not engine.running


def test_arrivals_at_different_steps_equal_each_alone(model):
    expected = [alone(model, p, s)[0] for p, s in MIXED]
    engine = Engine(model, EngineConfig(max_num_seqs=3))  # fewer rows than requests: some wait
    arrivals = [(step, p, s) for step, (p, s) in zip([0, 3, 1, 7, 2, 12], MIXED)]
    out = run_engine(engine, arrivals, check_pool_exact(model))
    assert [out[k].generated for k in range(len(MIXED))] == expected
    assert engine.pool.live == 0 and engine.pool.used_positions() == 0


def test_the_decode_forward_packs_every_mode(model):
    """One packed forward per step: with all requests running, a step is one forward."""
    engine = Engine(model, EngineConfig(max_num_seqs=8))
    for p, s in MIXED:
        engine.add_request(p, s)
    engine.step()  # the prefill of all six (new requests decode from the next step)
    assert engine.forwards == 1 and len(engine.running) == 6
    engine.step()
    assert engine.forwards == 2


def test_cancel_frees_the_row_at_once_and_leaves_others_intact(model):
    expected = [alone(model, p, s)[0] for p, s in MIXED]
    engine = Engine(model, EngineConfig(max_num_seqs=8))
    ids = [engine.add_request(p, s) for p, s in MIXED]
    engine.step()
    engine.step()
    assert engine.abort(ids[2]) and engine.abort(ids[0])
    assert engine.pool.live == len(MIXED) - 2
    assert engine.output(ids[2]).finish_reason == "abort"
    assert not engine.abort(ids[2])  # already ended
    check = check_pool_exact(model)
    check(engine)
    while engine.has_unfinished():
        engine.step()
        check(engine)
    for k in (1, 3, 4, 5):
        assert engine.output(ids[k]).generated == expected[k]
    assert engine.pool.live == 0 and engine.pool.used_positions() == 0


def test_cancel_a_waiting_request(model):
    engine = Engine(model, EngineConfig(max_num_seqs=1))
    a = engine.add_request([5, 6], SamplingParams(max_tokens=3))
    b = engine.add_request([7, 8], SamplingParams(max_tokens=3))
    engine.step()
    assert engine.abort(b) and engine.output(b).generated == []
    while engine.has_unfinished():
        engine.step()
    assert engine.output(a).finish_reason == "length" and engine.pool.live == 0


def test_random_arrivals_never_exceed_the_pool_or_the_token_budget():
    """200 requests (seeded) of every mode arrive at random steps into a small pool and a
    small token budget: the pool and the budget are never exceeded, every request ends with
    exactly its solo output, and the pool ends empty."""
    rng = random.Random(0)
    model = StubModel(HashLM(eos_every=9, min_context=4), drafter=Drafter(right=2))
    widths = []
    inner = model.__call__

    class Counting:  # records the real query tokens of every forward
        def __getattr__(self, name):
            return getattr(model, name)

        def __call__(self, tokens, cache, n_valid, *args, **kwargs):
            widths.append(int(n_valid.sum()))
            assert int((cache.lengths + n_valid).max()) <= cache.capacity - 1
            return inner(tokens, cache, n_valid, *args, **kwargs)

    config = EngineConfig(max_num_seqs=5, max_model_len=64, scratch_tokens=40,
                          max_num_batched_tokens=40)
    engine = Engine(Counting(), config)
    modes = ["ar", "diffusion", "linear_spec", "quadratic_spec"]
    arrivals = []
    for k in range(200):
        mode = rng.choice(modes)
        params = SamplingParams(mode=mode, max_tokens=rng.randint(1, 12),
                                block_length=rng.randint(1, 6),
                                threshold=None if mode == "quadratic_spec" else rng.choice([None, 0.5]))
        prompt = [rng.randint(4, 30) for _ in range(rng.randint(1, 9))]
        arrivals.append((rng.randint(0, 300), prompt, params))

    def check(engine):
        assert engine.pool.live <= 5 and len(engine.running) == engine.pool.live
    out = run_engine(engine, arrivals, check)
    assert max(widths) <= 40
    assert engine.pool.live == 0 and engine.pool.used_positions() == 0
    solo = Engine(StubModel(HashLM(eos_every=9, min_context=4), drafter=Drafter(right=2)), config)
    for k in rng.sample(range(200), 25):
        _, prompt, params = arrivals[k]
        rid = solo.add_request(prompt, params)
        while solo.has_unfinished():
            solo.step()
        assert out[k].generated == solo.output(rid).generated


def test_a_request_that_can_never_fit_is_rejected_at_once(model):
    engine = Engine(model, EngineConfig(max_num_seqs=2, max_model_len=32, max_num_batched_tokens=16))
    with pytest.raises(ValueError, match="max_model_len 32"):
        engine.add_request(list(range(4, 30)), SamplingParams(max_tokens=10))
    with pytest.raises(ValueError, match="max_model_len 32"):  # the tighter limit is named
        engine.add_request([5], SamplingParams(max_tokens=10**6))
    with pytest.raises(ValueError, match="max_num_batched_tokens 16"):
        engine.add_request(list(range(4, 24)), SamplingParams(max_tokens=1))
    with pytest.raises(ValueError, match="after block rounding"):
        engine.add_request(list(range(4, 14)), SamplingParams(mode="diffusion", block_length=16,
                                                              max_tokens=17))
    with pytest.raises(ValueError, match="scratch_tokens"):
        engine.add_request([5], SamplingParams(mode="quadratic_spec", block_length=16,
                                               draft_segments=None, max_tokens=20))
    assert not engine.has_unfinished()  # nothing queued by a rejected request
    with pytest.raises(ValueError, match="holds 0 pages"):
        Engine(model, EngineConfig(kv_cache_memory=1000))


@pytest.mark.parametrize("field,value", [("max_num_seqs", 0), ("max_num_seqs", "2"),
                                         ("max_model_len", -1), ("kv_cache_memory", 0),
                                         ("max_num_batched_tokens", 1.5)])
def test_engine_config_errors_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        EngineConfig(**{field: value})


def test_kv_cache_memory_sizes_the_pages_not_the_rows(model):
    page = kv_bytes_per_token(model) * 4
    engine = Engine(model, EngineConfig(max_num_seqs=16, max_model_len=64, page_size=4,
                                        kv_cache_memory=10 * page + 1))
    assert engine.pool.rows == 16 and engine.kv_bytes == 10 * page
    assert engine.stats()["kv_pages_total"] == 9  # one is the null page
    with pytest.raises(ValueError, match="needs 11 KV pages of page_size 4"):
        engine.add_request([5] * 30, SamplingParams(max_tokens=10))  # 30 + 10 + 1 scratch


def test_auto_picks_the_configured_modes_by_load(model):
    """The load a request joins is running + waiting (itself included): a quiet engine gets
    the parallel mode, a burst beyond max_parallel_batch gets ar; each output equals its
    chosen mode alone."""
    policy = AutoPolicy(parallel_mode="diffusion", max_parallel_batch=2)
    engine = Engine(model, EngineConfig(max_num_seqs=8, auto=policy))
    auto = SamplingParams(mode="auto", max_tokens=6, block_length=3)
    first = engine.add_request([5, 6], auto)
    engine.step()  # load 1
    second = engine.add_request([6, 7], auto)
    engine.step()  # load 2
    burst = [engine.add_request([7 + k, 6], auto) for k in range(4)]
    engine.step()  # load 6
    ids = [first, second] + burst
    modes = [engine.output(r).params.mode for r in ids]
    assert modes == ["diffusion", "diffusion", "ar", "ar", "ar", "ar"]
    while engine.has_unfinished():
        engine.step()
    for r, mode in zip(ids, modes):
        seq = engine.output(r)
        assert seq.generated == alone(model, seq.prompt_ids,
                                      SamplingParams(mode=mode, max_tokens=6, block_length=3))[0]
    late = engine.add_request([9, 9], auto)  # the load has dropped again
    engine.step()
    assert engine.output(late).params.mode == "diffusion"
    never = Engine(model, EngineConfig(auto=AutoPolicy(max_parallel_batch=0)))
    r = never.add_request([5], auto)
    never.step()
    assert never.output(r).params.mode == "ar"
    with pytest.raises(ValueError, match="parallel_mode"):
        AutoPolicy(parallel_mode="ar")


def test_llm_generate_mixes_modes_and_auto(tiny_llm):
    params = [s for _, s in MIXED] + [SamplingParams(mode="auto", max_tokens=5)]
    prompts = [p for p, _ in MIXED] + [[5, 6]]
    outs = tiny_llm.generate(prompts, params)
    singles = [tiny_llm.generate(p, s)[0] for p, s in zip(prompts, params)]
    assert [o.token_ids for o in outs] == [o.token_ids for o in singles]
    assert outs[-1].mode in ("ar", "linear_spec") and outs[0].mode == "ar"
    assert tiny_llm.engine.pool.live == 0 and not tiny_llm.engine.requests


def test_stream_yields_committed_tokens_in_order(tiny_llm):
    params = SamplingParams(mode="diffusion", block_length=4, threshold=None, max_tokens=10)
    full = tiny_llm.generate([5, 6, 7], params)[0]
    chunks = list(tiny_llm.stream([5, 6, 7], params))
    assert [t for c in chunks for t in c.token_ids] == full.token_ids
    assert "".join(c.text for c in chunks) == full.text
    assert max(len(c.token_ids) for c in chunks) > 1  # several tokens in one step
    assert chunks[-1].finished and chunks[-1].finish_reason == full.finish_reason
    assert all(not c.finished for c in chunks[:-1])


def test_stream_stopped_early_cancels(tiny_llm):
    stream = tiny_llm.stream([5, 6], SamplingParams(max_tokens=50))
    next(stream)
    stream.close()
    assert tiny_llm.engine.pool.live == 0 and not tiny_llm.engine.requests


def test_async_engine_concurrent_requests_equal_alone_and_disconnect_frees(tiny_llm):
    expected = [tiny_llm.generate(p, s)[0].token_ids for p, s in MIXED]
    engine = AsyncEngine(tiny_llm)

    async def collect(prompt, params, rid):
        tokens = []
        async for update in engine.generate(prompt, params, rid):
            tokens += update.new_token_ids
            assert update.token_ids == tokens
        return tokens, update.finish_reason

    async def leave_early():
        async for update in engine.generate([5, 6], SamplingParams(max_tokens=200), "gone"):
            return update.new_token_ids  # the client goes away after the first chunk

    async def main():
        results = await asyncio.gather(*(collect(p, s, f"r{k}") for k, (p, s) in enumerate(MIXED)),
                                       leave_early())
        for _ in range(200):  # the abort lands before the next step
            if engine.stats()["kv_rows_used"] == 0 and not tiny_llm.engine.requests:
                break
            await asyncio.sleep(0.01)
        return results

    try:
        results = asyncio.run(main())
        assert [r[0] for r in results[:-1]] == expected
        assert engine.stats()["kv_rows_used"] == 0 and not tiny_llm.engine.requests
        with pytest.raises(RuntimeError, match="AsyncEngine"):
            tiny_llm.generate([5], SamplingParams(max_tokens=1))

        async def bad():
            async for _ in engine.generate([5], SamplingParams(max_tokens=5000)):
                pass
        with pytest.raises(ValueError, match="max_model_len"):
            asyncio.run(bad())

        async def duplicate():  # a second request with a live id is refused; the first goes on
            first = engine.generate([5, 6], SamplingParams(max_tokens=300), "dup")
            update = await first.__anext__()
            tokens = list(update.new_token_ids)
            with pytest.raises(ValueError, match="already in use"):
                async for _ in engine.generate([7], SamplingParams(max_tokens=2), "dup"):
                    pass
            async for update in first:
                tokens += update.new_token_ids
            return tokens, update.finish_reason
        tokens, reason = asyncio.run(asyncio.wait_for(duplicate(), timeout=300))
        assert tokens == tiny_llm_solo(tiny_llm, [5, 6], 300) and reason in ("stop", "length")
    finally:
        engine.shutdown()
    assert tiny_llm.generate([5], SamplingParams(max_tokens=1))[0].token_ids  # usable again


def tiny_llm_solo(llm, prompt, max_tokens):
    return alone(llm.model, prompt, SamplingParams(max_tokens=max_tokens))[0]


def test_logprobs_are_those_of_the_committing_forward(tiny_llm):
    prompt = [5, 6, 7]
    ar = tiny_llm.generate(prompt, SamplingParams(max_tokens=8, logprobs=3))[0]
    spec = tiny_llm.generate(prompt, SamplingParams(mode="linear_spec", block_length=4,
                                                    max_tokens=8, logprobs=3))[0]
    assert spec.token_ids == ar.token_ids
    assert [lp.token_id for lp in ar.logprobs] == ar.token_ids
    for a, s in zip(ar.logprobs, spec.logprobs):  # verify rows are AR's causal distributions
        assert abs(a.logprob - s.logprob) < 1e-4
        assert [t for t, _ in a.top] == [t for t, _ in s.top]
    # the chosen token is the most likely non-mask token at temperature 0
    for lp in ar.logprobs:
        assert len(lp.top) == 3 and lp.top[0][0] == lp.token_id and lp.logprob <= 0
        assert [v for _, v in lp.top] == sorted((v for _, v in lp.top), reverse=True)
    diff = tiny_llm.generate(prompt, SamplingParams(mode="diffusion", block_length=4,
                                                    max_tokens=8, logprobs=0))[0]
    assert [lp.token_id for lp in diff.logprobs] == diff.token_ids
    assert all(lp.top == () for lp in diff.logprobs)
    with pytest.raises(ValueError, match="logprobs"):
        SamplingParams(logprobs=21)


def test_a_failing_forward_ends_only_its_requests(tiny_llm):
    """NaN logits end the request with finish_reason 'error'; the engine keeps serving."""
    engine = Engine(tiny_llm.model, EngineConfig(max_num_seqs=4))
    calls = {"n": 0}
    real = engine.model

    class Poisoned:
        def __getattr__(self, name):
            return getattr(real, name)

        def __call__(self, *args, **kwargs):
            return real(*args, **kwargs)

        def logits(self, hidden):
            calls["n"] += 1
            out = real.logits(hidden).clone()
            if calls["n"] == 2:
                out[0] = float("nan")
            return out

    engine.model = Poisoned()
    a = engine.add_request([5, 6], SamplingParams(max_tokens=4))
    b = engine.add_request([7, 8], SamplingParams(max_tokens=4))
    while engine.has_unfinished():
        engine.step()
    assert engine.output(a).finish_reason == "error" and "NaN" in engine.output(a).error
    assert engine.output(b).finish_reason in ("stop", "length")
    assert engine.output(b).generated == alone(real, [7, 8], SamplingParams(max_tokens=4))[0]
    assert engine.pool.live == 0


def test_ragged_rows_equal_each_row_alone(model):
    """A packed forward whose rows have different lengths (projections skip the padding)
    gives every row the hidden states and KV it gets alone."""
    torch.manual_seed(0)
    prefixes = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]
    rows = [([20, 21, 22, 23, 24], True), ([25], False), ([26, 27, 28], True)]
    packed = model.new_cache(3, 32)
    width = max(len(p) for p in prefixes)
    tokens = torch.tensor([p + [0] * (width - len(p)) for p in prefixes])
    model(tokens, packed, torch.tensor([len(p) for p in prefixes]))
    width = max(len(r) for r, _ in rows)
    tokens = torch.tensor([r + [0] * (width - len(r)) for r, _ in rows])
    bidi = torch.tensor([b for _, b in rows])
    hidden = model(tokens, packed, torch.tensor([len(r) for r, _ in rows]), bidi, write=True)
    for i, (prefix, (row, b)) in enumerate(zip(prefixes, rows)):
        alone_cache = model.new_cache(1, 32)
        model(torch.tensor([prefix]), alone_cache)
        want = model(torch.tensor([row]), alone_cache, bidirectional=b)
        torch.testing.assert_close(hidden[i, : len(row)], want[0], atol=1e-5, rtol=0)
        n = len(prefix) + len(row)
        assert int(packed.lengths[i]) == n
        for layer in range(len(packed.keys)):
            torch.testing.assert_close(packed.keys[layer][i, :, :n], alone_cache.keys[layer][0, :, :n],
                                       atol=1e-5, rtol=0)


def test_prefix_sharing_copies_kv_and_keeps_outputs(model):
    """Requests sharing a long prompt prefix with a running one prefill only their suffix;
    outputs and the pool stay exactly as without sharing."""
    system = list(range(30, 70))  # a 40-token shared "system prompt"
    prompts = [system + [5, 6], system + [7], system + [8, 9, 10], system[:10] + [11]]
    params = [SamplingParams(mode=m, max_tokens=6, block_length=3)
              for m in ("ar", "linear_spec", "diffusion", "ar")]
    expected = [alone(model, p, s)[0] for p, s in zip(prompts, params)]
    engine = Engine(model, EngineConfig(max_num_seqs=4, page_size=4))  # whole pages shared
    out = run_engine(engine, [(0, prompts[0], params[0])] +
                     [(2, p, s) for p, s in zip(prompts[1:], params[1:])], check_pool_exact(model))
    assert [out[k].generated for k in range(4)] == expected
    assert engine.shared_prefix_tokens == 2 * 40  # the 10-token overlap is below the minimum
    off = Engine(model, EngineConfig(max_num_seqs=4, page_size=4, min_shared_prefix=0))
    run_engine(off, [(0, prompts[0], params[0]), (2, prompts[1], params[1])])
    assert off.shared_prefix_tokens == 0


def test_auto_policy_from_a_crossover_file(tmp_path):
    path = tmp_path / "crossover.json"
    path.write_text('{"modes": {"diffusion": {"max_parallel_batch": 4}, '
                    '"linear_spec": {"max_parallel_batch": 16}}}')
    assert AutoPolicy.from_crossover(path) == AutoPolicy("linear_spec", 16)
    path.write_text('{"modes": {"diffusion": {"max_parallel_batch": 0}, '
                    '"linear_spec": {"max_parallel_batch": 0}}}')
    assert AutoPolicy.from_crossover(path) == AutoPolicy("linear_spec", 0)
    path.write_text('{"modes": {"diffusion": {"max_parallel_batch": null}, '
                    '"linear_spec": {"max_parallel_batch": 2}}}')
    assert AutoPolicy.from_crossover(path) == AutoPolicy("linear_spec", 2)
    path.write_text('{"modes": {"linear_spec": {"max_parallel_batch": null}}}')
    with pytest.raises(ValueError, match="--batch-sizes starting at 1"):
        AutoPolicy.from_crossover(path)
    path.write_text('{"nothing": 1}')
    with pytest.raises(ValueError, match="crossover.json"):
        AutoPolicy.from_crossover(path)
