"""trimode bench: the speed-of-light oracle on hand-built cases with known answers, on stubs
and on a tiny model; the scorers on right and wrong answers; the CLI end to end."""

from __future__ import annotations

import pytest

from stubs import EOS, MASK, PERFECT, HashDenoiser, HashLM, StubModel, ar_greedy
from trimode import SamplingParams
from trimode.bench.oracle import BlockOracle
from trimode.bench.sol import predictor, sol_request

SEED, X = 10, 20
Y = (SEED, 11, 12, 13, 14)


def table_predict(table: dict, default=(X, 0.5)):
    """predict() from a table: unmasked-slot set -> {slot: (token, confidence)}; slots not
    listed predict X (conf 0.01); states not listed predict ``default`` everywhere."""

    def predict(blocks):
        out = []
        for block in blocks:
            state = frozenset(i for i, t in enumerate(block) if i and t != MASK)
            row = table.get(state)
            pairs = [row.get(i, (X, 0.01)) if row is not None else default
                     for i in range(len(block))]
            out.append(([p[0] for p in pairs], [p[1] for p in pairs]))
        return out

    return predict


def oracle_for(table, limit=5, stop=(), budget=5000, default=(X, 0.5)):
    start = (SEED,) + (MASK,) * 4
    return BlockOracle(table_predict(table, default), start, MASK, limit, set(stop), budget)


def y(i):
    return Y[i]


def test_trap_exact_beats_compaction_beats_serial():
    """Serial 1,3,4,2 (4 forwards). Committing {1,2} first is a trap for the serial run
    ({1,2,3} then predicts X at 4) but the exact search goes {1,2} -> {3,4}: 2 forwards;
    compaction must keep the serial run valid: {1}, {3}, {2,4}: 3 forwards."""
    f = frozenset
    table = {f(): {1: (y(1), .9), 2: (y(2), .8), 3: (X, .5), 4: (X, .1)},
             f({1}): {3: (y(3), .9), 2: (y(2), .5), 4: (X, .1)},
             f({1, 3}): {4: (y(4), .9), 2: (y(2), .8)},
             f({1, 3, 4}): {2: (y(2), .9)},
             f({1, 2}): {3: (y(3), .9), 4: (y(4), .5)},
             f({1, 2, 3}): {4: (X, .9)}}
    result = oracle_for(table).run()
    assert result.target == Y and result.end == 5
    assert (result.serial_forwards, result.compaction_forwards, result.exact_forwards) == (4, 3, 2)
    assert result.schedule == ((1,), (3,), (2, 4))


def test_state_independent_predictions_take_one_forward():
    table = {}
    pred = lambda blocks: [([Y[i] for i in range(5)], [.9 - .1 * i for i in range(5)])
                           for _ in blocks]
    oracle = BlockOracle(pred, (SEED,) + (MASK,) * 4, MASK, 5, set(), 100)
    result = oracle.run()
    assert (result.serial_forwards, result.compaction_forwards, result.exact_forwards) == (4, 1, 1)


def test_left_to_right_chain_has_no_parallelism():
    """Slot i is right only once slot i-1 is in: no two slots can ever be committed together."""
    def pred(blocks):
        out = []
        for b in blocks:
            row = [(Y[i], .9) if i == 0 or b[i - 1] != MASK else (X, .1) for i in range(5)]
            out.append(([p[0] for p in row], [p[1] for p in row]))
        return out

    result = BlockOracle(pred, (SEED,) + (MASK,) * 4, MASK, 5, set(), 100).run()
    assert result.target == Y
    assert (result.serial_forwards, result.compaction_forwards, result.exact_forwards) == (4, 4, 4)


def test_stop_token_ends_the_block_early():
    """Slot 2 is EOS: once slots 1 and 2 are in, the block's output is over (end 3)."""
    stop = (SEED, 11, EOS, 13, 14)
    pred = lambda blocks: [(list(stop), [.1, .5, .9, .8, .7]) for _ in blocks]
    result = BlockOracle(pred, (SEED,) + (MASK,) * 4, MASK, 5, {EOS}, 100).run()
    assert result.end == 3 and result.serial_forwards == 4  # EOS, 13, 14, then 11
    assert result.exact_forwards == 1 and result.compaction_forwards == 1


def test_budget_falls_back_to_serial_steps():
    f = frozenset
    table = {f(): {1: (y(1), .9), 2: (y(2), .8), 3: (X, .5), 4: (X, .1)},
             f({1}): {3: (y(3), .9), 2: (y(2), .5), 4: (X, .1)},
             f({1, 3}): {4: (y(4), .9), 2: (y(2), .8)},
             f({1, 3, 4}): {2: (y(2), .9)},
             f({1, 2}): {3: (y(3), .9), 4: (y(4), .5)},
             f({1, 2, 3}): {4: (X, .9)}}
    result = oracle_for(table, budget=1).run()
    assert result.budget_exhausted and result.compaction_forwards == 4
    assert result.exact_forwards == 2  # found among states the serial run had predicted
    fresh = oracle_for(table, budget=3)
    assert fresh.exact(Y, 5) is None  # level 2 adds {1}, {2}, {1,2}: 4 states > 3
    assert oracle_for(table, budget=4).exact(Y, 5) == 2


def test_bad_oracle_input_raises():
    with pytest.raises(ValueError, match="budget"):
        oracle_for({}, budget=0)
    with pytest.raises(ValueError, match="limit"):
        oracle_for({}, limit=6)


def test_sol_on_stub_with_perfect_drafter():
    """The perfect drafter proposes the AR rollout whatever the block holds: every block is
    one denoising forward for the oracle, L - 1 for the serial run; output = ar."""
    model = StubModel(HashLM(), drafter=PERFECT)
    prompt = [5, 6, 7]
    r = sol_request(model, prompt, block_length=4, max_tokens=16, stop_ids={EOS},
                    mask_token_id=MASK)
    assert r.token_ids == ar_greedy(HashLM(), prompt, 16)[0]
    assert (r.serial_nfe, r.compaction_nfe, r.exact_nfe) == (1 + 4 * 3 + 3, 1 + 4 + 3, 1 + 4 + 3)


def _replay_is_valid(model, prompt, r, block_length):
    """Re-run each block's compaction schedule: every committed slot's prediction on the state
    before it must equal the serial target (an independent check of the oracle's output)."""
    cache = model.new_cache(1, len(prompt) + 200)
    from trimode.bench.sol import _forward

    _forward(model, cache, [prompt], False)
    predict = predictor(model, cache, MASK)
    for block in r.blocks:
        state = [block.target[0]] + [MASK] * (block_length - 1)
        for slots in block.schedule:
            cand, _ = predict([tuple(state)])[0]
            assert all(cand[i] == block.target[i] for i in slots)
            for i in slots:
                state[i] = block.target[i]
        if block is not r.blocks[-1]:  # the commit forward that gave the next seed
            _forward(model, cache, [block.target], False)


def test_sol_on_hash_denoiser_is_bounded_and_valid():
    model = StubModel(HashLM(eos_every=50), drafter=HashDenoiser())
    prompt = [5, 9, 11]
    r = sol_request(model, prompt, block_length=5, max_tokens=20, stop_ids={EOS},
                    mask_token_id=MASK)
    assert r.exact_nfe <= r.compaction_nfe <= r.serial_nfe
    assert r.exact_nfe < r.serial_nfe  # this denoiser does allow some parallel commits
    _replay_is_valid(model, prompt, r, 5)


def test_sol_serial_equals_diffusion_mode_on_tiny_model(tiny_llm):
    """The oracle's serial target is trimode's diffusion mode with threshold=None."""
    for prompt, block_length, max_tokens in (([5, 9, 11], 4, 14), ([7] * 6, 8, 16)):
        out = tiny_llm.generate([prompt], SamplingParams(mode="diffusion", threshold=None,
                                block_length=block_length, max_tokens=max_tokens))[0]
        stop = set(tiny_llm.config.eos_token_ids)
        r = sol_request(tiny_llm.model, prompt, block_length, max_tokens, stop, MASK)
        assert r.token_ids == out.token_ids
        assert r.serial_nfe == out.metrics.nfe
        assert r.generated_tokens == out.metrics.generated_tokens
        assert r.exact_nfe <= r.compaction_nfe <= r.serial_nfe
        _replay_is_valid(tiny_llm.model, prompt, r, block_length)
