"""The speedrun's report card: OUT/report.md and its PNG plots, from the run folder alone. The stages come from
OUT/manifest.json (their kind, folder, size, time, tokens and FLOPs); every other number is read from what the
stages wrote: metrics.jsonl, rl_metrics.jsonl, compute.json and the evaluation stages' eval/*/eval.json. The report
runs nothing itself.

    nanoqwen speedrun --out OUT --report-only [--compare OTHER]   # (re)write the card; OTHER: the same recipe with
                                                                  # another seed, whose findings are set beside these
"""
from __future__ import annotations

import json
import math
import os
import time

POST_STAGES = ("coldstart", "rl", "fusion", "general")
STUDENT_STAGES = ("distill-off", "distill-on", "student-rl")
LABELS = {"coldstart": "1 cold start", "rl": "2 reasoning RL", "fusion": "3 mode fusion", "general": "4 general RL",
          "distill-off": "off-policy distill", "distill-on": "+ on-policy distill", "student-rl": "+ RL (GRPO)"}
PLOTS = dict(pretraining="pretraining.png", posttraining="posttraining.png", accuracy="accuracy.png",
             budget="budget.png", distill="distill_vs_rl.png", moe="moe.png")
# thresholds the findings are held to, beyond the direction (which always needs two paired standard errors)
TARGETS = {"gpu": dict(teacher_pass=0.80, passkey=0.90, rl_gain=0.05, think_follow=0.98, think_gap=0.15),
           "cpu": dict(teacher_pass=None, passkey=0.90, rl_gain=0.0, think_follow=0.90, think_gap=0.0),
           "tiny": dict(teacher_pass=None, passkey=0.90, rl_gain=0.0, think_follow=0.90, think_gap=0.0)}


def _read_json(path: str):
    return json.load(open(path)) if os.path.exists(path) else None


def _metrics(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class Run:
    """What a speedrun folder holds: its manifest, evaluations and compute, read once."""

    def __init__(self, out: str):
        self.out = out
        self.manifest = _read_json(os.path.join(out, "manifest.json"))
        if self.manifest is None:
            raise FileNotFoundError(f"{out} has no manifest.json: not a speedrun folder")
        self.scale = self.manifest["scale"]
        self.stages = dict(sorted(self.manifest["stages"].items(), key=lambda kv: kv[1].get("started", math.inf)))
        self.evals = {name: r for name in os.listdir(os.path.join(out, "eval")) if os.path.isdir(
            os.path.join(out, "eval", name)) and (r := _read_json(os.path.join(out, "eval", name, "eval.json")))} \
            if os.path.isdir(os.path.join(out, "eval")) else {}
        self.compute = {name: r for name in (*POST_STAGES, "rm", *STUDENT_STAGES)
                        if (r := _read_json(os.path.join(out, name, "compute.json")))}

    def path(self, *parts) -> str:
        return os.path.join(self.out, *parts)

    def accuracy(self, name: str, mode: str = "thinking") -> float | None:
        return self.evals[name][mode]["pass_at_1"] if name in self.evals else None


# ----------------------------------------------------------------------------------------------------------------
# Plots

def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, plt, png: str) -> None:
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def plot_pretraining(run: Run, png: str) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, model in zip(axes, ("teacher", "student")):
        offset = 0
        for stage in (1, 2, 3):
            rows = _metrics(run.path(model, f"stage{stage}", "metrics.jsonl"))
            if not rows:
                continue
            ax.plot([offset + r["step"] for r in rows], [r["loss"] for r in rows], lw=0.8, label=f"S{stage} train")
            val = [r for r in rows if r.get("val_loss") is not None]
            ax.plot([offset + r["step"] for r in val], [r["val_loss"] for r in val], "o", ms=4,
                    label=f"S{stage} held-out")
            offset += rows[-1]["step"]
        ax.set_title(f"{model}: pre-training"), ax.set_xlabel("step"), ax.set_ylabel("loss"), ax.set_yscale("log")
        ax.grid(alpha=0.3), ax.legend(fontsize=7)
    _save(fig, plt, png)


def plot_posttraining(run: Run, png: str) -> None:
    """SFT losses; the mean reward of each RL step (rl_metrics.jsonl) with the on-policy divergence beside it."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for name in ("coldstart", "fusion", "distill-off"):
        rows = _metrics(run.path(name, "metrics.jsonl"))
        axes[0].plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=0.8, label=LABELS[name])
    axes[0].set_title("SFT stages"), axes[0].set_xlabel("step"), axes[0].set_ylabel("loss"), axes[0].legend(fontsize=7)
    for name in ("rl", "general", "student-rl"):
        rows = _metrics(run.path(name, "rl_metrics.jsonl"))
        axes[1].plot([r["rl_step"] for r in rows], [r["reward"] for r in rows], "-o", ms=3, lw=0.8,
                     label=LABELS[name])
    axes[1].set_title("RL stages (mean reward per step)"), axes[1].set_xlabel("RL step / on-policy step")
    axes[1].set_ylabel("reward"), axes[1].legend(fontsize=7, loc="upper left")
    rows = _metrics(run.path("distill-on", "metrics.jsonl"))  # its loss is the mean divergence to the teacher
    if rows:
        twin = axes[1].twinx()
        twin.plot([r["step"] for r in rows], [r["loss"] for r in rows], "k--", lw=0.8, label="on-policy divergence")
        twin.set_ylabel("on-policy divergence (nats/token)"), twin.legend(fontsize=7, loc="lower right")
    for ax in axes:
        ax.grid(alpha=0.3)
    _save(fig, plt, png)


def plot_accuracy(run: Run, png: str) -> None:
    plt = _plt()
    names = [n for n in (*POST_STAGES, *STUDENT_STAGES) if n in run.evals]
    fig, ax = plt.subplots(figsize=(11, 3.8))
    width = 0.27
    for i, (label, get) in enumerate((("thinking pass@1", lambda r: r["thinking"]["pass_at_1"]),
                                      ("non-thinking pass@1", lambda r: r["non_thinking"]["pass_at_1"]),
                                      ("ThinkFollow", lambda r: r["think_follow"]))):
        ax.bar([x + (i - 1) * width for x in range(len(names))], [get(run.evals[n]) for n in names], width,
               label=label)
    ax.set_xticks(range(len(names)), [LABELS[n] for n in names], fontsize=8)
    ax.set_ylim(0, 1), ax.set_ylabel("held-out"), ax.grid(alpha=0.3, axis="y"), ax.legend(fontsize=8)
    ax.axvline(len([n for n in names if n in POST_STAGES]) - 0.5, color="k", lw=0.8)
    ax.set_title("teacher stages | student (distillation vs RL)")
    _save(fig, plt, png)


def plot_budget(run: Run, png: str) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for name, r in run.evals.items():
        curve = r.get("budget_curve") or []
        if curve:
            ax.plot(range(len(curve)), [b["accuracy"] for b in curve], "o-", label=LABELS.get(name, name))
            ax.set_xticks(range(len(curve)), ["inf" if b["budget"] is None else str(b["budget"]) for b in curve])
    ax.set_xlabel("thinking budget (tokens)"), ax.set_ylabel("held-out accuracy"), ax.grid(alpha=0.3)
    ax.legend(fontsize=8), ax.set_title("accuracy vs thinking budget")
    _save(fig, plt, png)


def plot_distill_vs_rl(points: list[tuple[str, float, float]], png: str) -> None:
    """Accuracy against FLOPs; the axis is scaled by hand (no offset text to collide with its label)."""
    plt = _plt()
    exponent = int(math.floor(math.log10(max(f for _, f, _ in points)))) if points else 0
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for name, flops, acc in points:
        ax.plot(flops / 10 ** exponent, acc, "o", ms=8, label=LABELS[name])
        ax.annotate(LABELS[name], (flops / 10 ** exponent, acc), fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel(f"FLOPs of the student's stage (x 1e{exponent}; generation + scoring + training)")
    ax.set_ylabel("thinking pass@1"), ax.grid(alpha=0.3), ax.set_title("student: accuracy per compute")
    _save(fig, plt, png)


def plot_moe(run: Run, png: str) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for name, folder in (("dense", run.path("teacher", "stage1")), ("MoE", run.path("moe", "stage1"))):
        rows = _metrics(os.path.join(folder, "metrics.jsonl"))
        ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=0.8, label=name)
    ax.set_xlabel("step"), ax.set_ylabel("train loss"), ax.set_yscale("log"), ax.grid(alpha=0.3), ax.legend()
    ax.set_title("stage 1: dense vs MoE, equal active parameters")
    _save(fig, plt, png)


# ----------------------------------------------------------------------------------------------------------------
# The card's sections

def _params(run: Run, folder: str) -> tuple[int, int, int] | None:
    """(total, without embeddings, active) parameters of a stage folder's final checkpoint."""
    from .checkpoint import latest_checkpoint
    from .config import Qwen3Config
    checkpoint = latest_checkpoint(run.path(folder))
    if not checkpoint:
        return None
    config = Qwen3Config.from_json(checkpoint)
    total = config.num_parameters()
    return total, total - config.vocab_size * config.hidden_size, config.num_parameters(active_only=True)


def _params_text(p) -> str:
    if p is None:
        return "n/a"
    return f"{p[0]:,} ({p[1]:,} without embeddings" + (f", {p[2]:,} active" if p[2] != p[0] else "") + ")"


def _f(x, digits=3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def header(run: Run) -> list[str]:
    import platform

    import torch
    m = run.manifest
    spent = m.get("calibration", {}).get("seconds", 0) + sum(r.get("seconds", 0) for r in m["stages"].values())
    budget = 60 * m["minutes"]
    models = m.get("models", {})
    teacher, student = _params(run, "general"), _params(run, "distill-on")
    L = [f"# nanoqwen speedrun report card ({run.scale}, {m['minutes']:g}-minute budget, seed {m['seed']})", ""]
    if run.scale == "tiny":
        L += ["**This is the plumbing check** (`--scale tiny`): every stage runs at its smallest on tiny models, so "
              "the numbers below show that the recipe runs end to end and the card is written, not what the recipe "
              "achieves. See the `cpu` and `gpu` cards for that.", ""]
    L += [f"Produced by `nanoqwen speedrun --scale {run.scale} --minutes {m['minutes']:g} --seed {m['seed']}` "
          f"(`SCALE={run.scale} MINUTES={m['minutes']:g} bash runs/speedrun.sh`), written "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Machine: {platform.machine()}, {os.cpu_count()} CPU "
          f"cores, torch {torch.__version__}, device {m.get('device', 'n/a')}. Every number below is read from this "
          f"run's files.", "",
          f"**Time: {spent / 60:.1f} minutes** of stages and calibration for a budget of {m['minutes']:g} minutes "
          f"({100 * spent / budget:.0f}%; setup excluded). Task slice: `{m['settings']['tasks'] or 'all families'}`, "
          f"difficulty {m['settings']['difficulty']}, languages `{m['settings']['languages'] or 'en, zh, fr'}`.", "",
          "| model | preset | parameters |", "|---|---|---|",
          f"| teacher | {models.get('teacher', 'n/a')} | {_params_text(teacher)} |",
          f"| student | {models.get('student', 'n/a')} | {_params_text(student)} |"]
    if teacher and student:
        ratio = teacher[1] / max(1, student[1])
        L += ["", f"The student has {ratio:.1f}x fewer weights than the teacher (without embeddings)." if ratio > 1.05
              else "The student is the teacher's size here: the distillation sections compare methods, not sizes."]
    return L


def stages_table(run: Run) -> list[str]:
    """Each stage's size, planned and measured time, time to its first step, tokens, throughput (and MFU)."""
    from .hardware import device_peak
    peak = device_peak() if run.manifest.get("device", "cpu") != "cpu" else None
    calibration = run.manifest.get("calibration", {})
    L = ["## Stages", "", f"Calibration (measuring this machine before sizing the stages): "
         f"{calibration.get('seconds', 0):.0f} s. Size: steps for training stages, held-out problems for evaluations. "
         "First step: seconds from the stage's start to the end of its first optimizer step (loading, data, "
         "compilation: the fixed cost). Tokens count everything a stage processed (trained, generated, scored).", "",
         "| stage | size | planned s | seconds | first step s | tokens | tokens/s | FLOPs |"
         + (" MFU |" if peak else ""), "|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if peak else "")]
    for name, r in run.stages.items():
        if "seconds" not in r:
            continue
        tokens, flops = r.get("tokens"), r.get("flops")
        L.append(f"| {name} | {r.get('size', '')} | {r.get('predicted_s', 0):.0f} | {r['seconds']:.0f} | "
                 + (f"{r['first_step_s']:.1f}" if r.get("first_step_s") is not None else "") + " | "
                 + (f"{tokens:,} | {tokens / r['seconds']:,.0f}" if tokens else " | ") + " | "
                 + (f"{flops:.3g}" if flops else "") + " |"
                 + (f" {100 * flops / r['seconds'] / peak[1]:.1f}% |" if peak and flops else (" |" if peak else "")))
    total = sum(r.get("seconds", 0) for r in run.stages.values())
    L.append(f"| **total** | | {sum(r.get('predicted_s', 0) for r in run.stages.values()):.0f} | {total:.0f} | | | "
             f"| |" + (" |" if peak else ""))
    return L


def pretraining_section(run: Run) -> list[str]:
    L = ["", "## Pre-training (S1 general, S2 reasoning, S3 long context)", "",
         f"![pre-training losses]({PLOTS['pretraining']})", "",
         "Held-out completion accuracy (greedy, the document format `QUESTION / Solution:`, test split):", "",
         "| model | after S1 | after S2 | per family after S2 |", "|---|---:|---:|---|"]
    for model in ("teacher", "student"):
        a, b = run.evals.get(f"{model}-s1"), run.evals.get(f"{model}-s2")
        if a and b:
            families = ", ".join(f"{t} {v:.2f}" for t, v in b["per_task"].items())
            L.append(f"| {model} | {a['accuracy']:.3f} | {b['accuracy']:.3f} | {families} |")
    before, after = run.evals.get("long-s2"), run.evals.get("long-s3")
    if before and after:
        lengths = list(after["loss"])
        L += ["", f"Long context (S3 raises the sequence length 8x and the RoPE base 10,000 -> 1,000,000 by ABF): "
              f"held-out loss at 1x and 4x the S1 length, passkey retrieval at {after['passkey']['seq_len']} tokens:",
              "", "| weights | " + " | ".join(f"loss at {n}" for n in lengths) + " | passkey exact | digits (chance "
              "0.10) |", "|---|" + "---:|" * (len(lengths) + 2)]
        for label, r in (("S2 (before S3)", before), ("S3", after)):
            L.append(f"| {label} | " + " | ".join(f"{r['loss'][n]:.3f}" for n in lengths) +
                     f" | {r['passkey']['exact']:.2f} | {r['passkey']['digits']:.2f} |")
    return L + context_sweep_section(after)


def context_sweep_section(after: dict | None) -> list[str]:
    """The S3 model past its trained length under each context extension (eval --extensions)."""
    if not after or not after.get("context_sweep"):
        return []
    sweep, trained = after["context_sweep"], after["trained_length"]
    multiples = list(next(iter(sweep.values())))
    L = ["", f"The S3 model past its trained length ({trained} tokens) without training, under each context "
         "extension (docs/long_context.md): passkey retrieval (exact) / held-out loss of the positions up to each "
         "length.", "", f"![context extensions](eval/long-s3/long_context.png)", "",
         "| extension | " + " | ".join(f"{m}x ({int(m) * trained})" for m in multiples) + " |",
         "|---|" + "---:|" * len(multiples)]
    for extension, row in sweep.items():
        L.append(f"| {extension} | " + " | ".join(f"{row[m]['passkey']:.2f} / {row[m]['loss']:.2f}" for m in multiples)
                 + " |")
    return L


def posttraining_section(run: Run) -> list[str]:
    L = ["", "## Post-training the teacher, and the student", "", f"![accuracy per stage]({PLOTS['accuracy']})", "",
         f"![post-training curves]({PLOTS['posttraining']})", "",
         "Held-out problems (test split, the same for every stage); pass@1 over k samples each, Qwen's sampling "
         "defaults per mode:", "",
         "| stage | thinking pass@1 | pass@k | non-thinking pass@1 | ThinkFollow | /no_think -> empty block | "
         "thinking tokens |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name in (*POST_STAGES, *STUDENT_STAGES):
        if name in run.evals:
            r = run.evals[name]
            t, d = r["thinking"], r["non_thinking"]
            L.append(f"| {LABELS[name]} | {t['pass_at_1']:.3f} | {t['pass_at_k']:.3f} | {d['pass_at_1']:.3f} | "
                     f"{r['think_follow']:.3f} | {r['no_think_empty_block']:.3f} | {t['mean_thinking_tokens']:.0f} |")
    curves = {n: r for n, r in run.evals.items() if r.get("budget_curve")}
    if curves:
        first = next(iter(curves.values()))["budget_curve"]
        L += ["", f"![thinking budget]({PLOTS['budget']})", "", "| model | " + " | ".join(
            "inf" if b["budget"] is None else str(b["budget"]) for b in first) + " |", "|---|" + "---:|" * len(first)]
        for name, r in curves.items():
            L.append(f"| {LABELS[name]} | " + " | ".join(f"{b['accuracy']:.3f}" for b in r["budget_curve"]) + " |")
    return L


def distillation_section(run: Run) -> list[str]:
    points = [(n, run.compute[n]["flops"], run.accuracy(n)) for n in STUDENT_STAGES
              if n in run.compute and n in run.evals]
    if not points:
        return []
    plot_distill_vs_rl(points, run.path(PLOTS["distill"]))
    L = ["", "## Strong-to-weak distillation vs RL for the student (Table 21 of the report)", "",
         f"![distillation vs RL]({PLOTS['distill']})", "",
         "On-policy distillation and GRPO both start from the off-policy distilled student; GRPO stops once it has "
         "spent what on-policy distillation spent.", "",
         "| student stage | thinking pass@1 | non-thinking pass@1 | tokens | FLOPs |", "|---|---:|---:|---:|---:|"]
    for n in STUDENT_STAGES:
        if n in run.evals and n in run.compute:
            L.append(f"| {LABELS[n]} | {run.accuracy(n):.3f} | {run.accuracy(n, 'non_thinking'):.3f} | "
                     f"{run.compute[n]['tokens']:,} | {run.compute[n]['flops']:.3g} |")
    return L


def moe_section(run: Run) -> list[str]:
    moe, dense = _metrics(run.path("moe", "stage1", "metrics.jsonl")), \
        _metrics(run.path("teacher", "stage1", "metrics.jsonl"))
    if not (moe and dense):
        return ["", "## Dense vs MoE", "", "Not in this run (the `tiny` and `gpu` scales include it)."]
    plot_moe(run, run.path(PLOTS["moe"]))
    models = run.manifest.get("models", {})
    rows = []
    for label, folder, key in (("dense", "teacher/stage1", "teacher-s1"), ("MoE", "moe/stage1", "moe-s1")):
        val = [r["val_loss"] for r in _metrics(run.path(folder, "metrics.jsonl")) if "val_loss" in r]
        acc = run.evals.get(key, {}).get("accuracy")
        rows.append(f"| {label} {models.get('moe' if label == 'MoE' else 'teacher', '')} | "
                    f"{_params_text(_params(run, folder))} | {_f(val[-1] if val else None)} | {_f(acc)} |")
    return ["", "## Dense vs MoE at equal active parameters (S1, same data and steps)", "",
            f"![dense vs MoE]({PLOTS['moe']})", "",
            "| model | parameters | held-out loss after S1 | completion accuracy after S1 |", "|---|---|---:|---:|",
            *rows]


def write_report(out: str, compare: str | None = None) -> str:
    """Write OUT/report.md and its plots; `compare`: a run of the same recipe with another seed, whose verdicts are
    set beside this run's (a finding that holds in one and not the other is seed-sensitive)."""
    from .atomic import atomic_write
    run = Run(out)
    plot_pretraining(run, run.path(PLOTS["pretraining"]))
    plot_posttraining(run, run.path(PLOTS["posttraining"]))
    plot_accuracy(run, run.path(PLOTS["accuracy"]))
    plot_budget(run, run.path(PLOTS["budget"]))
    L = header(run) + [""] + stages_table(run) + pretraining_section(run) + posttraining_section(run) \
        + distillation_section(run) + moe_section(run)
    L += ["", "## The report's findings, checked on this run", ""] + findings_table(run, Run(compare) if compare
                                                                                     else None)
    path = run.path("report.md")
    atomic_write(path, ("\n".join(L) + "\n").encode())
    return path


# ----------------------------------------------------------------------------------------------------------------
# Findings

def _compare(before: float | None, after: float | None, samples: int, pairs=None) -> str:
    """Whether `after` beats `before` beyond two standard errors. pairs: the per-problem pass rates (before, after)
    on the same held-out problems: the standard error is that of the mean per-problem difference (a paired test;
    problem difficulty cancels). Without them: that of a difference of two independent rates over `samples` answers."""
    if before is None or after is None:
        return "n/a (stage missing)"
    if pairs:
        diffs = [b - a for a, b in zip(*pairs)]
        mean = sum(diffs) / len(diffs)
        noise = 2 * (sum((d - mean) ** 2 for d in diffs) / max(1, len(diffs) - 1) / len(diffs)) ** 0.5
        test = "paired, "
    else:
        p = max(0.05, min(0.95, (before + after) / 2))
        noise = 2 * (2 * p * (1 - p) / max(1, samples)) ** 0.5  # 2 SE of a difference of two such rates
        test = ""
    if abs(after - before) <= noise:
        return f"**within noise** ({test}±{noise:.3f})"
    return f"{_check(after > before)} ({test}±{noise:.3f})"


def _check(ok) -> str:
    return "n/a (stage missing)" if ok is None else ("**reproduced**" if ok else "**not reproduced**")


def _pairs(a: dict | None, b: dict | None, mode_a: str = "thinking", mode_b: str = "thinking"):
    """Per-problem pass rates of two evaluations on the same problems (same fingerprint), or None."""
    if not a or not b or not a.get("problems") or a.get("problems") != b.get("problems"):
        return None
    rates = a[mode_a].get("per_problem"), b[mode_b].get("per_problem")
    return rates if all(rates) and len(rates[0]) == len(rates[1]) else None


def _both(*verdicts: str) -> str:
    """A finding that needs several checks: the first that is not reproduced, else the first."""
    return next((v for v in verdicts if "**reproduced**" not in v), verdicts[0])


def _verdict(text: str) -> str:
    for word in ("not reproduced", "within noise", "reproduced", "n/a"):
        if word in text:
            return word
    return text


def findings(run: Run) -> list[tuple[str, str]]:
    """(claim with this run's numbers, verdict) for each qualitative claim of the Qwen3 report that the run checks;
    differences of pass rates count only beyond two (paired) standard errors, and TARGETS adds the scale's
    thresholds."""
    target, e = TARGETS[run.scale], run.evals
    answers = next((r["n"] * r["k"] for r in e.values() if "k" in r), 1)
    paired = lambda a, b: _pairs(e.get(a), e.get(b))  # noqa: E731
    rows = []
    a, b = e.get("teacher-s1"), e.get("teacher-s2")
    rows.append((f"S2 (reasoning data, fast LR decay) raises held-out task accuracy: {_f(a and a['accuracy'])} -> "
                 f"{_f(b and b['accuracy'])}", _compare(a and a["accuracy"], b and b["accuracy"], a and a["n"] or 0)))
    rows += _long_context_findings(run, target)
    gain = (run.accuracy("rl") or 0) - (run.accuracy("coldstart") or 0)
    rows.append((f"Reasoning RL improves on the cold start (thinking pass@1): {_f(run.accuracy('coldstart'))} -> "
                 f"{_f(run.accuracy('rl'))}" + (f" (target: +{target['rl_gain']})" if target["rl_gain"] else ""),
                 _both(_compare(run.accuracy("coldstart"), run.accuracy("rl"), answers, paired("coldstart", "rl")),
                       _check(gain >= target["rl_gain"] if "rl" in e else None))))
    if "fusion" in e:
        f = e["fusion"]
        rows.append((f"Thinking-mode fusion makes the model follow /think and /no_think: ThinkFollow "
                     f"{_f(e.get('rl', {}).get('think_follow'))} -> {f['think_follow']:.3f} (target "
                     f"{target['think_follow']}; the report: 88.7 after stage 3), /no_think gives the empty block "
                     f"{f['no_think_empty_block']:.3f}",
                     _check(f["think_follow"] >= target["think_follow"] and f["no_think_empty_block"] == 1.0)))
    if "general" in e:
        rows += _teacher_findings(run, target, answers)
    if all(n in e and n in run.compute for n in ("distill-on", "student-rl")):
        d, r = e["distill-on"], e["student-rl"]
        rows.append((f"On-policy distillation beats RL for the small model at equal or less compute: thinking pass@1 "
                     f"{d['thinking']['pass_at_1']:.3f} with {run.compute['distill-on']['flops']:.3g} FLOPs vs "
                     f"{r['thinking']['pass_at_1']:.3f} with {run.compute['student-rl']['flops']:.3g}",
                     _both(_compare(r["thinking"]["pass_at_1"], d["thinking"]["pass_at_1"], answers,
                                    paired("student-rl", "distill-on")),
                           _check(run.compute["distill-on"]["flops"] <= 1.05 * run.compute["student-rl"]["flops"]))))
    return rows


def _long_context_findings(run: Run, target: dict) -> list[tuple[str, str]]:
    before, after = run.evals.get("long-s2"), run.evals.get("long-s3")
    if not (before and after):
        return []
    short, long = list(after["loss"])[0], list(after["loss"])[-1]
    key = after["passkey"]
    return [(f"S3 makes longer context usable: loss at 4x the S1 length {before['loss'][long]:.3f} -> "
             f"{after['loss'][long]:.3f} (at 1x: {after['loss'][short]:.3f})",
             _check(after["loss"][long] <= after["loss"][short] + 0.01)),
            (f"After S3, passkey retrieval at {key['seq_len']} tokens (4x the S1 length): exact "
             f"{before['passkey']['exact']:.2f} -> {key['exact']:.2f} (target {target['passkey']}), digits "
             f"{key['digits']:.2f} (chance 0.10)", _check(key["exact"] >= target["passkey"]))]


def _teacher_findings(run: Run, target: dict, answers: int) -> list[tuple[str, str]]:
    e, g = run.evals, run.evals["general"]
    rows = []
    if target["teacher_pass"]:
        rows.append((f"The final teacher's thinking pass@1: {g['thinking']['pass_at_1']:.3f} (target "
                     f"{target['teacher_pass']})", _check(g["thinking"]["pass_at_1"] >= target["teacher_pass"])))
    fusion = e.get("fusion", g)
    rows.append((f"General RL keeps ThinkFollow: {fusion['think_follow']:.3f} -> {g['think_follow']:.3f}, empty "
                 f"block under /no_think {g['no_think_empty_block']:.3f}",
                 _check(g["think_follow"] >= min(target["think_follow"], fusion["think_follow"] - 0.02))))
    thinking, direct = g["thinking"]["pass_at_1"], g["non_thinking"]["pass_at_1"]
    rows.append((f"Thinking beats non-thinking on reasoning tasks: {thinking:.3f} vs {direct:.3f}"
                 + (f" (target: +{target['think_gap']})" if target["think_gap"] else ""),
                 _both(_compare(direct, thinking, answers, _pairs(g, g, "non_thinking")),
                       _check(thinking - direct >= target["think_gap"]))))
    curve = [b["accuracy"] for b in g.get("budget_curve", [])]
    if curve:
        n = g["n"]
        se = lambda p: (max(p, 0.05) * (1 - min(p, 0.95)) / n) ** 0.5  # noqa: E731
        monotone = all(later >= earlier - se(earlier) for earlier, later in zip(curve, curve[1:]))
        rows.append((f"Accuracy rises with the thinking budget (teacher): " + " -> ".join(f"{a:.3f}" for a in curve)
                     + " (budgets 0 ... unlimited; each step may dip by at most one SE)",
                     _both(_compare(curve[0], curve[-1], n), _check(monotone))))
    return rows


def findings_table(run: Run, other: Run | None) -> list[str]:
    rows = findings(run)
    if other is None:
        return [f"- {claim}: {verdict}" for claim, verdict in rows]
    theirs = {claim.split(":")[0]: verdict for claim, verdict in findings(other)}
    L = [f"Beside each verdict, that of the same recipe with seed {other.manifest['seed']} (`{other.out}`): a finding "
         "that holds in one run and not the other is seed-sensitive.", "",
         f"| finding (this run's numbers) | seed {run.manifest['seed']} | seed {other.manifest['seed']} |",
         "|---|---|---|"]
    for claim, verdict in rows:
        second = theirs.get(claim.split(":")[0], "n/a")
        sensitive = " (seed-sensitive)" if _verdict(second) != _verdict(verdict) else ""
        L.append(f"| {claim} | {verdict} | {second}{sensitive} |")
    return L
