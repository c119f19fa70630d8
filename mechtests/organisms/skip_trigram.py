"""The skip-trigram organism: a 1-layer attention-only GPT-2 (Elhage et al. 2021, "A
Mathematical Framework for Transformer Circuits", section on one-layer models).

Its language: random filler words, and eight *openers* (``keep``, ``take``, ...) and two
*triggers* (``in``, ``at``). When a trigger follows an opener anywhere earlier in the document,
the next word is fixed by the pair: ``keep ... in -> mind``, ``keep ... at -> bay``, ``take ...
in -> stride``. A trigger with no opener before it is followed by a random filler, so the
prediction cannot come from the trigger alone (a bigram) nor from the opener alone: it is a
skip-trigram "A ... B -> C". A 1-layer attention-only model can only implement it through its
heads: the QK circuit makes the trigger attend to the opener, the OV circuit copies the opener
to its completions, and the direct path (embedding to unembedding) can separate ``in`` from
``at``. Each opener's OV row boosts both of its completions, the "skip-trigram bug" of the
paper, which the direct path of the trigger then settles.

``python -m mechtests.organisms.skip_trigram train --out DIR`` trains (seeded, one thread,
about a minute); ``python -m mechtests.organisms.skip_trigram findings --dir DIR`` writes
findings.json and FINDINGS.md from the library's own tools.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from mechtests.analysis.heads import attention_between, ov_circuit, qk_circuit
from mechtests.analysis.patching import sweep
from mechtests.core import metrics as M
from mechtests.core.engine import run

SPECIALS = ("<bos>", "<unk>")
# opener -> (completion after "in", completion after "at")
RULES = {
    "keep": ("mind", "bay"),
    "take": ("stride", "heart"),
    "bear": ("silence", "ease"),
    "hold": ("check", "arms"),
    "leave": ("peace", "dawn"),
    "set": ("motion", "rest"),
    "put": ("place", "risk"),
    "get": ("touch", "last"),
}
TRIGGERS = ("in", "at")
FILLERS = tuple(
    "the a of and it was he she they we you his her their this that with from for by as on "
    "but or not so then there here when while one some all".split()
)


def vocab() -> list[str]:
    completions = [c for pair in RULES.values() for c in pair]
    return [*SPECIALS, *FILLERS, *RULES, *TRIGGERS, *completions]


def completion(opener: str, trigger: str) -> str:
    return RULES[opener][TRIGGERS.index(trigger)]


def skip_trigrams() -> list[tuple[str, str, str]]:
    """Every (A, B, C) of the language: A ... B -> C."""
    return [(a, b, completion(a, b)) for a in RULES for b in TRIGGERS]


@dataclass(frozen=True)
class SkipTrigramRecipe:
    """Everything that determines the checkpoint."""

    n_embd: int = 64
    n_head: int = 4
    n_positions: int = 24
    doc_len: int = 20  # words after <bos>
    steps: int = 2000
    batch: int = 64
    lr: float = 3e-3
    warmup: int = 100
    weight_decay: float = 0.01
    share_rule: float = 0.7  # documents with an opener before the trigger
    share_lone_trigger: float = 0.2  # a trigger with no opener before it: a random filler next
    seed: int = 0


def document(rng: random.Random, r: SkipTrigramRecipe, kind: str | None = None
             ) -> dict[str, Any]:
    """One document. ``kind``: "rule" (opener ... trigger completion), "lone" (a trigger with
    no opener before it; an opener may follow later), "plain" (fillers and perhaps an opener);
    None draws it by the recipe's shares."""
    if kind is None:
        u = rng.random()
        kind = "rule" if u < r.share_rule else (
            "lone" if u < r.share_rule + r.share_lone_trigger else "plain")
    words = [rng.choice(FILLERS) for _ in range(r.doc_len)]
    out: dict[str, Any] = {"kind": kind}
    if kind == "rule":
        pb = rng.randint(2, r.doc_len - 2)  # trigger position; its completion at pb + 1
        pa = rng.randint(0, pb - 2)  # at least one word between opener and trigger
        a, b = rng.choice(list(RULES)), rng.choice(TRIGGERS)
        words[pa], words[pb], words[pb + 1] = a, b, completion(a, b)
        out.update(opener=pa, trigger=pb, answer=completion(a, b))
    elif kind == "lone":
        pb = rng.randint(0, r.doc_len - 2)
        words[pb] = rng.choice(TRIGGERS)
        if pb + 3 < r.doc_len and rng.random() < 0.5:  # an opener after it: order matters
            words[rng.randint(pb + 2, r.doc_len - 1)] = rng.choice(list(RULES))
        out.update(trigger=pb)
    elif rng.random() < 0.5:
        words[rng.randint(0, r.doc_len - 1)] = rng.choice(list(RULES))
    out["text"] = " ".join(words)
    return out


def make_model(r: SkipTrigramRecipe, d_vocab: int):
    """GPT-2's architecture with one layer, its MLP zeroed and frozen: attention only."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=d_vocab, n_positions=r.n_positions, n_embd=r.n_embd,
                     n_layer=1, n_head=r.n_head, n_inner=4, resid_pdrop=0.0, embd_pdrop=0.0,
                     attn_pdrop=0.0, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(cfg)
    for p in model.transformer.h[0].mlp.parameters():
        p.data.zero_()
        p.requires_grad_(False)
    return model


def encode(texts: list[str], ids: dict[str, int]) -> torch.Tensor:
    return torch.tensor([[ids["<bos>"]] + [ids[w] for w in t.split()] for t in texts])


@torch.no_grad()
def accuracy(model, ids: dict[str, int], n: int = 400, seed: int = 10**9 + 7) -> float:
    """Top-1 accuracy on the completion of fresh rule documents."""
    rng = random.Random(seed)
    r = SkipTrigramRecipe()
    docs = [document(rng, r, "rule") for _ in range(n)]
    toks = encode([d["text"] for d in docs], ids)
    logits = model(toks)
    logits = getattr(logits, "logits", logits)
    pos = torch.tensor([d["trigger"] + 1 for d in docs])  # the trigger's position (after <bos>)
    pred = logits[torch.arange(n), pos].argmax(-1)
    want = torch.tensor([ids[d["answer"]] for d in docs])
    return float((pred == want).float().mean())


def train(r: SkipTrigramRecipe, log=print):
    """Train per the recipe; returns (model, tokenizer, scores)."""
    from mechtests.organisms.train import make_tokenizer, optimizer, optimizer_step

    torch.set_num_threads(1)
    torch.manual_seed(r.seed)
    words = vocab()
    ids = {w: i for i, w in enumerate(words)}
    tok = make_tokenizer(words)
    model = make_model(r, len(words))
    params, opt = optimizer(model, r.lr, r.weight_decay)
    t0 = time.time()
    ema = None
    for step in range(r.steps):
        rng = random.Random(f"skip-trigram-{r.seed}-{step}")
        toks = encode([document(rng, r)["text"] for _ in range(r.batch)], ids)
        lr = r.lr * (step + 1) / r.warmup if step < r.warmup else r.lr * (
            0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - r.warmup) / (r.steps - r.warmup))))
        loss = optimizer_step(model, opt, params, toks, lr)
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if step % 250 == 0 or step == r.steps - 1:
            log(f"step {step} loss {ema:.3f} ({time.time() - t0:.0f} s)")
    model.eval()
    # every filler is uniform after a filler: the floor of the all-token loss is log(#fillers)
    scores = {"completion_accuracy": accuracy(model, ids), "final_loss_ema": ema,
              "filler_entropy_floor": math.log(len(FILLERS)),
              "minutes": round((time.time() - t0) / 60, 2)}
    return model, tok, scores


def save(model, tok, r: SkipTrigramRecipe, scores: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    info = {"recipe": asdict(r), "scores": scores, "rules": skip_trigrams(),
            "command": "python -m mechtests.organisms.skip_trigram train --out DIR"}
    (out / "training.json").write_text(json.dumps(info, indent=1) + "\n")

# ---------------------------------------------------------------------------------------------
# findings, from the library's own tools (``python -m mechtests.organisms.skip_trigram findings``)

POSITIONS = range(1, SkipTrigramRecipe().doc_len + 1)


def swap_prompts(model, n: int = 64, length: int = 12, seed: int = 7):
    """Rule prompts (fillers, an opener, the trigger last) and the same with another opener;
    (clean, corrupted, answers, counterfactuals, opener positions)."""
    rng = random.Random(seed)
    tok = model.tokenizer.convert_tokens_to_ids
    rows: list[list[Any]] = [[], [], [], [], []]
    for _ in range(n):
        words = [rng.choice(FILLERS) for _ in range(length)]
        pa = rng.randint(0, length - 3)
        a, other = rng.sample(list(RULES), 2)
        words[-1] = b = rng.choice(TRIGGERS)
        swapped = list(words)
        words[pa], swapped[pa] = a, other
        for row, v in zip(rows, (tok(["<bos>", *words]), tok(["<bos>", *swapped]),
                                 tok(completion(a, b)), tok(completion(other, b)), pa + 1)):
            row.append(v)
    return tuple(torch.tensor(r) for r in rows)


@torch.no_grad()
def skip_trigram_findings(model) -> dict[str, Any]:
    ids = model.tokenizer.convert_tokens_to_ids
    openers, triggers, fillers = list(RULES), list(TRIGGERS), list(FILLERS)
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
        hits = {b: sum(completion(a, b) in tops[a][:2] for a in openers) for b in triggers}
        out["heads"][f"0.{h}"] = {"qk_margin_opener_over_fillers": margins,
                                  "ov_top3": tops, "completions_in_ov_top2": hits}
    clean, corrupted, ans, cf, pa = swap_prompts(model)
    res = sweep(model, "z", clean, corrupted, M.logit_diff(ans, cf),
                by=("layer", "head"))
    norm = res.restored()
    out["patching"] = {"clean_logit_diff": round(res.clean, 3),
                       "swapped_logit_diff": round(res.corrupted, 3),
                       "restoration_per_head": [round(float(v), 3) for v in norm.values[0]]}
    end = torch.full_like(pa, clean.shape[1] - 1)
    out["attention_trigger_to_opener"] = {
        w: [round(float(v), 3) for v in attention_between(model, clean, end, pa,
                                                           weighting=w).values[0]]
        for w in ("attention", "norm")}
    logits, _ = run(model, clean, logits_at=-1)
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
    from mechtests.organisms import save_findings

    model = load_model(str(d), device="cpu")
    f = skip_trigram_findings(model)
    text = render(f, json.loads((d / "training.json").read_text()))
    return save_findings(d, f, text, sort_keys=False)


def main(argv: list[str] | None = None) -> None:
    from mechtests.organisms import cli

    p, t = cli("python -m mechtests.organisms.skip_trigram", __doc__)
    t.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.cmd == "train":
        r = SkipTrigramRecipe(seed=a.seed)
        model, tok, scores = train(r, log=lambda s: print(s, flush=True))
        save(model, tok, r, scores, a.out)
        print(json.dumps(scores))
        print(f"wrote {a.out}")
    else:
        print(write_findings(a.dir))


if __name__ == "__main__":
    main()
