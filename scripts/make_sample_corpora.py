"""Generate the built-in sample corpora ``moe_hooked/assets/corpora/{domain}.txt``.

Every sample is composed here from our own templates and word lists (no external text), with a
fixed seed, so the output is byte-for-byte reproducible:

    python scripts/make_sample_corpora.py            # (re)write the files
    python scripts/make_sample_corpora.py --check    # exit 1 if the files are out of date

One sample per line. Each sample is a short paragraph of several sentences (code: a few small
Python functions with whitespace collapsed to single spaces, so that a function fits on a line).
"""

from __future__ import annotations

import argparse
import random
import sys
from collections.abc import Callable
from pathlib import Path

SEED = 20240611
N_SAMPLES = 32
OUT_DIR = Path(__file__).resolve().parents[1] / "moe_hooked" / "assets" / "corpora"


def pick(rng: random.Random, options: list) -> object:
    return rng.choice(options)


def fill(rng: random.Random, template: str, vocab: dict[str, list[str]]) -> str:
    """Replace each ``{slot}`` in ``template`` by a random entry of ``vocab[slot]``. A slot used
    twice as ``{slot}`` and ``{slot2}`` gets two distinct entries; ``{Slot}`` is ``{slot}``
    capitalized."""
    values: dict[str, str] = {}
    for slot, options in vocab.items():
        if "{" + slot in template or "{" + capitalize(slot) in template:
            first, second = rng.sample(options, 2)
            values[slot], values[slot + "2"] = first, second
            values[capitalize(slot)] = capitalize(first)
    return template.format(**values)


Sentence = Callable[[random.Random], str]


def from_templates(templates: list[str], vocab: dict[str, list[str]]) -> list[Sentence]:
    """One sentence generator per template."""
    return [lambda rng, t=t: fill(rng, t, vocab) for t in templates]


def paragraphs(rng: random.Random, sentences: list[Sentence], lo: int, hi: int,
               sep: str = " ", n_samples: int = N_SAMPLES) -> list[str]:
    """``n_samples`` distinct paragraphs, each made of ``lo..hi`` sentences from distinct
    generators."""
    out: list[str] = []
    seen: set[str] = set()
    while len(out) < n_samples:
        chosen = rng.sample(sentences, rng.randint(lo, hi))
        text = sep.join(make(rng) for make in chosen)
        if text not in seen:
            seen.add(text)
            out.append(text)
    return out


def capitalize(s: str) -> str:
    return s[:1].upper() + s[1:]


# ---------------------------------------------------------------------------------------------
# English
# ---------------------------------------------------------------------------------------------

EN_VOCAB = {
    "name": ["Anna", "Tom", "Maya", "Leo", "Grace", "Sam", "Nora", "Ben", "Ruth", "Omar",
             "Lucy", "Victor", "Ella", "Hugo", "Iris", "Daniel"],
    "place": ["bakery", "library", "market", "station", "post office", "park", "harbor",
              "museum", "garden", "school", "hardware store", "swimming pool"],
    "food": ["bread", "apples", "cheese", "soup", "a pear", "rice", "fresh eggs", "honey",
             "tomatoes", "a lemon cake"],
    "time": ["early in the morning", "after lunch", "on Saturday", "before dinner",
             "late in the evening", "on a rainy Monday", "at the end of the week"],
    "animal": ["cat", "dog", "rabbit", "parrot", "goat", "horse", "fox", "hedgehog"],
    "adj": ["quiet", "tired", "curious", "cheerful", "lazy", "patient", "clever", "nervous"],
    "furniture": ["kitchen table", "wooden bench", "windowsill", "bookshelf", "stairs", "sofa"],
    "topic": ["the stars", "old ships", "mountain birds", "ancient maps", "clocks",
              "rivers and lakes", "the history of bridges", "growing vegetables"],
    "activity": ["walking", "cooking at home", "reading before bed", "gardening",
                 "playing chess", "riding a bicycle", "drawing", "learning a new language"],
    "benefit": ["relax after work", "sleep better", "think more clearly", "meet new friends",
                "stay healthy", "feel less stressed", "remember things longer"],
    "season": ["spring", "summer", "autumn", "winter"],
    "nature": ["forest", "valley", "lake", "meadow", "hill", "river bank"],
    "things": ["wild flowers", "yellow leaves", "fresh snow", "singing birds", "tall grass",
               "butterflies"],
    "vehicle": ["bus", "train", "ferry", "tram", "taxi"],
    "clock": ["noon", "six o'clock", "half past nine", "midnight", "a quarter to eight"],
    "meal": ["breakfast", "lunch", "dinner", "supper"],
    "habit": ["washes the dishes", "takes a short walk", "calls an old friend",
              "writes in a notebook", "waters the plants", "listens to the radio"],
    "thing": ["map", "kitchen knife", "coat", "plan", "bicycle", "tent", "lamp", "backpack"],
    "quality": ["simple", "useful", "sturdy", "reliable", "practical", "comfortable", "elegant"],
    "virtue": ["patient", "careful", "honest", "humble", "calm", "generous"],
    "profession": ["cooks", "teachers", "sailors", "doctors", "farmers", "engineers"],
    "weather": ["it was raining hard", "the sun was shining", "a cold wind was blowing",
                "the sky was grey", "fog covered the streets"],
    "feeling": ["happy", "surprised", "relieved", "proud", "delighted", "amazed"],
    "mood": ["bored", "impatient", "cold", "sleepy", "annoyed", "hungry"],
    "object": ["umbrella", "letter", "blue scarf", "key", "notebook", "basket", "photograph"],
}

EN_TEMPLATES = [
    "{name} walked to the {place} {time} to buy {food}.",
    "The {adj} {animal} slept near the {furniture} while {name} read a book about {topic}.",
    "Many people enjoy {activity} because it helps them {benefit}.",
    "In {season}, the {nature} near our town is full of {things}.",
    "{name} asked {name2} whether the {vehicle} would arrive before {clock}.",
    "After {meal}, {name} usually {habit}.",
    "A good {thing} should be {quality} and {quality2}, or so most {profession} say.",
    "When {name} left the {place}, {weather}, so the walk home felt long.",
    "{name} was {feeling} to find an old {object} under the {furniture}.",
    "Our {thing} is {quality}, but {name} thinks it could be more {quality2}.",
    "Every {season}, {name} and {name2} spend a week by the {nature} and talk about {topic}.",
    "{name} forgot the {object} at the {place} and had to go back {time}.",
    "Some {profession} believe that {activity} is the best way to {benefit}.",
    "The {vehicle} was late again, and {name} felt {mood} while waiting until {clock}.",
    "It is often said that {activity} teaches us to be {virtue}.",
    "{name} handed the {object} to {name2} with a smile and said thank you.",
    "Nobody knew why the {animal} kept sitting on the {furniture} {time}.",
]




# ---------------------------------------------------------------------------------------------
# French
# ---------------------------------------------------------------------------------------------

FR_VOCAB = {
    "nom": ["Camille", "Louis", "Chloé", "Hugo", "Manon", "Jules", "Léa", "Paul", "Noémie",
            "Théo", "Margot", "Bastien", "Sophie", "Lucas"],
    "lieu": ["au marché", "à la boulangerie", "à la bibliothèque", "au parc", "à la gare",
             "à la plage", "au musée", "à la poste", "au jardin", "à l'école"],
    "achat": ["du pain", "des pommes", "du fromage", "des fleurs", "un journal",
              "des légumes", "une tarte aux poires", "du café"],
    "moment": ["ce matin", "hier soir", "samedi dernier", "avant le dîner", "après le déjeuner",
               "lundi matin", "en fin de journée"],
    "animal": ["le chat", "le chien", "le lapin", "le vieux cheval", "la chèvre", "le perroquet"],
    "meuble": ["la table", "la fenêtre", "le canapé", "l'escalier", "la bibliothèque du salon"],
    "sujet": ["les étoiles", "les bateaux anciens", "l'histoire des ponts", "les oiseaux",
              "la cuisine italienne", "les montagnes", "les jardins d'autrefois"],
    "activite": ["la marche", "la lecture", "la cuisine", "le jardinage", "la natation",
                 "le jeu d'échecs", "la musique", "le dessin"],
    "bienfait": ["se détendre", "mieux dormir", "rester en forme", "réfléchir calmement",
                 "se faire des amis", "oublier les soucis"],
    "saison": ["au printemps", "en été", "en automne", "en hiver"],
    "nature": ["la forêt", "la vallée", "le lac", "la colline", "la rivière", "la prairie"],
    "transport": ["le bus", "le train", "le tramway", "le bateau", "le taxi"],
    "heure": ["midi", "huit heures", "neuf heures et demie", "minuit", "six heures du soir"],
    "repas": ["le petit déjeuner", "le déjeuner", "le dîner", "le goûter"],
    "habitude": ["fait la vaisselle", "se promène un peu", "appelle sa sœur",
                 "écrit dans son carnet", "arrose les plantes", "écoute la radio"],
    "temps": ["il pleuvait fort", "le soleil brillait", "un vent froid soufflait",
              "le ciel était gris", "le brouillard couvrait la ville"],
    "objet": ["un parapluie", "une lettre", "une écharpe bleue", "une clé", "un carnet",
              "un panier", "une vieille photo"],
    "metier": ["les cuisiniers", "les professeurs", "les marins", "les médecins",
               "les agriculteurs", "les ingénieurs"],
    "sentiment": ["joie", "surprise", "soulagement", "fierté", "étonnement", "impatience"],
}

FR_TEMPLATES = [
    "{nom} a fait un tour {lieu} {moment} et a acheté {achat}.",
    "Pendant que {nom} lisait un livre sur {sujet}, {animal} dormait sous {meuble}.",
    "Beaucoup de gens aiment {activite} parce que cela les aide à {bienfait}.",
    "{Saison}, les promeneurs aiment traverser {nature} près du village.",
    "{nom} a demandé à {nom2} si {transport} arriverait avant {heure}.",
    "Après {repas}, {nom} {habitude}.",
    "Quand {nom} a quitté la maison, {temps}, alors le retour a semblé long.",
    "{nom} a retrouvé {objet} sous {meuble} avec {sentiment}.",
    "Selon {metier}, {activite} est le meilleur moyen de {bienfait}.",
    "{Transport} avait encore du retard, et {nom} attendait jusqu'à {heure}.",
    "Chaque année, {saison}, {nom} et {nom2} passent une semaine à explorer {nature}.",
    "{nom} a oublié {objet} {lieu} et a dû y retourner {moment}.",
    "On dit souvent que {activite} nous apprend la patience.",
    "{nom} a offert {objet} à {nom2} pour dire merci.",
    "Personne ne savait pourquoi {animal} restait devant {meuble} {moment}.",
    "Il faut parfois du courage pour présenter un exposé sur {sujet} devant toute la classe.",
    "{nom} regarde souvent des documentaires sur {sujet} avec {nom2}.",
    "Le matin, {nom} {habitude} avant de partir {lieu}.",
]




# ---------------------------------------------------------------------------------------------
# Code (Python, whitespace collapsed)
# ---------------------------------------------------------------------------------------------

CODE_VOCAB = {
    "noun": ["price", "score", "item", "order", "value", "record", "word", "user", "line",
             "point", "event", "file", "row", "task"],
    "verb": ["compute", "count", "filter", "collect", "find", "merge", "load", "parse",
             "clean", "group", "check", "update"],
    "op": [">", "<", ">=", "<=", "!=", "=="],
    "num": [str(n) for n in (0, 1, 2, 3, 5, 7, 10, 12, 42, 100)],
    "acc": ["total", "result", "acc", "count", "best", "out"],
    "key": ["name", "id", "kind", "size", "owner", "status"],
}

CODE_TEMPLATES = [
    "def {verb}_{noun}s({noun}s): {acc} = 0 for {noun} in {noun}s: if {noun} {op} {num}: "
    "{acc} += {noun} return {acc}",
    "def {verb}_{noun}({noun}s, limit={num}): return [x * 2 for x in {noun}s if x {op} limit]",
    "def max_{noun}({noun}s): {acc} = None for {noun} in {noun}s: if {acc} is None or "
    "{noun} > {acc}: {acc} = {noun} return {acc}",
    "def {verb}_by_{key}({noun}s): groups = {{}} for {noun} in {noun}s: "
    "groups.setdefault({noun}['{key}'], []).append({noun}) return groups",
    "def count_{noun}s(words): counts = {{}} for w in words: counts[w] = counts.get(w, 0) + 1 "
    "return counts",
    "def factorial(n): {acc} = 1 for i in range(2, n + 1): {acc} *= i return {acc}",
    "def gcd(a, b): while b != 0: a, b = b, a % b return a",
    "def fib(n): if n < 2: return n return fib(n - 1) + fib(n - 2)",
    "def read_{noun}s(path): with open(path) as f: return [line.strip() for line in f "
    "if line.strip()]",
    "def parse_{noun}(text): try: return int(text) except ValueError: return {num}",
    "class {Noun}: def __init__(self, {key}): self.{key} = {key} self.{noun}s = [] "
    "def add(self, {noun}): self.{noun}s.append({noun}) return len(self.{noun}s)",
    "def {verb}_{noun}s_sorted({noun}s): return sorted({noun}s, key=lambda x: x['{key}'], "
    "reverse=True)",
    "def is_valid_{noun}({noun}): if not {noun}: return False if len({noun}) {op} {num}: "
    "return False return True",
    "def {verb}_pairs(xs, ys): {acc} = [] for x, y in zip(xs, ys): {acc}.append((x, y)) "
    "return {acc}",
    "def format_{noun}({noun}): return f\"{{{noun}['{key}']}}: {{{noun}['{key2}']}}\"",
    "{acc} = [{verb}_{noun}(x) for x in range({num})] print(len({acc}))",
    "def mean_{noun}({noun}s): if not {noun}s: return 0.0 return sum({noun}s) / len({noun}s)",
]




# ---------------------------------------------------------------------------------------------
# Math (word problems and equations, answers computed)
# ---------------------------------------------------------------------------------------------

MATH_NAMES = ["Maria", "Ahmed", "Julia", "Ken", "Sara", "Pedro", "Lina", "Tariq", "Emma", "Jon"]
MATH_ITEMS = ["apples", "pencils", "marbles", "stickers", "books", "cookies", "stamps", "shells"]


def _math_add(rng: random.Random) -> str:
    a, b = rng.randint(3, 60), rng.randint(2, 40)
    name, item = pick(rng, MATH_NAMES), pick(rng, MATH_ITEMS)
    return f"If {name} has {a} {item} and buys {b} more, {name} has {a} + {b} = {a + b} {item}."


def _math_sub(rng: random.Random) -> str:
    a = rng.randint(20, 200)
    b = rng.randint(1, a - 1)
    name = pick(rng, MATH_NAMES)
    return (f"{name} had {a} dollars and spent {b} dollars, so {name} has "
            f"{a} - {b} = {a - b} dollars left.")


def _math_mul(rng: random.Random) -> str:
    q, p = rng.randint(2, 15), rng.randint(2, 25)
    name, item = pick(rng, MATH_NAMES), pick(rng, MATH_ITEMS)
    return (f"A shop sells {item} for {p} cents each. {name} buys {q} of them and pays "
            f"{q} * {p} = {q * p} cents.")


def _math_div(rng: random.Random) -> str:
    k, per = rng.randint(2, 9), rng.randint(2, 12)
    name, item = pick(rng, MATH_NAMES), pick(rng, MATH_ITEMS)
    return (f"{name} shares {k * per} {item} equally among {k} friends, so each friend gets "
            f"{k * per} / {k} = {per} {item}.")


def _math_linear(rng: random.Random) -> str:
    x, a, b = rng.randint(-9, 12), rng.randint(2, 9), rng.randint(1, 30)
    c = a * x + b
    return (f"Solve {a}x + {b} = {c}. Subtract {b} from both sides: {a}x = {c - b}. "
            f"Divide by {a}: x = {x}.")


def _math_rectangle(rng: random.Random) -> str:
    w, h = rng.randint(2, 30), rng.randint(2, 30)
    return (f"A rectangle with sides {w} and {h} has area {w} * {h} = {w * h} and perimeter "
            f"2 * ({w} + {h}) = {2 * (w + h)}.")


def _math_speed(rng: random.Random) -> str:
    s, t = rng.choice([40, 45, 50, 60, 72, 80, 90]), rng.randint(2, 6)
    return f"A train travels at {s} km per hour for {t} hours, so it covers {s} * {t} = {s * t} km."


def _math_percent(rng: random.Random) -> str:
    pct, base = rng.choice([10, 20, 25, 50, 75]), rng.choice([40, 80, 120, 200, 360, 400])
    return f"{pct}% of {base} is {pct} / 100 * {base} = {pct * base // 100}."


def _math_average(rng: random.Random) -> str:
    n, mean = rng.randint(3, 5), rng.randint(5, 50)
    xs = [mean + rng.randint(-4, 4) for _ in range(n - 1)]
    xs.append(mean * n - sum(xs))
    return (f"The average of {', '.join(map(str, xs))} is ({' + '.join(map(str, xs))}) / {n} "
            f"= {sum(xs)} / {n} = {mean}.")


def _math_quadratic(rng: random.Random) -> str:
    r1, r2 = sorted(rng.sample(range(1, 12), 2))
    return (f"Since x^2 - {r1 + r2}x + {r1 * r2} = (x - {r1})(x - {r2}), the roots are "
            f"x = {r1} and x = {r2}.")


def _math_triangular(rng: random.Random) -> str:
    n = rng.randint(5, 60)
    return (f"The sum of the first {n} positive integers is {n}({n} + 1) / 2 = "
            f"{n * (n + 1) // 2}.")


def _math_fraction(rng: random.Random) -> str:
    d = rng.randint(5, 13)
    a, b = rng.randint(1, d - 1), rng.randint(1, d - 1)
    return f"Adding fractions with the same denominator: {a}/{d} + {b}/{d} = {a + b}/{d}."


def _math_square(rng: random.Random) -> str:
    n = rng.randint(11, 40)
    return f"The square of {n} is {n} * {n} = {n * n}, so the square root of {n * n} is {n}."


MATH_GENERATORS = [_math_add, _math_sub, _math_mul, _math_div, _math_linear, _math_rectangle,
                   _math_speed, _math_percent, _math_average, _math_quadratic, _math_triangular,
                   _math_fraction, _math_square]




# ---------------------------------------------------------------------------------------------
# Chinese
# ---------------------------------------------------------------------------------------------

ZH_DIGITS = "零一二三四五六七八九"


def zh_number(n: int, count: bool = False) -> str:
    """0..999 in Chinese characters (25 -> 二十五, 305 -> 三百零五); ``count=True`` writes a
    leading 2 as 两 (两本书)."""
    hundreds, rest = divmod(n, 100)
    tens, ones = divmod(rest, 10)
    if hundreds:
        head = ("两" if count and hundreds == 2 else ZH_DIGITS[hundreds]) + "百"
        if rest == 0:
            return head
        return head + (ZH_DIGITS[tens] + "十" if tens else "零") + (ZH_DIGITS[ones] if ones else "")
    if tens == 0:
        return "两" if count and ones == 2 else ZH_DIGITS[ones]
    return ("" if tens == 1 else ZH_DIGITS[tens]) + "十" + (ZH_DIGITS[ones] if ones else "")


ZH_VOCAB = {
    "subj": ["我", "你", "他", "她", "我们", "老师", "学生们", "妈妈", "爸爸", "小明", "小红",
             "我的朋友", "奶奶", "哥哥"],
    "time": ["今天", "昨天", "明天早上", "周末", "晚上", "下午", "上个星期"],
    "place": ["公园", "学校", "图书馆", "书店", "超市", "饭馆", "火车站", "医院", "商场"],
    "vo": ["看书", "喝茶", "吃午饭", "买水果", "写作业", "打篮球", "做饭", "学习中文", "听音乐",
           "画画", "洗衣服", "散步", "唱歌"],
    "adj": ["好看", "有意思", "便宜", "干净", "热闹", "安静", "好吃"],
    "noun": ["这本书", "那家饭馆", "这个公园", "新电影", "这条裙子", "学校的食堂"],
    "weather": ["天气很好", "下雨了", "外面很冷", "阳光很好", "风很大"],
    "decision": ["决定在家休息", "想去外面走走", "带了一把伞", "穿了厚衣服", "没有出门"],
    "clock": ["六点", "六点半", "七点", "七点一刻", "八点"],
    "feeling": ["很高兴", "有点累", "非常忙", "很紧张", "特别开心"],
}

ZH_MEASURED = [("本", "书"), ("个", "苹果"), ("只", "猫"), ("杯", "茶"), ("张", "桌子"),
               ("辆", "自行车"), ("支", "笔"), ("件", "衣服")]

ZH_TEMPLATES = [
    "{time}{subj}在{place}{vo}。",
    "{subj}觉得{noun}很{adj}。",
    "因为{weather}，所以{subj}{decision}。",
    "{subj}喜欢{vo}，也喜欢{vo2}。",
    "{subj}每天{clock}起床，然后{vo}。",
    "{subj}和{subj2}一起去{place}{vo}。",
    "{time}{subj}{feeling}，因为要{vo}。",
    "{subj}问{subj2}：“你想不想去{place}？”",
    "{subj}不在{place}，{subj}在{place2}{vo}。",
    "虽然{weather}，但是{subj}还是去了{place}。",
    "{subj}{time}不想出门，想在家里{vo}。",
]


def _zh_shopping(rng: random.Random) -> str:
    measure, noun = pick(rng, ZH_MEASURED)
    n, price = rng.randint(2, 12), rng.randint(3, 30)
    subj = pick(rng, ZH_VOCAB["subj"])
    return (f"{subj}买了{zh_number(n, count=True)}{measure}{noun}，每{measure}"
            f"{zh_number(price)}块钱，一共{zh_number(n * price)}块钱。")


# ---------------------------------------------------------------------------------------------

DOMAINS: dict[str, tuple[list[Sentence], int, int, str]] = {
    # domain: (sentence generators, min sentences, max sentences, separator)
    "english": (from_templates(EN_TEMPLATES, EN_VOCAB), 2, 4, " "),
    "french": (from_templates(FR_TEMPLATES, FR_VOCAB), 2, 4, " "),
    "code": (from_templates(CODE_TEMPLATES, CODE_VOCAB), 2, 3, " "),
    "math": (MATH_GENERATORS, 2, 3, " "),
    "chinese": (from_templates(ZH_TEMPLATES, ZH_VOCAB) + [_zh_shopping], 3, 5, ""),
}


def generate(seed: int = SEED, n_samples: int = N_SAMPLES) -> dict[str, str]:
    """``{domain: file contents}`` of ``n_samples`` lines each; each domain has its own seeded
    generator (the training script draws more samples with another seed)."""
    files = {}
    for offset, (domain, (sentences, lo, hi, sep)) in enumerate(DOMAINS.items()):
        rng = random.Random(seed + offset)
        files[domain] = "\n".join(paragraphs(rng, sentences, lo, hi, sep, n_samples)) + "\n"
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, default=OUT_DIR)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--check", action="store_true", help="only verify the files are current")
    args = parser.parse_args(argv)
    stale = []
    for domain, text in generate(args.seed).items():
        path = args.out_dir / f"{domain}.txt"
        if args.check:
            if not path.is_file() or path.read_text(encoding="utf-8") != text:
                stale.append(str(path))
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        print(f"{path}: {text.count(chr(10))} samples, {len(text.encode())} bytes")
    if stale:
        print("out of date: " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
