#!/usr/bin/env bash
# Issue 9 on the 2-GPU machine (device kind nvidia-h200-x2): TP=2 against TP=1 on a dummy
# Llama-3-8B-shaped model (equality in float32; batch-1 ms/token, batch-64 throughput and the
# collectives' time per step in bf16). JSON to $OUT/tp_h200.json when OUT is set (copy it to
# benchmarks/results/), else to benchmarks/results/tp_h200.json. Extra arguments go to
# benchmarks/bench_tp.py (--help).
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/gpu/import_path.sh
trap 'rm -rf "$_llmexec_site"' EXIT
export PYTHONUNBUFFERED=1
# NVLink multicast stays off (KINDS.md: it can take the host's shared GPUs out of service), in
# NCCL, PyTorch and NVSHMEM; the worker rank inherits these.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 - <<'PY'
import torch
count = torch.cuda.device_count()
assert count >= 2, f"tensor parallelism needs 2 GPUs, this machine has {count}"
print(f"torch {torch.__version__}, {count} x {torch.cuda.get_device_name(0)}, NCCL {torch.cuda.nccl.version()}")
PY
out=${OUT:-benchmarks/results}/tp_h200.json
python3 benchmarks/bench_tp.py --out "$out" "$@"
