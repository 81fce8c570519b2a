"""Training checkpoints kept in the artifact store, so any worker can resume a crashed run.

A long stage (static fit, deformation training) saves its full training state every N
steps under ``checkpoints/<stage>/<key>/latest.pt``, keyed by the same content key the
stage will publish under: a rerun of the same work finds the checkpoint and continues,
while changed inputs or config get a fresh key and start over. The checkpoint is deleted
once the stage is published.

The state includes every RNG the loop draws from (torch, numpy, python, and CUDA's where
CUDA is in use), so a resumed run on the device that saved it produces exactly the
parameters an uninterrupted one would. It loads on any device: tensors come back on the CPU
and the caller moves them to its own device (``load_state_dict`` copies into the model's).
"""

from __future__ import annotations

import io
import random
from typing import Any

import numpy as np
import torch

from .base import ArtifactStore

ROOT = "checkpoints"


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    # a checkpoint from a GPU resumed on the CPU (or on fewer GPUs) has no CUDA draws to repeat
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


class Checkpoints:
    """Save/load the latest training state of one stage run."""

    def __init__(self, store: ArtifactStore, stage: str, key: str):
        self.store = store
        self.key = f"{ROOT}/{stage}/{key}/latest.pt"

    def save(self, state: dict[str, Any]) -> None:
        buf = io.BytesIO()
        torch.save({**state, "rng": rng_state()}, buf)
        self.store.put_bytes(self.key, buf.getvalue())  # one object: a crash mid-write leaves the old one

    def load(self) -> dict[str, Any] | None:
        """The saved state (RNGs restored), or None when there is nothing to resume."""
        if not self.store.exists(self.key):
            return None
        # weights_only=False: the state holds numpy/python RNG tuples; the store is ours (trusted).
        # map_location: a checkpoint saved on cuda:1 loads on a CPU worker or on cuda:0
        state = torch.load(io.BytesIO(self.store.get_bytes(self.key)), map_location="cpu", weights_only=False)
        set_rng_state(state.pop("rng"))
        return state

    def clear(self) -> None:
        if self.store.exists(self.key):
            self.store.delete(self.key)
