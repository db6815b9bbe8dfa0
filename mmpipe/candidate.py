"""What one training job trains: a backbone and its recipe, checked before any work starts.

Light on purpose (no torch at import): the retrain DAG builds its Params from these defaults at
parse time, and a candidate travels as JSON through XCom and the training pod's command line.
The defaults are the transfer-learning papers' recipe: a pretrained backbone with 60% of its
blocks frozen, head and late blocks at 1e-3, then progressive unfreezing down to 30% at 1e-4;
Adam (0.9, 0.999), batch 16, 10 epochs, early stopping on the validation loss.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields
from typing import Any

from mmpipe.errors import ConfigError

INITS = ("pretrained", "random", "champion")
OPTIMIZERS = ("adam", "adamw")
SCHEDULERS = ("none", "cosine")
AMP_MODES = ("none", "bf16")
CHANNEL_MODES = ("replicate", "viridis", "inferno")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


@dataclass(frozen=True)
class Candidate:
    """One backbone + recipe; every field is settable per candidate from the retrain DAG's Params."""

    name: str
    backbone: str
    init: str = "pretrained"  # pretrained (weights registry) | random | champion (warm start, same backbone)
    freeze_ratio: float = 0.6  # stage 1: share of the backbone's blocks frozen (input side first)
    finetune_freeze_ratio: float = 0.3  # stage 2: share still frozen after progressive unfreezing
    lr: float = 1e-3  # stage 1
    lr_finetune: float = 1e-4  # stage 2, fresh optimizer over the newly trainable parameters
    optimizer: str = "adam"  # adam | adamw, betas (0.9, 0.999)
    weight_decay: float | None = None  # None: 0 for adam, 0.01 for adamw
    scheduler: str = "none"  # none | cosine (annealed over each stage's remaining epochs)
    epochs: int = 10
    batch_size: int = 16
    patience: int = 3  # stage 2: epochs without a lower validation loss before stopping
    plateau_patience: int = 1  # stage 1: epochs without a lower validation loss before stage 2
    min_delta: float = 0.0  # smallest decrease of the validation loss that counts as lower
    image_size: int | None = None  # model input side; None: the backbone's native size
    amp: str = "none"  # none | bf16 (autocast on CPU and CUDA)
    channel_mode: str | None = None  # replicate | viridis | inferno; None: the plan's
    weighted_loss: bool = False  # weight the loss by the plan's inverse-frequency class weights
    focal_gamma: float = 0.0  # > 0: focal loss with this focusing parameter
    seed: int = 0

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Candidate:
        """Checked candidate; without a name, the backbone's (plus the init when not pretrained)."""
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(
                f"unknown candidate option(s) {sorted(unknown)}; known: {', '.join(sorted(known))}"
            )
        if not isinstance(data.get("backbone"), str):
            raise ConfigError(f"a candidate needs a backbone name, got {data.get('backbone')!r}")
        data = dict(data)
        if data.get("name") is None:
            init = data.get("init", cls.init)
            data["name"] = data["backbone"].replace("_", "-") + ("" if init == "pretrained" else f"-{init}")
        candidate = cls(**data)
        candidate.check()
        return candidate

    def check(self) -> None:
        from mmpipe.models import get_spec  # the registry imports torch: only when checking

        spec = get_spec(self.backbone)  # unknown backbone -> one clear error
        _typed(self)
        if not _NAME.match(self.name):
            raise ConfigError(f"candidate name {self.name!r}: letters, digits, '.', '_', '-' (at most 63)")
        choices = {
            "init": INITS,
            "optimizer": OPTIMIZERS,
            "scheduler": SCHEDULERS,
            "amp": AMP_MODES,
            "channel_mode": (None, *CHANNEL_MODES),
        }
        for option, allowed in choices.items():
            if getattr(self, option) not in allowed:
                shown = ", ".join("null" if a is None else a for a in allowed)
                raise ConfigError(f"{option} must be one of {shown}; got {getattr(self, option)!r}")
        ratios = (self.finetune_freeze_ratio, self.freeze_ratio)
        if not all(0 <= r <= 1 for r in ratios) or (self.init != "random" and ratios[0] > ratios[1]):
            raise ConfigError(
                "need 0 <= finetune_freeze_ratio <= freeze_ratio <= 1 (stage 2 unfreezes, never freezes "
                f"more; a random init ignores both); got {self.finetune_freeze_ratio} and {self.freeze_ratio}"
            )
        if self.image_size is not None and self.image_size < spec.min_size:
            raise ConfigError(f"{self.backbone} needs image_size >= {spec.min_size}, got {self.image_size}")
        positive = ("lr", "lr_finetune", "epochs", "batch_size", "patience", "plateau_patience")
        for option in positive:
            if getattr(self, option) <= 0:
                raise ConfigError(f"{option} must be positive, got {getattr(self, option)}")
        if self.min_delta < 0:
            raise ConfigError(f"min_delta must be >= 0, got {self.min_delta}")
        if self.weight_decay is not None and self.weight_decay < 0:
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not 0 <= self.focal_gamma <= 10:
            raise ConfigError(f"focal_gamma must be within [0, 10], got {self.focal_gamma}")

    @property
    def input_size(self) -> int:
        """The model's input side: the candidate's, else the backbone's native size (InceptionV3: 299)."""
        from mmpipe.models import get_spec

        return self.image_size or get_spec(self.backbone).default_size

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def defaults() -> dict[str, Any]:
    """Each option's default (name and backbone have none): what the DAG's shared Params start from."""
    return {f.name: f.default for f in fields(Candidate) if f.name not in ("name", "backbone")}


#: One line per option, for the retrain DAG's Params form and ``mmpipe train --help``.
OPTION_HELP = {
    "name": "Unique within a run; default: the backbone (plus -random / -champion)",
    "backbone": "Registered backbone (mmpipe.models)",
    "init": "pretrained = weights registry; random; champion = warm start from the champion (same backbone)",
    "freeze_ratio": "Stage 1: share of backbone blocks frozen (ignored, with a warning, for init=random)",
    "finetune_freeze_ratio": "Stage 2: share still frozen after progressive unfreezing",
    "lr": "Stage 1 learning rate (head and unfrozen blocks)",
    "lr_finetune": "Stage 2 learning rate, from the validation-loss plateau on",
    "optimizer": "adam or adamw (betas 0.9, 0.999)",
    "weight_decay": "null = 0 for adam, 0.01 for adamw",
    "scheduler": "none or cosine annealing within each stage",
    "epochs": "Most epochs in all",
    "batch_size": "Training batch size",
    "patience": "Stage 2: epochs without a lower validation loss before stopping",
    "plateau_patience": "Stage 1: epochs without a lower validation loss before stage 2",
    "min_delta": "Smallest decrease of the validation loss that counts as an improvement",
    "image_size": "Model input side; null = the backbone's native size (InceptionV3 299, most 224)",
    "amp": "none or bf16 autocast (CPU and CUDA)",
    "channel_mode": "Grayscale to 3 channels; null = the plan's (MMPIPE_CHANNEL_MODE)",
    "weighted_loss": "Weight the loss by the plan's inverse-frequency class weights",
    "focal_gamma": "> 0: focal loss with this gamma",
    "seed": "Plan seed (sampling, augmentation) and the candidate's init and batch order",
}
_JSON_TYPES = {
    "str": ["string"],
    "float": ["number"],
    "int": ["integer"],
    "bool": ["boolean"],
    "float | None": ["null", "number"],
    "int | None": ["null", "integer"],
    "str | None": ["null", "string"],
}
_ENUMS = {"init": INITS, "optimizer": OPTIMIZERS, "scheduler": SCHEDULERS, "amp": AMP_MODES}
_BOUNDS = {
    "freeze_ratio": {"minimum": 0, "maximum": 1},
    "finetune_freeze_ratio": {"minimum": 0, "maximum": 1},
    "epochs": {"minimum": 1, "maximum": 500},
    "batch_size": {"minimum": 1, "maximum": 1024},
    "patience": {"minimum": 1},
    "plateau_patience": {"minimum": 1},
    "image_size": {"minimum": 16, "maximum": 1024},
    "focal_gamma": {"minimum": 0, "maximum": 10},
    "min_delta": {"minimum": 0},
    "seed": {"minimum": 0},
}


def option_schema(name: str) -> dict[str, Any]:
    """JSON schema of one option (type, enum, bounds), for Airflow Params."""
    kind = {f.name: f.type for f in fields(Candidate)}[name]
    schema: dict[str, Any] = {"type": _JSON_TYPES[kind], **_BOUNDS.get(name, {})}
    if len(schema["type"]) == 1:
        schema["type"] = schema["type"][0]
    if name in _ENUMS:
        schema["enum"] = list(_ENUMS[name])
    if name == "channel_mode":
        schema["enum"] = [None, *CHANNEL_MODES]
    return schema


def candidate_schema(backbones: list[str]) -> dict[str, Any]:
    """JSON schema of one candidate object: a backbone and any options."""
    properties = {f.name: option_schema(f.name) for f in fields(Candidate)}
    properties["backbone"] = {"type": "string", "enum": backbones}
    return {
        "type": "object",
        "required": ["backbone"],
        "additionalProperties": False,
        "properties": properties,
    }


def _typed(candidate: Candidate) -> None:
    """JSON gives any type: each option must have its field's type (an int is a valid float)."""
    for f in fields(candidate):
        value = getattr(candidate, f.name)
        kinds = {
            "str": (str,),
            "float": (int, float),
            "int": (int,),
            "bool": (bool,),
            "float | None": (int, float, type(None)),
            "int | None": (int, type(None)),
            "str | None": (str, type(None)),
        }[f.type]
        if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
            raise ConfigError(f"candidate option {f.name} must be {f.type}, got {value!r}")
