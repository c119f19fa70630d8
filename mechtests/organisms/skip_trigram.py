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

import argparse
import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

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
    from mechtests.organisms.train import make_tokenizer

    torch.set_num_threads(1)
    torch.manual_seed(r.seed)
    words = vocab()
    ids = {w: i for i, w in enumerate(words)}
    tok = make_tokenizer(words)
    model = make_model(r, len(words))
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": r.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=r.lr,
                            betas=(0.9, 0.98))
    t0 = time.time()
    ema = None
    for step in range(r.steps):
        rng = random.Random(f"skip-trigram-{r.seed}-{step}")
        toks = encode([document(rng, r)["text"] for _ in range(r.batch)], ids)
        lr = r.lr * (step + 1) / r.warmup if step < r.warmup else r.lr * (
            0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - r.warmup) / (r.steps - r.warmup))))
        for group in opt.param_groups:
            group["lr"] = lr
        logits = model(toks).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 toks[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
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


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m mechtests.organisms.skip_trigram",
                                description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("--out", type=Path, required=True)
    t.add_argument("--seed", type=int, default=0)
    f = sub.add_parser("findings")
    f.add_argument("--dir", type=Path, required=True)
    a = p.parse_args(argv)
    if a.cmd == "train":
        r = SkipTrigramRecipe(seed=a.seed)
        model, tok, scores = train(r, log=lambda s: print(s, flush=True))
        save(model, tok, r, scores, a.out)
        print(json.dumps(scores))
        print(f"wrote {a.out}")
    else:
        from mechtests.organisms.skip_trigram_findings import write_findings

        print(write_findings(a.dir))


if __name__ == "__main__":
    main()
