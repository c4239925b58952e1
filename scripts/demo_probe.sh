#!/usr/bin/env bash
# Frozen-feature probes on the built-in motion-class clips, on 2 CPU ranks (GPUs if present):
# labelled clips (class = the direction a square moves) -> MAE pretraining of vit_tiny_debug under ZeRO-3 with
# the in-run kNN probe every few steps -> vmae-probe (kNN, linear, attentive) of the pretrained encoder and of
# the same encoder at random init. Prints both. At this size pretraining does not beat random init on these
# clips (README, "The demo"): the script shows the tools end to end.
#
#   make demo-probe                (or: bash scripts/demo_probe.sh)
#   DEMO_OUT=/tmp/p bash scripts/demo_probe.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${DEMO_OUT:-demo_probe_out}
PER_CLASS=${PER_CLASS:-60}
EPOCHS=${EPOCHS:-8}
LR=${LR:-0.05}
EVERY=${EVERY:-10}
KIND=${KIND:-knn}
source scripts/demo_common.sh
t0=$(date +%s)

step "1/4 labelled clips: 4 motion classes x $PER_CLASS train + 16 held-out each (H.264, built in)"
"$PY" -m data_tools synth --out "$OUT/videos/train" --motion-classes 4 --n "$PER_CLASS" --frames 16 --size 64x64
"$PY" -m data_tools synth --out "$OUT/videos/val" --motion-classes 4 --n 16 --frames 16 --size 64x64 --seed 5000
for split in train val; do
  "$PY" -m data_tools manifest "$OUT/videos/$split" --out "$OUT/$split.jsonl" --labels-from-dirs
  "$PY" -m data_tools build --manifest "$OUT/$split.jsonl" --out "$OUT/shards/$split" --workers 2 \
      --shard-size 20 --shuffle-seed 0 --quiet | grep -E "^written"
done

step "2/4 MAE pretraining (ZeRO-3, 2 ranks) with the in-run kNN probe before the first step and every 10 steps"
launch vmae_ds.pretrain --config configs/pretrain/debug_cpu.yaml "output_dir=$OUT/runs" name=pretrain \
    model.num_frames=8 data.kind=shards "data.shards.shards=$OUT/shards/train" data.shards.sampling_rate=2 \
    data.shards.num_workers=1 "optim.epochs=$EPOCHS" "optim.base_lr=$LR" logging.every_steps=50 \
    "probe.every_steps=$EVERY" "probe.kind=$KIND" "probe.train_shards=$OUT/shards/train" "probe.val_shards=$OUT/shards/val" \
    probe.num_workers=1 ${PRETRAIN_EXTRA:-} | grep -E "^probe at|^done"

step "3/4 vmae-probe of the pretrained encoder (kNN, linear, attentive on its frozen features)"
"$PY" -m vmae_ds.probe.cli "$OUT/runs/pretrain" --train-shards "$OUT/shards/train" --val-shards "$OUT/shards/val" \
    --workers 1 --out "$OUT/probe_pretrained" 2>/dev/null | grep -E "^probe"

step "4/4 vmae-probe of the same encoder at random init (the baseline)"
"$PY" -m vmae_ds.probe.cli "$OUT/runs/pretrain" --random-init --train-shards "$OUT/shards/train" \
    --val-shards "$OUT/shards/val" --workers 1 --out "$OUT/probe_random" 2>/dev/null | grep -E "^probe"

"$PY" - "$OUT" "$(( $(date +%s) - t0 ))" <<'PYEOF'
import json, sys
out = sys.argv[1]
runs = [json.loads(l) for l in open(f"{out}/runs/pretrain/metrics.jsonl") if l.strip()]
hist = [(r["step"], r["probe"]["top1"]) for r in runs if isinstance(r.get("probe"), dict)]
print("\nin-run kNN probe top-1 by step: " + ", ".join(f"{s}: {t:.3f}" for s, t in hist))
pre = {p["probe"]: p for p in json.load(open(f"{out}/probe_pretrained/probe.json"))["probes"]}
rnd = {p["probe"]: p for p in json.load(open(f"{out}/probe_random/probe.json"))["probes"]}
print(f"{'probe':<10} {'pretrained':>10} {'random init':>12}   (held-out top-1, chance 0.25)")
for k in pre:
    print(f"{k:<10} {pre[k]['top1']:>10.3f} {rnd[k]['top1']:>12.3f}")
print(f"demo took {sys.argv[2]} s; plot of the in-run probe: {out}/runs/pretrain/probe.png; reports: "
      f"{out}/probe_pretrained/probe.md, {out}/probe_random/probe.md")
PYEOF
