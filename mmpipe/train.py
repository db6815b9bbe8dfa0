"""Train one candidate from a training plan: the body of `mmpipe train`, locally or in a pod.

The recipe of the transfer-learning papers: a backbone with its early layers frozen, Adam at
1e-3, dropped to 1e-4 at the first plateau of validation macro-F1, early stopping after
``patience`` more epochs without improvement; the best epoch's weights are kept. Training reads
only its plan: augmentation is applied on the fly from the plan's per-class policies, each sample
seeded from the plan seed (so every candidate sees the same augmented images and reruns reproduce),
and the plan's preprocessing (CLAHE, channel mode) goes into the model card that scoring replays.
Loss: cross-entropy, optionally weighted by the plan's class weights and/or focal (``focal_gamma``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

import numpy as np
import sqlalchemy as sa
import torch
from sklearn.metrics import accuracy_score, f1_score

from mmpipe import modelcard
from mmpipe.balance import augment_batch, augmenter, focal_loss
from mmpipe.catalog import Catalog
from mmpipe.config import Settings
from mmpipe.errors import ConfigError
from mmpipe.ingest import load_pixels, run_slug
from mmpipe.models import create_model, get_spec
from mmpipe.store import Store
from mmpipe.weights import fetch_weights

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Candidate:
    """One backbone + options to train; travels as JSON through XCom and the pod's command line."""

    name: str
    backbone: str
    freeze_ratio: float = 0.5
    init: Literal["pretrained", "random"] = "random"
    channel_mode: Literal["replicate", "viridis", "inferno"] | None = None  # None: the plan's
    image_size: int = 64
    epochs: int = 4
    batch_size: int = 32
    lr: float = 1e-3
    lr_finetune: float = 1e-4
    patience: int = 2
    weighted_loss: bool = False  # weight the loss by the plan's inverse-frequency class weights
    focal_gamma: float = 0.0  # > 0: focal loss with this focusing parameter
    seed: int = 0

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Candidate:
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise ConfigError(
                f"unknown candidate option(s) {sorted(unknown)}; known: {', '.join(sorted(known))}"
            )
        candidate = cls(**data)
        spec = get_spec(candidate.backbone)  # unknown backbone -> one clear error
        if candidate.image_size < spec.min_size:
            raise ConfigError(
                f"{candidate.backbone} needs image_size >= {spec.min_size}, got {candidate.image_size}"
            )
        if candidate.init not in ("pretrained", "random"):
            raise ConfigError(f"init must be 'pretrained' or 'random', got {candidate.init!r}")
        if candidate.channel_mode not in (None, *modelcard.CHANNEL_MODES):
            raise ConfigError(
                f"channel_mode must be one of {', '.join(modelcard.CHANNEL_MODES)} (or null for the plan's), "
                f"got {candidate.channel_mode!r}"
            )
        if not 0 <= candidate.focal_gamma <= 10:
            raise ConfigError(f"focal_gamma must be within [0, 10], got {candidate.focal_gamma}")
        return candidate


def criterion(plan: dict, candidate: Candidate, device: torch.device) -> Any:
    """The candidate's loss: cross-entropy or focal, with the plan's class weights if asked."""
    weight = torch.tensor(plan["loss_weights"], device=device) if candidate.weighted_loss else None
    if candidate.focal_gamma > 0:
        return lambda logits, target: focal_loss(logits, target, candidate.focal_gamma, weight)
    return torch.nn.CrossEntropyLoss(weight=weight)


def evaluate_split(
    model: torch.nn.Module, card: modelcard.ModelCard, images: np.ndarray, labels: np.ndarray
) -> dict:
    model.eval()
    probs = modelcard.predict(model, card, images)
    pred = probs.argmax(1)
    eps = 1e-7
    loss = float(-np.log(probs[np.arange(len(labels)), labels] + eps).mean())
    return {
        "loss": loss,
        "accuracy": float(accuracy_score(labels, pred)),
        "macro_f1": float(
            f1_score(labels, pred, average="macro", labels=range(len(card.classes)), zero_division=0)
        ),
    }


def run_ids(airflow_run_id: str, candidate_name: str) -> tuple[str, str]:
    """(training run id, model version) of one candidate in one Airflow run: stable across retries."""
    training_run_id = f"{run_slug(airflow_run_id)}.{candidate_name}"
    return training_run_id, f"{candidate_name}-{hashlib.sha256(training_run_id.encode()).hexdigest()[:10]}"


@contextmanager
def _failure_recorded(catalog: Catalog, training_run_id: str) -> Iterator[None]:
    """A crash (or a kill) after the run was recorded as running marks it failed, then propagates."""
    try:
        yield
    except BaseException:
        catalog.execute(
            "UPDATE training_runs SET status = 'failed', finished_at = CURRENT_TIMESTAMP "
            "WHERE training_run_id = :t AND status = 'running'",
            {"t": training_run_id},
        )
        raise


def train_candidate(
    settings: Settings,
    store: Store,
    catalog: Catalog,
    plan_uri: str,
    candidate: Candidate,
    airflow_run_id: str,
) -> dict[str, str]:
    """Train, record per-epoch metrics, save checkpoint + card; returns URIs for XCom."""
    plan = store.get_json(store.key_of(plan_uri))
    classes = tuple(plan["classes"])
    spec = get_spec(candidate.backbone)
    training_run_id, model_version = run_ids(airflow_run_id, candidate.name)
    device = modelcard.resolve_device(settings.device)
    torch.manual_seed(candidate.seed)
    catalog.upsert(
        "training_runs",
        [
            {
                "training_run_id": training_run_id,
                "airflow_run_id": airflow_run_id,
                "candidate": candidate.name,
                "backbone": candidate.backbone,
                "candidate_json": json.dumps(asdict(candidate), sort_keys=True),
                "dataset_version": plan["dataset_version"],
                "status": "running",
                "device": str(device),
            }
        ],
        ["training_run_id"],
    )
    with _failure_recorded(catalog, training_run_id):
        catalog.execute("DELETE FROM epoch_metrics WHERE training_run_id = :t", {"t": training_run_id})

        weights, fingerprint = (None, None)
        if candidate.init == "pretrained":
            weights, fingerprint = fetch_weights(store, candidate.backbone)
        model = create_model(
            candidate.backbone, len(classes), weights=weights, freeze_ratio=candidate.freeze_ratio
        )
        model.to(device, memory_format=torch.channels_last)

        pixels = load_pixels(store, plan["train"] + plan["val"])
        train_entries = plan["train"]
        val_images = np.stack([pixels[e["image_id"]] for e in plan["val"]])
        val_labels = np.array([classes.index(e["label"]) for e in plan["val"]])
        transforms = {c: augmenter(plan["policies"].get(c, ())) for c in classes}
        preprocessing = plan.get("preprocessing") or {}
        clahe = preprocessing.get("clahe") or {}
        card = modelcard.ModelCard(
            model_version=model_version,
            backbone=candidate.backbone,
            classes=classes,
            canonical_size=int(val_images.shape[-1]),
            image_size=candidate.image_size,
            channel_mode=candidate.channel_mode or preprocessing.get("channel_mode", "replicate"),
            mean=spec.mean,
            std=spec.std,
            init=candidate.init,
            weights_fingerprint=fingerprint,
            freeze_ratio=candidate.freeze_ratio,
            dataset_version=plan["dataset_version"],
            plan_uri=plan_uri,
            training_run_id=training_run_id,
            best_val_macro_f1=0.0,
            clahe_clip_limit=clahe.get("clip_limit"),
            clahe_tiles=int(clahe.get("tiles", 8)),
        )
        loss_fn = criterion(plan, candidate, device)
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=candidate.lr)
        lr = candidate.lr
        best_f1, best_state, stale, epochs_run = -1.0, None, 0, 0
        started = time.monotonic()
        for epoch in range(candidate.epochs):
            t0 = time.monotonic()
            model.train()
            torch.manual_seed(candidate.seed * 1000 + epoch)
            order = np.random.default_rng(candidate.seed * 1000 + epoch).permutation(len(train_entries))
            losses = []
            for start in range(0, len(order), candidate.batch_size):
                positions = [int(i) for i in order[start : start + candidate.batch_size]]
                batch = [train_entries[i] for i in positions]
                images = torch.from_numpy(np.stack([pixels[e["image_id"]] for e in batch]))
                images = augment_batch(images, batch, positions, transforms, plan["seed"], epoch).to(device)
                target = torch.tensor([classes.index(e["label"]) for e in batch], device=device)
                loss = loss_fn(model(modelcard.preprocess_for(card, images)), target)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
            val = evaluate_split(model, card, val_images, val_labels)
            epochs_run = epoch + 1
            catalog.upsert(
                "epoch_metrics",
                [
                    {
                        "training_run_id": training_run_id,
                        "epoch": epoch,
                        "lr": lr,
                        "train_loss": float(np.mean(losses)),
                        "val_loss": val["loss"],
                        "val_accuracy": val["accuracy"],
                        "val_macro_f1": val["macro_f1"],
                        "seconds": time.monotonic() - t0,
                    }
                ],
                ["training_run_id", "epoch"],
            )
            log.info(
                "%s epoch %d: loss %.4f val macro-F1 %.3f",
                candidate.name,
                epoch,
                np.mean(losses),
                val["macro_f1"],
            )
            if val["macro_f1"] > best_f1:
                best_f1, stale = val["macro_f1"], 0
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                continue
            stale += 1
            if lr != candidate.lr_finetune:  # first plateau: fine-tune at the lower rate
                lr = candidate.lr_finetune
                for group in optimizer.param_groups:
                    group["lr"] = lr
                stale = 0
            elif stale >= candidate.patience:
                log.info("%s: early stop after epoch %d", candidate.name, epoch)
                break
        if best_state is not None:
            model.load_state_dict(best_state)
        card = replace(card, best_val_macro_f1=best_f1)
        checkpoint_uri, card_uri = modelcard.save(store, f"models/{model_version}", model, card)
        with catalog.begin() as conn:
            catalog.upsert(
                "models",
                [
                    {
                        "model_version": model_version,
                        "training_run_id": training_run_id,
                        "backbone": candidate.backbone,
                        "checkpoint_uri": checkpoint_uri,
                        "card_uri": card_uri,
                    }
                ],
                ["model_version"],
                conn,
            )
            conn.execute(
                sa.text(
                    "UPDATE training_runs SET status = 'succeeded', epochs_run = :e, best_val_f1 = :f, seconds = :s, "
                    "model_version = :m, finished_at = CURRENT_TIMESTAMP WHERE training_run_id = :t"
                ),
                {
                    "e": epochs_run,
                    "f": best_f1,
                    "s": time.monotonic() - started,
                    "m": model_version,
                    "t": training_run_id,
                },
            )
        return {"model_version": model_version, "card_uri": card_uri, "training_run_id": training_run_id}
