"""Resume state of a training run, one object per run in the store, rewritten after every epoch.

A killed process or a pre-empted GPU pod loses at most the epoch it was in: a rerun with the same
training run id loads ``checkpoints/<run>/last.pt`` and carries on with the same model, optimizer,
scheduler, stage, epoch, early-stopping counters, best state so far and RNG states, so it ends
exactly where an uninterrupted run would. Loaded with ``weights_only=True``: tensors and plain
Python values only, nothing that could run code. The object is deleted once the model is saved.
"""

from __future__ import annotations

import io
import random
from typing import Any

import numpy as np
import torch

from mmpipe.store import NotFound, Store

PREFIX = "checkpoints"


def key(training_run_id: str) -> str:
    return f"{PREFIX}/{training_run_id}/last.pt"


def save(store: Store, training_run_id: str, state: dict[str, Any]) -> str:
    """Write ``state`` (tensors and plain values) as the run's last checkpoint; returns its URI."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return store.put(key(training_run_id), buffer.getvalue())


def load(store: Store, training_run_id: str) -> dict[str, Any] | None:
    """The run's last checkpoint, or None when it has none."""
    try:
        body = store.get(key(training_run_id))
    except NotFound:
        return None
    return torch.load(io.BytesIO(body), map_location="cpu", weights_only=True)


def delete(store: Store, training_run_id: str) -> None:
    store.delete([key(training_run_id)])


def rng_states() -> dict[str, Any]:
    """torch (CPU and CUDA), numpy and Python RNG states as tensors and plain values."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "python": random.getstate(),
    }


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
