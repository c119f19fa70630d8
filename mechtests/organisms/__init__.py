"""Model organisms: small GPT-2s trained on synthetic languages where known mechanisms must form.

``bigram`` (0 layers: its W_E W_U is the bigram table), ``induction`` (2 layers: previous-token
and induction heads) and ``multitask`` (4 layers: IOI, name recall, contractions, gendered
pronouns, induction), ``skip-trigram`` (1 attention-only layer: skip-trigrams "A ... B -> C",
``mechtests.organisms.skip_trigram``) and ``prose`` (2 attention-only layers trained on English
prose from Debian's dict-gcide: a previous-token head feeding induction heads,
``mechtests.organisms.prose``). Checkpoints ship in ``fixtures/organisms/<name>/`` with
``FINDINGS.md`` and ``findings.json``; ``python -m mechtests.organisms.train`` rebuilds the first
three byte for byte and ``python -m mechtests.organisms.analysis`` re-measures their findings;
the last two have their own ``train`` and ``findings`` commands.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

FIXTURES = Path(__file__).resolve().parent.parent.parent / "fixtures" / "organisms"
NAMES = ("bigram", "induction", "multitask", "skip-trigram", "prose")


def fixture_dir(name: str) -> Path:
    """Where the shipped checkpoint of organism ``name`` lives."""
    if name not in NAMES:
        raise ValueError(f"organism {name!r}: choose one of {', '.join(NAMES)}")
    return FIXTURES / name


def findings(name_or_dir: str | Path) -> dict[str, Any]:
    """The organism's ``findings.json`` (heads per role, scores, accuracies)."""
    path = Path(name_or_dir)
    if not path.is_dir():
        path = fixture_dir(str(name_or_dir))
    f = path / "findings.json"
    if not f.is_file():
        raise FileNotFoundError(
            f"{f}: no findings yet; run `python -m mechtests.organisms.analysis "
            f"{path.name} --dir {path}`"
        )
    return json.loads(f.read_text())
