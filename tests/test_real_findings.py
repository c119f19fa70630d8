"""The committed findings of the real models (``fixtures/real/smollm2``, ``.../gemma3-270m``,
written by ``python -m mechtests.real_findings NAME --out DIR``): FINDINGS.md is exactly the
rendering of findings.json, and the numbers the README quotes from it are the ones there."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mechtests import real_findings as R
from mechtests.core.real_models import REAL_MODELS

REAL = Path(__file__).resolve().parent.parent / "fixtures" / "real"
DIR = REAL / "smollm2"


@pytest.mark.parametrize("name", ["smollm2", "gemma3-270m"])
def test_findings_md_is_the_rendering_of_findings_json(name):
    f = json.loads((REAL / name / "findings.json").read_text())
    assert set(f) == set(R.EXPERIMENTS)
    text = R.render(name, REAL_MODELS[name].about, f) + "\n"
    assert (REAL / name / "FINDINGS.md").read_text() == text


def test_the_recall_answer_moves_from_the_surname_to_the_last_position_at_layer_24():
    g = json.loads((DIR / "findings.json").read_text())["recall"]["surname (Jones -> Smith)"]
    surname, last = g["cols"].index(next(c for c in g["cols"] if "Jones" in c)), -1
    rows = g["values"]
    assert min(r[surname] for r in rows[:24]) > 0.9 and rows[24][surname] < 0.1
    assert rows[24][last] > 0.8 and max(abs(r[last]) for r in rows[:20]) < 0.1
