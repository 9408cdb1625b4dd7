"""Held-out evaluation of the embedded model's tri-mode adapter against the untrained base.

    python benchmarks/bench_train.py [--adapter PATH] [--n 8] [--max-tokens 64]
        [--out benchmarks/out/train.json]

Held-out sets only (never trained on): MT-Bench first turns, HumanEval prompts and
reasoning-gym gsm_symbolic at the evaluation seed. Per mode and model (base = no adapter,
tri = the adapter): tokens_per_forward (generated / nfe over all requests), mean
acceptance_length, tokens/s (batched wall clock), and against ar: identical outputs,
matching prefix, the base model's NLL of the output, gsm_symbolic accuracy. AR quality:
perplexity of held-out KJV text and ar gsm accuracy, base against tri. Prints a markdown
table and one final JSON line. Greedy, fp32, batch up to 16.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
from pathlib import Path

import torch


BASE_CONFIGS = ("ar", "diffusion B=8 t=0.9", "linear_spec B=8")


def configs(b: int) -> list[tuple[str, dict]]:
    return [("ar", dict(mode="ar")),
            (f"diffusion B={b} t=0.9", dict(mode="diffusion", block_length=b, threshold=0.9)),
            (f"diffusion B={b} t=0.7", dict(mode="diffusion", block_length=b, threshold=0.7)),
            (f"diffusion B={b} t=0.5", dict(mode="diffusion", block_length=b, threshold=0.5)),
            (f"linear_spec B={b}", dict(mode="linear_spec", block_length=b)),
            ("linear_spec B=16", dict(mode="linear_spec", block_length=16)),
            (f"quadratic_spec B={b}", dict(mode="quadratic_spec", block_length=b))]


@torch.no_grad()
def nll(model, prompt: list[int], output: list[int]) -> tuple[float, int]:
    """Sum and count of the base model's causal NLL of ``output`` after ``prompt``."""
    if not output:
        return 0.0, 0
    ids = torch.tensor([prompt + output])
    cache = model.new_cache(1, ids.shape[1] + 1)
    logits = model.logits(model(ids, cache))[0, len(prompt) - 1 : -1]
    return float(torch.nn.functional.cross_entropy(logits, ids[0, len(prompt):],
                                                   reduction="sum")), len(output)


def last_number(text: str) -> str | None:
    found = re.findall(r"-?\d[\d,]*\.?\d*", text)
    return found[-1].replace(",", "").rstrip(".") if found else None


def run(llm, convs, params) -> tuple[list, float]:
    start = time.perf_counter()
    outs = llm.chat(convs, params)
    return outs, time.perf_counter() - start


def main() -> None:
    from trimode import LLM, SamplingParams
    from trimode.checkpoint.embedded import shipped_adapter
    from trimode.training.corpora import eval_prompts, gym_questions, kjv_heldout_text, EVAL_SEED

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapter", default=None)
    ap.add_argument("--n", type=int, default=8, help="prompts per held-out set")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--block-length", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out/train.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    adapter = args.adapter or shipped_adapter()
    tri = LLM(draft_adapter=adapter, progress=False)
    base = LLM(draft_adapter=False, progress=False)
    sets = eval_prompts(n_gsm=args.n)
    prompts = [p for name in ("mt_bench", "humaneval", "gsm_symbolic") for p in sets[name][: args.n]]
    answers = [a for _, a in gym_questions("gsm_symbolic", args.n, EVAL_SEED)]
    gsm_at = len(prompts) - args.n
    convs = [[{"role": "user", "content": p}] for p in prompts]
    prompt_ids = [tri.tokenizer.apply_chat_template(c) for c in convs]
    results, reference = [], None
    for name, kw in configs(args.block_length):
        params = SamplingParams(max_tokens=args.max_tokens, **kw)
        for label, llm in (("base", base), ("tri", tri)):
            if kw["mode"] == "ar" and label == "tri":
                continue  # the adapter never touches causal passes; checked below
            if label == "base" and name not in BASE_CONFIGS:
                continue  # the untrained base accepts about 1 draft token anywhere
            outs, seconds = run(llm, convs, params)
            if reference is None:
                reference = outs
            gen = sum(o.metrics.generated_tokens for o in outs)
            acc = [o.metrics.acceptance_length for o in outs if o.metrics.acceptance_length]
            s, c = map(sum, zip(*(nll(base.model, p, o.token_ids) for p, o in zip(prompt_ids, outs))))
            prefix = [next((i for i, (x, y) in enumerate(zip(o.token_ids, r.token_ids)) if x != y),
                           min(len(o.token_ids), len(r.token_ids))) for o, r in zip(outs, reference)]
            correct = sum(last_number(o.text) == a for o, a in zip(outs[gsm_at:], answers))
            row = dict(config=name, model=label, tokens_per_forward=gen / sum(o.metrics.nfe for o in outs),
                       acceptance_length=sum(acc) / len(acc) if acc else None,
                       tokens_per_s=gen / seconds, identical_to_ar=sum(o.token_ids == r.token_ids
                                                                       for o, r in zip(outs, reference)),
                       mean_prefix_match=sum(prefix) / len(prefix), nll_per_token=s / max(c, 1),
                       gsm_correct=f"{correct}/{args.n}", requests=len(outs))
            results.append(row)
            print(json.dumps(row), flush=True)
    ar_tri, _ = run(tri, convs, SamplingParams(max_tokens=args.max_tokens))
    text_ids = base.tokenizer.encode(kjv_heldout_text(6000))[:1024]
    ppl = {}
    for label, llm in (("base", base), ("tri", tri)):
        s, c = nll(llm.model, text_ids[:1], text_ids[1:])
        ppl[label] = math.exp(s / c)
    quality = dict(ar_identical_base_vs_tri=sum(a.token_ids == r.token_ids for a, r in zip(ar_tri, reference)),
                   requests=len(reference), heldout_ppl_base=ppl["base"], heldout_ppl_tri=ppl["tri"],
                   heldout_tokens=len(text_ids) - 1)
    print("| config | model | tokens_per_forward | acceptance_length | tokens/s | identical to ar | "
          "prefix match | NLL/token (base scores) | gsm |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        acc = f"{r['acceptance_length']:.2f}" if r["acceptance_length"] else "–"
        print(f"| {r['config']} | {r['model']} | {r['tokens_per_forward']:.2f} | {acc} | "
              f"{r['tokens_per_s']:.1f} | {r['identical_to_ar']}/{r['requests']} | "
              f"{r['mean_prefix_match']:.1f} | {r['nll_per_token']:.3f} | {r['gsm_correct']} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    summary = dict(adapter=str(adapter), n=args.n, max_tokens=args.max_tokens, results=results, quality=quality)
    args.out.write_text(json.dumps(summary, indent=1))
    print(json.dumps(quality))


if __name__ == "__main__":
    main()
