"""The speedrun's report card: OUT/report.md and its PNG plots, from the run folder alone (every number is read from
what the stages wrote: metrics.jsonl, compute.json, eval/*/eval.json, timings.json, and checks of the base models
made here, cached in OUT/eval/base.json).

    python -m nanoqwen report OUT        # (re)write the report of a finished or partial run
"""
from __future__ import annotations

import json
import os
import platform
import time

from .atomic import atomic_write
from .checkpoint import latest_checkpoint

POST_STAGES = ("coldstart", "rl", "fusion", "general")
STUDENT_STAGES = ("distill-off", "distill-on", "student-rl")
LABELS = {"coldstart": "1 cold start", "rl": "2 reasoning RL", "fusion": "3 mode fusion", "general": "4 general RL",
          "distill-off": "off-policy distill", "distill-on": "+ on-policy distill", "student-rl": "+ RL (GRPO)"}


def _read_json(path: str):
    return json.load(open(path)) if os.path.exists(path) else None


def _metrics(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _stage_dir(out: str, name: str) -> str:
    """The folder with metrics.jsonl of a stage name (teacher-s1 -> OUT/teacher/stage1)."""
    if name[-3:-1] == "-s":
        return os.path.join(out, name[:-3], f"stage{name[-1]}")
    return os.path.join(out, name)


# ----------------------------------------------------------------------------------------------------------------
# Checks of the base models (made once, cached)

def base_checks(out: str, s: dict) -> dict:
    """Held-out completion accuracy after S1 and S2 (teacher and student), and the long-context checks of S3: loss
    at 1x and 4x the S1 length and passkey retrieval at the S3 length, before (S2 weights) and after S3."""
    from .tasks import parse_filter
    from .train import evaluate
    from .train.pretrain import stage_seq_len
    path = os.path.join(out, "eval", "base.json")
    cached = _read_json(path) or {}
    task_filter = parse_filter(s["tasks"], s["difficulty"], s["languages"])
    n = max(32, 2 * s["eval"][0])
    for model in ("teacher", "student"):
        for stage in (1, 2):
            key, ckpt = f"{model}-s{stage}", latest_checkpoint(os.path.join(out, model, f"stage{stage}"))
            if key not in cached and ckpt:
                cached[key] = evaluate.completion_accuracy(ckpt, n=n, max_new_tokens=s["max_new_tokens"],
                                                           device="cpu", **task_filter)
    s2, s3 = latest_checkpoint(os.path.join(out, "teacher", "stage2")), latest_checkpoint(os.path.join(out, "teacher", "stage3"))
    if s2 and s3 and "long" not in cached:
        short, long = stage_seq_len(1, s["teacher"]), stage_seq_len(3, s["teacher"])
        data_dir = os.path.join(out, "teacher", "stage3", "data", "test")
        cached["long"] = dict(short=short, long=long, **{
            name: dict(loss=evaluate.loss_at_lengths(ckpt, data_dir, [short, 4 * short]),
                       passkey=evaluate.passkey_accuracy(ckpt, long, device="cpu"))
            for name, ckpt in (("before", s2), ("after", s3))})
    atomic_write(path, json.dumps(cached, indent=1))
    return json.loads(json.dumps(cached))  # keys as the cache has them (strings)


# ----------------------------------------------------------------------------------------------------------------
# Plots

def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_pretraining(out: str, png: str) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, model in zip(axes, ("teacher", "student")):
        offset = 0
        for stage in (1, 2, 3):
            rows = _metrics(os.path.join(out, model, f"stage{stage}", "metrics.jsonl"))
            if not rows:
                continue
            ax.plot([offset + r["step"] for r in rows], [r["loss"] for r in rows], lw=0.8, label=f"S{stage} train")
            val = [r for r in rows if r.get("val_loss") is not None]
            ax.plot([offset + r["step"] for r in val], [r["val_loss"] for r in val], "o", ms=4,
                    label=f"S{stage} held-out")
            offset += rows[-1]["step"]
        ax.set_title(f"{model}: pre-training"), ax.set_xlabel("step"), ax.set_ylabel("loss"), ax.set_yscale("log")
        ax.grid(alpha=0.3), ax.legend(fontsize=7)
    fig.tight_layout(), fig.savefig(png, dpi=100), plt.close(fig)


def plot_posttraining(out: str, png: str) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for name in ("coldstart", "fusion", "distill-off"):
        rows = _metrics(os.path.join(out, name, "metrics.jsonl"))
        axes[0].plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=0.8, label=LABELS[name])
    axes[0].set_title("SFT stages"), axes[0].set_xlabel("step"), axes[0].set_ylabel("loss"), axes[0].legend(fontsize=7)
    for name in ("rl", "general", "student-rl"):
        rows = [r for r in _metrics(os.path.join(out, name, "metrics.jsonl")) if "reward" in r]
        axes[1].plot([r["rl_step"] for r in rows], [r["reward"] for r in rows], "-o", ms=3, lw=0.8,
                     label=LABELS[name])
    rows = [r for r in _metrics(os.path.join(out, "distill-on", "metrics.jsonl")) if "divergence" in r]
    if rows:
        twin = axes[1].twinx()
        twin.plot([r["step"] for r in rows], [r["divergence"] for r in rows], "k--", lw=0.8, label="on-policy KL")
        twin.set_ylabel("on-policy divergence"), twin.legend(fontsize=7, loc="lower right")
    axes[1].set_title("RL stages (mean reward per step)"), axes[1].set_xlabel("RL step"), axes[1].legend(fontsize=7)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout(), fig.savefig(png, dpi=100), plt.close(fig)


def plot_accuracy(evals: dict, png: str) -> None:
    plt = _plt()
    names = [n for n in (*POST_STAGES, *STUDENT_STAGES) if n in evals]
    fig, ax = plt.subplots(figsize=(11, 3.8))
    width = 0.27
    for i, (label, get) in enumerate((("thinking pass@1", lambda r: r["thinking"]["pass_at_1"]),
                                      ("non-thinking pass@1", lambda r: r["non_thinking"]["pass_at_1"]),
                                      ("ThinkFollow", lambda r: r["think_follow"]))):
        ax.bar([x + (i - 1) * width for x in range(len(names))], [get(evals[n]) for n in names], width, label=label)
    ax.set_xticks(range(len(names)), [LABELS[n] for n in names], fontsize=8)
    ax.set_ylim(0, 1), ax.set_ylabel("held-out"), ax.grid(alpha=0.3, axis="y"), ax.legend(fontsize=8)
    ax.axvline(len([n for n in names if n in POST_STAGES]) - 0.5, color="k", lw=0.8)
    ax.set_title("teacher stages | student (distillation vs RL)")
    fig.tight_layout(), fig.savefig(png, dpi=100), plt.close(fig)


def plot_budget(evals: dict, png: str) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for name in evals:
        curve = evals[name].get("budget_curve") or []
        if curve:
            ax.plot(range(len(curve)), [b["accuracy"] for b in curve], "o-", label=LABELS[name])
            ax.set_xticks(range(len(curve)), ["inf" if b["budget"] is None else str(b["budget"]) for b in curve])
    ax.set_xlabel("thinking budget (tokens)"), ax.set_ylabel("held-out accuracy"), ax.grid(alpha=0.3)
    ax.legend(fontsize=8), ax.set_title("accuracy vs thinking budget")
    fig.tight_layout(), fig.savefig(png, dpi=100), plt.close(fig)


def plot_distill_vs_rl(points: list[tuple[str, float, float]], png: str) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for name, flops, acc in points:
        ax.plot(flops, acc, "o", ms=8, label=f"{LABELS[name]}")
        ax.annotate(LABELS[name], (flops, acc), fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel("post-training FLOPs of the student's stage (generation + scoring + training)")
    ax.set_ylabel("thinking pass@1"), ax.grid(alpha=0.3), ax.set_title("student: accuracy per compute")
    fig.tight_layout(), fig.savefig(png, dpi=100), plt.close(fig)


def plot_moe(out: str, png: str) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for name, folder in (("dense", os.path.join(out, "teacher", "stage1")), ("MoE", os.path.join(out, "moe", "stage1"))):
        rows = _metrics(os.path.join(folder, "metrics.jsonl"))
        ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=0.8, label=name)
    ax.set_xlabel("step"), ax.set_ylabel("train loss"), ax.set_yscale("log"), ax.grid(alpha=0.3), ax.legend()
    ax.set_title("stage 1: dense vs MoE, equal active parameters")
    fig.tight_layout(), fig.savefig(png, dpi=100), plt.close(fig)


# ----------------------------------------------------------------------------------------------------------------
# The report

def _params(folder: str | None) -> str:
    if not folder:
        return "n/a"
    from .config import Qwen3Config
    config = Qwen3Config.from_json(os.path.join(folder, "config.json"))
    total, active = config.num_parameters(), config.num_parameters(active_only=True)
    emb = config.vocab_size * config.hidden_size
    return f"{total:,} ({total - emb:,} without embeddings" + (f", {active:,} active" if active != total else "") + ")"


def _pretrain_compute(out: str, name: str, s: dict, rows: list[dict]) -> dict | None:
    """Tokens and FLOPs (the Trainer's flops_per_token at the stage's sequence length) of a pre-training stage."""
    if name[-3:-1] != "-s" or not rows:
        return None
    from .config import Qwen3Config
    from .train.pretrain import stage_seq_len
    from .train.trainer import flops_per_token
    checkpoint = latest_checkpoint(_stage_dir(out, name))
    if not checkpoint:
        return None
    config = Qwen3Config.from_json(os.path.join(checkpoint, "config.json"))
    tokens = sum(r.get("tokens", 0) for r in rows)
    return dict(tokens=tokens, flops=tokens * flops_per_token(config, stage_seq_len(int(name[-1]), s["teacher"])))


def _f(x, digits=3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _check(ok) -> str:
    return "n/a (stage missing)" if ok is None else ("**reproduced**" if ok else "**not reproduced**")


def write_report(out: str, scale: str, s: dict, timings: dict) -> str:
    base = base_checks(out, s)
    evals = {n: r for n in (*POST_STAGES, *STUDENT_STAGES)
             if (r := _read_json(os.path.join(out, "eval", n, "eval.json")))}
    compute = {n: c for n in (*POST_STAGES, "rm", *STUDENT_STAGES)
               if (c := _read_json(os.path.join(out, n, "compute.json")))}
    plots = dict(pretraining="pretraining.png", posttraining="posttraining.png", accuracy="accuracy.png",
                 budget="budget.png", distill="distill_vs_rl.png", moe="moe.png")
    plot_pretraining(out, os.path.join(out, plots["pretraining"]))
    plot_posttraining(out, os.path.join(out, plots["posttraining"]))
    plot_accuracy(evals, os.path.join(out, plots["accuracy"]))
    plot_budget(evals, os.path.join(out, plots["budget"]))
    import torch
    total = sum(timings.values())
    teacher, student = latest_checkpoint(os.path.join(out, "general")), latest_checkpoint(os.path.join(out, "distill-on"))
    L = [f"# nanoqwen speedrun report card ({scale})", "",
         f"Run folder `{out}`, written {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Machine: "
         f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
         f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}. Every number below is read "
         f"from this run's files. Produced by `nanoqwen speedrun --scale {scale} --out {out}` (what `bash runs/speedrun.sh` runs).", "",
         f"Total stage time **{total / 60:.1f} min** (the report's own checks not included). Task slice: "
         f"`{s['tasks'] or 'all'}`, difficulty {s['difficulty']}, languages `{s['languages'] or 'all'}`.", "",
         "| model | preset | parameters |", "|---|---|---|",
         f"| teacher | {s['teacher']} | {_params(teacher)} |", f"| student | {s['student']} | {_params(student)} |", "",
         "## Stages", "", "| stage | minutes | tokens | FLOPs |", "|---|---:|---:|---:|"]
    for name, seconds in timings.items():
        rows = _metrics(os.path.join(_stage_dir(out, name), "metrics.jsonl")) if not name.startswith("eval") else []
        c = compute.get(name) or _pretrain_compute(out, name, s, rows)
        tokens = c["tokens"] if c else sum(r.get("tokens", 0) for r in rows)
        L.append(f"| {name} | {seconds / 60:.2f} | {tokens:,} | " + (f"{c['flops']:.3g}" if c else "") + " |")

    # pre-training
    L += ["", "## Pre-training (S1 general, S2 reasoning, S3 long context)", "",
          f"![pre-training losses]({plots['pretraining']})", "",
          "Held-out completion accuracy (greedy, the document format `QUESTION / Solution:`, test split):", "",
          "| model | after S1 | after S2 | per family after S2 |", "|---|---:|---:|---|"]
    for model in ("teacher", "student"):
        a, b = base.get(f"{model}-s1"), base.get(f"{model}-s2")
        if a and b:
            fam = ", ".join(f"{t} {v:.2f}" for t, v in b["per_task"].items())
            L.append(f"| {model} | {a['accuracy']:.3f} | {b['accuracy']:.3f} | {fam} |")
    long = base.get("long")
    if long:
        sh, lg = long["short"], 4 * long["short"]
        L += ["", f"Long context (S3 raises the sequence length {long['short']} -> {long['long']} and the RoPE base "
              f"10,000 -> 1,000,000 by ABF):", "",
              f"| weights | loss at {sh} | loss at {lg} | passkey at {long['long']}: exact | digits (chance 0.10) |",
              "|---|---:|---:|---:|---:|"]
        for name in ("before", "after"):
            r = long[name]
            L.append(f"| {'S2 (before S3)' if name == 'before' else 'S3'} | {r['loss'][str(sh)]:.3f} | "
                     f"{r['loss'][str(lg)]:.3f} | {r['passkey']['exact']:.2f} | {r['passkey']['digits']:.2f} |")

    # post-training
    L += ["", "## Post-training the teacher, and the student", "", f"![accuracy per stage]({plots['accuracy']})", "",
          f"![post-training curves]({plots['posttraining']})", "",
          "Held-out problems (test split, the same for every stage); pass@1 over k samples each, Qwen's sampling "
          "defaults per mode:", "",
          "| stage | thinking pass@1 | pass@k | non-thinking pass@1 | ThinkFollow | /no_think -> empty block | "
          "thinking tokens |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in evals.items():
        t, d = r["thinking"], r["non_thinking"]
        L.append(f"| {LABELS[name]} | {t['pass_at_1']:.3f} | {t['pass_at_k']:.3f} | {d['pass_at_1']:.3f} | "
                 f"{r['think_follow']:.3f} | {r['no_think_empty_block']:.3f} | {t['mean_thinking_tokens']:.0f} |")
    curves = {n: r for n, r in evals.items() if r.get("budget_curve")}
    if curves:
        L += ["", f"![thinking budget]({plots['budget']})", "", "| model | " + " | ".join(
            "inf" if b["budget"] is None else str(b["budget"]) for b in next(iter(curves.values()))["budget_curve"])
            + " |", "|---|" + "---:|" * len(next(iter(curves.values()))["budget_curve"])]
        for name, r in curves.items():
            L.append(f"| {LABELS[name]} | " + " | ".join(f"{b['accuracy']:.3f}" for b in r["budget_curve"]) + " |")

    # distillation vs RL
    points = [(n, compute[n]["flops"], evals[n]["thinking"]["pass_at_1"]) for n in STUDENT_STAGES
              if n in compute and n in evals]
    if points:
        plot_distill_vs_rl(points, os.path.join(out, plots["distill"]))
        L += ["", "## Strong-to-weak distillation vs RL for the student (Table 21 of the report)", "",
              f"![distillation vs RL]({plots['distill']})", "",
              "On-policy distillation and GRPO both start from the off-policy distilled student.", "",
              "| student stage | thinking pass@1 | non-thinking pass@1 | tokens | FLOPs |", "|---|---:|---:|---:|---:|"]
        for n in STUDENT_STAGES:
            if n in evals and n in compute:
                L.append(f"| {LABELS[n]} | {evals[n]['thinking']['pass_at_1']:.3f} | "
                         f"{evals[n]['non_thinking']['pass_at_1']:.3f} | {compute[n]['tokens']:,} | "
                         f"{compute[n]['flops']:.3g} |")

    # dense vs MoE
    moe = _metrics(os.path.join(out, "moe", "stage1", "metrics.jsonl"))
    dense = _metrics(os.path.join(out, "teacher", "stage1", "metrics.jsonl"))
    if moe and dense:
        plot_moe(out, os.path.join(out, plots["moe"]))
        dv, mv = [r["val_loss"] for r in dense if "val_loss" in r], [r["val_loss"] for r in moe if "val_loss" in r]
        L += ["", "## Dense vs MoE at equal active parameters (S1, same data and steps)", "",
              f"![dense vs MoE]({plots['moe']})", "", "| model | parameters | held-out loss after S1 |", "|---|---|---:|",
              f"| dense {s['teacher']} | {_params(latest_checkpoint(os.path.join(out, 'teacher', 'stage1')))} | {_f(dv[-1])} |",
              f"| MoE {s['teacher'].replace('nano-d', 'nano-moe-d')} | "
              f"{_params(latest_checkpoint(os.path.join(out, 'moe', 'stage1')))} | {_f(mv[-1])} |"]
    else:
        L += ["", "## Dense vs MoE", "", "Not in this run (the `tiny` and `gpu` scales include it)."]

    L += ["", "## The report's findings, checked on this run", ""] + findings(base, evals, compute)
    path = os.path.join(out, "report.md")
    atomic_write(path, "\n".join(L) + "\n")
    return path


def _compare(before: float | None, after: float | None, samples: int, pairs=None) -> str:
    """Whether `after` beats `before` beyond two standard errors. pairs: the per-problem pass rates (before, after)
    on the same held-out problems: the standard error is that of the mean per-problem difference (a paired test;
    problem difficulty cancels). Without them: that of a difference of two independent rates over `samples` answers."""
    if before is None or after is None:
        return _check(None)
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


def _pairs(a: dict | None, b: dict | None, mode_a: str = "thinking", mode_b: str = "thinking"):
    """Per-problem pass rates of two evaluations on the same problems (same fingerprint), or None."""
    if not a or not b or not a.get("problems") or a.get("problems") != b.get("problems"):
        return None
    rates = a[mode_a].get("per_problem"), b[mode_b].get("per_problem")
    return rates if all(rates) and len(rates[0]) == len(rates[1]) else None


def findings(base: dict, evals: dict, compute: dict) -> list[str]:
    """Each qualitative claim of the Qwen3 report with this run's numbers and whether they show it (differences of
    pass rates count only beyond two standard errors)."""
    acc = lambda n, mode="thinking": evals[n][mode]["pass_at_1"] if n in evals else None  # noqa: E731
    answers = next((r["n"] * r["k"] for r in evals.values()), 1)  # answers behind each pass@1
    paired = lambda a, b: _pairs(evals.get(a), evals.get(b))  # noqa: E731
    lines = []
    a, b = base.get("teacher-s1"), base.get("teacher-s2")
    lines.append(f"- S2 (reasoning data, fast LR decay) raises held-out task accuracy: "
                 f"{_f(a and a['accuracy'])} -> {_f(b and b['accuracy'])}: "
                 f"{_compare(a and a['accuracy'], b and b['accuracy'], a and a.get('n', 0) or 0)}")
    long = base.get("long")
    if long:
        sh, lg = str(long["short"]), str(4 * long["short"])
        before, after = long["before"], long["after"]
        lines.append(f"- S3 makes longer context usable: loss at 4x the S1 length {before['loss'][lg]:.3f} -> "
                     f"{after['loss'][lg]:.3f} (at 1x: {after['loss'][sh]:.3f}): "
                     f"{_check(after['loss'][lg] <= after['loss'][sh] + 0.01)}; passkey digits at {long['long']} "
                     f"tokens {before['passkey']['digits']:.2f} -> {after['passkey']['digits']:.2f} (chance 0.10): "
                     f"{_check(after['passkey']['digits'] > 0.2)}")
    lines.append(f"- Reasoning RL improves on the cold start (thinking pass@1): {_f(acc('coldstart'))} -> "
                 f"{_f(acc('rl'))}: {_compare(acc('coldstart'), acc('rl'), answers, paired('coldstart', 'rl'))}")
    if "fusion" in evals:
        f = evals["fusion"]
        lines.append(f"- Thinking-mode fusion makes the model follow /think and /no_think: ThinkFollow "
                     f"{_f(acc('rl') and evals['rl']['think_follow'])} -> {f['think_follow']:.3f} (report: 88.7 after "
                     f"stage 3), /no_think gives the empty block {f['no_think_empty_block']:.3f}: "
                     f"{_check(f['think_follow'] >= 0.9)}")
    if "general" in evals:
        g = evals["general"]
        modes = _pairs(g, g, "non_thinking")  # the same problems in both modes
        lines.append(f"- General RL keeps or raises ThinkFollow: {evals.get('fusion', {}).get('think_follow', 0):.3f} -> "
                     f"{g['think_follow']:.3f}: {_check(g['think_follow'] >= evals.get('fusion', g)['think_follow'] - 0.02)}")
        lines.append(f"- Thinking beats non-thinking on reasoning tasks: {g['thinking']['pass_at_1']:.3f} vs "
                     f"{g['non_thinking']['pass_at_1']:.3f}: "
                     f"{_compare(g['non_thinking']['pass_at_1'], g['thinking']['pass_at_1'], answers, modes)}")
        curve = [b["accuracy"] for b in g.get("budget_curve", [])]
        if curve:
            lines.append(f"- Accuracy rises with the thinking budget (teacher): {curve[0]:.3f} at 0 -> {curve[-1]:.3f} "
                         f"unlimited: {_compare(curve[0], curve[-1], g['n'])}")
    if all(n in evals and n in compute for n in ("distill-on", "student-rl")):
        d, r = evals["distill-on"], evals["student-rl"]
        on_vs_rl = paired("student-rl", "distill-on")
        lines.append(f"- On-policy distillation beats RL for the small model at less or equal compute: thinking pass@1 "
                     f"{d['thinking']['pass_at_1']:.3f} with {compute['distill-on']['flops']:.3g} FLOPs vs "
                     f"{r['thinking']['pass_at_1']:.3f} with {compute['student-rl']['flops']:.3g}: "
                     f"{_compare(r['thinking']['pass_at_1'], d['thinking']['pass_at_1'], answers, on_vs_rl)}")
    if "distill-off" in evals and "general" in evals:
        lines.append(f"- The student after distillation against its teacher (thinking pass@1): "
                     f"{_f(acc('distill-on'))} vs {_f(acc('general'))} (the student has "
                     f"fewer parameters; the report's students stay below their teachers too)")
    return lines
