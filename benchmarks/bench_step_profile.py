"""Where one ar decode step goes: ``LLM(quantization=...)`` generate at batch 1, profiled.

Loads trimode's Q8_0 export of the embedded model (the file ``bench_llamacpp.py`` measures)
with the given quantization, then times ar generates of 1 and ``1 + --tokens`` tokens from one
chat prompt: their difference over ``--tokens`` is the cost of one decode step (forward, head,
selection, engine bookkeeping), in wall and CPU (process) milliseconds, medians of
``--rounds``. Then one generate runs under ``torch.profiler`` (aten ops by self CPU time)
and ``cProfile`` (time by source module: each builtin's time, torch ops included, is charged
to the module that called it), so the step's cost splits into model / attention and cache /
quantized layers / engine, scheduler and sampling. Prints ``lscpu``'s model and flags first;
the machine may be shared, so read CPU ms and shares, not wall time alone.

It also times the step's matmuls alone (``kernel_ms``: every layer's projections and the head,
back to back, at 1 and 8 tokens), the floor a step cannot go under on these kernels.

``--baseline SRC`` (a ``src`` directory holding another ``trimode``, e.g. one from ``git
archive``) loads that version as a second package beside this one and alternates the two
every round, so a change is measured before/after in the same process and moment.

    python benchmarks/bench_step_profile.py [--threads 1] [--tokens 32] [--rounds 3]
        [--baseline /tmp/base/src] [--no-profile]
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def lscpu() -> str:
    """``lscpu``'s model name and flags (every benchmark says which CPU it ran on)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "lscpu unavailable"
    keep = ("Model name", "CPU(s)", "Flags")
    return "\n".join(line for line in out.splitlines() if line.split(":")[0].strip() in keep)


def load_baseline(src: str):
    """The ``trimode`` package under ``src`` imported as ``trimode_baseline`` (its modules
    import each other relatively, so the two versions do not mix)."""
    import importlib.util

    root = Path(src) / "trimode"
    spec = importlib.util.spec_from_file_location("trimode_baseline", root / "__init__.py",
                                                  submodule_search_locations=[str(root)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["trimode_baseline"] = module
    spec.loader.exec_module(module)
    return module


def timed(llm, params) -> tuple[float, float, int]:
    """Wall ms, CPU ms, generated tokens of one ar chat generate."""
    start, cpu = time.perf_counter(), time.process_time()
    out = llm.chat([[{"role": "user", "content": PROMPT}]], params)[0]
    return (time.perf_counter() - start) * 1e3, (time.process_time() - cpu) * 1e3, len(out.token_ids)


def step_ms(llms: dict, tokens: int, rounds: int) -> dict:
    """Per-decode-step wall and CPU ms of each of ``llms`` (name -> (LLM, SamplingParams
    class)), rounds interleaved: (generate of 1 + tokens) - (generate of 1), / tokens;
    medians, and the CPU minimum; with a "baseline", the median of the per-round CPU
    differences and in how many rounds "this" was faster."""
    walls, cpus = ({name: [] for name in llms} for _ in range(2))
    for r in range(rounds + 1):  # round 0 warms up
        for name, (llm, params) in llms.items():
            w1, c1, _ = timed(llm, params(mode="ar", max_tokens=1, temperature=0))
            wn, cn, n = timed(llm, params(mode="ar", max_tokens=1 + tokens, temperature=0))
            if r:
                walls[name].append((wn - w1) / (n - 1))
                cpus[name].append((cn - c1) / (n - 1))
    out = {name: {"wall_ms_per_step": round(statistics.median(walls[name]), 2),
                  "cpu_ms_per_step": round(statistics.median(cpus[name]), 2),
                  "cpu_ms_per_step_min": round(min(cpus[name]), 2)} for name in llms}
    if "baseline" in llms:  # paired by round: the two ran within seconds of each other
        diff = [a - b for a, b in zip(cpus["this"], cpus["baseline"])]
        out["this_minus_baseline_cpu_ms"] = {
            "median": round(statistics.median(diff), 2),
            "rounds_faster": f"{sum(d < 0 for d in diff)}/{len(diff)}"}
    return out


def kernel_ms(model, tokens: int, rounds: int = 5) -> float:
    """Median ms of the decode step's matmuls alone, called back to back on ``tokens`` random
    rows in the forward's order (every layer's fused or separate projections, then the head):
    the weights stream from memory as in a step, so this is the step's floor on these kernels."""
    layers = []
    for layer in model.encoder.layers:
        attn, mlp = layer.self_attn, layer.mlp
        layers += [attn.qkv] if attn.qkv is not None else [attn.q_proj, attn.k_proj, attn.v_proj]
        layers.append(attn.o_proj)
        layers += [mlp.gate_up] if mlp.gate_up is not None else [mlp.gate_proj, mlp.up_proj]
        layers.append(mlp.down_proj)
    layers.append(model.diffusion_head)
    xs = {n: torch.randn(tokens, n, dtype=model.dtype) for n in {x.in_features for x in layers}}
    times = []
    with torch.inference_mode():
        for _ in range(rounds + 1):
            start = time.perf_counter()
            for x in layers:
                x.base(xs[x.in_features])
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times[1:])


def aten_calls_per_step(llm, params) -> int:
    """aten calls (all levels) of one decode step: a 3-token generate minus a 2-token one."""
    counts = []
    for n in (2, 3):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as p:
            timed(llm, params(mode="ar", max_tokens=n, temperature=0))
        counts.append(sum(e.count for e in p.key_averages() if e.key.startswith("aten::")))
    return counts[1] - counts[0]


def module_of(filename: str) -> str | None:
    """A short group name for a trimode source file; None for any other file."""
    if "trimode/" in filename and "trimode/bench" not in filename:
        return filename.split("trimode/", 1)[-1].removesuffix(".py")
    return None


KERNELS = ("_weight_int8pack_mm", "_weight_int4pack_mm")  # named apart in the table


def by_module(stats: pstats.Stats) -> dict[str, float]:
    """Seconds per trimode module: each function's own time, and that of everything it calls
    outside trimode (torch's Python wrappers, C builtins such as the aten ops), goes to the
    nearest trimode caller, split over callers by their share of the calls' time; the
    quantized matmul kernels get lines of their own."""
    out: dict[str, float] = defaultdict(float)

    def charge(func, seconds: float, depth: int = 0) -> None:
        module = module_of(func[0])
        if module is not None:
            out[module] += seconds
            return
        callers = stats.stats[func][4]
        total = sum(c[3] for c in callers.values())
        if not callers or total <= 0 or depth > 30:
            out["outside trimode"] += seconds
            return
        for caller, c in callers.items():
            charge(caller, seconds * c[3] / total, depth + 1)

    for func, (_, _, tt, _, _) in stats.stats.items():
        kernel = next((k for k in KERNELS if k in func[2]), None)
        if kernel is not None:
            out[f"aten {kernel} (kernel)"] += tt
        else:
            charge(func, tt)
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def profile(llm, tokens: int) -> None:
    from trimode import SamplingParams

    params = SamplingParams(mode="ar", max_tokens=1 + tokens, temperature=0)
    prof = cProfile.Profile()
    prof.enable()
    timed(llm, params)
    prof.disable()
    mods = by_module(pstats.Stats(prof))
    total = sum(mods.values())
    print(f"\ncProfile, one generate of {1 + tokens} tokens (prefill included), time by module:")
    for m, s in list(mods.items())[:25]:
        print(f"  {m:40s} {s * 1e3 / tokens:8.2f} ms/step  {100 * s / total:5.1f}%")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as p:
        timed(llm, params)
    events = p.key_averages()
    calls = sum(e.count for e in events if e.key.startswith("aten::"))
    print(f"\ntorch.profiler: {calls / tokens:.0f} aten calls per step (all levels); top ops by self CPU:")
    print(events.table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=44))


def main() -> None:
    from trimode import LLM
    from trimode.checkpoint.gguf_export import export_gguf
    from trimode.quant.cpu import describe

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quantization", default="int8")
    ap.add_argument("--gguf", default=None, help="GGUF file (default: trimode's Q8_0 dream-arch "
                    "export of the embedded model, written to a temporary directory)")
    ap.add_argument("--baseline", default=None, help="src directory of another trimode to time "
                    "against this one, interleaved (e.g. a git archive of main)")
    ap.add_argument("--no-profile", action="store_true", help="only the per-step timing")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(lscpu())
    print("load average:", " ".join(f"{x:.2f}" for x in os.getloadavg()))
    print("cpu:", describe(), flush=True)
    gguf = args.gguf or export_gguf(None, Path(tempfile.mkdtemp()) / "smollm2-q8_0-dream.gguf",
                                    "q8_0", arch="dream")
    from trimode import SamplingParams

    llm = LLM(str(gguf), quantization=args.quantization, draft_adapter=False, progress=False)
    llms = {"this": (llm, SamplingParams)}
    if args.baseline:
        base = load_baseline(args.baseline)
        llms["baseline"] = (base.LLM(str(gguf), quantization=args.quantization, draft_adapter=False,
                                     progress=False), base.SamplingParams)
    steps = step_ms(llms, args.tokens, args.rounds)
    print(json.dumps({"matmuls_alone_ms": {f"{t} token(s)": round(kernel_ms(llm.model, t), 2)
                                           for t in (1, 8)}}), flush=True)
    for name, (one, params) in llms.items():
        steps[name]["aten_calls_per_step"] = aten_calls_per_step(one, params)
    print(json.dumps({"quantization": llm.quantization, "threads": args.threads, **steps}), flush=True)
    if not args.no_profile:
        profile(llm, args.tokens)


if __name__ == "__main__":
    main()
