"""Findings on a real pretrained model, from the library's own views, as for the organisms.

``python -m mechtests.real_findings smollm2 --out fixtures/real/smollm2`` runs each experiment
the suite's claims are built on, on the model's own tokenization of GPT-2's English families
(``prompts.fit``), and writes ``findings.json`` (every number) and ``FINDINGS.md`` (read at a
glance). Nothing here is fitted or thresholded: it reports what the model does, whether or not
a published finding transfers (the claims judge that: README "Real models").

Experiments: residual-stream patching of "Michelle Jones was a top-notch student. Michelle"
against three corruptions (the surname, the first name, the queried name); the contraction task
(direct logit attribution by layer, attention and MLP layer patching at the last position, the
top heads by DLA and by output patching, value against pattern patching of the top head, neuron
patching in the top MLP layers); induction and previous-token heads on repeated random tokens
and their ablation; IOI name movers (DLA, attention END -> IO / S2, mean-ablation knockout, path
patching into their queries: S-inhibition); the logit lens and module mean-ablation; gender
neurons and entropy neurons. A view the engine refuses on an architecture is reported as
refused, with its reason.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from mechtests import families as gpt2
from mechtests.analysis.attribution import (
    head_attribution,
    logit_attribution,
    logit_lens,
    neuron_output_norms,
    separating_neurons,
    unembed_null_fraction,
)
from mechtests.analysis.heads import (
    attention_between,
    offset_scores,
    repeat_loss,
    repeated_random_tokens,
)
from mechtests.analysis.patching import ablate, path_patch, sweep
from mechtests.core.engine import UnsupportedArchitecture
from mechtests.core.prompts import (
    PromptError,
    PromptFamily,
    TokenizedFamily,
    adds_bos,
    fit,
)
from mechtests.core.result import Result

TOP = 5  # rows per ranking


def _r(x: float) -> float:
    return round(float(x), 3)


def _top(res: Result, k: int = TOP, largest: bool = True) -> list[list]:
    return [[str(n), _r(v)] for n, v in res.top_k(k, largest=largest)]


def _guarded(fn: Callable[[], Any]) -> Any:
    """``fn()``, or ``{'refused': why}`` where the engine refuses the view on this model."""
    try:
        return fn()
    except UnsupportedArchitecture as exc:
        return {"refused": str(exc).splitlines()[0]}


def _grid(res: Result) -> dict[str, Any]:
    """A 2-D result as rows of rounded values with its labels."""
    a, b = res.axes
    return {"rows": res.labels[a], "cols": res.labels[b],
            "values": [[_r(v) for v in row] for row in res.values.tolist()]}


# -- the experiments ----------------------------------------------------------------------------
def recall(model) -> dict[str, Any]:
    """resid_pre patching at every (layer, position) of the Michelle prompt, restoration."""
    out = {}
    corruptions = {"surname (Jones -> Smith)": {"SURNAME": "Smith"},
                   "first name (Michelle -> Jessica)": {"FIRST": "Jessica"},
                   "queried name (... Michelle -> ... Jessica)": {"Q": "Jessica"}}
    for what, change in corruptions.items():
        fam = PromptFamily.from_template(
            "recall", gpt2.RECALL_TEMPLATES[0],
            [{"FIRST": "Michelle", "SURNAME": "Jones", "Q": "Michelle"}],
            lambda f, c=change: {**f, **c}, " Jones", " Smith",
            prepend_bos=adds_bos(model))  # GPT-2's: none; Gemma's: its <bos>
        try:
            tf = fam.tokenize(model)
        except PromptError as exc:  # e.g. "Jessica" one token longer than "Michelle"
            out[what] = {"refused": str(exc).splitlines()[0]}
            continue
        res = sweep(model, "resid_pre", tf.clean, tf.corrupted, tf.logit_diff(),
                    by=("layer", "pos")).restored()
        out[what] = {"clean": _r(res.clean), "corrupted": _r(res.corrupted), **_grid(res)}
    return out


def contraction(model) -> dict[str, Any]:
    tf, dropped = fit(gpt2.gpt2_contraction(), model)
    end = tf.positions["END"]
    dla = logit_attribution(model, tf.clean, tf.answer_ids, tf.counterfactual_ids)
    f: dict[str, Any] = {"prompts": tf.n_prompts, "dropped": dropped[:3],
                         "layer_dla": _top(dla, 8)}
    for site in ("attn_out", "mlp_out"):
        r = sweep(model, site, tf.clean, tf.corrupted, tf.logit_diff(), by=("layer", "pos"),
                  positions=[int(end[0])]).restored()
        f[f"{site}_patching_at_end"] = [[la, _r(v)] for la, v in
                                        zip(r.labels["layer"], r.values[:, 0].tolist())]
    heads = _guarded(lambda: head_attribution(model, tf.clean, tf.answer_ids,
                                              tf.counterfactual_ids))
    f["head_dla"] = heads if isinstance(heads, dict) else _top(heads)
    z = _guarded(lambda: sweep(model, "z", tf.clean, tf.corrupted, tf.logit_diff(),
                               by=("layer", "head")).restored())
    f["head_patching"] = z if isinstance(z, dict) else _top(z)
    if not isinstance(z, dict):
        top = z.top_k(1)[0][0]
        la, h = (int(x) for x in str(top).split("."))
        att = attention_between(model, tf.clean, end, tf.positions["V1"])
        vp = {}
        for site in ("v", "pattern"):
            r = sweep(model, site, tf.clean, tf.corrupted, tf.logit_diff(),
                      by=("layer", "head"), layers=[la]).restored()
            group = r.values.shape[1]  # v has one entry per key-value head
            vp[site] = _r(r.values[0, h * group // model.cfg.n_heads])
        f["top_head"] = {"head": str(top), "attention_pronoun_to_contraction":
                         _r(att.values[la, h]), **vp}
    mlps = sorted(f["mlp_out_patching_at_end"], key=lambda x: -x[1])[:2]
    neurons = _guarded(lambda: [
        [f"mlp{n}", _r(v)] for la, _ in mlps for n, v in sweep(
            model, "mlp_post", tf.clean, tf.corrupted, tf.logit_diff(), by=("layer", "neuron"),
            layers=[int(la)]).restored().top_k(3)])
    f["neuron_patching_top_mlps"] = neurons
    return f


def induction(model, n: int = 50, seed: int = 0) -> dict[str, Any]:
    tok = model.tokenizer
    hi = min(20000, model.cfg.d_vocab)
    special = [i for i in (*tok.all_special_ids, *tok.get_added_vocab().values()) if i < hi]
    lo = max(100, max(special, default=-1) + 1)
    bos = tok.bos_token_id
    tokens = repeated_random_tokens(n, batch=4, seed=seed, vocab_range=(lo, hi), bos=bos)
    ind = offset_scores(model, tokens, "induction", bos=bos is not None)
    back = offset_scores(model, tokens, "lookback", bos=bos is not None)
    top = [h for h, _ in ind.top_k(TOP)]
    clean = repeat_loss(model, tokens, bos=bos is not None)
    knocked = repeat_loss(model, tokens, ablate=[str(h) for h in top], bos=bos is not None)
    return {"induction_scores": _top(ind), "previous_token_scores": _top(back),
            "repeat_loss": {"first_copy": _r(clean.at(copy="first")),
                            "second_copy": _r(clean.at(copy="second")),
                            f"second_copy_without_top_{TOP}": _r(knocked.at(copy="second"))}}


def _ioi(model, order: str) -> tuple[TokenizedFamily, list[str]]:
    return fit(gpt2.any_ioi(order), model)


def ioi(model) -> dict[str, Any]:
    out = {}
    for order in ("ABBA", "BABA"):
        tf, _ = _ioi(model, order)
        metric = tf.logit_diff()
        f: dict[str, Any] = {"prompts": tf.n_prompts}
        dla = _guarded(lambda tf=tf: head_attribution(model, tf.clean, tf.answer_ids,
                                                      tf.counterfactual_ids))
        if isinstance(dla, dict):
            out[order] = {**f, "head_dla": dla}
            continue
        end = tf.positions["END"]
        to_io = attention_between(model, tf.clean, end, tf.positions["IO"])
        to_s = attention_between(model, tf.clean, end, tf.positions["S2"])

        def att(h: str, a=to_io, b=to_s) -> list[float]:
            la, hh = (int(x) for x in h.split("."))
            return [_r(a.values[la, hh]), _r(b.values[la, hh])]

        movers = [str(h) for h, _ in dla.top_k(3)]
        f["top_dla"] = [[h, v, *att(h)] for h, v in _top(dla)]
        f["most_negative_dla"] = [[h, v, *att(h)] for h, v in _top(dla, 3, largest=False)]
        abl = ablate(model, tf.clean, movers, metric, how="mean", reference=tf.corrupted,
                     together=True)
        f["knockout_top_3"] = {"heads": movers, "before": _r(abl.clean),
                               "after": _r(abl.values.reshape(-1)[0])}
        pp = _guarded(lambda tf=tf, movers=movers: path_patch(
            model, tf.clean, tf.corrupted, tf.logit_diff(), movers, component="q"))
        # restoration of the logit diff through the movers' queries alone: the senders that
        # tell them which name to copy (S-inhibition heads, in GPT-2)
        f["s_inhibition_into_movers_queries"] = pp if isinstance(pp, dict) else _top(
            pp.restored())
        out[order] = f
    return out


def lens_and_modules(model) -> dict[str, Any]:
    tf, _ = _ioi(model, "ABBA")
    lens = logit_lens(model, tf.clean, tf.answer_ids, tf.counterfactual_ids)
    final = float(lens.values[-1])
    modules = [c for c in logit_attribution(model, tf.clean, tf.answer_ids,
                                            tf.counterfactual_ids).labels["component"]
               if c.startswith(("attn_", "mlp_"))]
    abl = ablate(model, tf.clean, modules, tf.logit_diff(), how="mean", reference=tf.corrupted)
    lost = sorted(((c, _r(abl.clean - float(v))) for c, v in zip(modules, abl.values.tolist())),
                  key=lambda x: -x[1])
    return {"final_logit_diff": _r(final),
            "lens_over_final": [[la, _r(v / final)] for la, v in
                                zip(lens.labels["layer"], lens.values.tolist())],
            "mean_ablation_loss": [list(x) for x in lost[:8]]}


def neurons(model) -> dict[str, Any]:
    tf = gpt2.gpt2_gender().tokenize(model)
    end = tf.positions["END"]
    sep = _guarded(lambda: separating_neurons(model, tf.clean, tf.corrupted, None, end, end))
    out: dict[str, Any] = {}
    if isinstance(sep, dict):
        out["gender_separating"] = sep
    else:
        d, n_mlp = sep.values, sep.values.shape[1]
        pick = [int(i) for i in d.flatten().topk(3).indices] + \
               [int(i) for i in (-d).flatten().topk(3).indices]
        out["gender_separating"] = [[f"mlp{i // n_mlp}.{i % n_mlp}", _r(d.flatten()[i])]
                                    for i in pick]

    def entropy() -> list[list]:
        layer = model.cfg.n_layers - 1
        norms = neuron_output_norms(model).values[layer]
        null = unembed_null_fraction(model).values[layer]
        written = norms * null.sqrt()
        return [[f"mlp{layer}.{int(i)}", _r(norms[i]), _r(null[i]),
                 _r((norms < norms[i]).float().mean())] for i in written.topk(6).indices]

    e = _guarded(entropy)
    out["entropy_candidates"] = e
    return out


EXPERIMENTS = {"recall": recall, "contraction": contraction, "induction": induction,
               "ioi": ioi, "logit_lens_and_modules": lens_and_modules, "neurons": neurons}


def findings(model) -> dict[str, Any]:
    """Every experiment; one this model's tokenizer cannot write is ``{'refused': why}``."""
    torch.manual_seed(0)
    out = {}
    for name, fn in EXPERIMENTS.items():
        try:
            out[name] = fn(model)
        except PromptError as exc:
            out[name] = {"refused": "its tokenizer cannot write the family: "
                                    + str(exc).splitlines()[0]}
    return out


# -- rendering ------------------------------------------------------------------------------------
def _table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(str(x) for x in r) + " |" for r in rows), ""]


def _recall(g: dict[str, Any]) -> list[str]:
    lines = ["## Name recall: residual-stream patching (restoration, layer x position)", ""]
    for what, c in g.items():
        if "refused" in c:
            lines += [f"### Corrupted: {what}", "", f"Cannot be written here: {c['refused']}", ""]
            continue
        lines += [f"### Corrupted: {what} (logit diff clean {c['clean']}, corrupted "
                  f"{c['corrupted']})", ""]
        lines += _table(["layer", *c["cols"]], [[r, *v] for r, v in zip(c["rows"], c["values"])])
    return lines


def _ranking(v: Any) -> str:
    return v["refused"] if isinstance(v, dict) else ", ".join(f"{h} {x}" for h, x in v)


def _contraction(c: dict[str, Any]) -> list[str]:
    lines = ["## Contraction copying", "", f"{c['prompts']} prompts.", "",
             "Direct logit attribution by component (top 8):", ""]
    lines += _table(["component", "DLA"], c["layer_dla"])
    lines += ["Attention and MLP layers patched at the last position (restoration):", ""]
    lines += _table(["layer", "attn_out restores", "mlp_out restores"],
                    [[a[0], a[1], m[1]] for a, m in zip(c["attn_out_patching_at_end"],
                                                        c["mlp_out_patching_at_end"])])
    for key in ("head_dla", "head_patching", "neuron_patching_top_mlps"):
        lines += [f"{key.replace('_', ' ')}: {_ranking(c[key])}", ""]
    if "top_head" in c:
        lines += [f"top head by patching: {c['top_head']}", ""]
    return lines


def _induction(i: dict[str, Any]) -> list[str]:
    return ["## Induction", "", f"induction scores: {_ranking(i['induction_scores'])}", "",
            f"previous-token scores: {_ranking(i['previous_token_scores'])}", "",
            f"repeat loss: {i['repeat_loss']}", ""]


def _ioi_md(f: dict[str, Any]) -> list[str]:
    lines = ["## IOI", ""]
    for order, g in f.items():
        lines += [f"### {order} ({g['prompts']} prompts)", ""]
        if isinstance(g.get("head_dla"), dict):
            lines += [f"head views refused: {g['head_dla']['refused']}", ""]
            continue
        lines += _table(["head", "DLA", "attn END->IO", "attn END->S2"],
                        g["top_dla"] + g["most_negative_dla"])
        lines += [f"knockout of the top 3 (mean, together): {g['knockout_top_3']}", "",
                  "path patching into their queries, clean into corrupted (senders restoring "
                  f"the most): {_ranking(g['s_inhibition_into_movers_queries'])}", ""]
    return lines


def _lens(m: dict[str, Any]) -> list[str]:
    return ["## Logit lens and modules (IOI ABBA)", "",
            f"final logit diff {m['final_logit_diff']}; lens / final: "
            + _ranking(m["lens_over_final"]), "",
            f"mean-ablation loss (top 8): {_ranking(m['mean_ablation_loss'])}", ""]


def _neurons(n: dict[str, Any]) -> list[str]:
    return [f"{k.replace('_', ' ')}: " + (v["refused"] if isinstance(v, dict) else
                                          ", ".join(str(x) for x in v)) + "\n"
            for k, v in n.items()]


SECTIONS = {"recall": _recall, "contraction": _contraction, "induction": _induction,
            "ioi": _ioi_md, "logit_lens_and_modules": _lens, "neurons": _neurons}


def render(name: str, about: str, f: dict[str, Any]) -> str:
    lines = [f"# Findings: {name}", "", about, "",
             "Produced by `python -m mechtests.real_findings` with the library's own views; "
             "what the claims make of it is in README \"Real models\".", ""]
    for key, section in SECTIONS.items():
        if "refused" in f[key]:
            lines += [f"## {key}: not run", "", f[key]["refused"], ""]
        else:
            lines += section(f[key])
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from mechtests.core.models import load_model
    from mechtests.core.real_models import REAL_MODELS

    p = argparse.ArgumentParser(prog="python -m mechtests.real_findings", description=__doc__)
    p.add_argument("model", help="a real model by name (smollm2, gemma3-270m) or a directory")
    p.add_argument("--out", type=Path, required=True, help="where findings.json and "
                   "FINDINGS.md go")
    args = p.parse_args(argv)
    model = load_model(args.model, device="cpu")
    about = REAL_MODELS[args.model].about if args.model in REAL_MODELS else args.model
    f = findings(model)
    args.out.mkdir(parents=True, exist_ok=True)
    tmp = args.out / ".findings.json.partial"
    tmp.write_text(json.dumps(f, indent=1) + "\n")
    md = args.out / ".FINDINGS.md.partial"
    md.write_text(render(args.model, about, f) + "\n")
    tmp.rename(args.out / "findings.json")
    md.rename(args.out / "FINDINGS.md")
    print(f"wrote {args.out / 'FINDINGS.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
