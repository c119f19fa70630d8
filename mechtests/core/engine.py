"""A fast, exact forward pass for the transformer families researchers use, built for patching.

``Engine(model)`` takes the weights of a ``TransformerBridge`` once and runs its own pure-torch,
nanoGPT-style forward. GPT-2 (and pre-LayerNorm OPT) read the bridge's processed
(compatibility-mode) weights; GPT-NeoX/Pythia, GPT-J, Llama, Qwen2, Qwen3 and Gemma 3 read the
Hugging Face model's own weights with every norm's weight folded into the matrix that follows it
(TL's ``fold_ln``). What varies between families is a handful of switches, read once in
``_hf_weights``: LayerNorm or RMSNorm, learned positions or rotary (full, partial, interleaved,
a base per layer), gated MLP, grouped-query attention, parallel attention + MLP, q/k norm,
norms after attention and the MLP, sliding-window layers. Anything else is refused
(:class:`UnsupportedArchitecture`) with what the model has and what the engine lacks. The engine
checks itself against the Hugging Face model's logits when it is built.

Hook names and shapes are TransformerLens's: ``hook_q`` is the query before rotary (after the
q norm, when the model has one), ``hook_k``/``hook_v`` have one entry per key-value head,
``mlp.hook_pre`` is the gate's input to the activation and ``mlp.hook_pre_linear`` the up
projection of a gated MLP.

Gemma 3 (``Gemma3ForCausalLM``, model_type ``gemma3_text``), as Hugging Face computes it: the
embedding times ``sqrt(d_model)`` (the scale rounded to the weights' dtype, as HF does; folded
into ``W_E``, so ``hook_embed`` is the scaled embedding, as in TL), RMSNorms with gain
``1 + w`` (float32, as HF), a norm before *and after* attention and the MLP
(``input_layernorm`` = ``ln1``, ``pre_feedforward_layernorm`` = ``ln2``, folded like every
pre-norm; ``post_attention_layernorm`` and ``post_feedforward_layernorm`` applied to each
branch's output before it joins the residual stream), q/k norm, GeGLU (tanh gelu), key-value
heads shared by query heads, scores scaled by ``query_pre_attn_scalar ** -0.5``, and rotary
with its own base (and scaling) on sliding-window and on global layers. Sliding-window layers
are exact at any length: a query at position i reads keys j with ``i - window < j <= i``, in
the full forward and in patching's windows alike (the cached keys before ``p0`` are masked the
same way). Soft-capping or bidirectional attention are refused. Hook names under the post-norms
follow TransformerLens (HookedTransformer, and the TransformerBridge's Gemma 3 adapter, whose
``hook_attn_out`` is ``ln1_post.hook_out``): ``hook_attn_out`` and ``hook_mlp_out`` are *after*
the post-norm, what is added to the residual stream, so ``resid_mid = resid_pre + attn_out``
still holds and the residual-stream sites, ``attn_out`` and ``mlp_out`` patch exactly;
``hook_z`` and ``mlp.hook_post`` are before it. A head's ``z @ W_O`` (or a neuron's row of
``W_out``) is therefore not what it adds to the residual stream (the post-norm divides the
sum of all heads, or the whole MLP output, by its RMS): on such a model the engine does not
expose ``W_O`` and ``W_out`` (reading them raises :class:`UnsupportedArchitecture` saying
why), so no view can treat them as linear writes without saying so. What the views use
instead: ``W_O_raw`` / ``W_out_raw`` (into the sum, before the norm), ``post_delta`` (what a
change to one head or neuron changes in the residual stream, the norm recomputed: patching,
ablation and path patching stay exact) and ``post_scale`` (the factor the norm applied in a
run, for attribution's shares, which add up to the layer's output).

It adds what patching needs and TransformerLens does not have:

* a *patch axis*: the residual stream is ``[n_prompts, n_patches, positions, d_model]``, so many
  patched variants of every prompt run in one batched forward;
* a *start stage*: a forward can begin at any layer, before its attention (stage ``2*l``) or
  before its MLP (stage ``2*l + 1``), from a cached residual stream; new patched variants can
  join the batch at later stages (a patch at layer 9 joins when the batch reaches layer 9);
* a *position window*: only positions ``p0..T-1`` are computed; attention reads the earlier
  positions' keys and values from a cache (they cannot change under causal attention);
* *read narrowing*: the last layer computes queries, the MLP and the logits only at the read
  position.

``Engine.run(tokens, sites, logits_at)`` is the plain entry point: logits plus the requested
activations, keyed and shaped as TransformerLens hooks.
"""

from __future__ import annotations

import math
import re
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

Edit = Callable[[torch.Tensor], torch.Tensor]

# Hook names the engine provides, as patterns (L = layer). Shapes as in TransformerLens.
SITE_PATTERNS = (
    "hook_embed", "hook_pos_embed",
    "blocks.L.hook_resid_pre", "blocks.L.hook_resid_mid", "blocks.L.hook_resid_post",
    "blocks.L.hook_attn_out", "blocks.L.hook_mlp_out",
    "blocks.L.ln1.hook_scale", "blocks.L.ln1.hook_normalized",
    "blocks.L.ln2.hook_scale", "blocks.L.ln2.hook_normalized",
    "blocks.L.attn.hook_q", "blocks.L.attn.hook_k", "blocks.L.attn.hook_v",
    "blocks.L.attn.hook_attn_scores", "blocks.L.attn.hook_pattern", "blocks.L.attn.hook_z",
    "blocks.L.mlp.hook_pre", "blocks.L.mlp.hook_post",
    "ln_final.hook_scale", "ln_final.hook_normalized",
)
_ONLY = {"hook_pos_embed": "learned positions", "blocks.L.hook_resid_mid": "a serial block "
         "(attention, then MLP)", "blocks.L.ln2.hook_scale": "a second norm per block",
         "blocks.L.ln2.hook_normalized": "a second norm per block",
         "blocks.L.mlp.hook_pre_linear": "a gated MLP"}
# Agreement with the Hugging Face model's logits the engine requires when it is built, relative
# to max(1, max |logit|): float32/64 are exact up to summation order; half precision rounds every
# activation to 8 (bfloat16) or 11 (float16) mantissa bits, and the two forwards round in
# different places (HF keeps norms and softmax in float32), so they drift apart by a few units of
# the dtype's epsilon per layer. Measured worst cases are in the README and tests/test_dtypes.py.
VERIFY_RTOL = {torch.float64: 1e-6, torch.float32: 1e-3, torch.bfloat16: 0.08,
               torch.float16: 0.02}


class UnsupportedArchitecture(NotImplementedError):
    """The engine cannot run this model exactly; the message names what it has and lacks."""


class EngineMismatch(ValueError):
    """The engine, the bridge or the Hugging Face model disagree beyond the dtype's tolerance."""
_LAYER_SITE = re.compile(r"^blocks\.(\d+)\.(.+)$")
_ACTS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
}


@dataclass
class Ctx:
    """What one forward records (``want``) and rewrites (``edits``), by TL hook name."""

    want: set[str] = field(default_factory=set)
    edits: Mapping[str, Edit] = field(default_factory=dict)
    cache: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.names = set(self.want) | set(self.edits)


def _tap(ctx: Ctx | None, name: str, act: torch.Tensor,
         to_tl: Callable | None = None, from_tl: Callable | None = None) -> torch.Tensor:
    """A hook point: apply ``ctx``'s edit and record the activation, in TL layout."""
    if ctx is None or name not in ctx.names:
        return act
    tl = act if to_tl is None else to_tl(act)
    edit = ctx.edits.get(name)
    if edit is not None:
        new = edit(tl)
        if new is not None:
            if new.shape != tl.shape:
                raise ValueError(f"edit for {name} returned shape {tuple(new.shape)}, "
                                 f"expected {tuple(tl.shape)}")
            tl = new
    if name in ctx.want:
        ctx.cache[name] = tl
    return tl if from_tl is None else from_tl(tl)


class Engine:
    """Pure-torch forward of a ``TransformerBridge``: GPT-2/OPT (compatibility mode), GPT-NeoX,
    GPT-J, Llama, Qwen2, Qwen3, Gemma 3."""

    # Switches only some families set (``_hf_weights`` returns them when they apply):
    post_norms: tuple[torch.Tensor, torch.Tensor] | None = None  # gains after attn / MLP [L, d]
    windows: list[int | None] | None = None  # each layer's sliding window (None: global)
    rope_kinds: list[str] | None = None  # each layer's rotary table (Gemma 3: local/global)
    qk_norm_offset: bool = False  # q/k norm gain is 1 + w, applied in float32 (Gemma)

    def __init__(self, model, verify: bool = True) -> None:
        cfg = model.cfg
        hf = _reference_model(model)
        try:
            self._model = weakref.ref(model)
        except TypeError:  # not weak-referenceable (a stand-in object): held outright
            self._model = lambda: model
        self.cfg = cfg
        self.tokenizer = getattr(model, "tokenizer", None)
        family = getattr(getattr(hf, "config", None), "model_type", None)
        if hf is None and _bridge_family(model) in _HF_FAMILIES:
            raise UnsupportedArchitecture(
                f"Engine reads {_bridge_family(model)} weights from the checkpoint directory, "
                "and this bridge does not say where it is: load the model with "
                "mechtests.core.models.load_model (or TransformerBridge.boot_transformers on a "
                "local "
                "directory).")
        with torch.no_grad():
            if family in _HF_FAMILIES:
                w = _hf_weights(hf, family)
                self._rotary_source = (_gptj_table(hf) if family == "gptj"
                                       else _find_rotary(hf))
            else:
                _check_architecture(cfg, hf)
                w = _bridge_weights(model)
        self.family = family or "gpt2"
        self.architecture = type(hf).__name__ if hf is not None else \
            getattr(cfg, "architecture", None) or self.family
        self.n_layers, self.d_vocab, self.n_ctx = cfg.n_layers, cfg.d_vocab, cfg.n_ctx
        for k, v in w.items():  # W_O and W_out are kept private: see the properties below
            setattr(self, f"_{k}" if k in ("W_O", "W_out") else k, v)
        L, H, dh = self.W_Q.shape[0], self.W_Q.shape[1], self.W_Q.shape[-1]
        self.n_heads, self.n_kv_heads, self.d_head = H, self.W_K.shape[1], dh
        self.d_model, self.d_mlp = self.W_Q.shape[2], self._W_out.shape[1]
        self.group = H // self.n_kv_heads  # query heads per key-value head
        self.gated = self.W_gate is not None
        with torch.no_grad():  # fused [d, (H + 2*Hkv)*dh] projection: one matmul for q, k, v
            self.W_QKV = torch.cat([w_.permute(0, 2, 1, 3).reshape(L, self.d_model, -1)
                                    for w_ in (self.W_Q, self.W_K, self.W_V)], -1).contiguous()
            self.b_QKV = torch.cat([b.reshape(L, -1) for b in (self.b_Q, self.b_K, self.b_V)],
                                   -1).contiguous()
            self.W_O_flat = self._W_O.reshape(L, H * dh, self.d_model).contiguous()
        self.device, self.dtype = self.W_E.device, self.W_E.dtype
        self._rope_tables: dict[str | None, tuple[torch.Tensor, torch.Tensor]] = {}
        self._names = [{k: f"blocks.{layer}.{k}" for k in (
            "hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out",
            "hook_mlp_out", "ln1", "ln2", "attn.hook_q", "attn.hook_k", "attn.hook_v",
            "attn.hook_attn_scores", "attn.hook_pattern", "attn.hook_z", "mlp.hook_pre",
            "mlp.hook_pre_linear", "mlp.hook_post")} for layer in range(L)]
        have = {"hook_pos_embed": self.W_pos is not None, "blocks.L.hook_resid_mid": not
                self.parallel, "blocks.L.ln2.hook_scale": not self.shared_ln,
                "blocks.L.ln2.hook_normalized": not self.shared_ln,
                "blocks.L.mlp.hook_pre_linear": self.gated}
        self.sites = tuple(s for s in (*SITE_PATTERNS, "blocks.L.mlp.hook_pre_linear")
                           if have.get(s, True))
        if verify:
            self._verify(hf)

    @property
    def model(self):
        """The model this engine was built from (None once it is gone)."""
        return self._model()

    @property
    def rms(self) -> bool:
        """RMSNorm (no centring) rather than LayerNorm."""
        return self.norm == "rms"

    @property
    def W_O(self) -> torch.Tensor:
        """``[L, H, d_head, d_model]``: each head's output matrix, a head's linear write into the
        residual stream (``z @ W_O``); refused where a norm after attention makes it none."""
        if self.post_norms is not None:
            raise UnsupportedArchitecture(
                f"{self.architecture}: a head's z @ W_O is not what it adds to the residual "
                "stream: post_attention_layernorm (an RMSNorm of the sum of all the layer's "
                "heads, with its own gain) comes between them, so the heads do not add up "
                "linearly. On this model the library's views go through the post-norm: "
                "patching and ablating a head recompute it (Engine.post_delta), head "
                "attribution scales each head by the norm's factor in that run "
                "(Engine.post_scale). W_O_raw is the matrix into the sum, before the norm.")
        return self._W_O

    @property
    def W_out(self) -> torch.Tensor:
        """``[L, d_mlp, d_model]``: each neuron's output row, its linear write into the residual
        stream; refused where a norm after the MLP makes it none."""
        if self.post_norms is not None:
            raise UnsupportedArchitecture(
                f"{self.architecture}: an MLP neuron's post * W_out[n] is not what it adds to "
                "the residual stream: post_feedforward_layernorm (an RMSNorm of the whole MLP "
                "output, with its own gain) comes between them, so the neurons do not add up "
                "linearly. On this model the library's views go through the post-norm: "
                "patching and ablating a neuron recompute it (Engine.post_delta), neuron "
                "attribution scales each neuron by the norm's factor in that run "
                "(Engine.post_scale). W_out_raw is the matrix into the MLP's output, before "
                "the norm.")
        return self._W_out

    @property
    def W_O_raw(self) -> torch.Tensor:
        """``[L, H, d_head, d_model]``: each head's matrix into its layer's attention output
        before any norm after attention (``W_O`` itself on models without one)."""
        return self._W_O

    @property
    def W_out_raw(self) -> torch.Tensor:
        """``[L, d_mlp, d_model]``: each neuron's row into the MLP's output before any norm
        after the MLP (``W_out`` itself on models without one)."""
        return self._W_out

    def branch_sum(self, layer: int, which: int, inner: torch.Tensor) -> torch.Tensor:
        """A branch's output before its post-norm: ``which`` 0 from the heads' ``z``
        ``[..., H, d_head]``, 1 from the MLP's ``post`` ``[..., d_mlp]``."""
        if which == 0:
            return _lin(inner.flatten(-2), self.W_O_flat[layer], self.b_O[layer])
        return _lin(inner, self._W_out[layer], self.b_out[layer])

    def post_delta(self, layer: int, which: int, before: torch.Tensor,
                   change: torch.Tensor) -> torch.Tensor:
        """What adding ``change`` to a branch's output before its post-norm (``before``)
        changes in the residual stream, exactly: ``post(before + change) - post(before)``
        where the model has a norm after attention (``which`` 0) or the MLP (1), else
        ``change``. ``before`` broadcasts against ``change``."""
        if self.post_norms is None:
            return change
        before = before.expand_as(change)
        return self._post(layer, which, before + change) - self._post(layer, which, before)

    def post_scale(self, layer: int, which: int, before: torch.Tensor) -> torch.Tensor | None:
        """The factor the post-norm multiplies its input ``before`` by, elementwise
        (``gain / rms(before)``, ``[..., d_model]``, float32), so each part of the sum has its
        share of the branch's output in this run and the parts add up to it exactly (the same
        frozen scale direct logit attribution takes for the final norm); None without one."""
        if self.post_norms is None:
            return None
        xf = before.float()
        return torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) \
            * self.post_norms[which][layer]

    # -- public ------------------------------------------------------------------------------
    def run(self, tokens: torch.Tensor, sites: Iterable[str] = (),
            logits_at: int | slice | None = None,
            edits: Mapping[str, Edit] | None = None,
            ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Logits and the requested activations (TL hook names as keys, TL shapes).

        ``logits_at``: None gives ``[b, T, d_vocab]``, an int ``[b, d_vocab]`` at that position,
        a slice ``[b, t, d_vocab]``. ``edits`` maps hook names to functions that return the
        replacement activation (TL shape), like TransformerLens forward hooks.
        """
        tokens = self.check_tokens(tokens)
        ctx = Ctx(set(self.check_sites(sites)), dict(edits or {}))
        self.check_sites(ctx.edits)
        x = self.embed(tokens, ctx)
        x = self.forward(x, 0, ctx=ctx)[:, 0]
        return self.unembed(x, ctx, sel=logits_at), ctx.cache

    def embed(self, tokens: torch.Tensor, ctx: Ctx | None = None) -> torch.Tensor:
        """``[b, T]`` tokens to the residual stream ``[b, 1, T, d]`` (one patch)."""
        T = tokens.shape[-1]
        x = _tap(ctx, "hook_embed", self.W_E[tokens])
        if self.W_pos is not None:
            x = x + _tap(ctx, "hook_pos_embed", self.W_pos[:T].expand(tokens.shape[0], T, -1))
        return x[:, None]

    def unembed(self, x: torch.Tensor, ctx: Ctx | None = None, sel=None) -> torch.Tensor:
        """Final norm and unembedding of a residual ``[..., d]`` (optionally at ``sel``)."""
        h = self.normalize(x, ctx, "ln_final", lambda a: a, lambda a: a)
        if sel is not None:
            h = h[:, sel]
        return _lin(h, self.W_U, self.b_U)

    def unembed_columns(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Final norm and the logits of token ``ids`` only (exact: each logit is one dot
        product): ``ids`` ``[k]`` for every prompt gives ``[..., k]``; ``[n_prompts, k]`` (per
        prompt, ``x`` ``[..., n_prompts, d]``) gives ``[..., n_prompts, k]``."""
        ids = torch.as_tensor(ids, device=self.device).long()
        if ids.numel() and (ids.min() < 0 or ids.max() >= self.d_vocab):
            raise ValueError(f"the metric reads token ids {ids.unique().tolist()[:8]}, beyond "
                             f"the vocabulary 0..{self.d_vocab - 1}")
        if ids.dim() == 2 and ids.shape[0] == 1:
            ids = ids[0]
        h = self.normalize(x)
        if ids.dim() == 1:
            return h @ self.W_U[:, ids] + self.b_U[ids]
        if ids.dim() != 2 or ids.shape[0] != x.shape[-2]:
            raise ValueError(f"the metric reads token ids of shape {tuple(ids.shape)}: expected "
                             f"[k] or [n_prompts={x.shape[-2]}, k]")
        return torch.einsum("...nd,dnk->...nk", h, self.W_U[:, ids]) + self.b_U[ids]

    def forward(self, x: torch.Tensor | None, stage: int, *, p0: int = 0,
                prefix: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
                entries: Mapping[int, torch.Tensor] | None = None,
                read: torch.Tensor | None = None, ctx: Ctx | None = None) -> torch.Tensor:
        """Run residual streams ``x`` ``[N, P, t, d]`` (positions ``p0..p0+t-1``) from ``stage``.

        Stage ``2*l`` is layer l's attention input (resid_pre), ``2*l+1`` its MLP input
        (resid_mid), ``2*n_layers`` the final residual. ``prefix[l]`` holds layer l's keys and
        values ``[N, p0, Hkv, dh]`` (as ``hook_k``/``hook_v``: before rotary) for the positions
        before the window. ``entries[s]`` ``[N, P_s, t, d]`` join the batch (along P) at stage
        s. ``read`` ``[N]`` (window positions) makes the last layer compute queries, MLP and
        output only there. Returns the final residual ``[N, P, t or 1, d]`` (before the final
        norm). In a parallel block (attention and MLP both read resid_pre) there is no odd
        stage: a change to the attention output enters at the next even stage.
        """
        entries = dict(entries or {})
        if x is not None:
            entries[stage] = _join(x, entries.get(stage), None)
        if p0 and self.rotary is not None:  # the window's prefix keys carry the rotary embedding
            pos = torch.arange(p0, device=self.device)
            prefix = [None if kv is None else (self.rotate(kv[0], pos), kv[1]) for kv in prefix]
        return self.forward_wave([Window(p0, prefix or [], read, entries, ctx)])[0]

    def forward_wave(self, groups: list[Window]) -> list[torch.Tensor]:
        """Several windows (each its own ``p0``, prefix, read positions and entries, as in
        :meth:`forward`) through the layers together: the projections and MLP run on every
        window's rows as one matmul (bigger matmuls run faster per FLOP); only attention runs
        per window. A window with a ``ctx`` records and edits its hook points (the one layer
        loop of every forward: :meth:`forward` is one window) and goes first at every stage, so
        another window's entries and prefix, when given as functions (read when the wave
        reaches them), can come from its cache: the unpatched runs and their patches then
        share one pass over the weights.
        Returns each window's final residual, ``[N, P, 1, d]`` at its read positions (``[N, P,
        t, d]`` without them)."""
        n = self.n_layers
        xs: list[torch.Tensor | None] = [None] * len(groups)
        for g in groups:
            if self.parallel and any(s % 2 for s in g.entries):
                raise ValueError("this model's blocks are parallel (attention and MLP both read "
                                 "resid_pre): start and join at even stages only")
        order = sorted(range(len(groups)), key=lambda i: groups[i].ctx is None)  # hooked first
        first = min(min(g.entries) for g in groups) // 2
        for layer in range(first, n):
            names = self._names[layer]
            reads = [g.read if layer == n - 1 else None for g in groups]
            live = self._enter(xs, groups, order, 2 * layer, None, names["hook_resid_pre"])
            if live:
                ctxs = [groups[i].ctx for i in live]
                hs = self._norms([xs[i] for i in live], ctxs, names["ln1"])
                qkv = _own(_rows(hs, lambda r, la=layer: _lin(r, self.W_QKV[la], self.b_QKV[la])),
                           ctxs)
                zs = [self._attend(layer, a, groups[i].p0, _prefix(groups[i], layer), ctx,
                                   reads[i], rotated=True) for i, a, ctx in zip(live, qkv, ctxs)]
                outs = _own(_rows([z.reshape(*z.shape[:3], -1) for z in zs],
                                  lambda r, la=layer: self._post(la, 0, _lin(
                                      r, self.W_O_flat[la], self.b_O[la]))), ctxs)
                ins = []
                for j, i in enumerate(live):
                    out = _tap(ctxs[j], names["hook_attn_out"], outs[j], *_fold(outs[j]))
                    rd = reads[i]
                    xs[i] = _gather(xs[i], rd) if rd is not None else xs[i]
                    if self.parallel:
                        ins.append(xs[i] if not self.shared_ln else
                                   _gather(hs[j], rd) if rd is not None else hs[j])
                    xs[i] = xs[i] + out
                if self.parallel:  # the MLP reads resid_pre (or GPT-J's shared norm)
                    mlp = self._mlps(layer, ins, ctxs, normed=self.shared_ln)
                    for j, i in enumerate(live):
                        x = xs[i] + mlp[j]
                        xs[i] = _tap(ctxs[j], names["hook_resid_post"], x, *_fold(x))
                    continue
            live = self._enter(xs, groups, order, 2 * layer + 1, reads, names["hook_resid_mid"])
            if live:
                ctxs = [groups[i].ctx for i in live]
                mlp = self._mlps(layer, [xs[i] for i in live], ctxs)
                for j, i in enumerate(live):
                    x = xs[i] + mlp[j]
                    xs[i] = _tap(ctxs[j], names["hook_resid_post"], x, *_fold(x))
        return [_join(x, _now(g.entries.get(2 * n)), g.read) for x, g in zip(xs, groups)]

    def _enter(self, xs, groups, order, stage, reads, hook) -> list[int]:
        """Join each window's entries at ``stage`` (hooked windows first, each tapped at
        ``hook`` before any other window's entries are read); the live windows, in ``order``."""
        for i in order:
            g = groups[i]
            xs[i] = _join(xs[i], _now(g.entries.get(stage)), reads[i] if reads else None)
            if xs[i] is not None:
                xs[i] = _tap(g.ctx, hook, xs[i], *_fold(xs[i]))
        return [i for i in order if xs[i] is not None]

    def _norms(self, xs: list[torch.Tensor], ctxs: list, name: str) -> list[torch.Tensor]:
        """The norm of every window's residual: the unhooked windows' rows in one call, a
        hooked window's through its hook points."""
        plain = [j for j, c in enumerate(ctxs) if c is None]
        out: list = [None] * len(xs)
        for j, y in zip(plain, _rows([xs[j] for j in plain], self.normalize) if plain else []):
            out[j] = y
        for j, c in enumerate(ctxs):
            if c is not None:
                out[j] = self.normalize(xs[j], c, name, *_fold(xs[j]))
        return out

    def _mlps(self, layer: int, xs: list[torch.Tensor], ctxs: list, normed: bool = False
              ) -> list[torch.Tensor]:
        """The MLP of every window's rows, each matrix as one matmul; a hooked window that
        reads or edits a hook point inside the MLP runs it on its own."""
        names = self._names[layer]
        inner = {names[k] for k in ("mlp.hook_pre", "mlp.hook_pre_linear", "mlp.hook_post")}
        out: list = [None] * len(xs)
        shared = []
        for j, c in enumerate(ctxs):
            if c is not None and inner & c.names:
                out[j] = self._mlp(layer, xs[j], c, normed)
            else:
                shared.append(j)
        if shared:
            hs = [xs[j] for j in shared] if normed else \
                self._norms([xs[j] for j in shared], [ctxs[j] for j in shared], names["ln2"])
            ys = _own(_rows(hs, lambda r: self._mlp(layer, r, None, normed=True)),
                      [ctxs[j] for j in shared])
            for j, y in zip(shared, ys):
                out[j] = _tap(ctxs[j], names["hook_mlp_out"], y, *_fold(y))
        return out

    # -- the transformer ---------------------------------------------------------------------
    def normalize(self, x, ctx=None, name=None, to_tl=None, from_tl=None):
        """The norm without its weight (folded into the next matrix): LayerNorm or RMSNorm."""
        if name is None or ctx is None or not (
                f"{name}.hook_scale" in ctx.names or f"{name}.hook_normalized" in ctx.names):
            d = (x.shape[-1],)  # fused kernels when no hook reads the scale
            return F.rms_norm(x, d, eps=self.eps) if self.rms else \
                F.layer_norm(x, d, eps=self.eps)
        x, scale = centre_and_scale(x, self.eps, self.rms)
        if name is None:
            return (x / scale).to(x.dtype)
        scale = _tap(ctx, f"{name}.hook_scale", scale.to(x.dtype), to_tl, from_tl)
        return _tap(ctx, f"{name}.hook_normalized", x / scale, to_tl, from_tl)

    def rotate(self, x: torch.Tensor, pos: torch.Tensor, layer: int | None = None
               ) -> torch.Tensor:
        """Rotary embedding of ``x`` ``[..., T, heads, dh]`` at positions ``pos`` ``[T]``, as
        ``layer`` applies it.

        Without a layer: the rotation every layer shares, the one the cached keys before a
        window (``Window.prefix``, ``forward``'s ``prefix``) are expected to carry. A model whose
        layers rotate differently (Gemma 3: one base on sliding-window layers, another on
        global ones) has none: ``x`` comes back as it is, and each layer's attention rotates
        the cached keys itself, with its own table.
        """
        if self.rotary is None:
            return x
        kind = None
        if self.rope_kinds is not None:
            if layer is None:
                return x
            kind = self.rope_kinds[layer]
        r = self.rotary_dim
        table = self._rope_tables.get(kind)
        if table is None or table[0].shape[0] <= int(pos.max()):
            table = self._rope_tables[kind] = self._rope(max(int(pos.max()) + 1, 64), kind)
        cos, sin = (t[pos][:, None] for t in table)  # [T, 1, r]
        xr = x[..., :r]
        if self.rotary == "half":
            rot = torch.cat([-xr[..., r // 2:], xr[..., :r // 2]], -1)
        else:  # GPT-J: rotate every two
            rot = torch.stack([-xr[..., 1::2], xr[..., ::2]], -1).flatten(-2)
        out = xr * cos + rot * sin
        return out if r == x.shape[-1] else torch.cat([out, x[..., r:]], -1)

    def _rope(self, T: int, kind: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin ``[T, rotary_dim]``, from the Hugging Face model's own rotary module
        (``kind``: the layer type whose table it is, on a model with one per layer type)."""
        pos = torch.arange(T, device=self.device)
        if self.rotary == "pairs":
            table = self._rotary_source.to(self.device)
            if table.shape[0] < T:
                raise ValueError(f"prompt of {T} tokens is beyond the model's rotary table "
                                 f"({table.shape[0]} positions)")
            sin, cos = table[:T].float().chunk(2, -1)
            return (cos.repeat_interleave(2, -1).to(self.dtype),
                    sin.repeat_interleave(2, -1).to(self.dtype))
        cos, sin = _rotary_call(self._rotary_source, torch.zeros(
            1, dtype=torch.float32, device=self.device), pos[None], kind)
        return cos[0].to(self.dtype), sin[0].to(self.dtype)

    def _attend(self, layer, qkv, p0, kv, ctx, read, rotated: bool = False):
        """From the fused projection ``qkv`` ``[N,P,t,(H+2Hk)*dh]`` to z ``[N,P,tq,H,dh]``;
        ``rotated``: the prefix keys ``kv[0]`` already carry the rotary embedding."""
        N, P, t, _ = qkv.shape
        H, Hk, dh = self.n_heads, self.n_kv_heads, self.d_head
        names = self._names[layer]
        q = qkv[..., :H * dh].view(N, P, t, H, dh)
        k, v = qkv[..., H * dh:].view(N, P, t, 2, Hk, dh).unbind(3)
        q, k = self.qk_norm(layer, "q", q), self.qk_norm(layer, "k", k)
        f5 = _fold(q)
        q = _tap(ctx, names["attn.hook_q"], q, *f5)
        k = _tap(ctx, names["attn.hook_k"], k, *f5)
        v = _tap(ctx, names["attn.hook_v"], v, *f5)
        if self.rotary is not None:
            window = torch.arange(p0, p0 + t, device=qkv.device)
            q, k = self.rotate(q, window, layer), self.rotate(k, window, layer)
        if read is not None:
            q = _gather(q, read)
        # cached keys carry ``rotate(k, pos)``: no rotation when the layers' tables differ
        rotated = rotated and self.rope_kinds is None
        if ctx is None or not ({names["attn.hook_attn_scores"], names["attn.hook_pattern"]}
                               & ctx.names):
            z = self._sdpa(layer, q, k, v, p0, kv, read, rotated)
        else:
            z = self._attend_explicit(layer, q, k, v, p0, kv, read, ctx, rotated)
        return _tap(ctx, names["attn.hook_z"], z, *_fold(z))

    def qk_norm(self, layer: int, which: str, x: torch.Tensor) -> torch.Tensor:
        """The per-head norm of queries (``which`` "q") or keys ("k") after the projection,
        where the model has one (Qwen3, Gemma 3); else ``x``."""
        if self.q_norm is None:
            return x
        norm = _rms_offset if self.qk_norm_offset else _rms
        return norm(x, (self.q_norm if which == "q" else self.k_norm)[layer], self.eps)

    def _window(self, layer: int, S: int) -> int | None:
        """The layer's sliding window where it cuts any of ``S`` keys off (else None)."""
        w = self.windows[layer] if self.windows is not None else None
        return w if w is not None and S > w else None

    def _sdpa(self, layer, q, k, v, p0, kv, read, rotated: bool = False):
        """Fused attention (``scaled_dot_product_attention``) of the window's queries ``q``
        ``[N,P,tq,H,dh]`` over the cached prefix and the window's keys and values; returns z
        ``[N,P,tq,H,dh]``."""
        N, P, tq, H, dh = q.shape
        t, Hk = k.shape[2], self.n_kv_heads
        qh = q.transpose(2, 3).reshape(N * P, H, tq, dh)
        kh, vh = k.transpose(2, 3), v.transpose(2, 3)  # [N,P,Hk,t,dh]
        if p0:
            kp, vp = kv
            kp = kp if rotated else self.rotate(kp, torch.arange(p0, device=q.device), layer)
            kh = torch.cat([kp.transpose(1, 2)[:, None].expand(N, P, Hk, p0, dh), kh], 3)
            vh = torch.cat([vp.transpose(1, 2)[:, None].expand(N, P, Hk, p0, dh), vh], 3)
        S = p0 + t
        kh, vh = kh.reshape(N * P, Hk, S, dh), vh.reshape(N * P, Hk, S, dh)
        keys = torch.arange(S, device=q.device)
        sliding = self._window(layer, S)
        causal = False
        if read is not None:  # the query at window index read[n] sees keys <= p0 + read[n]
            at = p0 + read[:, None]
            mask = keys <= at
            if sliding:
                mask = mask & (keys > at - sliding)
            mask = mask.view(N, 1, 1, 1, S).expand(N, P, 1, 1, S).reshape(N * P, 1, 1, S)
        elif p0 == 0 and not sliding:
            mask, causal = None, True
        else:
            at = torch.arange(p0, p0 + t, device=q.device)[:, None]
            mask = keys <= at  # [t, S]
            if sliding:  # and within the window: i - window < j
                mask = mask & (keys > at - sliding)
        z = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, is_causal=causal,
                                           scale=self.scale, enable_gqa=self.group > 1)
        return z.view(N, P, H, tq, dh).transpose(2, 3)

    def _attend_explicit(self, layer, q, k, v, p0, kv, read, ctx, rotated: bool = False):
        """Attention with the scores and pattern materialised (for their hooks)."""
        N, P, t = k.shape[:3]
        H, dh, G = self.n_heads, self.d_head, self.group
        names = self._names[layer]
        dev, tq = q.device, q.shape[2]
        qh = q.permute(0, 3, 1, 2, 4)  # [N,H,P,tq,dh]
        kh = k.permute(0, 3, 1, 4, 2)  # [N,Hk,P,dh,t]
        vh = v.permute(0, 3, 1, 2, 4)  # [N,Hk,P,t,dh]
        if G > 1:
            kh, vh = kh.repeat_interleave(G, 1), vh.repeat_interleave(G, 1)
        scores = (qh @ kh) * self.scale  # [N,H,P,tq,t]
        sliding = self._window(layer, p0 + t)
        keys = torch.arange(t, device=dev)
        if read is None:  # query at window index i sees keys j <= i (j > i - window)
            at = keys[:, None]
            mask = torch.ones(t, t, dtype=torch.bool, device=dev).triu(1)
        else:  # query at window index read[n] sees keys j <= read[n] (j > read[n] - window)
            at = read[:, None, None, None, None]
            mask = (keys > read[:, None])[:, None, None, None]
        if sliding:
            mask = mask | (keys <= at - sliding)
        scores = scores.masked_fill(mask, float("-inf"))
        if p0:
            kp, vp = kv
            kp = kp if rotated else self.rotate(kp, torch.arange(p0, device=dev), layer)
            if G > 1:
                kp, vp = kp.repeat_interleave(G, 2), vp.repeat_interleave(G, 2)
            sp = qh.reshape(N, H, P * tq, dh) @ kp.permute(0, 2, 3, 1)  # [N,H,P*tq,p0]
            sp = (sp * self.scale).view(N, H, P, tq, p0)
            if sliding:  # cached key j (absolute) is out of the window of query p0 + i
                sp = sp.masked_fill(torch.arange(p0, device=dev) <= p0 + at - sliding,
                                    float("-inf"))
            scores = torch.cat([sp, scores], -1)
        pat = (lambda a: a.permute(0, 2, 1, 3, 4).reshape(N * P, H, tq, -1),
               lambda a: a.view(N, P, H, tq, -1).permute(0, 2, 1, 3, 4))
        scores = _tap(ctx, names["attn.hook_attn_scores"], scores, *pat)
        probs = scores.float().softmax(-1).to(scores.dtype)
        pattern = _tap(ctx, names["attn.hook_pattern"], probs, *pat)
        z = pattern[..., p0:] @ vh  # [N,H,P,tq,dh]
        if p0:
            zp = pattern[..., :p0].reshape(N, H, P * tq, p0) @ vp.permute(0, 2, 1, 3)
            z = z + zp.view(N, H, P, tq, dh)
        return z.permute(0, 2, 3, 1, 4)  # [N,P,tq,H,dh]

    def _mlp(self, layer, x, ctx, normed: bool = False):
        names = self._names[layer]
        fold, unfold = _fold(x)
        h = x if normed else self.normalize(x, ctx, names["ln2"], fold, unfold)
        if self.gated:
            pre = _lin(h, self.W_gate[layer])
            lin = _lin(h, self.W_in[layer], self.b_in[layer])
            pre = _tap(ctx, names["mlp.hook_pre"], pre, *_fold(pre))
            lin = _tap(ctx, names["mlp.hook_pre_linear"], lin, *_fold(lin))
            post = _tap(ctx, names["mlp.hook_post"], self.act(pre) * lin, *_fold(pre))
        else:
            pre = _lin(h, self.W_in[layer], self.b_in[layer])
            pre = _tap(ctx, names["mlp.hook_pre"], pre, *_fold(pre))
            post = _tap(ctx, names["mlp.hook_post"], self.act(pre), *_fold(pre))
        out = self._post(layer, 1, _lin(post, self._W_out[layer], self.b_out[layer]))
        return _tap(ctx, names["hook_mlp_out"], out, *_fold(out))

    def _post(self, layer: int, which: int, x: torch.Tensor) -> torch.Tensor:
        """The norm after attention (``which`` 0) or the MLP (1), where the model has one
        (Gemma 3's post_attention_layernorm / post_feedforward_layernorm); else ``x``."""
        if self.post_norms is None:
            return x
        return _rms_offset(x, self.post_norms[which][layer], self.eps)

    # -- checks ------------------------------------------------------------------------------
    def check_tokens(self, tokens) -> torch.Tensor:
        tokens = torch.as_tensor(tokens, device=self.device)
        if tokens.dim() == 1:
            tokens = tokens[None]
        if tokens.dim() != 2 or tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"tokens must be an integer tensor [batch, pos], got "
                             f"{tokens.dtype} {tuple(tokens.shape)}")
        if tokens.shape[1] > self.n_ctx:
            raise ValueError(f"prompt has {tokens.shape[1]} tokens, the model's context is "
                             f"{self.n_ctx}")
        if tokens.numel() and (tokens.min() < 0 or tokens.max() >= self.d_vocab):
            raise ValueError(f"token ids must be in [0, {self.d_vocab})")
        return tokens.long()

    def check_sites(self, sites: Iterable[str]) -> list[str]:
        """Validate TL hook names; the error lists the valid ones."""
        out = []
        for s in sites:
            m = _LAYER_SITE.match(s)
            pattern = s if m is None else f"blocks.L.{m.group(2)}"
            ok = pattern in self.sites and (m is None or int(m.group(1)) < self.n_layers)
            if not ok:
                why = ""
                if pattern in _ONLY and pattern not in self.sites:
                    why = (f" ({self.family} has no {pattern.split('.')[-1]}: that site needs "
                           f"{_ONLY[pattern]})")
                raise ValueError(
                    f"unknown site {s!r}{why}; valid sites (L in 0..{self.n_layers - 1}): "
                    + ", ".join(self.sites))
            out.append(s)
        return out

    def _verify(self, hf) -> None:
        """Compare with the Hugging Face model and with the bridge once, at the dtype's
        tolerance (:data:`VERIFY_RTOL`): unprocessed weights, a bridge that computes something
        else than Hugging Face, or an architecture switch the engine missed, fail loudly."""
        T = min(8, self.n_ctx)
        tokens = (torch.arange(T, device=self.device) * 7 + 1)[None] % self.d_vocab
        # Logits are compared up to a constant per position (compatibility mode centres the
        # unembedding, which shifts every logit of a position alike: no softmax or logit
        # difference changes).
        c = lambda x: x.float() - x.float().mean(-1, keepdim=True)  # noqa: E731
        with torch.no_grad():
            ours = c(self.run(tokens)[0])
            bridge = c(self.model(tokens))
            ref = c(hf(tokens).logits) if hf is not None else None
        rtol = VERIFY_RTOL.get(self.dtype, 1e-3)
        if self.family == "gpt2":  # the engine runs the bridge's processed weights: same forward
            tol = rtol * max(1.0, bridge.abs().max().item())
            err = (ours - bridge).abs().max().item()
            if not err <= tol:
                raise EngineMismatch(
                    f"Engine's forward disagrees with the bridge (max |dlogit| = {err:.3g}, "
                    f"tolerance {tol:.3g} in {_dtype_name(self.dtype)}). GPT-2-style models "
                    "run on the bridge's folded weights: call model.enable_compatibility_mode() "
                    "before building an Engine (mechtests.core.models.load_model does, unless "
                    "compat=False).")
        if ref is None:
            return
        tol = rtol * max(1.0, ref.abs().max().item())
        bridge_err = (bridge - ref).abs().max().item()
        if not bridge_err <= tol and self.family == "gpt2":
            raise EngineMismatch(
                f"TransformerLens's bridge disagrees with the Hugging Face model on "
                f"{self.family} (max |dlogit| = {bridge_err:.3g}, tolerance {tol:.3g} in "
                f"{_dtype_name(self.dtype)}): the engine reads the bridge's weights, so it "
                "would inherit the error. mechtests refuses this model rather than report "
                "numbers that are not the model's.")
        err = (ours - ref).abs().max().item()
        if not err <= tol:
            raise EngineMismatch(
                f"Engine's forward disagrees with the Hugging Face model "
                f"({self.family}, max |dlogit| = {err:.3g}, tolerance {tol:.3g} in "
                f"{_dtype_name(self.dtype)}): an architecture switch the engine does not "
                "know about, or weights changed after loading. Refused rather than "
                "approximated.")
        self.verified = {"hf_max_err": err, "bridge_max_err": bridge_err, "tolerance": tol}


def centre_and_scale(x: torch.Tensor, eps: float, rms: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """The one norm, without its weight: ``x`` centred over the last axis (LayerNorm; RMSNorm
    does not centre) and its scale ``sqrt(mean(x^2) + eps)`` (float32 or wider, keepdim).
    ``normalize`` divides the two; TL's ``hook_scale`` is the scale."""
    if not rms:
        x = x - x.mean(-1, keepdim=True)
    return x, (x.float().pow(2).mean(-1, keepdim=True) + eps).sqrt()


def normalize(x: torch.Tensor, eps: float, rms: bool = False) -> torch.Tensor:
    """LayerNorm (or RMSNorm) of ``x`` over its last axis, without weight or bias."""
    x, scale = centre_and_scale(x, eps, rms)
    return (x / scale).to(x.dtype)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass
class Window:
    """One window of patched variants for :meth:`Engine.forward_wave`: positions ``p0..T-1``,
    ``prefix[l]`` (or ``prefix(l)``) layer l's cached keys (after rotary) and values before
    ``p0``, ``read`` ``[N]`` window positions the last layer reads (None: all), ``entries[s]``
    ``[N, P_s, T - p0, d]`` (or a function that makes it) joining at stage s; ``ctx``: the hook
    points this window records and edits (as :meth:`Engine.forward`)."""

    p0: int
    prefix: list | Callable[[int], tuple[torch.Tensor, torch.Tensor] | None]
    read: torch.Tensor | None
    entries: dict[int, torch.Tensor | Callable[[], torch.Tensor]]
    ctx: Ctx | None = None


def _rows(xs: list[torch.Tensor], fn: Callable[[torch.Tensor], torch.Tensor]
          ) -> list[torch.Tensor]:
    """``fn`` (row-wise over the last axis) on every tensor's rows as one call, split back."""
    flat = torch.cat([x.reshape(-1, x.shape[-1]) for x in xs]) if len(xs) > 1 \
        else xs[0].reshape(-1, xs[0].shape[-1])
    y = fn(flat)
    out, o = [], 0
    for x in xs:
        m = x.numel() // x.shape[-1]
        out.append(y[o:o + m].view(*x.shape[:-1], y.shape[-1]))
        o += m
    return out


def _lin(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W + b`` over the last axis as one matmul with the bias fused (``addmm``)."""
    x2 = x.reshape(-1, x.shape[-1])
    y = torch.mm(x2, W) if b is None else torch.addmm(b, x2, W)
    return y.view(*x.shape[:-1], W.shape[-1])


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last axis with weight ``w`` (Qwen3's per-head q/k norm)."""
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _rms_offset(x: torch.Tensor, g: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma's RMSNorm as Hugging Face's ``Gemma3RMSNorm`` computes it: in float32, times the
    float32 gain ``g = 1 + w``, back to ``x``'s dtype (its q/k norms and the norms after
    attention and the MLP)."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * g).type_as(x)


def _rotary_call(rotary, x: torch.Tensor, pos: torch.Tensor, kind: str | None):
    """cos, sin from a Hugging Face rotary module (Gemma 3's takes the layer type)."""
    return rotary(x, pos) if kind is None else rotary(x, pos, kind)


def _reference_model(model):
    """A fresh Hugging Face model from the bridge's checkpoint directory (safetensors only, no
    remote code, no download), independent of the bridge's own processing, in its dtype; or
    None when the bridge does not say where its checkpoint is."""
    from mechtests.core.models import reference_of, spec_of

    held = reference_of(model)  # a model built in memory (a mutant)
    if held is not None:
        return held
    spec = spec_of(model)
    path = getattr(spec, "path", None)
    if path is None:
        hf = getattr(model, "original_model", None)
        name = getattr(getattr(hf, "config", None), "_name_or_path", "") or ""
        path = Path(name) if name and Path(name).is_dir() else None
    if path is None:
        return None
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    dtype = getattr(model.cfg, "dtype", None) or next(model.parameters()).dtype
    device = next(model.parameters()).device
    ref = AutoModelForCausalLM.from_pretrained(
        str(path), dtype=dtype, use_safetensors=True, trust_remote_code=False,
        local_files_only=True, attn_implementation="eager").to(device)
    return ref.eval()


def _bridge_family(model) -> str | None:
    hf = getattr(model, "original_model", None)
    return getattr(getattr(hf, "config", None), "model_type", None)


def _gptj_table(hf) -> torch.Tensor:
    """GPT-J's sin|cos table: on each attention module before transformers 5.x's rotary
    module, on ``transformer.rotary_emb`` after."""
    table = getattr(hf.transformer.h[0].attn, "embed_positions", None)
    return table if table is not None else hf.transformer.rotary_emb.embed_positions


def _find_rotary(hf):
    for name, mod in hf.named_modules():
        if name.endswith("rotary_emb"):
            return mod
    raise UnsupportedArchitecture(f"{type(hf).__name__}: no rotary embedding module found")


def _fold(x: torch.Tensor):
    """Converters between the engine's ``[N, P, t, ...]`` and TL's ``[N*P, t, ...]``."""
    N, P = x.shape[:2]
    return (lambda a: a.reshape(N * P, *a.shape[2:]),
            lambda a: a.reshape(N, P, *a.shape[1:]))


def _own(parts: list[torch.Tensor], ctxs: list) -> list[torch.Tensor]:
    """``_rows``'s parts, a hooked window's copied out of the shared output: what its hooks
    cache (k and v are views of the projection) must not keep every window's rows alive."""
    if len(parts) == 1:
        return parts
    return [p.clone() if c is not None else p for p, c in zip(parts, ctxs)]


def _now(value):
    """A window's entry, or the value of the function that makes it when the wave reaches it."""
    return value() if callable(value) else value


def _prefix(window: Window, layer: int):
    """A window's cached keys and values before ``p0`` at ``layer`` (None when ``p0`` is 0)."""
    if not window.p0:
        return None
    return window.prefix(layer) if callable(window.prefix) else window.prefix[layer]


def _gather(x: torch.Tensor, read: torch.Tensor) -> torch.Tensor:
    """``x[n, :, read[n]]`` as ``[N, P, 1, ...]``."""
    idx = read.clamp(min=0).view(-1, 1, 1, *([1] * (x.dim() - 3)))
    return x.gather(2, idx.expand(x.shape[0], x.shape[1], 1, *x.shape[3:]))


def _join(x: torch.Tensor | None, new: torch.Tensor | None, read: torch.Tensor | None):
    """Append patched variants ``new`` ``[N, P_s, t, d]`` to the batch ``x`` along P."""
    if read is not None:
        x = x if x is None or x.shape[2] == 1 else _gather(x, read)
        new = new if new is None or new.shape[2] == 1 else _gather(new, read)
    if new is None:
        return x
    return new if x is None else torch.cat([x, new], 1)


def _check_architecture(cfg, hf=None) -> None:
    """GPT-2 style (GPT-2, pre-LayerNorm OPT) on the bridge's weights: learned positions,
    LayerNorm, gelu/relu MLP, full multi-head attention. Anything else is refused by name."""
    g = lambda k, d=None: getattr(cfg, k, d)  # noqa: E731
    hc = getattr(hf, "config", None)
    h = lambda k, d=None: getattr(hc, k, d)  # noqa: E731
    bad = []
    family = h("model_type")
    arch = g("architecture") or (type(hf).__name__ if hf is not None else None) \
        or g("model_name") or "this model"
    if family not in (None, "gpt2", "opt"):
        feats = [f"{k}={h(k)}" for k in ("attn_logit_softcapping", "final_logit_softcapping",
                                         "sliding_window", "query_pre_attn_scalar")
                 if h(k) and (k != "sliding_window" or h("use_sliding_window", True))]
        raise UnsupportedArchitecture(
            f"Engine has no exact implementation for {arch} (model_type {family!r}"
            + (f"; it has {', '.join(feats)}" if feats else "") + f"). The engine runs "
            f"{SUPPORTED}; mechtests refuses other models rather than return numbers it has "
            "not checked.")
    if g("positional_embedding_type", "standard") != "standard":
        bad.append(f"positional_embedding_type={g('positional_embedding_type')!r}")
    if g("normalization_type") not in ("LN", "LNPre") or g("uses_rms_norm") or g("final_rms"):
        bad.append(f"normalization_type={g('normalization_type')!r}")
    if g("act_fn") not in _ACTS:
        bad.append(f"act_fn={g('act_fn')!r}")
    if g("n_key_value_heads") not in (None, cfg.n_heads):
        bad.append("grouped-query attention")
    for flag in ("attn_only", "parallel_attn_mlp", "gated_mlp", "use_local_attn",
                 "scale_attn_by_inverse_layer_idx", "post_embedding_ln", "use_qk_norm",
                 "use_normalization_before_and_after", "num_experts"):
        if g(flag):
            bad.append(f"{flag}={g(flag)!r}")
    for cap in ("attn_scores_soft_cap", "output_logits_soft_cap"):
        if (g(cap, -1.0) or -1.0) > 0:
            bad.append(f"{cap}={g(cap)}")
    for cap in ("attn_logit_softcapping", "final_logit_softcapping"):
        if h(cap):
            bad.append(f"{cap}={h(cap)} (soft-capped logits)")
    if h("sliding_window") and h("use_sliding_window", True):
        bad.append(f"sliding_window={h('sliding_window')} (local attention)")
    if g("d_vocab_out", cfg.d_vocab) not in (-1, cfg.d_vocab):
        bad.append("d_vocab_out != d_vocab")
    if family == "gpt2":
        if h("scale_attn_weights") is False:
            bad.append("scale_attn_weights=False (unscaled attention scores; TransformerLens's "
                       "bridge scales them by 1/sqrt(d_head) anyway, so its weights give "
                       "another model)")
        if h("scale_attn_by_inverse_layer_idx"):
            bad.append("scale_attn_by_inverse_layer_idx=True")
    if family == "opt":
        if h("word_embed_proj_dim") not in (None, h("hidden_size")):
            bad.append(f"a projected embedding (word_embed_proj_dim={h('word_embed_proj_dim')} "
                       f"!= hidden_size={h('hidden_size')}, as opt-350m)")
        if h("do_layer_norm_before") is False:
            bad.append("post-LayerNorm blocks (do_layer_norm_before=False)")
    if bad:
        raise UnsupportedArchitecture(
            f"Engine has no exact implementation for {arch}: it has {', '.join(bad)}. The "
            f"engine runs {SUPPORTED}; mechtests refuses other models rather than return "
            "numbers it has not checked.")


SUPPORTED = ("GPT-2, pre-LayerNorm OPT, GPT-NeoX/Pythia, GPT-J, Llama, Qwen2 and Qwen3 "
             "(full attention, no soft-capping, no sliding window), and Gemma 3 "
             "(Gemma3ForCausalLM: its sliding-window layers included; no soft-capping)")
_HF_FAMILIES = ("gpt_neox", "gptj", "llama", "qwen2", "qwen3", "gemma3_text")


def _bridge_weights(model) -> dict:
    """GPT-2/OPT: the bridge's processed (compatibility-mode) weights."""
    cfg = model.cfg
    g = lambda name: getattr(model, name).detach().clone()  # noqa: E731
    scale = cfg.attn_scale if getattr(cfg, "attn_scale", -1) and cfg.attn_scale > 0 \
        else math.sqrt(cfg.d_head)
    return dict(
        W_Q=g("W_Q"), W_K=g("W_K"), W_V=g("W_V"), b_Q=g("b_Q"), b_K=g("b_K"), b_V=g("b_V"),
        W_O=g("W_O"), b_O=g("b_O"), W_in=g("W_in"), b_in=g("b_in"), W_out=g("W_out"),
        b_out=g("b_out"), W_E=g("W_E"), W_pos=g("W_pos"), W_U=g("W_U"), b_U=g("b_U"),
        W_gate=None, q_norm=None, k_norm=None, norm="ln", eps=cfg.eps, act=_ACTS[cfg.act_fn],
        scale=1.0 / scale if getattr(cfg, "use_attn_scale", True) else 1.0, rotary=None,
        rotary_dim=0, parallel=False, shared_ln=False)


def _hf_weights(hf, family: str) -> dict:
    """GPT-NeoX, GPT-J, Llama, Qwen2, Qwen3, Gemma 3 from the Hugging Face model's own
    parameters, each norm's weight (and LayerNorm bias) folded into the matrices that read it
    (Gemma's gain ``1 + w``; its norms after attention and the MLP, which no matrix reads, are
    kept as gains)."""
    c = hf.config
    gemma = family == "gemma3_text"
    bad = []
    act = getattr(c, "hidden_act", None) or getattr(c, "activation_function", None) \
        or getattr(c, "hidden_activation", None)
    if act not in _ACTS:
        bad.append(f"activation {act!r}")
    rope = getattr(c, "rope_parameters", None) or getattr(c, "rope_scaling", None) or {}
    kinds = sorted(set(c.layer_types)) if gemma else []
    for r in [rope.get(k) or {} for k in kinds] if gemma else [rope]:
        if r.get("rope_type", "default") not in ("default", "linear", "llama3", "yarn"):
            bad.append(f"rope_type={r.get('rope_type')!r} (length-dependent rotary)")
    if gemma:
        other = sorted(set(kinds) - {"sliding_attention", "full_attention"})
        if other:
            bad.append(f"layer_types {other}")
        if getattr(c, "use_bidirectional_attention", False):
            bad.append("use_bidirectional_attention=True (no causal mask)")
    elif getattr(c, "use_sliding_window", False) and getattr(c, "sliding_window", None):
        bad.append(f"sliding_window={c.sliding_window} (local attention)")
    if getattr(c, "mlp_bias", False):
        bad.append("mlp_bias=True (a gate bias)")
    for cap in ("attn_logit_softcapping", "final_logit_softcapping"):
        if getattr(c, cap, None):
            bad.append(f"{cap}={getattr(c, cap)}")
    if bad:
        raise UnsupportedArchitecture(
            f"Engine has no exact implementation for {type(hf).__name__}: it has "
            f"{', '.join(bad)}. Supported: {SUPPORTED}.")
    P = lambda m: m.weight.detach().T  # noqa: E731  (x @ W orientation)
    B = lambda m, n: m.bias.detach() if getattr(m, "bias", None) is not None \
        else torch.zeros(n, dtype=m.weight.dtype, device=m.weight.device)  # noqa: E731
    out = {k: [] for k in ("W_Q", "W_K", "W_V", "b_Q", "b_K", "b_V", "W_O", "b_O", "W_in",
                           "b_in", "W_gate", "W_out", "b_out", "q_norm", "k_norm")}

    def gain(norm):
        """A norm's multiplier: its weight, or Gemma's ``1 + w`` (computed in float32, as HF)."""
        w = norm.weight.detach()
        return (1.0 + w.float()).to(w.dtype) if gemma else w

    def fold(norm, W, b):
        """A norm with weight w (and bias beta) feeding x @ W + b."""
        w = gain(norm)
        beta = getattr(norm, "bias", None)
        b = b if beta is None else b + beta.detach() @ W
        return w[:, None] * W, b

    if family == "gpt_neox":
        base, layers = hf.gpt_neox, hf.gpt_neox.layers
        W_E, final, head = base.embed_in.weight, base.final_layer_norm, \
            hf.get_output_embeddings()
        H = c.num_attention_heads
    elif family == "gptj":
        base, layers = hf.transformer, hf.transformer.h
        W_E, final, head = base.wte.weight, base.ln_f, hf.get_output_embeddings()
        H = c.n_head
    else:
        base, layers = hf.model, hf.model.layers
        W_E, final, head = base.embed_tokens.weight, base.norm, hf.get_output_embeddings()
        H = c.num_attention_heads
    d = W_E.shape[1]
    post_attn: list[torch.Tensor] = []
    post_mlp: list[torch.Tensor] = []
    for layer in layers:
        if family == "gpt_neox":
            a, m = layer.attention, layer.mlp
            ln1, ln2 = layer.input_layernorm, layer.post_attention_layernorm
            dh = d // H
            w = a.query_key_value.weight.detach().view(H, 3, dh, d)
            bq = B(a.query_key_value, 3 * H * dh).view(H, 3, dh)
            Wq, Wk, Wv = (w[:, i].permute(2, 0, 1).reshape(d, H * dh) for i in range(3))
            bqkv = [bq[:, i].reshape(-1) for i in range(3)]
            o, up, gate, down = a.dense, m.dense_h_to_4h, None, m.dense_4h_to_h
        elif family == "gptj":
            a, m, ln1, ln2 = layer.attn, layer.mlp, layer.ln_1, layer.ln_1
            dh = d // H
            Wq, Wk, Wv = P(a.q_proj), P(a.k_proj), P(a.v_proj)
            bqkv = [B(p, p.weight.shape[0]) for p in (a.q_proj, a.k_proj, a.v_proj)]
            o, up, gate, down = a.out_proj, m.fc_in, None, m.fc_out
        else:
            a, m = layer.self_attn, layer.mlp
            ln1, ln2 = layer.input_layernorm, layer.post_attention_layernorm
            if gemma:  # post_attention_layernorm normalizes attention's output (below)
                ln2 = layer.pre_feedforward_layernorm
                post_attn.append(1.0 + layer.post_attention_layernorm.weight.detach().float())
                post_mlp.append(1.0 + layer.post_feedforward_layernorm.weight.detach().float())
            dh = a.head_dim
            Wq, Wk, Wv = P(a.q_proj), P(a.k_proj), P(a.v_proj)
            bqkv = [B(p, p.weight.shape[0]) for p in (a.q_proj, a.k_proj, a.v_proj)]
            o, up, gate, down = a.o_proj, m.up_proj, m.gate_proj, m.down_proj
            if getattr(a, "q_norm", None) is not None:
                qk = (lambda n: 1.0 + n.weight.detach().float()) if gemma \
                    else (lambda n: n.weight.detach())
                out["q_norm"].append(qk(a.q_norm))
                out["k_norm"].append(qk(a.k_norm))
        Hk = Wk.shape[1] // dh
        for name, W, b, n in (("Q", Wq, bqkv[0], H), ("K", Wk, bqkv[1], Hk),
                              ("V", Wv, bqkv[2], Hk)):
            W, b = fold(ln1, W, b)
            out[f"W_{name}"].append(W.reshape(d, n, dh).permute(1, 0, 2))
            out[f"b_{name}"].append(b.reshape(n, dh))
        out["W_O"].append(P(o).reshape(H, dh, d))
        out["b_O"].append(B(o, d))
        W, b = fold(ln2, P(up), B(up, up.weight.shape[0]))
        out["W_in"].append(W)
        out["b_in"].append(b)
        if gate is not None:
            out["W_gate"].append(fold(ln2, P(gate), 0.0)[0])
        out["W_out"].append(P(down))
        out["b_out"].append(B(down, d))
    w = {k: (torch.stack(v).clone() if v else None) for k, v in out.items()}
    W_U, b_U = fold(final, P(head), B(head, head.weight.shape[0]))
    W_E = W_E.detach()
    if gemma:  # Gemma3TextScaledWordEmbedding: the scale in the weights' dtype, as HF rounds it
        emb = base.embed_tokens
        W_E = W_E * emb.embed_scale.to(W_E.dtype)
        w.update(post_norms=(torch.stack(post_attn), torch.stack(post_mlp)),
                 windows=[c.sliding_window if t == "sliding_attention" else None
                          for t in c.layer_types],
                 rope_kinds=list(c.layer_types), qk_norm_offset=True)
    w.update(W_E=W_E.clone(), W_pos=None, W_U=W_U.clone(), b_U=b_U.clone())
    eps = getattr(final, "eps", None) or getattr(final, "variance_epsilon", None)
    rotary_dim = dh
    if family == "gptj":
        rotary, rotary_dim = "pairs", c.rotary_dim or dh
    else:
        rotary = "half"
        cos, _ = _rotary_call(_find_rotary(hf), torch.zeros(1), torch.arange(2)[None],
                              c.layer_types[0] if gemma else None)
        rotary_dim = cos.shape[-1]
    scale = getattr(layers[0].attention if family == "gpt_neox" else
                    layers[0].attn if family == "gptj" else layers[0].self_attn,
                    "scaling", None) or dh ** -0.5
    w.update(norm="ln" if family in ("gpt_neox", "gptj") else "rms", eps=eps, act=_ACTS[act],
             scale=float(scale), rotary=rotary, rotary_dim=rotary_dim,
             parallel=family == "gptj" or bool(getattr(c, "use_parallel_residual", False)),
             shared_ln=family == "gptj")
    return w


def run(model, tokens: torch.Tensor, sites: Iterable[str] = (),
        logits_at: int | slice | None = None, edits: Mapping[str, Edit] | None = None,
        ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``Engine.run`` on a model or an ``Engine``: logits and the requested activations."""
    with torch.no_grad():
        return engine_for(model).run(tokens, sites, logits_at, edits)


def engine_for(model) -> Engine:
    """The model's ``Engine``, built once per model (rebuilt if a weight changes).

    Accepts an ``Engine`` too, so every public function can take either.
    """
    if isinstance(model, Engine):
        return model
    stamp = tuple((p.data_ptr(), p._version) for p in model.parameters())
    try:
        held = _ENGINES.get(model)
    except TypeError:  # not weak-referenceable: nowhere to keep it, built each time
        return Engine(model)
    if held is None or held[0] != stamp:
        held = (stamp, Engine(model))
        _ENGINES[model] = held
    return held[1]


# Each model's engine, beside the model (an Engine holds its model weakly, so an entry goes with
# its model).
_ENGINES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
