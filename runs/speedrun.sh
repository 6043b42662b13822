#!/usr/bin/env bash
# The main job on a fresh machine: set up .venv, then run the whole Qwen3 recipe on the embedded default data (no
# downloads): tokenizer, pre-training S1 -> S2 -> S3, the four post-training stages for a teacher, off-policy and
# on-policy distillation into a smaller student (and RL beside it), evaluation, and the report card.
#   SCALE=cpu (default, about 35 min on 2 CPU cores) | tiny (minutes) | gpu (one GPU)     OUT=runs/out/speedrun
# Running it again skips the stages that finished (an interrupted run continues where it stopped).
set -euo pipefail
cd "$(dirname "$0")/.."
bash runs/setup.sh
OUT=${OUT:-runs/out/speedrun}
nq=.venv/bin/nanoqwen
$nq speedrun --scale "${SCALE:-cpu}" --out "$OUT" ${LAUNCHER:+--launcher "$LAUNCHER"}
MODEL="$OUT/general/$(cat "$OUT/general/latest")"
echo
echo "== The post-trained teacher answers a held-out problem (thinking, greedy):"
$nq generate --model "$MODEL" --temperature 0 --max-new-tokens 256 --prompt "Convert 7 meters to centimeters."
echo
echo "Report card: $OUT/report.md"
echo "Chat with the teacher:  $nq chat --model $MODEL"
echo "Chat with the student:  $nq chat --model $OUT/distill-on/$(cat "$OUT/distill-on/latest")"
