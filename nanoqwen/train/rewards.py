"""The three reward kinds of the Qwen3 report, as plain functions of the generated text.

    rule-based        verifier_reward (task answer), format_reward (a well-formed <think> block), think_follow_reward
                      (obeys the latest /think or /no_think), constraint_reward (checkable instructions),
                      code_reward (the answer's program run on the record's tests in the sandbox)
    model-based       judge_reward: a judge checkpoint reads question, reference and response; the reward is
                      P("yes") / (P("yes") + P("no")) at its first answer token
    reward model      reward_model.RewardModel.score (no reference), trained by `nanoqwen rm`

`score(record, text, ...)` dispatches on a prompt record (see grpo.py for the JSONL format); `check_record` says why
a record cannot be scored, before any rollout.
"""
from __future__ import annotations

import re

import torch

from ..tasks import TASKS, Example
from .sandbox import run_code

THINK_RE = re.compile(r"^\s*<think>\n?(.*?)\n?</think>\s*(.*)$", re.DOTALL)
FLAG_RE = re.compile(r"/(no_think|think)\b")


def split_think(text: str) -> tuple[str | None, str]:
    """(reasoning, answer) of generated text; reasoning None when there is no complete <think>...</think> block."""
    text = text.replace("<|im_end|>", "").replace("<|endoftext|>", "")
    match = THINK_RE.match(text)
    return (match.group(1).strip(), match.group(2).strip()) if match else (None, text.strip())


def format_reward(text: str) -> float:
    """1 for exactly one think block, non-empty reasoning and a non-empty answer after it; else 0."""
    reasoning, answer = split_think(text)
    return float(bool(reasoning) and bool(answer) and text.count("<think>") == 1 and text.count("</think>") == 1)


def example_of(record: dict) -> Example:
    """The task Example a prompt record describes (verifier name, reference answer, verifier metadata)."""
    return Example(task=record["verifier"], question="", steps=[], answer=str(record["answer"]),
                   language=record.get("language", "en"), difficulty=record.get("difficulty", 1),
                   meta=record.get("meta") or {})


def verifier_reward(text: str, record: dict) -> float:
    """1 if the answer after the think block verifies against the reference with the task's verifier."""
    _, answer = split_think(text)
    return float(TASKS[record["verifier"]].verify(answer, example_of(record)))


def latest_flag(messages: list[dict]) -> bool | None:
    """The latest soft switch in user or system messages: True (/think), False (/no_think), None (none given)."""
    for message in reversed(messages):
        if message["role"] in ("user", "system"):
            flags = FLAG_RE.findall(message.get("content") or "")
            if flags:
                return flags[-1] == "think"
    return None


def think_follow_reward(text: str, want_thinking: bool) -> float:
    """Thinking: a non-empty think block. Non-thinking: the empty block, then an answer."""
    reasoning, answer = split_think(text)
    if want_thinking:
        return float(bool(reasoning))
    return float(reasoning == "" and bool(answer))


def detect_language(text: str) -> str:
    """'zh' if CJK characters dominate the letters, 'fr' if French accents or words appear, else 'en'."""
    cjk = len(re.findall(r"[\u4e00-\u9fff]", text))
    latin = len(re.findall(r"[A-Za-zÀ-ÿ]", text))
    if cjk > latin / 3:
        return "zh"
    if re.search(r"[éèêàçù]|\b(le|la|les|est|donc|réponse)\b", text, re.IGNORECASE):
        return "fr"
    return "en"


CHECKS = {  # constraint kind -> (answer text, value) -> satisfied?
    "max_words": lambda t, v: len(t.split()) <= v,
    "min_words": lambda t, v: len(t.split()) >= v,
    "language": lambda t, v: detect_language(t) == v,
    "keywords": lambda t, v: all(k.lower() in t.lower() for k in v),
    "forbidden": lambda t, v: not any(k.lower() in t.lower() for k in v),
    "ends_with": lambda t, v: t.rstrip().endswith(v),
    "starts_with": lambda t, v: t.lstrip().startswith(v),
    "lowercase": lambda t, v: t == t.lower(),
    "bullets": lambda t, v: sum(line.lstrip().startswith(("- ", "* ")) for line in t.splitlines()) == v,
}


def constraint_reward(text: str, constraints: list[dict]) -> float:
    """Fraction of checkable instructions ({"kind": ..., "value": ...}) the answer satisfies."""
    if not constraints:
        return 1.0
    _, answer = split_think(text)
    return sum(CHECKS[c["kind"]](answer, c.get("value")) for c in constraints) / len(constraints)


CODE_TIMEOUT = 5.0  # seconds per test, unless the record sets "timeout"
CODE_BLOCK_RE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)


def extract_code(answer: str) -> str:
    """The program in an answer: the last fenced code block (```python ... ```), else the whole answer."""
    blocks = CODE_BLOCK_RE.findall(answer)
    return blocks[-1] if blocks else answer


def passes_test(result, expected: str) -> bool:
    """A test passes only when the program exited 0 within its time limit, its output within the cap, and that
    output matches: printing the answer and then crashing or hanging scores as a failure."""
    return result.ok and result.stdout.strip() == expected.strip()


def code_reward(text: str, record: dict) -> float:
    """Fraction of the record's tests ([stdin, expected stdout] pairs) that the program in the answer (after the think
    block) passes, each run in the sandbox (`record["timeout"]` seconds each, default CODE_TIMEOUT; no network,
    256 MB). A failure of the sandbox itself fails the test; it never raises."""
    _, answer = split_think(text)
    code, timeout = extract_code(answer), float(record.get("timeout", CODE_TIMEOUT))
    passed = sum(passes_test(run_code(code, stdin, timeout=timeout, max_output=max(1 << 16, 4 * len(expected))),
                             expected) for stdin, expected in record["tests"])
    return passed / len(record["tests"])


JUDGE_PROMPT = ("Question: {question}\nReference answer: {reference}\nResponse: {response}\n"
                "Does the response reach the same final answer as the reference? Answer yes or no. /no_think")


@torch.no_grad()
def judge_reward(judge, tokenizer, question: str, reference: str, response: str) -> float:
    """P(yes) / (P(yes) + P(no)) of the judge's first answer token, in non-thinking mode."""
    _, answer = split_think(response)
    messages = [{"role": "user", "content": JUDGE_PROMPT.format(question=question, reference=reference,
                                                                response=answer)}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, enable_thinking=False)
    device = judge.lm_head.weight.device
    logits = judge(torch.tensor([ids], device=device), logits_to_keep=1).logits[0, -1].float()
    yes, no = (tokenizer.encode(word)[0] for word in ("yes", "no"))
    return torch.softmax(logits[[yes, no]], dim=0)[0].item()


KINDS = ("verifier", "rule", "judge", "rm", "code")


def score(record: dict, text: str, judge=None, reward_model=None, tokenizer=None, format_weight: float = 0.2):
    """(reward, correct) of one response to a prompt record; the record's "reward" names the kind."""
    kind = record.get("reward", "verifier")
    want = latest_flag(record["messages"])
    thinking = want is not False
    if kind == "code":  # the share of the tests passed; correct when all pass
        passed = code_reward(text, record)
        correct = float(passed == 1.0)
    else:
        passed = correct = verifier_reward(text, record) if "verifier" in record else 0.0
    if kind in ("verifier", "code"):
        reward = passed + format_weight * (format_reward(text) if thinking else think_follow_reward(text, False))
    elif kind == "rule":  # instruction following: constraints and the think flag
        reward = 0.5 * constraint_reward(text, record.get("constraints", [])) + \
            0.5 * think_follow_reward(text, thinking)
    elif kind == "judge":
        question = record["messages"][-1]["content"]
        reward = judge_reward(judge, tokenizer, question, str(record["answer"]), text)
    elif kind == "rm":
        reward = reward_model.score(tokenizer, record["messages"], text)
    else:
        raise ValueError(f"unknown reward kind {kind!r} ({', '.join(KINDS)})")
    if want is not None and kind in ("judge", "rm"):  # obeying /think and /no_think is rewarded in every kind
        reward = 0.8 * reward + 0.2 * think_follow_reward(text, thinking)
    return reward, correct


def check_messages(record) -> str | None:
    """Why a record is not a prompt (a 'messages' list with a user turn), or None."""
    if isinstance(record, dict) and isinstance(record.get("messages"), list) and \
            any(isinstance(m, dict) and m.get("role") == "user" for m in record["messages"]):
        return None
    return "a prompt needs a 'messages' list with a user turn"


def check_record(record) -> str | None:
    """Why an RL prompt record cannot be scored (None when it can): the checks `score` would otherwise fail on
    mid-run, made when the prompts are read."""
    if problem := check_messages(record):
        return problem
    kind = record.get("reward", "verifier")
    if kind not in KINDS:
        return f"unknown reward kind {kind!r} (one of {', '.join(KINDS)})"
    if "verifier" in record and record["verifier"] not in TASKS:
        return f"unknown verifier {record['verifier']!r} (one of {', '.join(sorted(TASKS))})"
    if kind == "verifier" and not ("verifier" in record and "answer" in record):
        return "a 'verifier' reward needs 'verifier' and 'answer'"
    if kind == "judge" and "answer" not in record:
        return "a 'judge' reward needs a reference 'answer'"
    if kind == "rule":
        constraints = record.get("constraints", [])
        if not isinstance(constraints, list) or \
                not all(isinstance(c, dict) and c.get("kind") in CHECKS for c in constraints):
            return f"'constraints' must be a list of {{\"kind\": ..., \"value\": ...}}, kinds: {', '.join(CHECKS)}"
    if kind == "code":
        tests = record.get("tests")
        if not (isinstance(tests, list) and tests and all(isinstance(t, list) and len(t) == 2 and
                                                          all(isinstance(x, str) for x in t) for t in tests)):
            return "a 'code' reward needs 'tests': a non-empty list of [stdin, expected stdout] string pairs"
        timeout = record.get("timeout", CODE_TIMEOUT)
        if not isinstance(timeout, (int, float)) or timeout <= 0:
            return "'timeout' must be positive (seconds per test)"
    return None
