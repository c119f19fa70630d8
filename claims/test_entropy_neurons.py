"""Confidence-regulation (entropy) neurons (Stolfo et al. 2024).

GPT-2 small's last-layer neurons 11.584, 11.2378, 11.2870, 11.2123, 11.1611, 11.2910 have large
output weight norms written mostly into the unembedding's near-null space, so they change the
final LayerNorm scale (the entropy of the prediction) rather than any one token's logit.
Effect sizes were not verified (shared/published-values.md): the thresholds below are relative
(these neurons against the rest of their layer), not the paper's numbers.

On a model with no reference of its shape (a real pretrained model) the entropy neurons are
cast from the weights alone, with no prompts: the ``N_ENTROPY`` (GPT-2's count) final-layer
neurons that write the largest norm into the unembedding's null space (``||W_out[n]`` projected
there``||``, norm times the square root of the null-space fraction). The weights claim asks both
halves of the mechanism of them, each against the layer: large output norm (top 10% of the
layer) and mostly in the null space (median fraction five times the layer's median neuron's).
Nothing is held out of a cast from weights; the ablation claim confirms the mechanism on a
prompt family the cast never saw (the IOI ABBA family fitted to the tokenizer): ablating them
moves the entropy more than the top token's logit. Both have a control: as many final-layer
neurons drawn at random (seeded) must fail the same check.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import pytest
import torch

from claims.families import ANY, measured_on
from mechtests.analysis.attribution import (
    neuron_ablation_effect,
    neuron_output_norms,
    unembed_null_fraction,
)
from mechtests.core.prompts import PromptError, TokenizedFamily, fit
from mechtests.suite.claims import holds, reference, travels
from mechtests.suite.roles import CONTROL_SEED, control, strict_mode

REFS = {"gpt2": (11, (584, 2378, 2870, 2123, 1611, 2910))}
SOURCE = "Stolfo et al. 2024 (confidence regulation neurons); bpwu1/confidence-regulation-neurons"
SUBJECTS = list(REFS)


@pytest.mark.claim(id="entropy.weights", source=SOURCE, subjects=SUBJECTS)
def test_large_norm_written_into_the_null_space(subject, record):
    if travels(subject, REFS):
        return weights_anew(subject, record)
    _, (layer, neurons) = reference(subject, REFS)
    record.components([f"mlp_{layer}"], breaks=("ov",))
    norms = neuron_output_norms(subject.model).values[layer]
    null = unembed_null_fraction(subject.model).values[layer]
    idx = torch.tensor(neurons)
    holds(float((norms[idx] > norms.quantile(0.9)).float().mean()), ">=", 0.8,
          "share of the entropy neurons in their layer's top 10% by output norm",
          "large output weight norm", record)
    holds(float(null[idx].median() / null.median()), ">=", 5.0,
          "median null-space fraction, entropy neurons over the layer's median neuron",
          "mostly in the unembedding's near-null space", record)


@pytest.mark.claim(id="entropy.ablation", source=SOURCE, subjects=SUBJECTS)
def test_ablation_changes_entropy_more_than_the_top_logit(subject, record):
    if travels(subject, REFS):
        return ablation_anew(subject, record)
    (layer, neurons), fam = measured_on("ioi", subject, REFS, "ABBA", record)
    record.components([f"mlp_{layer}"], breaks=("ov",))
    eff = neuron_ablation_effect(subject.model, fam.clean, layer, list(neurons), how="mean")
    record.heatmap(eff, title="mean-ablation effect: entropy and top logit")
    # both in natural units: nats of entropy against logits of the top token, relative to the
    # layer's typical neuron would be stronger; here the plain comparison the paper draws
    ent, top = eff.values[:, 0].abs(), eff.values[:, 1].abs()
    holds(float((ent > top).float().mean()), ">=", 0.5,
          "share of the entropy neurons whose ablation moves entropy more than the top logit",
          "they act through the LayerNorm scale, not one token", record)


# -- on a model with no reference of its shape ----------------------------------------------------
N_ENTROPY = len(REFS["gpt2"][1])  # as many as GPT-2's list: six
ENTROPY = ("the final-layer neurons writing the largest norm into the unembedding's null space "
           "(cast from the weights alone: no prompts)")


def _control(check: Callable[[Sequence[int]], None], found: Sequence[int], d_mlp: int,
             layer: int, record) -> None:
    """The control: the same check on as many other final-layer neurons, drawn at random
    (seeded), must fail; one that holds there too does not single out the neurons cast."""
    __tracebackhide__ = True
    drawn = random.Random(CONTROL_SEED).sample([i for i in range(d_mlp) if i not in found],
                                               len(found))
    control(lambda: check(drawn), f"{len(drawn)} neurons of layer {layer} ({drawn})",
            "the neurons cast", record)


def entropy_neurons(subject, record):
    """(final layer, the neurons cast there, the layer's output norms and null-space fractions),
    recorded: the cast reads the weights only."""
    if strict_mode(record):
        pytest.skip("--strict-components asks whether the reference's own neurons play the "
                    "role; this checkpoint has no reference of its shape")
    layer = subject.model.cfg.n_layers - 1
    norms = neuron_output_norms(subject.model).values[layer]
    null = unembed_null_fraction(subject.model).values[layer]
    found = (norms * null.sqrt()).topk(N_ENTROPY).indices.tolist()
    record.cast("entropy neurons", ENTROPY, [], [f"mlp{layer}.{i}" for i in found], {}, [])
    record.components([f"mlp_{layer}"], breaks=("ov",))
    return layer, found, norms, null


def weights_anew(subject, record) -> None:
    """The neurons cast have large output norm (at least 80% of them in their layer's top 10%)
    written mostly into the null space (median fraction at least five times the layer's median
    neuron's): the reference's relative bars, each against the layer."""
    layer, found, norms, null = entropy_neurons(subject, record)

    def check(neurons: Sequence[int]) -> None:
        idx = torch.tensor(list(neurons))
        holds(float((norms[idx] > norms.quantile(0.9)).float().mean()), ">=", 0.8,
              f"share of neurons {list(neurons)} in layer {layer}'s top 10% by output norm",
              "large output weight norm", record,
              percentile=[round(float((norms < norms[i]).float().mean()), 3) for i in idx])
        holds(float(null[idx].median() / null.median()), ">=", 5.0,
              f"median null-space fraction of neurons {list(neurons)} over layer {layer}'s "
              "median neuron's", "mostly in the unembedding's near-null space", record,
              fractions=[round(float(null[i]), 3) for i in idx])

    check(found)
    _control(check, found, norms.numel(), layer, record)


def _held_out(subject) -> TokenizedFamily:
    """The IOI ABBA family written for any tokenizer, fitted to this one (the reference's
    family's kind): prompts the cast, made from weights, never saw."""
    fam = ANY["ioi"]["ABBA"]()
    try:
        return fit(fam, subject.model)[0]
    except PromptError as exc:
        pytest.skip(f"this checkpoint's tokenizer cannot express the 'ioi' family 'ABBA': "
                    f"{str(exc).splitlines()[0]}")


def ablation_anew(subject, record) -> None:
    """Mean-ablating the neurons cast from the weights moves the entropy (nats) more than the
    clean top token's logit for at least half of them, on a prompt family the cast never
    saw: they act through the final norm's scale, not on one token."""
    layer, found, _, _ = entropy_neurons(subject, record)
    fam = _held_out(subject)

    def check(neurons: Sequence[int]) -> None:
        eff = neuron_ablation_effect(subject.model, fam.clean, layer, list(neurons), how="mean")
        if list(neurons) == found:
            record.heatmap(eff, title="mean-ablation effect: entropy and top logit")
        ent, top = eff.values[:, 0].abs(), eff.values[:, 1].abs()
        holds(float((ent > top).float().mean()), ">=", 0.5,
              f"share of neurons {list(neurons)} whose mean-ablation moves the entropy more than "
              "the top logit", "they act through the final norm's scale, not one token",
              record, entropy=[round(float(x), 4) for x in eff.values[:, 0]],
              top_logit=[round(float(x), 4) for x in eff.values[:, 1]])

    check(found)
    _control(check, found, subject.model.cfg.d_mlp, layer, record)
