"""Unit conversion along a chain of units (length, mass, time), one hop per step.

difficulty 1: one hop down (multiply); 2: one hop either way; 3: two hops; 4: three hops;
5: a two-unit quantity ("3 hours and 25 minutes") converted hop by hop into a third unit, then added.
Answers are always whole numbers (an upward conversion starts from a multiple of the factor).
"""
from .base import Example, Task

CHAINS = {  # units from small to large, with how many of the previous unit make one of this one
    "length": [("mm", 1), ("cm", 10), ("m", 100), ("km", 1000)],
    "mass": [("mg", 1), ("g", 1000), ("kg", 1000), ("t", 1000)],
    "time": [("s", 1), ("min", 60), ("h", 60), ("day", 24), ("week", 7)],
}
NAMES = {
    "en": {"mm": "millimeters", "cm": "centimeters", "m": "meters", "km": "kilometers", "mg": "milligrams",
           "g": "grams", "kg": "kilograms", "t": "tonnes", "s": "seconds", "min": "minutes", "h": "hours",
           "day": "days", "week": "weeks"},
    "zh": {"mm": "毫米", "cm": "厘米", "m": "米", "km": "千米", "mg": "毫克", "g": "克", "kg": "千克", "t": "吨",
           "s": "秒", "min": "分钟", "h": "小时", "day": "天", "week": "周"},
    "fr": {"mm": "millimètres", "cm": "centimètres", "m": "mètres", "km": "kilomètres", "mg": "milligrammes",
           "g": "grammes", "kg": "kilogrammes", "t": "tonnes", "s": "secondes", "min": "minutes", "h": "heures",
           "day": "jours", "week": "semaines"},
}
QUESTION = {
    "en": ["How many {to} are in {v} {frm}?", "Convert {v} {frm} to {to}."],
    "zh": ["{v} {frm}等于多少{to}？", "把 {v} {frm}换算成{to}。"],
    "fr": ["Combien de {to} y a-t-il dans {v} {frm} ?", "Convertissez {v} {frm} en {to}."],
}
SUM_QUESTION = {"en": "How many {to} are in {v} {frm} and {w} {frm2}?", "zh": "{v} {frm} {w} {frm2}一共是多少{to}？",
                "fr": "Combien de {to} font {v} {frm} et {w} {frm2} ?"}
DOWN = {"en": "1 {one} = {f} {small}, so {v} {big} = {v} × {f} = {r} {small}.",
        "zh": "1 {one} = {f} {small}，所以 {v} {big} = {v} × {f} = {r} {small}。",
        "fr": "1 {one} = {f} {small}, donc {v} {big} = {v} × {f} = {r} {small}."}
UP = {"en": "1 {one} = {f} {small}, so {v} {small} = {v} / {f} = {r} {big}.",
      "zh": "1 {one} = {f} {small}，所以 {v} {small} = {v} / {f} = {r} {big}。",
      "fr": "1 {one} = {f} {small}, donc {v} {small} = {v} / {f} = {r} {big}."}
ADD = {"en": "Add: {a} + {b} = {r} {to}.", "zh": "相加：{a} + {b} = {r} {to}。",
       "fr": "On additionne : {a} + {b} = {r} {to}."}


def _one(names, unit, lang):  # "1 meter", "1 mètre": the names are plurals ending in s
    return names[unit] if lang == "zh" else names[unit][:-1]


def convert(value, chain, start, end, names, lang, steps):
    """Walk from unit index `start` to `end` one hop at a time, writing one step per hop; returns the value."""
    while start != end:
        big, small = (start, start - 1) if start > end else (start + 1, start)
        factor = chain[big][1]
        result = value * factor if start > end else value // factor  # down multiplies, up divides
        template = DOWN if start > end else UP
        steps.append(template[lang].format(one=_one(names, chain[big][0], lang), big=names[chain[big][0]],
                                           small=names[chain[small][0]], f=factor, v=value, r=result))
        start += -1 if start > end else 1
        value = result
    return value


class Units(Task):
    name = "units"

    def generate(self, rng, difficulty=1, language="en"):
        self.check_args(difficulty, language)
        kind = rng.choice(sorted(CHAINS))
        chain, names, steps = CHAINS[kind], NAMES[language], []
        top = (9, 20, 50, 99, 30)[difficulty - 1]
        if difficulty == 5:
            big = rng.randrange(2, len(chain))
            small = rng.randrange(1, big)
            to = rng.randrange(0, small)
            v, w = rng.randint(2, top), rng.randint(2, chain[small + 1][1] - 1 if small + 1 < len(chain) else top)
            a = convert(v, chain, big, to, names, language, steps)
            b = convert(w, chain, small, to, names, language, steps)
            result = a + b
            steps.append(ADD[language].format(a=a, b=b, r=result, to=names[chain[to][0]]))
            question = SUM_QUESTION[language].format(v=v, frm=names[chain[big][0]], w=w, frm2=names[chain[small][0]],
                                                    to=names[chain[to][0]])
            key = f"{kind}:{v}{chain[big][0]}+{w}{chain[small][0]}->{chain[to][0]}"
        else:
            hops = (1, 1, 2, 3)[difficulty - 1]
            low = rng.randrange(0, len(chain) - hops)
            frm, to = (low + hops, low) if difficulty == 1 or rng.random() < 0.5 else (low, low + hops)
            factor = 1
            for unit in chain[low + 1: low + hops + 1]:
                factor *= unit[1]
            v = rng.randint(2, top) * (factor if frm < to else 1)  # upward: a whole number of the bigger unit
            result = convert(v, chain, frm, to, names, language, steps)
            question = rng.choice(QUESTION[language]).format(v=v, frm=names[chain[frm][0]], to=names[chain[to][0]])
            key = f"{kind}:{v}{chain[frm][0]}->{chain[to][0]}"
        return Example(self.name, question, steps, str(result), language, difficulty, {"key": key})
