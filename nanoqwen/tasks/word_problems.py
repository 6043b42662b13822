"""Multi-step word problems: someone's stock of things changes through `difficulty` events (receive, give away,
buy boxes, spend on a purchase), one small computation per event. Names and items are indices, so the same
problem in another language has the same key (and lands in the same split).
"""
from .base import Example, Task

NAMES = {"en": ["Alice", "Bob", "Carol", "David", "Emma", "Frank"], "zh": ["小明", "小红", "小刚", "小丽", "小华", "小军"],
         "fr": ["Léa", "Hugo", "Chloé", "Lucas", "Manon", "Jules"]}
ITEMS = {"en": ["apples", "marbles", "stickers", "books", "coins", "pencils"],
         "zh": ["个苹果", "颗弹珠", "张贴纸", "本书", "枚硬币", "支铅笔"],  # measure word + noun
         "fr": ["pommes", "billes", "autocollants", "livres", "pièces", "crayons"]}
START = {"en": "{n} has {x} {item}.", "zh": "{n}有 {x} {item}。", "fr": "{n} a {x} {item}."}
EVENTS = {  # kind -> language -> (story sentence, trace step)
    "gain": {"en": ("Then {n} gets {x} more.", "Gets {x} more: {s} + {x} = {r}."),
             "zh": ("然后{n}又得到了 {x} {item}。", "又得到 {x}：{s} + {x} = {r}。"),
             "fr": ("Puis {n} en reçoit {x} de plus.", "Reçoit {x} de plus : {s} + {x} = {r}.")},
    "lose": {"en": ("Then {n} gives {x} to a friend.", "Gives away {x}: {s} - {x} = {r}."),
             "zh": ("然后{n}送给朋友 {x} {item}。", "送出 {x}：{s} - {x} = {r}。"),
             "fr": ("Puis {n} en donne {x} à un ami.", "En donne {x} : {s} - {x} = {r}.")},
    "boxes": {"en": ("Then {n} buys {k} boxes with {x} {item} in each.",
                     "Buys {k} boxes of {x}: {k} × {x} = {p}, {s} + {p} = {r}."),
              "zh": ("然后{n}买了 {k} 盒，每盒 {x} {item}。", "买 {k} 盒，每盒 {x}：{k} × {x} = {p}，{s} + {p} = {r}。"),
              "fr": ("Puis {n} achète {k} boîtes de {x} {item}.",
                     "Achète {k} boîtes de {x} : {k} × {x} = {p}, {s} + {p} = {r}.")},
    "shares": {"en": ("Then {n} gives {x} to each of {k} friends.",
                      "Gives {x} to each of {k} friends: {k} × {x} = {p}, {s} - {p} = {r}."),
               "zh": ("然后{n}给 {k} 个朋友每人 {x} {item}。", "给 {k} 个朋友每人 {x}：{k} × {x} = {p}，{s} - {p} = {r}。"),
               "fr": ("Puis {n} donne {x} {item} à chacun de ses {k} amis.",
                      "Donne {x} à chacun de {k} amis : {k} × {x} = {p}, {s} - {p} = {r}.")},
}
QUESTION = {"en": "How many {item} does {n} have now?", "zh": "现在{n}有多少{item_bare}？",
            "fr": "Combien de {item} a {n} maintenant ?"}
FIRST = {"en": "Start: {x}.", "zh": "开始：{x}。", "fr": "Au départ : {x}."}
RESULT = {"en": "So {n} has {r} {item} now.", "zh": "所以{n}现在有 {r} {item}。", "fr": "Donc {n} a maintenant {r} {item}."}


class WordProblems(Task):
    name = "word_problems"

    def generate(self, rng, difficulty=1, language="en"):
        self.check_args(difficulty, language)
        top = (10, 20, 30, 50, 80)[difficulty - 1]
        who, what = rng.randrange(len(NAMES["en"])), rng.randrange(len(ITEMS["en"]))
        start = total = rng.randint(2, top)
        events = []  # (kind, amount, boxes or friends)
        for _ in range(difficulty):
            kind = rng.choice(list(EVENTS) if difficulty >= 3 else ["gain", "lose"])
            k = rng.randint(2, 2 + difficulty) if kind in ("boxes", "shares") else 1
            if kind in ("lose", "shares") and total < 2 * k:  # not enough left to give away
                kind = "gain" if kind == "lose" else "boxes"
            x = rng.randint(2, top) if kind in ("gain", "boxes") else rng.randint(1, total // k)
            events.append((kind, x, k))
            total += x * k if kind in ("gain", "boxes") else -x * k
        n, item = NAMES[language][who], ITEMS[language][what]
        story, steps = [START[language].format(n=n, x=start, item=item)], [FIRST[language].format(x=start)]
        total = start
        for kind, x, k in events:
            p = x * k
            r = total + p if kind in ("gain", "boxes") else total - p
            sentence, step = EVENTS[kind][language]
            story.append(sentence.format(n=n, x=x, k=k, item=item))
            steps.append(step.format(x=x, k=k, p=p, s=total, r=r))
            total = r
        story.append(QUESTION[language].format(n=n, item=item, item_bare=item[1:]))
        steps.append(RESULT[language].format(n=n, r=total, item=item))
        question = ("" if language == "zh" else " ").join(story)
        key = f"{who}:{what}:{start}:" + ",".join(f"{kind}{x}x{k}" for kind, x, k in events)
        return Example(self.name, question, steps, str(total), language, difficulty, {"key": key})
