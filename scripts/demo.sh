#!/usr/bin/env bash
# The whole pipeline on a small built-in video set: synthesise clips -> manifest -> shards -> verify ->
# ZeRO-3 + activation-checkpointed pretraining of vit_tiny_debug on 2 ranks (GPU if present, else CPU
# with gloo) -> stop half way -> resume from the checkpoint -> export fp32 weights -> reload them.
#
#   make demo                       (or: bash scripts/demo.sh)
#   DEMO_OUT=/tmp/d STEPS=400 bash scripts/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${DEMO_OUT:-demo_out}
STEPS=${STEPS:-300}
VIDEOS=${VIDEOS:-48}
HALF=$((STEPS / 2))
MASTER_PORT=${MASTER_PORT:-29533}  # each demo its own port: two demos can run at once
source scripts/demo_common.sh
device=$([ "${DS_ACCELERATOR:-}" = cpu ] && echo "CPU (gloo)" || echo "GPU")
t0=$(date +%s)

step "1/6 making $VIDEOS small H.264 clips (built in, no download)"
"$PY" -m data_tools synth --out "$OUT/videos" --n "$VIDEOS"
"$PY" -m data_tools manifest "$OUT/videos" --out "$OUT/manifest.jsonl"

step "2/6 building WebDataset shards"
"$PY" -m data_tools build --manifest "$OUT/manifest.jsonl" --out "$OUT/shards" --workers 2 --shard-size 16
"$PY" -m data_tools verify "$OUT/shards"

# 48 videos / (4 videos x 2 ranks) = 6 steps per epoch; 50 epochs = 300 steps
epochs=$(( (STEPS + 5) / 6 ))
common=(name=demo "output_dir=$OUT/runs" data.kind=shards "data.shards.shards=$OUT/shards"
        data.shards.num_workers=1 optim.epochs=$epochs checkpoint.every_steps=50 logging.every_steps=25)
pretrain() { launch vmae_ds.pretrain --config configs/pretrain/debug_cpu.yaml "$@"; }

step "3/6 pretraining vit_tiny_debug, dual masking, ZeRO-3, activation checkpointing, 2 ranks on $device: steps 1-$HALF"
pretrain "${common[@]}" optim.max_steps=$HALF

step "4/6 resuming from the newest complete checkpoint: steps $((HALF + 1))-$STEPS"
pretrain "${common[@]}" --resume auto

step "5/6 exporting consolidated fp32 weights"
"$PY" -m vmae_ds.export "$OUT/runs/demo" "$OUT/vit_tiny_debug.safetensors"
"$PY" - "$OUT/vit_tiny_debug.safetensors" <<'PYEOF'
import sys
from vmae_ds.models import create_pretrain_model, load_pretrained
report = load_pretrained(create_pretrain_model("vit_tiny_debug"), sys.argv[1])
print(f"reloaded {sys.argv[1]} into vit_tiny_debug: {report}")
PYEOF

step "6/6 summary"
"$PY" - "$OUT/runs/demo/metrics.jsonl" "$(( $(date +%s) - t0 ))" <<'PYEOF'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
steps = [r for r in rows if "loss" in r and "step" in r]
first, last = steps[0], steps[-1]
rate = [r["clips_per_s"] for r in steps if r.get("clips_per_s")]
print(f"loss {first['loss']:.4f} at step {first['step']} -> {last['loss']:.4f} at step {last['step']}")
if rate:
    print(f"throughput: {sum(rate) / len(rate):.1f} clips/s (mean of logged steps, all ranks)")
print(f"demo took {sys.argv[2]} s")
PYEOF
cat <<TXT
videos:     $OUT/videos   (manifest $OUT/manifest.jsonl)
shards:     $OUT/shards   (index.json, errors file)
run folder: $OUT/runs/demo  (config.yaml, metrics.jsonl, tb/, checkpoints/)
weights:    $OUT/vit_tiny_debug.safetensors
TXT
