"""The committed findings of a real model (``fixtures/real/smollm2``, written by
``python -m mechtests.real_findings smollm2 --out DIR``): FINDINGS.md is exactly the rendering of
findings.json, and the numbers the README quotes from it are the ones there."""

from __future__ import annotations

import json
from pathlib import Path

from mechtests import real_findings as R
from mechtests.core.real_models import REAL_MODELS

DIR = Path(__file__).resolve().parent.parent / "fixtures" / "real" / "smollm2"


def test_findings_md_is_the_rendering_of_findings_json():
    f = json.loads((DIR / "findings.json").read_text())
    assert set(f) == set(R.EXPERIMENTS)
    text = R.render("smollm2", REAL_MODELS["smollm2"].about, f) + "\n"
    assert (DIR / "FINDINGS.md").read_text() == text


def test_the_recall_answer_moves_from_the_surname_to_the_last_position_at_layer_24():
    g = json.loads((DIR / "findings.json").read_text())["recall"]["surname (Jones -> Smith)"]
    surname, last = g["cols"].index(next(c for c in g["cols"] if "Jones" in c)), -1
    rows = g["values"]
    assert min(r[surname] for r in rows[:24]) > 0.9 and rows[24][surname] < 0.1
    assert rows[24][last] > 0.8 and max(abs(r[last]) for r in rows[:20]) < 0.1
