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

import argparse
import gzip
import json
import math
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

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
    from mechtests.analysis.heads import detection_pattern, repeated_random_tokens

    toks = repeated_random_tokens(20, batch=8, seed=0, vocab_range=(1, r.vocab_size), bos=0)
    att = model(toks, output_attentions=True).attentions  # L x [n, H, T, T]
    pat = torch.stack(att, 1)
    out = {}
    for kind in ("previous_token", "induction"):
        det = detection_pattern(toks, kind)[:, None, None]
        rows = det.sum(-1) > 0
        ratio = (pat * det).sum(-1) / pat.sum(-1)
        out[kind] = ((ratio * rows).sum(-1) / rows.sum(-1)).mean(0).tolist()
    return out


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
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": r.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=r.lr,
                            betas=(0.9, 0.98))
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
        for group in opt.param_groups:
            group["lr"] = lr
        toks = window_batch(r, stream, g, r.batch)
        logits = model(toks).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 toks[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
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


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m mechtests.organisms.prose",
                                description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("--out", type=Path, required=True)
    t.add_argument("--steps", type=int, default=None)
    t.add_argument("--install", action="store_true", help=f"apt-get install {PACKAGE} first")
    f = sub.add_parser("findings")
    f.add_argument("--dir", type=Path, required=True)
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
        from mechtests.organisms.prose_findings import write_findings

        print(write_findings(a.dir))


if __name__ == "__main__":
    main()
