#!/usr/bin/env bash
# The four post-training stages of the Qwen3 report on a laptop CPU, from a freshly pre-trained nano model.
#   bash runs/posttrain_demo.sh [OUT]      (about 30-40 CPU minutes on 2 cores)
# Base: nano-d4 pre-trained on an EASY subset of the embedded tasks (arithmetic and lists, difficulty 1-2, English).
set -euo pipefail
OUT=${1:-runs/posttrain_demo}
NQ="python -m nanoqwen"
TASKS="arithmetic,lists"; DIFF=1-2; LANG=en
mkdir -p "$OUT"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}

# 0. the base model: task documents (question, steps, answer line) as a plain-text corpus, pre-training stages 1-2
if [ ! -f "$OUT/base/stage2/latest" ]; then
  python - "$OUT/corpus.jsonl" <<'PY'
import json, sys
from nanoqwen.tasks import format_document, iter_examples
stream = iter_examples("train", 0, ["arithmetic", "lists"], (1, 2), ["en"])
with open(sys.argv[1], "w") as f:
    for _ in range(40_000):
        f.write(json.dumps({"text": format_document(next(stream))}) + "\n")
PY
  $NQ pretrain --stage 1 --preset nano-d4 --out "$OUT/base" --data "$OUT/corpus.jsonl" --vocab-size 2048 \
    --steps ${BASE_STEPS:-300} --batch-size 16 --no-progress --log-every 50
  $NQ pretrain --stage 2 --preset nano-d4 --out "$OUT/base" --data "$OUT/corpus.jsonl" --vocab-size 2048 \
    --steps ${BASE_DECAY_STEPS:-100} --batch-size 16 --no-progress --log-every 50
fi
BASE=$OUT/base/stage2/$(cat "$OUT/base/stage2/latest")
F="--tasks $TASKS --difficulty $DIFF --languages $LANG"
EVAL="--samples ${EVAL_SAMPLES:-64} --k 4 --max-new-tokens 192 $F"
echo "base model: $BASE"

stage() { [ ! -f "$OUT/$1/latest" ]; }  # a finished stage is skipped when the script runs again

# 1. long-CoT cold start: verified thinking traces on queries the base cannot answer directly
stage coldstart && $NQ sft --stage coldstart --model "$BASE" --out "$OUT/coldstart" --samples 1024 --steps ${COLD_STEPS:-350} \
  --batch-size 16 --lr 1e-3 --no-progress --log-every 25 $F
[ -f "$OUT/eval/coldstart/eval.json" ] || $NQ eval --model "$OUT/coldstart" --out "$OUT/eval/coldstart" $EVAL

# 2. reasoning RL (GRPO): verifier + format rewards, G answers per prompt
stage rl && $NQ rl --stage reasoning --model "$OUT/coldstart" --out "$OUT/rl" --samples 1024 --steps ${RL_STEPS:-30} \
  --prompts-per-step 8 --group-size 8 --iterations 2 --micro-batch 32 --lr ${RL_LR:-1e-4} --max-new-tokens 192 \
  --temperature 0.6 --no-progress $F
[ -f "$OUT/eval/rl/eval.json" ] || $NQ eval --model "$OUT/rl" --out "$OUT/eval/rl" $EVAL

# 3. thinking-mode fusion: rejection-sampled thinking answers + /no_think direct answers, flags switching
stage fusion && $NQ sft --stage fusion --model "$OUT/rl" --out "$OUT/fusion" --samples 512 --steps ${FUSION_STEPS:-150} \
  --batch-size 16 --lr 5e-4 --no-progress --log-every 25 $F
[ -f "$OUT/eval/fusion/eval.json" ] || $NQ eval --model "$OUT/fusion" --out "$OUT/eval/fusion" $EVAL

# 4. general RL: rule rewards (instructions, /think and /no_think), a judge with references, a reward model
stage rm && $NQ rm --model "$OUT/fusion" --out "$OUT/rm" --samples 256 --steps 60 --batch-size 8 --lr 3e-4 --no-progress \
  --log-every 20 $F
stage general && $NQ rl --stage general --model "$OUT/fusion" --out "$OUT/general" --judge "$OUT/fusion" --rm "$OUT/rm" \
  --samples 1024 --steps ${GENERAL_STEPS:-10} --prompts-per-step 8 --group-size 8 --iterations 2 --micro-batch 32 \
  --lr ${RL_LR:-1e-4} --max-new-tokens 192 --temperature 0.6 --no-progress $F
[ -f "$OUT/eval/general/eval.json" ] || $NQ eval --model "$OUT/general" --out "$OUT/eval/general" $EVAL

# the table: every stage on the same held-out problems
python - "$OUT/eval" <<'PY'
import json, os, sys
print(f"\n{'stage':10s} {'think p@1':>9s} {'think p@4':>9s} {'direct p@1':>10s} {'ThinkFollow':>11s} "
      f"{'empty blk':>9s} {'think tok':>9s}  budget curve (0,16,32,64,128,inf)")
for stage in ("coldstart", "rl", "fusion", "general"):
    path = os.path.join(sys.argv[1], stage, "eval.json")
    if not os.path.exists(path):
        continue
    r = json.load(open(path))
    t, d = r["thinking"], r["non_thinking"]
    curve = " ".join(f"{b['accuracy']:.2f}" for b in r["budget_curve"])
    print(f"{stage:10s} {t['pass_at_1']:9.3f} {t['pass_at_k']:9.3f} {d['pass_at_1']:10.3f} {r['think_follow']:11.3f} "
          f"{r['no_think_empty_block']:9.3f} {t['mean_thinking_tokens']:9.1f}  {curve}")
PY
