"""The claims report's renderers: one self-contained HTML page, a Markdown summary, the figures.

``report.py`` (the plugin) gathers what ran; ``report.build`` turns it into plain data, and these
functions draw and write it. The data they read (every key beyond ``claims`` is optional)::

    {"settings": {...}, "models": [spec, ...], "counts": {outcome: n},
     "claims": [{"id", "source", "cells": {model: {"outcome", "text", "tests": [test, ...]}}}],
     "mutation": {claim id: {"verdict": "discriminating", "matrix": {...}}},  # mutation testing
     "checkpoints": {model: {"step": 1200, "loss": 2.31}}}                    # training sequences

A test record: ``outcome`` (held, moved, failed, error, inconclusive, skipped, xfailed,
xpassed), ``reason``, ``measurements`` (what, value, threshold, op, held; ``kind`` "evidence" or
"sanity"), ``heatmaps`` (title, result, and the stored ``reference`` heatmap when the claim has
one) and, for a claim that held on other components, ``moved`` ({"9.9": "10.2"}).

What a reader sees first: a claims x checkpoints matrix, one glyph and the key number per cell
(the full measurements and reason on click or hover), a tally per checkpoint in its column
header, then one line per claim that did not hold saying why, and skips collapsed to one note per
reason. Below: each claim's measurements and figures (the reference's stored heatmap first, each
checkpoint on one colour scale, its difference to the reference; 1-D results as line plots;
values against training step when the checkpoints have steps).
"""

from __future__ import annotations

import base64
import html
import math
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

# worst first: a cell with several tests shows the worst
ORDER = ("error", "failed", "xpassed", "inconclusive", "moved", "held", "xfailed", "skipped")
GLYPH = {"held": "✓", "moved": "↷", "failed": "✗", "error": "⚠", "inconclusive": "?",
         "skipped": "–", "xfailed": "⊘", "xpassed": "!"}
WORDS = {"held": "held", "moved": "held, moved", "failed": "failed", "error": "error",
         "inconclusive": "inconclusive", "skipped": "skipped", "xfailed": "expected failure",
         "xpassed": "passed unexpectedly"}
OP_SIGN = {">=": "≥", ">": ">", "<=": "≤", "<": "<"}
MAX_DRAWN = 100  # heatmaps with more labels than this on an axis are not drawn (values in JSON)
MAX_LINE = 5000  # 1-D results longer than this are not drawn
MAX_PANELS = 8  # checkpoints drawn per heatmap row (evenly spaced, first and last kept)
ANNOTATE = 160  # grids with at most this many cells (and <= 20 columns) get their values drawn
SET_RE = re.compile(r"^(?P<what>.*): expected (?P<exp>\[.*?\]) among (?P<found>\[.*\])$", re.S)


# -- reading the data ------------------------------------------------------------------------------
def rank(outcome: str) -> int:
    """Position in ORDER (unknown outcomes count as errors: never hidden)."""
    return ORDER.index(outcome) if outcome in ORDER else 0


def worst(tests: Iterable[dict[str, Any]]) -> str:
    outcomes = [t.get("outcome", "error") for t in tests]
    if not outcomes:
        return "skipped"
    return min(outcomes, key=rank) if any(o in ORDER for o in outcomes) else outcomes[0]


def short_names(models: list[str]) -> dict[str, str]:
    """Column names: a path's last part when that is unique among the models, else the spec."""
    tails = {m: m.rstrip("/").rsplit("/", 1)[-1] or m for m in models}
    unique = len(set(tails.values())) == len(tails)
    return {m: (tails[m] if unique else m) for m in models}


def variant(test: dict[str, Any], model: str) -> str:
    """A test's own parameters with the model left out: ``ABBA`` for ``...[multitask-ABBA]``."""
    nodeid = test.get("nodeid", "")
    func = nodeid.split("::")[-1]
    name, _, params = func.partition("[")
    params = params.rstrip("]")
    if model and model in params:
        params = params.replace(model, "", 1)
    params = params.strip("-")
    return params


def func_of(test: dict[str, Any]) -> str:
    return test.get("nodeid", "").split("::")[-1].split("[")[0]


def _evidence(test: dict[str, Any]) -> list[dict[str, Any]]:
    ms = test.get("measurements") or []
    return [m for m in ms if m.get("kind") != "sanity"] or list(ms)


def _margin(m: dict[str, Any]) -> float:
    """How far a measurement is from its threshold, relative to it (negative: it failed)."""
    value, threshold = _num(m.get("value")), _num(m.get("threshold"))
    if not (math.isfinite(value) and math.isfinite(threshold)):
        return -math.inf
    slack = value - threshold if m.get("op", ">=") in (">=", ">") else threshold - value
    return slack / max(abs(threshold), 1e-12)


def _num(x: Any) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


def fmt(x: Any) -> str:
    """A number as a reader wants it: 3 significant digits, no exponent below 1e5."""
    v = _num(x)
    if not math.isfinite(v):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    if v == int(v) and abs(v) < 1e5:
        return str(int(v))
    if abs(v) >= 1e5 or abs(v) < 1e-3:
        return f"{v:.2e}"
    return f"{v:.3g}"


def key_measurement(test: dict[str, Any]) -> dict[str, Any] | None:
    """The measurement a cell shows: the first that did not hold, else the closest call."""
    ms = _evidence(test)
    if not ms:
        return None
    bad = [m for m in ms if not m.get("held", True)]
    if bad:
        return bad[0]
    if test.get("outcome") in ("failed", "error"):
        return None  # it failed for another reason: the reason says which, not a held number
    return min(ms, key=_margin)


def measure_short(m: dict[str, Any]) -> tuple[str, str]:
    """(key number, what it needs): ``("0.079", "≥ 0.45")``; for sets ``("0/2", "found")``."""
    if _is_set(m):
        return f"{fmt(m['value'])}/{fmt(m['threshold'])}", "found"
    return fmt(m.get("value")), f"{OP_SIGN.get(m.get('op', ''), m.get('op', ''))} " \
                                f"{fmt(m.get('threshold'))}"


def _is_set(m: dict[str, Any]) -> bool:
    return m.get("op") == ">=" and bool(SET_RE.match(str(m.get("what", ""))))


def measure_text(m: dict[str, Any]) -> str:
    """One measurement in words: ``what = 0.0788 (needs ≥ 0.45)``, sets as found/expected."""
    ok = "✓" if m.get("held", True) else "✗"
    tag = " [sanity check]" if m.get("kind") == "sanity" else ""
    got = SET_RE.match(str(m.get("what", ""))) if _is_set(m) else None
    if got:
        exp, found = _list_text(got["exp"]), _list_text(got["found"])
        return (f"{got['what']}: {fmt(m['value'])} of {fmt(m['threshold'])} expected ({exp}) "
                f"among {found} {ok}{tag}")
    what = str(m.get("what") or "measured value")
    return (f"{what} = {fmt(m.get('value'))} (needs {OP_SIGN.get(m.get('op', ''), '')} "
            f"{fmt(m.get('threshold'))}) {ok}{tag}")


def _list_text(text: str) -> str:
    return ", ".join(x.strip(" '\"") for x in text.strip("[]").split(",") if x.strip()) or "none"


def moved_text(test: dict[str, Any]) -> str:
    moved = test.get("moved") or {}
    return ", ".join(f"{a} → {b}" for a, b in moved.items())


def cast_text(test: dict[str, Any]) -> str:
    """``name movers: 23.1, 23.2 (cast here)``: who plays each role cast anew on a model with no
    reference of its shape, and on which half of which family (``roles.cast``)."""
    parts = [f"{c['role']}: {', '.join(c['found']) or 'none'}"
             for c in test.get("casts") or [] if not c.get("expected")]
    if not parts:
        return ""
    halves = "; ".join(f"found on {len(s['discover'])} prompts of {s['family']}, confirmed on "
                       f"the other {len(s['confirm'])} (seed {s['seed']})"
                       for s in test.get("splits") or [])
    return "cast here: " + "; ".join(parts) + (f" ({halves})" if halves else "")


def beside_text(beside: dict[str, Any]) -> str:
    """``strict (the very same heads): failed: ...``: the answer to the question that did not
    decide the verdict (``roles.verdict``), in words."""
    what = {"strict": "strict (the very same heads)", "role": "by role",
            "control": "control (the same check on as many other heads, drawn at random)"}.get(
        beside.get("question", ""), str(beside.get("question")))
    out = f"{what}: {WORDS.get(beside.get('outcome', ''), beside.get('outcome'))}"
    return out + (f": {beside['reason']}" if beside.get("reason") else "")


def _exception(reason: str) -> str:
    """The exception's name from an error's reason (``setup: ValueError: ...`` -> ValueError)."""
    text = reason.split(": ", 1)[1] if reason.startswith(("setup: ", "teardown: ")) else reason
    head = text.split(":", 1)[0].strip()
    return head if re.fullmatch(r"[A-Za-z_][\w.]*", head or "-") else "error"


def cell_key(cell: dict[str, Any]) -> tuple[str, str]:
    """(key number, what it needs) for a matrix cell: from the test that decided its outcome."""
    tests = cell.get("tests", [])
    out = worst(tests)
    decisive = [t for t in tests if t.get("outcome") == out]
    t = decisive[0] if decisive else {}
    if out == "skipped":
        return "", ""
    if out == "error":
        return _exception(t.get("reason", "")), ""
    anew = [h for c in t.get("casts") or [] if not c.get("expected") for h in c["found"]]
    if out == "held" and anew:  # who plays the role on a model cast anew
        return ", ".join(anew[:3]) + (f" +{len(anew) - 3}" if len(anew) > 3 else ""), ""
    if out == "moved" and t.get("moved"):
        pairs = list(t["moved"].items())
        more = f" +{len(pairs) - 2}" if len(pairs) > 2 else ""
        return ", ".join(f"{a}→{b}" for a, b in pairs[:2]) + more, ""
    if out in ("failed", "xfailed"):
        for test in decisive:
            m = key_measurement(test)
            if m is not None:
                return measure_short(m)
        name = _exception(t.get("reason", "")) if out == "failed" else ""
        return (name if name != "error" else ""), ""
    ms = [m for test in decisive if (m := key_measurement(test)) is not None]
    if not ms:
        return "", ""
    return measure_short(min(ms, key=_margin))


def test_text(test: dict[str, Any], outcome: bool = True) -> str:
    """Everything about one test, in words: outcome, moved components, measurements, reason."""
    parts = [WORDS.get(test.get("outcome", ""), test.get("outcome", ""))] if outcome else []
    if test.get("moved"):
        parts.append("components moved: " + moved_text(test))
    if cast_text(test):
        parts.append(cast_text(test))
    if test.get("beside"):
        parts.append(beside_text(test["beside"]))
    parts += [measure_text(m) for m in test.get("measurements") or []]
    reason = reason_text(test)
    if reason and test.get("outcome") != "held":
        parts.append(reason)
    return "; ".join(parts)


def reason_text(test: dict[str, Any]) -> str:
    """A test's reason; a claim's own assertion reads without its exception name."""
    return str(test.get("reason") or "").strip().removeprefix("AssertionError: ")


def why(test: dict[str, Any]) -> str:
    """Why a test did not simply hold: its reason (it carries the claim's why), else numbers."""
    reason = reason_text(test)
    out = test.get("outcome")
    if out == "moved":
        m = key_measurement(test)
        return f"held with the components moved ({moved_text(test)})" + (
            f": {measure_text(m)}" if m else "") + (
            f"; {beside_text(test['beside'])}" if test.get("beside") else "")
    if test.get("beside") and reason:
        return f"{reason}; {beside_text(test['beside'])}"
    if reason:
        return reason
    m = key_measurement(test)
    return measure_text(m) if m else WORDS.get(out or "", out or "")


def tally(data: dict[str, Any], model: str) -> dict[str, int]:
    """Per checkpoint: how many claims ended in each outcome."""
    counts: dict[str, int] = {}
    for claim in data["claims"]:
        cell = claim["cells"].get(model)
        if cell:
            out = worst(cell["tests"])
            counts[out] = counts.get(out, 0) + 1
    return {o: counts[o] for o in sorted(counts, key=lambda o: (rank(o) if o != "skipped"
                                                                 else len(ORDER)))}


def tally_text(counts: dict[str, int], sep: str = " ") -> str:
    return sep.join(f"{n}{GLYPH.get(o, '?')}" for o, n in counts.items())


def checked(claim: dict[str, Any]) -> bool:
    """Whether a claim ran anywhere (some cell is not skipped)."""
    return any(worst(c["tests"]) != "skipped" for c in claim["cells"].values())


def skip_notes(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Skipped cells, one note per reason: the reason once, the claims and models it covers."""
    models = data["models"]
    notes: dict[str, dict[str, Any]] = {}
    for claim in data["claims"]:
        for model in models:
            cell = claim["cells"].get(model)
            if not cell or worst(cell["tests"]) != "skipped":
                continue
            reasons = dict.fromkeys(str(t.get("reason") or "no reason given")
                                    for t in cell["tests"])
            for reason in reasons:
                note = notes.setdefault(reason, {"reason": reason, "claims": [], "models": []})
                if claim["id"] not in note["claims"]:
                    note["claims"].append(claim["id"])
                if model not in note["models"]:
                    note["models"].append(model)
    for note in notes.values():
        note["models"] = [m for m in models if m in note["models"]]
    return sorted(notes.values(), key=lambda n: (-len(n["claims"]) * len(n["models"]),
                                                  n["reason"]))


def not_held(data: dict[str, Any]) -> list[tuple[str, dict[str, Any], str, dict[str, Any]]]:
    """(claim, claim data, model, decisive test) for every cell that did not simply hold."""
    out = []
    for claim in data["claims"]:
        for model in data["models"]:
            cell = claim["cells"].get(model)
            if not cell:
                continue
            o = worst(cell["tests"])
            if o in ("held", "skipped", "xfailed"):
                continue
            test = next(t for t in cell["tests"] if t.get("outcome") == o)
            out.append((claim["id"], claim, model, test))
    out.sort(key=lambda x: (rank(x[3].get("outcome", "")), x[0]))
    return out


def steps(data: dict[str, Any]) -> dict[str, float]:
    """Training step of each checkpoint that has one (issue 12's checkpoint sequences)."""
    info = data.get("checkpoints") or {}
    got = {m: _num((info.get(m) or {}).get("step")) for m in data["models"]}
    return {m: s for m, s in got.items() if math.isfinite(s)}


def _heat_rows(claim: dict[str, Any], models: list[str]) -> list[tuple[str, dict[str, Any]]]:
    """Heatmaps grouped by title: [(title, {model: heatmap entry})], in first-seen order.

    When a claim has several tests per model, the title is prefixed with the test function and
    repeated titles are numbered, so each row lines the same heatmap up across models.
    """
    rows: dict[str, dict[str, Any]] = {}
    funcs = {func_of(t) for c in claim["cells"].values() for t in c["tests"]}
    for model in models:
        cell = claim["cells"].get(model)
        seen: dict[str, int] = {}
        for test in cell["tests"] if cell else []:
            for heat in test.get("heatmaps") or []:
                title = heat["title"]
                if len(funcs) > 1:
                    title = f"{func_of(test)}: {title}"
                seen[title] = seen.get(title, 0) + 1
                key = title if seen[title] == 1 else f"{title} #{seen[title]}"
                rows.setdefault(key, {})[model] = heat
    return list(rows.items())


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[:80] or "x"


def _setting(value: Any) -> str:
    if isinstance(value, dict):
        return "; ".join(f"{k}: {_setting(v)}" for k, v in value.items())
    if isinstance(value, list):
        return ", ".join(map(str, value))
    return str(value)


# -- the stored reference heatmap ------------------------------------------------------------------
def reference_heatmap(test_file: Path, func: str, params: str, model: str | None,
                      result: dict[str, Any]) -> dict[str, Any] | None:
    """The committed heatmap snapshot this result is compared with, or None.

    Snapshots live in ``<test dir>/__heatmaps__/<module>/<func>[<params>][<name>].heatmap.txt``
    and record their model. A snapshot belongs to this result when it has the result's name and
    its parameters are this test's with its model in place of ours. The test's own model's
    snapshot is preferred, then one of the same shape (a fine-tune's reference), then any.
    """
    from mechtests.suite.snapshot import loads

    folder = test_file.parent / "__heatmaps__" / test_file.stem
    if not folder.is_dir():
        return None
    pattern = re.compile(re.escape(func) + r"\[(.*)\]\[([^\[\]]*)\]\.heatmap\.txt")
    shape = [len(result["labels"][a]) for a in result["axes"]]
    best: tuple[int, dict[str, Any]] | None = None
    for path in sorted(folder.iterdir()):
        got = pattern.fullmatch(path.name)
        if not got:
            continue
        try:
            snap = loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if snap.get("name") != result.get("name"):
            continue
        theirs = snap.get("model")
        ids = got[1]
        if model and theirs and theirs in ids:
            ids = ids.replace(theirs, model, 1)
        if ids != params:
            continue
        same_shape = list(snap["axes"]) == list(result["axes"]) and [
            len(snap["labels"][a]) for a in snap["axes"]] == shape
        score = 2 if theirs == model else 1 if same_shape else 0
        if best is None or score > best[0]:
            best = (score, {"model": theirs, "file": f"{folder.name}/{path.name}", "result": {
                "name": snap.get("name"), "axes": list(snap["axes"]),
                "labels": {a: list(snap["labels"][a]) for a in snap["axes"]},
                "values": snap["values"]}})
    return best[1] if best else None


# -- figures -------------------------------------------------------------------------------------
def _array(result: dict[str, Any]):
    import numpy as np

    shape = [len(result["labels"][a]) for a in result["axes"]]
    values = np.array(_nan(result["values"]), dtype=float).reshape(shape)
    return values


def _nan(values: Any) -> Any:
    if isinstance(values, list):
        return [_nan(v) for v in values]
    return math.nan if values is None else values


def _line_axis(result: dict[str, Any]) -> str | None:
    """The one axis longer than 1 of a result that is really 1-D (else None)."""
    long = [a for a in result["axes"] if len(result["labels"][a]) > 1]
    if len(result["axes"]) == 1:
        return result["axes"][0]
    if len(long) == 1:
        return long[0]
    if not long and result["axes"]:
        return result["axes"][-1]
    return None


def _same_shape(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return list(a["axes"]) == list(b["axes"]) and all(
        len(a["labels"][x]) == len(b["labels"][x]) for x in a["axes"])


def _lim(arrays: Iterable[Any]) -> float:
    import numpy as np

    lim = 0.0
    for arr in arrays:
        finite = arr[np.isfinite(arr)]
        if finite.size:
            lim = max(lim, float(np.abs(finite).max()))
    return lim or 1.0


def _cell_text(v: float, lim: float) -> str:
    if not math.isfinite(v):
        return ""
    text = f"{v:.0f}" if lim >= 10 else f"{v:.1f}" if lim >= 1 else f"{v:.2f}"
    return text[1:] if text.startswith("-") and float(text) == 0 else text  # no "-0.0"


def _grid(values: Any, result: dict[str, Any], title: str, lim: float, path: Path) -> None:
    """One heatmap panel: diverging colours on the shared scale, values in small grids."""
    import matplotlib.pyplot as plt
    import numpy as np

    if values.ndim == 1:
        values = values[None]
        rows, cols, ylab, xlab = [""], result["labels"][result["axes"][0]], "", result["axes"][0]
    else:
        ya, xa = result["axes"]
        rows, cols, ylab, xlab = result["labels"][ya], result["labels"][xa], ya, xa
    h, w = values.shape
    rotate = any(len(str(c)) > 3 for c in cols) or w > 14
    longest = max((len(str(c)) for c in cols), default=1)
    width = min(6.4, max(2.5, 0.3 * w + 1.55))
    height = min(6.0, max(1.9, 0.28 * h + 1.15 + (0.065 * min(longest, 14) if rotate else 0)))
    fig, ax = plt.subplots(figsize=(width, height), layout="tight")
    im = ax.imshow(values, cmap="RdBu", vmin=-lim, vmax=lim, aspect="auto",
                   interpolation="nearest")
    ax.set_xticks(range(w), [str(c) for c in cols], rotation=90 if rotate else 0, fontsize=8)
    ax.set_yticks(range(h), [str(r) for r in rows], fontsize=8)
    if xlab:
        ax.set_xlabel(xlab, fontsize=9)
    if ylab:
        ax.set_ylabel(ylab, fontsize=9)
    if h * w <= ANNOTATE and w <= 20:
        size = 8 if w <= 10 else 7
        for (i, j), v in np.ndenumerate(values):
            dark = math.isfinite(v) and abs(v) > 0.6 * lim
            ax.text(j, i, _cell_text(float(v), lim), ha="center", va="center", fontsize=size,
                    color="white" if dark else "#222")
    ax.set_title(title, fontsize=9.5)
    bar = fig.colorbar(im, ax=ax, fraction=0.05, pad=0.03)
    bar.ax.tick_params(labelsize=7)
    _save(fig, path)


def _save(fig: Any, path: Path) -> None:
    """Save as a palette PNG (256 colours: a third of the size, the same to the eye)."""
    import io

    import matplotlib.pyplot as plt
    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, dpi=100, format="png")
    plt.close(fig)
    buf.seek(0)
    image = Image.open(buf).convert("RGB")
    image.quantize(256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE).save(
        path, optimize=True)


COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2",
           "#17becf", "#bcbd22", "#7f7f7f")


def _lines(series: list[tuple[str, Any, str]], labels: list[str], xlab: str, title: str,
           path: Path, ylab: str = "") -> None:
    """A line plot of 1-D results: one line per checkpoint, the reference dashed black."""
    import matplotlib.pyplot as plt

    n = len(labels)
    fig, ax = plt.subplots(figsize=(min(7.0, max(4.6, 0.22 * n + 3.0)), 2.9), layout="tight")
    for name, values, style in series:
        colour = "black" if style == "ref" else None
        ax.plot(range(n), values, marker="o" if n <= 40 else None, markersize=3.5,
                linewidth=1.6 if style == "ref" else 1.3, linestyle="--" if style == "ref" else "-",
                color=colour, label=name, zorder=3 if style == "ref" else 2)
    ax.axhline(0, color="#999", linewidth=0.6)
    step = max(1, math.ceil(n / 24))
    ticks = list(range(0, n, step))
    rotate = any(len(str(labels[i])) > 4 for i in ticks)
    ax.set_xticks(ticks, [str(labels[i]) for i in ticks], rotation=60 if rotate else 0,
                  fontsize=8, ha="right" if rotate else "center")
    ax.tick_params(axis="y", labelsize=8)
    ax.set_xlabel(xlab, fontsize=9)
    if ylab:
        ax.set_ylabel(ylab, fontsize=9)
    ax.grid(alpha=0.25)
    ax.set_title(title, fontsize=9.5)
    ax.legend(fontsize=7.5, frameon=False, loc="best")
    _save(fig, path)


def _ref_label(ref: dict[str, Any], names: dict[str, str]) -> str:
    model = ref.get("model") or "reference"
    return f"reference: {names.get(model, model)} (stored)"


def _draw_row(claim: dict[str, Any], title: str, by_model: dict[str, Any], models: list[str],
              names: dict[str, str], images: Path, used: set[str]) -> dict[str, Any]:
    """One heatmap row of a claim: reference first, each checkpoint, each one's difference."""

    def name_for(*parts: str) -> str:
        base = "--".join(_slug(p) for p in (claim["id"], title, *parts))[:150]
        name, i = base, 1
        while name in used:
            i += 1
            name = f"{base}-{i}"
        used.add(name)
        return f"{name}.png"

    order = [m for m in models if m in by_model]
    refs: dict[str, dict[str, Any]] = {}
    for m in order:
        ref = by_model[m].get("reference")
        if ref:
            refs.setdefault(ref["file"], ref)
    fig: dict[str, Any] = {"title": title, "images": [], "diffs": [], "note": ""}
    results = {m: by_model[m]["result"] for m in order}
    axis = {m: _line_axis(r) for m, r in results.items()}
    first = results[order[0]]
    if all(a is not None for a in axis.values()):  # 1-D: line plots
        lengths = {len(r["labels"][axis[m]]) for m, r in results.items()}
        if max(lengths) > MAX_LINE:
            fig["note"] = f"not drawn ({max(lengths)} points): see report.json"
            return fig
        labels = first["labels"][axis[order[0]]]
        same = [m for m in order if _same_shape(results[m], first)]
        series = [(_ref_label(r, names), _array(r["result"]).reshape(-1), "ref")
                  for r in refs.values() if _same_shape(r["result"], first)]
        series += [(names[m], _array(results[m]).reshape(-1), "") for m in same]
        file = name_for("lines")
        _lines(series, labels, axis[order[0]], title, images / file)
        fig["images"].append({"file": f"images/{file}", "caption": "all checkpoints"})
        diffs = []
        for m in same:
            ref = by_model[m].get("reference")
            if ref and _same_shape(ref["result"], results[m]):
                diffs.append((names[m], _array(results[m]).reshape(-1)
                              - _array(ref["result"]).reshape(-1), ""))
        if diffs:
            file = name_for("lines-diff")
            _lines(diffs, labels, axis[order[0]], f"{title}: minus the reference",
                   images / file, ylab="difference")
            fig["diffs"].append({"file": f"images/{file}", "caption": "difference to the "
                                 "reference's stored values"})
        others = [m for m in order if m not in same]
        if others:
            fig["note"] = ("not drawn with the others (other shape): "
                           + ", ".join(names[m] for m in others) + "; see report.json")
        return fig
    sizes = {m: [len(r["labels"][a]) for a in r["axes"]] for m, r in results.items()}
    if any(len(sz) != 2 or max(sz) > MAX_DRAWN for sz in sizes.values()):
        shown = " x ".join(map(str, sizes[order[0]]))
        fig["note"] = f"not drawn ({shown}): see report.json"
        return fig
    arrays = {m: _array(r) for m, r in results.items()}
    ref_arrays = {k: _array(r["result"]) for k, r in refs.items()
                  if len(r["result"]["axes"]) == 2
                  and max(len(v) for v in r["result"]["labels"].values()) <= MAX_DRAWN}
    lim = _lim([*arrays.values(), *ref_arrays.values()])
    for key, ref in refs.items():
        if key in ref_arrays:
            file = name_for("reference", ref.get("model") or "")
            _grid(ref_arrays[key], ref["result"], _ref_label(ref, names), lim, images / file)
            fig["images"].append({"file": f"images/{file}", "caption": _ref_label(ref, names),
                                  "reference": True})
    diffs = {}
    drawn = order
    if len(order) > MAX_PANELS:  # a long training sequence: a few, evenly spaced
        picks = sorted({round(i * (len(order) - 1) / (MAX_PANELS - 1)) for i in range(MAX_PANELS)})
        drawn = [order[i] for i in picks]
        fig["note"] = (f"{len(drawn)} of {len(order)} checkpoints drawn, evenly spaced; every "
                       "value is in report.json")
    for m in drawn:
        file = name_for(m)
        _grid(arrays[m], results[m], names[m], lim, images / file)
        fig["images"].append({"file": f"images/{file}", "caption": names[m], "model": m})
        ref = by_model[m].get("reference")
        if ref and ref["file"] in ref_arrays and _same_shape(ref["result"], results[m]):
            diffs[m] = (arrays[m] - ref_arrays[ref["file"]], ref)
    dlim = _lim(d for d, _ in diffs.values())
    for m, (diff, _ref) in diffs.items():
        file = name_for(m, "diff")
        caption = f"{names[m]} − reference"
        _grid(diff, results[m], caption, dlim, images / file)
        fig["diffs"].append({"file": f"images/{file}", "caption": caption, "model": m})
    return fig


def step_series(claim: dict[str, Any], data: dict[str, Any]) -> dict[tuple[str, int],
                                                                      dict[str, Any]]:
    """Each measurement (not sanity checks) of the claim across the checkpoints with steps, in
    step order:
    ``{(test, i): {what, threshold, op, points: [(step, value, held, model)]}}``."""
    at = steps(data)
    series: dict[tuple[str, int], dict[str, Any]] = {}
    for m in sorted(at, key=lambda m: at[m]):
        cell = claim["cells"].get(m)
        for test in cell["tests"] if cell else []:
            for i, meas in enumerate(test.get("measurements") or []):
                if meas.get("kind") == "sanity":
                    continue  # checks that hold by construction are no finding to follow
                v = variant(test, m)
                key = (func_of(test) + (f"[{v}]" if v else ""), i)
                s = series.setdefault(key, {"what": meas.get("what", ""), "points": [],
                                            "threshold": meas.get("threshold"),
                                            "op": meas.get("op", "")})
                s["points"].append((at[m], _num(meas.get("value")), bool(meas.get("held")), m))
    return series


def step_table(claim: dict[str, Any], data: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The claim against training step as a table: step, loss, outcome, each measurement."""
    at = steps(data)
    info = data.get("checkpoints") or {}
    series = [(k, s) for k, s in step_series(claim, data).items() if len(s["points"]) >= 2]
    if len(at) < 2 or not series:
        return [], []
    head = ["step", "loss", "outcome"]
    for (test, _i), s in series:
        what = SET_RE.match(s["what"])["what"] if _is_set(s) else s["what"]
        need = f"{OP_SIGN.get(s['op'], s['op'])} {fmt(s['threshold'])}"
        head.append(_clip(f"{what or test} ({need})", 60))
    rows = []
    for m in sorted(at, key=lambda m: at[m]):
        cell = claim["cells"].get(m)
        if not cell:
            continue
        row = [fmt(at[m]), fmt((info.get(m) or {}).get("loss", math.nan)),
               GLYPH.get(worst(cell["tests"]), "?")]
        for _key, s in series:
            got = [p for p in s["points"] if p[3] == m]
            row.append(f"{fmt(got[0][1])}{'' if got[0][2] else ' ✗'}" if got else "")
        rows.append(row)
    return head, rows


def checkpoint_rows(data: dict[str, Any]) -> list[list[str]]:
    """The checkpoints table: name, step, loss, weight sha256 (12 hex digits), path."""
    info = data.get("checkpoints") or {}
    names = short_names(data["models"])
    return [[names[m], fmt(c["step"]) if "step" in c else "", fmt(c["loss"]) if "loss" in c
             else "", str(c.get("sha256", ""))[:12], m]
            for m in data["models"] if (c := info.get(m))]


def _draw_steps(claim: dict[str, Any], data: dict[str, Any], names: dict[str, str],
                images: Path, used: set[str]) -> list[dict[str, Any]]:
    """Training sequences: each measurement of the claim against the checkpoints' step."""
    import matplotlib.pyplot as plt

    at = steps(data)
    info = data.get("checkpoints") or {}
    order = sorted(at, key=lambda m: at[m])
    series = step_series(claim, data)
    out = []
    for (test_key, i), s in series.items():
        if len(s["points"]) < 2:
            continue
        xs, ys, ok, _ = zip(*s["points"])
        what = SET_RE.match(s["what"])["what"] if _is_set(s) else s["what"]
        fig, ax = plt.subplots(figsize=(5.0, 2.9), layout="tight")
        ax.plot(xs, ys, color="#1f77b4", linewidth=1.4, label="measured")
        ax.scatter(xs, ys, c=["#2ca02c" if k else "#d62728" for k in ok], s=18, zorder=3)
        if math.isfinite(_num(s["threshold"])):
            ax.axhline(_num(s["threshold"]), color="#555", linestyle="--", linewidth=1,
                       label=f"needs {OP_SIGN.get(s['op'], s['op'])} {fmt(s['threshold'])}")
        losses = [(at[m], _num((info.get(m) or {}).get("loss"))) for m in order]
        losses = [(x, y) for x, y in losses if math.isfinite(y)]
        if len(losses) >= 2:
            twin = ax.twinx()
            lx, ly = zip(*losses)
            kinds = [str((info.get(m) or {}).get("loss_kind", "")) for m in order]
            label = kinds[0].split(",")[0] if kinds[0] and len(set(kinds)) == 1 \
                else "training loss"
            twin.plot(lx, ly, color="#aaa", linewidth=1, label=label)
            twin.set_ylabel(label, fontsize=8, color="#777")
            twin.tick_params(labelsize=7, colors="#777")
        ax.set_xlabel("training step", fontsize=9)
        ax.set_ylabel("value", fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.25)
        ax.set_title(_clip(f"{what} ({test_key})", 70), fontsize=9)
        ax.legend(fontsize=7.5, frameon=False, loc="best")
        base = f"{_slug(claim['id'])}--steps--{_slug(test_key)}-{i}"[:150]
        name = base
        while name in used:
            name += "-x"
        used.add(name)
        _save(fig, images / f"{name}.png")
        out.append({"file": f"images/{name}.png", "caption": f"{what} against training step"})
    return out


def _clip(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1].rstrip() + "…"


def draw(data: dict[str, Any], images: Path) -> None:
    """Draw every claim's figures into ``images/``; each claim gets ``figures`` (file names)."""
    import matplotlib

    matplotlib.use("Agg")
    models = data["models"]
    names = short_names(models)
    used: set[str] = set()
    sequence = len(steps(data)) >= 2
    for claim in data["claims"]:
        claim["figures"] = [_draw_row(claim, title, by_model, models, names, images, used)
                            for title, by_model in _heat_rows(claim, models)]
        if sequence:
            shown = _draw_steps(claim, data, names, images, used)
            if shown:
                claim["figures"].insert(0, {"title": "against training step", "images": shown,
                                            "diffs": [], "note": ""})


# -- Markdown ------------------------------------------------------------------------------------
def _md(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _mutation(data: dict[str, Any], claim_id: str) -> dict[str, Any] | None:
    got = (data.get("mutation") or {}).get(claim_id)
    return got if isinstance(got, dict) and got.get("verdict") else None


def _headline(data: dict[str, Any]) -> str:
    s = data.get("settings") or {}
    date = str(s.get("date", "")).replace("T", " ")
    return f"mechtests report{': ' + date if date else ''}"


def _summary_line(data: dict[str, Any]) -> str:
    claims = data["claims"]
    n_checked = sum(checked(c) for c in claims)
    counts = {}
    for claim in claims:
        for cell in claim["cells"].values():
            o = worst(cell["tests"])
            counts[o] = counts.get(o, 0) + 1
    said = ", ".join(f"{counts[o]} {WORDS[o]}" for o in ORDER if counts.get(o))
    return (f"{len(claims)} claims ({n_checked} checked here) x {len(data['models'])} "
            f"checkpoints: {said}.")


LEGEND = ("✓ held · ↷ held on other components (moved) · ✗ failed · ⚠ error (a bug, not a "
          "finding) · ? inconclusive (effect too small to judge) · – skipped · ⊘ expected "
          "failure · ! passed unexpectedly")


def render_md(data: dict[str, Any]) -> str:
    """The summary as Markdown: the matrix as a table, then why, skips, settings, details."""
    models = data["models"]
    names = short_names(models)
    at = steps(data)
    out = [f"# {_headline(data)}", "", _summary_line(data), ""]
    out += [f"> **Warning:** {_md(w)}" for w in data.get("warnings") or []]
    out += ["", LEGEND, ""] if data.get("warnings") else [LEGEND, ""]
    head = []
    for m in models:
        label = names[m] + (f" (step {fmt(at[m])})" if m in at else "")
        head.append(f"{_md(label)} · {tally_text(tally(data, m))}")
    out.append("| claim | " + " | ".join(head) + " |")
    out.append("|---" * (len(models) + 1) + "|")
    for claim in data["claims"]:
        if not checked(claim):
            continue
        cells = []
        for m in models:
            cell = claim["cells"].get(m)
            if not cell:
                cells.append("")
                continue
            number, need = cell_key(cell)
            text = GLYPH.get(worst(cell["tests"]), "?")
            text += f" {number}" if number else ""
            text += f" ({need})" if need and need != "found" else (" found" if need else "")
            cells.append(_md(text))
        mut = _mutation(data, claim["id"])
        label = f"[{claim['id']}](#{_gh_anchor(claim['id'])})" + (
            f" · _{mut['verdict']}_" if mut else "")
        out.append(f"| {_md(label)} | " + " | ".join(cells) + " |")
    problems = not_held(data)
    if problems:
        out += ["", "## Why", ""]
        for claim_id, _, model, test in problems:
            glyph = GLYPH.get(test.get("outcome", ""), "?")
            out.append(f"- {glyph} **{_md(claim_id)}** on `{_md(names[model])}`: "
                       f"{_md(why(test))}")
    notes = skip_notes(data)
    if notes:
        out += ["", "## Skipped", ""]
        for note in notes:
            out.append(f"- {_md(_where(note, data, names))}: {_md(note['reason'])}")
    rows = checkpoint_rows(data)
    if rows:
        out += ["", "## Checkpoints", "", "| checkpoint | step | loss | weights sha256 | path |",
                "|---|---|---|---|---|"]
        out += ["| " + " | ".join(_md(c) for c in row) + " |" for row in rows]
    out += ["", "## Settings", ""]
    for key, value in (data.get("settings") or {}).items():
        out.append(f"- {key}: `{_setting(value)}`")
    for claim in data["claims"]:
        if not checked(claim):
            continue
        out += ["", f"## {claim['id']}", ""]
        if claim.get("source"):
            out += [f"Source: {claim['source']}", ""]
        mut = _mutation(data, claim["id"])
        if mut:
            out += [f"Mutation testing: **{mut['verdict']}**", ""]
        head, rows = step_table(claim, data)
        if rows:
            out += ["**Against training step**", "", "| " + " | ".join(map(_md, head)) + " |",
                    "|---" * len(head) + "|"]
            out += ["| " + " | ".join(map(_md, row)) + " |" for row in rows] + [""]
        for m in models:
            for t in (claim["cells"].get(m) or {"tests": []})["tests"]:
                v = variant(t, m)
                out.append(f"- {GLYPH.get(t.get('outcome', ''), '?')} `{_md(names[m])}`"
                           + (f" {_md(v)}" if v else "") + f": {_md(test_text(t))}")
        for fig in claim.get("figures", []):
            shown = " ".join(f"![{_md(i['caption'])}]({i['file']})"
                             for i in fig["images"] + fig["diffs"])
            out += ["", f"**{_md(fig['title'])}**" + (f": {_md(fig['note'])}"
                                                      if fig.get("note") else ""), ""]
            if shown:
                out.append(shown)
    return "\n".join(out) + "\n"


def _gh_anchor(heading: str) -> str:
    """The anchor GitHub (and most Markdown viewers) give a ``## heading``."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def _where(note: dict[str, Any], data: dict[str, Any], names: dict[str, str]) -> str:
    """``bigram.table on all 3 checkpoints`` / ``7 claims on multitask-seed1``."""
    claims, models = note["claims"], note["models"]
    every = [c["id"] for c in data["claims"]]
    what = (f"all {len(claims)} claims" if len(claims) == len(every) and len(claims) > 1
            else ", ".join(claims))
    if len(models) == len(data["models"]) and len(models) > 1:
        on = f"all {len(models)} checkpoints"
    else:
        on = ", ".join(names[m] for m in models)
    return f"{what} on {on}"


# -- HTML ----------------------------------------------------------------------------------------
CSS = """
*{box-sizing:border-box}
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:14px 22px;color:#1d1d1f;
 max-width:1600px}
h1{font-size:20px;margin:0 0 2px}h2{font-size:17px;margin:22px 0 6px}
h3{font-size:15px;margin:26px 0 4px;padding-top:8px;border-top:1px solid #ddd}
.sub{color:#555;margin:0 0 8px}.sub code{font-size:12px}
.legend{font-size:12.5px;color:#444;margin:4px 0 6px}
.legend span{margin-right:12px;white-space:nowrap}
table{border-collapse:collapse}
table.matrix{width:100%;table-layout:fixed}
.matrix th,.matrix td{padding:3px 8px;border-bottom:1px solid #e4e4e4;text-align:left;
 vertical-align:top;overflow-wrap:anywhere}
.matrix thead th{border-bottom:2px solid #bbb;font-weight:600;vertical-align:bottom}
.matrix th.claim{width:27%}.matrix td.claim{font-weight:500}
.matrix .tally{display:block;font-weight:400;font-size:12.5px;color:#444}
.matrix .tally>span{margin-right:8px}.matrix .tally .g{width:auto;margin-left:1px}
.matrix .step{font-weight:400;color:#666;font-size:12px}
.matrix a{color:inherit;text-decoration:none}.matrix a:hover{text-decoration:underline}
td.c{white-space:normal;font-variant-numeric:tabular-nums}
td.held{background:#e5f4e3}td.moved{background:#dcefff}td.failed{background:#fbd9d7}
td.error{background:#ffe3b8}td.inconclusive{background:#ece6f5}td.skipped{color:#999}
td.xfailed{background:#f2f2f2;color:#666}td.xpassed{background:#fff2c2}
.g{display:inline-block;width:1.2em;font-weight:700}
.held .g{color:#1b7a1b}.moved .g{color:#0b5fa5}.failed .g{color:#c0211a}
.error .g{color:#b35c00}.inconclusive .g{color:#6b4b9a}.skipped .g{color:#aaa}
.xpassed .g{color:#8a6d00}.xfailed .g{color:#777}
.need{color:#555;font-size:12px;margin-left:4px}
details summary{cursor:pointer;list-style:none}
details summary::-webkit-details-marker{display:none}
details[open] summary{margin-bottom:3px}
.more{font-size:12.5px;color:#333;background:#fff;border:1px solid #ddd;border-radius:4px;
 padding:4px 6px;margin:2px 0}
.more div{margin:2px 0}
.mut{display:inline-block;font-size:11.5px;font-weight:500;border-radius:9px;padding:0 7px;
 margin-left:6px;border:1px solid}
.mut.good{color:#1b6e1b;border-color:#8cc98c;background:#f0faf0}
.mut.warn{color:#8a4b00;border-color:#e7b56f;background:#fff6e8}
ul.why{list-style:none;padding:0;margin:4px 0}
ul.why li{margin:2px 0;padding-left:1.6em;text-indent:-1.6em;overflow-wrap:anywhere}
ul.why li .g{text-indent:0}
ul.why code,ul.skips code{font-size:12.5px;background:#f3f3f3;padding:0 3px;border-radius:3px}
ul.skips{margin:4px 0;padding-left:1.2em;color:#444;font-size:13px}
ul.skips li{margin:2px 0;overflow-wrap:anywhere}
ul.tests{list-style:none;padding:0;margin:4px 0;font-size:13px}
ul.tests li{margin:1px 0;padding-left:1.6em;text-indent:-1.6em;overflow-wrap:anywhere}
ul.tests li>*{text-indent:0}
.figs{display:flex;flex-wrap:wrap;gap:8px 14px;align-items:flex-start;margin:6px 0}
.col{display:flex;flex-direction:column;gap:6px;max-width:100%}
figure{margin:0;max-width:100%}figure img{max-width:100%;height:auto;display:block}
figcaption{font-size:12px;color:#555}
.figtitle{font-weight:600;font-size:13px;margin:12px 0 0}
.note{color:#666;font-size:12.5px}
table.settings{font-size:12.5px;table-layout:fixed;width:100%}
.settings th,.settings td{border-bottom:1px solid #eee;padding:2px 8px;text-align:left;
 vertical-align:top;overflow-wrap:anywhere}.settings th{width:12em}
table.mutation{font-size:12.5px;margin:4px 0;max-width:100%}
.mutation th,.mutation td{border:1px solid #ddd;padding:2px 6px;overflow-wrap:anywhere}
p.warn{background:#fff2c2;border:1px solid #e7c35a;border-radius:4px;padding:4px 8px}
table.ckpts th{width:auto}
"""


def _glyph(outcome: str) -> str:
    return f"<span class='g'>{GLYPH.get(outcome, '?')}</span>"


def _mut_badge(mut: dict[str, Any] | None) -> str:
    if not mut:
        return ""
    verdict = str(mut["verdict"])
    cls = "good" if verdict.lower().startswith("discriminating") else "warn"
    return (f"<span class='mut {cls}' title='mutation testing: {html.escape(verdict)}'>"
            f"{html.escape(verdict)}</span>")


def _mut_table(matrix: Any) -> str:
    """The kill matrix, whatever its exact shape: rows of dicts as a table, else a list."""
    e = html.escape
    if isinstance(matrix, dict) and matrix and all(isinstance(v, dict) for v in matrix.values()):
        cols = list(dict.fromkeys(k for v in matrix.values() for k in v))
        out = ["<table class='mutation'><tr><th>mutant</th>"
               + "".join(f"<th>{e(str(c))}</th>" for c in cols) + "</tr>"]
        for row, v in matrix.items():
            out.append(f"<tr><th>{e(str(row))}</th>"
                       + "".join(f"<td>{e(_cellval(v.get(c, '')))}</td>" for c in cols)
                       + "</tr>")
        return "".join(out) + "</table>"
    if isinstance(matrix, dict) and matrix:
        return ("<table class='mutation'>" + "".join(
            f"<tr><th>{e(str(k))}</th><td>{e(_cellval(v))}</td></tr>" for k, v in matrix.items())
            + "</table>")
    if matrix:
        return f"<div class='note'>{e(str(matrix))}</div>"
    return ""


def _cellval(v: Any) -> str:
    if isinstance(v, bool):
        return "killed" if v else "survived"
    if isinstance(v, float):
        return fmt(v)
    return str(v)


def _img(images: Path, item: dict[str, Any]) -> str:
    e = html.escape
    png = (images.parent / item["file"]).read_bytes()
    b64 = base64.b64encode(png).decode()
    return (f"<figure><img alt='{e(item['caption'])}' src='data:image/png;base64,{b64}'>"
            f"</figure>")


def render_html(data: dict[str, Any], images: Path) -> str:
    """One self-contained page (images inlined, no script): matrix first, details below."""
    e = html.escape
    models = data["models"]
    names = short_names(models)
    at = steps(data)
    s = data.get("settings") or {}
    out = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'>"
           f"<meta name='viewport' content='width=device-width, initial-scale=1'>"
           f"<title>{e(_headline(data))}</title><style>{CSS}</style></head><body>",
           f"<h1>{e(_headline(data))}</h1>",
           f"<p class='sub'>{e(_summary_line(data))}"
           + (f" <code>{e(str(s['command']))}</code>" if s.get("command") else "") + "</p>",
           "<div class='legend'>" + "".join(
               f"<span class='{o}'>{_glyph(o)}{e(WORDS[o])}</span>"
               for o in ("held", "moved", "failed", "error", "inconclusive", "skipped",
                         "xfailed", "xpassed"))
           + "<span>click a cell for its measurements</span></div>"]
    out += [f"<p class='warn'><b>Warning:</b> {e(w)}</p>" for w in data.get("warnings") or []]
    # the matrix
    out.append("<table class='matrix'><thead><tr><th class='claim'>claim</th>")
    for m in models:
        step = f" <span class='step'>step {e(fmt(at[m]))}</span>" if m in at else ""
        counts = "".join(f"<span class='{e(o)}' title='{n} {e(WORDS.get(o, o))}'>{n}"
                         f"<span class='g'>{GLYPH.get(o, '?')}</span></span>"
                         for o, n in tally(data, m).items())
        out.append(f"<th title='{e(m)}'>{e(names[m])}{step}"
                   f"<span class='tally'>{counts}</span></th>")
    out.append("</tr></thead><tbody>")
    for claim in data["claims"]:
        if not checked(claim):
            continue
        cid = claim["id"]
        out.append(f"<tr><td class='claim'><a href='#{e(_slug(cid))}'>{e(cid)}</a>"
                   f"{_mut_badge(_mutation(data, cid))}</td>")
        for m in models:
            cell = claim["cells"].get(m)
            if not cell:
                out.append("<td class='c'></td>")
                continue
            o = worst(cell["tests"])
            number, need = cell_key(cell)
            full = " | ".join(
                (f"{variant(t, m)}: " if variant(t, m) else "") + test_text(t)
                for t in cell["tests"])
            summary = _glyph(o) + (f"<b>{e(number)}</b>" if number else "") + (
                f"<span class='need'>{e(need)}</span>" if need and len(models) <= 6 else "")
            more = "".join(
                f"<div>{_glyph(t.get('outcome', ''))}"
                + (f"<b>{e(variant(t, m))}</b> " if variant(t, m) else "")
                + f"{e(test_text(t))}</div>" for t in cell["tests"])
            out.append(f"<td class='c {e(o)}' title='{e(full)}'><details><summary>{summary}"
                       f"</summary><div class='more'>{more}</div></details></td>")
        out.append("</tr>")
    out.append("</tbody></table>")
    # why
    problems = not_held(data)
    if problems:
        out.append("<h2>Why</h2><ul class='why'>")
        for claim_id, _, model, test in problems:
            o = test.get("outcome", "")
            out.append(f"<li class='{e(o)}'>{_glyph(o)}<a href='#{e(_slug(claim_id))}'>"
                       f"<b>{e(claim_id)}</b></a> on <code>{e(names[model])}</code>: "
                       f"{e(why(test))}</li>")
        out.append("</ul>")
    notes = skip_notes(data)
    if notes:
        out.append("<h2>Skipped</h2><ul class='skips'>")
        for note in notes:
            out.append(f"<li><b>{e(_where(note, data, names))}</b>: {e(note['reason'])}</li>")
        out.append("</ul>")
    # each claim
    for claim in data["claims"]:
        if not checked(claim):
            continue
        cid = claim["id"]
        out.append(f"<h3 id='{e(_slug(cid))}'>{e(cid)}{_mut_badge(_mutation(data, cid))}</h3>")
        if claim.get("source"):
            out.append(f"<div class='note'>{e(claim['source'])}</div>")
        out.append("<ul class='tests'>")
        for m in models:
            for t in (claim["cells"].get(m) or {"tests": []})["tests"]:
                v = variant(t, m)
                o = t.get("outcome", "")
                out.append(f"<li class='{e(o)}'>{_glyph(o)}<code>{e(names[m])}</code>"
                           + (f" <b>{e(v)}</b>" if v else "")
                           + f": {e(test_text(t, outcome=o not in GLYPH))}</li>")
        out.append("</ul>")
        head, rows = step_table(claim, data)
        if rows:
            out.append("<details><summary class='note'>against training step (table)</summary>"
                       "<table class='mutation'><tr>" + "".join(f"<th>{e(h)}</th>" for h in head)
                       + "</tr>" + "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row)
                                           + "</tr>" for row in rows) + "</table></details>")
        mut = _mutation(data, cid)
        if mut and mut.get("matrix"):
            out.append(f"<details><summary class='note'>mutation testing: {e(mut['verdict'])} "
                       f"(kill matrix)</summary>{_mut_table(mut['matrix'])}</details>")
        for fig in claim.get("figures", []):
            out.append(f"<div class='figtitle'>{e(fig['title'])}</div>")
            if fig.get("note"):
                out.append(f"<div class='note'>{e(fig['note'])}</div>")
            # each checkpoint a column: its values, its difference to the reference below
            paired = {d["model"]: d for d in fig["diffs"] if d.get("model")}
            cols = []
            for item in fig["images"]:
                diff = paired.pop(item.get("model"), None) if item.get("model") else None
                cols.append("<div class='col'>" + _img(images, item)
                            + (_img(images, diff) if diff else "") + "</div>")
            cols += [f"<div class='col'>{_img(images, d)}</div>" for d in fig["diffs"]
                     if not d.get("model") or d["model"] in paired]
            if cols:
                out.append("<div class='figs'>" + "".join(cols) + "</div>")
    rows = checkpoint_rows(data)
    if rows:
        out.append("<h2>Checkpoints</h2><table class='settings ckpts'><tr><th>checkpoint</th>"
                   "<th>step</th><th>loss</th><th>weights sha256</th><th>path</th></tr>")
        info = data.get("checkpoints") or {}
        for row, m in zip(rows, [m for m in models if m in info]):
            full = str(info[m].get("sha256", ""))
            out.append(f"<tr><td>{e(row[0])}</td><td>{e(row[1])}</td><td>{e(row[2])}</td>"
                       f"<td><code title='{e(full)}'>{e(row[3])}</code></td>"
                       f"<td><code>{e(row[4])}</code></td></tr>")
        out.append("</table>")
    out.append("<h2>Settings</h2><table class='settings'>")
    for key, value in s.items():
        out.append(f"<tr><th>{e(str(key))}</th><td><code>{e(_setting(value))}</code></td></tr>")
    out.append("</table></body></html>")
    return "\n".join(out)


def rerender(report_json: Path, out: Path) -> Path:
    """Draw and write a report again from its ``report.json`` into the new directory ``out``
    (after a renderer change, say). Refuses an existing ``out``: nothing is overwritten."""
    import json

    data = json.loads(Path(report_json).read_text(encoding="utf-8"))
    out = Path(out)
    out.mkdir(parents=True)
    (out / "images").mkdir()
    draw(data, out / "images")
    (out / "report.md").write_text(render_md(data), encoding="utf-8")
    (out / "report.html").write_text(render_html(data, out / "images"), encoding="utf-8")
    (out / "report.json").write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    return out


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 3:
        sys.exit("usage: python -m mechtests.suite.render REPORT.json NEW_DIR")
    print(rerender(Path(sys.argv[1]), Path(sys.argv[2])) / "report.html")
