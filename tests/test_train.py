"""trimode train: the dual-stream mask against spec 2.3 (a), noising, loss decrease, adapter
round trip, bit-identical resume, and clear errors on bad input (tiny random models)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import make_oracle, write_checkpoint
from trimode import LLM, SamplingParams
from trimode.training.masks import chain_valid, dual_stream_mask, noise
from trimode.training.trainer import TrainConfig, Trainer, train


def allowed_by_spec(q: int, k: int, n: int, block: int) -> bool:
    """Spec 2.3 (a), written out literally, one element at a time."""
    def blk(i):
        return (i % n) // block

    def clean(i):
        return i >= n

    return ((not clean(q) and not clean(k) and blk(q) == blk(k))
            or (not clean(q) and clean(k) and blk(q) > blk(k))
            or (clean(q) and clean(k) and q >= k))


@pytest.mark.parametrize("n,block", [(7, 1), (7, 2), (7, 3), (8, 4), (6, 6)])
def test_dual_stream_mask_matches_elementwise_spec(n, block):
    mask = dual_stream_mask(n, block)
    expected = torch.tensor([[allowed_by_spec(q, k, n, block) for k in range(2 * n)]
                             for q in range(2 * n)])
    assert torch.equal(mask, expected)


def test_noise_never_masks_the_prompt_and_follows_t():
    rows, length = 64, 4000
    tokens = torch.randint(4, 90, (rows, length))
    loss = torch.ones(rows, length, dtype=torch.bool)
    loss[:, :500] = False  # the prompt
    noisy, masked, p = noise(tokens, loss, 3, torch.Generator().manual_seed(0))
    assert not masked[:, :500].any() and torch.equal(noisy[:, :500], tokens[:, :500])
    assert torch.equal(noisy == 3, masked) and torch.equal(noisy[~masked], tokens[~masked])
    assert bool(((p >= 1e-3) & (p <= 1)).all())
    rate = masked[:, 500:].float().mean(1)
    assert (rate - p).abs().max() < 0.04  # per row, the masked fraction is p(t)
    assert p.min() < 0.2 and p.max() > 0.8  # t spans (0, 1)


def test_draft_layout_masks_all_but_block_seeds():
    tokens = torch.arange(4, 20)[None].repeat(4, 1)
    loss = torch.ones_like(tokens, dtype=torch.bool)
    loss[:, :2] = False
    _, masked, p = noise(tokens, loss, 3, torch.Generator().manual_seed(1),
                         draft_layout_rate=1.0, block_length=4)
    seeds = (torch.arange(16) % 4) == 0
    assert torch.equal(masked, (loss & ~seeds[None]))
    assert bool((p == 1).all())


def test_chain_valid_stops_at_the_first_masked_miss_within_a_block():
    tokens = torch.tensor([[10, 11, 12, 13, 14, 15]])
    teacher = torch.tensor([[10, 11, 99, 13, 14, 15]])  # position 2 is not the argmax
    masked = torch.tensor([[False, True, True, True, True, True]])
    valid = chain_valid(tokens, teacher, masked, block_length=3)
    # blocks [0,1,2] and [3,4,5]: in block 0 the miss at 2 only affects later positions
    assert valid.tolist() == [[True, True, True, True, True, True]]
    valid = chain_valid(tokens, teacher, masked, block_length=6)
    assert valid.tolist() == [[True, True, True, False, False, False]]


# -- end to end on a tiny random model ------------------------------------------------------

@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A small random checkpoint with gentle weights (trainable) and a tiny corpus."""
    oracle = make_oracle(seed=3)
    with torch.no_grad():
        for p in oracle.parameters():
            if p.dim() == 2:
                p.mul_(0.3)
    root = tmp_path_factory.mktemp("train")
    ckpt = write_checkpoint(root / "ckpt", oracle)
    words = [f"w{i}" for i in range(4, 20)]
    lines = [" ".join(words[(k + j) % 16] for j in range(12)) for k in range(16)]
    (root / "corpus.txt").write_text("\n".join(lines * 4))
    chats = [{"messages": [{"role": "user", "content": f"w{4 + k} w{5 + k}"},
                           {"role": "assistant", "content": " ".join(words[k:k + 8])}]}
             for k in range(8)]
    (root / "chat.jsonl").write_text("\n".join(json.dumps(c) for c in chats))
    return ckpt, root


def config(small, tmp_path, **kw) -> TrainConfig:
    ckpt, root = small
    base = dict(data=(str(root / "corpus.txt"),), out=str(tmp_path / "run"), model=str(ckpt),
                block_length=4, seq_length=32, batch_size=2, steps=10, lr=3e-3, warmup_steps=5,
                seed=0, eval_fraction=0.0, progress=False, method="full")
    base.update(kw)
    return TrainConfig(**base)


def test_full_training_reduces_both_loss_components(small, tmp_path):
    torch.manual_seed(0)
    _, log = train(config(small, tmp_path, steps=200, lr=1e-2, alpha=1.0), resume=False)
    steps = [r for r in log if "ar_loss" in r]
    first = sum(r["ar_loss"] for r in steps[:10]) / 10, sum(r["diff_loss"] for r in steps[:10]) / 10
    last = sum(r["ar_loss"] for r in steps[-20:]) / 20, sum(r["diff_loss"] for r in steps[-20:]) / 20
    assert first[0] > 3.0 and first[1] > 3.0  # near log(96) = 4.56 at the start
    assert last[0] < 0.5, last  # the corpus is a deterministic cycle: AR must learn it
    assert last[1] < 2.0, last  # diffusion must beat the uniform 4.56 by far


def test_draft_lora_learns_diffusion_and_round_trips(small, tmp_path):
    ckpt, root = small
    cfg = config(small, tmp_path, method="draft_lora", lora_rank=8, steps=200, lr=1e-2,
                 data=(str(root / "corpus.txt"), str(root / "chat.jsonl")))
    trainer, log = train(cfg, resume=False)
    steps = [r for r in log if "diff_loss" in r]
    assert sum(r["diff_loss"] for r in steps[:10]) / 10 > 3.5  # near log(96) = 4.56
    assert sum(r["diff_loss"] for r in steps[-20:]) / 20 < 2.5
    base = LLM(str(ckpt), draft_adapter="none").model.state_dict()
    trained = trainer.model.state_dict()
    for name, tensor in base.items():  # the base stays frozen
        assert torch.equal(trained[name], tensor), name
    adapter = tmp_path / "run" / "adapter"
    assert json.loads((adapter / "trimode_adapter.json").read_text())["passes"] == ["draft", "denoise"]
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 8
    loaded = LLM(str(ckpt), draft_adapter=str(adapter))
    assert loaded.draft_adapter.denoise and len(loaded.draft_adapter.modules) == 14  # 7 per layer
    plain = LLM(str(ckpt), draft_adapter="none")
    prompt = [[4, 5, 6, 7, 8]]
    for mode in ("diffusion", "linear_spec"):
        params = SamplingParams(mode=mode, max_tokens=12, block_length=4)
        from trimode.engine.decode import decode
        from trimode.decoding.sequence import Sequence

        seq = Sequence(prompt[0], params, {2}, 3, 4, denoise_adapter=True)
        decode(trainer.model, [seq])  # the in-memory trained model
        out = loaded.generate(prompt, params)[0]
        assert out.token_ids == seq.generated
    ar = SamplingParams(mode="ar", max_tokens=12)
    spec = SamplingParams(mode="linear_spec", max_tokens=12, block_length=4)
    assert loaded.generate(prompt, ar)[0].token_ids == plain.generate(prompt, ar)[0].token_ids
    assert loaded.generate(prompt, spec)[0].token_ids == plain.generate(prompt, ar)[0].token_ids


def test_resumed_run_is_bit_identical(small, tmp_path):
    straight = Trainer(config(small, tmp_path / "a", steps=6, grad_accum=2))
    for _ in range(6):
        straight.train_step()
    first = Trainer(config(small, tmp_path / "b", steps=6, grad_accum=2))
    for _ in range(3):
        first.train_step()
    first.save_checkpoint()
    resumed = Trainer(config(small, tmp_path / "b", steps=6, grad_accum=2))
    assert resumed.resume() and resumed.step == 3
    for _ in range(3):
        resumed.train_step()
    for a, b in zip(straight.params, resumed.params):
        assert torch.equal(a, b)
    assert not all(torch.equal(a, b) for a, b in zip(straight.params, first.params))


def lora_model(small):
    """The small checkpoint with an r=4 LoRA whose B matrices are random (so it acts)."""
    from trimode.training.lora import attach_lora

    model = LLM(str(small[0]), draft_adapter="none").model
    attach_lora(model, 4, 8.0, seed=0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.1)
    return model


def test_compact_draft_pass_gives_the_same_loss(small):
    """Skipping blocks without masks in the draft-adapter grad pass changes nothing."""
    from trimode.training.objective import joint_loss

    model = lora_model(small)
    tokens = torch.randint(4, 90, (2, 24))
    loss = torch.ones_like(tokens, dtype=torch.bool)
    loss[:, :9] = False
    kw = dict(block_length=4, alpha=0.3, eps=1e-3, draft_adapter=True, targets="teacher")
    for seed in range(4):
        full = joint_loss(model, tokens, loss | True, loss, torch.Generator().manual_seed(seed),
                          compact=False, **kw)
        compact = joint_loss(model, tokens, loss | True, loss,
                             torch.Generator().manual_seed(seed), **kw)
        assert compact.diff_count == full.diff_count
        torch.testing.assert_close(compact.total, full.total, rtol=1e-5, atol=1e-5)


def test_draft_step_without_any_target_is_skipped_not_fatal(small, tmp_path):
    """A row whose noising masks nothing scores no target; the step must not crash."""
    trainer = Trainer(config(small, tmp_path, method="draft_lora", lora_rank=2))
    trainer.rows.loss[:] = False
    before = [p.clone() for p in trainer.params]
    record = trainer.train_step()
    assert record["diff_targets"] == 0 and trainer.step == 1
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.params))


@pytest.mark.parametrize("field,value,match", [
    ("block_length", 64, r"block_length must be in \[1, seq_length=32\]"),
    ("alpha", -0.1, "alpha must be >= 0"),
    ("method", "qlora", "method must be one of"),
])
def test_bad_config_is_a_clear_error(small, tmp_path, field, value, match):
    with pytest.raises(ValueError, match=match):
        config(small, tmp_path, **{field: value})


def test_bad_data_is_a_clear_error(small, tmp_path):
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(ValueError, match="empty dataset"):
        Trainer(config(small, tmp_path, data=(str(tmp_path / "empty.txt"),)))
    with pytest.raises(ValueError, match="missing.txt does not exist"):
        Trainer(config(small, tmp_path, data=(str(tmp_path / "missing.txt"),)))
    (tmp_path / "noasst.jsonl").write_text(json.dumps(
        {"messages": [{"role": "user", "content": "w4 w5"}]}) + "\n")
    with pytest.raises(ValueError, match=r"noasst.jsonl:1: conversation has no assistant turn"):
        Trainer(config(small, tmp_path, data=(str(tmp_path / "noasst.jsonl"),)))


def test_cli_train_errors_are_one_line(small, tmp_path, capsys):
    from trimode.entrypoints.cli.main import main

    ckpt, root = small
    for argv, match in [
        (["train", str(tmp_path / "nope.txt"), "--out", str(tmp_path)], "nope.txt does not exist"),
        (["train", str(root / "corpus.txt"), "--out", str(tmp_path), "--alpha", "-1"],
         "--alpha must be >= 0"),
        (["train", str(root / "corpus.txt"), "--out", str(tmp_path), "--seq-length", "16",
          "--block-length", "32"], "--block-length must be in [1, seq_length=16]"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2 and err.startswith("error: ") and match in err
        assert "\n" not in err


def test_cli_train_runs_and_resumes(small, tmp_path, capsys):
    from trimode.entrypoints.cli.main import main

    ckpt, root = small
    argv = ["train", str(root / "chat.jsonl"), "--out", str(tmp_path / "cli"), "--model",
            str(ckpt), "--steps", "3", "--seq-length", "32", "--block-length", "4",
            "--lora-rank", "2", "--eval-fraction", "0.25", "--eval-max-tokens", "4",
            "--no-progress"]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0, capsys.readouterr().err
    assert "trained 3 steps" in capsys.readouterr().out
    assert (tmp_path / "cli" / "adapter" / "adapter_model.safetensors").exists()
    with pytest.raises(SystemExit):
        main(argv[:7] + ["5"] + argv[8:])  # --steps 5 continues from step 3
    records = [json.loads(x) for x in (tmp_path / "cli" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "ar_loss" in r] == [1, 2, 3, 4, 5]
    final = records[-1]
    assert final["final"] and {"eval_ar_loss", "eval_diff_loss", "diffusion_tokens_per_forward",
                               "linear_spec_acceptance_length"} <= set(final)


def test_chat_loss_is_on_assistant_turns_only(small):
    from trimode.training.data import chat_example

    llm = LLM(str(small[0]), draft_adapter="none")
    ex = chat_example([{"role": "user", "content": "w4 w5"}, {"role": "assistant",
                                                             "content": "w6 w7"}], llm.tokenizer)
    targets = [t for t, m in zip(ex.ids, ex.loss) if m]
    assert targets[:2] == [6, 7] and not any(ex.loss[: len(ex.prompt)])


def test_shipped_adapter_is_lossless_and_accepts_drafts(embedded_llm):
    """The embedded model's default tri-mode adapter: linear_spec equals ar exactly and
    accepts well more than two tokens per verify (the untrained base: 1.04)."""
    from trimode.checkpoint.embedded import shipped_adapter

    assert shipped_adapter() is not None, "src/trimode/weights/smollm2-tri is missing"
    assert embedded_llm.draft_adapter is not None and embedded_llm.draft_adapter.denoise
    prompts = [[{"role": "user", "content": "Give three tips for staying healthy."}],
               [{"role": "user", "content": "What is 12 plus 7?"}]]
    ar = embedded_llm.chat(prompts, SamplingParams(mode="ar", max_tokens=32))
    spec = embedded_llm.chat(prompts, SamplingParams(mode="linear_spec", max_tokens=32,
                                                     block_length=8))
    assert [s.token_ids for s in spec] == [a.token_ids for a in ar]
    # measured 2.58 and 2.38 with the adapter shipped on 2026-11-29 (the previous one: ~2.1)
    assert sum(s.metrics.acceptance_length for s in spec) / 2 > 2.2


# -- sampled decode-time blocks (--draft-blocks) ----------------------------------------------
def test_sample_blocks_start_at_targets_and_follow_their_layout():
    from trimode.training.masks import sample_blocks

    rows, length, block = 3, 40, 4
    valid = torch.ones(rows, length, dtype=torch.bool)
    valid[2, 30:] = False  # right padding
    loss = torch.zeros(rows, length, dtype=torch.bool)
    loss[:, 10:] = True  # prompt 0..9
    loss[1] = False  # a row without any target
    for rates, expect in [((1, 0, 0), "draft"), ((0, 0, 1), "masked"), ((0, 1, 0), "denoise")]:
        starts, masked, present = sample_blocks(valid, loss, block, 500, rates,
                                                torch.Generator().manual_seed(0))
        assert present[0].all() and not present[1].any() and present[2].all()
        assert starts.max() <= length - block
        ok = (valid & loss)[[0, 2]].gather(1, starts[[0, 2]] + 1)  # next token is a target
        assert bool(ok.all())
        assert starts[0].min() == 9 and starts[0].max() == length - block  # whole range used
        if expect == "draft":
            assert bool((masked == (torch.arange(block) >= 1)).all())
        elif expect == "masked":
            assert bool(masked.all())
        else:
            assert not masked[..., 0].any() and bool(masked.any(-1).all())
            rate = masked[..., 1:].float().mean()
            assert 0.4 < rate < 0.6  # t ~ U(0, 1): half the later slots on average


def test_block_loss_equals_the_decoders_own_draft_passes(small):
    """Each sampled block's loss equals that of a real draft pass: a causal prefill of the
    tokens before the block, then one bidirectional adapter-on pass over the block."""
    from trimode.training.masks import sample_blocks
    from trimode.training.objective import block_loss

    model = lora_model(small)
    gen = torch.Generator().manual_seed(5)
    tokens = torch.randint(4, 90, (2, 24), generator=gen)
    valid = torch.ones_like(tokens, dtype=torch.bool)
    valid[1, 20:] = False
    loss = valid.clone()
    loss[:, :6] = False
    mask_id = model.config.mask_token_id
    with torch.no_grad():
        parts = block_loss(model, tokens, valid, loss, torch.Generator().manual_seed(9),
                           block_length=4, blocks=6, layout_rates=(0.4, 0.3, 0.3), eps=1e-3,
                           kl_weight=0.0)
        starts, masked, _ = sample_blocks(valid, loss, 4, 6, (0.4, 0.3, 0.3),
                                          torch.Generator().manual_seed(9))
        ce_sum, count = 0.0, 0
        for r in range(2):
            n = int(valid[r].sum())
            full = model.new_cache(1, 64)
            logits = model.diffusion_head(model.run(tokens[r:r + 1, :n], full)).float()
            logits[..., mask_id] = float("-inf")
            teacher = logits.argmax(-1)[0]  # teacher[j] predicts token j + 1
            for k in range(6):
                s, m = int(starts[r, k]), masked[r, k]
                block = tokens[r, s:s + 4].clone()
                block[m] = mask_id
                cache = model.new_cache(1, 64)
                if s:
                    model.run(tokens[r:r + 1, :s], cache)
                h = model.run(block[None], cache, bidirectional=True, write=False, adapter=True)
                out = model.diffusion_head(h).float()[0]
                out[:, mask_id] = float("-inf")
                chain = True
                for i in range(4):
                    j = s + i
                    if m[i] and chain and j >= 1 and bool(valid[r, j] and loss[r, j]):
                        ce_sum += float(torch.nn.functional.cross_entropy(
                            out[i:i + 1], teacher[j - 1:j]))
                        count += 1
                    if m[i] and j >= 1 and int(tokens[r, j]) != int(teacher[j - 1]):
                        chain = False
    assert parts.diff_count == count and count > 10
    assert abs(parts.diff_sum - ce_sum) < 1e-3 * count, (parts.diff_sum, ce_sum)
    assert abs(float(parts.total) - ce_sum / count) < 1e-4


def test_draft_blocks_training_learns_to_draft(small, tmp_path):
    """A few hundred steps of sampled-block training on a deterministic cycle bring the
    draft CE (against the base's own argmax) far below where it starts."""
    ckpt, root = small
    cfg = config(small, tmp_path, method="draft_lora", lora_rank=8, steps=250, lr=1e-2,
                 draft_blocks=8, targets="teacher", draft_layout_rate=0.5,
                 denoise_layout_rate=0.3, masked_layout_rate=0.2,
                 data=(str(root / "corpus.txt"),))
    trainer, log = train(cfg, resume=False)
    steps = [r for r in log if "diff_loss" in r]
    first = sum(r["diff_loss"] for r in steps[:10]) / 10
    last = sum(r["diff_loss"] for r in steps[-20:]) / 20
    assert first > 2.5 and last < 1.2, (first, last)  # 2.74 -> 0.97 measured
    assert all(r["diff_targets"] > 0 for r in steps)


@pytest.mark.parametrize("kw,match", [
    (dict(draft_blocks=-1), "draft_blocks must be an integer >= 0"),
    (dict(draft_blocks=4, method="full"), "draft_blocks must be 0 with --method full"),
    (dict(draft_blocks=4, method="draft_lora", kl_weight=2.0), r"kl_weight must be in \[0, 1\]"),
    (dict(draft_blocks=4, method="draft_lora", draft_layout_rate=0, denoise_layout_rate=0,
          masked_layout_rate=0), "draft_layout_rate must be > 0"),
    (dict(draft_blocks=4, method="draft_lora", certainty_weight=-0.5),
     r"certainty_weight must be in \[0, 10\]"),
    (dict(method="draft_lora", certainty_weight=0.5), "0 unless draft_blocks > 0"),
    (dict(method="full", init_adapter="x"), "init_adapter must be unset with method full"),
])
def test_bad_block_config_is_a_clear_error(small, tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        config(small, tmp_path, **kw)


def test_certainty_forcing_adds_the_entropy_of_right_slots(small):
    """certainty_weight w adds w x (sum of the adapter's entropy over scored slots whose
    argmax equals the base's) / (scored slots) to the loss, and nothing else changes."""
    from trimode.training.objective import _head, block_loss

    model = lora_model(small)
    gen = torch.Generator().manual_seed(5)
    tokens = torch.randint(4, 90, (2, 24), generator=gen)
    valid = torch.ones_like(tokens, dtype=torch.bool)
    loss = valid.clone()
    loss[:, :6] = False
    kw = dict(block_length=4, blocks=6, layout_rates=(0.4, 0.3, 0.3), eps=1e-3, kl_weight=0.2)
    captured = []
    hook = model.encoder.norm.register_forward_hook(lambda m, i, o: captured.append(o.detach()))
    try:
        with torch.no_grad():
            plain = block_loss(model, tokens, valid, loss, torch.Generator().manual_seed(9), **kw)
            captured.clear()
            forced = block_loss(model, tokens, valid, loss, torch.Generator().manual_seed(9),
                                certainty_weight=0.7, **kw)
    finally:
        hook.remove()
    assert forced.diff_count == plain.diff_count and forced.diff_sum == plain.diff_sum
    # recompute the entropy term from the adapter pass's hidden states, textbook-style
    from trimode.training.masks import sample_blocks

    starts, masked, present = sample_blocks(valid, loss, 4, 6, (0.4, 0.3, 0.3),
                                            torch.Generator().manual_seed(9), 1e-3)
    mask_id = model.config.mask_token_id
    clean, noisy = captured[0], captured[1]
    pos = (starts[..., None] + torch.arange(4)).view(2, -1)
    teacher_logits = _head(model, clean)
    teacher_logits[..., mask_id] = float("-inf")
    teacher = torch.cat([tokens[:, :1], teacher_logits[:, :-1].argmax(-1)], 1)
    entropy, n = 0.0, 0
    for r in range(2):
        for k in range(6):
            chain = True
            for i in range(4):
                q = k * 4 + i
                j = int(pos[r, q])
                if not masked[r, k, i]:
                    continue
                if chain and j >= 1 and bool(present[r, k]) and bool(loss[r, j]):
                    n += 1
                    logits = _head(model, noisy[r, q])
                    logits[mask_id] = float("-inf")
                    if int(logits.argmax()) == int(teacher[r, j]):
                        p = logits.softmax(-1)
                        entropy += float(-(p[p > 0] * p[p > 0].log()).sum())
                if int(tokens[r, j]) != int(teacher[r, j]):
                    chain = False
    assert n == plain.diff_count and entropy > 0
    expected = float(plain.total) + 0.7 * entropy / n
    assert abs(float(forced.total) - expected) < 1e-4 * max(1.0, expected), \
        (float(forced.total), expected)


def test_init_adapter_warm_starts_and_checks_the_rank(small, tmp_path):
    """A run started from a saved adapter begins with exactly its tensors; a rank that does
    not fit is a ValueError naming init_adapter."""
    from trimode.training.lora import lora_state

    first, _ = train(config(small, tmp_path / "a", method="draft_lora", lora_rank=4,
                            draft_blocks=4, steps=3), resume=False)
    saved = tmp_path / "a" / "run" / "adapter"
    warm = Trainer(config(small, tmp_path / "b", method="draft_lora", lora_rank=4,
                          draft_blocks=4, init_adapter=str(saved)))
    want, got = lora_state(first.model), lora_state(warm.model)
    assert want.keys() == got.keys() and any(bool(v.abs().sum()) for k, v in want.items()
                                             if "lora_B" in k)
    assert all(torch.equal(want[k], got[k]) for k in want)
    with pytest.raises(ValueError, match=r"init_adapter .*its r is 4, the run's lora_rank is 2"):
        Trainer(config(small, tmp_path / "c", method="draft_lora", lora_rank=2,
                       draft_blocks=4, init_adapter=str(saved)))
    with pytest.raises(ValueError, match="init_adapter .*expected a saved adapter directory"):
        Trainer(config(small, tmp_path / "d", method="draft_lora", lora_rank=4,
                       draft_blocks=4, init_adapter=str(tmp_path / "nowhere")))
    with pytest.raises(ValueError, match="init_adapter .*its lora_alpha is"):
        Trainer(config(small, tmp_path / "e", method="draft_lora", lora_rank=4, lora_alpha=99.0,
                       draft_blocks=4, init_adapter=str(saved)))
    bad = tmp_path / "bad"
    shutil.copytree(saved, bad)
    (bad / "adapter_model.safetensors").write_text("garbage")
    with pytest.raises(ValueError, match="init_adapter .*unreadable"):
        Trainer(config(small, tmp_path / "f", method="draft_lora", lora_rank=4,
                       draft_blocks=4, init_adapter=str(bad)))


def test_resume_with_other_settings_is_a_clear_error(small, tmp_path):
    """Rerunning into an existing run directory with a changed setting does not silently
    continue the old run: the error names the setting, both values and the way out."""
    train(config(small, tmp_path, method="draft_lora", lora_rank=2, draft_blocks=4, steps=2,
                 save_every=1), resume=False)
    with pytest.raises(ValueError, match=r"resume: .*certainty_weight=0.0 there, 0.5 here.*--no-resume"):
        train(config(small, tmp_path, method="draft_lora", lora_rank=2, draft_blocks=4, steps=3,
                     certainty_weight=0.5), resume=True)
    # what only changes reporting may differ
    train(config(small, tmp_path, method="draft_lora", lora_rank=2, draft_blocks=4, steps=3,
                 eval_every=1), resume=True)
