"""Attention-head views: TL head-detector scores, attention between named positions, patterns.

Scores follow ``transformer_lens.head_detector`` ("mul" measure): a detection pattern marks the
(query, key) pairs a head type should attend; a head's score on a prompt is the attention mass on
the marked pairs divided by its total mass (all query rows), after optionally zeroing attention
to BOS (key 0) and to the current token. Prompts are scored in one batch and averaged, as TL does
for a list of prompts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from mechtests.analysis._common import (
    Pos,
    Tokens,
    _check_head,
    _check_layer,
    _labels,
    _positions,
    _run,
    _tokens,
    _w,
)
from mechtests.core.engine import normalize
from mechtests.core.result import Result

KINDS = ("previous_token", "duplicate_token", "induction")
OFFSET_KINDS = ("lookback", "induction")


def repeated_random_tokens(n_tokens: int, batch: int = 4, seed: int = 0,
                           vocab_range: tuple[int, int] | None = None, bos: int | None = None
                           ) -> torch.Tensor:
    """[batch, (1 +) 2 * n_tokens]: a random sequence, then the same sequence again.

    Tokens are drawn from ``range(*vocab_range)`` with a seeded generator, without repeats inside
    a half when the range is large enough (so every second-half token has exactly one earlier
    copy). ``bos`` (if given) is prepended. Keep special tokens out of ``vocab_range``
    (``induction_scores`` picks it from the model's tokenizer).
    """
    if vocab_range is None:
        raise ValueError("repeated_random_tokens needs vocab_range=(lo, hi) without special "
                         "tokens, e.g. (0, 50256) for GPT-2; induction_scores(model) picks it")
    lo, hi = vocab_range
    if n_tokens < 1 or batch < 1 or hi <= lo:
        raise ValueError(f"repeated_random_tokens: need n_tokens >= 1, batch >= 1 and a "
                         f"non-empty vocab_range, got {n_tokens}, {batch}, {vocab_range}")
    g = torch.Generator().manual_seed(seed)
    if n_tokens <= hi - lo:
        half = torch.rand(batch, hi - lo, generator=g).argsort(-1)[:, :n_tokens] + lo
    else:
        half = torch.randint(lo, hi, (batch, n_tokens), generator=g)
    toks = torch.cat([half, half], 1)
    if bos is not None:
        toks = torch.cat([torch.full((batch, 1), bos, dtype=toks.dtype), toks], 1)
    return toks


def detection_pattern(tokens: torch.Tensor, kind: str) -> torch.Tensor:
    """TL's detection pattern for ``kind``, batched: [n_prompts, T, T] of 0/1, lower triangular.

    previous_token: key = query - 1. duplicate_token: earlier keys with the query's token.
    induction: keys right after an earlier copy of the query's token.
    """
    kind = kind.removesuffix("_head")
    n, t = tokens.shape
    if kind == "previous_token":
        return torch.diag_embed(torch.ones(t - 1), -1).expand(n, t, t).clone()
    dup = (tokens[:, :, None] == tokens[:, None, :]).float().tril(-1).cpu()
    if kind == "duplicate_token":
        return dup
    if kind == "induction":
        return torch.cat([torch.zeros(n, t, 1), dup[:, :, :-1]], 2).tril()
    raise ValueError(f"unknown head kind {kind!r}: choose one of {', '.join(KINDS)}")


WEIGHTINGS = ("attention", "norm")


def patterns(model: Any, tokens: Tokens, weighting: str = "attention") -> torch.Tensor:
    """All attention patterns of one batched run: [n, layer, head, dest, src].

    ``weighting="norm"``: Kobayashi et al. 2020's norm-based view, ``||alpha_ij f(x_j)||`` with
    ``f(x_j) = v_j W_O`` (the value, bias included, through the head's output matrix): how much
    each source position actually moves into the destination, not only where the head looks.
    A head that attends to a position whose value it writes with a small norm (an attention
    sink such as BOS) scores low here.
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting={weighting!r}: choose 'attention' (the raw pattern) or "
                         f"'norm' (Kobayashi et al. 2020, ||alpha f(x)||)")
    toks = _tokens(model, tokens)
    L = model.cfg.n_layers
    sites = [f"blocks.{layer}.attn.hook_pattern" for layer in range(L)]
    vsites = [f"blocks.{layer}.attn.hook_v" for layer in range(L)] if weighting == "norm" else []
    acts = _run(model, toks, sites + vsites)[1]
    pat = torch.stack([acts[s] for s in sites], 1)
    if weighting == "norm":
        W_O = _w(model, "W_O")  # [L, H, d_head, d_model]; refused past a post-norm
        fx = torch.stack([torch.einsum("nshd,hdm->nhsm", acts[v], W_O[la])
                          for la, v in enumerate(vsites)], 1)                 # [n, L, H, src, m]
        pat = pat * fx.norm(dim=-1)[:, :, :, None, :]
    return pat


def score_patterns(pat: torch.Tensor, tokens: torch.Tensor, kind: str, over: str = "all",
                   exclude_bos: bool = False, exclude_current_token: bool = False
                   ) -> torch.Tensor:
    """``head_scores``' arithmetic on given patterns ``[n, L, H, T, T]`` (e.g. a Hugging Face
    model's ``output_attentions`` stacked): per-prompt scores ``[n, L, H]``."""
    if over not in ("all", "targets"):
        raise ValueError(f"over={over!r}: choose 'all' (TL's detector) or 'targets'")
    det = detection_pattern(tokens, kind).to(pat.device)[:, None, None]        # [n,1,1,T,T]
    if exclude_bos:
        pat = pat.clone()
        pat[..., 0] = 0
    if exclude_current_token:
        pat = pat * (1 - torch.eye(tokens.shape[1], device=pat.device))
    hit, mass = (pat * det).sum(-1), pat.sum(-1)                               # [n, L, H, T]
    if over == "all":
        return hit.sum(-1) / mass.sum(-1)
    rows = det.sum(-1) > 0                                                     # [n,1,1,T]
    if not rows.any():
        raise ValueError(f"no query position has a target for {kind!r} in these prompts; "
                         f"use repeated tokens (repeated_random_tokens)")
    ratio = torch.where(rows, hit / mass.clamp_min(1e-30), torch.zeros_like(hit))
    return ratio.sum(-1) / rows.sum(-1).clamp_min(1)


def head_scores(model: Any, tokens: Tokens, kind: str, exclude_bos: bool = False,
                exclude_current_token: bool = False, over: str = "all",
                weighting: str = "attention") -> Result:
    """Per-head detector score for ``kind`` (previous_token, duplicate_token, induction).

    ``over='all'`` is TL's ``detect_head`` (mul): marked attention / total attention over all
    query rows, so rows with no marked key count as 0 (a perfect induction head scores about
    n/(2n+1) on BOS + repeated tokens). ``over='targets'`` averages only the query rows that
    have a marked key (e.g. the mean attention of each second-half token to the token after its
    earlier copy). ``weighting="norm"`` scores the norm-based view instead of the raw pattern
    (see ``patterns``): the share of what the head moves that comes from the marked keys.
    Axes ``(layer, head)``; per_prompt has one row per prompt.
    """
    toks = _tokens(model, tokens)
    per = score_patterns(patterns(model, toks, weighting), toks, kind, over, exclude_bos,
                         exclude_current_token)
    labels = {"layer": _labels(model.cfg.n_layers), "head": _labels(model.cfg.n_heads)}
    return Result(f"{kind.removesuffix('_head')} score", ("layer", "head"), labels, per.mean(0),
                  per, {"exclude_bos": exclude_bos,
                        "exclude_current_token": exclude_current_token, "over": over,
                        "weighting": weighting})


def induction_scores(model: Any, n_tokens: int = 20, batch: int = 4, seed: int = 0,
                     vocab_range: tuple[int, int] | None = None, **kw: Any) -> Result:
    """Induction scores on seeded repeated random tokens (BOS-prefixed when the model has one).

    ``vocab_range`` defaults to all ids above the special tokens' ids (BOS/EOS/UNK/PAD).
    """
    tok = getattr(model, "tokenizer", None)
    specials = [i for i in getattr(tok, "all_special_ids", []) if i is not None]
    if vocab_range is None:
        vocab_range = (max(specials, default=-1) + 1, model.cfg.d_vocab)
        if max(specials, default=-1) > model.cfg.d_vocab // 2:     # e.g. GPT-2's final <eos>
            vocab_range = (0, min(specials))
    bos = getattr(tok, "bos_token_id", None)
    toks = repeated_random_tokens(n_tokens, batch, seed, vocab_range, bos)
    return head_scores(model, toks, "induction", **kw)



def _bos_and_half(model: Any, toks: torch.Tensor, bos: bool | None, repeated: bool
                  ) -> tuple[int, int]:
    """(1 if the prompts start with BOS else 0, length of a repeated segment or 0)."""
    if bos is None:
        b = getattr(getattr(model, "tokenizer", None), "bos_token_id", None)
        bos = b is not None and bool((toks[:, 0] == b).all())
    s, T = int(bos), toks.shape[1]
    if not repeated:
        return s, 0
    n = (T - s) // 2
    if n < 1 or T - s != 2 * n or not torch.equal(toks[:, s:s + n], toks[:, s + n:]):
        raise ValueError(f"induction scores need [BOS] + segment + the same segment again "
                         f"(repeated_random_tokens); these {T}-token prompts are not "
                         f"({'with' if s else 'without'} BOS)")
    return s, n


def offset_scores(model: Any, tokens: Tokens, kind: str, offset: int = 1,
                  bos: bool | None = None) -> Result:
    """Per head, mean attention at a fixed lag: a look-back or an offset induction score.

    ``kind="lookback"``: from each token (after BOS) to the token ``offset`` back (offset 1:
    the previous-token score). ``kind="induction"``: on ``[BOS] + seg + seg``, from each
    second-copy token to the token ``offset`` after its earlier copy (offset 1:
    TransformerLens's induction target; 0: the duplicate itself; larger offsets pair with
    look-back heads of the same lag). Only query rows whose target exists count; the mean is
    over those rows, then over prompts. ``bos`` (default: the first token is the tokenizer's
    BOS) keeps BOS out of the rows. Axes ``(layer, head)``.
    """
    if kind not in OFFSET_KINDS:
        raise ValueError(f"kind={kind!r}: choose one of {', '.join(OFFSET_KINDS)}")
    toks = _tokens(model, tokens)
    s, n = _bos_and_half(model, toks, bos, kind == "induction")
    if kind == "induction":
        if not 0 <= offset < n:
            raise ValueError(f"offset {offset}: an induction offset runs 0..{n - 1} for a "
                             f"segment of {n} tokens")
        q = torch.arange(s + n, s + 2 * n - max(0, offset - 1))
        k = q - n + offset
    else:
        if not 1 <= offset < toks.shape[1] - s:
            raise ValueError(f"offset {offset}: a look-back offset runs 1..{toks.shape[1] - s - 1}"
                             f" on these {toks.shape[1]}-token prompts")
        q = torch.arange(s + offset, toks.shape[1])
        k = q - offset
    per = patterns(model, toks)[:, :, :, q, k].mean(-1)                        # [n, L, H]
    labels = {"layer": _labels(model.cfg.n_layers), "head": _labels(model.cfg.n_heads)}
    return Result(f"{kind} score (offset {offset})", ("layer", "head"), labels, per.mean(0), per)


def repeat_loss(model: Any, tokens: Tokens, ablate: Sequence[str] = (), first_from: int = 2,
                second_from: int = 2, bos: bool | None = None) -> Result:
    """Next-token loss (nats) on each copy of ``[BOS] + seg + seg``, components zero-ablated.

    ``first``: the mean over the first copy's tokens ``first_from``..n (default 2: the first
    has nothing to go on; 1 needs a BOS to predict it from); ``second``: over the second copy's
    tokens ``second_from``..n (default 2: its first token is as unpredictable as any).
    ``ablate``: components (``"1.3"``, ``"mlp0"``, ...) zeroed at
    every position, through the engine (``patching.ablation_edits``). Axis ``copy``;
    per_prompt has one row per prompt.
    """
    from mechtests.analysis.patching import ablation_edits
    from mechtests.core.engine import engine_for

    toks = _tokens(model, tokens)
    s, n = _bos_and_half(model, toks, bos, True)
    engine = engine_for(model)
    with torch.no_grad():
        edits = ablation_edits(engine, toks, list(ablate)) if ablate else None
        logits, _ = engine.run(toks, edits=edits)
    nll = -logits[:, :-1].float().log_softmax(-1).gather(-1, toks[:, 1:, None])[..., 0]
    # nll[:, j] is the loss on token j + 1
    if not (1 <= first_from <= n and 1 <= second_from <= n and s + first_from >= 2):
        raise ValueError(f"first_from={first_from}, second_from={second_from}: each runs "
                         f"1..{n} (the segment's tokens), and token 1 of the first copy only "
                         f"with a BOS before it")
    first = nll[:, s + first_from - 2:s + n - 1].mean(1)
    second = nll[:, s + n + second_from - 2:].mean(1)
    per = torch.stack([first, second], 1)
    return Result("repeat loss", ("copy",), {"copy": ["first", "second"]}, per.mean(0), per,
                  {"ablated": [str(c) for c in ablate]})


def attention_between(model: Any, tokens: Tokens, from_pos: Pos, to_pos: Pos,
                      weighting: str = "attention") -> Result:
    """Per-head attention from one named position to another (one position per prompt).

    E.g. END -> IO for name movers. ``weighting="norm"``: ``||alpha f(x)||`` at that pair, as a
    share of the head's total ``sum_j ||alpha_ij f(x_j)||`` over sources (comparable with the
    raw pattern's share). Axes ``(layer, head)``; per_prompt has one row per prompt.
    """
    toks = _tokens(model, tokens)
    q, k = _positions(from_pos, toks, "from_pos"), _positions(to_pos, toks, "to_pos")
    if (k > q).any():
        i = int((k > q).nonzero()[0])
        raise ValueError(f"to_pos {int(k[i])} comes after from_pos {int(q[i])} in prompt {i}; "
                         f"causal attention only looks back, swap the positions")
    pat = patterns(model, toks, weighting)                                    # [n, L, H, T, T]
    if weighting == "norm":
        pat = pat / pat.sum(-1, keepdim=True).clamp_min(1e-30)
    n = toks.shape[0]
    per = pat[torch.arange(n), :, :, q, k]                                     # [n, L, H]
    labels = {"layer": _labels(model.cfg.n_layers), "head": _labels(model.cfg.n_heads)}
    title = "attention between positions" + (" (norm-based)" if weighting == "norm" else "")
    return Result(title, ("layer", "head"), labels, per.mean(0), per,
                  {"from_pos": q.tolist(), "to_pos": k.tolist(), "weighting": weighting})


def attention_pattern(model: Any, tokens: Tokens, layer: int, head: int, prompt: int = 0,
                      weighting: str = "attention") -> Result:
    """One head's attention pattern on one prompt, axes ``(dest, src)``, labels ``"3 John"``.

    ``weighting="norm"``: the norm-based view ``||alpha_ij f(x_j)||`` (Kobayashi et al. 2020)
    beside the raw pattern, in units of the residual stream."""
    toks = _tokens(model, tokens)
    layer, head = _check_layer(model, layer), _check_head(model, head)
    if not 0 <= prompt < toks.shape[0]:
        raise ValueError(f"prompt {prompt}: there are {toks.shape[0]} prompts")
    toks = toks[prompt:prompt + 1]
    pat = patterns(model, toks, weighting)[0, layer, head]
    try:
        words = model.to_str_tokens(toks[0])
    except Exception:  # noqa: BLE001 - a model without a tokenizer still gets index labels
        words = [str(int(t)) for t in toks[0]]
    labels = [f"{i} {str(w).strip() or repr(w)}" for i, w in enumerate(words)]
    what = "norm-based attention" if weighting == "norm" else "attention pattern"
    return Result(f"{what} {layer}.{head}", ("dest", "src"), {"dest": labels, "src": labels},
                  pat, meta={"layer": layer, "head": head, "weighting": weighting})


def _embedded(model: Any, ids: list[int], positions: range | None) -> torch.Tensor:
    """The layer-0 input of each token id, position embedding averaged over ``positions``, then
    LayerNorm-normalised (compatibility mode folds its weights into the next matrices)."""
    if not ids:
        raise ValueError("no token ids given")
    bad = [i for i in ids if not 0 <= i < model.cfg.d_vocab]
    if bad:
        raise ValueError(f"token ids {bad[:5]} are outside the vocabulary "
                         f"(0..{model.cfg.d_vocab - 1})")
    x = model.W_E[ids]
    if positions is not None:
        x = x + model.W_pos[list(positions)].mean(0)
    return normalize(x, model.cfg.eps)


def _id_labels(model: Any, ids: list[int]) -> list[str]:
    try:
        return [str(w) for w in model.tokenizer.convert_ids_to_tokens(ids)]
    except Exception:  # noqa: BLE001 - index labels without a tokenizer
        return [str(i) for i in ids]


@torch.no_grad()
def qk_circuit(model: Any, layer: int, head: int, queries: list[int], keys: list[int],
               positions: range | None = None) -> Result:
    """A head's QK circuit read on token embeddings (Elhage et al. 2021): the attention score
    (before softmax) a query token gives a key token, ``(x_q W_Q + b_Q)(x_k W_K + b_K)^T /
    sqrt(d_head)``, with ``x`` the LayerNorm-normalised embedding (plus the position embedding
    averaged over ``positions``). Exact for a 1-layer model's direct path; axes (query, key)."""
    layer, head = _check_layer(model, layer), _check_head(model, head)
    q = _embedded(model, queries, positions) @ model.W_Q[layer, head] + model.b_Q[layer, head]
    k = _embedded(model, keys, positions) @ model.W_K[layer, head] + model.b_K[layer, head]
    scores = q @ k.T / model.cfg.d_head ** 0.5
    return Result(f"QK circuit {layer}.{head}", ("query", "key"),
                  {"query": _id_labels(model, queries), "key": _id_labels(model, keys)},
                  scores, meta={"layer": layer, "head": head})


@torch.no_grad()
def ov_circuit(model: Any, layer: int, head: int, sources: list[int],
               outputs: list[int] | None = None, positions: range | None = None) -> Result:
    """A head's OV circuit read on token embeddings (Elhage et al. 2021): the logits a source
    token adds when the head attends fully to it, ``x_s W_V W_O W_U`` (compatibility mode has
    folded the final LayerNorm's weights into W_U; its scale is left out, so compare within a
    row). The value bias is left out: attention sums to one, so it writes the same vector
    whatever the head attends to (compatibility mode folds it into b_O). Axes (source,
    output); ``outputs`` default to the whole vocabulary."""
    layer, head = _check_layer(model, layer), _check_head(model, head)
    outs = list(range(model.cfg.d_vocab)) if outputs is None else outputs
    x = _embedded(model, sources, positions)
    logits = x @ model.W_V[layer, head] @ _w(model, "W_O")[layer, head] @ model.W_U[:, outs]
    return Result(f"OV circuit {layer}.{head}", ("source", "output"),
                  {"source": _id_labels(model, sources), "output": _id_labels(model, outs)},
                  logits, meta={"layer": layer, "head": head})


__all__ = [
    "KINDS",
    "OFFSET_KINDS",
    "WEIGHTINGS",
    "attention_between",
    "attention_pattern",
    "detection_pattern",
    "head_scores",
    "induction_scores",
    "offset_scores",
    "ov_circuit",
    "patterns",
    "qk_circuit",
    "repeat_loss",
    "repeated_random_tokens",
    "score_patterns",
]
