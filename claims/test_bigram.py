"""A zero-layer transformer is a bigram model (Elhage et al. 2021, "A Mathematical Framework").

With no layers, logits = LN(W_E[w] + W_pos[p]) @ W_U + b_U: the model can only learn next-token
statistics of the current token, so a 0-layer model trained on a bigram language should recover
its transition table row by row. (GPT-2's architecture keeps the final LayerNorm, so the direct
path is read through it: per-row centring and scaling of W_E @ W_U; the organism's position
embeddings are frozen at zero.) The bigram organism's language has a known table
(``mechtests.organisms.language.bigram_table``).
"""

from __future__ import annotations

import pytest

from mechtests.core.engine import normalize
from mechtests.organisms.language import bigram_table
from mechtests.suite.claims import holds, reference, synthetic

SOURCE = "Elhage et al. 2021 (zero-layer transformers are bigram models)"
REFS = {"bigram": None}


@pytest.mark.claim(id="bigram.table", source=SOURCE, subjects=["bigram"])
def test_embedding_times_unembedding_is_the_bigram_table(subject, record, pin):
    synthetic(subject, REFS, "its bigram table")
    reference(subject, REFS)
    record.components(["embed"])  # the direct path W_E @ W_U (tied: the same matrix)
    model = subject.model
    table = bigram_table().float()  # rows: current word, columns: next word (vocab order)
    resid = normalize(model.W_E + model.W_pos[0], model.cfg.eps)  # the final LayerNorm
    logits = resid @ model.W_U + model.b_U  # compat mode folded the LayerNorm gain into W_U
    pred = logits.softmax(-1)[: table.shape[0], : table.shape[1]]
    rows = table.sum(-1) > 0
    visited = table[rows].max(-1).values < 1.0  # skip the uniform <unk> row
    true, got = table[rows][visited], pred[rows][visited]
    kl = (true * (true.clamp_min(1e-12).log() - got.clamp_min(1e-12).log())).sum(-1)
    uniform_kl = (true * (true.clamp_min(1e-12).log() + true.new_tensor(true.shape[-1]).log())
                  ).sum(-1)
    holds(float(kl.mean() / uniform_kl.mean()), "<=", 0.1,
          "mean KL(true row || softmax(W_E W_U) row), as a fraction of a uniform guess's",
          "the 0-layer model has learned the table", record, kl=float(kl.mean()))
    corr = float(((true - true.mean()) * (got - got.mean())).sum()
                 / ((true - true.mean()).norm() * (got - got.mean()).norm()))
    holds(corr, ">=", 0.9, "correlation of predicted and true transition probabilities",
          "row by row the same table", record)
