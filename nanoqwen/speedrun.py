"""`nanoqwen speedrun`: the whole Qwen3 recipe in one command on the embedded default data, sized to a time budget,
with a report card.

    teacher: tokenizer -> pre-training S1 -> S2 -> S3 -> long-CoT cold start -> reasoning RL -> thinking-mode fusion
             -> reward model -> general RL
    student: pre-training S1 -> S2 -> off-policy distillation -> on-policy distillation, and beside it RL from the same
             off-policy start at the same compute (the report's Table 21)
    checks:  base models after S1 and S2, long context before and after S3, every post-training stage on the same
             held-out problems -> OUT/report.md and its PNG plots

`--minutes N` is the budget of the stages (setup excluded). A short calibration measures this machine, the models
follow from the budget, and each stage gets its share (budget.SHARES) as steps, samples and rollouts, sized just
before it runs from the time still left (budget.py). A scale sets the recipe around the budget: `cpu` (the default
without a GPU: 30 minutes on 2 cores, a four-family task slice), `gpu` (the default with one: 10 minutes, every family
at difficulty 1-3 in three languages, compiled bf16 pre-training, a dense vs MoE comparison) and `tiny` (the
plumbing test: every stage at its smallest).

Stages run in this process, one after the other, each printed as the `nanoqwen ...` command that reproduces it.
OUT/manifest.json records the scale, budget and seed, the calibration, and every stage (kind, folder, size,
predicted and measured time, time to its first step, tokens, FLOPs); a rerun skips the finished stages and redoes
the one a kill interrupted, and a rerun with another scale, budget or seed in the same folder stops. `--launcher
"torchrun --nproc-per-node 8"` runs the pre-training stages on N ranks, each in a subprocess.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import Callable

from . import budget
from .budget import Work


@dataclass(frozen=True)
class Scale:
    minutes: float           # the default budget
    teachers: tuple          # candidate teachers, smallest first: the budget picks one
    vocab: int               # the BBPE tokenizer trained in stage 1
    tasks: str | None        # the task slice (None: every family / language)
    difficulty: str
    languages: str | None
    batch: int               # pre-training rows per step (stage 3: an eighth of them, 8x longer)
    rollouts: tuple          # RL: (prompts per step, answers per prompt)
    eval_k: int              # samples per held-out problem
    min_eval: int            # fewest held-out problems
    max_new_tokens: int
    moe: bool                # dense vs MoE at equal active parameters (stage 1)
    compile: bool            # compiled pre-training steps
    sweep: str = ""          # the S3 model's context sweep: multiples of its trained length (docs/long_context.md)
    smallest: dict = field(default_factory=dict)  # stage: its smallest size, where the recipe's default is too small


SCALES = {
    "tiny": Scale(minutes=3, teachers=("nano-d2",), vocab=512, tasks="arithmetic,units", difficulty="1-2",
                  languages="en", batch=8, rollouts=(4, 4), eval_k=1, min_eval=16, max_new_tokens=160, moe=True,
                  compile=False, sweep="1,2", smallest={"teacher-s1": 30, "teacher-s3": 15, "student-s1": 20,
                                           "coldstart": 60}),  # enough for the teacher to learn to end its turns
    "cpu": Scale(minutes=30, teachers=("nano-d2", "nano-d4", "nano-d6"), vocab=1024,
                 tasks="lists,logic,units,word_problems", difficulty="1-2", languages="en", batch=8, rollouts=(8, 8),
                 eval_k=2, min_eval=64, max_new_tokens=192, moe=False, compile=False),
    "gpu": Scale(minutes=10, teachers=("nano-d6", "nano-d8", "nano-d12"), vocab=4096, tasks=None, difficulty="1-3",
                 languages=None, batch=64, rollouts=(32, 8), eval_k=4, min_eval=128, max_new_tokens=512, moe=True,
                 compile=True, sweep="1,2,4,8"),
}
BUDGETS = "0,16,32,64,128,inf"  # the thinking-budget curves of the final teacher and student
CHAT_EVALS = ("coldstart", "rl", "fusion", "general", "distill-off", "student-rl", "distill-on")


@dataclass
class Stage:
    name: str
    kind: str                # its command: pretrain, sft, rl, rm, distill or eval
    folder: str              # its output folder under OUT
    build: Callable          # size -> its options object
    unit: Work               # what one unit of its size (a step, a held-out problem) costs
    group: str               # the budget.SHARES row it draws from; the stages of a group share one size
    minimum: int = 1


def recipe(out: str, s: Scale, models: dict, seed: int) -> list[Stage]:
    """The ordered stages of one speedrun. models: the presets of the teacher, the student (and the MoE)."""
    r = _Recipe(out, s, models, seed)
    r.teacher()
    r.student()
    r.evaluations()
    return r.stages


class _Recipe:
    """Builds the stage list. Each stage's Work per unit of size is written beside its options, from the assumed
    mean lengths below (the sizing corrects for them as the run goes)."""

    def __init__(self, out: str, s: Scale, models: dict, seed: int):
        from .train.pretrain import stage_seq_len
        self.out, self.s, self.models, self.stages = out, s, models, []
        self.tasks = dict(tasks=s.tasks, difficulty=s.difficulty, languages=s.languages)
        self.quiet = dict(progress=False, log_every=10, seed=seed)
        self.length = s.max_new_tokens
        self.think, self.direct, self.prompt = 0.5 * self.length, 0.15 * self.length, 60  # assumed mean tokens
        self.chat = self.prompt + self.think + 20  # a conversation with a thinking answer
        self.seq, self.long_seq = stage_seq_len(1, models["teacher"]), stage_seq_len(3, models["teacher"])

    def j(self, *parts) -> str:
        return os.path.join(self.out, *parts)

    def add(self, name, kind, folder, build, unit, group=None, minimum=1):
        self.stages.append(Stage(name, kind, folder, build, unit, group or name, self.s.smallest.get(name, minimum)))

    def pretrain(self, role: str, stage: int, group: str | None = None):
        from .train.pretrain import PretrainOptions
        s = self.s
        rows, length = (s.batch, self.seq) if stage < 3 else (max(1, s.batch // 8), self.long_seq)
        unit = Work(role, train=rows * length) if stage < 3 else Work(role, long=rows * length)
        self.add(f"{role}-s{stage}", "pretrain", f"{role}/stage{stage}", lambda n: PretrainOptions(
            stage=stage, preset=self.models[role], out=self.j(role), steps=n, batch_size=rows, vocab_size=s.vocab,
            compile=s.compile, **self.tasks, **self.quiet), unit, group, minimum=10)

    def completion_eval(self, role: str, stage: int):
        from .train.evaluate import EvalOptions
        name = f"{role}-s{stage}"
        self.add(f"eval-{name}", "eval", f"eval/{name}", lambda n: EvalOptions(
            model=self.j(role, f"stage{stage}"), out=self.j("eval", name), suite="completion", samples=n,
            max_new_tokens=self.length, seed=self.quiet["seed"], **self.tasks), Work(role, generate=self.length),
            "eval-base", minimum=self.s.min_eval // 2)

    def long_eval(self, stage: int):
        """Long context with the weights of `stage`: loss at 1x and 4x the S1 length, passkey at 4x; after S3, where
        the scale asks for it, the context sweep: passkey and loss at multiples of the S3 length with no extension,
        YaRN, DCA and DCA+YaRN."""
        from .train.evaluate import EvalOptions
        seq, multiples = self.seq, [int(m) for m in self.s.sweep.split(",") if m] if stage == 3 else []
        sweep = dict(extensions="all", multiples=self.s.sweep, trained_length=self.long_seq, passkeys=4) \
            if multiples else {}
        swept = 4 * sum(multiples) * self.long_seq * (2 + 4)  # 4 extensions x (2 loss windows + 4 passkeys)
        self.add(f"eval-long-s{stage}", "eval", f"eval/long-s{stage}", lambda n: EvalOptions(
            model=self.j("teacher", f"stage{stage}"), out=self.j("eval", f"long-s{stage}"), suite="long-context",
            lengths=f"{seq},{4 * seq}", passkey_length=4 * seq, data=self.j("teacher", "stage3", "data", "test"),
            seed=self.quiet["seed"], **sweep), Work("teacher", score=4 * 5 * seq + 16 * 4 * seq + swept,
                                                     generate=16 * 7), "eval-long")

    def rl(self, name: str, role: str, model: str, stage: str, **extra):
        """GRPO at Qwen's thinking temperature; reasoning RL keeps the learnable queries (solved in 1-3 of 4)."""
        from .train.grpo import RLOptions
        prompts, group = self.s.rollouts
        answer = self.prompt + self.think
        learnable = 16 * prompts * self.think if stage == "reasoning" else 0  # 4 candidates per prompt, 4 samples
        unit = Work(role, generate=prompts * group * self.think + learnable, train=2 * prompts * group * answer,
                    score=prompts * group * answer)
        self.add(name, "rl", name, lambda n: RLOptions(
            stage=stage, model=model, out=self.j(name), steps=n, prompts_per_step=prompts, group_size=group,
            samples=max(64, 4 * n * prompts), temperature=0.6, micro_batch=min(32, prompts * group),
            max_new_tokens=self.length, learnable=4 if stage == "reasoning" else 0,
            **{k: v() for k, v in extra.items()}, **self.tasks, **self.quiet), unit, minimum=2)

    def teacher(self):
        """Pre-training (and the MoE beside stage 1), base-model checks, the four post-training stages."""
        from .train.reward_model import RMOptions
        from .train.sft import SFTOptions
        j, s, chat, think = self.j, self.s, self.chat, self.think
        self.pretrain("teacher", 1)
        self.completion_eval("teacher", 1)
        if s.moe:
            self.pretrain("moe", 1, group="teacher-s1")  # the same steps on the same data
            self.completion_eval("moe", 1)
        for stage in (2, 3):
            self.pretrain("teacher", stage)
        self.completion_eval("teacher", 2)
        self.long_eval(2), self.long_eval(3)
        self.add("coldstart", "sft", "coldstart", lambda n: SFTOptions(
            stage="coldstart", model=j("teacher", "stage3"), out=j("coldstart"), samples=13 * n, steps=n,
            batch_size=16, lr=3e-3 if s.vocab < 1024 else 1e-3, **self.tasks, **self.quiet),
            Work("teacher", generate=13 * 32, train=16 * chat), minimum=10)
        self.rl("rl", "teacher", j("coldstart"), "reasoning")
        self.add("fusion", "sft", "fusion", lambda n: SFTOptions(
            stage="fusion", model=j("rl"), out=j("fusion"), samples=4 * n, steps=n, batch_size=16, lr=5e-4,
            **self.tasks, **self.quiet), Work("teacher", generate=16 * think, train=16 * chat), minimum=10)
        self.add("rm", "rm", "rm", lambda n: RMOptions(
            model=j("fusion"), out=j("rm"), samples=3 * n, steps=n, batch_size=8, lr=3e-4, **self.tasks,
            **self.quiet), Work("teacher", generate=12 * think, train=16 * chat), minimum=5)
        self.rl("general", "teacher", j("fusion"), "general", judge=lambda: j("fusion"), rm=lambda: j("rm"))

    def student(self):
        """Pre-training, distillation from the final teacher, and RL from the same start at equal compute."""
        from .train.distill import DistillOptions
        j, chat, answer = self.j, self.chat, (self.think + self.direct) / 2
        for stage in (1, 2):
            self.pretrain("student", stage)
            self.completion_eval("student", stage)
        self.add("distill-off", "distill", "distill-off", lambda n: DistillOptions(
            mode="off", teacher=j("general"), student=j("student", "stage2"), out=j("distill-off"), samples=2 * n,
            steps=n, batch_size=16, lr=1e-3, max_new_tokens=self.length, **self.tasks, **self.quiet),
            Work("student", train=16 * chat, other="teacher", other_generate=4 * answer), minimum=10)
        self.add("distill-on", "distill", "distill-on", lambda n: DistillOptions(
            mode="on", teacher=j("general"), student=j("distill-off"), out=j("distill-on"), steps=n, batch_size=16,
            samples=max(64, 16 * n), lr=1e-4, max_new_tokens=self.length, **self.tasks, **self.quiet),
            Work("student", generate=16 * answer, train=16 * chat, other="teacher", other_score=16 * chat),
            minimum=4)
        self.rl("student-rl", "student", j("distill-off"), "reasoning",
                max_flops=lambda: _flops(j("distill-on")))  # stops at on-policy distillation's compute

    def evaluations(self):
        """Every post-training stage on the same held-out problems; budget curves for the final teacher and
        student."""
        from .train.evaluate import EvalOptions
        s, think, direct = self.s, self.think, self.direct
        for name in CHAT_EVALS:
            role = "teacher" if name in ("coldstart", "rl", "fusion", "general") else "student"
            curve = name in ("general", "distill-on")
            answers = s.eval_k * (think + direct) + (think + direct) / 2 + (6 * think if curve else 0)
            self.add(f"eval-{name}", "eval", f"eval/{name}", lambda n, name=name, curve=curve: EvalOptions(
                model=self.j(name), out=self.j("eval", name), samples=n, k=s.eval_k,
                budgets=BUDGETS if curve else "none", max_new_tokens=self.length, seed=self.quiet["seed"],
                **self.tasks), Work(role, generate=answers), "eval", minimum=s.min_eval)


def _flops(folder: str) -> float | None:
    path = os.path.join(folder, "compute.json")
    return json.load(open(path))["flops"] if os.path.exists(path) else None


# ----------------------------------------------------------------------------------------------------------------
# The run: manifest, calibration, sizing, stages

class Manifest:
    """OUT/manifest.json: the run's settings, calibration and stages, rewritten atomically after every change."""

    def __init__(self, out: str, settings: dict):
        self.path = os.path.join(out, "manifest.json")
        self.data = json.load(open(self.path)) if os.path.exists(self.path) else dict(settings, sizes={}, stages={})
        for key in ("scale", "minutes", "seed"):
            if self.data.get(key) != settings[key]:
                raise SystemExit(f"speedrun: {out} holds a run with {key} {self.data.get(key)!r}, not "
                                 f"{settings[key]!r}; use another --out (each scale defaults to its own folder) or "
                                 f"remove {out}")

    def save(self) -> None:
        from .atomic import atomic_write
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        atomic_write(self.path, (json.dumps(self.data, indent=1) + "\n").encode())

    def stage(self, name: str) -> dict:
        return self.data["stages"].setdefault(name, {})

    def spent(self) -> float:
        return self.data.get("calibration", {}).get("seconds", 0.0) + sum(
            r.get("seconds", 0.0) for r in self.data["stages"].values() if r.get("done"))


def default_scale() -> str:
    import torch
    return "gpu" if torch.cuda.is_available() else "cpu"


def run(out: str | None = None, scale: str | None = None, minutes: float | None = None, seed: int = 0,
        launcher: str | None = None, report_only: bool = False, compare: str | None = None) -> str:
    """Run (or finish) a speedrun; returns the report card's path. compare: another run folder of the same recipe
    (another seed) whose findings the card sets beside this run's."""
    from . import report
    scale = scale or default_scale()
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; known: {', '.join(SCALES)}")
    s = SCALES[scale]
    minutes = float(minutes or s.minutes)
    if minutes <= 0:
        raise ValueError(f"--minutes must be positive, got {minutes}")
    out = out or os.path.join("runs", "out", f"speedrun-{scale}")
    if report_only:
        return report.write_report(out, compare)
    manifest = Manifest(out, dict(scale=scale, minutes=minutes, seed=seed, settings=asdict(s)))
    _calibrate(manifest, s, minutes)
    stages = recipe(out, s, manifest.data["models"], seed)
    for i in range(len(stages)):
        _run_stage(out, manifest, stages, i, minutes * 60, shlex.split(launcher) if launcher else [])
    spent = manifest.spent()
    print(f"\n[speedrun] stages and calibration took {spent / 60:.1f} min of the {minutes:g}-minute budget "
          f"({100 * spent / (60 * minutes):.0f}%)", flush=True)
    return report.write_report(out, compare)


def _calibrate(manifest: Manifest, s: Scale, minutes: float) -> None:
    """Measure the candidate teachers, choose the models for the budget, then measure the ones still unmeasured."""
    import torch
    from .train.pretrain import stage_seq_len
    if "models" in manifest.data:
        return
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"[calibration] training and generation speed of {', '.join(s.teachers)} on this machine ({device})",
          flush=True)
    started, speeds = time.time(), {}

    def measure(preset):
        if preset not in speeds:
            speeds[preset] = budget.calibrate(preset, s.vocab, s.batch, stage_seq_len(1, preset),
                                              stage_seq_len(3, preset), s.rollouts[0] * s.rollouts[1], device)
            v = speeds[preset]
            print(f"  {preset:12s} train {v.train:10,.0f} tok/s   long rows {v.long:10,.0f} tok/s   generate "
                  f"{v.generate:8,.0f} tok/s", flush=True)
        return speeds[preset]

    s1_seconds = budget.SHARES["teacher-s1"] / sum(_weights(s).values()) * minutes * 60
    for preset in s.teachers:  # smallest first; a bigger one cannot afford what a smaller one cannot
        if not budget.affords(preset, s1_seconds, measure(preset)):
            break
    teacher, student = budget.choose_models([p for p in s.teachers if p in speeds], s1_seconds, speeds)
    models = dict(teacher=teacher, student=student) | (dict(moe=teacher.replace("nano-d", "nano-moe-d")) if s.moe
                                                         else {})
    for preset in models.values():
        measure(preset)
    manifest.data.update(models=models, device=torch.cuda.get_device_name() if device == "cuda" else "cpu",
                         calibration=dict(seconds=time.time() - started, speeds=budget.speeds_record(
                             {role: speeds[preset] for role, preset in models.items()})))
    manifest.save()
    print(f"[calibration] {time.time() - started:.0f}s; teacher {teacher}, student {student}"
          + (f", MoE {models['moe']}" if s.moe else ""), flush=True)


def _weights(s: Scale) -> dict:
    """SHARES without the rows this scale does not run."""
    return {name: share for name, share in budget.SHARES.items() if s.moe or name != "moe-s1"}


def _size(manifest: Manifest, stages: list[Stage], i: int, budget_seconds: float) -> int:
    """The size of stage i's group: its share of the time left, corrected by how the plan has fared so far."""
    stage, data = stages[i], manifest.data
    if stage.group in data["sizes"]:
        return data["sizes"][stage.group]
    s = SCALES[data["scale"]]
    weights = _weights(s)
    members = [st for st in stages if st.group == stage.group]
    weight = lambda g: weights.get(g, 0.0) + sum(weights.get(st.name, 0.0) for st in stages  # noqa: E731
                                                 if st.group == g and st.name != g)
    ahead = {st.group for st in stages[i:]}
    left = max(0.0, budget_seconds - manifest.spent())
    seconds = left * weight(stage.group) / sum(weight(g) for g in ahead)
    done = [r for r in data["stages"].values() if r.get("done") and r.get("predicted_s")]
    correction = min(3.0, max(0.5, sum(r["seconds"] for r in done) / sum(r["predicted_s"] for r in done))) \
        if done else 1.0
    speeds, device = budget.speeds_from(data["calibration"]["speeds"]), "cuda" if data["device"] != "cpu" else "cpu"
    unit_seconds = sum(st.unit.seconds(speeds) for st in members)  # one unit of the group's size, every member
    size = budget.size_for(seconds, len(members), unit_seconds * correction, device,
                           max(st.minimum for st in members))
    data["sizes"][stage.group] = size
    for st in members:
        manifest.stage(st.name)["predicted_s"] = budget.predicted_seconds(size, st.unit.seconds(speeds), device)
    return size


def _run_stage(out: str, manifest: Manifest, stages: list[Stage], i: int, budget_seconds: float,
               launcher: list[str]) -> None:
    from .train import stage_command
    from .train.options import to_argv
    stage, record = stages[i], manifest.stage(stages[i].name)
    if record.get("done"):
        print(f"[{i + 1}/{len(stages)}] {stage.name}: done already ({record['seconds']:.0f}s)", flush=True)
        return
    size = _size(manifest, stages, i, budget_seconds)
    options = stage.build(size)
    argv = [stage.kind, *to_argv(options)]
    print(f"\n[{i + 1}/{len(stages)}] {stage.name}  (size {size}, planned {record['predicted_s']:.0f}s; "
          f"{manifest.spent() / 60:.1f} of {budget_seconds / 60:g} min spent)\n$ nanoqwen {shlex.join(argv)}",
          flush=True)
    folder = os.path.join(out, stage.folder)
    shutil.rmtree(folder, ignore_errors=True)  # an interrupted stage starts afresh
    record.update(kind=stage.kind, folder=stage.folder, command=shlex.join(["nanoqwen", *argv]), size=size,
                  started=time.time())
    started = time.time()
    try:
        if launcher and stage.kind == "pretrain":  # N ranks: torchrun starts the processes
            result = subprocess.run([*launcher, "-m", "nanoqwen", *argv], env={**os.environ, "PYTHONUNBUFFERED": "1"})
            if result.returncode:
                raise RuntimeError(f"exit status {result.returncode}")
        else:
            stage_command(stage.kind)[0](options)
    except Exception as error:  # noqa: BLE001 - a stage's failure ends the run with the way to resume it
        traceback.print_exc()
        raise SystemExit(f"speedrun: stage {stage.name} failed ({type(error).__name__}: {error}); fix it and run the "
                         f"same command again: finished stages are skipped") from None
    record.update(seconds=time.time() - started, first_step_s=_first_step(folder, started),
                  **_stage_compute(folder, stage.kind), done=True)
    manifest.save()


def _first_step(folder: str, started: float) -> float | None:
    """Seconds from the stage's start to the end of its first optimizer step (its fixed costs and one step)."""
    path = os.path.join(folder, "metrics.jsonl")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        first = json.loads(f.readline() or "{}")
    return first["time"] - started if "time" in first else None


def _stage_compute(folder: str, kind: str) -> dict:
    """Tokens and FLOPs of a finished stage: compute.json for post-training, the step records for pre-training, the
    generated tokens for an evaluation."""
    compute, evaluation = os.path.join(folder, "compute.json"), os.path.join(folder, "eval.json")
    if os.path.exists(compute):
        totals = json.load(open(compute))
        return dict(tokens=totals["tokens"], flops=totals["flops"])
    if os.path.exists(evaluation):
        return dict(tokens=json.load(open(evaluation)).get("generated_tokens", 0))
    metrics = os.path.join(folder, "metrics.jsonl")
    if kind != "pretrain" or not os.path.exists(metrics):
        return {}
    with open(metrics) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return dict(tokens=sum(r.get("tokens", 0) for r in rows), flops=sum(r.get("flops", 0) for r in rows))
