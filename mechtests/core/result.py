"""One result type for every sweep, ablation and attribution: values over labelled axes."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


@dataclass
class Result:
    """Values over named axes (``layer``, ``pos``, ``head``, ``neuron``, ...), with tick labels.

    ``values`` is the mean over prompts, shape ``[len(labels[a]) for a in axes]``;
    ``per_prompt`` (optional) has a leading prompt axis. Labels are strings: layers and heads
    as ``"9"``, positions as ``"10 John"`` (index, then the first prompt's token).
    """

    name: str
    axes: tuple[str, ...]
    labels: dict[str, list[str]]
    values: torch.Tensor
    per_prompt: torch.Tensor | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.axes = tuple(self.axes)
        self.values = self.values.detach().float().cpu()
        if self.per_prompt is not None:
            self.per_prompt = self.per_prompt.detach().float().cpu()
        shape = tuple(len(self.labels[a]) for a in self.axes)
        if tuple(self.values.shape) != shape:
            raise ValueError(
                f"Result {self.name!r}: values have shape {tuple(self.values.shape)} but the axes "
                f"{self.axes} have {shape} labels"
            )
        if self.per_prompt is not None and tuple(self.per_prompt.shape[1:]) != shape:
            raise ValueError(
                f"Result {self.name!r}: per_prompt has shape {tuple(self.per_prompt.shape)}, "
                f"expected (n_prompts, *{shape})"
            )

    # -- reading -------------------------------------------------------------------------------
    def _meta(self, key: str, what: str) -> Any:
        if key not in self.meta:
            raise AttributeError(f"Result {self.name!r} has no {key!r}: {what} come with "
                                 f"patching, ablation and attribution results that measure it")
        return self.meta[key]

    @property
    def clean(self) -> float:
        """The unpatched clean run's mean metric (patching, ablation)."""
        return float(self._meta("clean", "clean metrics"))

    @property
    def corrupted(self) -> float:
        """The corrupted run's mean metric (patching)."""
        return float(self._meta("corrupted", "corrupted metrics"))

    @property
    def clean_per_prompt(self) -> torch.Tensor:
        """The clean run's metric per prompt, ``[n_prompts]``."""
        return torch.tensor(self._meta("clean_per_prompt", "per-prompt clean metrics"))

    @property
    def corrupted_per_prompt(self) -> torch.Tensor:
        """The corrupted run's metric per prompt, ``[n_prompts]``."""
        return torch.tensor(self._meta("corrupted_per_prompt", "per-prompt corrupted metrics"))

    @property
    def slope(self) -> float:
        """Least-squares slope of the mean metric against the swept axis (steering)."""
        return float(self._meta("slope", "slopes"))

    @property
    def r2(self) -> float:
        """r^2 of that least-squares line (steering)."""
        return float(self._meta("r2", "fits"))

    def restored(self) -> Result:
        """``normalized(clean, corrupted)``: 0 = the corrupted run, 1 = the clean run."""
        return self.normalized(self.clean, self.corrupted)

    def index(self, **where: int | str) -> tuple[int, ...]:
        """Index tuple for labelled coordinates, e.g. ``index(layer=9, head=9)``."""
        idx = []
        for axis in self.axes:
            if axis not in where:
                raise KeyError(f"Result {self.name!r}: give a value for axis {axis!r}")
            want = where[axis]
            labels = self.labels[axis]
            if isinstance(want, int) and not isinstance(want, bool):
                keys = [lab.split(" ", 1)[0] for lab in labels]
                want = str(want)
            else:
                keys = labels
            if want not in keys:
                raise KeyError(f"Result {self.name!r}: {axis}={want!r} not in {labels}")
            idx.append(keys.index(want))
        return tuple(idx)

    def at(self, **where: int | str) -> float:
        """The mean value at labelled coordinates, e.g. ``at(layer=9, head=9)``."""
        return float(self.values[self.index(**where)])

    def top_k(self, k: int = 5, largest: bool = True) -> list[tuple[str, float]]:
        """The k largest (or smallest) cells as ``("9.9", value)``: labels joined with '.'."""
        flat = self.values.flatten()
        k = min(k, flat.numel())
        vals, idx = flat.topk(k, largest=largest)
        out = []
        for v, i in zip(vals.tolist(), idx.tolist()):
            coords = torch.unravel_index(torch.tensor(i), tuple(self.values.shape))
            names = [self.labels[a][int(c)].split(" ", 1)[0] for a, c in zip(self.axes, coords)]
            out.append((".".join(names), v))
        return out

    def normalized(self, clean: float, corrupted: float) -> Result:
        """(value - corrupted) / (clean - corrupted): 0 means no restoration, 1 full."""
        denom = clean - corrupted
        if abs(denom) < 1e-9:
            raise ValueError(
                f"Result {self.name!r}: cannot normalise, clean ({clean:.4g}) and corrupted "
                f"({corrupted:.4g}) metrics are equal"
            )
        pp = None if self.per_prompt is None else (self.per_prompt - corrupted) / denom
        return Result(
            self.name + " (normalised)",
            self.axes,
            self.labels,
            (self.values - corrupted) / denom,
            pp,
            {**self.meta, "normalised": {"clean": clean, "corrupted": corrupted}},
        )

    # -- writing -------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        """Plain JSON: name, axes, labels, values (nested lists, mean over prompts), meta."""
        return {
            "name": self.name,
            "axes": list(self.axes),
            "labels": {a: list(self.labels[a]) for a in self.axes},
            "values": _round(self.values.tolist()),
            "meta": self.meta,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Result:
        return cls(
            data["name"],
            tuple(data["axes"]),
            {a: list(v) for a, v in data["labels"].items()},
            torch.tensor(data["values"], dtype=torch.float32),
            None,
            dict(data.get("meta", {})),
        )

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=1, sort_keys=True)

    def heatmap(self, path: str | Path | None = None, title: str | None = None, **kw: Any):
        """A matplotlib heatmap of a 1-D or 2-D result (diverging colours centred on 0).

        Saves a PNG when ``path`` is given; returns the figure.
        """
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        vals = self.values
        axes = self.axes
        if vals.dim() == 1:
            vals, axes = vals[None], ("", *axes)
            labels = {"": [""], **self.labels}
        elif vals.dim() == 2:
            labels = self.labels
        else:
            raise ValueError(f"Result {self.name!r}: heatmap needs 1 or 2 axes, has {self.axes}")
        lim = float(vals.abs().max()) or 1.0
        h, w = vals.shape
        fig, ax = plt.subplots(figsize=(max(4.0, 0.45 * w + 2), max(2.5, 0.35 * h + 1.5)))
        im = ax.imshow(vals.numpy(), cmap=kw.get("cmap", "RdBu"), vmin=-lim, vmax=lim,
                       aspect="auto")
        ax.set_xticks(range(w), labels[axes[1]], rotation=90 if w > 8 else 0, fontsize=7)
        ax.set_yticks(range(h), labels[axes[0]], fontsize=7)
        ax.set_xlabel(axes[1])
        ax.set_ylabel(axes[0])
        ax.set_title(title or self.name, fontsize=9)
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        if path is not None:
            fig.savefig(path, dpi=kw.get("dpi", 100))
            plt.close(fig)
        return fig


def _round(x: Any, digits: int = 6) -> Any:
    if isinstance(x, list):
        return [_round(v, digits) for v in x]
    if isinstance(x, float) and math.isfinite(x):
        return round(x, digits)
    return x
