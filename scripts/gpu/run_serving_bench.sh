#!/usr/bin/env bash
# The issue-6 benchmark on a CUDA machine (dummy Llama-3-8B weights, transformers baseline in the same run):
#   bash scripts/gpu/run_serving_bench.sh [benchmark args]
# JSON to $OUT/serving_h200.json when OUT is set (copy it to benchmarks/results/), else benchmarks/results/;
# the services' logs to $OUT/serving_logs.tar.gz.
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/gpu/serving_env.sh
work=$(mktemp -d)
trap 'rm -rf "$_llmexec_site"; [ -n "${OUT:-}" ] && tar -czf "$OUT/serving_logs.tar.gz" -C "$work" --exclude="*.safetensors" --exclude="*model*" . 2>/dev/null; rm -rf "$work"' EXIT
python3 benchmarks/bench_serving_gpu.py --out benchmarks/results/serving_h200.json --work-dir "$work" "$@"
