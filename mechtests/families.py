"""GPT-2 prompt families, as the published experiments wrote them (see shared/published-values.md).

The organisms' families are built from their own synthetic language
(``mechtests.organisms.language``); these are the ones for real GPT-2-tokenizer models.
"""

from __future__ import annotations

from mechtests.core.prompts import PromptFamily

# Exploratory Analysis Demo (TransformerLens): four templates, each with both name orders;
# (template, first-named A, second-named B, the answer of the template's first prompt).
IOI_EA_TEMPLATES = [
    ("When {A} and {B} went to the shops, {S2} gave the bag to", "John", "Mary", "Mary"),
    ("When {A} and {B} went to the park, {S2} gave the ball to", "Tom", "James", "Tom"),
    ("When {A} and {B} went to the shops, {S2} gave an apple to", "Dan", "Sid", "Dan"),
    ("After {A} and {B} went to the park, {S2} gave a drink to", "Martin", "Amy", "Martin"),
]


def _ioi_prompt_family(name: str, rows: list[tuple[str, str, str, str]]) -> PromptFamily:
    """IOI prompts from (template, IO, S, order) rows; corrupted: S2 replaced by IO (the answer
    flips to S), so clean and corrupted differ only at S2, and positions IO, S1, S2, END."""
    prompts = []
    for template, io, s, order in rows:
        a, b = (io, s) if order == "ABBA" else (s, io)
        t = template.replace("{A}", "{IO}" if a == io else "{S1}")
        t = t.replace("{B}", "{S1}" if a == io else "{IO}")
        fill = {"IO": io, "S1": s, "S2": s}
        prompts += PromptFamily.from_template(
            name, t, [fill], lambda f: {**f, "S2": f["IO"]}, " {IO}", " {S1}"
        ).prompts
    return PromptFamily(name, prompts, prepend_bos=True)


def gpt2_ioi_ea() -> PromptFamily:
    """The 8 prompts of the Exploratory Analysis Demo (mean logit diff 3.552 in GPT-2 small).

    Prompt order as published: each template's two prompts in turn, the published answer
    first ("When John and Mary ..., John" -> Mary), then the names' roles swapped."""
    rows = []
    for template, a, b, answer in IOI_EA_TEMPLATES:
        other = b if answer == a else a
        for io, s in ((answer, other), (other, answer)):
            rows.append((template, io, s, "ABBA" if io == a else "BABA"))
    return _ioi_prompt_family("ioi_ea", rows)


IOI_NAMES = [("Mary", "John"), ("Tom", "James"), ("Dan", "Sid"), ("Martin", "Amy"),
             ("Sarah", "David"), ("Paul", "Lisa"), ("Anna", "Mark"), ("Kate", "Peter")]


def gpt2_ioi(order: str, names: list[tuple[str, str]] = IOI_NAMES) -> PromptFamily:
    """The four EA templates over eight name pairs, one order (ABBA or BABA): 32 prompts."""
    rows = [(t, io, s, order) for t, *_ in IOI_EA_TEMPLATES for io, s in names]
    return _ioi_prompt_family(f"ioi_{order.lower()}", rows)


# more common English first names, for models of any tokenizer: a name that is not one token
# there drops its prompts (``prompts.fit``), so the family is written larger than it must be
IOI_NAMES_MORE = [("Alice", "Bob"), ("Emma", "Jack"), ("Lucy", "Adam"), ("Rose", "Henry"),
                  ("Grace", "Luke"), ("Jane", "Mike"), ("Laura", "Steve"), ("Helen", "Chris")]


def any_ioi(order: str) -> PromptFamily:
    """The four EA templates over sixteen name pairs, one order: 64 prompts, split in two
    halves of 32 for a model with no reference of its shape (``claims.families.split_on``)."""
    return gpt2_ioi(order, IOI_NAMES + IOI_NAMES_MORE)


RECALL_FIRST = ["Michelle", "John", "Mary", "David", "Sarah", "James"]
RECALL_SURNAMES = [("Jones", "Smith"), ("Brown", "Wilson"), ("Taylor", "Davis"),
                   ("Miller", "Moore"), ("Johnson", "Williams"), ("Clark", "Lewis")]
# GPT-2's tokenizer splits both into 11 tokens (" top" "-" "not" "ch"; " well" "-" "known"), so
# the family runs as one batch with the surname at position 1 and the query at 10
RECALL_TEMPLATES = ["{FIRST} {SURNAME} was a top-notch student. {Q}",
                    "{FIRST} {SURNAME} was a well-known local writer. {Q}"]


def gpt2_name_recall_michelle() -> PromptFamily:
    """The course exercise's single prompt, no BOS (its published probabilities are without)."""
    return PromptFamily.from_template(
        "recall_michelle", RECALL_TEMPLATES[0],
        [{"FIRST": "Michelle", "SURNAME": "Jones", "Q": "Michelle"}],
        lambda f: {**f, "SURNAME": "Smith"}, " {SURNAME}", " Smith", prepend_bos=False,
    )


def gpt2_name_recall() -> PromptFamily:
    """Name recall, no BOS: each first name with its own surname pair, in both templates (12
    prompts, every name and surname once per template). Its claims sweep every (layer,
    position), 132 patched forwards of GPT-2 small per prompt: all 72 pairings took ten minutes
    of one CPU core for what 12 show as well (the restoration it measures is near 0 or 1)."""
    fills = [{"FIRST": f, "SURNAME": a, "Q": f, "B": b}
             for f, (a, b) in zip(RECALL_FIRST, RECALL_SURNAMES)]
    return PromptFamily.from_template(
        "recall", RECALL_TEMPLATES, fills, lambda f: {**f, "SURNAME": f["B"]}, " {SURNAME}",
        " {B}", prepend_bos=False,
    )


RECALL_FIRST_MORE = ["Emma", "Robert", "Laura", "Peter", "Susan", "Daniel"]
RECALL_SURNAMES_MORE = [("Walker", "Hall"), ("Young", "King"), ("Wright", "Green"),
                        ("Baker", "Adams"), ("Hill", "Scott"), ("Carter", "Turner")]


def any_name_recall() -> PromptFamily:
    """``gpt2_name_recall`` with twice the names (24 prompts), for a model of any tokenizer."""
    fills = [{"FIRST": f, "SURNAME": a, "Q": f, "B": b}
             for f, (a, b) in zip(RECALL_FIRST + RECALL_FIRST_MORE,
                                  RECALL_SURNAMES + RECALL_SURNAMES_MORE)]
    return PromptFamily.from_template(
        "recall", RECALL_TEMPLATES, fills, lambda f: {**f, "SURNAME": f["B"]}, " {SURNAME}",
        " {B}", prepend_bos=False,
    )


# (earlier contraction, later pronoun) pairings studied in the notebook; the later verb takes
# the pronoun's form in the earlier verb's style: "We're helping our friend while they" -> 're
CONTRACTION_PAIRINGS = [("'re", "they"), ("'re", "he"), ("'re", "she"), ("'s", "we"),
                        ("'s", "they"), ("'s", "he"), ("'s", "she")]
CONTRACTION_SUBJECTS = {"'re": ("We", "You"), "'s": ("He", "She")}
CONTRACTION_TEMPLATES = ["{P1}{V1} helping our friend while {P2}",
                         "{P1}{V1} cooking dinner tonight as {P2}"]
FORMS = {"we": ("'re", " are"), "they": ("'re", " are"), "you": ("'re", " are"),
         "he": ("'s", " is"), "she": ("'s", " is")}


def gpt2_contraction() -> PromptFamily:
    """Every pairing in both templates, the first template with the first subject and the
    second with the second: 14 prompts, positions P1, V1, P2, END. (Its top-head claim sweeps
    all 144 heads; both subjects in both templates doubled the time and added no pairing.)

    Answer: the later pronoun's contracted verb; counterfactual: its full form; corrupted: the
    earlier verb written in full (`` are``/`` is``: as many tokens), so the style cue flips."""
    prompts = []
    for c, p2 in CONTRACTION_PAIRINGS:
        full = {"'re": " are", "'s": " is"}[c]
        contracted, uncontracted = FORMS[p2]
        for template, p1 in zip(CONTRACTION_TEMPLATES, CONTRACTION_SUBJECTS[c]):
            prompts += PromptFamily.from_template(
                "contraction", template, [{"P1": p1, "V1": c, "P2": p2}],
                lambda f, full=full: {**f, "V1": full}, contracted, uncontracted,
            ).prompts
    return PromptFamily("contraction", prompts, prepend_bos=True)


GENDERED = [("king", "queen"), ("man", "woman"), ("father", "mother"), ("boy", "girl"),
            ("brother", "sister"), ("husband", "wife"), ("uncle", "aunt"), ("son", "daughter")]
GENDER_TEMPLATES = ["The {NOUN} said that", "My {NOUN} thought that"]


def gpt2_gender() -> PromptFamily:
    """Male-noun prompts (answer `` he``) corrupted to the female noun (answer `` she``)."""
    fills = [{"NOUN": m, "F": f} for m, f in GENDERED]
    return PromptFamily.from_template(
        "gender", GENDER_TEMPLATES, fills, lambda f: {**f, "NOUN": f["F"]}, " he", " she",
    )
