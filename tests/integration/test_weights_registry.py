"""The pretrained-weights registry: verified import from a local file, fetch from the store."""

from __future__ import annotations

import pytest
import torch

from mmpipe.errors import ConfigError
from mmpipe.models import create_model, export_reference_weights, load_weights_file
from mmpipe.weights import fetch_weights, import_weights

pytestmark = pytest.mark.integration


def test_import_then_fetch_round_trip(ready, tmp_path) -> None:
    _, store, _ = ready()
    path = tmp_path / "tinycnn.safetensors"
    export_reference_weights("tinycnn", path, seed=3)
    record = import_weights(store, "tinycnn", path)
    assert store.head(store.key_of(record["uri"])) is not None
    state, fingerprint = fetch_weights(store, "tinycnn")
    assert fingerprint == record["fingerprint"]
    model = create_model("tinycnn", 5, weights=state)
    original = load_weights_file(path)
    assert torch.equal(model.state_dict()["features.0.weight"], original["features.0.weight"])
    # Importing the same file again is a no-op on the stored object.
    assert import_weights(store, "tinycnn", path)["uri"] == record["uri"]


def test_wrong_architecture_is_refused_and_nothing_registered(ready, tmp_path) -> None:
    _, store, _ = ready()
    path = tmp_path / "mobilenet.safetensors"
    export_reference_weights("mobilenetv2", path)
    with pytest.raises(ConfigError, match="tinycnn"):
        import_weights(store, "tinycnn", path)
    with pytest.raises(ConfigError, match="mmpipe weights import tinycnn"):
        fetch_weights(store, "tinycnn")


def test_missing_file(ready, tmp_path) -> None:
    _, store, _ = ready()
    with pytest.raises(ConfigError, match="not found"):
        import_weights(store, "resnet18", tmp_path / "nope.pth")
