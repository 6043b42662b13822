"""List operations with a scan-style trace: max, min, sum, reverse, sort (selection sort), dedupe, k-th largest.

difficulty sets the length (4..8) and the size of the numbers; sort/dedupe from 2, k-th largest from 3.
"""
import re

from .base import Example, Task, parse_number

OPS_BY_DIFFICULTY = {1: ["max", "min", "sum", "reverse"], 2: ["max", "min", "sum", "reverse", "sort", "dedupe"]}
QUESTION = {
    "max": {"en": "What is the largest number in {xs}?", "zh": "{xs} 中最大的数是多少？",
            "fr": "Quel est le plus grand nombre de {xs} ?"},
    "min": {"en": "What is the smallest number in {xs}?", "zh": "{xs} 中最小的数是多少？",
            "fr": "Quel est le plus petit nombre de {xs} ?"},
    "sum": {"en": "What is the sum of {xs}?", "zh": "{xs} 的和是多少？", "fr": "Quelle est la somme de {xs} ?"},
    "reverse": {"en": "Reverse the list {xs}.", "zh": "把列表 {xs} 倒过来。", "fr": "Inversez la liste {xs}."},
    "sort": {"en": "Sort {xs} from smallest to largest.", "zh": "把 {xs} 从小到大排序。",
             "fr": "Triez {xs} du plus petit au plus grand."},
    "dedupe": {"en": "Remove the repeated numbers from {xs}, keeping the first of each.",
               "zh": "去掉 {xs} 中重复的数，每个数保留第一次出现。",
               "fr": "Supprimez les doublons de {xs} en gardant la première occurrence."},
    "kth": {"en": "What is the {k}{suffix} largest number in {xs}?", "zh": "{xs} 中第 {k} 大的数是多少？",
            "fr": "Quel est le {k}e plus grand nombre de {xs} ?"},
}
STEP = {
    "best": {"en": "Compare {x}: the {word} so far is {b}.", "zh": "比较 {x}：目前{word}的是 {b}。",
             "fr": "Je compare {x} : le {word} jusqu'ici est {b}."},
    "sum": {"en": "Add {x}: {s} + {x} = {r}.", "zh": "加上 {x}：{s} + {x} = {r}。",
            "fr": "J'ajoute {x} : {s} + {x} = {r}."},
    "reverse": {"en": "Position {i} from the end is {x}: {ys}.", "zh": "倒数第 {i} 个是 {x}：{ys}。",
                "fr": "Position {i} depuis la fin : {x} : {ys}."},
    "pick": {"en": "The {word} of {rest} is {x}: {ys}.", "zh": "{rest} 中{word}的是 {x}：{ys}。",
             "fr": "Le {word} de {rest} est {x} : {ys}."},
    "keep": {"en": "{x} is new, keep it: {ys}.", "zh": "{x} 是新的，保留：{ys}。",
             "fr": "{x} est nouveau, je le garde : {ys}."},
    "skip": {"en": "{x} was seen before, skip it.", "zh": "{x} 已经出现过，跳过。", "fr": "{x} est déjà vu, je l'ignore."},
}
WORDS = {"max": {"en": "largest", "zh": "最大", "fr": "plus grand"},
         "min": {"en": "smallest", "zh": "最小", "fr": "plus petit"}}
RESULT = {"en": "The result is {r}.", "zh": "结果是 {r}。", "fr": "Le résultat est {r}."}


class Lists(Task):
    name = "lists"

    def generate(self, rng, difficulty=1, language="en"):
        self.check_args(difficulty, language)
        op = rng.choice(OPS_BY_DIFFICULTY.get(difficulty, OPS_BY_DIFFICULTY[2] + ["kth"]))
        length, top = difficulty + 3, (9, 50, 99, 500, 999)[difficulty - 1]
        if op == "dedupe":
            top = length  # small values so that repeats happen
        xs = [rng.randint(0, top) for _ in range(length)]
        k = rng.randint(2, 3) if op == "kth" else 0
        steps, lang = [], language
        if op in ("max", "min"):
            best, word = xs[0], WORDS[op][lang]
            for x in xs[1:]:
                best = max(best, x) if op == "max" else min(best, x)
                steps.append(STEP["best"][lang].format(x=x, word=word, b=best))
            result = best
            steps.insert(0, STEP["best"][lang].format(x=xs[0], word=word, b=xs[0]))
        elif op == "sum":
            result = 0
            for x in xs:
                steps.append(STEP["sum"][lang].format(x=x, s=result, r=result + x))
                result += x
        elif op == "reverse":
            result = []
            for i, x in enumerate(reversed(xs)):
                result.append(x)
                steps.append(STEP["reverse"][lang].format(i=i + 1, x=x, ys=result))
        elif op == "dedupe":
            result = []
            for x in xs:
                steps.append(STEP["skip" if x in result else "keep"][lang].format(x=x, ys=result + [x]))
                result = result if x in result else result + [x]
        else:  # sort: the smallest of what is left, again and again; kth: the largest, k times
            rest, result = list(xs), []
            word = WORDS["min" if op == "sort" else "max"][lang]
            while rest and len(result) < (k or length):
                x = min(rest) if op == "sort" else max(rest)
                result.append(x)
                steps.append(STEP["pick"][lang].format(word=word, rest=rest, x=x, ys=result))
                rest.remove(x)
            result = result[-1] if op == "kth" else result
        steps.append(RESULT[lang].format(r=result))
        question = QUESTION[op][lang].format(xs=xs, k=k, suffix={2: "nd", 3: "rd"}.get(k))
        return Example(self.name, question, steps, str(result), language, difficulty,
                       {"key": f"{op}{k}:{xs}", "op": op, "numbers": xs})

    def normalize(self, answer):
        """Lists ("[1, 3]" or "1, 3") compare as tuples of ints, anything else as a number ("1,250" is a number)."""
        if answer is None:
            return None
        text = answer.strip()
        if "[" in text or re.search(r"[,，]\s", text):
            if not re.fullmatch(r"\[?\s*(-?\d+(\s*[,，]\s*-?\d+)*)?\s*\]?", text):
                return None
            return tuple(int(n) for n in re.findall(r"-?\d+", text))
        return parse_number(text)
