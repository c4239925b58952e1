#!/usr/bin/env bash
# Pretrain on several nodes from one head node, over passwordless ssh (pdsh), with a hostfile:
#
#   node001 slots=8
#   node002 slots=8
#
#   scripts/train_multinode.sh HOSTFILE CONFIG.yaml [dotted.key=value ...]
#
# Environment:
#   MASTER_ADDR  address of the first host as the others reach it (default: first host in HOSTFILE)
#   MASTER_PORT  rendezvous port (default 29500)
#   NCCL_SOCKET_IFNAME, NCCL_IB_HCA, NCCL_DEBUG ...: exported to every node through ./.deepspeed_env
#     (DeepSpeed copies each NAME=VALUE line of that file into the remote environments).
# Every node needs the same checkout path, the same .venv and the shards reachable at the same path.
set -euo pipefail
hostfile=${1:?usage: $0 HOSTFILE CONFIG.yaml [key=value ...]}; cfg=${2:?config}; shift 2
here=$(cd "$(dirname "$0")/.." && pwd)
PY=${PY:-$here/.venv/bin/python}
# The launch runs from the checkout (DeepSpeed reads ./.deepspeed_env there), so paths given relative to
# the caller's folder are made absolute first; a path found only in the checkout (configs/...) is taken there.
absolute() {
  case $1 in /*) echo "$1" ;; *) if [ -e "$1" ] || [ ! -e "$here/$1" ]; then echo "$PWD/$1"; else echo "$here/$1"; fi ;; esac
}
hostfile=$(absolute "$hostfile"); cfg=$(absolute "$cfg")
[ -f "$hostfile" ] || { echo "$0: hostfile not found: $hostfile" >&2; exit 2; }
MASTER_ADDR=${MASTER_ADDR:-$(awk 'NF && $1 !~ /^#/ {print $1; exit}' "$hostfile")}
cd "$here"
: > .deepspeed_env
for v in NCCL_SOCKET_IFNAME NCCL_IB_HCA NCCL_IB_DISABLE NCCL_DEBUG DS_ACCELERATOR PYTHONPATH; do
  [ -n "${!v:-}" ] && echo "$v=${!v}" >> .deepspeed_env
done
exec "$PY" -m deepspeed.launcher.runner --hostfile "$hostfile" --master_addr "$MASTER_ADDR" \
  --master_port "${MASTER_PORT:-29500}" --module vmae_ds.pretrain --config "$cfg" "$@"
