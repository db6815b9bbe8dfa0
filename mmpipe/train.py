"""Train one candidate from a training plan: the body of `mmpipe train`, locally or in a pod.

The transfer-learning papers' recipe (:class:`mmpipe.candidate.Candidate` holds it and its
options). Stage 1 trains the head and the late blocks at ``lr`` with the leading ``freeze_ratio``
of the backbone's blocks frozen. At the first plateau of the validation loss, stage 2 restores the
best state, unfreezes down to ``finetune_freeze_ratio`` (progressive unfreezing) and trains with a
fresh optimizer at ``lr_finetune``; it stops early after ``patience`` epochs without a lower
validation loss. The best-validation-loss state is kept. A randomly initialised backbone is never
frozen (frozen random layers only cripple a network): its freeze shares are ignored, with the
warning recorded in the model card and the training run.

At the end, temperature scaling and the out-of-distribution threshold are fitted on the validation
split (:mod:`mmpipe.calibration`) and stored in the model card, with the whole recipe. After every
epoch the run's resume state goes to the store (:mod:`mmpipe.checkpoints`): a killed job rerun with
the same run id carries on from its last epoch and ends where an uninterrupted run would.

Training reads only its plan: shards are read once into memory; each batch is augmented from the
plan's per-class policies (each sample seeded from the plan seed, so every candidate sees the same
images and reruns reproduce) and preprocessed as the model card says (the transform scoring
replays), in the training process or in DataLoader workers (``train_loader_workers``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import sqlalchemy as sa
import torch
from sklearn.metrics import accuracy_score, f1_score
from torch.utils.data import DataLoader, Dataset, Sampler

from mmpipe import calibration, checkpoints, modelcard
from mmpipe.balance import augment_batch, augmenter, focal_loss
from mmpipe.candidate import Candidate
from mmpipe.catalog import Catalog
from mmpipe.config import Settings
from mmpipe.errors import ConfigError, MmpipeError
from mmpipe.ingest import load_pixels, run_slug
from mmpipe.models import create_model, freeze, get_spec, set_train_mode, weights_fingerprint
from mmpipe.promote import CHAMPION
from mmpipe.store import Store
from mmpipe.weights import fetch_weights

log = logging.getLogger(__name__)

ADAM_BETAS = (0.9, 0.999)
ADAMW_WEIGHT_DECAY = 0.01


def effective_recipe(candidate: Candidate) -> tuple[Candidate, list[str]]:
    """The recipe as trained, and the warnings for options it ignores (freezing a random init)."""
    if candidate.init == "random" and (candidate.freeze_ratio or candidate.finetune_freeze_ratio):
        warning = (
            f"init 'random': freeze_ratio {candidate.freeze_ratio} and finetune_freeze_ratio "
            f"{candidate.finetune_freeze_ratio} ignored, every layer trains (freezing randomly "
            "initialised layers only cripples the network)"
        )
        return replace(candidate, freeze_ratio=0.0, finetune_freeze_ratio=0.0), [warning]
    return candidate, []


def criterion(plan: dict, candidate: Candidate, device: torch.device) -> Any:
    """The candidate's loss: cross-entropy or focal, with the plan's class weights if asked."""
    weight = torch.tensor(plan["loss_weights"], device=device) if candidate.weighted_loss else None
    if candidate.focal_gamma > 0:
        return lambda logits, target: focal_loss(logits, target, candidate.focal_gamma, weight)
    return torch.nn.CrossEntropyLoss(weight=weight)


def make_optimizer(candidate: Candidate, model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    """Adam or AdamW (betas 0.9/0.999) over the parameters that train now."""
    params = [p for p in model.parameters() if p.requires_grad]
    if candidate.optimizer == "adamw":
        decay = ADAMW_WEIGHT_DECAY if candidate.weight_decay is None else candidate.weight_decay
        return torch.optim.AdamW(params, lr=lr, betas=ADAM_BETAS, weight_decay=decay)
    return torch.optim.Adam(params, lr=lr, betas=ADAM_BETAS, weight_decay=candidate.weight_decay or 0.0)


def make_scheduler(
    candidate: Candidate, optimizer: torch.optim.Optimizer, epochs: int
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """Cosine annealing over a stage's ``epochs`` (stepped per epoch), or none."""
    if candidate.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(epochs, 1))
    return None


def amp_dtype(candidate: Candidate) -> torch.dtype | None:
    return torch.bfloat16 if candidate.amp == "bf16" else None


# --- data ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainingData:
    """The plan's images in memory, read once from the shards, in plan order."""

    entries: list[dict]
    images: np.ndarray  # (N, H, W) uint8, train entries in plan order
    labels: np.ndarray  # (N,) int64 class indices
    val_images: np.ndarray
    val_labels: np.ndarray


def load_data(store: Store, plan: dict) -> TrainingData:
    classes = plan["classes"]
    pixels = load_pixels(store, plan["train"] + plan["val"])

    def arrays(entries: list[dict]) -> tuple[np.ndarray, np.ndarray]:
        images = np.stack([pixels[e["image_id"]] for e in entries])
        return images, np.array([classes.index(e["label"]) for e in entries], dtype=np.int64)

    images, labels = arrays(plan["train"])
    return TrainingData(plan["train"], images, labels, *arrays(plan["val"]))


class PlanBatches(Dataset):
    """Batch ``(epoch, i)`` of a run: the plan positions of that epoch's order, augmented by their class
    policy and preprocessed as the model card says. Pure given the seeds, so a worker process
    computes exactly what the training process would."""

    def __init__(
        self, data: TrainingData, card: modelcard.ModelCard, transforms: dict, plan_seed: int,
        order_seed: int, batch_size: int,
    ) -> None:  # fmt: skip
        self.data, self.card, self.transforms = data, card, transforms
        self.plan_seed, self.order_seed, self.batch_size = plan_seed, order_seed, batch_size
        self._order: tuple[int, np.ndarray] | None = None

    def per_epoch(self) -> int:
        return math.ceil(len(self.data.entries) / self.batch_size)

    def __len__(self) -> int:
        return self.per_epoch()

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, index = key
        if self._order is None or self._order[0] != epoch:
            self._order = epoch, epoch_order(self.order_seed, epoch, len(self.data.entries))
        order = self._order[1]
        positions = [int(p) for p in order[index * self.batch_size : (index + 1) * self.batch_size]]
        images = torch.from_numpy(self.data.images[positions])
        entries = [self.data.entries[p] for p in positions]
        images = augment_batch(images, entries, positions, self.transforms, self.plan_seed, epoch)
        return modelcard.preprocess_for(self.card, images), torch.from_numpy(self.data.labels[positions])


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng(seed * 1000 + epoch).permutation(n)


class _EpochKeys(Sampler):
    def __init__(self, per_epoch: int) -> None:
        self.per_epoch, self.epoch = per_epoch, 0

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return ((self.epoch, i) for i in range(self.per_epoch))

    def __len__(self) -> int:
        return self.per_epoch


#: Niceness of loader workers: their few milliseconds per batch fill the gaps of the model's threads
#: instead of preempting one (on a 2-core machine a preempted intra-op thread stalls the whole op at
#: its barrier), while a batch still comes well within a step's time on a loaded machine.
LOADER_NICENESS = 10


def _yield_to_training(worker_id: int) -> None:
    os.nice(LOADER_NICENESS)


class TrainLoader:
    """The run's batches, epoch by epoch, from one DataLoader: ``workers`` > 0 processes prepare them
    while the model computes, at a lower priority, and stay up across epochs (no start-up cost per
    epoch)."""

    def __init__(self, batches: PlanBatches, workers: int, device: torch.device) -> None:
        self._keys = _EpochKeys(batches.per_epoch())
        self._loader = DataLoader(
            batches,
            batch_size=None,
            sampler=self._keys,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=device.type == "cuda",
            prefetch_factor=2 if workers else None,
            worker_init_fn=_yield_to_training if workers else None,
        )

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self._keys.epoch = epoch
        return iter(self._loader)


def train_step(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, loss_fn: Callable, inputs: torch.Tensor,
    target: torch.Tensor, amp: torch.dtype | None,
) -> torch.Tensor:  # fmt: skip
    """One forward, backward and optimizer step; the loss stays on the device (no sync per step)."""
    with torch.autocast(inputs.device.type, dtype=amp, enabled=amp is not None):
        loss = loss_fn(model(inputs), target)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def run_epoch(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, loss_fn: Callable, batches: Any,
    device: torch.device, amp: torch.dtype | None,
) -> float:  # fmt: skip
    """One pass over ``batches`` of (inputs, target); the mean training loss."""
    total, steps = torch.zeros((), device=device), 0
    for inputs, target in batches:
        inputs, target = inputs.to(device, non_blocking=True), target.to(device, non_blocking=True)
        total += train_step(model, optimizer, loss_fn, inputs, target, amp)
        steps += 1
    return float(total) / max(steps, 1)


def evaluate_split(
    model: torch.nn.Module, card: modelcard.ModelCard, images: np.ndarray, labels: np.ndarray
) -> tuple[dict, np.ndarray]:
    """Loss (cross-entropy at temperature 1), accuracy and macro-F1 on a split, and its logits."""
    model.eval()
    logits = modelcard.logits(model, card, images)
    pred = logits.argmax(1)
    metrics = {
        "loss": calibration.nll(logits, labels),
        "accuracy": float(accuracy_score(labels, pred)),
        "macro_f1": float(
            f1_score(labels, pred, average="macro", labels=range(len(card.classes)), zero_division=0)
        ),
    }
    return metrics, logits


# --- initial weights ----------------------------------------------------------------------------


def champion_checkpoint(catalog: Catalog, backbone: str) -> dict[str, Any]:
    """The champion's model row, for a warm start of the same backbone; a clear error otherwise."""
    rows = catalog.query(
        "SELECT m.model_version, m.backbone, m.checkpoint_uri, m.card_uri FROM model_aliases a "
        "JOIN models m ON m.model_version = a.model_version WHERE a.alias = :a",
        a=CHAMPION,
    )
    if not rows:
        raise ConfigError("init 'champion': no champion promoted yet; use init 'pretrained' or 'random'")
    if rows[0]["backbone"] != backbone:
        raise ConfigError(
            f"init 'champion' warm-starts from the champion's weights, but the champion "
            f"({rows[0]['model_version']}) is a {rows[0]['backbone']}, not a {backbone}: use init "
            f"'pretrained' or 'random' for {backbone}"
        )
    return rows[0]


def build_model(
    store: Store, catalog: Catalog, candidate: Candidate, classes: tuple[str, ...]
) -> tuple[torch.nn.Module, str | None]:
    """The candidate's model from its init, and the fingerprint of the weights it started from.

    pretrained: the weights registry, strictly; champion: the champion's checkpoint (the head too
    when the classes are the same), as the review paper's multi-stage transfer; random: seeded.
    """
    if candidate.init == "random":
        return create_model(candidate.backbone, len(classes)), None
    if candidate.init == "pretrained":
        weights, fingerprint = fetch_weights(store, candidate.backbone)
        return create_model(candidate.backbone, len(classes), weights=weights), fingerprint
    from safetensors.torch import load as load_safetensors

    row = champion_checkpoint(catalog, candidate.backbone)
    state = load_safetensors(store.get(store.key_of(row["checkpoint_uri"])))
    model = create_model(candidate.backbone, len(classes), weights=state)
    champion_classes = tuple(store.get_json(store.key_of(row["card_uri"]))["classes"])
    if champion_classes == classes:
        model.load_state_dict(state, strict=True)
    return model, weights_fingerprint(state)


# --- the run ------------------------------------------------------------------------------------


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


@dataclass
class Progress:
    """Where a run is: what a checkpoint restores besides model, optimizer and scheduler."""

    epoch: int = -1  # last finished epoch
    stage: int = 1
    best_loss: float = math.inf
    best_epoch: int = -1
    best_state: dict[str, torch.Tensor] | None = None
    best_counted: float = math.inf  # the loss that the last counted improvement (by min_delta) reached
    stale: int = 0  # epochs since the validation loss last improved by more than min_delta
    finished: bool = False
    seconds: float = 0.0
    resumed: int = 0

    def to_state(self) -> dict[str, Any]:
        return dict(vars(self))


def _stage_setup(
    candidate: Candidate, model: torch.nn.Module, stage: int, epochs_left: int
) -> tuple[torch.optim.Optimizer, Any]:
    """Freeze for ``stage`` and a fresh optimizer (and scheduler) over what trains in it."""
    freeze(model, candidate.freeze_ratio if stage == 1 else candidate.finetune_freeze_ratio)
    optimizer = make_optimizer(candidate, model, candidate.lr if stage == 1 else candidate.lr_finetune)
    return optimizer, make_scheduler(candidate, optimizer, epochs_left)


def training_card(
    plan: dict, plan_uri: str, candidate: Candidate, model_version: str, training_run_id: str,
    fingerprint: str | None, warnings: list[str], canonical_size: int,
) -> modelcard.ModelCard:  # fmt: skip
    """The model card as training starts: the transform the plan and candidate define (what training
    feeds the model and scoring replays) and the whole recipe; metrics and calibration come at the end."""
    preprocessing = plan.get("preprocessing") or {}
    clahe = preprocessing.get("clahe") or {}
    spec = get_spec(candidate.backbone)
    recipe, _ = effective_recipe(candidate)
    return modelcard.ModelCard(
        model_version=model_version,
        backbone=candidate.backbone,
        classes=tuple(plan["classes"]),
        canonical_size=canonical_size,
        image_size=candidate.input_size,
        channel_mode=candidate.channel_mode or preprocessing.get("channel_mode", "replicate"),
        mean=spec.mean,
        std=spec.std,
        init=candidate.init,
        weights_fingerprint=fingerprint,
        freeze_ratio=recipe.freeze_ratio,
        dataset_version=plan["dataset_version"],
        plan_uri=plan_uri,
        training_run_id=training_run_id,
        best_val_macro_f1=0.0,
        clahe_clip_limit=clahe.get("clip_limit"),
        clahe_tiles=int(clahe.get("tiles", 8)),
        recipe=candidate.to_dict(),
        warnings=tuple(warnings),
    )


def resume_key(candidate: Candidate, plan: dict) -> str:
    """What a checkpoint must have been written for: the same recipe on the same plan."""
    return json.dumps({"candidate": candidate.to_dict(), "plan": plan["dataset_version"]}, sort_keys=True)


def train_candidate(
    settings: Settings,
    store: Store,
    catalog: Catalog,
    plan_uri: str,
    candidate: Candidate,
    airflow_run_id: str,
) -> dict[str, str]:
    """Train (or resume, or return the finished run), record epochs, save model + card; URIs for XCom."""
    training_run_id, model_version = run_ids(airflow_run_id, candidate.name)
    done = catalog.query(
        "SELECT card_uri FROM models WHERE model_version = :m AND training_run_id = :t",
        m=model_version,
        t=training_run_id,
    )
    if done:  # a rerun after success (e.g. the task died writing its result) is a no-op
        return {
            "model_version": model_version,
            "card_uri": done[0]["card_uri"],
            "training_run_id": training_run_id,
        }
    plan = store.get_json(store.key_of(plan_uri))
    classes = tuple(plan["classes"])
    recipe, warnings = effective_recipe(candidate)
    for warning in warnings:
        log.warning("%s: %s", candidate.name, warning)
    device = modelcard.resolve_device(settings.device)
    saved = checkpoints.load(store, training_run_id)
    if saved is not None and saved["key"] != resume_key(candidate, plan):
        log.warning(
            "%s: checkpoint of another recipe or plan under this run id; starting over", candidate.name
        )
        saved = None
    progress = Progress(**saved["progress"]) if saved else Progress()
    if saved:
        progress.resumed += 1
        log.info("%s: resuming after epoch %d (stage %d)", candidate.name, progress.epoch, progress.stage)
    catalog.upsert(
        "training_runs",
        [
            {
                "training_run_id": training_run_id,
                "airflow_run_id": airflow_run_id,
                "candidate": candidate.name,
                "backbone": candidate.backbone,
                "candidate_json": json.dumps(candidate.to_dict(), sort_keys=True),
                "dataset_version": plan["dataset_version"],
                "status": "running",
                "device": str(device),
                "warnings": json.dumps(warnings) if warnings else None,
                "resumed": progress.resumed,
            }
        ],
        ["training_run_id"],
    )
    with _failure_recorded(catalog, training_run_id):
        catalog.execute(
            "DELETE FROM epoch_metrics WHERE training_run_id = :t AND epoch > :e",
            {"t": training_run_id, "e": progress.epoch},
        )
        torch.manual_seed(candidate.seed)
        model, fingerprint = build_model(store, catalog, recipe, classes)
        model.to(device, memory_format=torch.channels_last)
        data = load_data(store, plan)
        card = training_card(
            plan, plan_uri, candidate, model_version, training_run_id, fingerprint, warnings,
            canonical_size=int(data.val_images.shape[-1]),
        )  # fmt: skip
        optimizer, scheduler = _stage_setup(recipe, model, progress.stage, recipe.epochs)
        if saved:
            model.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
            if scheduler is not None:
                scheduler.load_state_dict(saved["scheduler"])
            checkpoints.set_rng_states(saved["rng"])
        loss_fn = criterion(plan, recipe, device)
        transforms = {c: augmenter(plan["policies"].get(c, ())) for c in classes}
        batches = PlanBatches(data, card, transforms, plan["seed"], candidate.seed, recipe.batch_size)
        loader = TrainLoader(batches, settings.train_loader_workers, device)
        started = time.monotonic() - progress.seconds
        for epoch in range(progress.epoch + 1, 0 if progress.finished else recipe.epochs):
            t0 = time.monotonic()
            epoch_batches = loader.epoch(epoch)  # may draw the workers' base seed: before seeding
            torch.manual_seed(candidate.seed * 1000 + epoch)
            lr = optimizer.param_groups[0]["lr"]
            set_train_mode(model)
            train_loss = run_epoch(model, optimizer, loss_fn, epoch_batches, device, amp_dtype(recipe))
            if scheduler is not None:
                scheduler.step()
            val, _ = evaluate_split(model, card, data.val_images, data.val_labels)
            if not math.isfinite(val["loss"]):
                raise MmpipeError(
                    f"{candidate.name}: validation loss is {val['loss']} at epoch {epoch}: training diverged "
                    "(try a lower lr)"
                )
            catalog.upsert(
                "epoch_metrics",
                [
                    {
                        "training_run_id": training_run_id,
                        "epoch": epoch,
                        "stage": progress.stage,
                        "lr": lr,
                        "train_loss": train_loss,
                        "val_loss": val["loss"],
                        "val_accuracy": val["accuracy"],
                        "val_macro_f1": val["macro_f1"],
                        "seconds": time.monotonic() - t0,
                    }
                ],
                ["training_run_id", "epoch"],
            )
            log.info(
                "%s epoch %d (stage %d, lr %g): train loss %.4f, val loss %.4f, val macro-F1 %.3f",
                candidate.name, epoch, progress.stage, lr, train_loss, val["loss"],
                val["macro_f1"],
            )  # fmt: skip
            progress.epoch = epoch
            if val["loss"] < progress.best_loss:  # the best state is the lowest loss, however little lower
                progress.best_loss, progress.best_epoch = val["loss"], epoch
                progress.best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            if val["loss"] < progress.best_counted - recipe.min_delta:
                progress.best_counted, progress.stale = val["loss"], 0
            else:
                progress.stale += 1
            if (
                progress.stage == 1
                and progress.stale >= recipe.plateau_patience
                and epoch + 1 < recipe.epochs
            ):
                log.info("%s: validation loss plateau, stage 2 (progressive unfreezing)", candidate.name)
                model.load_state_dict(progress.best_state)
                progress.stage, progress.stale = 2, 0
                optimizer, scheduler = _stage_setup(recipe, model, 2, recipe.epochs - epoch - 1)
            elif progress.stage == 2 and progress.stale >= recipe.patience:
                log.info("%s: early stop after epoch %d", candidate.name, epoch)
                progress.finished = True
            progress.seconds = time.monotonic() - started
            checkpoints.save(
                store,
                training_run_id,
                {
                    "key": resume_key(candidate, plan),
                    "progress": progress.to_state(),
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict() if scheduler is not None else None,
                    "rng": checkpoints.rng_states(),
                },
            )
            if progress.finished:
                break
        return _finish(store, catalog, model, card, data, progress, training_run_id, model_version)


def _finish(
    store: Store, catalog: Catalog, model: torch.nn.Module, card: modelcard.ModelCard, data: TrainingData,
    progress: Progress, training_run_id: str, model_version: str,
) -> dict[str, str]:  # fmt: skip
    """Best state, calibration on the validation split, model + card, catalog rows; drop the checkpoint."""
    model.load_state_dict(progress.best_state)
    val, logits = evaluate_split(model, card, data.val_images, data.val_labels)
    fitted = calibration.calibrate(logits, data.val_labels)
    card = replace(
        card,
        best_val_macro_f1=val["macro_f1"],
        temperature=fitted.temperature,
        ood_score=fitted.ood_score,
        ood_threshold=fitted.ood_threshold,
        ood_recall=fitted.ood_recall,
        ece_before=fitted.ece_before,
        ece_after=fitted.ece_after,
    )
    log.info(
        "%s: best epoch %d, val macro-F1 %.3f; temperature %.3f, ECE %.4f -> %.4f",
        card.model_version, progress.best_epoch, val["macro_f1"], fitted.temperature, fitted.ece_before,
        fitted.ece_after,
    )  # fmt: skip
    checkpoint_uri, card_uri = modelcard.save(store, f"models/{model_version}", model, card)
    with catalog.begin() as conn:
        catalog.upsert(
            "models",
            [
                {
                    "model_version": model_version,
                    "training_run_id": training_run_id,
                    "backbone": card.backbone,
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
                "e": progress.epoch + 1,
                "f": val["macro_f1"],
                "s": progress.seconds,
                "m": model_version,
                "t": training_run_id,
            },
        )
    checkpoints.delete(store, training_run_id)
    return {"model_version": model_version, "card_uri": card_uri, "training_run_id": training_run_id}
