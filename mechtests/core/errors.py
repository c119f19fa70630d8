"""Why a model cannot be loaded: shared by ``models`` and ``real_models`` (no import cycle)."""

from __future__ import annotations


class ModelUnavailable(RuntimeError):
    """The model's weights are not on this machine (and nothing is ever downloaded)."""

    def __init__(self, spec: str, message: str):
        super().__init__(message)
        self.spec = spec


class CheckpointError(ValueError):
    """A checkpoint directory is incomplete, corrupt or unsafe to load."""
