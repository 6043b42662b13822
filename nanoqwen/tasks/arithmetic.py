"""Multi-digit arithmetic with column-style steps: addition and subtraction digit by digit with carries and
borrows, multiplication as one partial product per multiplier digit, then running sums.

difficulty 1: 2-digit +; 2: 3-digit + -; 3: 4-digit + -, 3-digit × 1-digit; 4: 5-digit + -, 3-digit × 2-digit;
5: 6-digit + -, 4-digit × 3-digit.
"""
from .base import Example, Task

QUESTIONS = {
    "en": ["What is {a} {op} {b}?", "Compute {a} {op} {b}.", "Calculate {a} {op} {b}."],
    "zh": ["{a} {op} {b} 等于多少？", "计算 {a} {op} {b}。", "请算出 {a} {op} {b}。"],
    "fr": ["Combien font {a} {op} {b} ?", "Calculez {a} {op} {b}.", "Que vaut {a} {op} {b} ?"],
}
ADD_STEP = {
    "en": "Column {i}: {x} + {y} + carry {c} = {s}, write {d}, carry {n}. So far: {part}",
    "zh": "第{i}位：{x} + {y} + 进位 {c} = {s}，写 {d}，进位 {n}。目前：{part}",
    "fr": "Colonne {i} : {x} + {y} + retenue {c} = {s}, j'écris {d}, retenue {n}. Pour l'instant : {part}",
}
SUB_STEP = {
    "en": "Column {i}: {x} - {y} - borrow {c}{fix} = {d}, borrow {n}. So far: {part}",
    "zh": "第{i}位：{x} - {y} - 借位 {c}{fix} = {d}，借位 {n}。目前：{part}",
    "fr": "Colonne {i} : {x} - {y} - emprunt {c}{fix} = {d}, emprunt {n}. Pour l'instant : {part}",
}
BORROW = {"en": " is negative, borrow 10: {v} + 10", "zh": " 不够减，借 10：{v} + 10",
          "fr": " est négatif, on emprunte 10 : {v} + 10"}
FINAL_CARRY = {"en": "Last carry {c} goes in front.", "zh": "最后的进位 {c} 写在最前面。",
               "fr": "La dernière retenue {c} va devant."}
PARTIAL = {
    "en": "{a} × {d} = {split} = {p}, shifted {k} places: {q}",
    "zh": "{a} × {d} = {split} = {p}，左移 {k} 位：{q}",
    "fr": "{a} × {d} = {split} = {p}, décalé de {k} rangs : {q}",
}
RUNNING = {"en": "Add up: {a} + {b} = {s}", "zh": "相加：{a} + {b} = {s}", "fr": "On additionne : {a} + {b} = {s}"}
RESULT = {"en": "So {a} {op} {b} = {r}.", "zh": "所以 {a} {op} {b} = {r}。", "fr": "Donc {a} {op} {b} = {r}."}


def _number(rng, digits):
    return rng.randint(10 ** (digits - 1), 10 ** digits - 1)


def _add_steps(a, b, lang):
    steps, carry, part = [], 0, ""
    xs, ys = str(a)[::-1], str(b)[::-1]
    for i in range(max(len(xs), len(ys))):
        x, y = int(xs[i]) if i < len(xs) else 0, int(ys[i]) if i < len(ys) else 0
        s = x + y + carry
        part = str(s % 10) + part
        steps.append(ADD_STEP[lang].format(i=i + 1, x=x, y=y, c=carry, s=s, d=s % 10, n=s // 10, part=part))
        carry = s // 10
    if carry:
        steps.append(FINAL_CARRY[lang].format(c=carry))
    return steps


def _sub_steps(a, b, lang):  # a >= b
    steps, borrow, part = [], 0, ""
    xs, ys = str(a)[::-1], str(b)[::-1]
    for i in range(len(xs)):
        x, y = int(xs[i]), int(ys[i]) if i < len(ys) else 0
        d, fix, new_borrow = x - y - borrow, "", 0
        if d < 0:
            fix, new_borrow = BORROW[lang].format(v=d), 1
            d += 10
        part = str(d) + part
        steps.append(SUB_STEP[lang].format(i=i + 1, x=x, y=y, c=borrow, fix=fix, d=d, n=new_borrow, part=part))
        borrow = new_borrow
    return steps


def _mul_steps(a, b, lang):
    steps, total = [], None
    for k, digit in enumerate(int(ch) for ch in str(b)[::-1]):
        pieces = [int(ch) * 10 ** j for j, ch in enumerate(str(a)[::-1]) if ch != "0"][::-1]
        split = " + ".join(f"{p} × {digit}" for p in pieces) if len(pieces) > 1 else f"{a} × {digit}"
        split += " = " + " + ".join(str(p * digit) for p in pieces) if len(pieces) > 1 else ""
        p = a * digit
        steps.append(PARTIAL[lang].format(a=a, d=digit, split=split, p=p, k=k, q=p * 10 ** k))
        if total is not None:
            steps.append(RUNNING[lang].format(a=total, b=p * 10 ** k, s=total + p * 10 ** k))
        total = (total or 0) + p * 10 ** k
    return steps


class Arithmetic(Task):
    name = "arithmetic"

    def generate(self, rng, difficulty=1, language="en"):
        self.check_args(difficulty, language)
        op = rng.choice("+-×"[: min(difficulty, 3)])
        if op == "×":
            a, b = _number(rng, (3, 3, 3, 3, 4)[difficulty - 1]), _number(rng, difficulty - 2)
            result, steps = a * b, _mul_steps(a, b, language)
        else:
            a, b = _number(rng, difficulty + 1), _number(rng, difficulty + 1)
            if op == "-":
                a, b = max(a, b), min(a, b)
            result = a + b if op == "+" else a - b
            steps = _add_steps(a, b, language) if op == "+" else _sub_steps(a, b, language)
        steps.append(RESULT[language].format(a=a, op=op, b=b, r=result))
        question = rng.choice(QUESTIONS[language]).format(a=a, op=op, b=b)
        return Example(self.name, question, steps, str(result), language, difficulty,
                       {"key": f"{a}{op}{b}", "a": a, "b": b, "op": op})
