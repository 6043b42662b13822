"""Ordering puzzles: "Alice is taller than Bob. Carol is shorter than Bob. ..." Who is the tallest / k-th?

The facts are the neighbouring pairs of a hidden order, shuffled; the trace grows the chain one fact at a time
(each step attaches one person to the top or the bottom). difficulty = number of people - 2 (3..7); from 3 on,
the k-th place is asked and facts mix both directions ("shorter than"); from 4 on, true but redundant facts are added.
"""
import re

from .base import ANSWER_RE, Example, Task, clean_answer

NAMES = {"en": ["Alice", "Bob", "Carol", "David", "Emma", "Frank", "Grace", "Henry"],
         "zh": ["小明", "小红", "小刚", "小丽", "小华", "小军", "小芳", "小强"],
         "fr": ["Léa", "Hugo", "Chloé", "Lucas", "Manon", "Jules", "Inès", "Louis"]}
# relation -> language -> (more, less, most, least, k-th most); French uses speed and points (no gendered adjectives)
RELATIONS = {
    "height": {
        "en": ("{a} is taller than {b}.", "{a} is shorter than {b}.", "Who is the tallest?", "Who is the shortest?",
               "Who is the {k} tallest?"),
        "zh": ("{a}比{b}高。", "{a}比{b}矮。", "谁最高？", "谁最矮？", "谁第{k}高？"),
        "fr": ("{a} court plus vite que {b}.", "{a} court moins vite que {b}.", "Qui court le plus vite ?",
               "Qui court le moins vite ?", "Qui est le {k} plus rapide ?"),
    },
    "age": {
        "en": ("{a} is older than {b}.", "{a} is younger than {b}.", "Who is the oldest?", "Who is the youngest?",
               "Who is the {k} oldest?"),
        "zh": ("{a}比{b}大。", "{a}比{b}小。", "谁年纪最大？", "谁年纪最小？", "谁的年纪第{k}大？"),
        "fr": ("{a} a plus de points que {b}.", "{a} a moins de points que {b}.", "Qui a le plus de points ?",
               "Qui a le moins de points ?", "Qui est {k} en points ?"),
    },
}
ORDINAL = {"en": {2: "2nd", 3: "3rd", 4: "4th"}, "zh": {2: "二", 3: "三", 4: "四"}, "fr": {2: "2e", 3: "3e", 4: "4e"}}
STEP_START = {"en": "Start: {chain}.", "zh": "开始：{chain}。", "fr": "Début : {chain}."}
STEP_ADD = {"en": "\"{fact}\" puts {x} at the {end}: {chain}.", "zh": "“{fact}”把{x}放在{end}：{chain}。",
            "fr": "« {fact} » place {x} en {end} : {chain}."}
ENDS = {"en": ("top", "bottom"), "zh": ("最前面", "最后面"), "fr": ("tête", "queue")}
STEP_SKIP = {"en": "\"{fact}\" fits the chain already.", "zh": "“{fact}”与顺序一致。",
             "fr": "« {fact} » est déjà cohérent."}
RESULT = {"en": "From the top, place {k} is {x}.", "zh": "从前往后第 {k} 位是{x}。",
          "fr": "En partant du haut, la place {k} est {x}."}


class Logic(Task):
    name = "logic"

    def generate(self, rng, difficulty=1, language="en"):
        self.check_args(difficulty, language)
        relation = rng.choice(sorted(RELATIONS))
        more, less, most, least, kth = RELATIONS[relation][language]
        order = rng.sample(range(len(NAMES["en"])), difficulty + 2)  # order[0] has the most
        names = [NAMES[language][i] for i in order]
        pairs = [(i, i + 1) for i in range(len(order) - 1)]  # (higher place, lower place) as positions in order
        while len(pairs) < len(order) - 1 + max(0, difficulty - 3):  # true but redundant facts: non-neighbours
            hi, lo = sorted(rng.sample(range(len(order)), 2))
            if lo > hi + 1 and (hi, lo) not in pairs:
                pairs.append((hi, lo))
        rng.shuffle(pairs)
        facts = []
        for hi, lo in pairs:
            flip = difficulty >= 3 and rng.random() < 0.5
            facts.append(less.format(a=names[lo], b=names[hi]) if flip else more.format(a=names[hi], b=names[lo]))
        place = rng.choice([0, len(order) - 1] + ([1, 2] if difficulty >= 3 else []))
        question = most if place == 0 else least if place == len(order) - 1 else kth.format(
            k=ORDINAL[language][place + 1])
        sep = "" if language == "zh" else " "
        question = sep.join(facts) + sep + question
        # the trace: start from the first neighbour fact, then keep attaching facts to the top or the bottom
        top, bottom = next(p for p in pairs if p[1] == p[0] + 1)
        steps, todo = [STEP_START[language].format(chain=" > ".join(names[top:bottom + 1]))], list(pairs)
        todo.remove((top, bottom))
        while top > 0 or bottom < len(order) - 1:
            hi, lo = next(p for p in todo if p in ((top - 1, top), (bottom, bottom + 1)))
            todo.remove((hi, lo))
            at_top = lo == top
            top, bottom = (hi, bottom) if at_top else (top, lo)
            steps.append(STEP_ADD[language].format(
                fact=facts[pairs.index((hi, lo))], x=names[hi if at_top else lo],
                end=ENDS[language][0 if at_top else 1], chain=" > ".join(names[top:bottom + 1])))
        for hi, lo in todo:  # redundant facts: checked against the finished chain
            steps.append(STEP_SKIP[language].format(fact=facts[pairs.index((hi, lo))]))
        steps.append(RESULT[language].format(k=place + 1, x=names[place]))
        key = f"{relation}:{order}:{pairs}:{place}"
        return Example(self.name, question, steps, names[place], language, difficulty, {"key": key, "names": names})

    def normalize(self, answer):
        return None if answer is None else answer.strip().casefold()

    def extract_answer(self, text):
        answer = super().extract_answer(text)
        if answer is None and isinstance(text, str) and not ANSWER_RE.search(text):  # a bare name on the last line
            last = clean_answer(text.strip().splitlines()[-1]) if text.strip() else ""
            answer = last if re.fullmatch(r"\w{1,20}", last) else None
        return answer

    def verify(self, text, example):
        """Right iff the answer names exactly one of the people, the right one ("Carol", "Carol is the tallest")."""
        answer = self.normalize(self.extract_answer(text))
        if answer is None:
            return False
        named = [name for name in example.meta["names"] if name.casefold() in answer]
        return named == [example.answer]
