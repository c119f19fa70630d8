"""Which input positions carry the answer, for each claim's family: the story's tokens.

For every family, each input position's token is replaced, one position at a time, by a random
token (seeded), and the drop of the claim's metric measured (resid_pre patching at layer 0,
"noising", through the same engine as every sweep). The positions that matter most must be the
ones the claim's story names: IOI the two names (IO and the subject S1/S2); name recall the
surname (and the repeated first name it is queried by, the last token); contraction copying the
earlier verb whose style is copied. The last position itself is left out of the ranking: its
token is the one the prediction is made from, and changing it changes the question.
"""

from __future__ import annotations

import pytest
import torch

from claims.families import _organism, family
from mechtests.analysis.patching import sweep
from mechtests.organisms import language as lang
from mechtests.suite.claims import effect_size, holds, reference

STORY = {  # task, family kind -> the named positions that carry the answer
    ("ioi", "ABBA"): ("IO", "S1", "S2"),
    ("recall", "michelle"): ("SURNAME",),
    ("contraction", "contracted"): ("V1",),
}
# Which stories each subject is held to. The organism's IOI and contraction circuits also read
# template words ("the", ","): randomising one of those costs it as much as randomising a name
# (62% and 69% of story positions in the top ranks, FINDINGS.md), so only its name recall is
# claimed here.
REFS = {"gpt2": set(STORY), "multitask": {("recall", "michelle")}}
# What carries each story (for --mutate); nothing is named for GPT-2's stories. The organism's
# layer-0 attention reads the surname into the last position (0.0 most: attention 0.91, with
# backup in its layer: see claims/test_resid_patching.py).
MOVERS = {"multitask": {("recall", "michelle"): ("attn_0",)}}
# The organism's recall family, 64 prompts: on the shared 8-prompt family 7 of 8 prompts cleared
# the 0.8 bar, so one prompt decided the verdict; here one prompt is 1/64 of the share.
LARGER = {("multitask", "recall", "michelle"): lambda: _organism(
    "recall_single", lang.recall_prompts, (0,), n=64)}
SOURCE = "activation patching by position (Meng et al. 2022; Wang et al. 2022)"


def random_tokens_like(tokens: torch.Tensor, vocab: int, seed: int = 0) -> torch.Tensor:
    """Every position but BOS-like position 0 of a BOS family replaced by a random token."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, vocab, tokens.shape, generator=g)


@pytest.mark.claim(id="token_attribution", source=SOURCE, subjects=list(REFS))
@pytest.mark.parametrize("task,kind", list(STORY), ids=[f"{t}-{k}" for t, k in STORY])
def test_story_positions_carry_the_answer(subject, task, kind, record, pin):
    name, stories = reference(subject, REFS)
    if (task, kind) not in stories:
        pytest.skip(f"token_attribution: the {task} story is not claimed for {name}: its "
                    f"circuit also reads template words, which rank with the story's own "
                    f"(FINDINGS.md)")
    fam = LARGER.get((name, task, kind), lambda: family(task, name, kind))()
    movers = MOVERS.get(name, {}).get((task, kind))
    if movers:
        record.components(list(movers))
    tf = fam.tokenize(subject.model)
    noise = random_tokens_like(tf.clean, min(subject.model.cfg.d_vocab, 20000))
    if fam.prepend_bos:
        noise[:, 0] = tf.clean[:, 0]
    res = sweep(subject.model, "resid_pre", tf.clean, noise, tf.logit_diff(),
                by=("layer", "pos"), layers=[0], direction="noise")
    # guard: randomising the whole prompt must cost the answer at least a logit, else ranking
    # positions by what randomising one costs ranks noise
    effect_size(res.clean, res.corrupted,
                "logit diff, clean prompts minus fully randomised ones", record)
    drop = res.clean_per_prompt[:, None] - res.per_prompt[:, 0]  # [n, T]
    record.heatmap(res, title=f"logit diff with one position's token randomised ({task})")
    story = STORY[(task, kind)]
    k = len(story)
    drop[torch.arange(len(drop)), tf.positions["END"]] = float("-inf")
    top = drop.topk(k, dim=-1).indices  # [n, k] per prompt
    hit = torch.stack([(top == tf.positions[n][:, None]).any(-1) for n in story], -1).float()
    holds(float(hit.mean()), ">=", 0.8,
          f"share of story positions {list(story)} among each prompt's top {k} by metric drop",
          "the claim's story tokens carry the answer, for the large majority (4 in 5) of "
          "prompts",
          record, first_prompt_top=[tf.pos_labels[i] for i in top[0].tolist()])
    pin(res, "position_noising")
