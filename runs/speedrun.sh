#!/usr/bin/env bash
# The main job on a fresh machine: set up .venv, then run the whole Qwen3 recipe on the embedded default data (no
# downloads) in a time budget: tokenizer, pre-training S1 -> S2 -> S3, the four post-training stages for a teacher,
# off-policy and on-policy distillation into a smaller student (and RL beside it), evaluation, and the report card.
#   SCALE=gpu (the default with a CUDA device: 10 minutes) | cpu (the default without: 30 minutes on 2 cores) | tiny
#   MINUTES=N (the budget of the stages; the models and every stage's size follow)   SEED=0   OUT=runs/out/speedrun-SCALE
# Running it again skips the stages that finished (an interrupted run continues where it stopped).
set -euo pipefail
cd "$(dirname "$0")/.."
bash runs/setup.sh
nq=.venv/bin/nanoqwen
SCALE=${SCALE:-$(.venv/bin/python -c "from nanoqwen.speedrun import default_scale; print(default_scale())")}
OUT=${OUT:-runs/out/speedrun-$SCALE}
$nq speedrun --scale "$SCALE" --out "$OUT" --seed "${SEED:-0}" ${MINUTES:+--minutes "$MINUTES"} \
    ${LAUNCHER:+--launcher "$LAUNCHER"}
MODEL="$OUT/general/$(cat "$OUT/general/latest")"
echo
echo "== The post-trained teacher answers a held-out problem (thinking, greedy):"
$nq generate --model "$MODEL" --temperature 0 --max-new-tokens 256 --prompt "Convert 7 meters to centimeters."
echo
echo "Report card: $OUT/report.md"
echo "Chat with the teacher:  $nq chat --model $MODEL"
echo "Chat with the student:  $nq chat --model $OUT/distill-on/$(cat "$OUT/distill-on/latest")"
