"""`nanoqwen speedrun`: the whole Qwen3 recipe in one command, on the embedded default data, with a report card.

    teacher: tokenizer -> pre-training S1 -> S2 -> S3 -> long-CoT cold start -> reasoning RL -> thinking-mode fusion
             -> reward model -> general RL
    student: pre-training S1 -> S2 -> off-policy distillation -> on-policy distillation, and beside it RL from the same
             off-policy start at about the same compute (the report's Table 21)
    then:    evaluation of every stage on the same held-out problems -> OUT/report.md and its PNG plots

Every stage is one `nanoqwen ...` command (printed before it runs) in a subprocess; its output folder is its record, so
running the speedrun again skips the stages that finished and redoes the one that was interrupted. `--launcher
"torchrun --nproc-per-node 8"` runs the pre-training stages on N ranks. Scales: `tiny` (the test: a few minutes),
`cpu` (the default: about 35 minutes on 2 CPU cores), `gpu` (one GPU, a bigger model and budget).
"""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field

from .atomic import atomic_write

# One scale = the models, the task slice and each stage's budget. The task slice is what a few-million-parameter
# model can learn in minutes on a CPU; bigger scales widen it. The cold start is light (the report's "few samples,
# few steps"): after 200 steps the cpu teacher samples almost deterministically and RL no longer moves it (README).
SCALES = {
    "tiny": dict(teacher="nano-d2", student="nano-d2", vocab=512, tasks="arithmetic,units", difficulty="1-2",
                 languages="en", pretrain=(30, 10, 15), student_pretrain=(20, 8), batch=8, coldstart=(128, 60, 3e-3),
                 rl=(2, 4, 4), fusion=(64, 10), rm=(32, 6), general=(1, 4, 4), distill_off=(64, 10),
                 distill_on=(4, 8), student_rl=(2, 4, 4), eval=(16, 1), max_new_tokens=160, moe=True),
    "cpu": dict(teacher="nano-d4", student="nano-d2", vocab=1024, tasks="lists,logic,units,word_problems",
                difficulty="1-2", languages="en", pretrain=(600, 400, 150), student_pretrain=(400, 200), batch=8,
                coldstart=(1024, 80), rl=(20, 8, 8), fusion=(512, 120), rm=(96, 30), general=(8, 8, 8),
                distill_off=(512, 250), distill_on=(40, 16), student_rl=(16, 8, 8), eval=(192, 2),
                max_new_tokens=192, moe=False),
    "gpu": dict(teacher="nano-d12", student="nano-d6", vocab=4096, tasks=None, difficulty="1-3", languages=None,
                pretrain=(4000, 1500, 1000), student_pretrain=(3000, 1000), batch=32, coldstart=(4096, 600),
                rl=(100, 32, 8), fusion=(2048, 400), rm=(512, 100), general=(40, 32, 8), distill_off=(2048, 400),
                distill_on=(100, 64), student_rl=(50, 32, 8), eval=(256, 4), max_new_tokens=512, moe=True),
}


@dataclass
class Step:
    name: str            # also its folder under OUT (or OUT/eval/NAME for evaluations)
    argv: list[str]      # `nanoqwen` arguments
    done: str            # the file whose presence means the step finished
    launcher: list[str] = field(default_factory=list)  # e.g. torchrun, for the pre-training stages


def recipe(out: str, s: dict, launcher: list[str]) -> list[Step]:
    """The ordered stages of one speedrun at scale `s`."""
    j = lambda *parts: os.path.join(out, *parts)  # noqa: E731
    tasks = [*(["--tasks", s["tasks"]] if s["tasks"] else []), "--difficulty", s["difficulty"],
             *(["--languages", s["languages"]] if s["languages"] else [])]
    quiet = ["--no-progress", "--log-every", "10"]
    gen = ["--max-new-tokens", str(s["max_new_tokens"])]
    steps = []

    def pretrain(name, preset, budget, out_dir):
        for stage, n in enumerate(budget, 1):
            argv = ["pretrain", "--stage", str(stage), "--preset", preset, "--out", out_dir, "--steps", str(n),
                    "--batch-size", str(s["batch"] if stage < 3 else max(1, s["batch"] // 8)),
                    "--vocab-size", str(s["vocab"]), *tasks, *quiet]
            steps.append(Step(f"{name}-s{stage}", argv, os.path.join(out_dir, f"stage{stage}", "latest"), launcher))

    def rl(name, model, budget, stage="reasoning", extra=()):
        # rollouts at Qwen's thinking temperature; reasoning RL keeps the queries the model solves sometimes (the
        # report's "learnable" query-verifier pairs), so every group has a reward spread; enough candidates that no
        # query repeats (a tiny model overfits repeated RL prompts)
        n, prompts, group = budget
        select = ["--learnable", "4"] if stage == "reasoning" else []
        candidates = max(64, (4 if select else 2) * n * prompts)
        steps.append(Step(name, ["rl", "--stage", stage, "--model", model, "--out", j(name), "--steps", str(n),
                                 "--prompts-per-step", str(prompts), "--group-size", str(group), "--samples",
                                 str(candidates), "--temperature", "0.6", "--lr", "1e-4",
                                 "--micro-batch", "32", *select, *gen, *tasks, *extra, *quiet], j(name, "latest")))

    def evaluate(name, model, budgets="none"):
        n, k = s["eval"]
        steps.append(Step(f"eval-{name}", ["eval", "--model", model, "--out", j("eval", name), "--samples", str(n),
                                           "--k", str(k), "--budgets", budgets, *gen, *tasks],
                          j("eval", name, "eval.json")))

    # the teacher: pre-training, then the four post-training stages
    pretrain("teacher", s["teacher"], s["pretrain"], j("teacher"))
    if s["moe"]:  # dense vs MoE at equal active parameters: stage 1 only, same data and steps
        moe = s["teacher"].replace("nano-d", "nano-moe-d")
        steps.append(Step("moe-s1", ["pretrain", "--stage", "1", "--preset", moe, "--out", j("moe"), "--steps",
                                     str(s["pretrain"][0]), "--batch-size", str(s["batch"]), "--vocab-size",
                                     str(s["vocab"]), *tasks, *quiet], j("moe", "stage1", "latest"), launcher))
    base = j("teacher", "stage3")
    n, k, lr = (*s["coldstart"], 1e-3)[:3]  # (samples, steps[, lr]): the tiny teacher must learn to end its turns
    steps.append(Step("coldstart", ["sft", "--stage", "coldstart", "--model", base, "--out", j("coldstart"),
                                    "--samples", str(n), "--steps", str(k), "--batch-size", "16", "--lr", str(lr),
                                    *tasks, *quiet], j("coldstart", "latest")))
    rl("rl", j("coldstart"), s["rl"])
    n, k = s["fusion"]
    steps.append(Step("fusion", ["sft", "--stage", "fusion", "--model", j("rl"), "--out", j("fusion"), "--samples",
                                 str(n), "--steps", str(k), "--batch-size", "16", "--lr", "5e-4", *tasks, *quiet],
                      j("fusion", "latest")))
    n, k = s["rm"]
    steps.append(Step("rm", ["rm", "--model", j("fusion"), "--out", j("rm"), "--samples", str(n), "--steps", str(k),
                             "--batch-size", "8", "--lr", "3e-4", *tasks, *quiet], j("rm", "latest")))
    rl("general", j("fusion"), s["general"], "general", ["--judge", j("fusion"), "--rm", j("rm")])

    # the student: its own pre-training, then strong-to-weak distillation; RL from the same start for comparison
    pretrain("student", s["student"], s["student_pretrain"], j("student"))
    n, k = s["distill_off"]
    steps.append(Step("distill-off", ["distill", "--mode", "off", "--teacher", j("general"), "--student",
                                      j("student", "stage2"), "--out", j("distill-off"), "--samples", str(n),
                                      "--steps", str(k), "--batch-size", "16", "--lr", "1e-3", *gen, *tasks, *quiet],
                      j("distill-off", "latest")))
    n, k = s["distill_on"]
    steps.append(Step("distill-on", ["distill", "--mode", "on", "--teacher", j("general"), "--student",
                                     j("distill-off"), "--out", j("distill-on"), "--steps", str(n), "--batch-size",
                                     str(k), "--samples", str(max(64, n * k)), "--lr", "1e-4", *gen, *tasks, *quiet],
                      j("distill-on", "latest")))
    rl("student-rl", j("distill-off"), s["student_rl"])

    # evaluation: every post-training stage on the same held-out problems; budget curves for the final models
    for name in ("coldstart", "rl", "fusion"):
        evaluate(name, j(name))
    evaluate("general", j("general"), "0,16,32,64,128,inf")
    for name in ("distill-off", "student-rl"):
        evaluate(name, j(name))
    evaluate("distill-on", j("distill-on"), "0,16,32,64,128,inf")
    return steps


def run(out: str, scale: str = "cpu", launcher: str | None = None, report_only: bool = False) -> str:
    """Run (or finish) a speedrun in `out`; returns the report's path."""
    from . import report
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; known: {', '.join(SCALES)}")
    os.makedirs(out, exist_ok=True)
    s = SCALES[scale]
    steps = recipe(out, s, shlex.split(launcher) if launcher else [])
    timings_file = os.path.join(out, "timings.json")
    timings = json.load(open(timings_file)) if os.path.exists(timings_file) else {}
    started, before = time.time(), sum(timings.values())  # stage time of earlier invocations
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for i, step in enumerate(steps if not report_only else []):
        elapsed = _duration(before + time.time() - started)
        if os.path.exists(step.done):
            print(f"[{i + 1}/{len(steps)}] {step.name}: done already ({step.done})")
            continue
        command = [*(step.launcher or [sys.executable]), "-m", "nanoqwen", *step.argv]
        print(f"\n[{i + 1}/{len(steps)}] {step.name}  (speedrun time so far {elapsed})\n$ nanoqwen "
              f"{shlex.join(step.argv)}", flush=True)
        t0 = time.time()
        result = subprocess.run(command, env=env)
        if result.returncode != 0:
            raise SystemExit(f"speedrun: stage {step.name} failed (exit {result.returncode}); fix it and run the "
                             f"same command again: finished stages are skipped")
        timings[step.name] = time.time() - t0
        atomic_write(timings_file, json.dumps(timings, indent=1))
    print(f"\n[report] base-model checks and the report card (speedrun time so far "
          f"{_duration(sum(timings.values()))})", flush=True)
    return report.write_report(out, scale, s, timings)


def _duration(seconds: float) -> str:
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
