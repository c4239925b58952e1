#!/usr/bin/env bash
# `make gpu-check`: the GPU checks in one command (see benchmarks/gpu_check.py for the stages).
# On a bare CUDA machine whose Python already has torch: the project's other wheels are installed from a local
# folder first (WHEELS, default .whl, made here by ../shared/gpu/make_wheelhouse.sh; no network there).
#   bash scripts/gpu_check.sh [--out reports/gpu_check] [--only engine authors] [--runs g:2:none g:2:full:compile]
# On a lent device whose results come back through a small folder ($OUT), keep --out elsewhere (the loader stage
# writes clips and shards there) and copy the reports: --out /tmp/gc; cp /tmp/gc/*.{md,json,log} "$OUT"/
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "gpu-check: no CUDA device here (torch.cuda.is_available() is False): run it on a GPU machine" >&2
  exit 2
fi
WHEELS=${WHEELS:-.whl}
if [ -d "$WHEELS" ] && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      "$WHEELS"/*.whl || { echo "gpu-check: installing the wheels of $WHEELS failed" >&2; exit 2; }
  export PYTHONPATH=$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
exec "$PY" -m benchmarks.gpu_check "$@"
