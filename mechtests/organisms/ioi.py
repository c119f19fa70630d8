"""The IOI organism that must copy: a small GPT-2 trained on IOI sentences over 506 names.

Language: the IOI templates of Wang et al. 2022 (BABA, and the same with the first pair swapped,
ABBA) and the four of TransformerLens's Exploratory Analysis Demo (``mechtests.families``),
with random places and objects; every training sentence ends in its answer, the indirect
object, and only that answer is scored. Names: ``ioi_names.txt`` beside this file (Faker's
en_US first names that GPT-2 encodes as one token, plus the GPT-2 families' 16). A seeded
tenth of them is *held out of IOI*: no IOI training sentence contains one; in a share of
training sequences (``copy_share``) names (held-out ones included) are listed and then listed
again, and the repeated list is scored, so every name's embedding is trained, though never in
an IOI sentence. Another tenth is *never seen*: in no training sequence at all.

Tokenizer: a sub-vocabulary of GPT-2's byte-level BPE: GPT-2's strings, the 256 bytes and the
merges GPT-2 applies to the language's words (so every sentence of the language, and the GPT-2
IOI families, split exactly as GPT-2 splits them). Model: GPT-2's architecture with input and
output embeddings tied, as GPT-2's are, so a name's unembedding is its embedding.

``python -m mechtests.organisms.ioi train --out DIR`` trains (seeded, single-threaded);
``python -m mechtests.organisms.ioi findings --dir DIR`` writes findings.json and FINDINGS.md.
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

from mechtests.organisms import cli
from mechtests.organisms.train import optimizer

NAMES_FILE = Path(__file__).with_name("ioi_names.txt")
ENDOFTEXT = "<|endoftext|>"

# Wang et al. 2022 (arXiv 2211.00593), appendix: the BABA templates; [B] is S, [A] the IO
WANG_TEMPLATES = [
    "Then, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to [A]",
    "Then, [B] and [A] had a lot of fun at the [PLACE]. [B] gave a [OBJECT] to [A]",
    "Then, [B] and [A] were working at the [PLACE]. [B] decided to give a [OBJECT] to [A]",
    "Then, [B] and [A] were thinking about going to the [PLACE]. [B] wanted to give a "
    "[OBJECT] to [A]",
    "Then, [B] and [A] had a long argument, and afterwards [B] said to [A]",
    "After [B] and [A] went to the [PLACE], [B] gave a [OBJECT] to [A]",
    "When [B] and [A] got a [OBJECT] at the [PLACE], [B] decided to give it to [A]",
    "When [B] and [A] got a [OBJECT] at the [PLACE], [B] decided to give the [OBJECT] to [A]",
    "While [B] and [A] were working at the [PLACE], [B] gave a [OBJECT] to [A]",
    "While [B] and [A] were commuting to the [PLACE], [B] gave a [OBJECT] to [A]",
    "After the lunch, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to [A]",
    "Afterwards, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to [A]",
    "Then, [B] and [A] had a long argument. Afterwards [B] said to [A]",
    "The [PLACE] [B] and [A] went to had a [OBJECT]. [B] gave it to [A]",
    "Friends [B] and [A] found a [OBJECT] at the [PLACE]. [B] gave it to [A]",
]
# the Exploratory Analysis Demo's four (mechtests.families.IOI_EA_TEMPLATES), in that notation
EA_TEMPLATES = [
    "When [B] and [A] went to the shops, [B] gave the bag to [A]",
    "When [B] and [A] went to the park, [B] gave the ball to [A]",
    "When [B] and [A] went to the shops, [B] gave an apple to [A]",
    "After [B] and [A] went to the park, [B] gave a drink to [A]",
]
TEMPLATES = WANG_TEMPLATES + EA_TEMPLATES
# Wang et al.'s places and objects, and more of the same kind
PLACES = ("store garden restaurant school hospital office house station park shops beach "
          "market library church museum airport cafe bank hotel farm zoo gym theater "
          "kitchen river lake forest mall club city").split()
OBJECTS = ("ring kiss bone basketball computer necklace drink snack bag ball apple book pen "
           "cup hat key letter phone gift flower cake coin card ticket box watch shirt toy "
           "bottle camera").split()


# sentences before an IOI sentence; [C] is a third name (neither IO nor S)
PREFIXES = [
    "Later [C] was happy.", "It was a sunny day.", "Yesterday [C] said hello.",
    "Then [C] had a dog.", "The weather was nice.", "Back then [C] lived in the city.",
    "Everyone liked [C].", "At noon [C] called home.", "That morning [C] woke up early.",
    "Nobody saw [C] that day.",
]


@dataclass(frozen=True)
class IOIRecipe:
    """Everything that determines the checkpoint (with ioi_names.txt and GPT-2's BPE files)."""

    n_layer: int = 4
    n_head: int = 8
    n_embd: int = 128
    n_inner: int = 512
    n_positions: int = 64
    steps: int = 2000
    batch: int = 64
    lr: float = 2e-3
    warmup: int = 200
    weight_decay: float = 0.01
    copy_share: float = 0.25  # sequences that list names and repeat the list (every name)
    copy_len: tuple[int, int] = (2, 8)
    held_out_share: float = 0.1  # names in no IOI training sentence (only in the copy lists)
    unseen_share: float = 0.1  # names in no training sequence at all
    abba_share: float = 0.5
    # IOI sentences after a short sentence (PREFIXES) naming a third person: copying every name
    # in sight and suppressing S no longer finds the IO (0: no prefixes)
    prefix_share: float = 0.0
    eval_every: int = 500
    seed: int = 0


# ---------------------------------------------------------------------------------------------
# names and the language


def all_names() -> list[str]:
    """The name pool (``ioi_names.txt``), sorted."""
    return [w for w in NAMES_FILE.read_text().splitlines() if w and not w.startswith("#")]


def split_names(r: IOIRecipe) -> dict[str, list[str]]:
    """{'train', 'held_out', 'unseen'}: a seeded split of the pool. The GPT-2 IOI families'
    names are always in 'train' (the claims run on those families)."""
    from mechtests.families import IOI_NAMES

    fixed = {n for pair in IOI_NAMES for n in pair}
    pool = [n for n in all_names() if n not in fixed]
    random.Random(f"ioi-names-{r.seed}").shuffle(pool)
    n_all = len(pool) + len(fixed)
    k_held, k_unseen = round(r.held_out_share * n_all), round(r.unseen_share * n_all)
    return {"held_out": sorted(pool[:k_held]), "unseen": sorted(pool[k_held:k_held + k_unseen]),
            "train": sorted(pool[k_held + k_unseen:] + list(fixed))}


def ioi_sentence(rng: random.Random, names: list[str], order: str,
                 templates: list[str] | None = None, prefix: bool = False) -> dict[str, Any]:
    """One IOI prompt from a random template: {'prompt', 'io', 's', 'order', 'template'};
    with ``prefix`` after one of PREFIXES (its third name drawn from ``names`` too)."""
    t = rng.randrange(len(templates or TEMPLATES))
    text = (templates or TEMPLATES)[t]
    io, s = rng.sample(names, 2)
    if prefix:
        c = rng.choice([n for n in names if n not in (io, s)])
        text = rng.choice(PREFIXES).replace("[C]", c) + " " + text
    if order == "ABBA":  # IO named first: swap the first pair
        text = text.replace("[B] and [A]", "[A] and [B]", 1)
    obj = rng.choice(OBJECTS)
    text = text.replace("[PLACE]", rng.choice(PLACES)).replace("[OBJECT]", obj)
    prompt = text.replace("[A]", io).replace("[B]", s)
    assert prompt.endswith(" " + io)
    return {"prompt": prompt[: -len(io) - 1], "io": io, "s": s, "order": order,
            "template": t}


def corpus_strings(names: list[str]) -> list[str]:
    """Strings covering every word of the language (for the sub-vocabulary)."""
    from mechtests.families import IOI_EA_TEMPLATES

    out = [t.replace("[PLACE]", p).replace("[OBJECT]", o).replace("[A]", "Mary")
           .replace("[B]", "John") for t in TEMPLATES for p in PLACES[:1] for o in OBJECTS[:1]]
    out += [f"the {p}. the {p}, the {p} " for p in PLACES]
    out += [f"a {o}. the {o} to an {o}, " for o in OBJECTS]
    out += [t for t, *_ in IOI_EA_TEMPLATES]
    out += [" " + " ".join(names) + "," + ",".join(names)]
    out += [p.replace("[C]", "Mary") + " " + t for p in PREFIXES for t in out[:len(TEMPLATES)]]
    return out


# ---------------------------------------------------------------------------------------------
# the sub-vocabulary tokenizer


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> tuple[list[str], list[tuple[str, str]]]:
    """GPT-2's BPE on one pre-token (byte-level string): (its tokens, the merges applied)."""
    parts, used = list(word), []
    while len(parts) > 1:
        pairs = [(ranks.get((a, b), math.inf), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
        rank, _ = min(pairs)
        if rank == math.inf:
            break
        pair = next((parts[i], parts[i + 1]) for rk, i in pairs if rk == rank)
        used.append(pair)
        merged, i = [], 0
        while i < len(parts):
            if i < len(parts) - 1 and (parts[i], parts[i + 1]) == pair:
                merged.append(parts[i] + parts[i + 1])
                i += 2
            else:
                merged.append(parts[i])
                i += 1
        parts = merged
    return parts, used


def make_tokenizer(strings: list[str]):
    """A byte-level BPE holding GPT-2's 256 byte tokens, ``<|endoftext|>`` and every token and
    merge GPT-2 uses on ``strings`` (in GPT-2's order): it splits those strings as GPT-2 does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import GPT2TokenizerFast

    from mechtests.testing import GPT2_TOKENIZER_DIR

    enc = json.loads((GPT2_TOKENIZER_DIR / "encoder.json").read_text())
    merges = [tuple(m.split(" ")) for m in
              (GPT2_TOKENIZER_DIR / "vocab.bpe").read_text(encoding="utf-8").splitlines()[1:] if m]
    ranks = {m: i for i, m in enumerate(merges)}
    pre = pre_tokenizers.ByteLevel(add_prefix_space=False)
    keep, used = set(pre_tokenizers.ByteLevel.alphabet()), set()
    for s in strings:
        for word, _ in pre.pre_tokenize_str(s):
            toks, applied = _bpe(word, ranks)
            keep.update(toks)
            used.update(applied)
    for a, b in used:
        keep.update((a, b, a + b))
    order = sorted(keep, key=enc.__getitem__) + [ENDOFTEXT]
    vocab = {t: i for i, t in enumerate(order)}
    kept = [m for m in merges if m in used]
    tok = Tokenizer(models.BPE(vocab, kept))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return GPT2TokenizerFast(tokenizer_object=tok, bos_token=ENDOFTEXT, eos_token=ENDOFTEXT,
                             unk_token=ENDOFTEXT)


# ---------------------------------------------------------------------------------------------
# model and data


def make_model(r: IOIRecipe, d_vocab: int, bos: int):
    """GPT-2's architecture, input and output embeddings tied."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=d_vocab, n_positions=r.n_positions, n_embd=r.n_embd,
                     n_layer=r.n_layer, n_head=r.n_head, n_inner=r.n_inner, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True,
                     bos_token_id=bos, eos_token_id=bos)
    return GPT2LMHeadModel(cfg)


def name_ids(tok, names: list[str]) -> list[int]:
    ids = [tok(" " + n, add_special_tokens=False)["input_ids"] for n in names]
    assert all(len(i) == 1 for i in ids), "every name is one token"
    return [i[0] for i in ids]


def make_batch(r: IOIRecipe, step: int, tok, split: dict[str, list[str]],
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens [B, T], loss weights [B, T-1]) of one step: IOI sentences scored at the answer,
    and (``copy_share``) name lists repeated, scored on the repeat from its second name."""
    rng = random.Random(f"ioi-batch-{r.seed}-{step}")
    bos = tok.bos_token_id
    copy_pool = name_ids(tok, split["train"] + split["held_out"])
    seqs, scored = [], []
    for _ in range(r.batch):
        if rng.random() < r.copy_share:
            n = rng.randint(*r.copy_len)
            span = rng.sample(copy_pool, n)
            seqs.append([bos, *span, *span])
            scored.append(list(range(n + 1, 2 * n)))  # weights index j predicts token j + 1
        else:
            order = "ABBA" if rng.random() < r.abba_share else "BABA"
            d = ioi_sentence(rng, split["train"], order,
                             prefix=r.prefix_share > 0 and rng.random() < r.prefix_share)
            ids = [bos, *tok(d["prompt"] + " " + d["io"], add_special_tokens=False)["input_ids"]]
            seqs.append(ids)
            scored.append([len(ids) - 2])
    T = max(len(s) for s in seqs)
    tokens = torch.full((len(seqs), T), bos, dtype=torch.long)
    weights = torch.zeros(len(seqs), T - 1)
    for i, (s, w) in enumerate(zip(seqs, scored)):
        tokens[i, : len(s)] = torch.tensor(s)
        weights[i, w] = 1.0 / len(w)
    return tokens, weights


@torch.no_grad()
def ioi_accuracy(model, tok, names: list[str], n: int = 400, seed: int = 10_000,
                 ) -> dict[str, float]:
    """On ``n`` fresh IOI prompts over ``names`` (half ABBA): 'top1', the share whose top
    next token is the IO; 'io_over_s', the share where logit(IO) > logit(S); 'logit_diff',
    the mean logit(IO) - logit(S). Works on a raw HF model."""
    rng = random.Random(f"ioi-eval-{seed}")
    docs = [ioi_sentence(rng, names, "ABBA" if i % 2 else "BABA") for i in range(n)]
    bos = tok.bos_token_id
    top1 = over = diff = 0.0
    for chunk in range(0, n, 100):
        part = docs[chunk: chunk + 100]
        enc = [[bos, *tok(d["prompt"], add_special_tokens=False)["input_ids"]] for d in part]
        T = max(len(e) for e in enc)
        toks = torch.full((len(enc), T), bos, dtype=torch.long)
        for i, e in enumerate(enc):
            toks[i, : len(e)] = torch.tensor(e)
        logits = model(toks).logits
        last = logits[torch.arange(len(enc)), torch.tensor([len(e) - 1 for e in enc])]
        io = torch.tensor(name_ids(tok, [d["io"] for d in part]))
        s = torch.tensor(name_ids(tok, [d["s"] for d in part]))
        rows = torch.arange(len(enc))
        d_ = last[rows, io] - last[rows, s]
        top1 += float((last.argmax(-1) == io).sum())
        over += float((d_ > 0).sum())
        diff += float(d_.sum())
    return {"top1": top1 / n, "io_over_s": over / n, "logit_diff": diff / n}


def evaluate(model, tok, split: dict[str, list[str]], n: int = 400) -> dict[str, Any]:
    return {k: ioi_accuracy(model, tok, v, n=n) for k, v in split.items()}


def scored_loss(model, tokens: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The weighted next-token loss, unembedding only the scored positions (the cheap way)."""
    hidden = model.transformer(tokens).last_hidden_state[:, :-1]
    rows, cols = weights.nonzero(as_tuple=True)
    logits = model.lm_head(hidden[rows, cols])
    nll = torch.nn.functional.cross_entropy(logits, tokens[rows, cols + 1], reduction="none")
    return (nll * weights[rows, cols]).sum() / weights.sum()


def train(r: IOIRecipe, log=print):
    """Train per the recipe; returns (model, tokenizer, history)."""
    torch.set_num_threads(1)
    torch.manual_seed(r.seed)
    t0 = time.time()
    split = split_names(r)
    tok = make_tokenizer(corpus_strings(all_names()))
    model = make_model(r, len(tok), tok.bos_token_id)
    model.train()
    params, opt = optimizer(model, r.lr, r.weight_decay)
    history = []
    for step in range(r.steps + 1):
        if step % r.eval_every == 0 or step == r.steps:
            model.eval()
            rec = {"step": step, "minutes": round((time.time() - t0) / 60, 2),
                   **evaluate(model, tok, split, n=200)}
            history.append(rec)
            log(json.dumps(rec))
            model.train()
        if step == r.steps:
            break
        lr = r.lr * (step + 1) / r.warmup if step < r.warmup else r.lr * (
            0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - r.warmup) / (r.steps - r.warmup))))
        for g in opt.param_groups:
            g["lr"] = lr
        tokens, weights = make_batch(r, step, tok, split)
        loss = scored_loss(model, tokens, weights)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    model.eval()
    return model, tok, history


def save(model, tok, r: IOIRecipe, history: list[dict], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    for extra in ("vocab.json", "merges.txt"):  # tokenizer.json holds them already
        (out / extra).unlink(missing_ok=True)
    info = {"recipe": asdict(r), "names": split_names(r), "history": history,
            "command": "python -m mechtests.organisms.ioi train --out DIR"}
    (out / "training.json").write_text(json.dumps(info, indent=1) + "\n")


def main(argv: list[str] | None = None) -> None:
    p, t = cli("python -m mechtests.organisms.ioi", __doc__)
    t.add_argument("--steps", type=int, default=None)
    t.add_argument("--set", action="append", default=[],
                   help="override a recipe field, e.g. --set copy_share=0.5 (experiments)")
    a = p.parse_args(argv)
    if a.cmd == "train":
        kw: dict[str, Any] = {}
        for s in a.set:
            k, v = s.split("=", 1)
            kw[k] = json.loads(v)
        if a.steps is not None:
            kw["steps"] = a.steps
        r = IOIRecipe(**kw)
        model, tok, history = train(r, log=lambda s: print(s, flush=True))
        save(model, tok, r, history, a.out)
        print(f"wrote {a.out}")
    else:
        from mechtests.organisms import ioi_findings

        print(ioi_findings.write_findings(a.dir))


if __name__ == "__main__":
    main()
