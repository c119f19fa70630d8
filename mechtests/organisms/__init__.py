"""Model organisms: small GPT-2s trained on synthetic languages where known mechanisms must form.

``bigram`` (0 layers: its W_E W_U is the bigram table), ``induction`` (2 layers: previous-token
and induction heads) and ``multitask`` (4 layers: IOI, name recall, contractions, gendered
pronouns, induction), ``skip-trigram`` (1 attention-only layer: skip-trigrams "A ... B -> C",
``mechtests.organisms.skip_trigram``) and ``prose`` (2 attention-only layers trained on English
prose from Debian's dict-gcide: a previous-token head feeding induction heads,
``mechtests.organisms.prose``) and ``ioi`` (4 layers trained on IOI sentences over 506 GPT-2
single-token names, GPT-2's tokens, ``mechtests.organisms.ioi``). Checkpoints ship in
``fixtures/organisms/<name>/`` with ``FINDINGS.md`` and ``findings.json``;
``python -m mechtests.organisms.train`` rebuilds the first three byte for byte and
``python -m mechtests.organisms.analysis`` re-measures their findings; the last three have their
own ``train`` and ``findings`` commands.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

NAMES = ("bigram", "induction", "multitask", "skip-trigram", "prose", "ioi")


def fixture_dir(name: str) -> Path:
    """Where the shipped checkpoint of organism ``name`` lives (``core.models.organism_dir``)."""
    from mechtests.core.models import organism_dir

    if name not in NAMES:
        raise ValueError(f"organism {name!r}: choose one of {', '.join(NAMES)}")
    return organism_dir(name)


def cli(prog: str, doc: str) -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """A recipe's command line, ``train --out DIR`` and ``findings --dir DIR``: (the parser,
    the ``train`` subparser for the recipe's own options)."""
    p = argparse.ArgumentParser(prog=prog, description=doc.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("--out", type=Path, required=True)
    sub.add_parser("findings").add_argument("--dir", type=Path, required=True)
    return p, t


def save_findings(d: Path, found: dict[str, Any], text: str, sort_keys: bool = True) -> str:
    """Write an organism's ``findings.json`` and ``FINDINGS.md`` (``text``) into ``d``."""
    (d / "findings.json").write_text(json.dumps(found, indent=1, sort_keys=sort_keys) + "\n")
    (d / "FINDINGS.md").write_text(text)
    return text


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
