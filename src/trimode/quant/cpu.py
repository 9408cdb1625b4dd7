"""The CPU's features, detected at run time (never assumed): model name, ISA flags, PyTorch's
own capability level, and the dtype / thread choices that follow from them.

``preferred_dtype()``: bf16 where the CPU multiplies bf16 natively (AMX or AVX512-BF16),
fp32 elsewhere. Benchmarks print ``describe()`` so every number says which CPU it came from.
"""

from __future__ import annotations

import os
import platform
from functools import lru_cache

import torch

FLAGS_OF_INTEREST = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile",
                     "amx_bf16", "amx_int8", "avx_vnni")


@lru_cache(maxsize=1)
def cpu_info() -> dict:
    """``{"model": str, "flags": set[str], "capability": str, "cores": int}``."""
    model, flags = platform.processor() or "unknown", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and model in ("unknown", "x86_64", ""):
                    model = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return {"model": model, "flags": flags, "capability": torch.backends.cpu.get_cpu_capability(),
            "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()}


def has_native_bf16() -> bool:
    flags = cpu_info()["flags"]
    return bool({"amx_bf16", "avx512_bf16"} & flags)


def preferred_dtype() -> torch.dtype:
    """bf16 with AMX or AVX512-BF16, else fp32."""
    return torch.bfloat16 if has_native_bf16() else torch.float32


def describe() -> str:
    """One line: model, torch capability, the flags that matter here, usable cores, threads."""
    info = cpu_info()
    flags = " ".join(f for f in FLAGS_OF_INTEREST if f in info["flags"]) or "none of interest"
    return (f"{info['model']} | torch capability {info['capability']} | flags: {flags} | "
            f"cores {info['cores']} | torch threads {torch.get_num_threads()}")
