#!/usr/bin/env bash
# GPU benchmark of issue 13 (one GPU, under 8 minutes): NLD-8B shape, bf16, random weights.
# Forward-cost curve for 1..64 query tokens, ar batch 1 tokens/s as a % of the HBM roofline
# (weight bytes / measured copy bandwidth), every mode at batch 1, 8, 32 with forced
# acceptance 1/3/6 (spec modes), CUDA graphs on and off. Writes gpu_results.json and
# gpu_results.md to $OUT (default benchmarks/gpu). Extra flags go to python -m trimode.bench.gpu:
#   bash benchmarks/gpu.sh                                     # on a CUDA machine
#   OUT=/tmp/g bash benchmarks/gpu.sh --shape tiny --device cpu --batch-sizes 1,2   # CPU smoke test
# The older forward-cost-only benchmark: python -m trimode.bench.forward_cost --help.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-benchmarks/gpu}"
if [[ " $* " != *" --device cpu "* ]] && ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "benchmarks/gpu.sh: no CUDA device (torch.cuda.is_available() is False); run it on a" \
         "GPU machine, or add --shape tiny --device cpu for a smoke test" >&2
    exit 2
fi
exec timeout 470 python -m trimode.bench.gpu --out "$OUT" "$@"
