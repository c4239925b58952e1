#!/usr/bin/env bash
# The progressive path on a small built-in labelled set, on 2 CPU ranks (GPU if present):
# clips whose class is only the direction a square moves (right / left / down / up; colours and background
# random) -> labelled shards with a label map -> a short MAE pretraining -> fine-tuning under ZeRO from the
# exported weights, with a multi-view evaluation of held-out clips at its end -> vmae-eval -> distillation of
# that classifier into a smaller student -> vmae-extract on a few clips -> an HF transformers export whose
# predictions equal ours. Prints each stage's result; ends with the held-out top-1.
#
#   make demo-finetune                (or: bash scripts/demo_finetune.sh)
#   DEMO_OUT=/tmp/d bash scripts/demo_finetune.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${DEMO_OUT:-demo_ft_out}
PER_CLASS=${PER_CLASS:-120}
source scripts/demo_common.sh
t0=$(date +%s)
common=("output_dir=$OUT/runs")

step "1/8 labelled clips: 4 motion classes x $PER_CLASS train + 12 held-out each (H.264, built in)"
"$PY" -m data_tools synth --out "$OUT/videos/train" --motion-classes 4 --n "$PER_CLASS" --frames 16 --size 64x64
"$PY" -m data_tools synth --out "$OUT/videos/val" --motion-classes 4 --n 12 --frames 16 --size 64x64 --seed 5000
for split in train val; do
  "$PY" -m data_tools manifest "$OUT/videos/$split" --out "$OUT/$split.jsonl" --labels-from-dirs
  "$PY" -m data_tools build --manifest "$OUT/$split.jsonl" --out "$OUT/shards/$split" --workers 2 \
      --shard-size 20 --shuffle-seed 0 --quiet | grep -E "^written"
done
echo "label map: $(cat "$OUT/shards/train/labels.json")"

step "2/8 a short MAE pretraining of vit_tiny_debug (dual masking, ZeRO-3, 2 ranks)"
launch vmae_ds.pretrain --config configs/pretrain/debug_cpu.yaml "${common[@]}" name=pretrain model.num_frames=8 \
    data.kind=shards "data.shards.shards=$OUT/shards/train" data.shards.sampling_rate=2 data.shards.num_workers=1 \
    optim.epochs=2 logging.every_steps=60 | grep -E "^step|^done"
"$PY" -m vmae_ds.export "$OUT/runs/pretrain" "$OUT/pretrain.safetensors" | quiet

step "3/8 fine-tuning from the pretrained weights (ZeRO-2, layer decay, mixup, RandAugment, erasing; no flips)"
launch vmae_ds.finetune --config configs/finetune/debug_cpu.yaml "${common[@]}" name=finetune \
    "data.shards.shards=$OUT/shards/train" "finetune.init=$OUT/pretrain.safetensors" \
    "finetune.eval.shards=$OUT/shards/val" | grep -E "^initial|^head|^step|^eval|^done"
"$PY" -m vmae_ds.export "$OUT/runs/finetune" "$OUT/classifier.safetensors" | quiet

step "4/8 vmae-eval of the exported classifier on the held-out clips (2 clips x 3 crops per video)"
"$PY" -m vmae_ds.evaluate "$OUT/classifier.safetensors" --model vit_tiny_debug --frames 8 --shards "$OUT/shards/val" \
    --clips 2 --crops 3 --sampling-rate 2 --workers 1 --out "$OUT/eval_teacher"

step "5/8 distillation into a smaller student (1 block instead of 2): KL to the frozen classifier's logits"
launch vmae_ds.finetune --config configs/finetune/debug_cpu.yaml "${common[@]}" name=student objective=distill \
    model.depth=1 "data.shards.shards=$OUT/shards/train" "finetune.eval.shards=$OUT/shards/val" \
    "distill.teacher.model=vit_tiny_debug" "distill.teacher.weights=$OUT/classifier.safetensors" \
    distill.teacher.num_frames=8 distill.temperature=2.0 distill.hard_label_weight=0.5 optim.epochs=40 \
    | grep -E "^teacher|^step|^eval|^done"
"$PY" -m vmae_ds.evaluate "$OUT/runs/student" --shards "$OUT/shards/val" --workers 1 --out "$OUT/eval_student" \
    --agree-with "$OUT/eval_teacher/predictions.jsonl"

step "6/8 vmae-extract: features of 4 held-out clips (windows of 8 frames every 4)"
head -n 4 "$OUT/val.jsonl" > "$OUT/few.jsonl"
"$PY" -m vmae_ds.extract "$OUT/classifier.safetensors" --model vit_tiny_debug --frames 8 --videos "$OUT/few.jsonl" \
    --out "$OUT/features" --sampling-rate 1 --stride 4 --batch 4 2>&1 | quiet
"$PY" -c "import numpy as np, json, sys; rows=[json.loads(l) for l in open(sys.argv[1] + '/index.jsonl')];
print('feature files:', ', '.join(f\"{r['file']} {tuple(np.load(sys.argv[1] + '/' + r['file']).shape)}\" for r in rows))" "$OUT/features"

step "7/8 HF export of the classifier: transformers loads it and predicts what we predict"
"$PY" -m vmae_ds.export "$OUT/runs/finetune" "$OUT/hf_classifier" --format hf | quiet
"$PY" - "$OUT" <<'PYEOF'
import sys
import torch
import transformers
from vmae_ds.models import create_classifier, load_pretrained
out = sys.argv[1]
hf = transformers.VideoMAEForVideoClassification.from_pretrained(f"{out}/hf_classifier").eval()
ours = create_classifier("vit_tiny_debug", 4, num_frames=8)
load_pretrained(ours, f"{out}/classifier.safetensors")
ours.eval()
video = torch.randn(4, 3, 8, 32, 32)
with torch.no_grad():
    a, b = ours(video), hf(pixel_values=video.transpose(1, 2)).logits
print(f"HF folder {out}/hf_classifier: labels {hf.config.id2label}; max |logit difference| {float((a - b).abs().max()):.2e}, "
      f"same predictions: {bool((a.argmax(1) == b.argmax(1)).all())}")
PYEOF

step "8/8 summary"
"$PY" - "$OUT" "$(( $(date +%s) - t0 ))" <<'PYEOF'
import json, sys
out = sys.argv[1]
t = json.load(open(f"{out}/eval_teacher/eval.json"))
s = json.load(open(f"{out}/eval_student/eval.json"))
print(f"classifier: held-out top-1 {t['top1']:.3f} over {t['count']} videos (chance 0.25)")
print(f"student (1 block): held-out top-1 {s['top1']:.3f}; {s['extra'].get('agreement', '')}")
print(f"demo took {sys.argv[2]} s; everything is under {out}/")
print(f"held-out top-1: {t['top1']:.3f}")
PYEOF
