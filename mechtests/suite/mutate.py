"""Mutation testing of claims: would the claim have failed had its mechanism been broken?

What mutmut does for code, for findings. With ``pytest claims/ --mutate``, every claim test that
holds on its subject is run again, in the same process, on mutants of that subject built in
memory from the components the claim names (``record.components([...])``):

* ``relabel``: heads rotated within every layer (head h moves to h+1), a function-preserving
  renumbering. A claim that names no head by index must measure identical values; a claim that
  names heads by index now points at other heads and must fail; a claim that casts its heads by
  role (``mechtests.suite.roles``) must hold *moved*, each head followed to its new index, with
  identical values (a mutant is never the reference itself, so its roles are cast, not asserted);
  a role made of every head of its layers maps onto itself and must hold on the same heads.
* ``QK <c>``: component c's attention broken (its queries zeroed: uniform causal attention).
* ``OV <c>``: component c's output broken (its output weights zeroed). For an MLP layer or the
  embedding, ``OV`` is the only break (output zeroed; embedding rows shuffled).
* ``unnamed``: every head and MLP the claim does not name perturbed with 10% relative Gaussian
  noise on its weights: the claim must hold (specificity).
* ``noise``: 1% relative Gaussian noise on every weight: the claim must hold (robustness).

Each mutant's outcome is compared with what a discriminating claim does there; the kill matrix
and a one-word verdict per claim go to the terminal summary and the report:
``discriminating``, ``cannot fail when <mutant> breaks``, ``fragile under <mutant>``,
``index-dependent under relabel`` (values moved under a function-preserving relabel),
``does not follow its heads when renumbered`` (a role claim that did not hold moved there).
A role claim meets a broken head's mutant as a discriminating claim must when it fails, or when
it holds *moved* away from every component the mutant broke (it found the mechanism elsewhere
and says so).

Components: ``"L.H"`` (head H of layer L), ``"attn_L"`` (every head of layer L), ``"mlp_L"``,
``"embed"``. A behaviour claim (``kind="behaviour"`` in its ``claim`` marker) names no
component: only ``relabel`` (values must not move) and ``noise`` apply to it.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch

from mechtests.core.models import remember, spec_of
from mechtests.suite.report import merge_mutations as merge  # noqa: F401 - with the report
from mechtests.suite.report import verdict  # noqa: F401 - mutation verdicts live with the report

UNNAMED_NOISE = 0.10  # relative std of the noise on components the claim does not name
ALL_NOISE = 0.01  # relative std of the noise on every weight
SAME_ATOL, SAME_RTOL = 1e-4, 1e-3  # "identical values" under a function-preserving relabel
SEED = 0

_HEAD = re.compile(r"^(\d+)\.(\d+)$")
_LAYER = re.compile(r"^(attn|mlp)_(\d+)$")


class MutationError(ValueError):
    """Mutants cannot be built for this claim or this model; the message says why and the fix."""


@dataclass(frozen=True)
class Mutant:
    """One mutant: its name, what a discriminating claim does on it, and how to build it."""

    name: str
    expected: str  # "fail" | "hold" | "same" | "moved"
    edit: Callable[[dict[str, torch.Tensor], Any], None]  # mutates an HF GPT-2 state dict
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


# -- edits on an HF GPT-2 state dict (Conv1D weights: [in, out]) -----------------------------------
def _cols(cfg: Any, part: int, head: int | None) -> slice:
    """Columns of c_attn for Q (part 0), K (1) or V (2) of one head (or all heads)."""
    d, dh = cfg.n_embd, cfg.n_embd // cfg.n_head
    if head is None:
        return slice(part * d, (part + 1) * d)
    return slice(part * d + head * dh, part * d + (head + 1) * dh)


def _rows(cfg: Any, head: int | None) -> slice:
    dh = cfg.n_embd // cfg.n_head
    return slice(None) if head is None else slice(head * dh, (head + 1) * dh)


def break_qk(component: str) -> Callable[[dict, Any], None]:
    def edit(sd: dict[str, torch.Tensor], cfg: Any) -> None:
        kind, layer, head = parse(component, cfg.n_layer, cfg.n_head)
        p = f"transformer.h.{layer}.attn.c_attn"
        sd[p + ".weight"][:, _cols(cfg, 0, head)] = 0  # queries 0: every score equal
        sd[p + ".bias"][_cols(cfg, 0, head)] = 0
    return edit


def break_ov(component: str) -> Callable[[dict, Any], None]:
    def edit(sd: dict[str, torch.Tensor], cfg: Any) -> None:
        kind, layer, head = parse(component, cfg.n_layer, cfg.n_head)
        if kind == "embed":
            gen = torch.Generator().manual_seed(SEED)
            w = sd["transformer.wte.weight"]
            w.copy_(w[torch.randperm(w.shape[0], generator=gen)])
        elif kind == "mlp":
            sd[f"transformer.h.{layer}.mlp.c_proj.weight"].zero_()
        else:
            sd[f"transformer.h.{layer}.attn.c_proj.weight"][_rows(cfg, head)] = 0
    return edit


def permute_heads(sd: dict[str, torch.Tensor], cfg: Any,
                  perms: dict[int, Sequence[int]]) -> None:
    """Renumber heads within layers, keeping the function: new head ``j`` of layer ``L`` is old
    head ``perms[L][j]`` (its q/k/v columns and its output rows move together)."""
    for layer, src in perms.items():
        if sorted(src) != list(range(cfg.n_head)):
            raise ValueError(f"layer {layer}: {list(src)} is not a permutation of the "
                             f"{cfg.n_head} heads")
        p = f"transformer.h.{layer}.attn"
        w, b, o = (sd[f"{p}.c_attn.weight"], sd[f"{p}.c_attn.bias"], sd[f"{p}.c_proj.weight"])
        w0, b0, o0 = w.clone(), b.clone(), o.clone()
        for part in range(3):
            for j, s in enumerate(src):
                w[:, _cols(cfg, part, j)] = w0[:, _cols(cfg, part, s)]
                b[_cols(cfg, part, j)] = b0[_cols(cfg, part, s)]
        for j, s in enumerate(src):
            o[_rows(cfg, j)] = o0[_rows(cfg, s)]


def relabel(sd: dict[str, torch.Tensor], cfg: Any) -> None:
    """Rotate heads within every layer: new head j is old head j-1 (function-preserving)."""
    H = cfg.n_head
    permute_heads(sd, cfg, {layer: [(j - 1) % H for j in range(H)]
                            for layer in range(cfg.n_layer)})


def relabelled(component: str, n_layers: int, n_heads: int) -> str:
    """Where ``component`` lives after ``relabel``."""
    kind, layer, head = parse(component, n_layers, n_heads)
    return f"{layer}.{(head + 1) % n_heads}" if kind == "head" else component


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
    gen = torch.Generator().manual_seed(SEED + 1)
    for name in sorted(sd):
        if name.endswith(".weight") or name.endswith(".bias"):
            _noise(sd[name], ALL_NOISE, gen)


def perturb_unnamed(named: Sequence[str]) -> Callable[[dict, Any], None]:
    """Noise on the heads and MLPs ``named`` does not cover (named ones left exactly as is)."""
    def edit(sd: dict[str, torch.Tensor], cfg: Any) -> None:
        gen = torch.Generator().manual_seed(SEED + 2)
        parsed = [parse(c, cfg.n_layer, cfg.n_head) for c in named]
        dh = cfg.n_embd // cfg.n_head
        for layer in range(cfg.n_layer):
            keep = torch.zeros(cfg.n_head)
            for kind, lay, head in parsed:
                if lay == layer and kind == "head":
                    keep[head] = 1
                if lay == layer and kind == "attn":
                    keep[:] = 1
            vary = (1 - keep).repeat_interleave(dh)  # [d] per head's slice
            p = f"transformer.h.{layer}.attn"
            _noise(sd[f"{p}.c_attn.weight"], UNNAMED_NOISE, gen, vary.repeat(3)[None, :])
            _noise(sd[f"{p}.c_proj.weight"], UNNAMED_NOISE, gen, vary[:, None])
            if not any(k == "mlp" and lay == layer for k, lay, _ in parsed):
                for part in ("c_fc", "c_proj"):
                    _noise(sd[f"transformer.h.{layer}.mlp.{part}.weight"], UNNAMED_NOISE, gen)
    return edit


def _all(edits: list[Callable[[dict, Any], None]]) -> Callable[[dict, Any], None]:
    def edit(sd: dict[str, torch.Tensor], cfg: Any) -> None:
        for e in edits:
            e(sd, cfg)
    return edit


def mutants(components: Sequence[str], breaks: Sequence[str], index_free: bool,
            n_layers: int, n_heads: int, together: bool = False,
            by_role: bool = False) -> list[Mutant]:
    """The mutants a claim naming ``components`` is run on (see the module docstring).
    ``by_role``: the claim casts its heads by role (``mechtests.suite.roles``), so under a
    renumbering it must hold *moved*, with the same values."""
    for c in components:
        parse(c, n_layers, n_heads)
    names_heads = any(_HEAD.match(c) for c in components)
    out = []
    if n_heads > 1 and n_layers > 0:
        expect = "same" if index_free or not names_heads else ("moved" if by_role else "fail")
        heads = {c for c in components if _HEAD.match(c)}
        if by_role and heads == {relabelled(c, n_layers, n_heads) for c in heads}:
            # the role is whole layers (the IOI organism's eight movers are all of layer 1):
            # followed head by head it is the same set, so it holds on the same heads, the same
            # values (as a set) and nothing moves
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
    """A ``TransformerBridge`` of ``model``'s checkpoint with ``mutant`` applied, in memory."""
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import GPT2Config, GPT2LMHeadModel

    spec = spec_of(model)
    if spec is None:
        raise MutationError("the model was not loaded by mechtests (no checkpoint path): "
                            "mutants are built from the checkpoint a claim ran on")
    import json

    kind = json.loads((spec.path / "config.json").read_text()).get("model_type")
    if kind != "gpt2":
        raise MutationError(
            f"model {spec.spec!r} is a {kind!r} checkpoint: mutants can be built for "
            f"GPT-2-architecture checkpoints only (config.json model_type 'gpt2'); its claims "
            f"ran as usual, without a kill matrix")
    cfg = GPT2Config.from_pretrained(spec.path)
    hf = GPT2LMHeadModel.from_pretrained(spec.path, use_safetensors=True)
    param = next(model.parameters())
    with torch.no_grad():
        sd = hf.state_dict()  # shares storage with hf's parameters: edits land in the model
        mutant.edit(sd, cfg)
    import copy

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
    muts = mutants(named["components"], named["breaks"], named["index_free"],
                   cfg.n_layers, cfg.n_heads, named.get("together", False), by_role)
    seed = item.config.getoption("--seed")
    matrix: dict[str, dict[str, Any]] = {}
    saved = dict(item.funcargs)
    try:
        for mut in muts:
            key = (subject.spec, mut.name, tuple(named["components"]))
            if key not in cache:
                try:
                    cache[key] = build_mutant(subject.model, mut)
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
            moved = {a: b for k, v in node.user_properties if k == PREFIX + "cast"
                     for a, b in v.get("moved", {}).items()}
            if outcome == "held" and moved:
                outcome = "moved"
            same = _same(original, measured)
            casts = [v for k, v in node.user_properties if k == PREFIX + "cast"]
            # each role on the heads it found on the unmutated subject (which, on a checkpoint
            # where the mechanism had already moved, are not the reference's heads)
            as_before = len(casts) == len(base_casts) and all(
                set(v["found"]) == set(b["found"]) for v, b in zip(casts, base_casts))
            if mut.expected == "moved":  # and the heads found where they were renumbered to
                # (as a set: which old head became which is not in the scores)
                same = same and len(casts) == len(base_casts) and all(
                    set(v["found"]) == {relabelled(f, cfg.n_layers, cfg.n_heads)
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
