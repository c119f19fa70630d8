"""The natural-text induction organism: a 2-layer attention-only GPT-2 trained on English prose.

Corpus: the 1913 Webster of GCIDE, as the Debian package ``dict-gcide`` ships it
(``/usr/share/dictd/gcide.dict.dz``; ``apt-get install dict-gcide`` as root, which ``--install``
runs). Tokenizer: a byte-level BPE (the ``tokenizers`` library, GPT-2's scheme) trained on the
corpus, 1024 tokens. Model: GPT-2's architecture with its MLPs zeroed and frozen, so it is
attention-only, as in Elhage et al. 2021 and Olsson et al. 2022 (it keeps GPT-2's LayerNorms).
Data: windows of prose; in most of them (``repeat_share``) a span of the window's own prose is
repeated at its end (text that quotes itself), so that copying earlier text pays often enough
for the circuit to form within minutes on a CPU. The recipe records the loss on repeated prose
and the heads' scores as training goes, so the drop when the induction head forms is measured,
not assumed.

The checkpoint ships as ``fixtures/organisms/prose`` (README, "Model organisms").

``python -m mechtests.organisms.prose train --out DIR`` trains (seeded, single-threaded);
``python -m mechtests.organisms.prose findings --dir DIR`` writes findings.json and FINDINGS.md
from the library's own tools (``mechtests.analysis.heads``, ``mechtests.analysis.patching.ablate``).
"""

from __future__ import annotations

import gzip
import json
import math
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from mechtests.analysis.heads import (
    head_scores,
    repeat_loss,
    repeated_random_tokens,
    score_patterns,
)
from mechtests.core.sites import Head
from mechtests.organisms import cli, save_findings
from mechtests.organisms.train import optimizer, optimizer_step

CORPUS = Path("/usr/share/dictd/gcide.dict.dz")
PACKAGE = "dict-gcide"
SPECIAL = "<|endoftext|>"


@dataclass(frozen=True)
class ProseRecipe:
    """Everything that determines the checkpoint (with the corpus file's bytes)."""

    vocab_size: int = 1024
    corpus_chars: int = 12_000_000  # cleaned characters used (tokenizer and training)
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 64
    n_positions: int = 48
    steps: int = 4000
    batch: int = 32
    lr: float = 5e-3
    warmup: int = 100
    weight_decay: float = 0.01
    # windows whose end repeats a span of their own prose; the first recipe (2048 tokens, 64
    # positions, lr 3e-3, 0.8 of the windows, spans of 8-24) formed no induction head in 3500
    # steps, nor did 0.9 / 16-31 in 1000; this one formed it between steps 1000 and 2000
    repeat_share: float = 0.9
    repeat_len: tuple[int, int] = (12, 23)
    eval_every: int = 500
    seed: int = 0


class CorpusMissing(RuntimeError):
    """The Debian package that ships the corpus is not installed."""


def install_corpus() -> None:
    """``apt-get install -y dict-gcide`` (needs root)."""
    subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", PACKAGE], check=True)


_PRON = re.compile(r"\\[^\\\n]{0,80}\\")  # \A*bun"dant\ pronunciations
_TAG = re.compile(r"\[(?:\d{4} Webster|PJC|WordNet[^\]]*|Webster \d{4}[^\]]*|[A-Z]{2,4})\]")


def corpus_text(max_chars: int) -> str:
    """The dictionary's prose, cleaned: entries from the first headword on, pronunciation
    marks and source tags removed, braces dropped, whitespace collapsed; ``max_chars`` of it."""
    if not CORPUS.is_file():
        raise CorpusMissing(
            f"{CORPUS} is missing: the corpus ships in the Debian package {PACKAGE}. Install it "
            f"as root (`apt-get install {PACKAGE}`, or run this with --install), then retry."
        )
    raw = gzip.open(CORPUS, "rt", encoding="utf-8", errors="replace").read()
    raw = raw[raw.index("[1913 Webster]"):]  # after the licence header of the first file
    paragraphs = []
    for para in re.split(r"\n\s*\n", raw):
        if "Begin file" in para or "GNU General Public" in para or "* * *" in para:
            continue
        text = _TAG.sub(" ", _PRON.sub("", para)).replace("{", "").replace("}", "")
        text = re.sub(r"\s+", " ", text).strip()
        if len(text) > 20:
            paragraphs.append(text)
    return "\n".join(paragraphs)[:max_chars]


def train_tokenizer(text: str, vocab_size: int):
    """Byte-level BPE trained on ``text`` (GPT-2's scheme), ``<|endoftext|>`` = 0 as BOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import GPT2TokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[SPECIAL],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    lines = text.split("\n")
    tok.train_from_iterator(lines, trainer=trainer)
    return GPT2TokenizerFast(tokenizer_object=tok, bos_token=SPECIAL, eos_token=SPECIAL,
                             unk_token=SPECIAL)


def encode_corpus(tok, text: str) -> torch.Tensor:
    """The corpus as one token stream (paragraphs joined by newlines)."""
    ids = tok(text.split("\n"), add_special_tokens=False)["input_ids"]
    nl = tok("\n", add_special_tokens=False)["input_ids"]
    return torch.tensor([i for row in ids for i in row + nl])


def make_model(r: ProseRecipe, d_vocab: int):
    """GPT-2 architecture, MLPs zeroed and frozen: an attention-only transformer."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=d_vocab, n_positions=r.n_positions, n_embd=r.n_embd,
                     n_layer=r.n_layer, n_head=r.n_head, n_inner=4, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=False,
                     bos_token_id=0, eos_token_id=0)
    cfg._attn_implementation = "eager"  # attentions during training
    model = GPT2LMHeadModel(cfg)
    for block in model.transformer.h:
        for p in block.mlp.parameters():
            p.data.zero_()
            p.requires_grad_(False)
    return model


def window_batch(r: ProseRecipe, stream: torch.Tensor, g: torch.Generator, n: int,
                 repeat: bool | None = None) -> torch.Tensor:
    """``n`` windows [BOS + prose] of n_positions tokens; with ``repeat`` (or a share
    ``repeat_share`` of them when None) the window ends with a copy of a span of its own prose."""
    T = r.n_positions - 1
    rows = []
    starts = torch.randint(0, len(stream) - T - 1, (n,), generator=g)
    flips = torch.rand(n, generator=g)
    lens = torch.randint(r.repeat_len[0], r.repeat_len[1] + 1, (n,), generator=g)
    offs = torch.rand(n, generator=g)
    for s, f, ln, o in zip(starts.tolist(), flips.tolist(), lens.tolist(), offs.tolist()):
        rep = (f < r.repeat_share) if repeat is None else repeat
        if rep:
            first = stream[s: s + T - ln]
            u = int(o * (len(first) - ln))
            rows.append(torch.cat([first, first[u: u + ln]]))
        else:
            rows.append(stream[s: s + T])
    bos = torch.zeros(n, 1, dtype=torch.long)
    return torch.cat([bos, torch.stack(rows)], 1)


def held_out(stream: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(training stream, the last 5% held out for evaluation)."""
    cut = int(len(stream) * 0.95)
    return stream[:cut], stream[cut:]


@torch.no_grad()
def repeated_prose_loss(model, r: ProseRecipe, stream: torch.Tensor, n: int = 64,
                        span: int = 20, seed: int = 1) -> dict[str, float]:
    """Loss on held-out prose windows whose last ``span`` tokens repeat an earlier span: on the
    repeated span (its 2nd token on) and on the same tokens' first occurrence."""
    g = torch.Generator().manual_seed(seed)
    rr = ProseRecipe(**{**asdict(r), "repeat_len": (span, span)})
    toks = window_batch(rr, stream, g, n, repeat=True)
    logits = model(toks)
    logits = getattr(logits, "logits", logits)
    nll = -logits[:, :-1].log_softmax(-1).gather(-1, toks[:, 1:, None])[..., 0]  # [n, T-1]
    second = nll[:, -(span - 1):].mean()
    # the first occurrence of the same span: find it (u) per row from the copy
    firsts = []
    T = toks.shape[1]
    for i in range(n):
        body, copy = toks[i, 1: T - span], toks[i, T - span:]
        for u in range(len(body) - span + 1):
            if torch.equal(body[u: u + span], copy):
                firsts.append(nll[i, u + 1: u + span].mean())  # predictions of tokens 2..span
                break
    return {"repeated_span": float(second), "first_occurrence": float(torch.stack(firsts).mean()),
            "all_tokens": float(nll.mean())}


@torch.no_grad()
def head_score_snapshot(model, r: ProseRecipe) -> dict[str, list[list[float]]]:
    """Previous-token and induction scores per head (TL's definitions, offset 1) of a raw
    HF model during training, on repeated random tokens (BOS + 2 x 20)."""
    toks = repeated_random_tokens(20, batch=8, seed=0, vocab_range=(1, r.vocab_size), bos=0)
    att = model(toks, output_attentions=True).attentions  # L x [n, H, T, T]
    pat = torch.stack(att, 1)
    return {kind: score_patterns(pat, toks, kind, "targets").mean(0).tolist()
            for kind in ("previous_token", "induction")}


def train(r: ProseRecipe, log=print):
    """Train per the recipe; returns (model, tokenizer, history)."""
    torch.set_num_threads(1)
    torch.manual_seed(r.seed)
    t0 = time.time()
    text = corpus_text(r.corpus_chars)
    tok = train_tokenizer(text, r.vocab_size)
    stream, evals = held_out(encode_corpus(tok, text))
    log(f"corpus {len(text):,} chars -> {len(stream) + len(evals):,} tokens "
        f"({time.time() - t0:.0f} s)")
    model = make_model(r, len(tok))
    params, opt = optimizer(model, r.lr, r.weight_decay)
    g = torch.Generator().manual_seed(r.seed)
    history = []
    for step in range(r.steps + 1):
        if step % r.eval_every == 0:
            model.eval()
            rec = {"step": step, "tokens_seen": step * r.batch * r.n_positions,
                   "minutes": round((time.time() - t0) / 60, 2),
                   **repeated_prose_loss(model, r, evals)}
            snap = head_score_snapshot(model, r)
            rec["best_previous_token_layer0"] = max(snap["previous_token"][0])
            rec["best_induction_later_layers"] = max(max(row) for row in snap["induction"][1:])
            history.append(rec)
            log(json.dumps(rec))
            model.train()
        if step == r.steps:
            break
        lr = r.lr * (step + 1) / r.warmup if step < r.warmup else r.lr * (
            0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - r.warmup) / (r.steps - r.warmup))))
        toks = window_batch(r, stream, g, r.batch)
        optimizer_step(model, opt, params, toks, lr)
    model.eval()
    return model, tok, history


def save(model, tok, r: ProseRecipe, history: list[dict], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    for extra in ("vocab.json", "merges.txt"):  # tokenizer.json holds them already
        (out / extra).unlink(missing_ok=True)
    info = {"recipe": asdict(r), "corpus": {"package": PACKAGE, "file": str(CORPUS)},
            "history": history,
            "command": "python -m mechtests.organisms.prose train --out DIR"}
    (out / "training.json").write_text(json.dumps(info, indent=1) + "\n")

# ---------------------------------------------------------------------------------------------
# findings, from the library's own tools: ``mechtests.analysis.heads.head_scores`` (TL's
# definitions, offset 1) on repeated random tokens and repeated held-out prose, and
# ``mechtests.analysis.patching.ablate`` for what zero-ablating heads costs

PREV_THRESHOLD = 0.5  # a previous-token head: most of its attention on the previous token
INDUCTION_THRESHOLD = 0.5  # an induction head: most of its attention on the induction target
N_RANDOM, N_PROSE, PREFIX = 23, 27, 20  # 1 + 2 x 23 and 1 + 27 + 20 fit 48 positions


def prose_repeats(model, n: int = 32, seed: int = 2, corpus_chars: int | None = None,
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens [n, 1 + N_PROSE + PREFIX], next-token answers [n]): held-out prose segments of
    ``N_PROSE`` tokens followed by the first ``PREFIX`` tokens of themselves; the answer is the
    segment's next token, which only copying the earlier text predicts."""
    text = corpus_text(corpus_chars or ProseRecipe().corpus_chars)
    stream = held_out(encode_corpus(model.tokenizer, text))[1]
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

    idx = torch.arange(len(answers))

    def logprob(logits: torch.Tensor) -> torch.Tensor:  # [..., n, V] -> [..., n]
        return logits.log_softmax(-1)[..., idx, answers]

    heads = [str(Head(la, h)) for la in range(model.cfg.n_layers)
             for h in range(model.cfg.n_heads)]
    single = ablate(model, prose, heads, logprob, how="zero")
    out["prose_copy_logprob"] = single.clean
    out["ablate_each_head"] = {c: round(float(v), 4) for c, v in
                               zip(single.labels["component"], single.values)}
    for role in ("induction_heads", "previous_token_heads"):
        named = [h for h, _ in out[role]]
        if named:
            together = ablate(model, prose, named, logprob, how="zero", together=True)
            out[f"ablate_{role}"] = float(together.values.reshape(-1)[0])
    # next-token loss on the random tokens' first copy (tokens 1..N) and the repeated one
    # (tokens 2..N, predictable only by induction)
    loss = repeat_loss(model, rand, first_from=1, bos=True)
    out["random_repeat_loss"] = {"first_half": loss.at(copy="first"),
                                 "second_half": loss.at(copy="second")}
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
        f"`{f['command']}` on the 1913 Webster of GCIDE (Debian package `{PACKAGE}`), "
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
    """Measure the checkpoint in ``d``; write findings.json and FINDINGS.md beside it."""
    from mechtests.core.models import describe, load_model

    torch.set_num_threads(1)
    model = load_model(str(d), device="cpu")
    training = json.loads((d / "training.json").read_text())
    f = {"organism": "prose", "model": describe(model),
         "command": training["command"].replace("--out DIR", "--out fixtures/organisms/prose"),
         **prose_findings(model, training["recipe"]["corpus_chars"])}
    return save_findings(d, f, render(f, training))


def main(argv: list[str] | None = None) -> None:
    p, t = cli("python -m mechtests.organisms.prose", __doc__)
    t.add_argument("--steps", type=int, default=None)
    t.add_argument("--install", action="store_true", help=f"apt-get install {PACKAGE} first")
    a = p.parse_args(argv)
    if a.cmd == "train":
        if a.install:
            install_corpus()
        r = ProseRecipe() if a.steps is None else ProseRecipe(steps=a.steps)
        try:
            model, tok, history = train(r, log=lambda s: print(s, flush=True))
        except CorpusMissing as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(2)
        save(model, tok, r, history, a.out)
        print(f"wrote {a.out}")
    else:
        print(write_findings(a.dir))


if __name__ == "__main__":
    main()
