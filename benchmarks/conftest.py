"""A GPT-2-small-shaped model with random weights (GPT2Config() defaults), built offline."""

from __future__ import annotations

import pytest
import torch


def save_gpt2_small(path):
    """GPT2Config() defaults, seeded random weights, a 50257-entry word-level tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from mechtests.testing import word_tokenizer

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config()).save_pretrained(path)
    word_tokenizer([f"w{i}" for i in range(50255)]).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def gpt2_small_dir(tmp_path_factory):
    return save_gpt2_small(tmp_path_factory.mktemp("gpt2_small") / "model")


@pytest.fixture(scope="session")
def gpt2_small(gpt2_small_dir):
    from mechtests.engine import Engine
    from mechtests.models import load_model

    model = load_model(str(gpt2_small_dir), device="cpu")
    return model, Engine(model)
