"""Confidence-regulation (entropy) neurons (Stolfo et al. 2024).

GPT-2 small's last-layer neurons 11.584, 11.2378, 11.2870, 11.2123, 11.1611, 11.2910 have large
output weight norms written mostly into the unembedding's near-null space, so they change the
final LayerNorm scale (the entropy of the prediction) rather than any one token's logit.
Effect sizes were not verified (shared/published-values.md): the thresholds below are relative
(these neurons against the rest of their layer), not the paper's numbers.
"""

from __future__ import annotations

import pytest
import torch

from claims.families import measured_on
from mechtests.analysis.attribution import (
    neuron_ablation_effect,
    neuron_output_norms,
    unembed_null_fraction,
)
from mechtests.suite.claims import holds, reference

REFS = {"gpt2": (11, (584, 2378, 2870, 2123, 1611, 2910))}
SOURCE = "Stolfo et al. 2024 (confidence regulation neurons); bpwu1/confidence-regulation-neurons"
SUBJECTS = list(REFS)


@pytest.mark.claim(id="entropy.weights", source=SOURCE, subjects=SUBJECTS)
def test_large_norm_written_into_the_null_space(subject, record):
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
