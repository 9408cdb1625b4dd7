"""SDPA with a per-row boolean mask against flex_attention with a mask_mod, on this machine.

    python benchmarks/bench_attention.py [--rows 16] [--width 8] [--span 512] [--repeats 20]

The decode forward's attention (issue 13 part 2): each row has its own cache length and kind
(causal or block-bidirectional). SDPA gets the ``[B, 1, T, S]`` bool mask that
``model.kv_cache.build_forward_batch`` builds on the device from per-row descriptors;
flex_attention (compiled) gets a ``mask_mod`` reading the same descriptors, and a block
mask built per step (as a decode step would have to). Times per call, including mask
construction, median of ``--repeats``, interleaved, at two head geometries (the nano
benchmark model's and NLD-8B's). Prints the machine (``lscpu`` model name).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import time

import torch
import torch.nn.functional as F


def descriptors(rows: int, width: int, span: int, gen: torch.Generator):
    lengths = torch.randint(span // 2, span - width, (rows,), generator=gen)
    bidirectional = torch.arange(rows) % 2 == 1
    return lengths, bidirectional


def sdpa_call(q, k, v, lengths, bidirectional, width):
    span = k.shape[2]
    t = torch.arange(width)
    j = torch.arange(span)
    rel = j[None, :] - lengths[:, None]  # [B, S] key slot relative to the row length
    causal = rel[:, None, :] <= t[None, :, None]
    new = (rel[:, None, :] >= 0) & (rel[:, None, :] < width)
    mask = (rel[:, None, :] < 0) | (new & (causal | bidirectional[:, None, None]))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None],
                                          enable_gqa=q.shape[1] != k.shape[1])


def flex_call(flex, create_block_mask, q, k, v, lengths, bidirectional, width):
    def mask_mod(b, h, qi, kv):
        rel = kv - lengths[b]
        return (rel < 0) | ((rel < width) & ((rel <= qi) | bidirectional[b]))

    block = create_block_mask(mask_mod, q.shape[0], None, width, k.shape[2], device="cpu")
    return flex(q, k, v, block_mask=block, enable_gqa=q.shape[1] != k.shape[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--width", type=int, default=8)
    ap.add_argument("--span", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    flex = torch.compile(flex_attention, dynamic=False)
    model = subprocess.run(["lscpu"], check=False, capture_output=True, text=True).stdout
    name = next((line.split(":", 1)[1].strip() for line in model.splitlines()
                 if line.startswith("Model name")), "?")
    print(f"CPU {name}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"rows {args.rows}, width {args.width}, span {args.span}")
    gen = torch.Generator().manual_seed(0)
    for heads, kv_heads, dim in ((4, 2, 16), (32, 8, 128)):
        q = torch.randn(args.rows, heads, args.width, dim, generator=gen)
        k = torch.randn(args.rows, kv_heads, args.span, dim, generator=gen)
        v = torch.randn_like(k)
        lengths, bidirectional = descriptors(args.rows, args.width, args.span, gen)
        want = sdpa_call(q, k, v, lengths, bidirectional, args.width)
        got = flex_call(flex, create_block_mask, q, k, v, lengths, bidirectional, args.width)
        error = float((want - got).abs().max())
        times = {"sdpa": [], "flex": []}
        for _ in range(args.repeats):
            for name_, fn in (("sdpa", lambda: sdpa_call(q, k, v, lengths, bidirectional, args.width)),
                              ("flex", lambda: flex_call(flex, create_block_mask, q, k, v, lengths,
                                                         bidirectional, args.width))):
                start = time.perf_counter()
                fn()
                times[name_].append(time.perf_counter() - start)
        sdpa, fl = (statistics.median(times[n]) * 1e3 for n in ("sdpa", "flex"))
        print(f"heads {heads}/{kv_heads} x {dim}: sdpa {sdpa:.2f} ms, flex {fl:.2f} ms "
              f"(flex/sdpa {fl / sdpa:.2f}x), max |difference| {error:.1e}")


if __name__ == "__main__":
    main()
