"""General prose so the model also learns plain language: short encyclopedic, story and dialogue paragraphs built
from templates (en, zh, fr), plus, in English, docstrings that ship with Python itself (present wherever Python is,
unless run with -OO, which strips them; then templates only).
"""
import codecs
import importlib

POOLS = {
    "en": {
        "name": ["Anna", "Ben", "Clara", "Daniel", "Eva", "Felix", "Hannah", "Leo", "Maya", "Oscar", "Rosa", "Sam"],
        "size": ["small", "quiet", "busy", "old", "windy", "green"],
        "geo": ["coast", "edge of a forest", "banks of a slow river", "foot of a mountain", "shore of a lake"],
        "feature": ["stone bridge", "weekly market", "bakeries", "old library", "wooden boats", "apple orchards",
                    "clock tower", "narrow streets", "summer music", "kind people"],
        "season": ["spring", "summer", "autumn", "winter"],
        "animal": ["fox", "owl", "otter", "heron", "badger", "hedgehog", "deer", "sparrow"],
        "color": ["brown", "grey", "red", "spotted", "small", "shy"],
        "habitat": ["forests", "wet meadows", "river banks", "hills", "old gardens"],
        "food": ["berries", "insects", "fish", "seeds", "roots", "worms"],
        "place": ["market", "library", "beach", "park", "station", "garden", "museum", "bakery"],
        "thing": ["a blue umbrella", "an old map", "a lost key", "a letter", "a tiny kitten", "a silver coin"],
        "feeling": ["happy", "curious", "tired but glad", "surprised", "calm", "proud"],
        "topic": ["the weather", "a new book", "the trip tomorrow", "dinner", "the garden", "a math puzzle"],
    },
    "zh": {
        "name": ["小林", "阿明", "王芳", "李雷", "韩梅", "张伟", "陈静", "刘洋", "赵敏", "孙悦"],
        "size": ["安静的", "热闹的", "古老的", "美丽的", "宁静的"],
        "geo": ["海边", "森林旁边", "一条小河边", "山脚下", "湖边"],
        "feature": ["石桥", "集市", "老图书馆", "小船", "果园", "钟楼", "窄窄的街道", "好客的人们", "茶馆"],
        "season": ["春天", "夏天", "秋天", "冬天"],
        "animal": ["狐狸", "猫头鹰", "水獭", "白鹭", "刺猬", "小鹿", "麻雀"],
        "color": ["棕色的", "灰色的", "红色的", "有斑点的", "胆小的"],
        "habitat": ["森林里", "湿地里", "河岸边", "山坡上", "花园里"],
        "food": ["浆果", "小虫", "鱼", "种子", "草根"],
        "place": ["市场", "图书馆", "海滩", "公园", "车站", "花园", "博物馆", "面包店"],
        "thing": ["一把蓝色的伞", "一张旧地图", "一把丢失的钥匙", "一封信", "一只小猫", "一枚银币"],
        "feeling": ["很开心", "很好奇", "有点累但很满足", "很惊讶", "很平静", "很自豪"],
        "topic": ["天气", "一本新书", "明天的旅行", "晚饭", "花园", "一道数学题"],
    },
    "fr": {
        "name": ["Anne", "Paul", "Claire", "Marc", "Julie", "Thomas", "Sophie", "Nicolas", "Camille", "Luc"],
        "size": ["petite", "calme", "vieille", "jolie", "animée"],
        "geo": ["la côte", "l'orée d'une forêt", "une rivière lente", "le pied d'une montagne", "un lac"],
        "feature": ["son pont de pierre", "son marché", "ses boulangeries", "sa vieille bibliothèque", "ses vergers",
                    "sa tour de l'horloge", "ses rues étroites", "ses habitants accueillants"],
        "season": ["été", "automne", "hiver"],  # vowel sounds: "en été", "d'hiver"
        "animal": ["renard", "hibou", "héron", "blaireau", "hérisson", "cerf", "moineau"],
        "color": ["brun", "gris", "roux", "tacheté", "timide"],
        "habitat": ["les forêts", "les prairies humides", "les berges", "les collines", "les vieux jardins"],
        "food": ["des baies", "des insectes", "des poissons", "des graines", "des racines"],
        "place": ["marché", "parc", "musée", "jardin", "port", "quartier"],
        "thing": ["un parapluie bleu", "une vieille carte", "une clé perdue", "une lettre", "un petit chaton"],
        "feeling": ["heureux", "curieux", "fatigué mais content", "surpris", "calme", "fier"],
        "topic": ["le temps", "un nouveau livre", "le voyage de demain", "le dîner", "le jardin", "une énigme"],
    },
}
TEMPLATES = {
    "en": [
        "{Town} is a {size} town on the {geo}. It was founded in {year}, and today about {pop} people live there. "
        "The town is known for its {feature} and its {feature2}. Every {season}, visitors come to see them.",
        "The {color} {animal} lives in {habitat}. It mostly eats {food}, and in {season} it also eats {food2}. "
        "It is most active in the early morning. A young {animal} stays with its mother for about {small} months.",
        "One {season} morning, {name} walked to the {place}. On the way, {name} found {thing}. "
        "{name} asked {name2} what to do with it. They decided to take it to the {place2}. "
        "In the end, {name} felt {feeling}.",
        "{name}: Good morning, {name2}! Did you sleep well?\n{name2}: Yes, thank you. I was thinking about {topic}.\n"
        "{name}: Me too. Shall we talk about it at the {place}?\n{name2}: Good idea. See you there at {hour} o'clock.",
    ],
    "zh": [
        "{Town}是{geo}一个{size}小镇，建于{year}年，现在大约有{pop}人住在那里。小镇以{feature}和{feature2}闻名。每年{season}，很多游客都会来参观。",
        "{color}{animal}生活在{habitat}。它主要吃{food}，{season}的时候也吃{food2}。它在清晨最活跃。小{animal}会和妈妈一起生活大约{small}个月。",
        "一个{season}的早上，{name}走去{place}。路上，{name}发现了{thing}。{name}问{name2}该怎么办。他们决定把它送到{place2}。最后，{name}{feeling}。",
        "{name}：早上好，{name2}！你睡得好吗？\n{name2}：很好，谢谢。我在想{topic}的事。\n{name}：我也是。我们去{place}聊聊吧？\n{name2}：好主意，{hour}点在那里见。",
    ],
    "fr": [
        "{Town} est une {size} ville près de {geo}. Elle a été fondée en {year} "
        "et compte aujourd'hui environ {pop} habitants. "
        "La ville est connue pour {feature} et {feature2}. Chaque {season}, des visiteurs viennent les voir.",
        "Le {animal} {color} vit dans {habitat}. Il mange surtout {food}, et en {season} il mange aussi {food2}. "
        "Il est très actif tôt le matin. Un jeune {animal} reste avec sa mère environ {small} mois.",
        "Un matin d'{season}, {name} est allé au {place}. En chemin, {name} a trouvé {thing}. "
        "{name} a demandé à {name2} quoi faire. Ils ont décidé de l'apporter au {place2}. "
        "À la fin, {name} était {feeling}.",
        "{name} : Bonjour, {name2} ! Tu as bien dormi ?\n{name2} : Oui, merci. Je pensais à {topic}.\n"
        "{name} : Moi aussi. On en parle au {place} ?\n{name2} : Bonne idée. À {hour} heures là-bas.",
    ],
}
SYLLABLES = {"en": (["Ash", "Bel", "Cor", "Dun", "Elm", "Fair", "Glen", "Hol", "Kings", "Mar"],
                    ["ford", "ton", "wick", "bury", "dale", "field"]),
             "zh": (["青", "石", "白", "清", "云", "桃", "松", "望"], ["溪镇", "河镇", "山镇", "湾镇", "林镇"]),
             "fr": (["Beau", "Ville", "Mont", "Saint-", "Roche", "Clair"],
                    ["fort", "mont", "val", "bourg", "lieu", "champ"])}
DOC_MODULES = ["json", "random", "fractions", "textwrap", "string", "heapq", "bisect", "statistics", "calendar",
               "colorsys", "difflib", "fnmatch", "shlex", "pprint", "base64", "zlib", "copy", "this"]


def python_doc(rng) -> str | None:
    """A docstring from Python's own standard library, cut to its first paragraphs (None where stripped)."""
    name = rng.choice(DOC_MODULES)
    if name == "this":  # the Zen of Python, stored rot13-encoded in the module (printing it on import is harmless)
        import contextlib
        import io
        with contextlib.redirect_stdout(io.StringIO()):
            this = importlib.import_module("this")
        return codecs.decode(this.s, "rot13")
    doc = importlib.import_module(name).__doc__
    if not doc or len(doc.strip()) < 80:
        return None
    text = ""
    for paragraph in doc.strip().split("\n\n"):
        if len(text) + len(paragraph) > 1200:
            break
        text += paragraph.strip() + "\n\n"
    return text.strip() or None


def general_text(rng, language="en") -> str:
    """One short prose document (about 50-300 tokens) in `language`."""
    if language not in TEMPLATES:
        raise ValueError(f"general_text: language must be one of {sorted(TEMPLATES)}, got {language!r}")
    if language == "en" and rng.random() < 0.15:
        doc = python_doc(rng)
        if doc:
            return doc
    pool = POOLS[language]
    first, last = SYLLABLES[language]
    fill = {slot: rng.choice(words) for slot, words in pool.items()}
    for slot in ("name", "feature", "food", "place"):  # a second, different one: "{name} asked {name2}"
        fill[slot + "2"] = rng.choice([word for word in pool[slot] if word != fill[slot]])
    fill.update(Town=rng.choice(first) + rng.choice(last), year=rng.randint(1200, 1950), pop=rng.randint(800, 90000),
                small=rng.randint(2, 18), hour=rng.randint(2, 11))
    paragraphs = rng.sample(TEMPLATES[language], rng.randint(1, 2))
    return "\n\n".join(template.format(**fill) for template in paragraphs)
