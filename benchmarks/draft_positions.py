"""Per-position draft accuracy of tri-mode adapters on held-out prompts (batched replay).

    python benchmarks/draft_positions.py --adapters shipped,runs/x/adapter [--n 6]
        [--max-tokens 48] [--block-length 8] [--threads 2]

For each held-out prompt (the bench_train.py sets: MT-Bench, HumanEval, gsm_symbolic at the
evaluation seed) the base model's greedy ar answer is computed once; then, for each adapter,
ONE forward per prompt drafts from every seed position of the answer at once: block
``[tok[s], MASK x (B-1)]`` at positions s .. s+B-1, seeing the causal K/V of tokens < s
and its own slots (the linear_spec draft pass, spec 5.1; same layout as training's
``--draft-blocks``). This is exact, not an estimate: a draft depends only on the prefix and
the seed, which are ar tokens. Reports top-1 agreement with the ar chain per draft position
(over all seeds), and the acceptance_length a greedy linear_spec decode would have
(replaying the longest-agreeing-prefix + bonus rule from the first generated token), which
bench_train.py's real decoder should reproduce up to the max_tokens cut, and the same replay
with slot 1 always right (what a decoder giving slot 1 the base's causal logits would
reach, its slots 2.. being the same pass's outputs). Also the masked
layout (quadratic_spec draft segments: slot 0 masked too, drafts for slots 1..).
"""

from __future__ import annotations

import argparse
import json

import torch

from trimode.training.masks import block_layout_mask


@torch.no_grad()
def draft_table(model, ids: list[int], start: int, block: int, seed_visible: bool) -> torch.Tensor:
    """``[S, B]`` argmax drafts for every seed s in ``start .. len(ids) - 1`` (slot 0 is the
    seed when ``seed_visible``, a mask otherwise)."""
    mask_id = model.config.mask_token_id
    n = len(ids)
    seeds = torch.arange(start, n)
    tokens = torch.tensor([ids])
    cache = model.new_cache(1, n + len(seeds) * block)
    model.run(tokens, cache)
    pos = (seeds[:, None] + torch.arange(block)).view(1, -1)
    noisy = torch.full_like(pos, mask_id)
    if seed_visible:
        noisy.view(len(seeds), block)[:, 0] = seeds.clone().apply_(lambda s: ids[s])
    attn = block_layout_mask(seeds[None], block, torch.ones(1, n, dtype=torch.bool))
    h = model.run(noisy, cache, write=False, adapter=True, offsets=pos - n, mask=attn)
    logits = model.logits(h)[0].clone()
    logits[:, mask_id] = float("-inf")
    return logits.argmax(-1).view(len(seeds), block)


def replay(ids: list[int], start: int, drafts: torch.Tensor, slot1_exact: bool = False) -> list[int]:
    """Acceptance lengths of greedy linear_spec from seed ``start`` (``drafts`` from
    ``draft_table``): accept the longest prefix equal to the ar chain, plus the bonus.
    ``slot1_exact``: as if slot 1 always held the ar token (the base's causal prediction
    from the seed), slots 2.. unchanged."""
    out, s, n = [], start, len(ids)
    while s < n - 1:
        row = drafts[s - start]
        k = 0
        while k + 1 < row.shape[0] and s + k + 1 < n and (
                int(row[k + 1]) == ids[s + k + 1] or (slot1_exact and k == 0)):
            k += 1
        out.append(k + 1)
        s += k + 1
    return out


def main() -> None:
    from trimode import LLM, SamplingParams
    from trimode.checkpoint.embedded import shipped_adapter
    from trimode.training.corpora import eval_prompts

    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapters", default="shipped", help="comma list: 'shipped' or paths")
    ap.add_argument("--n", type=int, default=6)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--block-length", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    base = LLM(draft_adapter=False, progress=False)
    sets = eval_prompts(n_gsm=args.n)
    prompts = [p for name in ("mt_bench", "humaneval", "gsm_symbolic") for p in sets[name][: args.n]]
    convs = [[{"role": "user", "content": p}] for p in prompts]
    outs = base.chat(convs, SamplingParams(mode="ar", max_tokens=args.max_tokens))
    seqs = [(base.tokenizer.apply_chat_template(c), o.token_ids) for c, o in zip(convs, outs)]
    b = args.block_length
    for name in args.adapters.split(","):
        path = shipped_adapter() if name == "shipped" else name
        model = LLM(draft_adapter=path, progress=False).model
        result = {"adapter": str(path), "block_length": b}
        for layout, visible in (("draft", True), ("masked", False)):
            hits, total, acc, exact1 = torch.zeros(b), torch.zeros(b), [], []
            for prompt, answer in seqs:
                ids = list(prompt) + list(answer)
                start = len(prompt)
                drafts = draft_table(model, ids, start, b, visible)
                for i in range(1, b):
                    s = torch.arange(start, len(ids) - i)
                    if len(s):
                        truth = torch.tensor([ids[x + i] for x in s.tolist()])
                        hits[i] += float((drafts[s - start, i] == truth).sum())
                        total[i] += len(s)
                if visible:
                    acc += replay(ids, start, drafts)
                    exact1 += replay(ids, start, drafts, slot1_exact=True)
            result[layout] = {f"pos{i}": round(float(hits[i] / total[i]), 3)
                              for i in range(1, b) if total[i]}
            if visible:
                result["acceptance_length"] = round(sum(acc) / len(acc), 3)
                result["acceptance_length_if_slot1_exact"] = round(sum(exact1) / len(exact1), 3)
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
