#!/usr/bin/env bash
# The GPU serving tests (issue 6) on a CUDA machine: CUDA IPC attach, two runners holding one copy,
# a killed runner releasing its share, loader restart and re-attach, greedy tokens equal to transformers.
#   bash scripts/gpu/run_serving_tests.sh     (after scripts/gpu/make_carry.sh here; carry build/gpu_carry)
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/gpu/serving_env.sh
trap 'rm -rf "$_llmexec_site"' EXIT
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name())"
log=${OUT:-/tmp}/serving_tests.log
set -o pipefail
python3 -m pytest tests/test_gpu_serving.py -q -rs -s -p no:cacheprovider --durations=5 "$@" 2>&1 | tee "$log"
