"""Mutation testing of claims: would the claim have failed had its mechanism been broken?

What mutmut does for code, for findings. With ``pytest claims/ --mutate``, every claim test that
holds on its subject is run again, in the same process, on mutants of that subject built in
memory from the components the claim names (``record.components([...])``):

* ``relabel``: heads rotated within every layer (head h moves to h+1), a function-preserving
  renumbering. With grouped-query attention (Llama) a query head can only move among the heads
  that share its key-value head, so heads rotate within each key-value group (in a group of 3:
  0 -> 1 -> 2 -> 0; ``relabelled`` says where a head went). A claim that names no head by
  index must measure identical values; a claim that names heads by index now points at other
  heads and must fail; a claim that casts its heads by role (``mechtests.suite.roles``) must
  hold *moved*, each head followed to its new index, with identical values (a mutant is never
  the reference itself, so its roles are cast, not asserted); a role made of every head of its
  layers (or of its key-value groups) maps onto itself and must hold on the same heads.
* ``QK <c>``: component c's attention broken (its queries zeroed: uniform causal attention).
* ``OV <c>``: component c's output broken (its output weights zeroed). For an MLP layer or the
  embedding, ``OV`` is the only break (output zeroed; embedding rows shuffled). GPT-2 shuffles
  its tied embedding/unembedding matrix as one; a Llama whose unembedding is tied to its
  embedding (SmolLM2) is untied first, so only the input embedding is shuffled and the
  unembedding stays the original (the mutant's config says untied, its weights agree).
* ``unnamed``: every head and MLP the claim does not name perturbed with 10% relative Gaussian
  noise on its weights: the claim must hold (specificity). With grouped-query attention keys
  and values are shared by a group: they are perturbed only where no head of the group is
  named.
* ``noise``: 1% relative Gaussian noise on every weight: the claim must hold (robustness).

Each mutant's outcome is compared with what a discriminating claim does there; the kill matrix
and a one-word verdict per claim go to the terminal summary and the report:
``discriminating``, ``cannot fail when <mutant> breaks``, ``fragile under <mutant>``,
``index-dependent under relabel`` (values moved under a function-preserving relabel),
``does not follow its heads when renumbered`` (a role claim that did not hold moved there).
A role claim meets a broken head's mutant as a discriminating claim must when it fails, or when
it holds *moved* away from every component the mutant broke (it found the mechanism elsewhere
and says so). On a subject with no reference of its shape (roles cast anew: no expected heads),
the heads the unmutated run found stand in for the expected ones: a mutant on which the role
falls on other heads has *moved* (``moved_anew``).

Components: ``"L.H"`` (head H of layer L), ``"attn_L"`` (every head of layer L), ``"mlp_L"``,
``"embed"``. Mutants are built for GPT-2, Llama and Gemma 3 checkpoints (``config.json``
``model_type`` ``gpt2`` / ``llama`` / ``gemma3_text``): what each edit touches is in that
architecture's :class:`Layout`. A behaviour claim (``kind="behaviour"`` in its ``claim``
marker) names no component: only ``relabel`` (values must not move) and ``noise`` apply to it.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import torch

from mechtests.core.models import remember, spec_of
from mechtests.suite.report import merge_mutations as merge  # noqa: F401 - with the report
from mechtests.suite.report import verdict  # noqa: F401 - mutation verdicts live with the report

UNNAMED_NOISE = 0.10  # relative std of the noise on components the claim does not name
ALL_NOISE = 0.01  # relative std of the noise on every weight
SAME_ATOL, SAME_RTOL = 1e-4, 1e-3  # "identical values" under a function-preserving relabel
SEED = 0
# Built mutants are kept for later tests naming the same components up to this many bytes of
# parameters, the oldest dropped beyond it: the organisms' all fit, while a SmolLM2 mutant holds
# 0.6 GiB of parameters (1.8 GiB resident with its reference) and a claim has a dozen mutants.
CACHE_BYTES = 2 << 30

_HEAD = re.compile(r"^(\d+)\.(\d+)$")
_LAYER = re.compile(r"^(attn|mlp)_(\d+)$")


class MutationError(ValueError):
    """Mutants cannot be built for this claim or this model; the message says why and the fix."""


@dataclass(frozen=True)
class Mutant:
    """One mutant: its name, what a discriminating claim does on it, and how to build it."""

    name: str
    expected: str  # "fail" | "hold" | "same" | "moved"
    edit: Edit  # mutates a Hugging Face state dict, given its Layout
    broken: tuple[str, ...] = ()  # the components a "fail" mutant breaks


# -- components ------------------------------------------------------------------------------------
def parse(component: str, n_layers: int, n_heads: int) -> tuple[str, int, int | None]:
    """``("head", L, H)``, ``("attn"|"mlp", L, None)`` or ``("embed", -1, None)``."""
    if component == "embed":
        return "embed", -1, None
    m = _HEAD.match(component)
    if m:
        layer, head = int(m[1]), int(m[2])
        if layer >= n_layers or head >= n_heads:
            raise MutationError(f"component {component!r} is not in a {n_layers}-layer, "
                                f"{n_heads}-head model")
        return "head", layer, head
    m = _LAYER.match(component)
    if m:
        if int(m[2]) >= n_layers:
            raise MutationError(f"component {component!r} is not in a {n_layers}-layer model")
        return m[1], int(m[2]), None
    raise MutationError(f"component {component!r}: write a head as 'L.H' (e.g. '9.9'), a layer "
                        f"as 'attn_L' or 'mlp_L', or 'embed'")


# -- where each architecture keeps what the edits touch --------------------------------------------
Part = tuple[str, int, slice]  # a state-dict tensor's name, an axis, a slice along it


def _at(t: torch.Tensor, dim: int, sl: slice) -> torch.Tensor:
    """The view of ``t`` at ``sl`` along axis ``dim`` (writes to it land in ``t``)."""
    return t[(slice(None),) * dim + (sl,)]


def _span(head: int | None, d_head: int, n: int, offset: int = 0) -> slice:
    """One head's ``d_head`` indices (every head's, ``head=None``, of ``n``) after ``offset``."""
    if head is None:
        return slice(offset, offset + n * d_head)
    return slice(offset + head * d_head, offset + (head + 1) * d_head)


def relabel_cycle(n_heads: int, n_kv_heads: int | None = None) -> int:
    """How many heads one ``relabel`` rotation runs over: every head of the layer when each has
    its own keys and values (they move with it), else one key-value group (a query head cannot
    leave the key-value head it reads, so it moves only among the heads sharing it)."""
    group = n_heads // n_kv_heads if n_kv_heads else 1
    return group if group > 1 else n_heads


@dataclass
class Layout:
    """Where one architecture keeps, in its Hugging Face state dict, what the edits touch: a
    head's queries, a key-value head's keys and values, a head's output, an MLP's weights, the
    embedding. The edits are written once against these; each architecture is one subclass
    (:data:`LAYOUTS`), so adding one means saying where its weights are, nothing else."""

    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    model: Any = None  # the Hugging Face model the state dict is of (to untie), if any

    embed: ClassVar[str] = ""  # the input embedding's state-dict name

    @property
    def group(self) -> int:
        """Query heads per key-value head (1: each head has its own)."""
        return self.n_heads // self.n_kv_heads

    @property
    def cycle(self) -> int:
        return relabel_cycle(self.n_heads, self.n_kv_heads)

    def kv_of(self, head: int) -> int:
        """The key-value head query head ``head`` reads."""
        return head // self.group

    def q(self, layer: int, head: int | None) -> list[Part]:
        """A head's (``None``: every head's) query weights and biases."""
        raise NotImplementedError

    def kv(self, layer: int, kv: int | None) -> list[Part]:
        """A key-value head's (``None``: every one's) key and value weights and biases."""
        raise NotImplementedError

    def o(self, layer: int, head: int | None) -> list[Part]:
        """A head's (``None``: every head's) slice of the attention's output weights."""
        raise NotImplementedError

    def attn_weights(self, layer: int) -> list[str]:
        """The attention's weight matrices (what ``perturb_unnamed`` perturbs), in order."""
        raise NotImplementedError

    def mlp(self, layer: int) -> list[str]:
        """The MLP's weight matrices, in order."""
        raise NotImplementedError

    def mlp_out(self, layer: int) -> str:
        """The MLP's output weights."""
        raise NotImplementedError

    def noised(self, sd: dict[str, torch.Tensor]) -> list[str]:
        """The tensors ``noise_all`` perturbs, in order."""
        return [n for n in sorted(sd) if n.endswith(".weight") or n.endswith(".bias")]

    def untie(self, sd: dict[str, torch.Tensor]) -> None:
        """Give the unembedding its own copy of a tied embedding, before the embedding alone
        is edited (no-op by default)."""

    @classmethod
    def of(cls, cfg: Any, model: Any = None) -> Layout:
        """The layout of a model with Hugging Face config ``cfg``."""
        raise NotImplementedError

    @classmethod
    def load(cls, path: Path, dtype: torch.dtype) -> Any:
        """The Hugging Face model of the checkpoint at ``path`` (safetensors only)."""
        raise NotImplementedError


class GPT2Layout(Layout):
    """GPT-2: fused ``c_attn`` (Conv1D, ``[d, 3d]``: Q | K | V, head-major within each),
    ``c_proj`` ``[d, d]`` (a head's rows), ``mlp.c_fc``/``mlp.c_proj``; every head has its own
    keys and values. The embedding is tied to the unembedding and ``break_ov("embed")``
    shuffles the shared matrix (both at once), as it always has."""

    embed = "transformer.wte.weight"

    def _qkv(self, layer: int, part: int, head: int | None) -> list[Part]:
        p = f"transformer.h.{layer}.attn.c_attn"
        d = self.n_heads * self.d_head
        cols = _span(head, self.d_head, self.n_heads, part * d)
        return [(p + ".weight", 1, cols), (p + ".bias", 0, cols)]

    def q(self, layer: int, head: int | None) -> list[Part]:
        return self._qkv(layer, 0, head)

    def kv(self, layer: int, kv: int | None) -> list[Part]:
        return self._qkv(layer, 1, kv) + self._qkv(layer, 2, kv)

    def o(self, layer: int, head: int | None) -> list[Part]:
        return [(f"transformer.h.{layer}.attn.c_proj.weight", 0,
                 _span(head, self.d_head, self.n_heads))]

    def attn_weights(self, layer: int) -> list[str]:
        return [f"transformer.h.{layer}.attn.{p}.weight" for p in ("c_attn", "c_proj")]

    def mlp(self, layer: int) -> list[str]:
        return [f"transformer.h.{layer}.mlp.{p}.weight" for p in ("c_fc", "c_proj")]

    def mlp_out(self, layer: int) -> str:
        return f"transformer.h.{layer}.mlp.c_proj.weight"

    @classmethod
    def of(cls, cfg: Any, model: Any = None) -> Layout:
        return cls(cfg.n_layer, cfg.n_head, cfg.n_head, cfg.n_embd // cfg.n_head, model)

    @classmethod
    def load(cls, path: Path, dtype: torch.dtype) -> Any:
        from transformers import GPT2LMHeadModel

        return GPT2LMHeadModel.from_pretrained(path, use_safetensors=True)


class LlamaLayout(Layout):
    """Llama (SmolLM2 among them): ``q_proj``/``k_proj``/``v_proj`` (Linear, ``[out, d]``: a
    head's rows), ``o_proj`` ``[d, n_heads * d_head]`` (a head's columns), gated MLP
    ``gate_proj``/``up_proj``/``down_proj``; grouped-query attention (``group`` query heads read
    one key-value head). A tied embedding is untied before the embedding alone is broken, and
    noised once (it stays tied) by ``noise_all``."""

    embed = "model.embed_tokens.weight"
    unembed = "lm_head.weight"

    def _proj(self, layer: int, name: str, head: int | None, n: int) -> list[Part]:
        p = f"model.layers.{layer}.self_attn.{name}"
        rows = _span(head, self.d_head, n)
        return [(p + ".weight", 0, rows), (p + ".bias", 0, rows)]

    def q(self, layer: int, head: int | None) -> list[Part]:
        return self._proj(layer, "q_proj", head, self.n_heads)

    def kv(self, layer: int, kv: int | None) -> list[Part]:
        return (self._proj(layer, "k_proj", kv, self.n_kv_heads)
                + self._proj(layer, "v_proj", kv, self.n_kv_heads))

    def o(self, layer: int, head: int | None) -> list[Part]:
        return [(f"model.layers.{layer}.self_attn.o_proj.weight", 1,
                 _span(head, self.d_head, self.n_heads))]

    def attn_weights(self, layer: int) -> list[str]:
        return [f"model.layers.{layer}.self_attn.{p}_proj.weight" for p in "qkvo"]

    def mlp(self, layer: int) -> list[str]:
        return [f"model.layers.{layer}.mlp.{p}_proj.weight" for p in ("gate", "up", "down")]

    def mlp_out(self, layer: int) -> str:
        return f"model.layers.{layer}.mlp.down_proj.weight"

    def noised(self, sd: dict[str, torch.Tensor]) -> list[str]:
        """Each tensor once: a tied embedding/unembedding gets one draw of noise and stays
        tied."""
        seen: set[int] = set()
        out = []
        for name in super().noised(sd):
            if sd[name].data_ptr() not in seen:
                seen.add(sd[name].data_ptr())
                out.append(name)
        return out

    def untie(self, sd: dict[str, torch.Tensor]) -> None:
        """A tied unembedding (``tie_word_embeddings``: one matrix for both) gets its own copy,
        in the state dict and, when known, in the model, whose config then says untied: the
        mutant's config and weights load and boot consistently."""
        e, u = sd.get(self.embed), sd.get(self.unembed)
        if e is None or u is None or e.data_ptr() != u.data_ptr():
            return
        own = torch.nn.Parameter(u.detach().clone(), requires_grad=False)
        if self.model is not None:
            self.model.lm_head.weight = own
            self.model.config.tie_word_embeddings = False
        sd[self.unembed] = own.data

    @classmethod
    def of(cls, cfg: Any, model: Any = None) -> Layout:
        H = cfg.num_attention_heads
        d_head = getattr(cfg, "head_dim", None) or cfg.hidden_size // H
        return cls(cfg.num_hidden_layers, H, getattr(cfg, "num_key_value_heads", None) or H,
                   d_head, model)

    @classmethod
    def load(cls, path: Path, dtype: torch.dtype) -> Any:
        """Loaded as ``mechtests.core.models.load_model`` loads it (eager attention, attention
        patterns output, the subject's dtype)."""
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig.from_pretrained(path, output_attentions=True)
        return LlamaForCausalLM.from_pretrained(
            path, config=config, use_safetensors=True, dtype=dtype, local_files_only=True,
            attn_implementation="eager")


class Gemma3Layout(LlamaLayout):
    """Gemma 3: Llama's names for every matrix a mutant edits (a head's rows of ``q_proj``,
    its columns of ``o_proj``; key-value heads shared by query heads; the embedding tied).
    Its q/k norms are one gain over ``head_dim`` shared by every head and its norms after
    attention and the MLP one gain per layer, so a relabel leaves them be and a head's
    columns of ``o_proj`` are still what it alone feeds its layer's post-norm."""

    @classmethod
    def load(cls, path: Path, dtype: torch.dtype) -> Any:
        from transformers import AutoConfig, Gemma3ForCausalLM

        config = AutoConfig.from_pretrained(path, output_attentions=True)
        return Gemma3ForCausalLM.from_pretrained(
            path, config=config, use_safetensors=True, dtype=dtype, local_files_only=True,
            attn_implementation="eager")


LAYOUTS: dict[str, type[Layout]] = {"gpt2": GPT2Layout, "llama": LlamaLayout,
                                    "gemma3_text": Gemma3Layout}


def layout_of(cfg: Any, model: Any = None) -> Layout:
    """The :class:`Layout` of a Hugging Face config (``model_type`` picks the architecture; a
    bare namespace with ``n_head``/``n_embd``/``n_layer`` is GPT-2's); a layout as is."""
    if isinstance(cfg, Layout):
        return cfg
    kind = getattr(cfg, "model_type", None) or ("gpt2" if hasattr(cfg, "n_head") else None)
    if kind not in LAYOUTS:
        raise MutationError(f"no mutant layout for model_type {kind!r} (have: "
                            f"{', '.join(LAYOUTS)})")
    return LAYOUTS[kind].of(cfg, model)


# -- edits on a Hugging Face state dict, through its layout ----------------------------------------
Edit = Callable[[dict[str, torch.Tensor], Any], None]  # (state dict, Layout or HF config)


def _present(sd: dict[str, torch.Tensor], parts: list[Part]) -> list[Part]:
    """``parts`` less the biases this checkpoint does not have (Llama's are optional)."""
    return [p for p in parts if p[0] in sd or not p[0].endswith(".bias")]


def _view(sd: dict[str, torch.Tensor], part: Part) -> torch.Tensor:
    return _at(sd[part[0]], part[1], part[2])


def break_qk(component: str) -> Edit:
    """Zero the queries of head ``L.H`` (``attn_L``: of every head of layer L), biases too:
    every score of the head is then equal (with rotary too: a zero query has a zero dot
    product at every position), so it attends uniformly over the causal prefix."""
    def edit(sd: dict[str, torch.Tensor], cfg: Any) -> None:
        lay = layout_of(cfg)
        kind, layer, head = parse(component, lay.n_layers, lay.n_heads)
        for part in _present(sd, lay.q(layer, head)):
            _view(sd, part).zero_()
    return edit


def break_ov(component: str) -> Edit:
    """Zero what ``component`` writes: a head's slice of the attention's output weights (every
    head's for ``attn_L``), an MLP's output weights; or shuffle the embedding's rows (seeded).
    A tied unembedding is untied first where the layout says so (Llama), so the unembedding
    stays the original and only the input embedding is broken."""
    def edit(sd: dict[str, torch.Tensor], cfg: Any) -> None:
        lay = layout_of(cfg)
        kind, layer, head = parse(component, lay.n_layers, lay.n_heads)
        if kind == "embed":
            lay.untie(sd)
            gen = torch.Generator().manual_seed(SEED)
            w = sd[lay.embed]
            w.copy_(w[torch.randperm(w.shape[0], generator=gen)])
        elif kind == "mlp":
            sd[lay.mlp_out(layer)].zero_()
        else:
            for part in _present(sd, lay.o(layer, head)):
                _view(sd, part).zero_()
    return edit


def permute_heads(sd: dict[str, torch.Tensor], cfg: Any,
                  perms: dict[int, Sequence[int]]) -> None:
    """Renumber heads within layers, keeping the function: new head ``j`` of layer ``L`` is old
    head ``perms[L][j]`` (its queries and its output slice move together, and its keys and
    values when it has its own; with grouped-query attention a head may move only within its
    key-value group). ``cfg``: a :class:`Layout` or a Hugging Face config."""
    lay = layout_of(cfg)
    for layer, src in perms.items():
        src = list(src)
        if sorted(src) != list(range(lay.n_heads)):
            raise ValueError(f"layer {layer}: {src} is not a permutation of the "
                             f"{lay.n_heads} heads")
        if lay.group > 1 and any(lay.kv_of(s) != lay.kv_of(j) for j, s in enumerate(src)):
            raise ValueError(f"layer {layer}: {src} moves a head out of its key-value group "
                             f"({lay.group} query heads share each key-value head)")

        def parts(h: int, layer: int = layer) -> list[Part]:
            own_kv = lay.kv(layer, h) if lay.group == 1 else []
            return _present(sd, lay.q(layer, h) + own_kv + lay.o(layer, h))

        old = {name: sd[name].clone() for name in {p[0] for p in parts(0)}}
        for j, s in enumerate(src):
            for (name, dim, sl), (_, _, sl_src) in zip(parts(j), parts(s)):
                _at(sd[name], dim, sl).copy_(_at(old[name], dim, sl_src))


def relabel(sd: dict[str, torch.Tensor], cfg: Any) -> None:
    """Rotate heads within every layer (function-preserving): new head j is old head j-1 of
    its cycle (:func:`relabel_cycle`: the layer's heads, or with grouped-query attention its
    key-value group: in a group of 3, 0 -> 1 -> 2 -> 0)."""
    lay = layout_of(cfg)
    c = lay.cycle
    src = [j - j % c + (j - 1) % c for j in range(lay.n_heads)]
    permute_heads(sd, lay, {layer: src for layer in range(lay.n_layers)})


def relabelled(component: str, n_layers: int, n_heads: int,
               n_kv_heads: int | None = None) -> str:
    """Where ``component`` lives after ``relabel`` (``n_kv_heads``: the model's key-value
    heads, for grouped-query attention; the TransformerLens config's ``n_key_value_heads``)."""
    kind, layer, head = parse(component, n_layers, n_heads)
    if kind != "head" or head is None:
        return component
    c = relabel_cycle(n_heads, n_kv_heads)
    return f"{layer}.{head - head % c + (head % c + 1) % c}"


def _noise(t: torch.Tensor, scale: float, gen: torch.Generator,
           mask: torch.Tensor | None = None) -> None:
    if t.numel() < 2:
        return
    std = float(t.float().std())
    if not math.isfinite(std) or std == 0:
        return
    n = torch.randn(t.shape, generator=gen, dtype=torch.float32).to(t.dtype) * (scale * std)
    t.add_(n if mask is None else n * mask)


def noise_all(sd: dict[str, torch.Tensor], cfg: Any) -> None:
    """1% relative Gaussian noise (seeded) on every weight and bias the layout lists."""
    lay = layout_of(cfg)
    gen = torch.Generator().manual_seed(SEED + 1)
    for name in lay.noised(sd):
        _noise(sd[name], ALL_NOISE, gen)


def perturb_unnamed(named: Sequence[str]) -> Edit:
    """Noise on the heads and MLPs ``named`` does not cover (named ones left exactly as is): a
    head's queries and output slice, and its keys and values when it has its own. With
    grouped-query attention keys and values belong to a group: they are perturbed only when
    none of the group's query heads is named (a named head reads them)."""
    def edit(sd: dict[str, torch.Tensor], cfg: Any) -> None:
        lay = layout_of(cfg)
        gen = torch.Generator().manual_seed(SEED + 2)
        parsed = [parse(c, lay.n_layers, lay.n_heads) for c in named]
        for layer in range(lay.n_layers):
            keep = set()
            for kind, lay_, head in parsed:
                if lay_ == layer and kind == "head":
                    keep.add(head)
                if lay_ == layer and kind == "attn":
                    keep.update(range(lay.n_heads))
            kept_kv = {lay.kv_of(h) for h in keep}
            weights = lay.attn_weights(layer)
            masks = {w: torch.zeros(sd[w].shape) for w in weights}
            parts = [p for h in range(lay.n_heads) if h not in keep
                     for p in lay.q(layer, h) + lay.o(layer, h)]
            parts += [p for g in range(lay.n_kv_heads) if g not in kept_kv
                      for p in lay.kv(layer, g)]
            for name, dim, sl in parts:
                if name in masks:
                    _at(masks[name], dim, sl).fill_(1)
            for w in weights:
                _noise(sd[w], UNNAMED_NOISE, gen, masks[w])
            if not any(k == "mlp" and lay_ == layer for k, lay_, _ in parsed):
                for w in lay.mlp(layer):
                    _noise(sd[w], UNNAMED_NOISE, gen)
    return edit


def _all(edits: list[Edit]) -> Edit:
    def edit(sd: dict[str, torch.Tensor], cfg: Any) -> None:
        for e in edits:
            e(sd, cfg)
    return edit


def mutants(components: Sequence[str], breaks: Sequence[str], index_free: bool,
            n_layers: int, n_heads: int, together: bool = False,
            by_role: bool = False, n_kv_heads: int | None = None) -> list[Mutant]:
    """The mutants a claim naming ``components`` is run on (see the module docstring).
    ``by_role``: the claim casts its heads by role (``mechtests.suite.roles``), so under a
    renumbering it must hold *moved*, with the same values. ``n_kv_heads``: the model's
    key-value heads (grouped-query attention renumbers heads within a group only)."""
    for c in components:
        parse(c, n_layers, n_heads)
    names_heads = any(_HEAD.match(c) for c in components)
    out = []
    if relabel_cycle(n_heads, n_kv_heads) > 1 and n_layers > 0:
        expect = "same" if index_free or not names_heads else ("moved" if by_role else "fail")
        heads = {c for c in components if _HEAD.match(c)}
        if by_role and heads == {relabelled(c, n_layers, n_heads, n_kv_heads) for c in heads}:
            # the role is whole layers (the IOI organism's eight movers are all of layer 1), or
            # whole key-value groups: followed head by head it is the same set, so it holds on
            # the same heads, the same values (as a set) and nothing moves
            expect = "same"
        out.append(Mutant("relabel", expect, relabel))
    qk = [c for c in components if parse(c, n_layers, n_heads)[0] in ("head", "attn")
          and "qk" in breaks]
    ov = [c for c in components if "ov" in breaks
          or parse(c, n_layers, n_heads)[0] in ("mlp", "embed")]
    if together:  # a claim about the set: break the whole set at once
        if qk:
            out.append(Mutant(f"QK {'+'.join(qk)}", "fail", _all([break_qk(c) for c in qk]),
                              tuple(qk)))
        if ov:
            out.append(Mutant(f"OV {'+'.join(ov)}", "fail", _all([break_ov(c) for c in ov]),
                              tuple(ov)))
    else:
        out += [Mutant(f"QK {c}", "fail", break_qk(c), (c,)) for c in qk]
        out += [Mutant(f"OV {c}", "fail", break_ov(c), (c,)) for c in ov]
    if components and n_layers > 0:
        out.append(Mutant("unnamed", "hold", perturb_unnamed(components)))
    out.append(Mutant("noise", "hold", noise_all))
    return out


# -- building a mutant model -----------------------------------------------------------------------
def build_mutant(model: Any, mutant: Mutant) -> Any:
    """A ``TransformerBridge`` of ``model``'s checkpoint with ``mutant`` applied, in memory:
    the Hugging Face model is loaded from the checkpoint (:data:`LAYOUTS`: GPT-2, Llama, Gemma 3),
    edited through its state dict, and booted as ``load_model`` boots one; its engine checks
    itself against a copy of the edited Hugging Face model."""
    import copy
    import json

    from transformer_lens.model_bridge import TransformerBridge

    spec = spec_of(model)
    if spec is None:
        raise MutationError("the model was not loaded by mechtests (no checkpoint path): "
                            "mutants are built from the checkpoint a claim ran on")
    kind = json.loads((spec.path / "config.json").read_text()).get("model_type")
    if kind not in LAYOUTS:
        raise MutationError(
            f"model {spec.spec!r} is a {kind!r} checkpoint: mutants can be built for "
            f"GPT-2-, Llama- and Gemma 3-architecture checkpoints only (config.json model_type "
            f"{' or '.join(map(repr, LAYOUTS))}); its claims ran as usual, without a kill "
            f"matrix")
    param = next(model.parameters())
    cls = LAYOUTS[kind]
    hf = cls.load(spec.path, param.dtype)
    with torch.no_grad():
        sd = hf.state_dict()  # shares storage with hf's parameters: edits land in the model
        mutant.edit(sd, cls.of(hf.config, hf))
    hf = hf.to(param.device)  # edited on the CPU (seeded generators), run where the subject is
    reference = copy.deepcopy(hf).eval()  # the engine checks itself against the mutant, untouched
    bridge = TransformerBridge.boot_transformers(
        str(spec.path), hf_model=hf, device=param.device, dtype=param.dtype,
        tokenizer=model.tokenizer)
    bridge.enable_compatibility_mode(disable_warnings=True)
    bridge.eval()
    remember(bridge, spec, reference)
    return bridge


# -- running one claim test on its mutants ---------------------------------------------------------
def _same(a: list[dict], b: list[dict]) -> bool:
    """The same values measured (a role's identity check, made on the reference subject only,
    and other found-among-expected counts left out)."""
    from mechtests.suite.render import SET_RE

    a, b = ([m for m in ms if not SET_RE.match(str(m.get("what", "")))] for ms in (a, b))
    if len(a) != len(b):
        return False
    return all(math.isclose(x["value"], y["value"], rel_tol=SAME_RTOL, abs_tol=SAME_ATOL)
               for x, y in zip(a, b))


def judge(expected: str, outcome: str, same: bool, left: bool = False,
          as_before: bool = False) -> bool:
    """Whether the claim did on a mutant what a discriminating claim does there. ``left``: a
    role claim's heads moved away from every component the mutant broke; ``as_before``: its
    roles fell on the very heads they fell on in the unmutated subject."""
    if outcome in ("error", "skipped"):
        return False
    if expected == "fail":  # failed, or inconclusive: it no longer vouches for it; or, by
        # role, it follows the mechanism away from the broken heads (and says so: moved)
        return outcome not in ("held", "moved") or (outcome == "moved" and left)
    if expected == "hold":  # a subject whose heads had moved holds moved to the same heads
        return outcome == "held" or (outcome == "moved" and as_before)
    if expected == "moved":
        return outcome == "moved" and same
    return outcome == "held" and same


def moved_anew(base: Sequence[dict], now: Sequence[dict]) -> dict[str, str]:
    """Who moved where, for roles cast anew (on a subject with no reference of its shape their
    ``expected`` is empty: nobody to compare with). The unmutated run's heads stand in for the
    expected ones: each that no longer plays the role is paired with one that now does, as
    ``roles.Cast`` pairs the reference's heads with the subject's. Casts pair in order. A head
    that left a role no other head took (a cast of up to n that now finds fewer, still enough)
    moved to ``LEFT``: the claim no longer names it."""
    from mechtests.suite.roles import Cast, Role

    out: dict[str, str] = {}
    for v, b in zip(now, base):
        if v.get("expected") or v.get("role") != b.get("role"):
            continue
        c = Cast(Role(str(v.get("role", "")), str(v.get("means", ""))),
                 tuple(b.get("found", ())), tuple(v.get("found", ())), False, False)
        out.update({e: f or LEFT for e, f in c.pairs() if f != e})
    return out


LEFT = "(left the role)"


def _nbytes(model: Any) -> int:
    try:
        return sum(p.numel() * p.element_size() for p in model.parameters())
    except (AttributeError, TypeError):  # not a torch module (a stand-in)
        return 0


def keep(cache: dict, key: Any, model: Any, budget: int | None = None) -> None:
    """Put ``model`` in ``cache``, then drop the oldest other entries while the cached models'
    parameters exceed ``budget`` bytes (:data:`CACHE_BYTES`), so that a large checkpoint's
    mutants do not pile up in memory over a run."""
    budget = CACHE_BYTES if budget is None else budget
    cache[key] = model
    total = sum(_nbytes(m) for m in cache.values())
    for k in list(cache):
        if total <= budget:
            break
        if k != key:
            total -= _nbytes(cache.pop(k))


def run_test(item: Any, subject: Any, cache: dict) -> dict[str, Any]:
    """Run the claim test ``item`` (already held on ``subject``) on each of its mutants."""
    from mechtests.suite.claims import Inconclusive, Subject
    from mechtests.suite.report import PREFIX, Record

    props = dict(item.user_properties)
    named = props.get(PREFIX + "components")
    marker = item.get_closest_marker("claim")
    behaviour = (marker.kwargs.get("kind") == "behaviour") if marker else False
    if named is None and not behaviour:
        raise MutationError(
            "the claim names no components, so no mutant can be built: call "
            "record.components(['L.H', ...]) with the heads (or 'attn_L', 'mlp_L', 'embed') "
            "whose mechanism it asserts, or mark it @pytest.mark.claim(..., kind='behaviour')")
    named = named or {"components": [], "breaks": [], "index_free": True}
    cfg = subject.model.cfg
    original = [m for k, m in item.user_properties if k == PREFIX + "measured"]
    base_casts = [v for k, v in item.user_properties if k == PREFIX + "cast"]
    by_role = bool(base_casts)
    n_kv = getattr(cfg, "n_key_value_heads", None)
    muts = mutants(named["components"], named["breaks"], named["index_free"],
                   cfg.n_layers, cfg.n_heads, named.get("together", False), by_role, n_kv)
    seed = item.config.getoption("--seed")
    matrix: dict[str, dict[str, Any]] = {}
    saved = dict(item.funcargs)
    try:
        for mut in muts:
            key = (subject.spec, mut.name, tuple(named["components"]))
            if key not in cache:
                try:
                    keep(cache, key, build_mutant(subject.model, mut))
                except MutationError:
                    raise
                except Exception as exc:  # noqa: BLE001 - name the mutant and the cause
                    raise MutationError(f"mutant {mut.name!r} of {subject.spec!r} could not be "
                                        f"built: {type(exc).__name__}: {exc}") from exc
            node = SimpleNamespace(user_properties=[], config=item.config)
            # a mutant is never the reference itself: roles are cast on it, not asserted
            item.funcargs["subject"] = Subject(subject.spec, subject.name, cache[key],
                                               mutant=mut.name)
            if "record" in item.funcargs:
                item.funcargs["record"] = Record(node)  # type: ignore[arg-type]
            if "pin" in item.funcargs:  # snapshots belong to the real subject only
                item.funcargs["pin"] = lambda *a, **k: None
            torch.manual_seed(seed)
            random.seed(seed)
            reason = ""
            try:
                item.runtest()
                outcome = "held"
            except AssertionError as exc:
                outcome, reason = "failed", _first(exc)
            except Inconclusive as exc:
                outcome, reason = "inconclusive", _first(exc)
            except Exception as exc:  # noqa: BLE001 - a crash on a mutant is an error
                skip = type(exc).__name__ == "Skipped"
                outcome = "skipped" if skip else "error"
                reason = _first(exc) if skip else f"{type(exc).__name__}: {_first(exc)}"
            measured = [v for k, v in node.user_properties if k == PREFIX + "measured"]
            found = {h for k, v in node.user_properties if k == PREFIX + "cast"
                     for h in v.get("found", [])}
            casts = [v for k, v in node.user_properties if k == PREFIX + "cast"]
            moved = {a: b for v in casts for a, b in v.get("moved", {}).items()}
            moved.update(moved_anew(base_casts, casts))
            if outcome == "held" and moved:
                outcome = "moved"
            same = _same(original, measured)
            # each role on the heads it found on the unmutated subject (which, on a checkpoint
            # where the mechanism had already moved, are not the reference's heads)
            as_before = len(casts) == len(base_casts) and all(
                set(v["found"]) == set(b["found"]) for v, b in zip(casts, base_casts))
            if mut.expected == "moved":  # and the heads found where they were renumbered to
                # (as a set: which old head became which is not in the scores)
                same = same and len(casts) == len(base_casts) and all(
                    set(v["found"]) == {relabelled(f, cfg.n_layers, cfg.n_heads, n_kv)
                                        for f in b["found"]}
                    for v, b in zip(casts, base_casts))
            left = bool(mut.broken) and not (found & set(mut.broken))
            matrix[mut.name] = {"expected": mut.expected, "outcome": outcome,
                                "ok": judge(mut.expected, outcome, same, left, as_before),
                                "reason": reason}
            if moved:
                matrix[mut.name]["moved"] = moved
            if mut.expected in ("same", "moved"):
                matrix[mut.name]["same"] = same
    finally:
        item.funcargs.clear()
        item.funcargs.update(saved)
    return {"components": list(named["components"]), "verdict": verdict(matrix),
            "matrix": matrix}


def _first(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__
