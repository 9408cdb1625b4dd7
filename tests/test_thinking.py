"""The thinking budget (max_thinking_tokens) in every mode, on stub models whose thinking
never ends by itself, and the reasoning split (decoding/thinking.py).

The oracle is a host-only greedy loop over the toy language with the forced ``</think>``
(``budget_reference``, spec 3.5's injection); ar must equal it, linear_spec and
quadratic_spec must equal ar whatever their drafter; diffusion (not lossless) must keep the
invariants: no more than the budget inside the tags, and the tag closed.
"""

from __future__ import annotations

import pytest

from stubs import (ADVERSARIAL, EOS, FIRST, ORDINARY, PARTIAL3, PERFECT, HashDenoiser, StubModel,
                   make_seq, poly_hash, single_thread)
from trimode import SamplingParams
from trimode.decoding.thinking import Thinking, ThinkTags, split
from trimode.engine.decode import decode
from trimode.params import FieldError

assert single_thread  # autouse fixture, imported for its effect

ONE = ThinkTags(open=(5,), close=(6,))
MULTI = ThinkTags(open=(10, 11), close=(12, 13, 14))
PROMPT = [9, 8, 7]
MODES = ("ar", "linear_spec", "quadratic_spec", "diffusion")


class ThinkLM:
    """A model that thinks forever: after the prompt it opens the tag (unless the prompt
    did), then thinks hash tokens that never spell a tag; after ``</think>`` it answers
    ``answer`` hash tokens and EOS."""

    def __init__(self, tags: ThinkTags, answer: int = 5):
        self.tags, self.answer = tags, answer
        self.banned = set(tags.open) | set(tags.close)

    def _word(self, ctx) -> int:
        tok = FIRST + poly_hash(ctx) % ORDINARY
        return tok if tok not in self.banned else 4

    def next(self, ctx) -> int:
        ctx = list(ctx)
        think = Thinking(self.tags, None, [])
        opened = closed_at = None
        for i, tok in enumerate(ctx):
            before = think.state.inside
            think.commit(tok)
            if think.state.inside and not before:
                opened = i
            if before and not think.state.inside:
                closed_at = i
        if opened is None:  # open the tag, one id at a time
            done = max(j for j in range(len(self.tags.open))
                       if j == 0 or ctx[len(ctx) - j:] == list(self.tags.open[:j]))
            return self.tags.open[done]
        if think.state.inside:
            return self._word(ctx)
        return EOS if len(ctx) - closed_at > self.answer else self._word(ctx)


def budget_reference(lm, tags, prompt, budget, max_tokens) -> list[int]:
    """Greedy decoding with ``</think>`` forced once ``budget`` thinking tokens are out."""
    think = Thinking(tags, budget, prompt)
    ctx, out = list(prompt), []
    while len(out) < max_tokens:
        forced = think.forced([], 1, None)[0]
        tok = forced if forced >= 0 else lm.next(ctx)
        if tok == EOS:
            break
        out.append(tok)
        ctx.append(tok)
        think.commit(tok)
    return out


def decode_budget(model, tags, prompts, params_list):
    seqs = []
    for prompt, params in zip(prompts, params_list):
        seq = make_seq(prompt, params, model.config.block_size)
        if params.max_thinking_tokens is not None:
            seq.thinking = Thinking(tags, params.max_thinking_tokens, prompt)
        seqs.append(seq)
    decode(model, seqs)
    return seqs


def one(model, tags, prompt, **kw):
    return decode_budget(model, tags, [prompt], [SamplingParams(**kw)])[0]


def check_closed_within(tags, prompt, generated, budget):
    reasoning, answer, found = split(tags, prompt, generated)
    assert found
    assert len(reasoning) <= budget
    # closed: the thinking state after the output is outside the tags
    think = Thinking(tags, None, prompt)
    for tok in generated:
        think.commit(tok)
    assert not think.state.inside, generated
    return reasoning, answer


@pytest.mark.parametrize("tags", [ONE, MULTI], ids=["one-id-tags", "multi-id-tags"])
@pytest.mark.parametrize("budget", [0, 1, 4, 11])
def test_ar_equals_the_forced_reference_and_spec_modes_equal_ar(tags, budget):
    lm = ThinkLM(tags)
    for prompt in (PROMPT, PROMPT + list(tags.open)):
        want = budget_reference(lm, tags, prompt, budget, 60)
        assert len(split(tags, prompt, want)[0]) == budget  # it would think on otherwise
        ar = one(StubModel(lm), tags, prompt, mode="ar", max_tokens=60,
                 max_thinking_tokens=budget)
        assert ar.generated == want and ar.finish_reason == "stop"
        check_closed_within(tags, prompt, ar.generated, budget)
        for drafter in (PERFECT, ADVERSARIAL, PARTIAL3):
            for kw in (dict(mode="linear_spec", block_length=4),
                       dict(mode="linear_spec", block_length=7, threshold=0.5),
                       dict(mode="quadratic_spec", block_length=4),
                       dict(mode="quadratic_spec", block_length=3, draft_segments=None)):
                seq = one(StubModel(lm, drafter), tags, prompt, max_tokens=60,
                          max_thinking_tokens=budget, **kw)
                assert seq.generated == want, (kw, drafter)


@pytest.mark.parametrize("tags", [ONE, MULTI], ids=["one-id-tags", "multi-id-tags"])
@pytest.mark.parametrize("budget", [0, 3, 8, 21])
@pytest.mark.parametrize("block_length", [4, 8])
def test_diffusion_never_thinks_past_the_budget_and_closes_the_tag(tags, budget, block_length):
    lm = ThinkLM(tags)
    for drafter in (PERFECT, HashDenoiser()):
        for threshold in (0.9, None):
            seq = one(StubModel(lm, drafter), tags, PROMPT + list(tags.open), mode="diffusion",
                      max_tokens=64, block_length=block_length, threshold=threshold,
                      max_thinking_tokens=budget)
            check_closed_within(tags, PROMPT + list(tags.open), seq.generated, budget)


@pytest.mark.parametrize("mode", MODES)
def test_sampled_output_also_keeps_the_budget(mode):
    lm = ThinkLM(MULTI)
    for seed in range(3):
        prompt = PROMPT + list(MULTI.open)
        seq = one(StubModel(lm, PARTIAL3, peak=4.0), MULTI, prompt, mode=mode, max_tokens=60,
                  block_length=4, temperature=1.0, seed=seed, max_thinking_tokens=6)
        reasoning, _, _ = split(MULTI, prompt, seq.generated)
        if len(reasoning) == 6 or seq.finish_reason != "stop":  # else a sampled EOS came first
            check_closed_within(MULTI, prompt, seq.generated, 6)


def test_rows_with_and_without_a_budget_in_one_batch_equal_their_single_runs():
    lm = ThinkLM(ONE)
    model = StubModel(lm, PARTIAL3)
    params = [SamplingParams(mode=m, max_tokens=30, block_length=4, max_thinking_tokens=b)
              for m in MODES for b in (None, 2)]
    prompts = [PROMPT] * len(params)
    batch = decode_budget(model, ONE, prompts, params)
    for seq, p in zip(batch, params):
        alone = decode_budget(StubModel(lm, PARTIAL3), ONE, [PROMPT], [p])[0]
        assert seq.generated == alone.generated, p
    assert batch[0].generated != batch[1].generated  # the budget changed something


def test_thinking_turned_off_in_the_prompt_forces_nothing():
    """``<think></think>`` in the prompt (NLD's template with enable_thinking false): the
    output is outside the tags from the start, so even budget 0 forces nothing."""
    lm = ThinkLM(ONE)
    prompt = PROMPT + [5, 6]
    free = one(StubModel(lm), ONE, prompt, mode="ar", max_tokens=20)
    budget = one(StubModel(lm), ONE, prompt, mode="ar", max_tokens=20, max_thinking_tokens=0)
    assert budget.generated == free.generated


def test_max_thinking_tokens_is_validated():
    for bad in (-1, 1.5, True, "3"):
        with pytest.raises(FieldError) as err:
            SamplingParams(max_thinking_tokens=bad)
        assert err.value.field == "max_thinking_tokens" and ">= 0" in str(err.value)


# ------------------------------------------------------------------------------ the split


def test_split_drops_the_tags_and_holds_back_a_partial_tag():
    ids = [10, 11, 20, 21, 12, 13, 14, 30, 12]
    reasoning, answer, found = split(MULTI, [], ids)
    assert (reasoning, answer, found) == ([20, 21], [30, 12], True)
    # every prefix, not final: its parts are prefixes of the final parts
    for n in range(len(ids) + 1):
        r, a, _ = split(MULTI, [], ids[:n], final=False)
        assert reasoning[: len(r)] == r and answer[: len(a)] == a
    assert split(MULTI, [], ids[:5], final=False)[0] == [20, 21]  # 12, 13 held back
    assert split(MULTI, [], [20, 12], final=True) == ([], [20, 12], False)
    assert split(MULTI, [10, 11], [20, 12, 13], final=True) == ([20, 12, 13], [], True)


@pytest.mark.parametrize("mode", MODES)
def test_forcing_adds_no_host_sync(mode):
    """With the budget spent in every row, a step is still one transfer to the host."""
    import torch

    from trimode.bench.sync_counter import SyncCounter
    from trimode.engine import Engine, EngineConfig
    from trimode.model.config import ModelConfig
    from trimode.model.model import TriModeModel

    config = ModelConfig(vocab_size=512, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                         head_dim=16, max_position_embeddings=1024, mask_token_id=100,
                         bos_token_id=1, eos_token_ids=(), block_size=8)
    torch.manual_seed(0)
    engine = Engine(TriModeModel(config).eval(),
                    EngineConfig(max_num_seqs=8, max_model_len=256, min_shared_prefix=0))
    engine.think_tags = ThinkTags(open=(300,), close=(301, 302))
    gen = torch.Generator().manual_seed(0)
    for prompt in torch.randint(200, 290, (8, 6), generator=gen).tolist():
        engine.add_request(prompt + [300], SamplingParams(mode=mode, max_tokens=40, block_length=4,
                                                          max_thinking_tokens=2))
    engine.step()
    counts = []
    for _ in range(3):
        with SyncCounter() as counter:
            engine.step()
        counts.append(counter.syncs)
    assert counts == [1, 1, 1]
    while engine.has_unfinished():
        engine.step()
    for seq in engine.requests.values():
        check_closed_within(engine.think_tags, seq.prompt_ids, seq.generated, 2)
