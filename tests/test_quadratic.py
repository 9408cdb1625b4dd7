"""quadratic_spec: the fused mask against an element-wise definition, drafts against a slow
4D-mask reference, and exact equality with ar."""

from __future__ import annotations

import random

import pytest
import torch

from conftest import EOS, MASK, assert_cache_equals_causal
from reference import argmax_no_mask
from trimode import LLM, SamplingParams
from trimode.decoding.quadratic_spec import quadratic_layout


def roles(verify_length: int, block_length: int, segments: list[int]):
    """Each token's role: ("V", i) or ("G", k, j), in layout order."""
    out = [("V", i) for i in range(verify_length)]
    for k in segments:
        out += [("G", k, j) for j in range(block_length)]
    return out


def allowed(query, key) -> bool:
    """Issue 8's definition, written per pair: verify is causal; the segment of outcome k
    sees the verified tokens up to k and itself; nothing sees another segment."""
    if query[0] == "V":
        return key[0] == "V" and key[1] <= query[1]
    if key[0] == "V":
        return key[1] <= query[1]
    return key[1] == query[1]


def position(role) -> int:
    return role[1] if role[0] == "V" else role[1] + 1 + role[2]


@pytest.mark.parametrize("verify_length,block_length,segments", [
    (1, 4, [0]), (4, 4, [0, 1, 2, 3]), (3, 2, [0, 1, 2]), (8, 8, [2, 7]), (5, 3, [4]), (6, 6, []),
])
def test_layout_matches_elementwise_definition(verify_length, block_length, segments):
    attention, offsets = quadratic_layout(verify_length, block_length, segments)
    r = roles(verify_length, block_length, segments)
    assert attention.shape == (len(r), len(r))
    for q, qr in enumerate(r):
        assert offsets[q] == position(qr)
        for k, kr in enumerate(r):
            assert bool(attention[q, k]) == allowed(qr, kr), (qr, kr)


def ref_quadratic(oracle, prompt, max_tokens, block_length):
    """Slow reference: every fused forward is a full-sequence forward with an explicit 4D
    mask and explicit position ids; drafts are read by *position* (bonus + 1 ...)."""
    seed = int(argmax_no_mask(oracle(input_ids=torch.tensor([prompt])).logits[0, -1], MASK))
    out, drafts, trace = [seed], [], []
    while len(out) < max_tokens and EOS not in out:
        context = prompt + out[:-1]
        verify = [seed] + drafts[: max(0, min(block_length, max_tokens - len(out)) - 1)]
        segments = list(range(len(verify))) if max_tokens - len(out) > len(verify) else []
        width = min(block_length, max_tokens - len(out))  # segments shrink near the limit
        r = roles(len(verify), width, segments)
        n, p = len(context), len(context) + len(r)
        mask = torch.zeros(p, p, dtype=torch.bool)
        mask[:, :n] = torch.ones(p, n).bool()
        mask[:n, :n] = torch.ones(n, n).tril().bool()
        for q, qr in enumerate(r):
            for k, kr in enumerate(r):
                mask[n + q, n + k] = allowed(qr, kr) or q == k
        additive = torch.zeros(p, p).masked_fill(~mask, float("-inf"))[None, None]
        pos = list(range(n)) + [n + position(x) for x in r]
        tokens = context + verify + [MASK] * (len(r) - len(verify))
        with torch.no_grad():
            z = oracle(input_ids=torch.tensor([tokens]), attention_mask=additive,
                       position_ids=torch.tensor([pos])).logits[0].float()
        a = argmax_no_mask(z[n : n + len(verify)], MASK).tolist()
        c = 0
        while c < len(verify) - 1 and a[c] == verify[c + 1]:
            c += 1
        out += a[: c + 1]
        seed = a[c]
        bonus_pos = n + c + 1
        segment = sorted((x, i) for i, x in enumerate(pos)
                         if i >= n + len(verify) and r[i - n][1] == c and x > bonus_pos)
        drafts = [int(argmax_no_mask(z[i], MASK)) for _, i in segment]
        trace.append(drafts)
    trimmed = []
    for tok in out[:max_tokens]:
        if tok == EOS:
            break
        trimmed.append(tok)
    return trimmed, trace


@pytest.mark.parametrize("block_length", [2, 4, 7])
def test_drafts_and_output_equal_reference(tiny, block_length):
    llm = LLM(str(tiny[0]))
    rng = random.Random(block_length)
    prompt = [rng.randrange(4, 96) for _ in range(9)]
    out = llm.generate([prompt], SamplingParams(mode="quadratic_spec", max_tokens=17,
                                                block_length=block_length, draft_segments=None,
                                                trace=True))[0]
    ids, ref_drafts = ref_quadratic(tiny[1], prompt, 17, block_length)
    assert out.token_ids == ids
    drafts = [list(t.tokens) for t in out.metrics.trace if t.kind == "draft"]
    assert drafts == [d for d in ref_drafts if d][: len(drafts)]
    assert len(drafts) >= 2


@pytest.mark.parametrize("block_length", [2, 4, 7])
@pytest.mark.parametrize("segments", [None, 1, 2])
def test_equals_ar_batched_and_single(tiny_llm, segments, block_length):
    rng = random.Random(11)
    prompts = [[rng.randrange(4, 96) for _ in range(n)] for n in (2, 15, 6)]
    ar = tiny_llm.generate(prompts, SamplingParams(mode="ar", max_tokens=21))
    params = SamplingParams(mode="quadratic_spec", max_tokens=21, block_length=block_length,
                            draft_segments=segments)
    batched = tiny_llm.generate(prompts, params)
    for prompt, a, b in zip(prompts, ar, batched):
        assert b.token_ids == a.token_ids
        assert tiny_llm.generate([prompt], params)[0].token_ids == a.token_ids
        if b.metrics.acceptance_length is None:  # the prefill's token already ended it
            assert b.metrics.nfe == 1 and b.metrics.generated_tokens == 1
            continue
        cycles = (b.metrics.generated_tokens - 1) / b.metrics.acceptance_length
        assert b.metrics.nfe == pytest.approx(1 + cycles)  # prefill + ONE forward per cycle


def test_equals_ar_with_draft_adapter(tiny, tmp_path):
    from test_adapter import save_peft_adapter

    save_peft_adapter(tiny[1], tmp_path, targets=("o_proj", "v_proj"))
    llm = LLM(str(tiny[0]), draft_adapter=str(tmp_path))
    rng = random.Random(4)
    prompts = [[rng.randrange(4, 96) for _ in range(n)] for n in (5, 12)]
    ar = llm.generate(prompts, SamplingParams(mode="ar", max_tokens=20))
    quad = llm.generate(prompts, SamplingParams(mode="quadratic_spec", max_tokens=20,
                                                block_length=4, trace=True))
    assert [o.token_ids for o in quad] == [o.token_ids for o in ar]


def test_quadratic_params_validation():
    with pytest.raises(ValueError, match="draft_segments"):
        SamplingParams(mode="quadratic_spec", draft_segments=0)
    with pytest.raises(ValueError, match="threshold"):
        SamplingParams(mode="quadratic_spec", threshold=0.5)


@pytest.mark.parametrize("block_length", [2, 4, 7, 8])
def test_perfect_drafter_reaches_one_forward_per_full_block(block_length):
    """Issue 8: with a perfect drafter every cycle after the first accepts the whole block
    (block_length tokens in one forward); a layout or offset error breaks this."""
    from stubs import PERFECT, HashLM, StubModel, ar_greedy, run_one, verify_sizes

    lm = HashLM()
    model = StubModel(lm, PERFECT)
    prompt, max_tokens = [5, 9, 11], 64
    seq = run_one(model, prompt, SamplingParams(mode="quadratic_spec", max_tokens=max_tokens,
                                                block_length=block_length, trace=True))
    assert seq.generated == ar_greedy(lm, prompt, max_tokens)[0]
    full, rest = divmod(max_tokens - 2, block_length)  # prefill seed + first bonus, then blocks
    assert verify_sizes(seq) == [1] + [block_length] * full + ([rest] if rest else [])
    assert seq.metrics.nfe == 2 + full + (1 if rest else 0)


def test_adversarial_drafter_still_one_forward_per_token():
    from stubs import ADVERSARIAL, HashLM, StubModel, ar_greedy, run_one

    lm = HashLM()
    seq = run_one(StubModel(lm, ADVERSARIAL), [7, 8],
                  SamplingParams(mode="quadratic_spec", max_tokens=40, block_length=8))
    assert seq.generated == ar_greedy(lm, [7, 8], 40)[0]
    assert seq.metrics.acceptance_length == 1.0 and seq.metrics.nfe == 40


@pytest.mark.parametrize("segments", [None, 1])
def test_cache_after_each_cycle_equals_ar_cache(tiny, segments):
    """Issue 8 KV exactness: after each cycle's crop the cached K/V equal those of a causal
    forward over the same committed text (minus the bonus token, which is not cached yet)."""
    from trimode.decoding.registry import STRATEGIES
    from trimode.decoding.sequence import Sequence

    model = LLM(str(tiny[0])).model
    prompt = [11, 52, 7, 33, 90, 4]
    seq = Sequence(prompt, SamplingParams(mode="quadratic_spec", max_tokens=20, block_length=4,
                                          draft_segments=segments), {EOS}, MASK, 4)
    cache = model.new_cache(1, 64)
    seq.strategy = STRATEGIES["quadratic_spec"]()
    seq.strategy.start(seq, model.logits(model(torch.tensor([prompt]), cache))[0, -1:])
    cycles = 0
    while not seq.finished:
        step = seq.strategy.next_step(seq)
        hidden = model(torch.tensor([step.tokens]), cache, attention=step.attention[None],
                       offsets=torch.tensor([step.offsets]),
                       adapter=torch.tensor([step.adapter_tokens]))
        seq.strategy.update(seq, model.logits(hidden)[0])
        cache.crop(cache.lengths - seq.rollback)
        seq.rollback = 0
        cycles += 1
        assert_cache_equals_causal(model, cache, prompt + seq.generated[:-1])
    assert cycles >= 4
