"""Train a model organism: ``python -m mechtests.organisms.train <organism> --out DIR``.

Seeded and single-threaded, so the same arguments give the same checkpoint byte for byte on the
same machine. ``--seed`` gives a retrain; ``--init-from DIR --mix task=weight,...`` a fine-tune
on a shifted data mix. The output is an ordinary Hugging Face GPT-2 checkpoint (config.json,
model.safetensors, tokenizer.json, tokenizer_config.json) plus ``training.json`` (the recipe and
its final accuracies). An output directory that already holds a different checkpoint is refused
unless ``--overwrite``; one that holds this recipe's checkpoint is retrained and compared.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from mechtests.core.progress import quiet
from mechtests.organisms import language as lang

CHECKPOINT_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                    "generation_config.json", "training.json")


@dataclass(frozen=True)
class Recipe:
    """Everything that determines a checkpoint."""

    organism: str
    n_layer: int
    n_embd: int
    n_head: int
    n_inner: int
    n_positions: int
    steps: int
    batch: int
    lr: float
    mix: dict[str, float] = field(default_factory=dict)
    seed: int = 0
    warmup: int = 100
    weight_decay: float = 0.01
    answer_weight: float = 1.0  # loss weight of each document's answer token
    # "all": next-word loss on every word; "answer": only on what the task makes predictable
    # (a document's answer; the second copy of a repeated segment, from its second word on).
    # Unpredictable words (random names, the first copy) only add noise that delays induction.
    loss: str = "all"
    init_from: str | None = None


RECIPES = {
    # 0 layers: logits = LN(W_E[token]) @ W_U. Positions carry nothing in a bigram language, so
    # wpe and ln_f.bias are frozen at zero: the model is exactly softmax(W_E W_U / rms(W_E)).
    "bigram": Recipe("bigram", n_layer=0, n_embd=64, n_head=1, n_inner=256, n_positions=64,
                     steps=1500, batch=64, lr=1e-2),
    "induction": Recipe("induction", n_layer=2, n_embd=64, n_head=4, n_inner=256, n_positions=48,
                        steps=1200, batch=64, lr=1e-3, mix={"repeat": 1.0}, loss="answer"),
    "multitask": Recipe("multitask", n_layer=4, n_embd=128, n_head=4, n_inner=256,
                        n_positions=48, steps=2500, batch=64, lr=1e-3, loss="answer",
                        mix={"ioi": 0.3, "recall": 0.2, "contraction": 0.15, "gender": 0.15,
                             "repeat": 0.2}),
}
BIGRAM_SEQ = 64
INDUCTION_LENGTHS = (2, 16)  # segment lengths of the induction organism's documents
MULTITASK_REPEAT_LENGTHS = (2, 10)
REPEAT_MAX_PREFIX = 10  # random words before the first copy: position alone cannot find it


class RecipeError(ValueError):
    """Bad recipe arguments or an output directory the recipe must not touch."""


def vocab(organism: str) -> list[str]:
    return lang.bigram_vocab() if organism == "bigram" else lang.multitask_vocab()


def make_tokenizer(words: list[str]):
    """Word-level fast tokenizer: whitespace split, ``<bos>`` (also eos/pad) and ``<unk>``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)},
                                     unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<bos>",
                                   pad_token="<bos>", unk_token="<unk>")


def make_model(r: Recipe, d_vocab: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=d_vocab, n_positions=r.n_positions, n_embd=r.n_embd,
                     n_layer=r.n_layer, n_head=r.n_head, n_inner=r.n_inner,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=False,
                     bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(cfg)
    if r.organism == "bigram":
        with torch.no_grad():
            model.transformer.wpe.weight.zero_()
            model.transformer.ln_f.bias.zero_()
        model.transformer.wpe.weight.requires_grad_(False)
        model.transformer.ln_f.bias.requires_grad_(False)
    return model


# ---------------------------------------------------------------------------------------------
# data


def batch_docs(r: Recipe, step: int) -> list[dict[str, Any]]:
    """The documents of one training step (deterministic in seed and step)."""
    rng = random.Random(f"batch-{r.seed}-{step}")
    tasks = list(r.mix)
    picks = rng.choices(tasks, weights=[r.mix[t] for t in tasks], k=r.batch)
    docs = []
    for task in tasks:
        n = picks.count(task)
        if not n:
            continue
        seed = r.seed * 1_000_003 + step
        if task == "repeat":
            lo, hi = INDUCTION_LENGTHS if r.organism == "induction" else MULTITASK_REPEAT_LENGTHS
            for i in range(n):
                docs += lang.repeat_prompts(1, seed * 64 + i, length=rng.randint(lo, hi),
                                            prefix=rng.randint(0, REPEAT_MAX_PREFIX))
        else:
            docs += lang.prompts(task, n, seed, split="train")
    return docs


def make_batch(r: Recipe, step: int, ids: dict[str, int]):
    """(tokens [B, T], loss weights [B, T-1]) for one step."""
    if r.organism == "bigram":
        tokens = lang.bigram_sample(r.batch, BIGRAM_SEQ, seed=r.seed * 1_000_003 + step)
        return tokens, torch.ones(tokens.shape[0], tokens.shape[1] - 1)
    docs = batch_docs(r, step)
    seqs = lang.encode([lang.training_text(d) for d in docs], ids)
    T = max(len(s) for s in seqs)
    if T > r.n_positions:
        raise RecipeError(f"a document has {T} tokens, more than n_positions={r.n_positions}")
    tokens = torch.zeros(len(seqs), T, dtype=torch.long)
    weights = torch.zeros(len(seqs), T - 1)
    for i, (s, d) in enumerate(zip(seqs, docs)):
        tokens[i, : len(s)] = torch.tensor(s)
        # weights[i, j] is the loss on word j (token j + 1, after <bos>)
        if r.loss == "all":
            weights[i, : len(s) - 1] = 1.0
        if d["task"] == "repeat":
            prefix, length = d["template"]
            weights[i, prefix + length + 1: prefix + 2 * length] = 1.0
        else:
            weights[i, len(d["clean"].split())] = r.answer_weight
    return tokens, weights


# ---------------------------------------------------------------------------------------------
# training


def train(r: Recipe, progress: bool = True, save_every: int = 0, out: Path | None = None):
    """Train per the recipe; returns (model, tokenizer, final loss).

    ``save_every`` N > 0 writes an ordinary checkpoint after every N optimizer steps (and the
    initial weights, step 0) to ``out/step-NNNNNN/``, each with ``training.json`` holding its
    step and training loss. Saving touches no random state: the final weights are the same.
    """
    from tqdm.auto import tqdm
    from transformers import GPT2LMHeadModel

    torch.set_num_threads(1)
    torch.manual_seed(r.seed)
    words = vocab(r.organism)
    ids = {w: i for i, w in enumerate(words)}
    tok = make_tokenizer(words)
    if r.init_from:
        check_init_from(Path(r.init_from), words)
        model = GPT2LMHeadModel.from_pretrained(r.init_from, use_safetensors=True)
    else:
        model = make_model(r, len(words))
    model.train()
    params, opt = optimizer(model, r.lr, r.weight_decay)

    def lr_at(step: int) -> float:
        if step < r.warmup:
            return r.lr * (step + 1) / r.warmup
        frac = (step - r.warmup) / max(1, r.steps - r.warmup)
        return r.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    bar = tqdm(range(r.steps), desc=f"train {r.organism}", disable=not progress,
               dynamic_ncols=True)
    ema = None
    for step in bar:
        tokens, weights = make_batch(r, step, ids)
        loss = batch_loss(model, tokens, weights)
        if save_every and out is not None and step % save_every == 0:
            save_step(model, tok, r, step, loss.item(), ema, out, save_every)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{ema:.3f}")
    model.eval()
    if save_every and out is not None:
        with torch.no_grad():
            last = batch_loss(model, *make_batch(r, r.steps, ids)).item()
        save_step(model, tok, r, r.steps, last, ema, out, save_every)
    return model, tok, ema


def optimizer(model, lr: float, weight_decay: float):
    """(trainable parameters, AdamW): weight decay on matrices only, betas (0.9, 0.98)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return params, torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                      {"params": no_decay, "weight_decay": 0.0}], lr=lr,
                                     betas=(0.9, 0.98))


def batch_loss(model, tokens: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The recipe's weighted next-token loss on one batch."""
    logits = model(tokens).logits[:, :-1]
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                            tokens[:, 1:].reshape(-1), reduction="none")
    return (nll * weights.reshape(-1)).sum() / weights.sum()


def step_dir(out: Path, step: int) -> Path:
    return out / f"step-{step:06d}"


def save_step(model, tok, r: Recipe, step: int, loss: float, ema: float | None,
              out: Path, every: int) -> None:
    """One intermediate checkpoint of a ``--save-every`` run (``step`` optimizer steps done).

    ``loss``: these very weights' training loss on batch ``step``, the next batch, not yet
    trained on; ``loss_ema``: the moving average (0.98) of the batches trained on so far. For a
    recipe with ``loss="answer"`` both are the loss on what the task makes predictable (for the
    induction organism: the repeated half, from its second word).
    """
    was_training = model.training
    model.eval()
    d = step_dir(out, step)
    d.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(d, safe_serialization=True)
    tok.save_pretrained(d)
    what = ("loss on the repeated half" if r.organism == "induction" and r.loss == "answer"
            else f"training loss ({r.loss})")
    info = {"recipe": asdict(r), "step": step, "loss": round(float(loss), 6),
            "loss_ema": None if ema is None else round(float(ema), 6),
            "loss_kind": f"{what}, on the next batch (not yet trained on)",
            "command": (f"python -m mechtests.organisms.train {r.organism} --out DIR "
                        + " ".join(recipe_args(r))).strip() + f" --save-every {every}"}
    (d / "training.json").write_text(json.dumps(info, indent=1, sort_keys=True) + "\n")
    if was_training:
        model.train()


def optimizer_step(model, opt, params, tokens: torch.Tensor, lr: float) -> torch.Tensor:
    """One step at learning rate ``lr`` on the mean next-token loss of ``tokens`` (gradients
    clipped to norm 1); returns that loss."""
    for group in opt.param_groups:
        group["lr"] = lr
    logits = model(tokens).logits[:, :-1]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                             tokens[:, 1:].reshape(-1))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    return loss


def check_init_from(path: Path, words: list[str]) -> None:
    for f in ("config.json", "model.safetensors", "tokenizer.json"):
        if not (path / f).is_file():
            raise RecipeError(f"--init-from {path}: missing {f}; pass an organism checkpoint dir")
    have = json.loads((path / "tokenizer.json").read_text())["model"]["vocab"]
    if have != {w: i for i, w in enumerate(words)}:
        raise RecipeError(f"--init-from {path}: its vocabulary is not this organism's")


def evaluate(r: Recipe, model) -> dict[str, Any]:
    """Final scores: per-task accuracy on fresh prompts (and, for multitask, on words held out
    of the task), or the bigram fit."""
    from mechtests.organisms import analysis

    if r.organism == "bigram":
        return analysis.bigram_fit(model)
    seed = analysis.EVAL_SEED
    if r.organism == "induction":
        return {"repeat": analysis.task_accuracy(model, "repeat", n=200, seed=seed)}
    out = {t: analysis.task_accuracy(model, t, n=200, seed=seed, split="train")
           for t in lang.TASKS}
    out.update({f"{t} (held-out words)": analysis.task_accuracy(model, t, n=200, seed=seed,
                                                               split="test")
                for t in lang.TASKS if t != "repeat"})
    return out


def save(model, tok, r: Recipe, scores: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    info = {"recipe": asdict(r), "scores": scores,
            "command": (f"python -m mechtests.organisms.train {r.organism} --out DIR "
                       + " ".join(recipe_args(r))).strip()}
    (out / "training.json").write_text(json.dumps(info, indent=1, sort_keys=True) + "\n")


def recipe_args(r: Recipe) -> list[str]:
    base = RECIPES[r.organism]
    args = []
    if r.seed != base.seed:
        args += ["--seed", str(r.seed)]
    if r.steps != base.steps:
        args += ["--steps", str(r.steps)]
    if r.mix != base.mix:
        args += ["--mix", ",".join(f"{k}={v:g}" for k, v in r.mix.items())]
    if r.init_from:
        args += ["--init-from", r.init_from]
    return args


def _same_files(a: Path, b: Path) -> list[str]:
    """Names of checkpoint files that differ between two directories."""
    return [f for f in CHECKPOINT_FILES
            if not (a / f).is_file() or not (b / f).is_file()
            or (a / f).read_bytes() != (b / f).read_bytes()]


def parse_mix(text: str) -> dict[str, float]:
    mix = {}
    for part in text.split(","):
        task, _, w = part.partition("=")
        task = task.strip()
        if task not in lang.TASKS:
            raise RecipeError(f"--mix {text!r}: unknown task {task!r}; tasks are "
                              f"{', '.join(lang.TASKS)}")
        try:
            mix[task] = float(w)
        except ValueError:
            raise RecipeError(f"--mix {text!r}: weight of {task!r} is not a number") from None
    if not any(v > 0 for v in mix.values()) or any(v < 0 for v in mix.values()):
        raise RecipeError(f"--mix {text!r}: weights must be >= 0 with at least one > 0")
    return mix


def run(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(prog="python -m mechtests.organisms.train",
                                description=__doc__.split("\n")[0])
    p.add_argument("organism", choices=sorted(RECIPES))
    p.add_argument("--out", required=True, type=Path, help="checkpoint directory to write")
    p.add_argument("--seed", type=int, default=None, help="retrain with another seed")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--mix", default=None, help="task=weight,... (multitask tasks)")
    p.add_argument("--init-from", default=None, help="fine-tune from this checkpoint dir")
    p.add_argument("--overwrite", action="store_true", help="replace a different checkpoint")
    p.add_argument("--save-every", type=int, default=0, metavar="N",
                   help="also save a checkpoint every N steps (and step 0 and the last) to "
                        "OUT/steps/step-NNNNNN/, each with its step and training loss")
    a = p.parse_args(argv)
    if a.save_every < 0:
        raise RecipeError(f"--save-every {a.save_every}: give N >= 1 (or 0: no intermediate "
                          f"checkpoints)")
    r = RECIPES[a.organism]
    changes: dict[str, Any] = {}
    if a.seed is not None:
        changes["seed"] = a.seed
    if a.steps is not None:
        if a.steps < 1:
            raise RecipeError(f"--steps {a.steps}: need at least 1")
        changes["steps"] = a.steps
        changes["warmup"] = min(r.warmup, max(1, a.steps // 10))
    if a.mix is not None:
        if a.organism == "bigram":
            raise RecipeError("--mix: the bigram organism has a single language, no task mix")
        changes["mix"] = parse_mix(a.mix)
    if a.init_from is not None:
        changes["init_from"] = str(Path(a.init_from))
    r = replace(r, **changes)

    out: Path = a.out
    held = [f for f in ("config.json", "model.safetensors") if (out / f).exists()]
    if held and not a.overwrite:
        recorded = out / "training.json"
        same = recorded.is_file() and json.loads(recorded.read_text()).get("recipe") == asdict(r)
        if not same:
            raise RecipeError(
                f"--out {out} already holds a different checkpoint ({', '.join(held)}, made by "
                f"another recipe or none recorded). Pass --overwrite to replace it, or choose "
                f"another --out directory."
            )
    progress = not quiet()  # no bar under CI or when nobody watches (mechtests.core.progress)
    steps_out = out / "steps"
    if a.save_every and steps_out.exists() and any(steps_out.iterdir()) and not a.overwrite:
        raise RecipeError(f"--out {out}: {steps_out} already holds checkpoints; pass --overwrite "
                          f"to replace them, or choose another --out directory")
    if a.save_every and steps_out.exists() and a.overwrite:
        shutil.rmtree(steps_out)
    model, tok, loss = train(r, progress=progress, save_every=a.save_every, out=steps_out)
    model.tokenizer = tok  # the analysis functions read words through it
    scores = evaluate(r, model)
    with tempfile.TemporaryDirectory() as tmp:
        save(model, tok, r, scores, Path(tmp))
        if held and not a.overwrite:
            differ = _same_files(Path(tmp), out)
            if differ:
                raise RecipeError(
                    f"--out {out} holds a checkpoint recorded with this recipe, but retraining "
                    f"gave different {', '.join(differ)} (another machine or library version?). "
                    f"Nothing was written; pass --overwrite to replace it."
                )
            print(f"{out}: reproduced byte for byte")
        else:
            out.mkdir(parents=True, exist_ok=True)
            for f in CHECKPOINT_FILES:
                if (Path(tmp) / f).is_file():
                    shutil.copyfile(Path(tmp) / f, out / f)
    print(f"{r.organism}: final training loss {loss:.4f}")
    for k, v in scores.items():
        print(f"  {k}: {v:.4f}" if isinstance(v, float) else f"  {k}: {v}")
    return out


def main() -> None:
    try:
        run()
    except RecipeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
