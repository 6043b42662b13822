"""The task contract: an Example (question, step trace, answer), the Task base class, answer lines and extraction.

Every family in this folder subclasses Task, writes `generate`, and, where a plain numeric comparison is not
enough, `normalize` or `verify`. Model text is only ever parsed, never evaluated.
"""
import hashlib
import random
import re
from dataclasses import dataclass, field
from fractions import Fraction

LANGUAGES = ("en", "zh", "fr")
ANSWER_PREFIX = {"en": "Answer: ", "zh": "答案：", "fr": "Réponse : "}
# an answer line: "Answer: 42", "Final answer: 42", "答案：42", "最终答案: 42", "Réponse : 42" (last one wins)
ANSWER_RE = re.compile(r"(?:final answer|answer|最终答案|答案|réponse(?: finale)?|respuesta|antwort)[ \t]*[:：][ \t]*(.*)",
                       re.IGNORECASE)
BOXED_RE = re.compile(r"\\boxed\{([^{}]*)\}")
# a bare final line that is only a number, a list or an arithmetic expression
BARE_RE = re.compile(r"[-+*/×÷()\[\]\d\s.,=]*\d[-+*/×÷()\[\]\d\s.,=]*")
NUMBER_RE = re.compile(r"-?\d+(?:\.\d+)?")


@dataclass
class Example:
    task: str            # family name, e.g. "arithmetic"
    question: str        # the user's question, in `language`
    steps: list[str]     # the step-by-step solution trace, in `language`
    answer: str          # canonical final answer string
    language: str        # "en" | "zh" | "fr"
    difficulty: int
    meta: dict = field(default_factory=dict)  # what the verifier needs; meta["key"] names the problem in any language


def answer_line(answer, language: str = "en") -> str:
    return ANSWER_PREFIX.get(language, ANSWER_PREFIX["en"]) + str(answer)


def clean_answer(answer: str) -> str:
    answer = answer.strip().strip("*`$ \t").strip()
    answer = BOXED_RE.sub(r"\1", answer)
    return answer.rstrip(".。!！").strip()


def extract_final(text) -> str | None:
    """The text after the last answer line; else the last \\boxed{}; else a bare final number/list/expression line."""
    if not isinstance(text, str) or not text.strip():
        return None
    matches = list(ANSWER_RE.finditer(text))
    if matches:
        last = matches[-1]
        answer = clean_answer(last.group(1))
        if not answer:  # "Answer:" with the value on the next line
            rest = [line for line in text[last.end():].splitlines() if line.strip()]
            answer = clean_answer(rest[0]) if rest else ""
        return answer or None
    boxed = BOXED_RE.findall(text)
    if boxed:
        return clean_answer(boxed[-1]) or None
    last_line = clean_answer(text.strip().splitlines()[-1])
    return last_line if BARE_RE.fullmatch(last_line) else None


def parse_number(answer: str | None) -> Fraction | None:
    """'1,250' / '= 1250' / '1250 cm' -> Fraction(1250); anything else (words before it, two numbers) -> None."""
    if answer is None:
        return None
    answer = answer.rsplit("=", 1)[-1].strip()
    answer = re.sub(r"(?<=\d)[, ](?=\d{3}\b)", "", answer)  # thousands separators
    match = NUMBER_RE.match(answer)
    if not match or NUMBER_RE.search(answer[match.end():]):
        return None
    return Fraction(match.group())


def stable_hash(text: str) -> int:
    return int.from_bytes(hashlib.md5(text.encode("utf-8")).digest()[:8], "little")


class Task:
    """One family of problems with verifiable answers. Subclasses set `name` and write `generate`."""
    name: str = ""
    languages: tuple[str, ...] = LANGUAGES

    def generate(self, rng: random.Random, difficulty: int = 1, language: str = "en") -> Example:
        raise NotImplementedError

    def extract_answer(self, text: str) -> str | None:
        return extract_final(text)

    def normalize(self, answer: str | None):
        """What two answers are compared by; numbers by default."""
        return parse_number(answer)

    def verify(self, text: str, example: Example) -> bool:
        got = self.normalize(self.extract_answer(text))
        return got is not None and got == self.normalize(example.answer)

    def check_args(self, difficulty: int, language: str):
        if not 1 <= difficulty <= 5:
            raise ValueError(f"{self.name}: difficulty must be 1..5, got {difficulty}")
        if language not in self.languages:
            raise ValueError(f"{self.name}: language must be one of {self.languages}, got {language!r}")
