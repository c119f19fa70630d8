"""A claim earns its place by failing when the mechanism is broken.

Each organism claim file is run (as a user would, ``pytest claims/... --model DIR``) against
copies of the organism whose mechanism has been knocked out: all weights re-initialised, or the
mechanism's heads' output weights zeroed. The claims must fail there.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mechtests.models import ORGANISMS

pytest_plugins = ["pytester"]
ROOT = Path(__file__).resolve().parent.parent
FILES = ("config.json", "tokenizer.json", "tokenizer_config.json")


def random_copy(organism: str, out: Path, seed: int = 1234) -> Path:
    """The organism's architecture and tokenizer with freshly initialised weights."""
    from transformers import GPT2Config, GPT2LMHeadModel

    src = ORGANISMS / organism
    out.mkdir(parents=True)
    torch.manual_seed(seed)
    GPT2LMHeadModel(GPT2Config.from_pretrained(src)).save_pretrained(out)
    for f in FILES[1:]:
        shutil.copy(src / f, out / f)
    return out


def zero_heads(organism: str, heads: list[str], out: Path) -> Path:
    """A copy of the organism with the listed heads' output weights (W_O rows) zeroed."""
    src = ORGANISMS / organism
    shutil.copytree(src, out)
    state = load_file(str(src / "model.safetensors"))
    cfg = __import__("json").loads((src / "config.json").read_text())
    d_head = cfg["n_embd"] // cfg["n_head"]
    for head in heads:
        layer, h = (int(x) for x in head.split("."))
        w = state[f"transformer.h.{layer}.attn.c_proj.weight"]  # Conv1D: [in = heads*d_head, out]
        w[h * d_head:(h + 1) * d_head] = 0
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def run_claims(pytester: pytest.Pytester, claim_file: str, model: Path, *args: str):
    return pytester.runpytest(str(ROOT / "claims" / claim_file), "--model", str(model),
                              "--no-report", "-p", "no:cacheprovider", "-q", *args)


def outcomes(res) -> dict[str, int]:
    return {k: v for k, v in res.parseoutcomes().items() if k in ("passed", "failed", "error")}


@pytest.mark.parametrize("organism,claim_file", [("bigram", "test_bigram.py"),
                                                 ("induction", "test_induction.py")])
def test_claims_fail_on_a_randomly_initialised_organism(pytester, tmp_path, organism,
                                                        claim_file):
    res = run_claims(pytester, claim_file, random_copy(organism, tmp_path / "random"))
    got = outcomes(res)
    assert got.get("failed", 0) >= 1 and not got.get("passed") and not got.get("error"), got


def test_induction_knockout_claim_fails_when_the_heads_are_gone(pytester, tmp_path):
    from claims.test_induction import REFS

    broken = zero_heads("induction", list(REFS["induction"].induction_heads), tmp_path / "zero")
    res = run_claims(pytester, "test_induction.py", broken, "-k", "knocking")
    assert outcomes(res) == {"failed": 1}, res.stdout.str()[-2000:]


MULTITASK_CLAIMS = ("test_ioi.py", "test_resid_patching.py", "test_contraction.py",
                    "test_logit_lens.py", "test_gender.py", "test_token_attribution.py")


@pytest.mark.parametrize("claim_file", MULTITASK_CLAIMS)
def test_multitask_claims_fail_on_a_randomly_initialised_copy(pytester, tmp_path, claim_file):
    res = run_claims(pytester, claim_file, random_copy("multitask", tmp_path / "random"))
    got = outcomes(res)
    assert got.get("failed", 0) >= 1 and not got.get("passed") and not got.get("error"), got


@pytest.mark.parametrize("claim_file,heads,expect", [
    # the name movers' outputs gone: they no longer attribute, and knocking them out costs 0
    ("test_ioi.py", ["3.3", "1.1"], {"passed": 2, "failed": 4}),
    # the contraction mover's output gone
    ("test_contraction.py", ["0.3"], {"passed": 1, "failed": 2}),
])
def test_multitask_claims_fail_when_the_mechanism_heads_are_zeroed(pytester, tmp_path,
                                                                   claim_file, heads, expect):
    res = run_claims(pytester, claim_file, zero_heads("multitask", heads, tmp_path / "zero"))
    assert outcomes(res) == expect, res.stdout.str()[-3000:]


def test_gpt2_claims_run_end_to_end_and_fail_on_a_random_gpt2_shaped_model(pytester, tmp_path):
    """GPT-2's weights are not here, but every GPT-2 claim's code runs on a model of its shape
    (random weights, a tokenizer that splits like GPT-2's): nothing errors, and nothing holds."""
    from mechtests.testing import save_gpt2_shaped_checkpoint

    model = save_gpt2_shaped_checkpoint(tmp_path / "gpt2_shaped")
    res = pytester.runpytest(str(ROOT / "claims"), "--model", str(model), "--no-report",
                             "-p", "no:cacheprovider", "-q")
    got = outcomes(res)
    assert got.get("failed", 0) >= 20 and not got.get("passed") and not got.get("error"), got
