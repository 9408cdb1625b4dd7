"""KV pages: preemption under a small pool, pages returned on cancel and error, the prefix
cache across requests (same tokens as without it, eviction under pressure), and random
arrivals on a stub model that never overrun the pool and equal their solo runs."""

from __future__ import annotations

import random

import pytest

from stubs import Drafter, HashLM, StubModel
from trimode import SamplingParams
from trimode.engine import Engine, EngineConfig
from trimode.engine.kv_pool import kv_bytes_per_token

MODES = ["ar", "diffusion", "linear_spec", "quadratic_spec"]


def stub(eos_every: int | None = 9):
    return StubModel(HashLM(eos_every=eos_every, min_context=4), drafter=Drafter(right=2))


def engine_with_pages(model, pages: int, **kw) -> Engine:
    """An engine whose pool holds ``pages`` usable pages of 4 positions."""
    memory = kv_bytes_per_token(model) * 4 * (pages + 1)
    return Engine(model, EngineConfig(page_size=4, kv_cache_memory=memory, **kw))


def finish(engine: Engine, check=None) -> None:
    steps = 0
    while engine.has_unfinished():
        engine.step()
        if check:
            check(engine)
        steps += 1
        assert steps < 10_000, "no progress"


def solo(prompt, params, eos_every: int | None = 9) -> list[int]:
    engine = Engine(stub(eos_every), EngineConfig(max_num_seqs=1, page_size=4, min_shared_prefix=0))
    rid = engine.add_request(prompt, params)
    finish(engine)
    return engine.output(rid).generated


def check_pages(engine: Engine) -> None:
    """Reference counts equal the rows that hold each page; used + cached + free = total."""
    pool, alloc = engine.pool, engine.pool.allocator
    refs = [0] * alloc.pages
    for row in range(pool.live):
        for page in pool.row_pages[row]:
            refs[page] += 1
    assert refs[1:] == alloc.refs[1:]
    assert all(pool.row_pages[row] == [] for row in range(pool.live, pool.rows))
    assert alloc.used() + alloc.cached() + len(alloc.free) == alloc.usable
    assert sum(1 for r in refs[1:] if r) == alloc.used() <= alloc.usable


def params_for(mode: str, max_tokens: int = 12) -> SamplingParams:
    extra = {} if mode == "ar" else {"block_length": 3}
    return SamplingParams(mode=mode, max_tokens=max_tokens, **extra)


@pytest.mark.parametrize("mode", MODES)
def test_running_out_of_pages_preempts_and_keeps_the_solo_output(mode):
    prompts = [[5 + k, 6, 7, 8, 9, 10 + k] for k in range(4)]
    want = [solo(p, params_for(mode), None) for p in prompts]  # no EOS: 12 tokens each
    engine = engine_with_pages(stub(None), pages=14, max_num_seqs=4, min_shared_prefix=0)
    ids = [engine.add_request(p, params_for(mode)) for p in prompts]
    finish(engine, check_pages)
    assert [engine.output(i).generated for i in ids] == want
    stats = engine.stats()
    assert stats["preemptions"] > 0 and stats["recomputed_tokens"] > 0
    assert stats["kv_pages_used"] == 0 and engine.pool.live == 0


def test_a_request_larger_than_the_free_pages_waits():
    engine = engine_with_pages(stub(), pages=8, max_num_seqs=4, min_shared_prefix=0)
    first = engine.add_request(list(range(4, 22)), params_for("ar", 8))  # 18 + 8: 7 pages
    second = engine.add_request(list(range(5, 23)), params_for("ar", 8))
    engine.step()
    assert engine.stats()["running"] == 1 and engine.stats()["waiting"] == 1
    finish(engine, check_pages)
    assert engine.output(first).generated == solo(list(range(4, 22)), params_for("ar", 8))
    assert engine.output(second).generated == solo(list(range(5, 23)), params_for("ar", 8))


def test_cancel_and_errors_return_every_page():
    model = stub(None)
    engine = engine_with_pages(model, pages=60, max_num_seqs=4)
    ids = [engine.add_request([5 + k] * 9, params_for(m, 30)) for k, m in enumerate(MODES)]
    engine.step()
    engine.step()
    assert engine.stats()["kv_pages_used"] > 0
    for rid in ids:
        assert engine.abort(rid)
    assert engine.stats()["kv_pages_used"] == 0 and engine.pool.live == 0
    check_pages(engine)
    ids = [engine.add_request([6 + k] * 9, params_for(m, 30)) for k, m in enumerate(MODES)]
    engine.step()
    model.max_forwards = len(model.calls)  # the next forward raises
    engine.step()
    assert all(engine.output(i).finish_reason == "error" for i in ids)
    assert engine.stats()["kv_pages_used"] == 0 and engine.pool.live == 0
    check_pages(engine)


@pytest.mark.parametrize("mode", MODES)
def test_the_prefix_cache_gives_the_tokens_of_no_cache(mode):
    system = list(range(4, 24))  # 20 tokens: 5 pages
    prompts = [system + [30], system + [31, 32], system[:9] + [33], system + [30]]
    want = [solo(p, params_for(mode)) for p in prompts]
    engine = engine_with_pages(stub(), pages=200, max_num_seqs=2, min_shared_prefix=4)
    got = []
    for p in prompts:  # one after another: every prefix comes from finished requests
        rid = engine.add_request(p, params_for(mode))
        finish(engine, check_pages)
        got.append(engine.output(rid).generated)
    assert got == want
    stats = engine.stats()
    # 20 cached + 8 (two pages of system[:9]) + the whole first request's text again
    assert stats["prefix_cache_hits"] >= 20 + 20 + 8
    assert stats["kv_pages_cached"] > 0 and stats["kv_pages_used"] == 0
    assert 0 < stats["prefix_cache_hit_rate"] < 1


def test_the_prefix_cache_evicts_least_recently_used_pages_under_pressure():
    engine = engine_with_pages(stub(), pages=12, max_num_seqs=2, min_shared_prefix=4)
    prompts = [[4 + k] * 12 for k in range(6)]
    for p in prompts:
        rid = engine.add_request(p, params_for("ar", 6))
        finish(engine, check_pages)
        assert engine.output(rid).generated == solo(p, params_for("ar", 6))
    stats = engine.stats()
    assert stats["kv_page_evictions"] > 0 and stats["kv_pages_cached"] <= 12
    last = engine.add_request(prompts[-1], params_for("ar", 6))  # recent: still cached
    finish(engine)
    assert engine.stats()["prefix_cache_hits"] == 8
    first = engine.add_request(prompts[0], params_for("ar", 6))  # oldest: evicted
    finish(engine)
    assert engine.stats()["prefix_cache_hits"] == 8
    assert engine.output(first).generated == solo(prompts[0], params_for("ar", 6))
    assert engine.output(last).generated == solo(prompts[-1], params_for("ar", 6))


def test_two_hundred_random_arrivals_never_overrun_the_pool_and_equal_solo_runs():
    rng = random.Random(17)
    system = [rng.randint(4, 30) for _ in range(10)]
    arrivals = []
    for _ in range(200):
        mode = rng.choice(MODES)
        params = SamplingParams(mode=mode, max_tokens=rng.randint(1, 10),
                                block_length=rng.randint(1, 5),
                                threshold=None if mode == "quadratic_spec" else rng.choice([None, 0.5]))
        prompt = [rng.randint(4, 30) for _ in range(rng.randint(1, 9))]
        if rng.random() < 0.4:
            prompt = system[: rng.randint(4, 10)] + prompt
        arrivals.append((rng.randint(0, 80), prompt, params))
    engine = engine_with_pages(stub(), pages=24, max_num_seqs=6, max_model_len=64,
                               scratch_tokens=40, min_shared_prefix=4)
    ids, step, pending = {}, 0, sorted(enumerate(arrivals), key=lambda x: x[1][0])
    while pending or engine.has_unfinished():
        while pending and pending[0][1][0] <= step:
            k, (_, prompt, params) = pending.pop(0)
            ids[k] = engine.add_request(prompt, params)
        engine.step()
        check_pages(engine)
        step += 1
        assert step < 20_000, "no progress"
    stats = engine.stats()
    assert stats["kv_pages_used"] == 0 and stats["preemptions"] > 0
    assert stats["prefix_cache_hits"] > 0 and stats["kv_page_evictions"] > 0
    for k, (_, prompt, params) in enumerate(arrivals):
        assert engine.output(ids[k]).generated == solo(prompt, params), k


def test_auto_requests_switching_modes_under_a_small_pool_equal_ar():
    """The adaptive auto controller may switch a request to a mode with more scratch between
    cycles: the engine reserves that mode's pages (preempting if it must) before the forward."""
    prompts = [[5 + k, 6, 7, 8, 9, 10 + k] for k in range(4)]
    want = [solo(p, params_for("ar"), None) for p in prompts]
    engine = engine_with_pages(stub(None), pages=16, max_num_seqs=4, min_shared_prefix=0)
    ids = [engine.add_request(p, SamplingParams(mode="auto", max_tokens=12)) for p in prompts]
    finish(engine, check_pages)
    assert [engine.output(i).generated for i in ids] == want
    assert engine.stats()["kv_pages_used"] == 0


def test_paged_cache_stores_and_gathers_keys_and_values_like_the_dense_cache():
    """Keys and values share one buffer per layer (``kv``): a store through ``store_kv`` or
    ``store`` and a gather through ``window`` (with or without the per-forward page index)
    give the dense cache's keys and values, on pages out of order; ``keys``/``values`` are
    views of that buffer (``read_row`` sees the same slots)."""
    import torch

    from trimode.model.kv_cache import KVCache
    from trimode.model.paged_cache import PagedKVCache

    torch.manual_seed(0)
    layers, rows, heads, dim, page, max_pages = 2, 2, 3, 4, 4, 3
    paged = PagedKVCache(layers, 8, page, heads, dim, rows, max_pages, torch.float32)
    dense = KVCache(layers, rows, heads, dim, page * max_pages, torch.float32, "cpu")
    paged.set_pages(0, 0, [5, 2, 7])
    paged.set_pages(1, 0, [3, 6, 1])
    t = 6
    slots = torch.arange(t)[None, :].expand(rows, -1)
    real = torch.ones(rows, t, dtype=torch.bool)
    rows_index = torch.arange(rows)[:, None].expand(-1, t)
    for layer in range(layers):
        k, v = torch.randn(rows, heads, t, dim), torch.randn(rows, heads, t, dim)
        dense.store(layer, dense.write_index(rows_index, slots, real), k, v)
        index = paged.write_index(rows_index, slots, real)
        if layer == 0:
            paged.store_kv(layer, index, torch.cat([k, v], 1).transpose(1, 2))
        else:
            paged.store(layer, index, k, v)
        for given in (None, paged.window_index(t)):
            keys, values = paged.window(layer, t, given)
            want_k, want_v = dense.window(layer, t)
            assert torch.equal(keys, want_k) and torch.equal(values, want_v)
        got_k, got_v = paged.read_row(layer, 1, t)
        assert torch.equal(got_k, k[1]) and torch.equal(got_v, v[1])
        assert paged.keys[layer].data_ptr() == paged.kv[layer].data_ptr()
