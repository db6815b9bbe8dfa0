"""The pretrained-weights registry in the store (``weights/<backbone>/``).

Hospitals are often air-gapped, so nothing downloads from a model hub: a data team imports a
local weights file once, it is verified against the architecture (a wrong file fails loudly
instead of loading nothing), stored under its fingerprint, and training reads it from the store.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from mmpipe.errors import ConfigError
from mmpipe.models import create_model, load_weights_file, weights_fingerprint
from mmpipe.store import Store


def import_weights(store: Store, backbone: str, path: Path) -> dict[str, str]:
    """Verify ``path`` fits ``backbone`` and register it as that backbone's current weights."""
    state = load_weights_file(path)  # refuses a missing or unreadable file
    create_model(backbone, 5, weights=state)  # raises ConfigError when the file does not fit
    fingerprint = weights_fingerprint(state)
    key = f"weights/{backbone}/{fingerprint}.safetensors"
    if store.head(key) is None:
        store.put(key, save_safetensors({k: v.contiguous() for k, v in state.items()}))
    record = {
        "backbone": backbone,
        "fingerprint": fingerprint,
        "uri": store.uri(key),
        "source_file": path.name,
    }
    store.put_json(f"weights/{backbone}/current.json", record)
    return record


def fetch_weights(store: Store, backbone: str) -> tuple[dict[str, torch.Tensor], str]:
    """The registered weights for ``backbone`` and their fingerprint."""
    if store.head(f"weights/{backbone}/current.json") is None:
        raise ConfigError(
            f"no pretrained weights registered for {backbone!r}: import a local file with "
            f"`mmpipe weights import {backbone} FILE`, or train with init 'random'"
        )
    record = store.get_json(f"weights/{backbone}/current.json")
    state = load_safetensors(store.get(store.key_of(record["uri"])))
    return state, record["fingerprint"]
