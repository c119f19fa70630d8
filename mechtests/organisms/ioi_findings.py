"""What formed in the IOI organism (``mechtests.organisms.ioi``), measured with the library's
own views: accuracy per name split, and on the GPT-2 IOI families (``mechtests.families``,
ABBA and BABA, the ones the claims run on) head direct logit attribution, attention between the
named positions, mean ablation of each head, path patching into the name movers' queries, and
the head detectors on repeated random tokens.

``python -m mechtests.organisms.ioi findings --dir DIR`` writes findings.json and FINDINGS.md.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from mechtests.analysis.attribution import head_attribution
from mechtests.analysis.heads import attention_between, head_scores, repeated_random_tokens
from mechtests.analysis.patching import ablate, path_patch
from mechtests.core.sites import Head
from mechtests.organisms import save_findings

MIN_MOVER_DLA = 0.5  # the claims' name-mover floor (claims/test_ioi.py)
SCORE_THRESHOLD = 0.5  # a detector head: most of its attention on the marked key
N_EVAL = 1000  # prompts per name split for the accuracies


def _heads(model) -> list[str]:
    return [str(Head(la, h)) for la in range(model.cfg.n_layers)
            for h in range(model.cfg.n_heads)]


def _r(x: float) -> float:
    return round(float(x), 4)


def _mat(t: torch.Tensor) -> list[list[float]]:
    return [[_r(v) for v in row] for row in t.tolist()]


def _top(t: torch.Tensor, k: int = 4, largest: bool = True) -> list[tuple[str, float]]:
    H = t.shape[1]
    idx = t.flatten().topk(k, largest=largest).indices.tolist()
    return [(f"{i // H}.{i % H}", _r(t.flatten()[i])) for i in idx]


@torch.no_grad()
def accuracies(d: Path) -> dict[str, Any]:
    """Per name split (``training.json``'s names): top-1 = IO, logit(IO) > logit(S), mean
    logit diff, on ``N_EVAL`` fresh prompts (half ABBA) over the split's names."""
    from transformers import GPT2LMHeadModel, PreTrainedTokenizerFast

    from mechtests.organisms.ioi import ioi_accuracy

    names = json.loads((d / "training.json").read_text())["names"]
    hf = GPT2LMHeadModel.from_pretrained(d, use_safetensors=True).eval()
    tok = PreTrainedTokenizerFast.from_pretrained(d)
    return {k: {m: _r(v) for m, v in ioi_accuracy(hf, tok, names[k], n=N_EVAL).items()}
            for k in ("train", "held_out", "unseen")}


@torch.no_grad()
def order_findings(model, order: str) -> dict[str, Any]:
    """The GPT-2 IOI family of one order on the organism: who does what."""
    from mechtests import families as gpt2
    from mechtests.core.engine import run

    fam = gpt2.gpt2_ioi(order).tokenize(model)
    metric = fam.logit_diff()
    clean = float(metric(run(model, fam.clean, logits_at=-1)[0]).mean())
    corrupted = float(metric(run(model, fam.corrupted, logits_at=-1)[0]).mean())
    dla = head_attribution(model, fam.clean, fam.answer_ids, fam.counterfactual_ids).values
    # the same split in two: what each head writes to logit(IO) and to logit(S) (centred)
    dla_io = head_attribution(model, fam.clean, fam.answer_ids).values
    dla_s = head_attribution(model, fam.clean, fam.counterfactual_ids).values
    P = fam.positions
    att = {f"{a}->{b}": attention_between(model, fam.clean, P[a], P[b]).values
           for a, b in (("END", "IO"), ("END", "S1"), ("END", "S2"), ("S2", "S1"))}
    att["S2->S1+1"] = attention_between(model, fam.clean, P["S2"], P["S1"] + 1).values
    att["S2->IO"] = attention_between(model, fam.clean, P["S2"], P["IO"]).values
    if order == "ABBA":  # IO before S1: does the IO reach S1's residual?
        att["S1->IO"] = attention_between(model, fam.clean, P["S1"], P["IO"]).values
    heads = _heads(model)
    single = ablate(model, fam.clean, heads, metric, how="mean", reference=fam.corrupted)
    drop = {h: _r((clean - float(v)) / clean) for h, v in zip(heads, single.values)}
    H = model.cfg.n_heads
    later = dla.clone()
    later[0] = -float("inf")
    movers = [h for h, v in _top(later, k=H * (model.cfg.n_layers - 1)) if v >= MIN_MOVER_DLA]
    out: dict[str, Any] = {
        "example": fam.family.prompts[0].clean, "clean_logit_diff": _r(clean),
        "corrupted_logit_diff": _r(corrupted), "dla": _mat(dla),
        "dla_io": _mat(dla_io), "dla_s": _mat(dla_s),
        "dla_top": _top(dla), "dla_bottom": _top(dla, largest=False),
        "attention": {k: _mat(v) for k, v in att.items()},
        "mean_ablation_drop": drop, "name_movers": movers,
    }
    if movers:
        together = ablate(model, fam.clean, movers, metric, how="mean", reference=fam.corrupted,
                          together=True)
        out["name_movers_ablated_drop"] = _r((clean - float(together.values.reshape(-1)[0]))
                                             / clean)
        # denoising: each sender's clean write added to the movers' queries (keys) in the
        # corrupted run; fraction of the clean - corrupted gap it restores
        for c in ("q", "k"):
            pp = path_patch(model, fam.clean, fam.corrupted, metric, movers, component=c)
            restored = (pp.values - corrupted) / (clean - corrupted)
            out[f"path_patch_to_movers_{c}"] = _mat(restored)
            out[f"path_patch_top_{c}"] = _top(restored)
    return out


@torch.no_grad()
def detector_scores(model) -> dict[str, Any]:
    """TL's detectors (offset 1, over the query rows with a target) on BOS + 2 x 20 repeated
    random tokens of the organism's vocabulary."""
    bos = model.tokenizer.bos_token_id
    toks = repeated_random_tokens(20, batch=16, seed=0, vocab_range=(0, bos), bos=bos)
    out: dict[str, Any] = {}
    for kind in ("previous_token", "duplicate_token", "induction"):
        s = head_scores(model, toks, kind, over="targets").values
        out[kind] = _mat(s)
        out[f"{kind}_heads"] = [(h, v) for h, v in _top(s, k=s.numel()) if v > SCORE_THRESHOLD]
    return out


def ioi_findings(model, d: Path) -> dict[str, Any]:
    return {"accuracy": accuracies(d),
            "orders": {o: order_findings(model, o) for o in ("ABBA", "BABA")},
            "detectors": detector_scores(model)}


# ---------------------------------------------------------------------------------------------
# FINDINGS.md


def _table(m: list[list[float]]) -> str:
    H = len(m[0])
    rows = ["| layer | " + " | ".join(f"h{h}" for h in range(H)) + " |",
            "|---" * (H + 1) + "|"]
    rows += [f"| {la} | " + " | ".join(f"{v:.2f}" for v in row) + " |" for la, row in enumerate(m)]
    return "\n".join(rows)


def _at(m: list[list[float]], head: str) -> float:
    la, h = (int(x) for x in head.split("."))
    return m[la][h]


def render(f: dict[str, Any], training: dict[str, Any]) -> str:
    r = training.get("recipe", {})
    names = training.get("names", {})
    acc = f["accuracy"]
    lines = [
        "# Findings: ioi", "",
        f"Model: {f.get('model', '')}. Recipe: `{f.get('command', '')}` (seeded; "
        f"{r.get('steps')} steps of {r.get('batch')} sequences). Regenerate this file with "
        "`python -m mechtests.organisms.ioi findings --dir fixtures/organisms/ioi`; the numbers "
        "are also in `findings.json`.", "",
        "## Accuracy", "",
        f"Fresh IOI prompts ({N_EVAL} per row, half ABBA, half BABA, the recipe's templates) "
        "whose two names both come from one split of the name pool. *Held out of IOI*: names "
        "that appear in no IOI training sentence, only in the training sequences that list "
        "names and repeat the list (so their embeddings are trained, in another context). "
        "*Never seen*: names in no training sequence at all (their embeddings are the random "
        "initialisation, moved only by the softmax's push on every unembedding).", "",
        "| names | how many | top-1 = IO | logit(IO) > logit(S) | mean logit diff |",
        "|---|---|---|---|---|",
    ]
    label = {"train": "in IOI training", "held_out": "held out of IOI",
             "unseen": "never seen"}
    for k in ("train", "held_out", "unseen"):
        a = acc[k]
        lines.append(f"| {label[k]} | {len(names.get(k, []))} | {a['top1']:.3f} | "
                     f"{a['io_over_s']:.3f} | {a['logit_diff']:.2f} |")
    lines += ["", "## On the GPT-2 IOI families", "",
              "The families the claims run on (`mechtests.families.gpt2_ioi`: the four "
              "Exploratory Analysis Demo templates x 8 name pairs; their names are in the "
              "training split). Corrupted: S2 := IO. Views: "
              "`mechtests.analysis.attribution.head_attribution` (DLA at END), "
              "`mechtests.analysis.heads.attention_between`, "
              "`mechtests.analysis.patching.ablate` (mean over the corrupted prompts), "
              "`mechtests.analysis.patching.path_patch` (denoising, receivers the name movers' "
              "queries: the fraction of the clean - corrupted logit-diff gap one sender's "
              "clean output restores through them alone)."]
    for order, o in f["orders"].items():
        att = o["attention"]
        lines += ["", f"### {order}", "", f"Example: `{o['example']}`. Logit diff clean "
                  f"{o['clean_logit_diff']:.2f}, corrupted {o['corrupted_logit_diff']:.2f}.", ""]
        mv = o["name_movers"]
        desc = "; ".join(
            f"**{h}** DLA {_at(o['dla'], h):.2f} (to logit(IO) {_at(o['dla_io'], h):.2f}, to "
            f"logit(S) {_at(o['dla_s'], h):.2f}), attention END->IO {_at(att['END->IO'], h):.2f}, "
            f"END->S1 {_at(att['END->S1'], h):.2f}, END->S2 {_at(att['END->S2'], h):.2f}, mean "
            f"ablation costs {o['mean_ablation_drop'][h]:.2f}" for h in mv)
        lines.append(f"- Name movers (heads beyond layer 0 with DLA >= {MIN_MOVER_DLA}): "
                     f"{desc or 'none'}.")
        if mv:
            lines.append(f"- Mean-ablating them together costs "
                         f"{o['name_movers_ablated_drop']:.2f} of the logit diff.")
        lines.append("- Most negative DLA: " + ", ".join(f"{h} {v:.2f}"
                                                       for h, v in o["dla_bottom"]) + ".")
        costly = sorted(o["mean_ablation_drop"].items(), key=lambda kv: -kv[1])[:5]
        lines.append("- Costliest heads to mean-ablate alone (fraction of the logit diff "
                     "lost): " + ", ".join(f"{h} {v:.2f}" for h, v in costly) + ".")
        for c, what in (("q", "queries"), ("k", "keys")):
            if f"path_patch_top_{c}" in o:
                lines.append(
                    f"- Path patching into the name movers' {what}, top senders (fraction "
                    "restored; attention S2 -> S1 / END -> S2): " + ", ".join(
                        f"{h} {v:.2f} ({_at(att['S2->S1'], h):.2f} / "
                        f"{_at(att['END->S2'], h):.2f})" for h, v in o[f"path_patch_top_{c}"])
                    + ".")
        dup = _top(torch.tensor(att["S2->S1"]), k=3)
        lines.append("- Most attention from S2 to S1 (duplicate-token candidates): " + ", ".join(
            f"{h} {v:.2f}" for h, v in dup) + "; from S2 to the token after S1 (induction): "
            + ", ".join(f"{h} {v:.2f}" for h, v in _top(torch.tensor(att["S2->S1+1"]), k=3))
            + ".")
        for k in ("S1->IO", "S2->IO"):
            if k in att:
                lines.append(f"- Most attention {k}: " + ", ".join(
                    f"{h} {v:.2f}" for h, v in _top(torch.tensor(att[k]), k=4)) + ".")
        lines += ["", "DLA per head:", "", _table(o["dla"]), "",
                  "DLA to logit(IO) alone:", "", _table(o["dla_io"]), "",
                  "DLA to logit(S) alone:", "", _table(o["dla_s"]), "",
                  "Attention END -> IO:", "", _table(att["END->IO"]), "",
                  "Attention END -> S2:", "", _table(att["END->S2"]), "",
                  "Attention END -> S1:", "", _table(att["END->S1"]), "",
                  "Attention S2 -> S1:", "", _table(att["S2->S1"])]
        for c, what in (("q", "queries"), ("k", "keys")):
            if f"path_patch_to_movers_{c}" in o:
                lines += ["", f"Path patching into the name movers' {what} (fraction "
                          "restored):", "", _table(o[f"path_patch_to_movers_{c}"])]
    det = f["detectors"]
    lines += ["", "## Head detectors", "",
              "TransformerLens's detectors (`mechtests.analysis.heads.head_scores`, offset 1, "
              "mean over the query rows that have a target) on BOS + 2 x 20 repeated random "
              f"tokens; heads above {SCORE_THRESHOLD}:", ""]
    for kind in ("previous_token", "duplicate_token", "induction"):
        hs = det[f"{kind}_heads"]
        lines.append(f"- {kind.replace('_', ' ')}: " + (", ".join(f"{h} {v:.2f}" for h, v in hs)
                                                       or "none") + ".")
    for kind in ("previous_token", "duplicate_token", "induction"):
        lines += ["", f"{kind.replace('_', ' ')} scores:", "", _table(det[kind])]
    hist = training.get("history", [])
    if hist:
        lines += ["", "## During training", "",
                  "IOI accuracy on 200 fresh prompts per split (top-1 = IO / logit(IO) > "
                  "logit(S)).", "", "| step | minutes | in IOI training | held out of IOI | "
                  "never seen |", "|---|---|---|---|---|"]
        for h in hist:
            lines.append(f"| {h['step']} | {h['minutes']} | " + " | ".join(
                f"{h[k]['top1']:.3f} / {h[k]['io_over_s']:.3f}"
                for k in ("train", "held_out", "unseen")) + " |")
    return "\n".join(lines) + "\n"


def write_findings(d: Path) -> str:
    """Measure the checkpoint in ``d``; write findings.json and FINDINGS.md beside it."""
    from mechtests.core.models import describe, load_model

    torch.set_num_threads(1)
    d = Path(d)
    model = load_model(str(d), device="cpu")
    training = json.loads((d / "training.json").read_text())
    f = {"organism": "ioi", "model": describe(model),
         "command": training["command"].replace("--out DIR", "--out fixtures/organisms/ioi"),
         **ioi_findings(model, d)}
    return save_findings(d, f, render(f, training))
