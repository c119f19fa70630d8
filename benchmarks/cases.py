"""Benchmark cases shared by the timing benchmarks and the peak-memory script.

Each task runs the same cells in every implementation: this engine (``mechtests``),
TransformerLens (``transformer_lens``) and nnsight 0.8 (``nnsight``, sweeps only), all starting
from tokens (a peer's clean run is part of its timed call, as the engine's clean run is part of
its own) and all under ``no_grad``.
"""

from __future__ import annotations

import itertools
import warnings

import pandas as pd
import torch

from mechtests.core.metrics import logit_diff
from mechtests.testing import compare_attribution_with_tl

CASES = {"T11xN1": (11, 1), "T11xN8": (11, 8), "T64xN1": (64, 1), "T64xN8": (64, 8)}
TASKS = ("resid_pre", "head_out", "attribution")
DIFFER_AT = 1  # the one position where a corrupted prompt differs from its clean one


def prompts(T: int, N: int, vocab: int = 50257, seed: int = 0):
    """Random prompts; each corrupted prompt differs from its clean one at position 1 (as in
    "Michelle Jones/Smith ..."): the engine skips patches before the first differing position
    (their activations are identical), so an early difference is its least favourable case."""
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, vocab, (N, T), generator=g)
    corrupted = clean.clone()
    corrupted[:, DIFFER_AT] = (clean[:, DIFFER_AT] + 1 + torch.arange(N)) % vocab
    return clean, corrupted


# A logit difference between two fixed tokens (TL's attribution_patch needs one metric for
# every prompt); it declares the two columns it reads.
metric = logit_diff(torch.tensor(11), torch.tensor(12))


def cells(task: str, case: str, full: bool) -> dict | None:
    """The swept cells: None = the full sweep. ``full=False`` (CI's --benchmark-disable run)
    shrinks every case so the agreement checks stay quick (tests/ check full sweeps)."""
    T, N = CASES[case]
    if full and T == 11:
        return None
    a = T // 3
    if case == "T11xN1":  # first and last layer, every position / head
        return {"layers": [0, 11], **({"positions": list(range(T))} if task == "resid_pre"
                                      else {"heads": list(range(12))})}
    if task == "resid_pre":
        if full:
            return {"layers": list(range(12)) if N == 1 else [0, 3, 6, 9, 11],
                    "positions": [a, (a + T) // 2, T - 1]}
        return {"layers": [0, 11], "positions": [a, T - 1]}
    if full:
        return {"layers": [0, 4, 8, 11] if N == 1 else [0, 11], "heads": list(range(12))}
    return {"layers": [0, 11], "heads": [0, 7]}


def run_ours(engine, task: str, clean, corrupted, sub: dict | None, metric=metric):
    from mechtests.analysis import patching as P

    if task == "attribution":
        return P.attribution_patches(engine, [("z", ("layer", "head", "pos")), "mlp_out",
                                              "resid_pre"], clean, corrupted, metric)
    site = "resid_pre" if task == "resid_pre" else "z"
    return P.sweep(engine, site, clean, corrupted, metric, **(sub or {}))


def run_tl(model, task: str, clean, corrupted, sub: dict | None, metric=metric):
    import transformer_lens.patching as tlp

    if task == "attribution":
        from transformer_lens.tools.analysis import attribution_patch

        return attribution_patch(model, clean, corrupted, lambda lg: metric(lg[0, -1]))
    T, sub = clean.shape[1], sub or {}
    layers = sub.get("layers", range(model.cfg.n_layers))
    with torch.no_grad():
        _, clean_cache = model.run_with_cache(clean)
        if task == "resid_pre":
            axes, setter, act = ("layer", "pos"), tlp.layer_pos_patch_setter, "resid_pre"
            ranges = layers, sub.get("positions", range(T))
        else:
            axes, setter, act = ("layer", "head"), tlp.layer_head_vector_patch_setter, "z"
            ranges = layers, sub.get("heads", range(model.cfg.n_heads))
        df = pd.DataFrame(list(itertools.product(*ranges)), columns=list(axes))
        out = tlp.generic_activation_patch(model, corrupted, clean_cache,
                                           lambda lg: metric(lg[:, -1]), patch_setter=setter,
                                           activation_name=act, index_df=df, reduce="none")
    return out.values  # [cells, N]


def nnsight_model(model):
    """nnsight's ``LanguageModel`` over a fresh Hugging Face model from the bridge's
    checkpoint (what an nnsight user loads), float32, on CPU."""
    from nnsight import LanguageModel

    from mechtests.core.engine import _reference_model

    hf = _reference_model(model)
    hf.config._attn_implementation = "sdpa"  # HF's fastest CPU attention
    with warnings.catch_warnings():  # 0.8 deprecates LanguageModel; it still runs as before
        warnings.simplefilter("ignore")
        return LanguageModel(hf, tokenizer=model.tokenizer)


def _blocks(lm):
    base = lm._module
    for path in ("transformer.h", "gpt_neox.layers", "model.layers"):
        head, _, tail = path.partition(".")
        if hasattr(base, head):
            return getattr(getattr(lm, head), tail)
    raise ValueError(f"no block list in {type(base).__name__}")


# the attention output projection of a block, whose input is the heads' outputs side by side
_OUT_PROJ = {"GPT2LMHeadModel": ("attn", "c_proj"), "GPTNeoXForCausalLM": ("attention", "dense"),
             "LlamaForCausalLM": ("self_attn", "o_proj"),
             "Gemma3ForCausalLM": ("self_attn", "o_proj")}  # before Gemma's post-norm


def _out_proj(lm, block):
    name = type(lm._module).__name__
    if name not in _OUT_PROJ:
        raise ValueError(f"no attention output projection known for {name}")
    attn, proj = _OUT_PROJ[name]
    return getattr(getattr(block, attn), proj)


def run_nnsight(lm, task: str, clean, corrupted, sub: dict | None, max_rows: int = 1024,
                metric=metric):
    """The sweep as nnsight users write it at its fastest: one trace caches the clean run's
    activations at the swept layers, then one batched trace (chunked to ``max_rows`` rows) runs
    every patched variant of every prompt, each row writing the clean activation into its
    slice, and keeps only the last position's logits (``logits_to_keep=1``). Returns
    ``[cells, N]`` like ``run_tl``."""
    N, T = clean.shape
    sub = sub or {}
    blocks = _blocks(lm)
    layers = list(sub.get("layers", range(len(blocks))))
    if task == "resid_pre":
        cells_ = list(itertools.product(layers, sub.get("positions", range(T))))
    else:
        cfg = lm._module.config
        H = cfg.num_attention_heads
        cells_ = list(itertools.product(layers, sub.get("heads", range(H))))
        dh = getattr(cfg, "head_dim", None) or cfg.hidden_size // H

    def site(layer):
        return blocks[layer] if task == "resid_pre" else _out_proj(lm, blocks[layer])

    mask = torch.ones_like(clean)
    with torch.no_grad():
        saved: dict = {}  # filled inside the trace (names assigned there do not come back)
        with lm.trace({"input_ids": clean, "attention_mask": mask}):
            for la in layers:
                saved[la] = site(la).input.save()
        per = max(1, max_rows // N)
        out = []
        for c in range(0, len(cells_), per):
            part = cells_[c:c + per]
            P = len(part)
            toks = corrupted.repeat(P, 1)  # row i * N + n: cell i, prompt n
            with lm.trace({"input_ids": toks, "attention_mask": torch.ones_like(toks)},
                          logits_to_keep=1):
                for la in sorted({cell[0] for cell in part}):
                    x = site(la).input
                    for i, cell in enumerate(part):
                        if cell[0] != la:
                            continue
                        rows = slice(i * N, (i + 1) * N)
                        if task == "resid_pre":
                            x[rows, cell[1]] = saved[la][:, cell[1]]
                        else:
                            cols = slice(cell[1] * dh, (cell[1] + 1) * dh)
                            x[rows, :, cols] = saved[la][:, :, cols]
                out.append(metric(lm.output.logits[:, -1]).reshape(P, N).save())
    return torch.cat(out)


def assert_agree(task: str, ours, tl, atol: float = 1e-4) -> None:
    if task == "attribution":
        assert compare_attribution_with_tl(ours, tl, atol) > 0
        return
    mine = ours.per_prompt.reshape(ours.per_prompt.shape[0], -1).T  # [cells, N]
    assert mine.shape == tl.shape, (mine.shape, tl.shape)
    assert torch.allclose(mine, tl.to(mine.dtype), atol=atol), (mine - tl).abs().max()
