#!/usr/bin/env bash
# GPU benchmark, offline: forward latency for 1..64 query tokens and per-mode decode tokens/s
# on an NLD-8B-shaped model with random weights (or a local checkpoint: --model PATH).
# Runs in under 8 minutes on one GPU (a wall-clock guard skips what is left after 7 min) and
# writes benchmarks/gpu_results.json (change with --out). Any flag of
# `python -m trimode.bench.forward_cost --help` may be added, e.g.
#   bash benchmarks/gpu.sh                                   # cuda, bf16, random NLD-8B
#   bash benchmarks/gpu.sh --model /models/NLD-8B            # a local checkpoint
#   bash benchmarks/gpu.sh --shape tiny --device cpu --out /tmp/gpu_cpu.json   # CPU smoke test
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
exec timeout 480 python -m trimode.bench.forward_cost "$@"
