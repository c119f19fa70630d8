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
``python -m mechtests.organisms.ioi findings --dir DIR`` writes findings.json and FINDINGS.md
from the library's own views (``mechtests.analysis``).
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

from mechtests.analysis.attribution import head_attribution
from mechtests.analysis.heads import attention_between, head_scores, repeated_random_tokens
from mechtests.analysis.patching import ablate, path_patch, sweep
from mechtests.core.sites import Head
from mechtests.organisms import cli, save_findings
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


# ---------------------------------------------------------------------------------------------
# findings, from the library's own views: accuracy per name split, and on the GPT-2 IOI families
# (``mechtests.families``, ABBA and BABA, the ones the claims run on) head direct logit
# attribution, attention between the named positions, mean ablation of each head, path patching
# into the name movers' queries and keys, and the head detectors on repeated random tokens

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
        # denoising: each sender's clean write added to the movers' queries (keys, values) in the
        # corrupted run; fraction of the clean - corrupted gap it restores
        for c in ("q", "k", "v"):
            pp = path_patch(model, fam.clean, fam.corrupted, metric, movers, component=c)
            restored = (pp.values - corrupted) / (clean - corrupted)
            out[f"path_patch_to_movers_{c}"] = _mat(restored)
            out[f"path_patch_top_{c}"] = _top(restored)
    # where the answer lives on its way into the movers' layer: that layer's input patched
    # clean -> corrupted at one position at a time (fraction of the gap restored)
    first = min((int(h.split(".")[0]) for h in movers), default=1)
    rp = sweep(model, "resid_pre", fam.clean, fam.corrupted, metric, layers=[first])
    out["movers_layer"] = first
    out["movers_layer_input_restored"] = [_r(v) for v in ((rp.values[0] - corrupted)
                                                           / (clean - corrupted)).tolist()]
    out["positions"] = {k: int(v[0]) for k, v in P.items()}
    out["tokens"] = list(fam.str_tokens)
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


def _over(m: list[list[float]], t: float, layers: range | None = None) -> list[str]:
    return [f"{la}.{h}" for la, row in enumerate(m) for h, v in enumerate(row)
            if v > t and (layers is None or la in layers)]


def summary(f: dict[str, Any]) -> list[str]:
    """'What formed', read off the measurements (each sentence from the numbers below it)."""
    acc, det, lines = f["accuracy"], f["detectors"], ["## What formed", ""]
    n_layers = len(next(iter(f["orders"].values()))["dla"])
    later = range(1, n_layers)
    for order, o in f["orders"].items():
        att, mv = o["attention"], o["name_movers"]
        movers_io = _over(att["END->IO"], 0.5, later)
        where = {k: [_at(att[f"END->{k}"], h) for h in mv] for k in ("IO", "S1", "S2")}
        best = max(where, key=lambda k: sum(where[k])) if mv else None
        text = (f"- {order}: heads beyond layer 0 attending END -> IO above 0.5 (Wang et al.'s "
                f"name movers): **{', '.join(movers_io) or 'none'}**.")
        if mv:
            text += (f" The heads that write the IO (DLA >= {MIN_MOVER_DLA}: "
                     f"{', '.join(mv)}) attend from END to {best} "
                     f"({min(where[best]):.2f}-{max(where[best]):.2f}), to the IO at most "
                     f"{max(where['IO']):.2f}.")
            src = "S1->IO" if best == "S1" else "S2->IO" if best == "S2" else None
            if src and src in att:
                fill = _over(att[src], 0.5, range(0, min(int(h.split(".")[0]) for h in mv)))
                text += (f" Earlier heads attending {src} above 0.5: "
                         f"{', '.join(fill) or 'none'}")
                if fill and src == "S2->IO":
                    own = max(_at(att["S2->S1"], h) for h in fill)
                    text += (f" (S2 -> S1, the same name as S2, at most {own:.2f}: they pick "
                             "the other name)")
                text += (f"; consistent with the IO reaching {best}'s residual first and being "
                         "copied to END from there, in two hops (attention, not a causal "
                         "test)." if fill else ".")
            if "movers_layer_input_restored" in o:
                rr, pos = o["movers_layer_input_restored"], o["positions"]
                text += (f" Layer {o['movers_layer']}'s input patched clean -> corrupted at "
                         f"S2 alone restores {rr[pos['S2']]:.2f} of the gap, at END "
                         f"{rr[pos['END']]:.2f}: "
                         + ("nothing about S reaches END's query before the movers read "
                            "it (no S-inhibition in front of them); what changes is at S2, "
                            "on the keys' and values' side." if abs(rr[pos["END"]]) < 0.05
                            else "some of it reaches END before the movers read it."))
            for c, what in (("q", "queries"), ("k", "keys"), ("v", "values")):
                if f"path_patch_top_{c}" in o:
                    h, v = o[f"path_patch_top_{c}"][0]
                    text += (f" Through the movers' {what} the best single sender restores "
                             f"{v:.2f} of the gap ({h}).")
        lines.append(text)
    lines.append("- S-inhibition heads in Wang et al.'s sense would show as senders restoring a "
                 "large share through the movers' queries (above); duplicate-token heads "
                 "(detector above 0.5): " + (", ".join(h for h, _ in det["duplicate_token_heads"])
                                             or "none") + "; previous-token: "
                 + (", ".join(h for h, _ in det["previous_token_heads"]) or "none")
                 + "; induction: " + (", ".join(h for h, _ in det["induction_heads"]) or "none")
                 + ".")
    lines.append(f"- Names held out of IOI (trained only in the name lists): top-1 "
                 f"{acc['held_out']['top1']:.3f}; names never seen in training: logit(IO) > "
                 f"logit(S) on {acc['unseen']['io_over_s']:.3f} of prompts (chance is 0.5): an "
                 "untrained embedding carries nothing the circuit can copy, while one trained "
                 "in another context is copied like any training name.")
    return lines + [""]


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
        *summary(f),
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
              "queries, keys or values: the fraction of the clean - corrupted logit-diff gap "
              "one sender's clean output restores through them alone)."]
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
        for c, what in (("q", "queries"), ("k", "keys"), ("v", "values")):
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
        if "movers_layer_input_restored" in o:
            named = {v: k for k, v in o["positions"].items()}
            lines.append(f"- Layer {o['movers_layer']}'s input patched clean -> corrupted at "
                         "one position (fraction of the gap restored): " + ", ".join(
                             f"{i} {named.get(i, t.strip())} {v:.2f}" for i, (t, v) in
                             enumerate(zip(o["tokens"], o["movers_layer_input_restored"]))
                             if abs(v) >= 0.05 or i in named) + ".")
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
        for c, what in (("q", "queries"), ("k", "keys"), ("v", "values")):
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
        print(write_findings(a.dir))


if __name__ == "__main__":
    main()
