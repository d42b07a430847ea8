#!/usr/bin/env bash
# Runs the Triton kernel tests natively on a CUDA machine (the device tool's H200):
#   bash scripts/gpu/run_kernel_tests.sh            # log also in $OUT/kernel_tests.log when OUT is set
# The same file runs on CPU under Triton's interpreter in `make test`; on CUDA it uses bf16/fp16
# and longer sequences. --noconftest: this file needs none of tests/conftest.py's service fixtures.
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/gpu/import_path.sh
trap 'rm -rf "$_llmexec_site"' EXIT
export PYTHONUNBUFFERED=1
python3 - <<'PY'
import torch, triton
assert torch.cuda.is_available(), "no CUDA device: run the CPU interpreter tests with pytest instead"
print(f"torch {torch.__version__}, triton {triton.__version__}, {torch.cuda.get_device_name()}")
PY
log=${OUT:-/tmp}/kernel_tests.log
set -o pipefail
python3 -m pytest tests/test_triton_kernels.py -q --noconftest -p no:cacheprovider --durations=5 "$@" 2>&1 | tee "$log"
