"""Countdown / 24-style search: combine every given number once with + - * / and parentheses to hit a target.

The trace is a search: a few whole attempts that miss (with how far off they are), then one that hits. Any correct
expression is accepted: the verifier parses the answer with `ast` and evaluates only numbers, + - * / and parentheses.
difficulty 1: 2 numbers; 2: 3 numbers; 3: 4 numbers up to 13; 4: 4 numbers up to 25; 5: 5 numbers incl. 25/50/75/100.
"""
import ast
import operator
from fractions import Fraction

from .base import Example, Task

OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}
SYMBOL = {"+": ast.Add, "-": ast.Sub, "*": ast.Mult, "/": ast.Div}
PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2}
QUESTION = {
    "en": "Use the numbers {nums}, each exactly once, with + - * / and parentheses to make {t}.",
    "zh": "用数字 {nums}（每个恰好用一次）和 + - * / 以及括号，算出 {t}。",
    "fr": "Avec les nombres {nums}, chacun une seule fois, et + - * / et des parenthèses, obtenez {t}.",
}
TRY = {"en": "Try {i}: {calc}. Got {r}, off by {d}.", "zh": "尝试 {i}：{calc}。得到 {r}，差 {d}。",
       "fr": "Essai {i} : {calc}. J'obtiens {r}, écart de {d}."}
HIT = {"en": "Try {i}: {calc}. Got {t}, the target!", "zh": "尝试 {i}：{calc}。得到 {t}，正是目标！",
       "fr": "Essai {i} : {calc}. J'obtiens {t}, c'est la cible !"}
RESULT = {"en": "So {e} = {t}.", "zh": "所以 {e} = {t}。", "fr": "Donc {e} = {t}."}


def random_chain(rng, numbers):
    """Combine two random items until one is left: returns (value, expression, precedence, [calculation strings])."""
    items = [(Fraction(n), str(n), 3) for n in numbers]
    calcs = []
    while len(items) > 1:
        (a, ea, pa), (b, eb, pb) = [items.pop(rng.randrange(len(items))) for _ in range(2)]
        op = rng.choice([o for o in "+-*/" if not (o == "/" and (b == 0 or a % b)) and not (o == "-" and a < b)])
        value = OPS[SYMBOL[op]](a, b)
        ea = f"({ea})" if pa < PRECEDENCE[op] else ea
        eb = f"({eb})" if pb < PRECEDENCE[op] or (pb == PRECEDENCE[op] and op in "-/") else eb
        calcs.append(f"{a} {op} {b} = {value}")
        items.append((value, f"{ea}{op}{eb}", PRECEDENCE[op]))
    return items[0][0], items[0][1], calcs


def evaluate(expression: str, numbers: list[int]) -> Fraction | None:
    """Value of an expression made only of `numbers` (each once), + - * / and parentheses; None for anything else."""
    if not isinstance(expression, str) or len(expression) > 200:
        return None
    try:
        tree = ast.parse(expression.replace("×", "*").replace("÷", "/"), mode="eval").body
    except (SyntaxError, ValueError):
        return None
    used = []

    def value(node):
        if isinstance(node, ast.Constant) and type(node.value) is int:
            used.append(node.value)
            return Fraction(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in OPS:
            left, right = value(node.left), value(node.right)
            if left is None or right is None or (isinstance(node.op, ast.Div) and right == 0):
                return None
            return OPS[type(node.op)](left, right)
        return None

    result = value(tree)
    return result if result is not None and sorted(used) == sorted(numbers) else None


class Countdown(Task):
    name = "countdown"

    def generate(self, rng, difficulty=1, language="en"):
        self.check_args(difficulty, language)
        count, top = (2, 3, 4, 4, 5)[difficulty - 1], (10, 10, 13, 25, 10)[difficulty - 1]
        numbers = [rng.randint(1, top) for _ in range(count)]
        if difficulty == 5:
            numbers[0] = rng.choice([25, 50, 75, 100])
        while True:  # a target that a random combination reaches: a positive integer, not one of the numbers
            target, expression, calcs = random_chain(rng, numbers)
            if target.denominator == 1 and 0 < target <= 1000 and target not in numbers:
                break
        steps = []
        for _ in range(rng.randint(0, min(difficulty, 3))):  # failed attempts first: the search is the point
            value, _, tries = random_chain(rng, numbers)
            if value != target:
                steps.append(TRY[language].format(i=len(steps) + 1, calc=", ".join(tries), r=value,
                                                  d=abs(value - target)))
        steps.append(HIT[language].format(i=len(steps) + 1, calc=", ".join(calcs), t=target))
        steps.append(RESULT[language].format(e=expression, t=target))
        question = QUESTION[language].format(nums=numbers, t=target)
        return Example(self.name, question, steps, expression, language, difficulty,
                       {"key": f"{sorted(numbers)}->{target}", "numbers": numbers, "target": int(target)})

    def extract_answer(self, text):
        answer = super().extract_answer(text)
        if answer is None:
            return None
        sides = [side.strip() for side in answer.split("=")]  # "(8-2)*4 = 24" or "24 = (8-2)*4"
        return max(sides, key=lambda side: sum(side.count(op) for op in "+-*/×÷"))

    def normalize(self, answer):
        return answer

    def verify(self, text, example):
        answer = self.extract_answer(text)
        return answer is not None and evaluate(answer, example.meta["numbers"]) == example.meta["target"]
