"""The synthetic languages the model organisms are trained on, and prompt generators for claims.

Two languages:

* the **bigram language** (``bigram`` organism): words in classes (determiners, adjectives,
  nouns, verbs, ...) emitted by a fixed first-order Markov chain whose exact transition table is
  ``bigram_table()``;
* the **multitask language** (``induction`` and ``multitask`` organisms): short word-level
  documents, one task per document, written so that the mechanisms found in GPT-2 must form:
  indirect object identification (IOI), name recall, contraction agreement, gendered pronouns
  and repeated random segments.

Every word is one token (word-level tokenizer, whitespace split, punctuation spaced out), so
texts are plain strings: ``text.split()`` are the tokens after ``<bos>``.

Prompt generators return dicts, the same shape for every task::

    {"task", "template", "clean", "corrupted", "answer", "counterfactual",
     "positions": {name: word index in clean.split()},   # add 1 for <bos>
     "marks": {name: character offset in clean},          # mechtests.core.prompts.Prompt.marks
     ...task fields (IO, S, first, surname, ...)}

``answer``/``counterfactual`` carry a leading space (``" Mary"``), the GPT-2 convention; the
word-level tokenizer ignores it. Within one ``template`` every prompt has the same word count
and clean/corrupted have equal counts, so a family per template runs as one patching batch.
``split="train"`` draws from the training word lists, ``split="test"`` from held-out names,
surnames, places and objects; ``split="all"`` from both. Held-out names occur in training only
in the gender task (which uses every name: gender is a lexical fact a model can only learn by
seeing the word) and in random segments; held-out surnames, places and objects only in random
segments. So the test split of IOI and name recall asks whether the circuit generalises to
names it never saw in that task.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Sequence
from typing import Any

# ---------------------------------------------------------------------------------------------
# word lists (order matters: it fixes token ids). The last HELD_OUT_* of each list are test-only.

MALE_NAMES = (
    "John David James Michael Robert William Thomas Daniel Paul Mark George Steven Edward Brian "
    "Kevin Jason Jeff Ryan Gary Eric Peter Frank Scott Adam Henry Carl Sam Tom Jack Luke Oscar "
    "Victor Hugo Ivan Leo Max Noah Owen Felix Simon"
).split()
FEMALE_NAMES = (
    "Mary Sarah Michelle Lisa Emma Anna Laura Kate Julia Rachel Amy Helen Alice Grace Rose "
    "Claire Diana Emily Hannah Jane Lucy Nora Olivia Sophie Tina Vera Wendy Zoe Ruth Irene Paula "
    "Nancy Linda Carol Megan Fiona Eva Ida Joan Kim"
).split()
SURNAMES = (
    "Jones Smith Brown Taylor Wilson Davies Evans Johnson Roberts Walker Wright Robinson Thompson "
    "White Hughes Edwards Green Hall Wood Harris Lewis Clarke Jackson Turner Hill Cooper Ward "
    "Morris Moore Watson Baker Harrison Morgan Patel Young Allen Mitchell Anderson Bell Parker "
    "Kelly Miller Carter Shaw Lloyd Marshall Price Bennett Griffin Fisher Ellis Webb Rogers "
    "Stone Hunt Palmer"
).split()
PLACES = (
    "store school park garden office station market beach library museum cafe hospital "
    "restaurant church bank theater zoo farm airport hotel gym bakery harbor castle"
).split()
OBJECTS = (
    "drink book ball key letter ring flower gift pen bag cake hat coat lamp cup map card toy "
    "watch shirt basket phone ticket candle"
).split()
GENDER_PAIRS = (
    ("king", "queen"), ("man", "woman"), ("boy", "girl"), ("father", "mother"),
    ("son", "daughter"), ("brother", "sister"), ("uncle", "aunt"), ("husband", "wife"),
    ("prince", "princess"), ("actor", "actress"), ("waiter", "waitress"), ("lord", "lady"),
    ("nephew", "niece"), ("monk", "nun"), ("groom", "bride"), ("duke", "duchess"),
    ("grandfather", "grandmother"), ("emperor", "empress"),
)
MALE_NOUNS = tuple(m for m, _ in GENDER_PAIRS)
FEMALE_NOUNS = tuple(f for _, f in GENDER_PAIRS)
ADJECTIVES = "happy tired late ready busy hungry early calm sure sorry glad free".split()

HELD_OUT_NAMES = 8  # per gender
HELD_OUT_SURNAMES = 10
HELD_OUT_FILLERS = 4  # places and objects

# pronoun -> (full verb, contracted verb): the two styles of the contraction task
CONTRACTIONS = {"we": ("are", "'re"), "they": ("are", "'re"), "you": ("are", "'re"),
                "he": ("is", "'s"), "she": ("is", "'s")}

# ---------------------------------------------------------------------------------------------
# templates: {A} {B} {C} names, {PLACE}, {OBJECT}; one word per slot

IOI_TEMPLATES = (
    "When {A} and {B} went to the {PLACE} , {C} gave a {OBJECT} to",
    "Then , {A} and {B} had a long day at the {PLACE} . {C} gave a {OBJECT} to",
    "After {A} and {B} went to the {PLACE} , {C} handed a {OBJECT} to",
    "While {A} and {B} were working at the {PLACE} , {C} passed a {OBJECT} to",
    "Friends {A} and {B} found a {OBJECT} at the {PLACE} . {C} gave it to",
    "The {PLACE} was quiet when {A} and {B} arrived . {C} brought a {OBJECT} to",
)
# name recall: {F} {L} the person asked about; {F2} {L2} a distractor; {Q} the query name
RECALL_TEMPLATES = (
    "{F} {L} was a top student . {Q}",
    "Yesterday {F} {L} bought a {OBJECT} at the {PLACE} . {Q}",
    "{F} {L} and {F2} {L2} were top students . {Q}",
    "{F2} {L2} and {F} {L} were top students . {Q}",
    "{F} {L} met {F2} {L2} at the {PLACE} . {Q}",
    "{F2} {L2} lives near the {PLACE} and {F} {L} works at the {OTHER} . {Q}",
)
# contraction: {P1} {V1} sets the style, {P2} asks for the verb in that style
CONTRACTION_TEMPLATES = (
    "{P1} {V1} {ADJ} at the {PLACE} , and now {P2}",
    "{P1} {V1} going to the {PLACE} . {NAME} says {P2}",
    "at the {PLACE} {P1} {V1} {ADJ} , but tomorrow {P2}",
    "{P1} {V1} not sure if {P2}",
)
# gender: {N} a gendered noun (or name with {NAME}) -> he / she
GENDER_TEMPLATES = (
    "the {N} said that",
    "the {N} went to the {PLACE} because",
    "{NAME} said that",
    "the {N} bought a {OBJECT} and then",
    "{NAME} was at the {PLACE} when",
    "when the {N} saw the {OBJECT} ,",
)

TASKS = ("ioi", "recall", "contraction", "gender", "repeat")
SPECIALS = ("<bos>", "<unk>")


def _template_words(templates: Sequence[str]) -> list[str]:
    return [w for t in templates for w in t.split() if not w.startswith("{")]


def multitask_vocab() -> list[str]:
    """Every word of the multitask language, specials first, in a fixed order (= token ids)."""
    words = [
        *SPECIALS, ".", ",",
        *_template_words(IOI_TEMPLATES), *_template_words(RECALL_TEMPLATES),
        *_template_words(CONTRACTION_TEMPLATES), *_template_words(GENDER_TEMPLATES),
        *MALE_NAMES, *FEMALE_NAMES, *SURNAMES, *PLACES, *OBJECTS, *MALE_NOUNS, *FEMALE_NOUNS,
        *ADJECTIVES, *CONTRACTIONS, *(v for pair in CONTRACTIONS.values() for v in pair),
        "he", "she",
    ]
    return list(dict.fromkeys(words))


def content_words() -> list[str]:
    """Words random segments are drawn from: the whole multitask vocabulary but specials."""
    return [w for w in multitask_vocab() if w not in SPECIALS]


# ---------------------------------------------------------------------------------------------
# splits


def _split(words: Sequence[Any], n_held: int, split: str) -> list[Any]:
    if split == "train":
        return list(words[:-n_held])
    if split == "test":
        return list(words[-n_held:])
    if split == "all":
        return list(words)
    raise ValueError(f"split {split!r}: use 'train', 'test' or 'all'")


def names(split: str = "train", gender: str | None = None) -> list[str]:
    """First names of a split; ``gender`` 'male' / 'female' / None (both)."""
    out = []
    if gender in (None, "male"):
        out += _split(MALE_NAMES, HELD_OUT_NAMES, split)
    if gender in (None, "female"):
        out += _split(FEMALE_NAMES, HELD_OUT_NAMES, split)
    if not out:
        raise ValueError(f"gender {gender!r}: use 'male', 'female' or None")
    return out


def surnames(split: str = "train") -> list[str]:
    return _split(SURNAMES, HELD_OUT_SURNAMES, split)


def places(split: str = "train") -> list[str]:
    return _split(PLACES, HELD_OUT_FILLERS, split)


def objects(split: str = "train") -> list[str]:
    return _split(OBJECTS, HELD_OUT_FILLERS, split)


# ---------------------------------------------------------------------------------------------
# filling templates


def _fill(template: str, slots: dict[str, str]) -> tuple[str, dict[str, int], dict[str, int]]:
    """Text, word index and character offset of each slot's first occurrence."""
    words, positions, marks, offset = [], {}, {}, 0
    for i, w in enumerate(template.split()):
        if w.startswith("{") and w.endswith("}"):
            key = w[1:-1]
            positions.setdefault(key, i)
            marks.setdefault(key, offset)
            w = slots[key]
        words.append(w)
        offset += len(w) + 1
    return " ".join(words), positions, marks


def _with_end(d: dict[str, Any]) -> dict[str, Any]:
    n = len(d["clean"].split())
    d["positions"]["END"] = n - 1
    d["marks"]["END"] = len(d["clean"]) - len(d["clean"].split()[-1])
    return d


def _pick_template(rng: random.Random, templates: Sequence[str], template: int | None) -> int:
    if template is None:
        return rng.randrange(len(templates))
    if not 0 <= template < len(templates):
        raise ValueError(f"template {template}: there are {len(templates)} (0..{len(templates)-1})")
    return template


def _pick(rng: random.Random, value: str | None, options: tuple[str, str], what: str) -> str:
    """``value``, or a random one of ``options`` when None (one draw either way it is drawn)."""
    v = value or rng.choice(options)
    if v not in options:
        raise ValueError(f"{what} {v!r}: use {options[0]!r} or {options[1]!r}")
    return v


def ioi_prompts(n: int, seed: int = 0, order: str | None = None, template: int | None = None,
                split: str = "train", corruption: str = "abc") -> list[dict[str, Any]]:
    """IOI prompts: ``When Mary and John went to the store , John gave a drink to`` -> Mary.

    ``order`` 'ABBA' (IO first) / 'BABA' (S first) / None (either, at random). Corruption
    ``'abc'``: all three names replaced by three fresh names (Wang et al.'s ABC distribution, no
    IO/S information left); ``'flip'``: S2 replaced by IO, so the other name becomes right.
    Answer ``IO``, counterfactual ``S``. Positions IO, S1, S2, END (word indices).
    """
    if corruption not in ("abc", "flip"):
        raise ValueError(f"corruption {corruption!r}: use 'abc' or 'flip'")
    rng = random.Random(f"ioi-{seed}")
    pool, pl, ob = names(split), places(split), objects(split)
    out = []
    for _ in range(n):
        t = _pick_template(rng, IOI_TEMPLATES, template)
        o = _pick(rng, order, ("ABBA", "BABA"), "order")
        io, s, x, y, z = rng.sample(pool, 5)
        place, obj = rng.choice(pl), rng.choice(ob)
        a, b = (io, s) if o == "ABBA" else (s, io)
        clean, pos, marks = _fill(IOI_TEMPLATES[t], dict(A=a, B=b, C=s, PLACE=place, OBJECT=obj))
        bad = dict(A=x, B=y, C=z) if corruption == "abc" else dict(A=a, B=b, C=io)
        corrupted, _, _ = _fill(IOI_TEMPLATES[t], dict(bad, PLACE=place, OBJECT=obj))
        io_key, s_key = ("A", "B") if o == "ABBA" else ("B", "A")
        out.append(_with_end(dict(
            task="ioi", template=t, order=o, clean=clean, corrupted=corrupted,
            answer=" " + io, counterfactual=" " + s, IO=io, S=s, place=place, object=obj,
            positions=dict(IO=pos[io_key], S1=pos[s_key], S2=pos["C"]),
            marks=dict(IO=marks[io_key], S1=marks[s_key], S2=marks["C"]),
        )))
    return out


def recall_prompts(n: int, seed: int = 0, template: int | None = None,
                   split: str = "train") -> list[dict[str, Any]]:
    """Name recall: ``Michelle Jones was a top student . Michelle`` -> Jones.

    Some templates add a distractor person (``{F2} {L2}``), so the surname must be looked up by
    the repeated first name (induction), not by position. Corruption: the asked-about person's
    surname replaced by another one (the counterfactual). Positions FIRST (the first name's
    first occurrence), SURNAME, END (the repeated first name).
    """
    rng = random.Random(f"recall-{seed}")
    pool, sur, pl, ob = names(split), surnames(split), places(split), objects(split)
    out = []
    for _ in range(n):
        t = _pick_template(rng, RECALL_TEMPLATES, template)
        f, f2 = rng.sample(pool, 2)
        last, last2, other = rng.sample(sur, 3)
        place, place2 = rng.sample(pl, 2)
        slots = dict(F=f, L=last, F2=f2, L2=last2, Q=f, PLACE=place, OTHER=place2,
                     OBJECT=rng.choice(ob))
        clean, pos, marks = _fill(RECALL_TEMPLATES[t], slots)
        corrupted, _, _ = _fill(RECALL_TEMPLATES[t], dict(slots, L=other))
        out.append(_with_end(dict(
            task="recall", template=t, clean=clean, corrupted=corrupted,
            answer=" " + last, counterfactual=" " + other, first=f, surname=last,
            distractor=(f2, last2) if "{F2}" in RECALL_TEMPLATES[t] else None,
            positions=dict(FIRST=pos["F"], SURNAME=pos["L"]),
            marks=dict(FIRST=marks["F"], SURNAME=marks["L"]),
        )))
    return out


def contraction_prompts(n: int, seed: int = 0, template: int | None = None,
                        style: str | None = None, split: str = "train") -> list[dict[str, Any]]:
    """Contraction agreement: ``they 're happy at the park , and now she`` -> 's.

    ``style`` 'contracted' ('re / 's) or 'full' (are / is) or None (either): the verb after the
    last pronoun repeats the style of the earlier verb, in the last pronoun's number. The
    counterfactual is the same verb in the other style; the corruption flips the earlier verb's
    style (so the counterfactual becomes right). Positions P1, V1 (the style cue), END (P2).
    """
    rng = random.Random(f"contraction-{seed}")
    pool, pl = names(split), places(split)
    out = []
    for _ in range(n):
        t = _pick_template(rng, CONTRACTION_TEMPLATES, template)
        st = _pick(rng, style, ("contracted", "full"), "style")
        k = 1 if st == "contracted" else 0
        p1, p2 = rng.choice(list(CONTRACTIONS)), rng.choice(list(CONTRACTIONS))
        slots = dict(P1=p1, P2=p2, V1=CONTRACTIONS[p1][k], ADJ=rng.choice(ADJECTIVES),
                     PLACE=rng.choice(pl), NAME=rng.choice(pool))
        clean, pos, marks = _fill(CONTRACTION_TEMPLATES[t], slots)
        corrupted, _, _ = _fill(CONTRACTION_TEMPLATES[t], dict(slots, V1=CONTRACTIONS[p1][1 - k]))
        out.append(_with_end(dict(
            task="contraction", template=t, style=st, clean=clean, corrupted=corrupted,
            answer=" " + CONTRACTIONS[p2][k], counterfactual=" " + CONTRACTIONS[p2][1 - k],
            pronoun=p2, positions=dict(P1=pos["P1"], V1=pos["V1"]),
            marks=dict(P1=marks["P1"], V1=marks["V1"]),
        )))
    return out


def gender_prompts(n: int, seed: int = 0, template: int | None = None, gender: str | None = None,
                   split: str = "train") -> list[dict[str, Any]]:
    """Gendered pronouns: ``the king said that`` -> he; ``Mary said that`` -> she.

    ``gender`` 'male' / 'female' / None (either). Corruption: the noun swapped for its pair
    (king -> queen), or the name for a name of the other gender. Counterfactual: the other
    pronoun. Positions NOUN (the gendered word), END. Every split uses every gendered noun and
    name (a word's gender cannot be guessed); ``split`` picks the places and objects.
    """
    rng = random.Random(f"gender-{seed}")
    pairs, pl, ob = GENDER_PAIRS, places(split), objects(split)
    out = []
    for _ in range(n):
        t = _pick_template(rng, GENDER_TEMPLATES, template)
        g = _pick(rng, gender, ("male", "female"), "gender")
        other = "female" if g == "male" else "male"
        pair = rng.choice(pairs)
        noun, swapped = (pair[0], pair[1]) if g == "male" else (pair[1], pair[0])
        name, other_name = rng.choice(names("all", g)), rng.choice(names("all", other))
        slots = dict(N=noun, NAME=name, PLACE=rng.choice(pl), OBJECT=rng.choice(ob))
        clean, pos, marks = _fill(GENDER_TEMPLATES[t], slots)
        corrupted, _, _ = _fill(GENDER_TEMPLATES[t], dict(slots, N=swapped, NAME=other_name))
        key = "NAME" if "{NAME}" in GENDER_TEMPLATES[t] else "N"
        he, she = (" he", " she") if g == "male" else (" she", " he")
        out.append(_with_end(dict(
            task="gender", template=t, gender=g, clean=clean, corrupted=corrupted, answer=he,
            counterfactual=she, noun=slots[key], positions=dict(NOUN=pos[key]),
            marks=dict(NOUN=marks[key]),
        )))
    return out


def repeat_prompts(n: int, seed: int = 0, length: int = 8, words: Sequence[str] | None = None,
                   split: str = "all", prefix: int = 0) -> list[dict[str, Any]]:
    """Repeated random segments: ``[p1 .. pk] w1 .. wL w1 .. w(L-1)`` -> wL (induction).

    Words are drawn without replacement from ``words`` (default: ``content_words()``), so each
    token's earlier occurrence is unique; ``prefix`` random words come first (training uses a
    random prefix so that only content, not position, finds the earlier copy). Corruption: the
    first copy replaced by fresh words (nothing to copy from). Counterfactual: a word absent
    from both. Positions FIRST (wL's first occurrence), END. ``full`` holds the whole
    ``prefix seg seg`` text for loss measurements. ``split`` is accepted for a uniform
    interface: random segments are fresh in every split.
    """
    if length < 2:
        raise ValueError(f"length {length}: a repeated segment needs at least 2 words")
    rng = random.Random(f"repeat-{seed}")
    pool = list(words or content_words())
    out = []
    for _ in range(n):
        w = rng.sample(pool, prefix + 2 * length + 1)
        pre, seg, fresh, cf = w[:prefix], w[prefix:prefix + length], w[prefix + length:-1], w[-1]
        clean = " ".join(pre + seg + seg[:-1])
        corrupted = " ".join(pre + fresh + seg[:-1])
        first = prefix + length - 1
        out.append(_with_end(dict(
            task="repeat", template=(prefix, length), clean=clean, corrupted=corrupted,
            answer=" " + seg[-1], counterfactual=" " + cf, full=" ".join(pre + seg + seg),
            positions=dict(FIRST=first),
            marks=dict(FIRST=len(" ".join((pre + seg)[:first])) + (1 if first else 0)),
        )))
    return out


GENERATORS = {"ioi": ioi_prompts, "recall": recall_prompts, "contraction": contraction_prompts,
              "gender": gender_prompts, "repeat": repeat_prompts}


def prompts(task: str, n: int, seed: int = 0, **kw: Any) -> list[dict[str, Any]]:
    """``GENERATORS[task](n, seed, **kw)`` with a clear error for an unknown task."""
    if task not in GENERATORS:
        raise ValueError(f"task {task!r}: choose one of {', '.join(GENERATORS)}")
    return GENERATORS[task](n, seed, **kw)


def training_text(item: dict[str, Any]) -> str:
    """A training document: the prompt, its answer, and a full stop."""
    if item["task"] == "repeat":
        return item["full"]
    return f"{item['clean']}{item['answer']} ."


def as_family(name: str, items: Sequence[dict[str, Any]], description: str = ""):
    """A ``mechtests.core.prompts.PromptFamily`` from generated prompts (marks become positions)."""
    from mechtests.core.prompts import Prompt, PromptFamily

    return PromptFamily(name, [
        Prompt(d["clean"], d["corrupted"], d["answer"], d["counterfactual"],
               {k: v for k, v in d["marks"].items() if k != "END"})
        for d in items
    ], description=description)


# ---------------------------------------------------------------------------------------------
# the bigram language

BIGRAM_CLASSES = {
    "DET": "the a this that every some my your".split(),
    "ADJ": ("big small red old young happy sad green tall short quiet loud dark bright soft "
            "warm cold fast slow kind").split(),
    "NOUN": ("dog cat bird horse fish cow sheep mouse lion tiger farmer teacher doctor child "
             "baker pilot sailor singer tree river house car boat chair table window door "
             "garden city road hill stone cloud apple bread cheese shoe hat box").split(),
    "NAME": "Anna Ben Cleo Dan Eve Finn Gus Hana Ivo Jade Kai Lena Milo Nina Otto Pia".split(),
    "VERB": ("sees eats likes finds takes wants holds needs helps calls hears moves pulls "
             "pushes carries paints visits follows watches meets loves hates buys sells").split(),
    "ADV": "quickly slowly often rarely today again gladly quietly".split(),
    "PREP": "on in with near under behind over beside".split(),
    "CONJ": "and but so while".split(),
    "END": ["."],
}
# class -> {next class: probability}; '<bos>' starts a document like '.' does
BIGRAM_CLASS_CHAIN = {
    "BOS": {"DET": 0.7, "NAME": 0.3},
    "END": {"DET": 0.6, "NAME": 0.4},
    "DET": {"ADJ": 0.35, "NOUN": 0.65},
    "ADJ": {"ADJ": 0.15, "NOUN": 0.85},
    "NOUN": {"VERB": 0.55, "PREP": 0.15, "END": 0.15, "CONJ": 0.15},
    "NAME": {"VERB": 0.8, "CONJ": 0.2},
    "VERB": {"DET": 0.5, "NAME": 0.2, "ADV": 0.15, "END": 0.15},
    "ADV": {"END": 0.5, "PREP": 0.3, "CONJ": 0.2},
    "PREP": {"DET": 1.0},
    "CONJ": {"DET": 0.6, "NAME": 0.4},
}
BIGRAM_LANGUAGE_SEED = 0  # fixes the word-level preferences: one language, whatever the run seed


def bigram_vocab() -> list[str]:
    """``<bos> <unk>`` then the words class by class (= token ids)."""
    return [*SPECIALS, *(w for ws in BIGRAM_CLASSES.values() for w in ws)]


def bigram_word_class() -> dict[str, str]:
    """word -> class name (``<bos>`` -> 'BOS', ``<unk>`` -> 'UNK')."""
    out = {"<bos>": "BOS", "<unk>": "UNK"}
    out.update({w: c for c, ws in BIGRAM_CLASSES.items() for w in ws})
    return out


def bigram_table():
    """The exact transition table (a fresh copy; see ``_bigram_table``)."""
    return _bigram_table().clone()


@functools.lru_cache(maxsize=1)
def _bigram_table():
    """The exact transition table ``P[i, j] = P(next = vocab[j] | current = vocab[i])``.

    The class chain picks the next class; within it each current word has its own preferences
    over the next words (Dirichlet(1) draws, seeded by ``BIGRAM_LANGUAGE_SEED``), so the table
    has word-level detail beyond the classes. The ``<unk>`` row is uniform and never visited.
    """
    import torch

    vocab = bigram_vocab()
    idx = {w: i for i, w in enumerate(vocab)}
    cls = bigram_word_class()
    g = torch.Generator().manual_seed(BIGRAM_LANGUAGE_SEED)
    P = torch.zeros(len(vocab), len(vocab), dtype=torch.float64)
    for w in vocab:
        if w == "<unk>":
            P[idx[w]] = 1.0 / len(vocab)
            continue
        for nxt_cls, p in BIGRAM_CLASS_CHAIN[cls[w]].items():
            targets = BIGRAM_CLASSES[nxt_cls]
            pref = torch._standard_gamma(torch.ones(len(targets), dtype=torch.float64),
                                         generator=g)
            P[idx[w], [idx[t] for t in targets]] = p * pref / pref.sum()
    return P


def bigram_sample(n: int, length: int, seed: int = 0):
    """``n`` token sequences [n, length] from the chain, each starting at ``<bos>``."""
    import torch

    P = _bigram_table().float()
    g = torch.Generator().manual_seed(seed)
    out = torch.zeros(n, length, dtype=torch.long)  # column 0 is <bos> (id 0)
    for t in range(1, length):
        out[:, t] = torch.multinomial(P[out[:, t - 1]], 1, generator=g)[:, 0]
    return out


def encode(texts: Sequence[str], ids: dict[str, int]) -> list[list[int]]:
    """``<bos>`` + word ids of each text (the organisms' word-level tokenization)."""
    out = []
    for t in texts:
        try:
            out.append([ids["<bos>"]] + [ids[w] for w in t.split()])
        except KeyError as exc:
            raise ValueError(f"word {exc} of {t!r} is not in the vocabulary") from None
    return out
