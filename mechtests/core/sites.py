"""Components, named once: a head ``9.9``, a layer's output ``attn9``/``mlp9``, a neuron
``mlp9.1234``. Parse a user's string with ``component(name)``; print a component with ``str``.

Every view and claim reads component names through here, so a label is parsed in one place and a
bad one gets one clear error.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_NAME = re.compile(r"^(?:(\d+)\.(\d+)|(attn|mlp)_?(\d+)|mlp_?(\d+)\.(\d+))$")


@dataclass(frozen=True, order=True)
class Head:
    """Attention head ``layer.head`` (TransformerLens's ``hook_z`` index); ``str`` gives ``9.9``."""

    layer: int
    head: int

    def __str__(self) -> str:
        return f"{self.layer}.{self.head}"

    @classmethod
    def parse(cls, name: str | Head) -> Head:
        c = component(name)
        if not isinstance(c, Head):
            raise ValueError(f"{name!r} is not a head: name a head as 'L.H' (e.g. '9.9')")
        return c


@dataclass(frozen=True, order=True)
class LayerOut:
    """A whole layer's attention or MLP output (``attn9``/``mlp9``)."""

    kind: str  # "attn" | "mlp"
    layer: int

    def __str__(self) -> str:
        return f"{self.kind}{self.layer}"


@dataclass(frozen=True, order=True)
class Neuron:
    """One MLP neuron (``mlp9.1234``: layer 9, neuron 1234 of ``mlp_post``)."""

    layer: int
    index: int

    def __str__(self) -> str:
        return f"mlp{self.layer}.{self.index}"


Component = Head | LayerOut | Neuron


def component(name: str | Component) -> Component:
    """``"9.9"`` -> Head(9, 9); ``"attn9"``/``"mlp9"`` -> LayerOut; ``"mlp9.1234"`` -> Neuron."""
    if isinstance(name, Head | LayerOut | Neuron):
        return name
    m = _NAME.match(str(name).strip())
    if m is None:
        raise ValueError(f"unknown component {name!r}: name a head 'L.H' (e.g. '9.9'), a layer "
                         "'attnL' or 'mlpL' (e.g. 'mlp9'), or a neuron 'mlpL.N' (e.g. "
                         "'mlp9.1234')")
    g = m.groups()
    if g[0] is not None:
        return Head(int(g[0]), int(g[1]))
    if g[2] is not None:
        return LayerOut(g[2], int(g[3]))
    return Neuron(int(g[4]), int(g[5]))


def heads(names) -> list[Head]:
    """Parse a sequence of head labels (``["9.9", "10.0"]``)."""
    return [Head.parse(n) for n in names]
