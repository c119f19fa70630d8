"""A GPT-2-small-shaped model with random weights (GPT2Config() defaults), built offline."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def gpt2_small_dir(tmp_path_factory):
    from mechtests.testing import save_gpt2_shaped_checkpoint

    return save_gpt2_shaped_checkpoint(tmp_path_factory.mktemp("gpt2_small") / "model")


@pytest.fixture(scope="session")
def gpt2_small(gpt2_small_dir):
    from mechtests.core.engine import Engine
    from mechtests.core.models import load_model

    model = load_model(str(gpt2_small_dir), device="cpu")
    return model, Engine(model)
