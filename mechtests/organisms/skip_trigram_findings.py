"""Findings of the skip-trigram organism, from the library's own tools.

``python -m mechtests.organisms.skip_trigram findings --dir DIR`` loads the checkpoint as a user
would (``mechtests.core.models.load_model``), reads each head's QK and OV circuits
(``mechtests.analysis.heads.qk_circuit``, ``ov_circuit``), patches each head's output from
prompts with one opener into prompts with another (``mechtests.analysis.patching.sweep``), and
compares the raw attention from the trigger to the opener with the norm-based view
(``attention_between(..., weighting="norm")``); writes ``findings.json`` and ``FINDINGS.md``.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch

from mechtests.analysis.heads import attention_between, ov_circuit, qk_circuit
from mechtests.analysis.patching import sweep
from mechtests.core import metrics as M
from mechtests.core.engine import engine_for
from mechtests.organisms import skip_trigram as S

POSITIONS = range(1, S.SkipTrigramRecipe().doc_len + 1)


def swap_prompts(model, n: int = 64, length: int = 12, seed: int = 7):
    """Rule prompts (fillers, an opener, the trigger last) and the same with another opener;
    (clean, corrupted, answers, counterfactuals, opener positions)."""
    rng = random.Random(seed)
    tok = model.tokenizer.convert_tokens_to_ids
    rows: list[list[Any]] = [[], [], [], [], []]
    for _ in range(n):
        words = [rng.choice(S.FILLERS) for _ in range(length)]
        pa = rng.randint(0, length - 3)
        a, other = rng.sample(list(S.RULES), 2)
        words[-1] = b = rng.choice(S.TRIGGERS)
        swapped = list(words)
        words[pa], swapped[pa] = a, other
        for row, v in zip(rows, (tok(["<bos>", *words]), tok(["<bos>", *swapped]),
                                 tok(S.completion(a, b)), tok(S.completion(other, b)), pa + 1)):
            row.append(v)
    return tuple(torch.tensor(r) for r in rows)


@torch.no_grad()
def skip_trigram_findings(model) -> dict[str, Any]:
    ids = model.tokenizer.convert_tokens_to_ids
    openers, triggers, fillers = list(S.RULES), list(S.TRIGGERS), list(S.FILLERS)
    H = model.cfg.n_heads
    out: dict[str, Any] = {"heads": {}}
    for h in range(H):
        qk = qk_circuit(model, 0, h, ids(triggers), ids(openers + fillers), POSITIONS).values
        ov = ov_circuit(model, 0, h, ids(openers), positions=POSITIONS)
        n = len(openers)
        margins = {b: round(float(qk[i, :n].min() - qk[i, n:].max()), 3)
                   for i, b in enumerate(triggers)}
        tops = {a: [ov.labels["output"][t] for t in ov.values[i].topk(3).indices.tolist()]
                for i, a in enumerate(openers)}
        hits = {b: sum(S.completion(a, b) in tops[a][:2] for a in openers) for b in triggers}
        out["heads"][f"0.{h}"] = {"qk_margin_opener_over_fillers": margins,
                                  "ov_top3": tops, "completions_in_ov_top2": hits}
    clean, corrupted, ans, cf, pa = swap_prompts(model)
    res = sweep(engine_for(model), "z", clean, corrupted, M.logit_diff(ans, cf),
                by=("layer", "head"))
    norm = res.normalized(res.meta["clean"], res.meta["corrupted"])
    out["patching"] = {"clean_logit_diff": round(res.meta["clean"], 3),
                       "swapped_logit_diff": round(res.meta["corrupted"], 3),
                       "restoration_per_head": [round(float(v), 3) for v in norm.values[0]]}
    end = torch.full_like(pa, clean.shape[1] - 1)
    out["attention_trigger_to_opener"] = {
        w: [round(float(v), 3) for v in attention_between(model, clean, end, pa,
                                                           weighting=w).values[0]]
        for w in ("attention", "norm")}
    logits, _ = engine_for(model).run(clean, logits_at=-1)
    out["completion_accuracy"] = round(float((logits.argmax(-1) == ans).float().mean()), 4)
    return out


def render(f: dict[str, Any], training: dict[str, Any]) -> str:
    heads = f["heads"]
    lines = ["# Skip-trigram organism: findings", "",
             "A 1-layer attention-only GPT-2 (4 heads, d_model 64) trained on a language of 16 "
             "skip-trigrams `A ... B -> C` (8 openers x triggers `in`/`at`; "
             "`mechtests/organisms/skip_trigram.py`). Measured by "
             "`python -m mechtests.organisms.skip_trigram findings` with the library's "
             "`qk_circuit`, `ov_circuit`, `sweep` and `attention_between`.", "",
             f"Training: {training['recipe']['steps']} steps, "
             f"{training['scores']['minutes']} min on one core; completion accuracy on fresh "
             f"rule documents {training['scores']['completion_accuracy']:.3f}; on the "
             f"swapped-opener prompts below {f['completion_accuracy']:.3f}.", "",
             "## QK and OV circuits, per head", "",
             "QK margin: the trigger's lowest score on an opener key minus its highest on a "
             "filler key (> 0: it attends to any opener over every filler). OV: does the "
             "opener's OV row put the rule's completion in its top 2 (hits over the 8 "
             "openers)?", "",
             "| head | QK margin `in` | QK margin `at` | OV top-2 hits `in` | OV top-2 hits `at` "
             "| OV top 3 of `keep`, `take` |", "| --- | --- | --- | --- | --- | --- |"]
    for h, d in heads.items():
        m, hits, tops = d["qk_margin_opener_over_fillers"], d["completions_in_ov_top2"], \
            d["ov_top3"]
        lines.append(f"| {h} | {m['in']:+.2f} | {m['at']:+.2f} | {hits['in']}/8 | {hits['at']}/8 "
                     f"| {', '.join(tops['keep'])}; {', '.join(tops['take'])} |")
    p, a = f["patching"], f["attention_trigger_to_opener"]
    lines += ["", "## Patching: swap the opener (`keep ... in` -> `take ... in`)", "",
              f"Logit diff (clean completion minus swapped one) at the trigger: clean "
              f"{p['clean_logit_diff']}, swapped {p['swapped_logit_diff']}. Restoration from "
              "patching one head's output (hook_z) from the clean run, and attention from the "
              "trigger to the opener, raw and norm-based (Kobayashi et al. 2020, the share of "
              "`sum_j ||alpha_j f(x_j)||` that the opener's term takes):", "",
              "| head | restoration | attention to opener | norm-based share |",
              "| --- | --- | --- | --- |"]
    for i, h in enumerate(heads):
        lines.append(f"| {h} | {p['restoration_per_head'][i]:.3f} | {a['attention'][i]:.3f} "
                     f"| {a['norm'][i]:.3f} |")
    lines += ["", "Files: `findings.json` holds every number above; `training.json` the recipe.",
              ""]
    return "\n".join(lines)


def write_findings(d: Path) -> str:
    from mechtests.core.models import load_model

    model = load_model(str(d), device="cpu")
    f = skip_trigram_findings(model)
    (d / "findings.json").write_text(json.dumps(f, indent=1) + "\n")
    text = render(f, json.loads((d / "training.json").read_text()))
    (d / "FINDINGS.md").write_text(text)
    return text
