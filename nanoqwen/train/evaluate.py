"""`nanoqwen eval`: held-out accuracy (pass@1, pass@k) in thinking and non-thinking modes, ThinkFollow, mean
thinking length and the thinking-budget curve, as a table, OUT/eval.json and OUT/budget.png.

ThinkFollow: on prompts whose latest soft switch is /think or /no_think (single turn, or a dialogue whose flag
switched), how often the output obeys it: /think gives a non-empty think block, /no_think the empty block.
All generation goes through the engine; answers are checked by the task verifiers (test split: never trained on).
eval.json keeps each problem's pass rate per mode and a fingerprint of the problems, so two evaluations on the
same problems compare by a paired test (report._compare).
"""
from __future__ import annotations

import hashlib
import json
import os
import random

from ..atomic import atomic_write
from ..engine import generate_batch, load
from ..tasks import ANSWER_PREFIX, answer_line, sample_examples
from . import rewards
from ..checkpoint import resolve
from .posttrain import task_record

BUDGETS = (0, 16, 32, 64, 128, None)  # None: unlimited


# ----------------------------------------------------------------------------------------------------------------
# Base models (pre-training): raw completions, no chat template

def completion_accuracy(model_path: str, n: int = 64, seed: int = 0, max_new_tokens: int = 192, device=None,
                        **task_filter) -> dict:
    """Greedy completions of "QUESTION\n\nSolution:\n" (the pre-training document format) on held-out problems,
    verified up to the first answer line: {"accuracy": ..., "per_task": {family: accuracy}}."""
    from ..tasks import TASKS, SOLUTION
    model, tokenizer = load(resolve(model_path), device=device)
    examples = sample_examples(n, "test", seed, **task_filter)
    prompts = [f"{ex.question}\n\n{SOLUTION[ex.language]}\n" for ex in examples]
    results = generate_batch(model, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=0.0,
                             progress="completions")
    per_task: dict[str, list[bool]] = {}
    for ex, res in zip(examples, results):
        text = res.text.split("<|endoftext|>")[0]
        start = text.find(ANSWER_PREFIX[ex.language])  # judge up to the end of the first answer line
        end = text.find("\n", start) if start >= 0 else -1
        per_task.setdefault(ex.task, []).append(bool(TASKS[ex.task].verify(text if end < 0 else text[:end], ex)))
    hits = [h for v in per_task.values() for h in v]
    return dict(accuracy=sum(hits) / max(1, len(hits)), n=len(hits),
                per_task={task: sum(v) / len(v) for task, v in sorted(per_task.items())})


def passkey_accuracy(model_path: str, seq_len: int, n: int = 16, seed: int = 7, device=None) -> dict:
    """Greedy answers to passkey prompts of about seq_len tokens: exact 5-digit keys and correct digits (chance 10%)."""
    from .. import data
    model, tokenizer = load(resolve(model_path), device=device)
    rng, filler = random.Random(seed), len(tokenizer.encode(data.PASSKEY_FILLER))
    items = [data.passkey_prompt(rng, max(1, (seq_len - 80) // filler)) for _ in range(n)]
    results = generate_batch(model, tokenizer, [prompt for prompt, _ in items], max_new_tokens=7, temperature=0.0)
    answers = [r.text.strip()[:5] for r in results]
    return dict(seq_len=seq_len, exact=sum(a == key for a, (_, key) in zip(answers, items)) / n,
                digits=sum(x == y for a, (_, key) in zip(answers, items) for x, y in zip(a, key)) / (5 * n))


def loss_at_lengths(model_path: str, data_dir: str, lengths, rows: int = 4) -> dict:
    """Mean loss over the same held-out tokens (token shards at data_dir) cut into windows of each length; attention
    and positions restart at document boundaries, as in training (whole documents per row, as stage 3 packs them)."""
    import numpy as np
    import torch
    from .. import data
    from ..checkpoint import load_model
    model = load_model(resolve(model_path), dtype=torch.float32).eval()
    loader = data.PackedLoader(data_dir, 1, max(lengths), seed=0, whole_documents=True)
    batches = [loader.next_batch() for _ in range(rows)]

    def loss(b, n):
        ids, labels, docs = (b[k].reshape(-1, n) for k in ("input_ids", "labels", "document_ids"))
        return model(ids, labels=labels, document_ids=docs).loss.item()
    with torch.no_grad():
        return {int(n): float(np.mean([loss(b, n) for b in batches])) for n in lengths}


def pass_at_k(hits: list[list[float]], k: int) -> float:
    """Fraction of prompts with at least one verified answer among their first k samples."""
    return sum(any(h[:k]) for h in hits) / max(1, len(hits))


def accuracy(model, tokenizer, records, enable_thinking, samples=1, thinking_budget=None, max_new_tokens=256, seed=0):
    """Per-record verified hits and the mean reasoning length."""
    prompts = [r["messages"] for r in records for _ in range(samples)]
    results = generate_batch(model, tokenizer, prompts, max_new_tokens=max_new_tokens, seed=seed,
                             enable_thinking=enable_thinking, thinking_budget=thinking_budget,
                             progress=("thinking" if enable_thinking else "non-thinking")
                             + ("" if thinking_budget is None else f", budget {thinking_budget}"))
    hits = [rewards.verifier_reward(res.text, records[i // samples]) for i, res in enumerate(results)]
    thinking = sum(res.reasoning_tokens for res in results) / max(1, len(results))
    return [hits[i * samples:(i + 1) * samples] for i in range(len(records))], thinking


def think_follow_prompts(examples, seed: int = 0) -> list[tuple[list[dict], bool]]:
    """(messages, wants thinking): single-turn flags, and two-turn dialogues where the second flag switches."""
    rng, cases = random.Random(seed), []
    for i, ex in enumerate(examples):
        flag = rng.choice(["/think", "/no_think"])
        if i % 2 == 0:
            cases.append(([{"role": "user", "content": f"{ex.question} {flag}"}], flag == "/think"))
            continue
        other = examples[(i + 1) % len(examples)]
        first = "/no_think" if flag == "/think" else "/think"
        messages = [{"role": "user", "content": f"{other.question} {first}"},
                    {"role": "assistant", "content": answer_line(other.answer, other.language)},
                    {"role": "user", "content": ex.question if rng.random() < 0.3 and flag == first else
                     f"{ex.question} {flag}"}]
        cases.append((messages, rewards.latest_flag(messages)))
    return cases


def evaluate(model_path: str, n: int = 64, k: int = 4, seed: int = 0, budgets=BUDGETS, max_new_tokens: int = 256,
             out_dir: str | None = None, device=None, **task_filter) -> dict:
    path = resolve(model_path)
    model, tokenizer = load(path, device=device)
    examples = sample_examples(n, "test", seed, **task_filter)
    records = [task_record(ex) for ex in examples]
    # the problems' fingerprint: per-problem rates of two evaluations pair up (report._compare) when it matches
    problems = hashlib.sha1("\n".join(ex.question for ex in examples).encode()).hexdigest()[:16]
    report = dict(model=path, n=n, k=k, problems=problems)
    for name, mode in (("thinking", True), ("non_thinking", False)):
        hits, length = accuracy(model, tokenizer, records, mode, k, max_new_tokens=max_new_tokens, seed=seed)
        report[name] = dict(pass_at_1=sum(map(sum, hits)) / (k * n), pass_at_k=pass_at_k(hits, k),
                            mean_thinking_tokens=length, per_problem=[sum(h) / k for h in hits])
    cases = think_follow_prompts(examples, seed)
    results = generate_batch(model, tokenizer, [m for m, _ in cases], max_new_tokens=max_new_tokens, seed=seed,
                             progress="ThinkFollow")
    follow = [rewards.think_follow_reward(r.text, want) for r, (_, want) in zip(results, cases)]
    no_think = [f for f, (_, want) in zip(follow, cases) if not want]
    report["think_follow"] = sum(follow) / len(follow)
    report["no_think_empty_block"] = sum(no_think) / max(1, len(no_think))
    report["budget_curve"] = []
    for budget in budgets:
        hits, length = accuracy(model, tokenizer, records, True, 1, budget, max_new_tokens, seed)
        report["budget_curve"].append(dict(budget=budget, accuracy=sum(h[0] for h in hits) / n,
                                           mean_thinking_tokens=length))
    print(format_table(report))
    if out_dir:
        atomic_write(os.path.join(out_dir, "eval.json"), json.dumps(report, indent=2))
        if report["budget_curve"]:
            plot_budget(report, os.path.join(out_dir, "budget.png"))
    return report


def format_table(r: dict) -> str:
    lines = [f"{r['model']}  ({r['n']} held-out problems, k={r['k']})",
             f"{'mode':14s} {'pass@1':>8s} {'pass@' + str(r['k']):>8s} {'think tok':>10s}"]
    for mode in ("thinking", "non_thinking"):
        m = r[mode]
        lines.append(f"{mode:14s} {m['pass_at_1']:8.3f} {m['pass_at_k']:8.3f} {m['mean_thinking_tokens']:10.1f}")
    lines.append(f"ThinkFollow {r['think_follow']:.3f}   /no_think -> empty think block {r['no_think_empty_block']:.3f}")
    lines.append("budget   " + " ".join(f"{'inf' if b['budget'] is None else b['budget']:>6}" for b in r["budget_curve"]))
    lines.append("accuracy " + " ".join(f"{b['accuracy']:6.3f}" for b in r["budget_curve"]))
    return "\n".join(lines)


def plot_budget(r: dict, png: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    curve = r["budget_curve"]
    labels = ["inf" if b["budget"] is None else str(b["budget"]) for b in curve]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(len(curve)), [b["accuracy"] for b in curve], "o-")
    ax.set_xticks(range(len(curve)), labels)
    ax.set_xlabel("thinking budget (tokens)"), ax.set_ylabel("held-out accuracy"), ax.grid(alpha=0.3)
    ax.set_title(os.path.basename(os.path.dirname(r["model"])) or r["model"])
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
