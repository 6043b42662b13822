"""The four post-training stages of the Qwen3 report: what data each builds and which trainer it runs.

    nanoqwen sft --stage coldstart --model BASE  --out OUT/coldstart   # long-CoT cold start (SFT, thinking traces)
    nanoqwen rl  --stage reasoning --model OUT/coldstart --out OUT/rl  # reasoning RL (GRPO, verifier + format)
    nanoqwen sft --stage fusion    --model OUT/rl --out OUT/fusion     # thinking-mode fusion (/think, /no_think)
    nanoqwen rm  --model OUT/fusion --out OUT/rm                       # reward model on correct-vs-wrong pairs
    nanoqwen rl  --stage general   --model OUT/fusion --out OUT/general --judge DIR --rm OUT/rm  # general RL
    nanoqwen eval --model OUT/general                                  # accuracy, ThinkFollow, budget curve

Without --data / --prompts each stage builds its data from the embedded task generators (train split) and writes it
to OUT as JSONL, so a run can be inspected and repeated on real data by passing files of the same format.
"""
from __future__ import annotations

import json
import random
from collections import Counter

from ..atomic import atomic_write
from ..checkpoint import load
from ..generation.api import generate_batch
from ..tasks import TASKS, answer_line, sample_examples, to_messages
from . import rewards


def task_record(example, flag: str | None = None) -> dict:
    """An RL prompt record: the question (with an optional /think or /no_think), the verifier and its reference."""
    content = example.question + (f" {flag}" if flag else "")
    return dict(messages=[{"role": "user", "content": content}], verifier=example.task, answer=example.answer,
                meta=example.meta, language=example.language, difficulty=example.difficulty)


def write_jsonl(records: list[dict], path: str) -> str:
    atomic_write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path


def is_repetitive(text: str, max_repeats: int = 3) -> bool:
    """A trace that repeats one line max_repeats times or more (the degenerate loops the report filters out)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return bool(lines) and Counter(lines).most_common(1)[0][1] >= max_repeats


def solves(model, tokenizer, records: list[dict], enable_thinking: bool, samples: int = 1, **sampling) -> list[float]:
    """Fraction of `samples` answers per record that verify (the engine, batched)."""
    prompts = [r["messages"] for r in records for _ in range(samples)]
    results = generate_batch(model, tokenizer, prompts, enable_thinking=enable_thinking, progress="queries",
                             **sampling)
    hits = [rewards.verifier_reward(res.text, records[i // samples]) for i, res in enumerate(results)]
    return [sum(hits[i * samples:(i + 1) * samples]) / samples for i in range(len(records))]


def coldstart_data(model_path: str, n: int, seed: int = 0, filter_queries: bool = True, device=None,
                   **task_filter) -> list[dict]:
    """Stage 1: thinking traces from the generators. Keep queries the current model cannot answer without thinking,
    traces whose final answer verifies, and traces without repeated lines."""
    examples = sample_examples(n, "train", seed, **task_filter)
    if filter_queries:
        model, tokenizer = load(model_path, device=device)
        solved = solves(model, tokenizer, [task_record(ex) for ex in examples], enable_thinking=False,
                        max_new_tokens=64, temperature=0.0, seed=seed)
        kept = [ex for ex, s in zip(examples, solved) if s == 0]
        print(f"coldstart: {len(examples) - len(kept)} of {len(examples)} queries answered without thinking: dropped")
        examples = kept
    data = []
    for ex in examples:
        messages = to_messages(ex, thinking=True)
        trace = messages[-1]
        if TASKS[ex.task].verify(trace["content"], ex) and not is_repetitive(trace["reasoning_content"]):
            data.append(dict(messages=messages))
    print(f"coldstart: {len(data)} verified, non-repetitive traces")
    return data


def rl_prompts(n: int, seed: int = 1, **task_filter) -> list[dict]:
    """Stage 2: query-verifier pairs (train split; a different seed from the cold start, so new problems)."""
    return [task_record(ex) for ex in sample_examples(n, "train", seed, **task_filter)]


def learnable(model_path: str, records: list[dict], samples: int = 4, max_new_tokens: int = 256, seed: int = 0,
              device=None, **sampling) -> list[dict]:
    """The report's selection of RL queries: those the current model solves sometimes but not always (0 < hits <
    samples over `samples` thinking answers), so every GRPO group has a reward spread to learn from."""
    model, tokenizer = load(model_path, device=device)
    rates = solves(model, tokenizer, records, enable_thinking=True, samples=samples, max_new_tokens=max_new_tokens,
                   seed=seed, **sampling)
    kept = [r for r, rate in zip(records, rates) if 0 < rate < 1]
    print(f"rl: {len(kept)} of {len(records)} queries are learnable (solved in 1..{samples - 1} of {samples} "
          f"samples); {sum(r == 0 for r in rates)} never, {sum(r == 1 for r in rates)} always solved: dropped")
    return kept


def fusion_data(model_path: str, n: int, seed: int = 0, samples: int = 4, multi_turn: float = 0.3,
                unflagged: float = 0.2, device=None, **task_filter) -> list[dict]:
    """Stage 3: thinking answers rejection-sampled from the stage-2 model on stage-1 queries (the generator's verified
    trace where no sample verifies), direct answers with the empty think block, /think and /no_think in user or
    system turns, multi-turn dialogues whose flag switches."""
    rng = random.Random(seed)
    examples = sample_examples(n, "train", seed, **task_filter)  # the stage-1 queries (same seed)
    model, tokenizer = load(model_path, device=device)
    prompts = [task_record(ex)["messages"] for ex in examples for _ in range(samples)]
    results = generate_batch(model, tokenizer, prompts, max_new_tokens=256, seed=seed, progress="fusion samples")
    sampled = {}  # example index -> first verified, well-formed thinking answer
    for i, res in enumerate(results):
        record = task_record(examples[i // samples])
        if i // samples not in sampled and rewards.verifier_reward(res.text, record) and rewards.format_reward(res.text):
            reasoning, answer = rewards.split_think(res.text)
            if not is_repetitive(reasoning):
                sampled[i // samples] = {"role": "assistant", "reasoning_content": reasoning, "content": answer}
    print(f"fusion: {len(sampled)} of {len(examples)} queries have a verified thinking sample from {model_path}; "
          f"the others use the generator's reference trace")
    for index, ex in enumerate(examples):  # a weak stage-2 model verifies few: keep the thinking half of the mix full
        if index not in sampled:
            sampled[index] = to_messages(ex, thinking=True)[-1]

    def reply(index: int, thinking: bool) -> dict:
        if thinking:
            return sampled[index]
        return {"role": "assistant", "reasoning_content": "", "content": answer_line(examples[index].answer,
                                                                                     examples[index].language)}

    def flag_turn(index: int, flag: str) -> dict:
        return {"role": "user", "content": f"{examples[index].question} {flag}" if flag else examples[index].question}

    # half the samples think (some unflagged: thinking is the default), half answer directly after /no_think
    data = []
    for index in range(len(examples)):
        if rng.random() < multi_turn:  # two or three turns; the flag may switch at each
            turns, messages, thinking = rng.randint(2, 3), [], True
            for t in range(turns):
                flag = rng.choice(["/think", "/no_think", ""])
                thinking = thinking if not flag else flag == "/think"
                i = rng.randrange(len(examples)) if t < turns - 1 else index
                earlier = {"weight": 0} if t < turns - 1 else {}  # context: only the last answer is learned
                messages += [flag_turn(i, flag), reply(i, thinking) | earlier]
            data.append(dict(messages=messages))
            continue
        roll = rng.random()
        if roll < unflagged:
            data.append(dict(messages=[flag_turn(index, ""), reply(index, True)]))
        elif roll < 0.5 + unflagged / 2:
            system = rng.random() < 0.2  # the flag in a system message sometimes
            turn = [{"role": "system", "content": "/think"}, flag_turn(index, "")] if system \
                else [flag_turn(index, "/think")]
            data.append(dict(messages=turn + [reply(index, True)]))
        else:
            data.append(dict(messages=[flag_turn(index, "/no_think"), reply(index, False)]))
    return data


CONSTRAINTS = [  # (instruction appended to the question, checkable constraint)
    ("Answer in at most 6 words.", {"kind": "max_words", "value": 6}),
    ("Start your answer with 'Answer'.", {"kind": "starts_with", "value": "Answer"}),
    ("Do not use the word 'so'.", {"kind": "forbidden", "value": ["so "]}),
    ("Reply in English.", {"kind": "language", "value": "en"}),
]


def general_prompts(n: int, seed: int = 2, judge: bool = False, reward_model: bool = False, **task_filter) -> list[dict]:
    """Stage 4: a mix of tasks and reward kinds: verified answers under /think or /no_think, checkable instructions,
    and (when a judge or a reward model is given) judged answers and reward-model-scored answers."""
    rng = random.Random(seed)
    kinds = ["verifier", "rule"] + (["judge"] if judge else []) + (["rm"] if reward_model else [])
    records = []
    for ex in sample_examples(n, "train", seed, **task_filter):
        flag = rng.choice(["/think", "/no_think"])
        record, kind = task_record(ex, flag), rng.choice(kinds)
        record["reward"] = kind
        if kind == "rule":
            text, constraint = rng.choice(CONSTRAINTS)
            record["messages"][0]["content"] = f"{ex.question} {text} {flag}"
            record["constraints"] = [constraint]
        records.append(record)
    return records


def preference_pairs(model_path: str, n: int, seed: int = 3, samples: int = 4, device=None,
                     **task_filter) -> list[dict]:
    """Reward-model data: per prompt, a verified-correct rollout (chosen) against an incorrect one (rejected). When
    no rollout of a prompt verifies, the generator's reference trace is the chosen answer."""
    model, tokenizer = load(model_path, device=device)
    examples = sample_examples(n, "train", seed, **task_filter)
    records = [task_record(ex) for ex in examples]
    prompts = [r["messages"] for r in records for _ in range(samples)]
    results = generate_batch(model, tokenizer, prompts, max_new_tokens=256, temperature=1.0, seed=seed,
                             progress="rollouts for pairs")
    pairs = []
    for i, record in enumerate(records):
        group = [res.text for res in results[i * samples:(i + 1) * samples]]
        good = [t for t in group if rewards.verifier_reward(t, record)]
        bad = [t for t in group if not rewards.verifier_reward(t, record)]
        if bad and not good:
            reference = to_messages(examples[i], thinking=True)[-1]
            good = [f"<think>\n{reference['reasoning_content']}\n</think>\n\n{reference['content']}"]
        if good and bad:
            pairs.append(dict(messages=record["messages"], chosen=good[0], rejected=bad[0]))
    print(f"rm: {len(pairs)} preference pairs from {len(records)} prompts x {samples} rollouts")
    return pairs
