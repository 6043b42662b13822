#!/usr/bin/env bash
# The main job on a fresh machine: set up .venv, pre-train a small Qwen3 through the report's three stages on the
# embedded corpus (no downloads), then ask it a held-out question. Post-training, distillation and the report card
# join this script as their issues land. PRESET, OUT and STEPS (steps per stage, default: each stage's own) may be
# set in the environment.
set -euo pipefail
cd "$(dirname "$0")/.."
bash runs/setup.sh
PRESET=${PRESET:-nano-d4}
OUT=${OUT:-runs/out/speedrun}
nq=.venv/bin/nanoqwen
for stage in 1 2 3; do
    $nq pretrain --stage "$stage" --preset "$PRESET" --out "$OUT" ${STEPS:+--steps "$STEPS"}
done
MODEL="$OUT/stage3/$(cat "$OUT/stage3/latest")"
echo
echo "== The pre-trained model completes a held-out problem (greedy):"
$nq generate --model "$MODEL" --raw --temperature 0 --max-new-tokens 160 --stop $'\n\n' \
    --prompt $'Compute 47 + 38.\n\nSolution:\n'
echo
echo "Model: $MODEL (loss curves: $OUT/stage*/loss.png)"
echo "Chat with it:  $nq chat --model $MODEL"
