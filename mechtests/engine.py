"""A fast, exact forward pass for GPT-2-architecture models, built for activation patching.

``Engine(model)`` takes the processed (compatibility-mode) weights of a ``TransformerBridge``
once and runs its own pure-torch, nanoGPT-style forward. It reproduces the bridge's logits and
hooks (to ~1e-6), and adds what patching needs and TransformerLens does not have:

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
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

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
_LAYER_SITE = re.compile(r"^blocks\.(\d+)\.(.+)$")
_ACTS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
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
    """Pure-torch forward of a GPT-2-style ``TransformerBridge`` in compatibility mode."""

    def __init__(self, model, verify: bool = True) -> None:
        cfg = model.cfg
        _check_architecture(cfg)
        self.model, self.cfg = model, cfg
        L, H = cfg.n_layers, cfg.n_heads
        self.n_layers, self.n_heads, self.d_head = L, H, cfg.d_head
        self.d_model, self.d_mlp, self.d_vocab = cfg.d_model, cfg.d_mlp, cfg.d_vocab
        self.eps = cfg.eps
        self.act = _ACTS[cfg.act_fn]
        scale = cfg.attn_scale if getattr(cfg, "attn_scale", -1) and cfg.attn_scale > 0 \
            else math.sqrt(cfg.d_head)
        self.scale = 1.0 / scale if getattr(cfg, "use_attn_scale", True) else 1.0
        self.normalize = cfg.normalization_type is not None

        with torch.no_grad():
            g = lambda name: getattr(model, name).detach().clone()  # noqa: E731
            d, dh = cfg.d_model, cfg.d_head
            self.W_Q, self.W_K, self.W_V = g("W_Q"), g("W_K"), g("W_V")  # [L,H,d,dh]
            self.b_Q, self.b_K, self.b_V = g("b_Q"), g("b_K"), g("b_V")  # [L,H,dh]
            self.W_O, self.b_O = g("W_O"), g("b_O")  # [L,H,dh,d], [L,d]
            self.W_in, self.b_in, self.W_out, self.b_out = g("W_in"), g("b_in"), g("W_out"), \
                g("b_out")
            self.W_E, self.W_pos, self.W_U, self.b_U = g("W_E"), g("W_pos"), g("W_U"), g("b_U")
            # Fused [d, 3*H*dh] projection: one matmul for q, k and v.
            self.W_QKV = torch.cat([w.permute(0, 2, 1, 3).reshape(L, d, H * dh)
                                    for w in (self.W_Q, self.W_K, self.W_V)], -1).contiguous()
            self.b_QKV = torch.cat([b.reshape(L, H * dh)
                                    for b in (self.b_Q, self.b_K, self.b_V)], -1).contiguous()
            self.W_O_flat = self.W_O.reshape(L, H * dh, d).contiguous()
        self.device, self.dtype = self.W_E.device, self.W_E.dtype
        self._names = [{k: f"blocks.{layer}.{k}" for k in (
            "hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out",
            "hook_mlp_out", "ln1", "ln2", "attn.hook_q", "attn.hook_k", "attn.hook_v",
            "attn.hook_attn_scores", "attn.hook_pattern", "attn.hook_z", "mlp.hook_pre",
            "mlp.hook_post")} for layer in range(L)]
        if verify:
            self._verify()

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
        e = _tap(ctx, "hook_embed", self.W_E[tokens])
        p = _tap(ctx, "hook_pos_embed", self.W_pos[:T].expand(tokens.shape[0], T, -1))
        return (e + p)[:, None]

    def unembed(self, x: torch.Tensor, ctx: Ctx | None = None, sel=None) -> torch.Tensor:
        """Final LayerNorm and unembedding of a residual ``[..., d]`` (optionally at ``sel``)."""
        h = self._ln(x, ctx, "ln_final", lambda a: a, lambda a: a)
        if sel is not None:
            h = h[:, sel]
        return h @ self.W_U + self.b_U

    def forward(self, x: torch.Tensor | None, stage: int, *, p0: int = 0,
                prefix: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
                entries: Mapping[int, torch.Tensor] | None = None,
                read: torch.Tensor | None = None, ctx: Ctx | None = None) -> torch.Tensor:
        """Run residual streams ``x`` ``[N, P, t, d]`` (positions ``p0..p0+t-1``) from ``stage``.

        Stage ``2*l`` is layer l's attention input (resid_pre), ``2*l+1`` its MLP input
        (resid_mid), ``2*n_layers`` the final residual. ``prefix[l]`` holds layer l's keys and
        values ``[N, p0, H, dh]`` for the positions before the window. ``entries[s]``
        ``[N, P_s, t, d]`` join the batch (along P) at stage s. ``read`` ``[N]`` (window
        positions) makes the last layer compute queries, MLP and output only there.
        Returns the final residual ``[N, P, t or 1, d]`` (before ``ln_final``).
        """
        entries = entries or {}
        n = self.n_layers
        for layer in range(stage // 2, n):
            names = self._names[layer]
            last = read is not None and layer == n - 1
            if 2 * layer >= stage:
                x = _join(x, entries.get(2 * layer), None)
                x = _tap(ctx, names["hook_resid_pre"], x, *_fold(x))
                kv = prefix[layer] if p0 else None
                a = self._attn(layer, x, p0, kv, ctx, read if last else None)
                x = (_gather(x, read) if last else x) + a
            x = _join(x, entries.get(2 * layer + 1), read if last else None)
            x = _tap(ctx, names["hook_resid_mid"], x, *_fold(x))
            x = x + self._mlp(layer, x, ctx)
            x = _tap(ctx, names["hook_resid_post"], x, *_fold(x))
        return _join(x, entries.get(2 * n), read)

    # -- the transformer ---------------------------------------------------------------------
    def _ln(self, x, ctx, name, to_tl, from_tl):
        x = x - x.mean(-1, keepdim=True)
        scale = _tap(ctx, f"{name}.hook_scale", (x.pow(2).mean(-1, keepdim=True) + self.eps)
                     .sqrt(), to_tl, from_tl)
        return _tap(ctx, f"{name}.hook_normalized", x / scale, to_tl, from_tl)

    def _attn(self, layer, x, p0, kv, ctx, read):
        """Attention sublayer on the window; ``kv`` = cached keys/values before it."""
        N, P, t, _ = x.shape
        H, dh = self.n_heads, self.d_head
        names = self._names[layer]
        fold, unfold = _fold(x)
        h = self._ln(x, ctx, names["ln1"], fold, unfold)
        q, k, v = (h @ self.W_QKV[layer] + self.b_QKV[layer]).view(N, P, t, 3, H, dh).unbind(3)
        f5 = _fold(q)
        q = _tap(ctx, names["attn.hook_q"], q, *f5)
        k = _tap(ctx, names["attn.hook_k"], k, *f5)
        v = _tap(ctx, names["attn.hook_v"], v, *f5)
        if read is not None:
            q = _gather(q, read)
        tq = q.shape[2]
        qh = q.permute(0, 3, 1, 2, 4)  # [N,H,P,tq,dh]
        scores = (qh @ k.permute(0, 3, 1, 4, 2)) * self.scale  # [N,H,P,tq,t]
        if read is None:
            mask = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
        else:  # query at window index read[n] sees keys j <= read[n]
            mask = (torch.arange(t, device=x.device) > read[:, None])[:, None, None, None]
        scores = scores.masked_fill(mask, float("-inf"))
        if p0:
            kp, vp = kv
            sp = qh.reshape(N, H, P * tq, dh) @ kp.permute(0, 2, 3, 1)  # [N,H,P*tq,p0]
            scores = torch.cat([(sp * self.scale).view(N, H, P, tq, p0), scores], -1)
        pat = (lambda a: a.permute(0, 2, 1, 3, 4).reshape(N * P, H, tq, -1),
               lambda a: a.view(N, P, H, tq, -1).permute(0, 2, 1, 3, 4))
        scores = _tap(ctx, names["attn.hook_attn_scores"], scores, *pat)
        pattern = _tap(ctx, names["attn.hook_pattern"], scores.softmax(-1), *pat)
        z = pattern[..., p0:] @ v.permute(0, 3, 1, 2, 4)  # [N,H,P,tq,dh]
        if p0:
            zp = pattern[..., :p0].reshape(N, H, P * tq, p0) @ vp.permute(0, 2, 1, 3)
            z = z + zp.view(N, H, P, tq, dh)
        z = z.permute(0, 2, 3, 1, 4)  # [N,P,tq,H,dh]
        z = _tap(ctx, names["attn.hook_z"], z, *_fold(z))
        out = z.reshape(N, P, tq, H * dh) @ self.W_O_flat[layer] + self.b_O[layer]
        return _tap(ctx, names["hook_attn_out"], out, *_fold(out))

    def _mlp(self, layer, x, ctx):
        names = self._names[layer]
        fold, unfold = _fold(x)
        h = self._ln(x, ctx, names["ln2"], fold, unfold)
        pre = h @ self.W_in[layer] + self.b_in[layer]
        pre = _tap(ctx, names["mlp.hook_pre"], pre, *_fold(pre))
        post = _tap(ctx, names["mlp.hook_post"], self.act(pre), *_fold(pre))
        out = post @ self.W_out[layer] + self.b_out[layer]
        return _tap(ctx, names["hook_mlp_out"], out, *_fold(out))

    # -- checks ------------------------------------------------------------------------------
    def check_tokens(self, tokens) -> torch.Tensor:
        tokens = torch.as_tensor(tokens, device=self.device)
        if tokens.dim() == 1:
            tokens = tokens[None]
        if tokens.dim() != 2 or tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"tokens must be an integer tensor [batch, pos], got "
                             f"{tokens.dtype} {tuple(tokens.shape)}")
        if tokens.shape[1] > self.cfg.n_ctx:
            raise ValueError(f"prompt has {tokens.shape[1]} tokens, the model's context is "
                             f"{self.cfg.n_ctx}")
        if tokens.numel() and (tokens.min() < 0 or tokens.max() >= self.d_vocab):
            raise ValueError(f"token ids must be in [0, {self.d_vocab})")
        return tokens.long()

    def check_sites(self, sites: Iterable[str]) -> list[str]:
        """Validate TL hook names; the error lists the valid ones."""
        out = []
        for s in sites:
            m = _LAYER_SITE.match(s)
            ok = s in SITE_PATTERNS if m is None else (
                f"blocks.L.{m.group(2)}" in SITE_PATTERNS and int(m.group(1)) < self.n_layers)
            if not ok:
                raise ValueError(
                    f"unknown site {s!r}; valid sites (L in 0..{self.n_layers - 1}): "
                    + ", ".join(SITE_PATTERNS))
            out.append(s)
        return out

    def _verify(self) -> None:
        """Compare with the bridge's own forward once, so unprocessed weights fail loudly."""
        T = min(8, self.cfg.n_ctx)
        tokens = (torch.arange(T, device=self.device) * 7 + 1)[None] % self.d_vocab
        with torch.no_grad():
            ref = self.model(tokens)
            ours, _ = self.run(tokens)
        err = (ref.to(ours.dtype) - ours).abs().max().item()
        tol = 1e-3 * max(1.0, ref.abs().max().item())
        if not err <= tol:
            raise ValueError(
                f"Engine's forward disagrees with the model (max |dlogit| = {err:.3g}). Load the "
                "model with mechtests.models.load_model or call model.enable_compatibility_mode() "
                "before building an Engine: it needs the folded LayerNorm weights.")


def _fold(x: torch.Tensor):
    """Converters between the engine's ``[N, P, t, ...]`` and TL's ``[N*P, t, ...]``."""
    N, P = x.shape[:2]
    return (lambda a: a.reshape(N * P, *a.shape[2:]),
            lambda a: a.reshape(N, P, *a.shape[1:]))


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


def _check_architecture(cfg) -> None:
    """GPT-2 style only: learned positions, LayerNorm, gelu MLP, full multi-head attention."""
    g = lambda k, d=None: getattr(cfg, k, d)  # noqa: E731
    bad = []
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
    if g("d_vocab_out", cfg.d_vocab) not in (-1, cfg.d_vocab):
        bad.append("d_vocab_out != d_vocab")
    if bad:
        arch = g("architecture") or g("model_name") or "this model"
        raise NotImplementedError(
            f"Engine supports GPT-2-style models (learned positions, LayerNorm, gelu MLP, "
            f"multi-head attention); {arch} has {', '.join(bad)}. Use TransformerLens's own "
            "patching for it.")


def engine_for(model) -> Engine:
    """The model's ``Engine``, built once and cached on the model (rebuilt if a weight changes).

    Accepts an ``Engine`` too, so every public function can take either.
    """
    if isinstance(model, Engine):
        return model
    stamp = tuple((p.data_ptr(), p._version) for p in model.parameters())
    held = getattr(model, "_mechtests_engine", None)
    if held is None or held[0] != stamp:
        held = (stamp, Engine(model))
        object.__setattr__(model, "_mechtests_engine", held)
    return held[1]
