#!/usr/bin/env bash
# Runs benchmarks/bench_kernels.py on a CUDA machine (the device tool's H200); JSON to
# $OUT/kernels_h200.json when OUT is set (copy it to benchmarks/results/), else to
# benchmarks/results/kernels_h200.json. Extra arguments go to the benchmark (--help).
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/gpu/import_path.sh
trap 'rm -rf "$_llmexec_site"' EXIT
export PYTHONUNBUFFERED=1
out=${OUT:-benchmarks/results}/kernels_h200.json
python3 benchmarks/bench_kernels.py --out "$out" "$@"
