"""The analyses that find each organism's mechanism, reusable by tests and claims.

``python -m mechtests.organisms.analysis <organism> [--dir DIR]`` runs them on a checkpoint and
writes ``findings.json`` and ``FINDINGS.md`` beside it (plus the bigram embedding plot).

Models are ``TransformerBridge``s in compatibility mode (``mechtests.core.models.load_model``); the
accuracy and bigram-fit functions also take a raw Hugging Face ``GPT2LMHeadModel`` that carries
a ``tokenizer`` attribute (the training recipe uses them that way). Heads are named ``"L.H"``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from mechtests.analysis.attribution import head_attribution
from mechtests.analysis.heads import attention_between, offset_scores, patterns
from mechtests.analysis.heads import repeat_loss as heads_repeat_loss
from mechtests.analysis.patching import sweep
from mechtests.core.metrics import logit_diff
from mechtests.core.result import Result
from mechtests.core.sites import Head
from mechtests.organisms import language as lang

# ---------------------------------------------------------------------------------------------
# running


def _vocab(model) -> dict[str, int]:
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        raise ValueError("the model has no tokenizer attribute; load it with load_model")
    return tok.get_vocab()


def to_tokens(model, texts: Sequence[str]) -> torch.Tensor:
    """``<bos>`` + word ids, [n, T]; all texts must have the same word count."""
    rows = lang.encode(list(texts), _vocab(model))
    if len({len(r) for r in rows}) > 1:
        raise ValueError("texts of one batch need the same word count (group by template)")
    return torch.tensor(rows)


def word_ids(model, words: Sequence[str]) -> torch.Tensor:
    ids = _vocab(model)
    return torch.tensor([ids[w.strip()] for w in words])


@torch.no_grad()
def logits_of(model, tokens: torch.Tensor) -> torch.Tensor:
    out = model(tokens)
    return getattr(out, "logits", out)


def by_template(items: Sequence[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Group prompts so each group has one word count (one batch)."""
    groups: dict[Any, list[dict[str, Any]]] = {}
    for d in items:
        groups.setdefault((d["template"], len(d["clean"].split())), []).append(d)
    return list(groups.values())


def _prompts(task: str, n: int, seed: int, split: str, **kw: Any) -> list[dict[str, Any]]:
    if task == "repeat":
        kw.setdefault("length", 8)
    return lang.prompts(task, n, seed, split=split, **kw)


def task_accuracy(model, task: str, n: int = 200, seed: int = 0, split: str = "test",
                  **kw: Any) -> float:
    """Fraction of prompts whose top next-word prediction at END is the answer."""
    items = _prompts(task, n, seed, split, **kw)
    hits = 0
    for group in by_template(items):
        lg = logits_of(model, to_tokens(model, [d["clean"] for d in group]))[:, -1]
        hits += int((lg.argmax(-1) == word_ids(model, [d["answer"] for d in group])).sum())
    return hits / len(items)


def task_logit_diff(model, task: str, n: int = 200, seed: int = 0, split: str = "test",
                    **kw: Any) -> float:
    """Mean logit(answer) - logit(counterfactual) at END."""
    items = _prompts(task, n, seed, split, **kw)
    total = 0.0
    for group in by_template(items):
        lg = logits_of(model, to_tokens(model, [d["clean"] for d in group]))[:, -1]
        a = word_ids(model, [d["answer"] for d in group])
        c = word_ids(model, [d["counterfactual"] for d in group])
        total += float((lg.gather(1, a[:, None]) - lg.gather(1, c[:, None])).sum())
    return total / len(items)


def _ranked(scores: torch.Tensor, threshold: float | None = None, k: int | None = None,
            ) -> list[tuple[str, float]]:
    """Heads sorted by score: ``[("1.3", 0.93), ...]``, above ``threshold`` / top ``k``."""
    L, H = scores.shape
    out = sorted(((str(Head(la, h)), float(scores[la, h])) for la in range(L) for h in range(H)),
                 key=lambda x: -x[1])
    if threshold is not None:
        out = [x for x in out if x[1] > threshold]
    return out[:k] if k else out


# ---------------------------------------------------------------------------------------------
# attention-pattern scores (look-back, induction) and repeat loss: the library's views
# (``mechtests.analysis.heads``) on the organisms' random-word prompts


def random_tokens(model, n: int, length: int, seed: int = 0, repeat: bool = False,
                  ) -> torch.Tensor:
    """``<bos>`` + ``length`` distinct random content words (twice if ``repeat``), [n, T]."""
    items = lang.repeat_prompts(n, seed, length=length)
    texts = [d["full"] if repeat else " ".join(d["full"].split()[:length]) for d in items]
    return to_tokens(model, texts)


def prev_token_scores(model, n: int = 50, length: int = 20, seed: int = 0, offset: int = 1,
                      ) -> torch.Tensor:
    """[layer, head]: mean attention from each word to the word ``offset`` before it (random
    words; ``offset=1`` is the previous-token score): ``heads.offset_scores("lookback")``."""
    toks = random_tokens(model, n, length, seed)
    return offset_scores(model, toks, "lookback", offset, bos=True).values


def induction_scores(model, n: int = 50, length: int = 10, seed: int = 0, offset: int = 1,
                     ) -> torch.Tensor:
    """[layer, head]: mean attention, in the second copy of a repeated random segment, from each
    word to the word ``offset`` after its first occurrence (``offset=1``: the induction target,
    ``0``: the duplicate token itself): ``heads.offset_scores("induction")``."""
    toks = random_tokens(model, n, length, seed, repeat=True)
    return offset_scores(model, toks, "induction", offset, bos=True).values


def _best_offset(fn: Callable[..., torch.Tensor], model, offsets: Sequence[int],
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per head: the best score of ``fn(model, offset=o)`` over ``offsets``, and that offset."""
    stack = torch.stack([fn(model, offset=o) for o in offsets])
    best, idx = stack.max(0)
    return best, torch.tensor(offsets)[idx]


def _find(fn: Callable[..., torch.Tensor], model, threshold: float, offsets: Sequence[int],
          ) -> list[tuple[str, float, int]]:
    best, off = _best_offset(fn, model, offsets)
    return [(h, s, int(off[_hl(h)])) for h, s in _ranked(best, threshold)]


def find_prev_token_heads(model, threshold: float = 0.5, offsets: Sequence[int] = (1,),
                          ) -> list[tuple[str, float, int]]:
    """Heads attending to the word ``offset`` back (best of ``offsets``) with mean attention
    above ``threshold``: ``[("0.1", 0.93, 1), ...]``. ``offsets=(1,)``: previous-token heads;
    ``(1, 2, 3, 4)``: look-back heads of any short lag."""
    return _find(prev_token_scores, model, threshold, offsets)


def find_induction_heads(model, threshold: float = 0.5, offsets: Sequence[int] = (1, 2, 3, 4),
                         ) -> list[tuple[str, float, int]]:
    """Heads that, in a repeated random segment, attend to a fixed offset after the current
    word's earlier occurrence (offset 1: the classic induction head, which reads the next word;
    larger offsets pair with look-back heads of the same lag in the layer before):
    ``[("1.2", 0.91, 1), ...]``, best offset per head, mean attention above ``threshold``."""
    return _find(induction_scores, model, threshold, offsets)


@torch.no_grad()
def repeat_loss(model, n: int = 100, length: int = 10, seed: int = 0,
                ablate: Sequence[str] = ()) -> dict[str, float]:
    """Mean next-word loss on the first and on the second (repeated) copy of random segments,
    optionally with heads zero-ablated (``heads.repeat_loss``; the second copy's first word,
    unpredictable, counts)."""
    toks = random_tokens(model, n, length, seed, repeat=True)
    r = heads_repeat_loss(model, toks, ablate, second_from=1, bos=True)
    return {"first_half": r.at(copy="first"), "second_half": r.at(copy="second")}


# ---------------------------------------------------------------------------------------------
# attribution and patching on a family of prompts (one template, equal lengths): the library's
# views (``mechtests.analysis.attribution``, ``heads``, ``patching``)


def _answers(model, items: Sequence[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
    return (word_ids(model, [d["answer"] for d in items]),
            word_ids(model, [d["counterfactual"] for d in items]))


@torch.no_grad()
def head_dla(model, items: Sequence[dict[str, Any]]) -> torch.Tensor:
    """[layer, head]: each head's direct contribution at END to logit(answer) - logit(cf),
    through the final LayerNorm's scale (``attribution.head_attribution``)."""
    tokens = to_tokens(model, [d["clean"] for d in items])
    return head_attribution(model, tokens, *_answers(model, items)).values


@torch.no_grad()
def attention_to(model, items: Sequence[dict[str, Any]], position: str) -> torch.Tensor:
    """[layer, head]: mean attention from END to the named word position (+1 for <bos>)."""
    tokens = to_tokens(model, [d["clean"] for d in items])
    k = torch.tensor([d["positions"][position] + 1 for d in items])
    return attention_between(model, tokens, -1, k).values


def _patched(model, items: Sequence[dict[str, Any]], site: str, **kw: Any) -> Result:
    clean = to_tokens(model, [d["clean"] for d in items])
    bad = to_tokens(model, [d["corrupted"] for d in items])
    return sweep(model, site, clean, bad, logit_diff(*_answers(model, items)), **kw)


@torch.no_grad()
def head_patching(model, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Patch each head's output (z, all positions) from the clean run into the corrupted run.

    Returns ``{"clean", "corrupted"}`` mean logit diffs and ``"restored"`` [layer, head]:
    (patched - corrupted) / (clean - corrupted), 1 = the head alone restores the behaviour.
    """
    r = _patched(model, items, "z")
    return {"clean": r.clean, "corrupted": r.corrupted,
            "restored": r.restored().values}


@torch.no_grad()
def resid_patching(model, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Patch ``resid_pre`` of each layer (and the final ``resid_post``) at each position from
    clean into corrupted. ``"restored"`` [n_layers + 1, T] as in ``head_patching``."""
    pre = _patched(model, items, "resid_pre")
    post = _patched(model, items, "resid_post", layers=[model.cfg.n_layers - 1])
    values = torch.cat([pre.values, post.values])
    return {"clean": pre.clean, "corrupted": pre.corrupted,
            "restored": (values - pre.corrupted) / (pre.clean - pre.corrupted),
            "words": ["<bos>", *items[0]["clean"].split()]}


# ---------------------------------------------------------------------------------------------
# bigram


def _bigram_weights(length: int = 64) -> torch.Tensor:
    """How often each word is the current word in training documents (from <bos>, 63 steps)."""
    P = lang.bigram_table()
    dist = torch.zeros(P.shape[0], dtype=torch.float64)
    dist[0] = 1.0
    total = torch.zeros_like(dist)
    for _ in range(length - 1):
        total += dist
        dist = dist @ P
    return total / total.sum()


@torch.no_grad()
def bigram_model_table(model) -> torch.Tensor:
    """The model's next-word distribution after each word alone, [d_vocab, d_vocab]."""
    V = len(lang.bigram_vocab())
    return logits_of(model, torch.arange(V)[:, None])[:, 0].double().softmax(-1)


@torch.no_grad()
def bigram_fit(model) -> dict[str, float]:
    """How well the model recovers the bigram table.

    ``kl``: KL(true row || model row) in nats, weighted by how often the word occurs (= the
    model's excess loss over the language's entropy rate, ``entropy_rate``). ``corr``: mean
    Pearson correlation of model and true rows. ``top1``: weighted fraction of words whose most
    likely successor is right. ``logit_corr`` (bridge only): mean Pearson correlation of the
    rows of ``W_E @ W_U`` with log P over the successors the language allows; in this 0-layer
    model ``softmax(W_E W_U / rms(W_E row))`` *is* the model (positions and ln_f bias are 0).
    """
    P = lang.bigram_table()
    Q = bigram_model_table(model)
    w = _bigram_weights()
    rows = w > 0
    kl = (P * (P.clamp_min(1e-30).log() - Q.log())).sum(-1)
    ent = -(P * P.clamp_min(1e-30).log()).sum(-1)
    pc = P - P.mean(-1, keepdim=True)
    qc = Q - Q.mean(-1, keepdim=True)
    corr = (pc * qc).sum(-1) / (pc.norm(dim=-1) * qc.norm(dim=-1))
    out = {
        "kl": float((w * kl)[rows].sum()),
        "entropy_rate": float((w * ent)[rows].sum()),
        "corr": float(corr[rows].mean()),
        "top1": float((w * (P.argmax(-1) == Q.argmax(-1)).double())[rows].sum()),
    }
    if hasattr(model, "W_E") and hasattr(model, "W_U"):
        direct = (model.W_E @ model.W_U).double()
        cs = []
        for i in torch.nonzero(rows)[:, 0]:
            ok = P[i] > 0
            x, y = direct[i, ok], P[i, ok].log()
            x, y = x - x.mean(), y - y.mean()
            cs.append(float((x * y).sum() / (x.norm() * y.norm())))
        out["logit_corr"] = sum(cs) / len(cs)
    return out


@torch.no_grad()
def bigram_embedding_classes(model, path: str | Path | None = None) -> dict[str, float]:
    """PCA of the word embeddings (W_E rows); how well the word classes separate.

    ``centroid_acc_2d``: fraction of words nearer their own class centroid than any other in
    the 2-D projection (``centroid_acc``: in the full space). Saves the scatter plot to ``path``.
    """
    words = lang.bigram_vocab()
    cls = lang.bigram_word_class()
    keep = [i for i, w in enumerate(words) if w not in lang.SPECIALS]
    E = model.W_E[keep].double()
    E = E - E.mean(0)
    _, _, V = torch.linalg.svd(E, full_matrices=False)
    xy = E @ V[:2].T
    labels = [cls[words[i]] for i in keep]
    names = list(dict.fromkeys(labels))

    def centroid_acc(X: torch.Tensor) -> float:
        cents = torch.stack([X[[j for j, lab in enumerate(labels) if lab == c]].mean(0)
                             for c in names])
        pred = torch.cdist(X, cents).argmin(-1)
        return float(sum(names[int(p)] == lab for p, lab in zip(pred, labels)) / len(labels))

    if path is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 6))
        for c in names:
            idx = [j for j, lab in enumerate(labels) if lab == c]
            ax.scatter(xy[idx, 0], xy[idx, 1], s=14, label=c)
            for j in idx[:4]:
                ax.annotate(words[keep[j]], xy[j].tolist(), fontsize=6)
        ax.legend(fontsize=7)
        ax.set_title("bigram organism: W_E, first two principal components")
        fig.tight_layout()
        fig.savefig(path, dpi=90)
        plt.close(fig)
    return {"centroid_acc_2d": centroid_acc(xy), "centroid_acc": centroid_acc(E)}


# ---------------------------------------------------------------------------------------------
# each organism's findings

EVAL_SEED = 10**9 + 7  # training batches use seeds seed * 1_000_003 + step: far below this
PREV_THRESHOLD = 0.5  # a previous-token head puts at least half its attention on the previous word
INDUCTION_THRESHOLD = 0.5  # an induction head puts at least half on the induction target


LOOKBACK_THRESHOLD = 0.4


@torch.no_grad()
def induction_findings(model) -> dict[str, Any]:
    """Look-back and induction heads, repeat loss, and what ablating them costs."""
    look = find_prev_token_heads(model, LOOKBACK_THRESHOLD, offsets=(1, 2, 3, 4))
    ind = find_induction_heads(model, INDUCTION_THRESHOLD)
    out: dict[str, Any] = {
        "accuracy": {"repeat": task_accuracy(model, "repeat", n=200, seed=1)},
        "repeat_loss": repeat_loss(model),
        "prev_token_heads": find_prev_token_heads(model, PREV_THRESHOLD),
        "lookback_heads": look,
        "induction_heads": ind,
        "lookback_scores": {o: prev_token_scores(model, offset=o).tolist() for o in (1, 2, 3, 4)},
        "induction_scores": {o: induction_scores(model, offset=o).tolist() for o in range(5)},
    }
    ablations = {}
    if ind:
        ablations["induction_heads"] = repeat_loss(model, ablate=[h for h, *_ in ind])
    if look:
        ablations["lookback_heads"] = repeat_loss(model, ablate=[h for h, *_ in look])
    out["ablation_repeat_loss"] = ablations
    return out


def bigram_findings(model, plot: str | Path | None = None) -> dict[str, Any]:
    """Fit to the true bigram table, and word-class separation of the embeddings."""
    return {"fit": bigram_fit(model), "embedding_classes": bigram_embedding_classes(model, plot)}


def _family(task: str, n: int, seed: int, **kw: Any) -> list[dict[str, Any]]:
    """``n`` fresh prompts of one template (one batch)."""
    return lang.prompts(task, n, seed, split="train", **kw)


@torch.no_grad()
def multitask_findings(model, n: int = 100, seed: int = EVAL_SEED) -> dict[str, Any]:
    """Per-task accuracy and, per task, the heads that carry it (see FINDINGS.md).

    ``accuracy``: fresh prompts from the training word lists (``split='train'``, seeds no
    training batch uses); ``accuracy_held_out_words``: names/surnames/places/objects never seen
    in that task (``split='test'``)."""
    out: dict[str, Any] = {
        "accuracy": {t: task_accuracy(model, t, n=400, seed=seed, split="train")
                     for t in lang.TASKS},
        "accuracy_held_out_words": {t: task_accuracy(model, t, n=400, seed=seed, split="test")
                                    for t in lang.TASKS if t != "repeat"},
        "logit_diff": {t: task_logit_diff(model, t, n=400, seed=seed, split="train")
                       for t in lang.TASKS},
    }
    out["prev_token_heads"] = find_prev_token_heads(model, PREV_THRESHOLD)
    out["lookback_heads"] = find_prev_token_heads(model, LOOKBACK_THRESHOLD, (1, 2, 3, 4))
    out["induction_heads"] = find_induction_heads(model, INDUCTION_THRESHOLD)
    out["induction_scores"] = {o: induction_scores(model, offset=o).tolist() for o in (1, 2, 3)}
    out["repeat_loss"] = repeat_loss(model)

    def roles(items: list[dict[str, Any]], attend: Sequence[str]) -> dict[str, Any]:
        dla = head_dla(model, items)
        patch = head_patching(model, items)
        att = {p: attention_to(model, items, p) for p in attend}
        top = _ranked(dla, k=3)
        pat = patterns(model, to_tokens(model, [d["clean"] for d in items]))[:, :, :, -1]
        pat = pat.mean(0)  # [layer, head, key]: mean attention from END
        words = ["<bos>", *items[0]["clean"].split()]

        def most(h: str) -> str:
            a = pat[_hl(h)]
            return f"{int(a.argmax())} {words[int(a.argmax())]} {float(a.max()):.2f}"

        return {
            "template": items[0]["template"], "example": items[0]["clean"],
            "clean_logit_diff": patch["clean"], "corrupted_logit_diff": patch["corrupted"],
            "dla_top": [(h, v, {p: float(att[p][_hl(h)]) for p in attend}) for h, v in top],
            "most_attended_from_end": {h: most(h) for h, _ in top + _ranked(
                patch["restored"], k=3)},
            "patching_top": _ranked(patch["restored"], k=3),
            "dla": dla.tolist(), "patching": patch["restored"].tolist(),
            "attention": {p: a.tolist() for p, a in att.items()},
        }

    out["ioi"] = roles(_family("ioi", n, seed, template=0), ("IO", "S1", "S2"))
    out["ioi_flip"] = roles(_family("ioi", n, seed, template=0, corruption="flip"),
                            ("IO", "S1", "S2"))
    out["recall"] = roles(_family("recall", n, seed, template=2), ("SURNAME", "FIRST"))
    out["contraction"] = roles(_family("contraction", n, seed, template=0), ("V1", "P1"))
    gender = _family("gender", n, seed, template=1)
    out["gender"] = roles(gender, ("NOUN",))
    rp = resid_patching(model, gender)
    noun = gender[0]["positions"]["NOUN"] + 1
    out["gender"]["resid_patching"] = {
        "words": rp["words"], "restored": rp["restored"].tolist(),
        "at_noun_by_layer": rp["restored"][:, noun].tolist(),
        "at_end_by_layer": rp["restored"][:, -1].tolist(),
    }
    return out


def _hl(head: str) -> tuple[int, int]:
    h = Head.parse(head)
    return h.layer, h.head


# ---------------------------------------------------------------------------------------------
# writing findings.json and FINDINGS.md


def _heads(rows: Sequence[Any]) -> str:
    """``1.2 (0.91)``, or ``1.2 (0.91, offset 3)`` for rows with an offset."""
    return ", ".join(f"{r[0]} ({r[1]:.2f}" + (f", offset {r[2]})" if len(r) > 2 else ")")
                     for r in rows) or "none"


def _mat(rows: Sequence[Sequence[float]], row_label: str = "layer") -> str:
    H = len(rows[0])
    lines = [f"| {row_label} | " + " | ".join(f"h{h}" for h in range(H)) + " |",
             "|---" * (H + 1) + "|"]
    lines += [f"| {la} | " + " | ".join(f"{v:.2f}" for v in r) + " |" for la, r in enumerate(rows)]
    return "\n".join(lines)


def render(name: str, f: dict[str, Any]) -> str:
    """FINDINGS.md for an organism's findings dict."""
    head = [f"# {name} organism: findings", "",
            f"Model: {f['model']}. Recipe: `{f['command']}`. Regenerate this file with "
            f"`python -m mechtests.organisms.analysis {name}`; the numbers are also in "
            f"`findings.json`.", ""]
    body = RENDERERS[name](f)
    return "\n".join(head + body) + "\n"


def _render_bigram(f: dict[str, Any]) -> list[str]:
    fit, emb = f["fit"], f["embedding_classes"]
    return [
        "A 0-layer GPT-2 (`n_layer=0`: embedding, final LayerNorm, unembedding) trained on the "
        "bigram language of `language.BIGRAM_CLASSES` / `bigram_table()`. Position embeddings "
        "and the final LayerNorm bias are frozen at zero (positions carry nothing in a bigram "
        "language), so the model *is* `softmax(W_E[w] @ W_U / rms(W_E[w]))`: the direct path "
        "W_E W_U is the whole model.", "",
        "## The bigram table is recovered", "",
        f"- KL(true row || model row), weighted by word frequency: **{fit['kl']:.4f} nats** "
        f"(the language's entropy rate is {fit['entropy_rate']:.3f} nats/word).",
        f"- Mean Pearson correlation of model and true next-word distributions: "
        f"**{fit['corr']:.3f}**.",
        f"- Mean Pearson correlation of the rows of W_E @ W_U with log P over allowed "
        f"successors: **{fit['logit_corr']:.3f}**.",
        f"- Most likely successor right (frequency-weighted): {fit['top1']:.3f} (within-class "
        "preferences are Dirichlet(1) draws, so near-ties are common).", "",
        "## Word classes in the embedding", "",
        f"`bigram_pca.png`: W_E's first two principal components. Nearest-class-centroid "
        f"accuracy: **{emb['centroid_acc_2d']:.3f}** in the 2-D projection, "
        f"{emb['centroid_acc']:.3f} in the full space. Classes with the same successor "
        "distribution share a region (DET next to ADJ: both precede ADJ/NOUN; PREP, CONJ and "
        "'.' together: all precede DET/NAME): an embedding here encodes what comes next.",
    ]


def _render_induction(f: dict[str, Any]) -> list[str]:
    rl, ab = f["repeat_loss"], f["ablation_repeat_loss"]
    lines = [
        "A 2-layer GPT-2 trained only on `prefix seg seg` documents (random words; a random "
        "prefix so that only content, not position, can find the earlier copy; loss on the "
        "predictable words of the second copy).", "",
        "## Mechanism", "",
        f"- Previous-token heads (attention to the previous word > {PREV_THRESHOLD}): "
        f"**{_heads(f['prev_token_heads'])}**.",
        f"- Look-back heads (attention to the word `offset` back, best offset 1-4, > "
        f"{LOOKBACK_THRESHOLD}): **{_heads(f['lookback_heads'])}**.",
        f"- Induction heads (in a repeated segment, attention to the word `offset` after the "
        f"current word's earlier occurrence, best offset 1-4, > {INDUCTION_THRESHOLD}): "
        f"**{_heads(f['induction_heads'])}**.",
        f"- Loss on random segments (length 10, no prefix): first copy {rl['first_half']:.3f} "
        f"nats, repeated copy **{rl['second_half']:.3f}** nats (this includes the unpredictable "
        f"first word of the second copy).",
        f"- Next-word accuracy at the end of a repeated segment (fresh draws): "
        f"**{f['accuracy']['repeat']:.3f}**.",
    ]
    for k, v in ab.items():
        lines.append(f"- Zero-ablating the {k.replace('_', ' ')}: repeated-copy loss "
                     f"{v['second_half']:.3f} nats (first copy {v['first_half']:.3f}).")
    for o, m in f["induction_scores"].items():
        lines += ["", f"Induction scores, offset {o} (attention to earlier occurrence + {o}):",
                  "", _mat(m)]
    for o, m in f["lookback_scores"].items():
        lines += ["", f"Look-back scores, offset {o}:", "", _mat(m)]
    return lines


def _render_multitask(f: dict[str, Any]) -> list[str]:
    acc, tr, ld = f["accuracy"], f["accuracy_held_out_words"], f["logit_diff"]
    lines = [
        "A 4-layer GPT-2 trained on a mixture of the multitask language's tasks "
        "(`language.TASKS`). Accuracy = the top next-word prediction is the answer, on 400 "
        "fresh prompts (seeds no training batch used) from the training word lists; the last "
        "column uses names, surnames, places and objects never seen in that task "
        "(`split='test'`). Logit diff: answer minus counterfactual, fresh prompts.", "",
        "| task | accuracy | logit diff | accuracy, held-out words |",
        "|---|---|---|---|",
    ]
    for t in acc:
        lines.append(f"| {t} | {acc[t]:.3f} | {ld[t]:.2f} | {tr.get(t, float('nan')):.3f} |")
    lines += ["", "## Induction", "",
              f"- Previous-token heads: **{_heads(f['prev_token_heads'])}**; look-back heads "
              f"(best offset 1-4): **{_heads(f['lookback_heads'])}**; induction heads (best "
              f"offset 1-4): **{_heads(f['induction_heads'])}**.",
              f"- Repeat loss: first copy {f['repeat_loss']['first_half']:.3f}, repeated copy "
              f"{f['repeat_loss']['second_half']:.3f} nats.", ""]

    def task(key: str, title: str, what: str, attend: str) -> list[str]:
        r = f[key]
        out = [f"## {title}", "", f"Family: template {r['template']}, e.g. `{r['example']}`; "
               f"{what}. Clean logit diff {r['clean_logit_diff']:.2f}, corrupted "
               f"{r['corrupted_logit_diff']:.2f}.", "",
               "- Direct logit attribution at END (head, DLA, attention from END): " + "; ".join(
                   f"**{h}** {v:.2f} (" + ", ".join(f"{p} {a:.2f}" for p, a in att.items()) + ")"
                   for h, v, att in r["dla_top"]),
               "- Patching each head's output clean -> corrupted, fraction of logit diff "
               f"restored: {_heads(r['patching_top'])}.",
               "- Where these heads look from END (position, word of the first prompt, mean "
               "attention): " + "; ".join(f"{h}: {w}" for h, w in
                                          r["most_attended_from_end"].items()), "",
               "DLA per head:", "", _mat(r["dla"]), "",
               f"Attention from END to {attend}:", "", _mat(r["attention"][attend]), ""]
        return out

    lines += task("ioi", "IOI (ABC corruption)", "answer IO vs counterfactual S", "IO")
    lines += task("ioi_flip", "IOI (flip corruption: S2 := IO)", "answer IO vs S", "IO")
    lines += task("recall", "Name recall", "answer the surname vs another surname", "SURNAME")
    lines += task("contraction", "Contraction", "answer the earlier style vs the other style",
                  "V1")
    lines += task("gender", "Gender", "answer he/she vs the other", "NOUN")
    rp = f["gender"]["resid_patching"]
    lines += ["Residual-stream patching (gender, restored fraction; rows = resid_pre of each "
              "layer, last row = final resid_post; columns = positions):", "",
              "| layer | " + " | ".join(rp["words"]) + " |", "|---" * (len(rp["words"]) + 1) + "|"]
    lines += [f"| {la} | " + " | ".join(f"{v:.2f}" for v in row) + " |"
              for la, row in enumerate(rp["restored"])]
    return lines


RENDERERS = {"bigram": _render_bigram, "induction": _render_induction,
             "multitask": _render_multitask}


def findings_for(name: str, model, out_dir: Path | None = None) -> dict[str, Any]:
    if name == "bigram":
        return bigram_findings(model, None if out_dir is None else out_dir / "bigram_pca.png")
    if name == "induction":
        return induction_findings(model)
    if name == "multitask":
        return multitask_findings(model)
    raise ValueError(f"organism {name!r}: choose one of {', '.join(RENDERERS)}")


def main(argv: list[str] | None = None) -> None:
    from mechtests.core.models import describe, load_model
    from mechtests.organisms import fixture_dir, save_findings

    p = argparse.ArgumentParser(prog="python -m mechtests.organisms.analysis",
                                description="Measure an organism's mechanism; write findings.")
    p.add_argument("organism", choices=sorted(RENDERERS))
    p.add_argument("--dir", type=Path, default=None, help="checkpoint dir (default: shipped)")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    d = a.dir or fixture_dir(a.organism)
    model = load_model(str(d), device="cpu")
    f = findings_for(a.organism, model, d)
    training = json.loads((d / "training.json").read_text()) if (d / "training.json").is_file() \
        else {}
    f = {"organism": a.organism, "model": describe(model),
         "command": training.get("command", "?").replace(
             "--out DIR", f"--out fixtures/organisms/{a.organism}"), **f}
    print(save_findings(d, f, render(a.organism, f)))


if __name__ == "__main__":
    main()
