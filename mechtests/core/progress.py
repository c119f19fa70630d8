"""Progress bars for long work (loading, training, large sweeps), quiet where nobody watches."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def quiet() -> bool:
    """True on CI, when stderr is not a terminal, or while pytest captures output.

    ``MECHTESTS_PROGRESS=1`` forces bars on and ``MECHTESTS_PROGRESS=0`` off.
    """
    forced = os.environ.get("MECHTESTS_PROGRESS")
    if forced in ("0", "1"):
        return forced == "0"
    if os.environ.get("CI"):
        return True
    try:  # pytest's capture replaces sys.stderr with a non-tty, so this covers it too
        return not sys.stderr.isatty()
    except (AttributeError, ValueError):  # a closed or odd stream
        return True


def progress(iterable: Iterable[T], desc: str, total: int | None = None,
             **tqdm_kwargs) -> Iterator[T]:
    """``iterable`` with a tqdm bar on stderr, or plainly when ``quiet()``."""
    if quiet():
        return iter(iterable)
    from tqdm import tqdm

    return iter(tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True,
                     **tqdm_kwargs))
