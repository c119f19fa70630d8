"""The skip-trigram organism and the QK/OV circuit views its claims read.

The circuits are checked against an independent computation from the Hugging Face weights
(LayerNorms applied as GPT-2 does, no folding); the claims must fail on a randomly initialised
copy and with the heads' outputs zeroed, and ``--mutate`` must call them discriminating.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mechtests.analysis.heads import ov_circuit, qk_circuit
from mechtests.core.models import load_model, organisms_dir
from mechtests.organisms import skip_trigram as S

pytest_plugins = ["pytester"]
ROOT = Path(__file__).resolve().parent.parent
DIR = organisms_dir() / "skip-trigram"


@pytest.fixture(scope="module")
def hf_and_tl():
    from transformers import GPT2LMHeadModel

    torch.set_num_threads(1)
    return (GPT2LMHeadModel.from_pretrained(DIR, use_safetensors=True).eval(),
            load_model(str(DIR), device="cpu"))


def _hf_head_inputs(hf, ids: list[int], pos: int) -> torch.Tensor:
    t = hf.transformer
    return t.h[0].ln_1(t.wte.weight[ids] + t.wpe.weight[pos])


@torch.no_grad()
def test_qk_and_ov_circuits_match_the_unfolded_weights(hf_and_tl):
    """qk_circuit / ov_circuit read TransformerLens's folded, centred weights; recompute both
    from the raw checkpoint: ln_1, c_attn's query/key/value slices, c_proj's rows, ln_f's
    centring and gain, lm_head. OV logits agree up to a constant per row (TL centres W_U)."""
    hf, tl = hf_and_tl
    d, H = hf.config.n_embd, hf.config.n_head
    dh = d // H
    ids = list(range(tl.cfg.d_vocab))
    x = _hf_head_inputs(hf, ids, 5)
    W, b = hf.transformer.h[0].attn.c_attn.weight, hf.transformer.h[0].attn.c_attn.bias
    Wo = hf.transformer.h[0].attn.c_proj.weight
    g = hf.transformer.ln_f.weight
    for h in range(H):
        cols = [slice(p * d + h * dh, p * d + (h + 1) * dh) for p in range(3)]
        q, k = ((x @ W[:, c] + b[c]) for c in cols[:2])
        # value biases (c_attn's, and ln_1's bias through W_V) write the same vector whatever
        # the source: the OV circuit leaves them out
        v = (x - hf.transformer.h[0].ln_1.bias) @ W[:, cols[2]]
        want_qk = q @ k.T / dh ** 0.5
        got_qk = qk_circuit(tl, 0, h, ids, ids, positions=range(5, 6)).values
        torch.testing.assert_close(got_qk, want_qk, atol=2e-4, rtol=1e-4)
        out = v @ Wo[h * dh:(h + 1) * dh]
        out = out - out.mean(-1, keepdim=True)  # ln_f centres what the head writes
        want_ov = (out * g) @ hf.lm_head.weight.T
        got_ov = ov_circuit(tl, 0, h, ids, positions=range(5, 6)).values
        diff = got_ov - want_ov
        torch.testing.assert_close(diff - diff.mean(-1, keepdim=True),
                                   torch.zeros_like(diff), atol=2e-4, rtol=0)


def test_circuit_views_name_bad_ids(hf_and_tl):
    _, tl = hf_and_tl
    with pytest.raises(ValueError, match="outside the vocabulary"):
        qk_circuit(tl, 0, 0, [tl.cfg.d_vocab], [0])
    with pytest.raises(ValueError, match="no token ids"):
        ov_circuit(tl, 0, 0, [])


def test_the_language_is_a_skip_trigram_language():
    """A trigger's next word is fixed by the opener before it, and by nothing else."""
    import random

    r = S.SkipTrigramRecipe()
    rng = random.Random(0)
    for _ in range(200):
        d = S.document(rng, r, "rule")
        w = d["text"].split()
        assert w[d["trigger"] + 1] == S.completion(w[d["opener"]], w[d["trigger"]])
        assert d["trigger"] - d["opener"] >= 2
    lone = [S.document(rng, r, "lone") for _ in range(200)]
    assert all(not any(o in d["text"].split()[: d["trigger"]] for o in S.RULES) for d in lone)
    assert len({c for _, _, c in S.skip_trigrams()}) == 16


def test_shipped_checkpoint_is_small_and_recorded():
    assert (DIR / "model.safetensors").stat().st_size < 2_000_000
    info = json.loads((DIR / "training.json").read_text())
    assert info["recipe"] == json.loads(json.dumps(S.SkipTrigramRecipe().__dict__))
    assert info["scores"]["completion_accuracy"] >= 0.99


def _run(pytester, model: Path, *args: str):
    res = pytester.runpytest(str(ROOT / "claims" / "test_skip_trigram.py"), "--model",
                             str(model), "-p", "no:cacheprovider", "-q", *args)
    got = {k: v for k, v in res.parseoutcomes().items()
           if k in ("passed", "failed", "error", "errors", "inconclusive")}
    return res, got


def test_claims_fail_on_a_randomly_initialised_copy(pytester, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    out = tmp_path / "random"
    torch.manual_seed(1234)
    GPT2LMHeadModel(GPT2Config.from_pretrained(DIR)).save_pretrained(out)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(DIR / f, out / f)
    _, got = _run(pytester, out, "--no-report")
    assert got.get("failed", 0) >= 1 and not got.get("passed") and not got.get("error"), got


def test_claims_fail_with_the_heads_outputs_zeroed(pytester, tmp_path):
    out = tmp_path / "zero"
    shutil.copytree(DIR, out)
    state = load_file(str(DIR / "model.safetensors"))
    dh = 64 // 4
    for h in (1, 2):
        state["transformer.h.0.attn.c_proj.weight"][h * dh:(h + 1) * dh] = 0
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    res, got = _run(pytester, out, "--no-report")
    # the read-off fails; patching is inconclusive (nothing differs between clean and swapped)
    assert got.get("failed") == 1 and not got.get("passed") and not got.get("error"), got
    assert "skip_trigram" in res.stdout.str() or got


def test_mutation_run_calls_both_claims_discriminating(pytester):
    pytester.runpytest(str(ROOT / "claims" / "test_skip_trigram.py"), "--model", "skip-trigram",
                       "--mutate", "--report-dir", "out", "-p", "no:cacheprovider", "-q")
    data = json.loads(next(pytester.path.glob("out/run-*/report.json")).read_text())
    verdicts = {c: m["verdict"] for c, m in data["mutation"].items()}
    assert verdicts == {"skip_trigram.circuits": "discriminating",
                        "skip_trigram.patching": "discriminating"}, verdicts
