"""Fixtures for the library's own tests: tiny random GPT-2 checkpoints, built offline."""

from __future__ import annotations

import pytest

# Imported before any in-process pytester run snapshots sys.modules: modules first imported
# inside an inner run are dropped after it, and pyarrow/transformers cannot be imported twice.
import transformer_lens.model_bridge  # noqa: F401
import transformers.models.gpt2.modeling_gpt2  # noqa: F401

from mechtests.core.models import load_model
from mechtests.testing import save_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory):
    """A 2-layer, 4-head, d_model 32 GPT-2 with a word-level tokenizer, saved as safetensors."""
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    """The tiny checkpoint loaded through the normal path (compat mode, eval, cpu)."""
    return load_model(str(tiny_model_dir), device="cpu")
