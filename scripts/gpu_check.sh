#!/usr/bin/env bash
# Every GPU figure in one command: `bash scripts/gpu_check.sh [--dry-run] [--out FILE] ...`
# (options: python -m qwen35_ray.bench.gpu_check --help). On the device machine of this
# workplace, which lacks pydantic, the wheels carried in .whl/ are installed first; the repo runs from its checkout.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! $PY -c "import pydantic" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/gpu-check-site .whl/*.whl
  export PYTHONPATH=/tmp/gpu-check-site${PYTHONPATH:+:$PYTHONPATH}
fi
if ! $PY -c "import qwen35_kernels, qwen35_ray" 2>/dev/null; then
  # not installed: the checkout, with kernels/ under its package name
  mkdir -p /tmp/gpu-check-path && ln -sfn "$PWD/kernels" /tmp/gpu-check-path/qwen35_kernels
  export PYTHONPATH=/tmp/gpu-check-path:$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
export QWEN35_COMMIT=${QWEN35_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
export PYTHONUNBUFFERED=1
exec $PY -m qwen35_ray.bench.gpu_check "$@"
