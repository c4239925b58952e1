#!/usr/bin/env bash
# Unmasked Teacher on 2 CPU ranks (GPU if present): a tiny CLIP-shaped teacher with random weights saved in
# OpenAI's key layout (as a user's converted CLIP file would be) -> labelled motion clips in shards -> UMT
# pretraining of a tubelet-1 student under ZeRO-3 with attention (semantic) masks, stopped half way and
# resumed -> the student exported -> fine-tuned as a classifier from those weights.
#
#   make demo-umt                     (or: bash scripts/demo_umt.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${DEMO_OUT:-demo_umt_out}
STEPS=${STEPS:-80}
MASTER_PORT=${MASTER_PORT:-29551}  # each demo its own port: two demos can run at once
source scripts/demo_common.sh
t0=$(date +%s)

step "1/5 a tiny CLIP-shaped teacher: random weights in OpenAI's key layout (conv1, transformer.resblocks.*, proj)"
"$PY" - "$OUT/clip_tiny_openai.pt" <<'PYEOF'
import sys
from vmae_ds.models.clip_teacher import CLIP_SPECS, random_openai_state_dict, save_openai_state_dict
sd = random_openai_state_dict("clip_tiny_debug", seed=0)
save_openai_state_dict({"visual." + k: v for k, v in sd.items()}, sys.argv[1])  # as a full CLIP file has it
print(f"{sys.argv[1]}: {len(sd)} tensors under 'visual.', {CLIP_SPECS['clip_tiny_debug'].describe()}")
PYEOF

step "2/5 labelled motion clips -> shards"
"$PY" -m data_tools synth --out "$OUT/videos" --motion-classes 4 --n 16 --frames 16 --size 64x64
"$PY" -m data_tools manifest "$OUT/videos" --out "$OUT/videos.jsonl" --labels-from-dirs
"$PY" -m data_tools build --manifest "$OUT/videos.jsonl" --out "$OUT/shards" --workers 2 --shard-size 16 \
    --shuffle-seed 0 --quiet | grep -E "^written"

umt=(--config configs/pretrain/umt_debug_cpu.yaml name=umt "output_dir=$OUT/runs"
     "umt.teacher.path=$OUT/clip_tiny_openai.pt" "data.shards.shards=$OUT/shards" optim.epochs=$((STEPS / 8)))
step "3/5 UMT pretraining (ZeRO-3, bf16, attention masks): steps 1-$((STEPS / 2)), then resumed to $STEPS"
launch vmae_ds.pretrain "${umt[@]}" optim.max_steps=$((STEPS / 2)) | grep -E "^teacher|^step|^done"
launch vmae_ds.pretrain "${umt[@]}" --resume auto | grep -E "^resumed|^step|^done"

step "4/5 export the student"
"$PY" -m vmae_ds.export "$OUT/runs/umt" "$OUT/umt_student.safetensors" | quiet

step "5/5 fine-tune a classifier from the UMT student (tubelet 1, 8 frames)"
launch vmae_ds.finetune --config configs/finetune/debug_cpu.yaml name=ft "output_dir=$OUT/runs" \
    model.tubelet_size=1 "data.shards.shards=$OUT/shards" data.shards.sampling=segments \
    "finetune.init=$OUT/umt_student.safetensors" optim.epochs=10 | grep -E "^initial|^head|^step|^done"

"$PY" - "$OUT" "$(( $(date +%s) - t0 ))" <<'PYEOF'
import json, sys
rows = [json.loads(line) for line in open(f"{sys.argv[1]}/runs/umt/metrics.jsonl") if line.strip()]
first, last = rows[0], rows[-1]
print(f"\nalignment loss (2 - 2 cos): {first['loss']:.4f} at step {first['step']} -> {last['loss']:.4f} at step "
      f"{last['step']}; demo took {sys.argv[2]} s")
PYEOF
