#!/usr/bin/env bash
# Pretrain on one machine: one rank per GPU (or, without a GPU, per CPU process with gloo).
#
#   scripts/train_single_node.sh CONFIG.yaml [dotted.key=value ...]
#
# Environment:
#   NUM_GPUS     ranks on this node (default: every visible GPU; 2 on a CPU-only machine)
#   MASTER_PORT  rendezvous port (default 29500; change it if two runs share a node)
#   DS_ACCELERATOR=cpu forces the CPU path (gloo, bf16/fp32) even when a GPU is present.
set -euo pipefail
cfg=${1:?usage: $0 CONFIG.yaml [key=value ...]}; shift
here=$(cd "$(dirname "$0")/.." && pwd)
PY=${PY:-$here/.venv/bin/python}
if [ -z "${NUM_GPUS:-}" ]; then
  NUM_GPUS=$("$PY" -c 'import torch; print(torch.cuda.device_count() or 2)')
  [ "${DS_ACCELERATOR:-}" = cpu ] && NUM_GPUS=2
fi
exec "$PY" -m deepspeed.launcher.runner --num_gpus "$NUM_GPUS" --master_port "${MASTER_PORT:-29500}" \
  --module vmae_ds.pretrain --config "$cfg" "$@"
