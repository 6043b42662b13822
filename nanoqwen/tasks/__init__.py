"""Procedural task families with verifiable answers and step-by-step solutions: the embedded default corpus.

Each family is one short file (arithmetic, word_problems, countdown, lists, units, logic) with a difficulty knob 1..5
and phrasings in English, Chinese and French. The same examples feed pretraining (`format_document`), cold-start SFT
(`to_messages`), GRPO rewards (`Task.verify`) and evaluation (split="test"). No downloads.

Splits: a problem (its language-independent meta["key"]) belongs to the test split iff stable_hash(key) % 10 == 0;
the train stream drops those, the test stream keeps only those, and each stream has its own seed. Hold out a whole
difficulty by asking for difficulty=(1, 4) in training and difficulty=5 in evaluation.
"""
import random
from collections.abc import Iterator

from .arithmetic import Arithmetic
from .base import ANSWER_PREFIX, LANGUAGES, Example, Task, answer_line, extract_final, stable_hash
from .countdown import Countdown
from .general import general_text
from .lists import Lists
from .logic import Logic
from .units import Units
from .word_problems import WordProblems

__all__ = ["Example", "Task", "TASKS", "LANGUAGES", "ANSWER_PREFIX", "get_task", "sample_examples", "iter_examples",
           "format_document", "to_messages", "answer_line", "extract_final", "general_text", "is_test", "parse_filter"]

TASKS: dict[str, Task] = {task.name: task for task in
                          (Arithmetic(), WordProblems(), Countdown(), Lists(), Units(), Logic())}
TEST_BUCKETS = 10  # one problem in ten is test-only
SOLUTION = {"en": "Solution:", "zh": "解答：", "fr": "Solution :"}
CONCLUSION = {"en": "So the answer is {a}.", "zh": "所以答案是 {a}。", "fr": "Donc la réponse est {a}."}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    return TASKS[name]


def is_test(example: Example) -> bool:
    """Whether a problem is held out for evaluation; by its key, so a problem is held out in every language."""
    return stable_hash(f"{example.task}|{example.meta.get('key', example.question)}") % TEST_BUCKETS == 0


def parse_filter(tasks: str | None = None, difficulty: str | None = None, languages: str | None = None) -> dict:
    """Command-line task filters ("a,b", "N" or "LO-HI", "en,zh") as iter_examples keywords (None: no filter)."""
    lo, _, hi = (difficulty or "").partition("-")
    return dict(tasks=tasks.split(",") if tasks else None, difficulty=(int(lo), int(hi or lo)) if lo else None,
                languages=languages.split(",") if languages else None)


def _difficulty_range(difficulty) -> tuple[int, int]:
    if difficulty is None:
        return 1, 5
    lo, hi = (difficulty, difficulty) if isinstance(difficulty, int) else difficulty
    if not 1 <= lo <= hi <= 5:
        raise ValueError(f"difficulty must be an int 1..5 or a (lo, hi) range within it, got {difficulty!r}")
    return lo, hi


def iter_examples(split="train", seed=0, tasks=None, difficulty=None, languages=None) -> Iterator[Example]:
    """Unlimited examples, deterministic for the same (split, seed, filters); train and test never share a problem."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    chosen = [get_task(name) for name in (tasks or TASKS)]
    lo, hi = _difficulty_range(difficulty)
    pairs = [(task, lang) for task in chosen for lang in task.languages if languages is None or lang in languages]
    if not pairs:
        raise ValueError(f"no task among {[t.name for t in chosen]} speaks any of {languages}")
    rng = random.Random(f"nanoqwen.tasks/{split}/{seed}")  # a str seed is hashed with sha512: stable everywhere
    misses = 0
    while True:
        task = rng.choice(chosen)
        langs = [lang for t, lang in pairs if t is task]
        if not langs:
            continue
        example = task.generate(rng, rng.randint(lo, hi), rng.choice(langs))
        if is_test(example) == (split == "test"):
            misses = 0
            yield example
        else:
            misses += 1
            if misses > 10_000:
                raise RuntimeError(f"could not draw a {split} example for {tasks} at difficulty {difficulty}")


def sample_examples(n, split="train", seed=0, tasks=None, difficulty=None, languages=None) -> list[Example]:
    stream = iter_examples(split, seed, tasks, difficulty, languages)
    return [next(stream) for _ in range(n)]


def format_document(example: Example) -> str:
    """Pretraining text: the question, the numbered steps, the final answer line."""
    steps = "\n".join(f"{i}. {step}" for i, step in enumerate(example.steps, 1))
    solution = SOLUTION.get(example.language, SOLUTION["en"])
    return f"{example.question}\n\n{solution}\n{steps}\n\n{answer_line(example.answer, example.language)}"


def to_messages(example: Example, thinking: bool = True) -> list[dict]:
    """OpenAI-style chat: the user's question; the assistant's steps as reasoning_content and a short final answer."""
    line = answer_line(example.answer, example.language)
    user = {"role": "user", "content": example.question}
    if not thinking:
        return [user, {"role": "assistant", "content": line}]
    conclusion = CONCLUSION.get(example.language, CONCLUSION["en"]).format(a=example.answer)
    assistant = {"role": "assistant", "reasoning_content": "\n".join(example.steps), "content": f"{conclusion}\n{line}"}
    return [user, assistant]
