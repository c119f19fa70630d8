"""``--mutate`` on Llama checkpoints: grouped-query attention, tied embeddings, and role claims
cast anew (no reference of the subject's shape).

A tiny random Llama shaped like SmolLM2 where it matters (``save_tiny_llama``: 6 query heads,
2 key-value heads, so 3 query heads per group; ``head_dim`` 4, not ``hidden_size / n_heads``;
unembedding tied to the embedding), built offline in a second or two.
"""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest
import torch

from mechtests.core.engine import engine_for
from mechtests.core.models import load_model, reference_of, remember, spec_of
from mechtests.suite import mutate as mu
from mechtests.testing import save_tiny_llama

pytest_plugins = ["pytester"]

L, H, KV, DH = 2, 6, 2, 4  # save_tiny_llama's defaults
TOKENS = torch.tensor([[0, 5, 9, 11, 3, 7, 2, 8]])
ATTN = "model.layers.{}.self_attn.{}_proj.weight"


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("llama") / "model")


@pytest.fixture(scope="module")
def llama(llama_dir):
    return load_model(str(llama_dir), device="cpu")


def weights(model) -> dict[str, torch.Tensor]:
    """The Hugging Face weights a mutant was built from (its engine's reference)."""
    return reference_of(model).state_dict()


@pytest.fixture(scope="module")
def original(llama):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(spec_of(llama).path, use_safetensors=True).eval()


def rows(head: int) -> slice:
    return slice(head * DH, (head + 1) * DH)


def test_relabel_rotates_within_key_value_groups_and_keeps_the_function(llama, original):
    mutant = mu.build_mutant(llama, mu.Mutant("relabel", "same", mu.relabel))
    a, _ = engine_for(llama).run(TOKENS)
    b, _ = engine_for(mutant).run(TOKENS)
    assert a.abs().max() > 1  # not near-zero logits
    assert torch.allclose(a, b, atol=1e-5)
    with torch.no_grad():
        assert torch.allclose(original(TOKENS).logits, reference_of(mutant)(TOKENS).logits,
                              atol=1e-5)
    new, old = weights(mutant), original.state_dict()
    for layer in range(L):
        q, o = ATTN.format(layer, "q"), ATTN.format(layer, "o")
        # new head j is old head j-1 of its group of 3: 0 <- 2, 1 <- 0, 2 <- 1, 3 <- 5, ...
        for j, s in enumerate([2, 0, 1, 5, 3, 4]):
            assert torch.equal(new[q][rows(j)], old[q][rows(s)])
            assert torch.equal(new[o][:, rows(j)], old[o][:, rows(s)])
        for kv in "kv":  # the key-value heads stay where they are
            assert torch.equal(new[ATTN.format(layer, kv)], old[ATTN.format(layer, kv)])
    moved = {h: mu.relabelled(f"1.{h}", L, H, KV) for h in range(H)}
    assert moved == {0: "1.1", 1: "1.2", 2: "1.0", 3: "1.4", 4: "1.5", 5: "1.3"}
    assert mu.relabelled("1.5", L, H) == "1.0"  # each head its own keys and values: the layer
    assert mu.relabelled("attn_1", L, H, KV) == "attn_1"
    assert mu.relabel_cycle(9, 3) == 3 and mu.relabel_cycle(12, 12) == 12  # SmolLM2; MHA


def test_a_head_cannot_leave_its_key_value_group(original):
    sd = {k: v.clone() for k, v in original.state_dict().items()}
    with pytest.raises(ValueError, match="key-value group"):
        mu.permute_heads(sd, original.config, {0: [3, 1, 2, 0, 4, 5]})
    mu.permute_heads(sd, original.config, {0: [1, 0, 2, 3, 5, 4]})  # within groups: fine


def test_multi_head_llama_moves_keys_and_values_with_their_head(tmp_path):
    path = save_tiny_llama(tmp_path / "mha", n_head=4, n_kv_heads=4, tie=False)
    model = load_model(str(path), device="cpu")
    mutant = mu.build_mutant(model, mu.Mutant("relabel", "same", mu.relabel))
    a, _ = engine_for(model).run(TOKENS)
    b, _ = engine_for(mutant).run(TOKENS)
    assert torch.allclose(a, b, atol=1e-5)
    from transformers import LlamaForCausalLM

    new, old = weights(mutant), LlamaForCausalLM.from_pretrained(path).state_dict()
    for kv in "kv":
        name = ATTN.format(0, kv)
        assert torch.equal(new[name][rows(1)], old[name][rows(0)])
    assert mu.relabelled("0.3", 2, 4, 4) == "0.0"


def test_breaks_hit_only_the_named_head(llama):
    names = ["blocks.1.attn.hook_pattern"]
    _, clean = engine_for(llama).run(TOKENS, names)
    uniform = torch.tril(torch.ones(8, 8)) / torch.arange(1, 9)[:, None]
    qk = mu.build_mutant(llama, mu.Mutant("QK 1.4", "fail", mu.break_qk("1.4")))
    _, acts = engine_for(qk).run(TOKENS, names)
    pattern = acts[names[0]][0]
    assert torch.allclose(pattern[4], uniform, atol=1e-6)
    assert not torch.allclose(clean[names[0]][0, 4], uniform, atol=1e-2)
    for h in (0, 3, 5):  # another group's head, and the heads sharing 1.4's keys
        assert torch.allclose(pattern[h], clean[names[0]][0, h], atol=1e-6)
    layer = mu.build_mutant(llama, mu.Mutant("QK attn_1", "fail", mu.break_qk("attn_1")))
    _, acts = engine_for(layer).run(TOKENS, names)
    assert torch.allclose(acts[names[0]][0], uniform.expand(H, 8, 8), atol=1e-6)

    ov = mu.build_mutant(llama, mu.Mutant("OV 1.4", "fail", mu.break_ov("1.4")))
    o = weights(ov)[ATTN.format(1, "o")]
    assert float(o[:, rows(4)].abs().max()) == 0 and float(o[:, rows(3)].abs().max()) > 0
    assert float(engine_for(ov).W_O[1, 4].abs().max()) == 0
    mlp = mu.build_mutant(llama, mu.Mutant("OV mlp_1", "fail", mu.break_ov("mlp_1")))
    w = weights(mlp)
    assert float(w["model.layers.1.mlp.down_proj.weight"].abs().max()) == 0
    assert float(w["model.layers.0.mlp.down_proj.weight"].abs().max()) > 0


def test_embedding_break_unties_and_keeps_the_unembedding(llama, original, tmp_path):
    assert original.config.tie_word_embeddings
    mutant = mu.build_mutant(llama, mu.Mutant("OV embed", "fail", mu.break_ov("embed")))
    hf = reference_of(mutant)
    assert hf.config.tie_word_embeddings is False
    assert hf.lm_head.weight is not hf.model.embed_tokens.weight
    e0 = original.model.embed_tokens.weight
    assert torch.equal(hf.lm_head.weight, e0)  # the unembedding is the original
    e = hf.model.embed_tokens.weight
    assert not torch.equal(e, e0)  # the input embedding's rows are shuffled
    assert sorted(map(tuple, e.tolist())) == sorted(map(tuple, e0.tolist()))
    assert mutant.original_model.config.tie_word_embeddings is False
    engine_for(mutant)  # checks itself against hf: it raises on a disagreement
    # saved and loaded again, the mutant is the same model (config and weights agree)
    from transformers import LlamaForCausalLM

    hf.save_pretrained(tmp_path / "m")
    again = LlamaForCausalLM.from_pretrained(tmp_path / "m", use_safetensors=True).eval()
    assert again.config.tie_word_embeddings is False
    assert all(torch.equal(w, hf.state_dict()[k]) for k, w in again.state_dict().items())
    with torch.no_grad():  # (sdpa attention there, eager here)
        assert torch.allclose(again(TOKENS).logits, hf(TOKENS).logits, atol=1e-5)
    # the subject itself is untouched and still tied
    assert llama.original_model.config.tie_word_embeddings


def test_noise_keeps_the_tie_and_is_seeded(llama, original):
    a = mu.build_mutant(llama, mu.Mutant("noise", "hold", mu.noise_all))
    b = mu.build_mutant(llama, mu.Mutant("noise", "hold", mu.noise_all))
    wa, wb = weights(a), weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    hf = reference_of(a)
    assert hf.lm_head.weight is hf.model.embed_tokens.weight  # noised once, still tied
    old = original.state_dict()
    for name in ("model.embed_tokens.weight", "model.layers.0.mlp.gate_proj.weight"):
        rel = float((wa[name] - old[name]).std() / old[name].std())
        assert 0.005 < rel < 0.02, (name, rel)


def test_unnamed_leaves_named_heads_and_their_keys_alone(llama, original):
    mutant = mu.build_mutant(llama, mu.Mutant("unnamed", "hold",
                                              mu.perturb_unnamed(["1.4", "0.0", "mlp_1"])))
    new, old = weights(mutant), original.state_dict()

    def same(name: str, sl: slice = slice(None), cols: bool = False) -> bool:
        return torch.equal(new[name][:, sl] if cols else new[name][sl],
                           old[name][:, sl] if cols else old[name][sl])

    for layer, named in ((1, 4), (0, 0)):
        group = named // 3
        q, k, v, o = (ATTN.format(layer, p) for p in "qkvo")
        for h in range(H):  # only the named head's queries and output are left as they were
            assert same(q, rows(h)) == (h == named)
            assert same(o, rows(h), cols=True) == (h == named)
        for g in range(KV):  # keys and values of the named head's group are left alone
            assert same(k, rows(g)) == (g == group) and same(v, rows(g)) == (g == group)
    for p in ("gate", "up", "down"):
        assert same(f"model.layers.1.mlp.{p}_proj.weight")
        assert not same(f"model.layers.0.mlp.{p}_proj.weight")
    assert same("model.embed_tokens.weight")


def test_mutants_of_a_grouped_query_claim():
    def relabel_expect(heads, by_role=True, n_kv=KV):
        return next(m.expected for m in mu.mutants(heads, ("qk",), False, L, H,
                                                   by_role=by_role, n_kv_heads=n_kv)
                    if m.name == "relabel")

    assert relabel_expect(["1.3", "1.4", "1.5"]) == "same"  # a whole group maps onto itself
    assert relabel_expect(["1.3", "1.4"]) == "moved"
    assert relabel_expect(["1.3", "1.4"], by_role=False) == "fail"
    # one key-value head for all: the group is the layer; one head: nothing to renumber
    assert relabel_expect(["1.3", "1.4", "1.5"], n_kv=1) == "moved"
    assert relabel_expect([f"1.{h}" for h in range(H)], n_kv=1) == "same"
    assert [m.name for m in mu.mutants(["0.0"], ("qk",), False, 1, 1)] == [
        "QK 0.0", "unnamed", "noise"]


def test_other_families_are_refused_by_name(llama, tmp_path):
    shutil.copytree(spec_of(llama).path, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**cfg, "model_type": "qwen2"}))

    class Fake:
        pass

    fake = Fake()
    remember(fake, type(spec_of(llama))("m", tmp_path / "m", "m"))
    with pytest.raises(mu.MutationError,
                       match="GPT-2-, Llama- and Gemma 3-architecture checkpoints only"):
        mu.build_mutant(fake, mu.Mutant("noise", "hold", mu.noise_all))


# -- a role cast anew: the unmutated run's heads stand in for the reference's ----------------------
class _Config:
    def getoption(self, name: str, default=None):
        return {"--seed": 0, "--strict-components": False}.get(name, default)


class _Item:
    """What ``run_test`` reads of a pytest item: a claim test that casts one role anew on a
    subject with no reference of its shape and holds on whoever plays it."""

    def __init__(self, found: tuple[str, ...]):
        from mechtests.suite.report import Record

        self.config = _Config()
        self.user_properties: list = []
        record = Record(self)  # type: ignore[arg-type]
        self.funcargs: dict = {"subject": None, "record": record}
        record.components(list(found), breaks=("qk",))
        self._cast(record, found)  # the claim's run on the unmutated subject

    @staticmethod
    def _cast(record, found) -> None:
        record.cast("movers", "the heads that move", (), found, {}, ())
        record.measured(1.0, 0.5, ">=", "a constant")

    def get_closest_marker(self, name: str):
        return None

    def runtest(self) -> None:
        self._cast(self.funcargs["record"], self.funcargs["subject"].model.found)


def test_a_role_cast_anew_moves_on_its_mutants():
    from mechtests.suite.claims import Subject

    base = ("1.0", "1.3")
    cfg = SimpleNamespace(n_layers=L, n_heads=H, n_key_value_heads=KV)
    subject = Subject("s", "s", SimpleNamespace(cfg=cfg))
    found = {"relabel": ("1.4", "1.1"),  # where relabel took 1.0 and 1.3
             "QK 1.0": ("1.2", "1.3"),  # the role left the broken head: moved, as it must
             "QK 1.3": ("1.0", "1.3"),  # held on the broken head: cannot fail when it breaks
             "unnamed": ("1.0", "1.3"), "noise": ("1.3", "1.0")}  # the same set: held
    cache = {("s", name, base): SimpleNamespace(found=f, cfg=cfg) for name, f in found.items()}
    item = _Item(base)
    entry = mu.run_test(item, subject, cache)
    m = entry["matrix"]
    assert list(m) == list(found)
    assert m["relabel"]["outcome"] == "moved" and m["relabel"]["ok"]
    assert m["relabel"]["moved"] == {"1.0": "1.4", "1.3": "1.1"}
    assert m["QK 1.0"]["outcome"] == "moved" and m["QK 1.0"]["moved"] == {"1.0": "1.2"}
    assert m["QK 1.0"]["ok"]
    assert m["QK 1.3"]["outcome"] == "held" and not m["QK 1.3"]["ok"]
    assert all(m[k]["outcome"] == "held" and m[k]["ok"] for k in ("unnamed", "noise"))
    assert entry["verdict"] == "cannot fail when QK 1.3 breaks"
    assert mu.moved_anew([{"role": "r", "expected": [], "found": ["1.0"]}],
                         [{"role": "r", "expected": ["1.0"], "found": ["1.1"]}]) == {}


def test_a_head_that_leaves_a_role_cast_anew_with_no_successor_has_moved():
    """A cast of up to n heads that finds fewer on the mutant (SmolLM2: QK 18.6 broken, the
    induction role keeps 17.3, 17.4, 17.5, 18.7 and no fifth head clears 0.5) no longer names
    the broken head: it followed the mechanism away from it (moved), not "held on it"."""
    from mechtests.suite.claims import Subject

    base = ("1.0", "1.3")
    cfg = SimpleNamespace(n_layers=L, n_heads=H, n_key_value_heads=KV)
    subject = Subject("s", "s", SimpleNamespace(cfg=cfg))
    found = {"relabel": ("1.4", "1.1"), "QK 1.0": ("1.3",), "QK 1.3": ("1.0", "1.3"),
             "unnamed": ("1.0",), "noise": ("1.3", "1.0")}
    cache = {("s", name, base): SimpleNamespace(found=f, cfg=cfg) for name, f in found.items()}
    m = mu.run_test(_Item(base), subject, cache)["matrix"]
    assert m["QK 1.0"]["outcome"] == "moved" and m["QK 1.0"]["ok"]
    assert m["QK 1.0"]["moved"] == {"1.0": mu.LEFT}
    assert m["unnamed"]["outcome"] == "moved" and not m["unnamed"]["ok"]  # a hold that moved
    assert m["QK 1.3"]["outcome"] == "held" and not m["QK 1.3"]["ok"]


CLAIMS = """
import pytest

@pytest.mark.claim(id="head", source="test", subjects=["tiny"])
def test_head(subject, record):
    record.components(["1.4"])
    record.measured(1.0, 0.5, ">=", "a constant")
"""


def test_mutate_builds_llama_mutants_end_to_end(pytester, llama_dir):
    pytester.makepyfile(CLAIMS)
    res = pytester.runpytest("--model", str(llama_dir), "--mutate", "--report-dir", "out",
                             "-p", "no:cacheprovider")
    res.assert_outcomes(passed=1)
    out = res.stdout.str()
    assert "not run" not in out and "Traceback" not in out
    data = json.loads(next(pytester.path.glob("out/run-*/report.json")).read_text())
    m = data["mutation"]["head"]["matrix"]
    assert list(m) == ["relabel", "QK 1.4", "OV 1.4", "unnamed", "noise"]
    assert all(cell["outcome"] == "held" for cell in m.values())  # a constant cannot fail


def test_the_mutant_cache_keeps_a_bounded_number_of_bytes():
    def model(n: int):
        return SimpleNamespace(parameters=lambda: [torch.zeros(n)])  # 4n bytes

    cache: dict = {}
    for k in range(4):
        mu.keep(cache, k, model(100), budget=1000)  # 400 bytes each: two fit
    assert list(cache) == [2, 3]
    mu.keep(cache, "big", model(1000), budget=1000)  # the newest stays, even alone too large
    assert list(cache) == ["big"]
    mu.keep(cache, "stand-in", object(), budget=1000)  # no parameters: counted as nothing
    assert list(cache) == ["stand-in"]
    mu.keep(cache, "small", model(10), budget=1000)
    assert list(cache) == ["stand-in", "small"]
