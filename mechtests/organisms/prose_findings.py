"""Findings of the natural-text induction organism, from the library's own tools.

``python -m mechtests.organisms.prose findings --dir DIR`` loads the checkpoint as a user's
(``mechtests.core.models.load_model``), scores every head with
``mechtests.analysis.heads.head_scores``
(TransformerLens's definitions, offset 1) on repeated random tokens and on repeated held-out
prose, and measures what zero-ablating heads costs with ``mechtests.analysis.patching.ablate``, then
writes ``findings.json`` and ``FINDINGS.md`` beside the checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from mechtests.analysis.heads import head_scores, repeated_random_tokens
from mechtests.organisms import prose as P

PREV_THRESHOLD = 0.5  # a previous-token head: most of its attention on the previous token
INDUCTION_THRESHOLD = 0.5  # an induction head: most of its attention on the induction target
N_RANDOM, N_PROSE, PREFIX = 23, 27, 20  # 1 + 2 x 23 and 1 + 27 + 20 fit 48 positions


def prose_repeats(model, n: int = 32, seed: int = 2, corpus_chars: int | None = None,
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens [n, 1 + N_PROSE + PREFIX], next-token answers [n]): held-out prose segments of
    ``N_PROSE`` tokens followed by the first ``PREFIX`` tokens of themselves; the answer is the
    segment's next token, which only copying the earlier text predicts."""
    text = P.corpus_text(corpus_chars or P.ProseRecipe().corpus_chars)
    stream = P.held_out(P.encode_corpus(model.tokenizer, text))[1]
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(stream) - N_PROSE, (n,), generator=g).tolist()
    segs = torch.stack([stream[s: s + N_PROSE] for s in starts])
    bos = torch.full((n, 1), model.tokenizer.bos_token_id)
    return torch.cat([bos, segs, segs[:, :PREFIX]], 1), segs[:, PREFIX]


def _ranked(r, threshold: float) -> list[tuple[str, float]]:
    return [(h, round(v, 4)) for h, v in r.top_k(r.values.numel()) if v > threshold]


@torch.no_grad()
def prose_findings(model, corpus_chars: int | None = None) -> dict[str, Any]:
    from mechtests.analysis.patching import ablate
    from mechtests.core.engine import engine_for

    V, bos = model.cfg.d_vocab, model.tokenizer.bos_token_id
    rand = repeated_random_tokens(N_RANDOM, batch=16, seed=0, vocab_range=(bos + 1, V), bos=bos)
    prose, answers = prose_repeats(model, corpus_chars=corpus_chars)
    out: dict[str, Any] = {"scores": {}}
    for name, toks in (("random", rand), ("prose", prose)):
        out["scores"][name] = {
            kind: head_scores(model, toks, kind, over="targets").values.tolist()
            for kind in ("previous_token", "induction", "duplicate_token")}
    prev = head_scores(model, rand, "previous_token", over="targets")
    ind = head_scores(model, rand, "induction", over="targets")
    out["previous_token_heads"] = _ranked(prev, PREV_THRESHOLD)
    out["induction_heads"] = _ranked(ind, INDUCTION_THRESHOLD)

    engine = engine_for(model)
    idx = torch.arange(len(answers))

    def logprob(logits: torch.Tensor) -> torch.Tensor:  # [..., n, V] -> [..., n]
        return logits.log_softmax(-1)[..., idx, answers]

    heads = [f"{la}.{h}" for la in range(model.cfg.n_layers) for h in range(model.cfg.n_heads)]
    single = ablate(engine, prose, heads, logprob, how="zero")
    out["prose_copy_logprob"] = single.meta["clean"]
    out["ablate_each_head"] = {c: round(float(v), 4) for c, v in
                               zip(single.labels["component"], single.values)}
    for role in ("induction_heads", "previous_token_heads"):
        named = [h for h, _ in out[role]]
        if named:
            together = ablate(engine, prose, named, logprob, how="zero", together=True)
            out[f"ablate_{role}"] = float(together.values.reshape(-1)[0])
    # next-token loss on the repeated half of random tokens (predictable only by induction)
    logits, _ = engine.run(rand)
    nll = -logits[:, :-1].log_softmax(-1).gather(-1, rand[:, 1:, None])[..., 0]
    out["random_repeat_loss"] = {"first_half": float(nll[:, :N_RANDOM].mean()),
                                 "second_half": float(nll[:, N_RANDOM + 1:].mean())}
    return out


def _mat(rows: list[list[float]]) -> str:
    head = "| layer | " + " | ".join(f"head {h}" for h in range(len(rows[0]))) + " |"
    sep = "| --- " * (len(rows[0]) + 1) + "|"
    body = [f"| {i} | " + " | ".join(f"{v:.3f}" for v in r) + " |" for i, r in enumerate(rows)]
    return "\n".join([head, sep, *body])


def render(f: dict[str, Any], training: dict[str, Any]) -> str:
    r = training.get("recipe", {})
    hist = training.get("history", [])
    heads = ", ".join(f"{h} ({v:.2f})" for h, v in f["induction_heads"]) or "none"
    prevs = ", ".join(f"{h} ({v:.2f})" for h, v in f["previous_token_heads"]) or "none"
    rl = f["random_repeat_loss"]
    lines = [
        "# Findings: prose (natural-text induction organism)", "",
        f"Model: {f['model']}, attention-only (MLPs zeroed and frozen), trained with "
        f"`{f['command']}` on the 1913 Webster of GCIDE (Debian package `{P.PACKAGE}`), "
        f"byte-level BPE of {r.get('vocab_size')} tokens trained on the corpus; "
        f"{r.get('steps')} steps of {r.get('batch')} x {r.get('n_positions')} tokens; in "
        f"{r.get('repeat_share')} of the windows a span of the window's own prose is repeated "
        f"at its end. Measured with `mechtests.analysis.heads.head_scores` (TransformerLens's "
        f"definitions, offset 1, mean over the query rows that have a target) and "
        f"`mechtests.analysis.patching.ablate` (zero ablation of a head's z).", "",
        "## Mechanism", "",
        f"- Previous-token heads (attention to the token before > {PREV_THRESHOLD}, repeated "
        f"random tokens): **{prevs}**.",
        f"- Induction heads (attention to the token after the current token's earlier copy > "
        f"{INDUCTION_THRESHOLD}): **{heads}**.",
        f"- Loss on repeated random tokens (BOS + 2 x {N_RANDOM}): first half "
        f"{rl['first_half']:.3f} nats, repeated half **{rl['second_half']:.3f}** nats.",
        f"- Repeated held-out prose ({N_PROSE} tokens, then its first {PREFIX} again): mean "
        f"log-probability of the next copied token {f['prose_copy_logprob']:.3f}.",
    ]
    for role in ("induction_heads", "previous_token_heads"):
        if f"ablate_{role}" in f:
            lines.append(f"- Zero-ablating the {role.replace('_', ' ')} together: that "
                         f"log-probability becomes **{f[f'ablate_{role}']:.3f}**.")
    lines += ["", "Each head zero-ablated alone (log-probability of the copied token; "
              f"unablated {f['prose_copy_logprob']:.3f}):", "",
              "| head | " + " | ".join(f["ablate_each_head"]) + " |",
              "| --- " * (len(f["ablate_each_head"]) + 1) + "|",
              "| logprob | " + " | ".join(f"{v:.3f}" for v in f["ablate_each_head"].values())
              + " |"]
    if hist:
        lines += ["", "## During training", "",
                  "Held-out prose windows ending in a repeat of 20 of their own tokens: loss on "
                  "the repeated span against the same tokens' first occurrence, and the best "
                  "scores (repeated random tokens).", "",
                  "| step | tokens | repeated span | first occurrence | best prev-token (layer 0) "
                  "| best induction (layer 1) |", "| --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {h['step']} | {h['tokens_seen']:,} | {h['repeated_span']:.3f} | "
                  f"{h['first_occurrence']:.3f} | {h['best_previous_token_layer0']:.3f} | "
                  f"{h['best_induction_later_layers']:.3f} |" for h in hist]
    for name in ("random", "prose"):
        for kind, m in f["scores"][name].items():
            lines += ["", f"{kind.replace('_', ' ')} scores on repeated {name} tokens:", "",
                      _mat(m)]
    return "\n".join(lines) + "\n"


def write_findings(d: Path) -> str:
    from mechtests.core.models import describe, load_model

    torch.set_num_threads(1)
    model = load_model(str(d), device="cpu")
    training = json.loads((d / "training.json").read_text())
    f = {"organism": "prose", "model": describe(model),
         "command": training["command"].replace("--out DIR", "--out fixtures/organisms/prose"),
         **prose_findings(model, training["recipe"]["corpus_chars"])}
    (d / "findings.json").write_text(json.dumps(f, indent=1, sort_keys=True) + "\n")
    text = render(f, training)
    (d / "FINDINGS.md").write_text(text)
    return text
