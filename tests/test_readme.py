"""The README's instructions work as written: its example claim runs (and fails when the heads
it names are broken), and the make targets and modules it tells a newcomer to run exist."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

pytest_plugins = ["pytester"]
ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def example_claim() -> str:
    """The first Python block of "Writing a claim"."""
    section = README[README.index("## Writing a claim"):]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_the_example_claim_holds_and_pins_its_heatmaps(pytester):
    pytester.makepyfile(test_my_claim=example_claim())
    args = ("-p", "no:cacheprovider", "--no-report", "-q")
    first = pytester.runpytest("test_my_claim.py", "--snapshot-update", *args)
    first.assert_outcomes(passed=2)
    snaps = sorted(p.name for p in pytester.path.glob("__heatmaps__/test_my_claim/*"))
    assert len(snaps) == 2 and all("[head_dla]" in s for s in snaps), snaps
    pytester.runpytest("test_my_claim.py", *args).assert_outcomes(passed=2)


def test_the_example_claim_fails_without_its_heads(pytester, tmp_path):
    from test_claims_break import zero_heads

    broken = zero_heads("multitask", ["3.3"], tmp_path / "zero")
    pytester.makepyfile(test_my_claim=example_claim())
    res = pytester.runpytest("test_my_claim.py", "--model", str(broken), "-p",
                             "no:cacheprovider", "--no-report", "-q")
    res.assert_outcomes(failed=2)
    assert "missing ['3.3']" in res.stdout.str()


def test_every_make_target_and_module_the_readme_names_exists():
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([a-z][\w-]*):", makefile, re.M))
    named = set(re.findall(r"`make ([a-z][\w-]*)`", README))
    named |= set(re.findall(r"^make ([a-z][\w-]*)", README, re.M))
    assert named and named <= targets, named - targets
    modules = set(re.findall(r"python -m ([\w.]+)", README)) - {"pytest", "venv"}
    assert modules, "no `python -m` command found"
    missing = {m for m in modules if importlib.util.find_spec(m) is None}
    assert not missing, missing
