"""Prompt families: clean and corrupted prompts, answers, and named positions, from templates.

A family is the unit a claim is measured on: ``When {IO} and {S1} went to the {PLACE} , {S2}
gave a {OBJ} to`` over many fills, with its corrupted twin, the answer (`` {IO}``) and the
counterfactual (`` {S1}``). Tokenizing against a model checks everything a patching run assumes
(same token counts, single-token answers that differ from their counterfactuals, positions that
exist, no word the tokenizer maps to its unknown token) and says what split where.
"""

from __future__ import annotations

import functools
import string
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch


class PromptError(ValueError):
    """A prompt family does not fit the model's tokenizer (the message shows the token splits)."""


@dataclass(frozen=True)
class Prompt:
    """One clean/corrupted pair. ``marks`` maps a position name to a character offset in
    ``clean`` (where that named word starts); ``END`` (the last token) is always available."""

    clean: str
    corrupted: str
    answer: str
    counterfactual: str
    marks: dict[str, int] = field(default_factory=dict)


@dataclass
class PromptFamily:
    """A named list of prompts, measured together as one batch."""

    name: str
    prompts: list[Prompt]
    prepend_bos: bool = True
    description: str = ""

    def __post_init__(self) -> None:
        if not self.prompts:
            raise PromptError(f"family {self.name!r} is empty: give it at least one prompt")

    def __len__(self) -> int:
        return len(self.prompts)

    @classmethod
    def from_template(
        cls,
        name: str,
        templates: str | Sequence[str],
        fills: Iterable[dict[str, str]],
        corrupt: Callable[[dict[str, str]], dict[str, str]],
        answer: str,
        counterfactual: str,
        prepend_bos: bool = True,
        description: str = "",
    ) -> PromptFamily:
        """Every template with every fill. ``corrupt(fill)`` gives the corrupted fill; ``answer``
        and ``counterfactual`` are format strings over the clean fill, e.g. ``" {IO}"``. Each
        ``{SLOT}`` of the template becomes a named position (where that slot's word starts)."""
        if isinstance(templates, str):
            templates = [templates]
        prompts = []
        for fill in fills:
            bad = corrupt(dict(fill))
            for t in templates:
                prompts.append(Prompt(
                    clean=_format(t, fill, name),
                    corrupted=_format(t, bad, name),
                    answer=_format(answer, fill, name),
                    counterfactual=_format(counterfactual, fill, name),
                    marks=_slot_offsets(t, fill),
                ))
        return cls(name, prompts, prepend_bos, description)

    def tokenize(self, model_or_tokenizer: Any) -> TokenizedFamily:
        """Token ids for the model's tokenizer, validated (see ``PromptError``)."""
        tok = getattr(model_or_tokenizer, "tokenizer", model_or_tokenizer)
        return _tokenize(self, tok)


@dataclass
class TokenizedFamily:
    """A family as tensors: ``clean``/``corrupted`` [n, T], answer ids [n], positions [n]."""

    family: PromptFamily
    clean: torch.Tensor
    corrupted: torch.Tensor
    answer_ids: torch.Tensor
    counterfactual_ids: torch.Tensor
    positions: dict[str, torch.Tensor]
    str_tokens: list[str]

    @property
    def n_prompts(self) -> int:
        return self.clean.shape[0]

    @property
    def pos_labels(self) -> list[str]:
        """Position tick labels: ``"10 John"`` (index and the first prompt's token)."""
        return [f"{i} {t.strip() or repr(t)}" for i, t in enumerate(self.str_tokens)]

    def to(self, device: str | torch.device) -> TokenizedFamily:
        return TokenizedFamily(
            self.family, self.clean.to(device), self.corrupted.to(device),
            self.answer_ids.to(device), self.counterfactual_ids.to(device),
            {k: v.to(device) for k, v in self.positions.items()}, self.str_tokens,
        )

    def subset(self, idx: Sequence[int]) -> TokenizedFamily:
        """The prompts at ``idx`` (in that order) as a family of their own."""
        ix = torch.as_tensor(list(idx), dtype=torch.long)
        fam = PromptFamily(self.family.name, [self.family.prompts[i] for i in idx],
                           self.family.prepend_bos, self.family.description)
        return TokenizedFamily(fam, self.clean[ix], self.corrupted[ix], self.answer_ids[ix],
                               self.counterfactual_ids[ix],
                               {k: v[ix] for k, v in self.positions.items()}, self.str_tokens)

    def split(self, seed: int) -> tuple[list[int], list[int]]:
        """A seeded split of the prompts into two disjoint halves (the first gets the odd one):
        components are found on one and the mechanism confirmed on the other."""
        order = torch.randperm(self.n_prompts, generator=torch.Generator().manual_seed(seed))
        half = (self.n_prompts + 1) // 2
        return sorted(order[:half].tolist()), sorted(order[half:].tolist())

    def logit_diff(self):
        """The family's metric: logit(answer) - logit(counterfactual), per prompt."""
        from mechtests.core.metrics import logit_diff

        return logit_diff(self.answer_ids, self.counterfactual_ids)


def _format(template: str, fill: dict[str, str], family: str) -> str:
    try:
        return template.format(**fill)
    except KeyError as exc:
        raise PromptError(
            f"family {family!r}: template {template!r} uses slot {exc} but the fill only has "
            f"{sorted(fill)}"
        ) from None


def _slot_offsets(template: str, fill: dict[str, str]) -> dict[str, int]:
    """Character offset in the filled text where each slot's value starts."""
    out: dict[str, int] = {}
    pos = 0
    for literal, slot, _, _ in string.Formatter().parse(template):
        pos += len(literal)
        if slot is None:
            continue
        out.setdefault(slot, pos)
        pos += len(str(fill[slot]))
    return out


def _encode(tok: Any, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])


def _splits(tok: Any, ids: Sequence[int]) -> str:
    return " | ".join(repr(tok.decode([i])) for i in ids)


def _check_known(fam: PromptFamily, i: int, tok: Any, what: str, text: str) -> None:
    """Refuse text the tokenizer does not know: it would silently become the unknown token
    (word-level tokenizers turn unknown words and emoji into ``<unk>``), and pass every other
    check. A literal unknown-token string in the text is the user's own and is allowed."""
    unk_id, unk = getattr(tok, "unk_token_id", None), getattr(tok, "unk_token", None)
    if unk_id is None or (unk and unk in text):
        return
    ids = _encode(tok, text)
    if unk_id not in ids:
        return
    unknown = []
    for word in text.split():
        if unk_id in _encode(tok, word) and word not in unknown:
            unknown.append(word)
    named = ", ".join(map(repr, unknown[:5])) or repr(text)
    raise PromptError(
        f"family {fam.name!r}, prompt {i}: the {what} {text!r} has words the tokenizer does not "
        f"know ({named}): they become {unk!r} (id {unk_id}), so the model would see the same "
        f"unknown token for all of them. Use words in the model's vocabulary.\n"
        f"  tokens: {_splits(tok, ids)}"
    )


def _tokenize(fam: PromptFamily, tok: Any) -> TokenizedFamily:
    bos: list[int] = []
    if fam.prepend_bos:
        if tok.bos_token_id is None:
            raise PromptError(
                f"family {fam.name!r} asks for a BOS token but the tokenizer has none; build "
                f"the family with prepend_bos=False"
            )
        bos = [tok.bos_token_id]
    clean, corrupted, answers, cfs = [], [], [], []
    positions: dict[str, list[int]] = {}
    for i, p in enumerate(fam.prompts):
        for what, text in (("clean prompt", p.clean), ("corrupted prompt", p.corrupted)):
            _check_known(fam, i, tok, what, text)
        c, k = bos + _encode(tok, p.clean), bos + _encode(tok, p.corrupted)
        if len(c) != len(k):
            raise PromptError(
                f"family {fam.name!r}, prompt {i}: clean and corrupted prompts have different "
                f"token counts ({len(c)} vs {len(k)}); patching needs them aligned position by "
                f"position. Choose corrupting words that tokenize to as many tokens.\n"
                f"  clean:     {_splits(tok, c)}\n  corrupted: {_splits(tok, k)}"
            )
        if clean and len(c) != len(clean[0]):
            raise PromptError(
                f"family {fam.name!r}: prompt {i} has {len(c)} tokens but prompt 0 has "
                f"{len(clean[0])}; a family runs as one batch, so its prompts need the same token "
                f"count. Split it into one family per template length.\n"
                f"  prompt 0: {_splits(tok, clean[0])}\n  prompt {i}: {_splits(tok, c)}"
            )
        for word, out in ((p.answer, answers), (p.counterfactual, cfs)):
            _check_known(fam, i, tok, "answer" if out is answers else "counterfactual", word)
            ids = _encode(tok, word)
            if len(ids) != 1:
                raise PromptError(
                    f"family {fam.name!r}, prompt {i}: answer {word!r} is not one token, it "
                    f"splits into {len(ids)}: {_splits(tok, ids) or '(nothing)'}. Use a word "
                    f"that is a single token for this tokenizer (mind the leading space)."
                )
            out.append(ids[0])
        if answers[-1] == cfs[-1]:
            raise PromptError(
                f"family {fam.name!r}, prompt {i}: the answer {p.answer!r} and the "
                f"counterfactual {p.counterfactual!r} are the same token "
                f"({_splits(tok, [answers[-1]])}, id {answers[-1]}), so logit(answer) - "
                f"logit(counterfactual) is 0 in every run and every patch: nothing could be "
                f"measured. Give each prompt a counterfactual that differs from its answer."
            )
        for name, offset in p.marks.items():
            prefix = p.clean[:offset].rstrip(" ")
            at = len(bos) + len(_encode(tok, prefix)) if prefix else len(bos)
            if at >= len(c):
                raise PromptError(
                    f"family {fam.name!r}, prompt {i}: position {name!r} (character {offset}) "
                    f"is beyond the prompt's {len(c)} tokens"
                )
            positions.setdefault(name, []).append(at)
        positions.setdefault("END", []).append(len(c) - 1)
        clean.append(c)
        corrupted.append(k)
    lens = {k: len(v) for k, v in positions.items()}
    missing = [k for k, n in lens.items() if n != len(fam.prompts)]
    if missing:
        raise PromptError(
            f"family {fam.name!r}: named positions {missing} exist in some prompts only; every "
            f"prompt of a family needs the same named positions"
        )
    return TokenizedFamily(
        fam,
        torch.tensor(clean),
        torch.tensor(corrupted),
        torch.tensor(answers),
        torch.tensor(cfs),
        {k: torch.tensor(v) for k, v in positions.items()},
        [tok.decode([i]) for i in clean[0]],
    )


def adds_bos(model_or_tokenizer: Any) -> bool:
    """The checkpoint's own tokenizer puts its BOS token before every text (Gemma's does): the
    model was trained on text that starts with it. For a model ``load_model`` loaded, the
    tokenizer saved with its checkpoint is read; a model from elsewhere says nothing (False:
    the family stays as written), since TransformerLens's bridge makes every tokenizer
    prepend a BOS; a tokenizer given is asked."""
    from mechtests.core.models import spec_of

    spec = spec_of(model_or_tokenizer)
    if spec is not None:
        return _checkpoint_adds_bos(str(spec.path))
    if hasattr(model_or_tokenizer, "tokenizer"):
        return False
    return _prepends_bos(model_or_tokenizer)


@functools.lru_cache(maxsize=16)
def _checkpoint_adds_bos(path: str) -> bool:
    from transformers import AutoTokenizer

    return _prepends_bos(AutoTokenizer.from_pretrained(path, local_files_only=True))


def _prepends_bos(tok: Any) -> bool:
    bos = getattr(tok, "bos_token_id", None)
    ids = tok("a").input_ids if bos is not None else []
    return bool(ids) and ids[0] == bos


def fit(fam: PromptFamily, model_or_tokenizer: Any) -> tuple[TokenizedFamily, list[str]]:
    """The largest part of ``fam`` a tokenizer can express as one batch: every prompt that
    tokenizes on its own (single-token answers, clean and corrupted aligned, known words), of the
    most common token count. Returns it and, per prompt left out, why (the first line of its
    ``PromptError``, or its length). A family written for one tokenizer is so rebuilt, from the
    words that are single tokens in another; ``PromptError`` when no prompt fits. A family
    written without BOS (GPT-2's published recall prompts) gets one where the tokenizer puts
    its BOS before every text by default (Gemma's): the model has never seen text without it."""
    tok = getattr(model_or_tokenizer, "tokenizer", model_or_tokenizer)
    if not fam.prepend_bos and adds_bos(model_or_tokenizer):
        fam = PromptFamily(fam.name, fam.prompts, True, fam.description)
    ok: dict[int, list[int]] = {}
    why: list[str] = []
    for i, p in enumerate(fam.prompts):
        try:
            one = _tokenize(PromptFamily(fam.name, [p], fam.prepend_bos), tok)
        except PromptError as exc:
            first = str(exc).splitlines()[0].split(", prompt 0: ", 1)[-1]
            why.append(f"prompt {i} ({p.clean!r}): {first}")
            continue
        ok.setdefault(one.clean.shape[1], []).append(i)
    if not ok:
        raise PromptError(f"family {fam.name!r}: no prompt can be expressed in this tokenizer "
                          f"({len(why)} tried; first: {why[0] if why else '-'})")
    length, keep = max(ok.items(), key=lambda kv: (len(kv[1]), -kv[0]))
    why += [f"prompt {i}: {n} tokens, not the {length} most prompts have"
            for n, idx in ok.items() if n != length for i in idx]
    kept = PromptFamily(fam.name, [fam.prompts[i] for i in keep], fam.prepend_bos,
                        fam.description)
    return _tokenize(kept, tok), why


def position(tf: TokenizedFamily, name: str) -> torch.Tensor:
    """The named position per prompt, or an error listing the names the family has."""
    if name not in tf.positions:
        raise PromptError(
            f"family {tf.family.name!r} has no position {name!r}; it has "
            f"{', '.join(sorted(tf.positions))}"
        )
    return tf.positions[name]
