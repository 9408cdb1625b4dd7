"""trimode against llama.cpp on the same GGUF file and thread count, interleaved.

Builds llama.cpp's ``llama-bench`` (plus ``llama-completion``, ``llama-diffusion-cli``) from the
source inside PyPI's ``llama-cpp-python==0.3.36`` sdist, once, under ``$TRIMODE_CACHE/llamacpp``
(default ``~/.cache/trimode/llamacpp``), with ``GGML_NATIVE=OFF`` and the AVX2/AVX-512 options
(llama.cpp's AMX path crashes in some virtual machines); skipped with a message when cmake or a
C++ compiler is missing. Then, per round, llama.cpp ``tg64`` / ``pp8`` / ``pp16`` and trimode's
ar, linear_spec, quadratic_spec and diffusion decode tokens/s after the first token, as
llama.cpp's tg64 counts them (batch 1, held-out prompts, greedy; whole generates too) on
the same file (after one untimed warm-up generate per mode); the table reports medians over
rounds and the ratio to llama.cpp tg64. The machine may be shared: only the ratios within one
run mean anything.

Each round also times one trimode forward of 1, 2, 4, 8 and 16 query tokens (read-only, after
a 64-token prefix, head included); the 8-token / 1-token ratio stands beside llama.cpp's
(``8 * tg64 / pp8``).

``--shape nld-3b --layers 8`` measures a wider model than the embedded 135M one, where the
weights' bytes rather than per-op overhead set the speed: random N(0, 0.02) weights in NLD-3B's
layer shape (width 3072, FFN 9216, 32 query / 8 KV heads of 128), the given number of layers
and the embedded model's tokenizer and tied 49,152-token vocabulary, written once under
``$TRIMODE_CACHE/bench`` and exported to Q8_0. Random weights make acceptance meaningless, so
time only ar there (``--modes ""``).

    python benchmarks/bench_llamacpp.py [--gguf FILE] [--threads 2] [--rounds 3] [--write]
        [--shape embedded|nld-3b] [--layers 8]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

SDIST = "llama-cpp-python==0.3.36"
TARGETS = ("llama-bench", "llama-completion", "llama-diffusion-cli")
CMAKE_FLAGS = ["-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=OFF", "-DGGML_AVX2=ON", "-DGGML_AVX512=ON",
               "-DGGML_AVX512_VNNI=ON", "-DGGML_AVX512_BF16=ON", "-DLLAMA_BUILD_TESTS=OFF",
               "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_CURL=OFF",
               "-DLLAMA_BUILD_APP=OFF"]


def cache_dir() -> Path:
    root = os.environ.get("TRIMODE_CACHE") or Path.home() / ".cache" / "trimode"
    return Path(root) / "llamacpp"


def build(jobs: int = 2) -> Path | None:
    """``build/bin`` of llama.cpp (built on first use); None with a message if impossible."""
    src = cache_dir() / "llama_cpp_python-0.3.36" / "vendor" / "llama.cpp"
    bin_dir = src / "build" / "bin"
    if all((bin_dir / t).exists() for t in TARGETS[:1]):
        return bin_dir
    missing = [tool for tool in ("cmake", "c++") if shutil.which(tool) is None]
    if missing:
        print(f"llama.cpp skipped: {', '.join(missing)} not found (install cmake and a C++ compiler)")
        return None
    if not src.exists():
        cache_dir().mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        SDIST, "-d", str(cache_dir())], check=True)
        with tarfile.open(cache_dir() / "llama_cpp_python-0.3.36.tar.gz") as tar:
            tar.extractall(cache_dir(), filter="data")
    subprocess.run(["cmake", "-S", str(src), "-B", str(src / "build"), *CMAKE_FLAGS], check=True)
    subprocess.run(["nice", "cmake", "--build", str(src / "build"), "--target", *TARGETS,
                    f"-j{jobs}"], check=True)
    return bin_dir


WIDE = {"nld-3b": dict(hidden_size=3072, intermediate_size=9216, num_attention_heads=32,
                      num_key_value_heads=8, head_dim=128)}


def random_checkpoint(shape: str, layers: int) -> Path:
    """A checkpoint of ``shape`` (``WIDE``) with ``layers`` layers and random weights, beside
    the embedded model's tokenizer; written once under ``$TRIMODE_CACHE/bench``."""
    import torch
    from safetensors.torch import save_file

    from trimode.checkpoint.embedded import default_model_dir
    from trimode.model.config import ModelConfig
    from trimode.model.model import TriModeModel

    out = cache_dir().parent / "bench" / f"{shape}-{layers}-layers"
    if (out / "model.safetensors").exists():
        return out
    src = Path(default_model_dir(progress=False))
    config = json.loads((src / "config.json").read_text())
    config.update(WIDE[shape], num_hidden_layers=layers,
                  trimode_source=f"random N(0, 0.02) weights, {shape} layer shape, {layers} layers")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                 "generation_config.json"):
        if (src / name).exists():
            shutil.copy(src / name, tmp / name)
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    try:
        torch.manual_seed(0)
        net = TriModeModel(ModelConfig.from_file(tmp / "config.json"))
        with torch.no_grad():
            for p in net.parameters():
                p.normal_(0, 0.02) if p.dim() == 2 else p.fill_(1.0)
        state = {k: v.contiguous() for k, v in net.state_dict().items()
                 if k != "diffusion_head.weight"}
        save_file(state, str(tmp / "model.safetensors"))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    tmp.rename(out)
    return out


def forward_ratios(model, widths=(1, 2, 4, 8, 16)) -> dict[int, float]:
    """trimode's forward time at each width over its 1-token one (read-only, 64 cached
    tokens, head included): what a draft or verify block costs in ar steps."""
    from trimode.bench.forward_cost import forward_cost

    rows = forward_cost(model, prefix=64, widths=widths, repeats=5)
    return {r["tokens"]: r["seconds"] / rows[0]["seconds"] for r in rows}


def llama_bench(bin_dir: Path, gguf: Path, threads: int) -> dict[str, float]:
    """tokens/s of tg64, pp8, pp16 (llama-bench, 2 repetitions)."""
    out = subprocess.run([str(bin_dir / "llama-bench"), "-m", str(gguf), "-t", str(threads),
                          "-p", "8,16", "-n", "64", "-r", "2", "-o", "json"],
                         capture_output=True, text=True, check=True).stdout
    rows = json.loads(out)
    return {("tg" if r["n_gen"] else "pp") + str(r["n_gen"] or r["n_prompt"]): r["avg_ts"] for r in rows}


def timed_llm(gguf: Path, quantization: str, adapter):
    """The LLM ``trimode_rates`` times: no prefix cache, so every generate pays its prompt's
    prefill and a generate minus a 1-token one is its decode alone (with the cache the second
    call would skip a prefill the first paid, and the difference would undercount)."""
    from trimode import LLM

    return LLM(str(gguf), quantization=quantization, draft_adapter=adapter, prefix_cache=False,
               progress=False)


def trimode_rates(llm, prompts, max_tokens: int, blocks: tuple[int, ...] = (8,),
                  modes: tuple[str, ...] = ("linear_spec", "quadratic_spec", "diffusion"),
                  warmup: bool = False) -> dict[str, float]:
    """On a ``timed_llm``: decode tokens/s after the first token (key ``mode`` or
    ``"mode B=n"``) of ar, then each mode at each block length, batch 1: per prompt, a generate of ``max_tokens`` minus one of
    1 token (prefill and first token), as llama.cpp's tg64 leaves the prompt out; the whole
    generate's rate (``"... whole"``); and how many prompts gave exactly ar's tokens
    (``"... identical to ar"``). ``warmup``: only run them (nothing is returned)."""
    from trimode import SamplingParams

    rates, ids = {}, {}
    configs = [("ar", None)] + [(m, b) for b in blocks for m in modes]
    chat = lambda p, params: llm.chat([[{"role": "user", "content": p}]], params)[0]  # noqa: E731
    for mode, block in configs:
        key = mode if block is None else f"{mode} B={block}"
        kw = dict(mode=mode, temperature=0, **({"block_length": block} if block else {}))
        tokens = first_tokens = seconds = first_seconds = 0.0
        ids[key] = []
        for p in prompts:  # batch 1
            start = time.perf_counter()
            first_tokens += chat(p, SamplingParams(max_tokens=1, **kw)).metrics.generated_tokens
            first_seconds += time.perf_counter() - start
            start = time.perf_counter()
            out = chat(p, SamplingParams(max_tokens=max_tokens, **kw))
            seconds += time.perf_counter() - start
            tokens += out.metrics.generated_tokens
            ids[key].append(out.token_ids)
        if warmup:  # first calls (weight packing, allocations): timed by nobody
            continue
        if seconds <= first_seconds:
            raise RuntimeError(f"{key}: {max_tokens}-token generates took {seconds:.3f} s, no "
                               f"longer than 1-token ones ({first_seconds:.3f} s): no decode "
                               "time to measure (a prefix cache, or too few --max-tokens?)")
        rates[key] = (tokens - first_tokens) / (seconds - first_seconds)
        rates[key + " whole"] = tokens / seconds
        rates[key + " identical to ar"] = sum(a == b for a, b in zip(ids[key], ids["ar"]))
    return rates


def main() -> None:
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from trimode.quant import SCHEMES
    from trimode.quant.cpu import describe

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gguf", default=None, help="GGUF file (default: trimode's Q8_0 llama-arch "
                    "export of the embedded model)")
    ap.add_argument("--shape", choices=("embedded", *WIDE), default="embedded",
                    help="the model: the embedded SmolLM2-135M, or random weights of a wider shape")
    ap.add_argument("--layers", type=int, default=8, help="layers of a --shape other than embedded")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--quantization", default="auto",
                    help="trimode's scheme(s) on the file, comma-separated (e.g. int8,w8a8): "
                    "each is timed in every round")
    ap.add_argument("--block-lengths", default="8",
                    help="comma list: each parallel mode is timed at each block_length")
    ap.add_argument("--modes", default="linear_spec,quadratic_spec,diffusion",
                    help="comma list of the parallel modes to time (ar always runs)")
    ap.add_argument("--machine", default="shared with other jobs",
                    help="how loaded the machine was, for the table's caption")
    ap.add_argument("--write", action="store_true", help="write the table to benchmarks/sections/llamacpp.md")
    args = ap.parse_args()
    if args.gguf and args.shape != "embedded":
        ap.error("--gguf and --shape name different models; give one")
    if args.gguf and not Path(args.gguf).is_file():
        ap.error(f"--gguf: no such file: {args.gguf}")
    if args.layers < 1:
        ap.error(f"--layers must be >= 1; got {args.layers}")
    bad = [q for q in args.quantization.split(",") if q not in SCHEMES]
    if bad:
        ap.error(f"--quantization: {', '.join(bad)} not one of {', '.join(SCHEMES)}")
    torch.set_num_threads(args.threads)
    cpu = describe()
    print("cpu:", cpu, flush=True)
    with tempfile.TemporaryDirectory() as tmp:  # the exported files go with it
        run(args, cpu, Path(tmp))


def run(args, cpu: str, tmp: Path) -> None:
    from trimode.checkpoint.embedded import shipped_adapter
    from trimode.training.corpora import eval_prompts

    gguf = ours_gguf = Path(args.gguf) if args.gguf else None
    if gguf is None:
        from trimode.checkpoint.gguf_export import export_gguf

        # the same Q8_0 tensors twice: the llama view for llama-bench, the dream view (with
        # tokenizer.ggml.mask_token_id, which the parallel modes need) for trimode
        source = None if args.shape == "embedded" else random_checkpoint(args.shape, args.layers)
        name = "smollm2" if source is None else source.name
        gguf = export_gguf(source, tmp / f"{name}-q8_0.gguf", "q8_0", arch="llama")
        ours_gguf = export_gguf(source, tmp / f"{name}-q8_0-dream.gguf", "q8_0", arch="dream")
    bin_dir = build()
    adapter = (shipped_adapter() or False) if args.shape == "embedded" else False  # its shape only
    llms = {q: timed_llm(ours_gguf, q, adapter) for q in args.quantization.split(",")}
    sets = eval_prompts(n_gsm=args.prompts)
    prompts = [sets[name][i] for i in range(args.prompts) for name in ("mt_bench", "humaneval", "gsm_symbolic")]
    blocks = tuple(int(b) for b in args.block_lengths.split(","))
    modes = tuple(m for m in args.modes.split(",") if m)
    for llm in llms.values():  # warm-up: first calls of each mode are not timed
        trimode_rates(llm, prompts[:1], 4, blocks, modes, warmup=True)
    peer, ours = [], {q: [] for q in llms}
    for r in range(args.rounds):
        if bin_dir is not None:
            peer.append(llama_bench(bin_dir, gguf, args.threads))
        for q, llm in llms.items():
            ours[q].append(trimode_rates(llm, prompts, args.max_tokens, blocks, modes))
            for width, ratio in forward_ratios(llm.model).items():
                ours[q][-1][f"forward {width} / 1"] = ratio
        print(json.dumps({"round": r, "llama.cpp": peer[-1] if peer else None,
                          "trimode": {q: rows[-1] for q, rows in ours.items()}}), flush=True)
    med = lambda rows, k: statistics.median(row[k] for row in rows)  # noqa: E731
    schemes = ", ".join(f"{q} -> {llm.quantization}" for q, llm in llms.items())
    lines = [f"GGUF `{gguf.name}`, {args.threads} threads, quantization {schemes}, "
             f"{args.rounds} interleaved rounds (medians); CPU: {cpu}; machine: {args.machine}.", "",
             "trimode's tokens/s are decode after the first token (a generate of the given "
             "max_tokens minus one of 1), the last column its whole generate, prefill included.",
             "", "| engine | test | tokens/s | / llama.cpp tg64 | / trimode ar | whole generate |",
             "|---|---|---:|---:|---:|---:|"]
    tg = med(peer, "tg64") if peer else None
    for k in ("tg64", "pp8", "pp16"):
        if peer:
            lines.append(f"| llama.cpp | {k} | {med(peer, k):.1f} | {med(peer, k) / tg:.2f}x | | |")
    if peer:
        lines.append(f"| llama.cpp | forward, 8 tokens / 1 token (8 x tg64 / pp8) | "
                     f"{8 * tg / med(peer, 'pp8'):.2f} | | | |")
    for q, rows in ours.items():
        for width in (2, 4, 8, 16):
            lines.append(f"| trimode {llms[q].quantization} | forward, {width} tokens / 1 token | "
                         f"{med(rows, f'forward {width} / 1'):.2f} | | | |")
        for key in ["ar"] + [f"{m} B={b}" for b in blocks for m in modes]:
            v = med(rows, key)
            same = f"{rows[-1][key + ' identical to ar']}/{len(prompts)} identical to ar"
            label = key if key == "ar" else f"{key} ({same})"
            lines.append(f"| trimode {llms[q].quantization} | {label} | {v:.1f} | "
                         + (f"{v / tg:.2f}x |" if tg else "– |") + f" {v / med(rows, 'ar'):.2f}x | "
                         + f"{med(rows, key + ' whole'):.1f} |")
    lines.append("")
    lines.append(f"Command: `python benchmarks/bench_llamacpp.py {' '.join(sys.argv[1:])}`".rstrip())
    print("\n".join(lines))
    if args.write:
        out = Path(__file__).parent / "sections" / "llamacpp.md"
        out.write_text("## trimode vs llama.cpp (same GGUF, same threads)\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
