"""Evaluate a model on a frozen test snapshot: the numbers promotion and the leaderboard trust.

Metrics follow the papers: accuracy; per-class and macro precision, recall, F1 and specificity;
one-vs-rest AUC-ROC; the confusion matrix; calibration as expected calibration error (ECE) before
and after the card's temperature (fitted on validation by training). Also the evidence a gate and a
reader need: per-image latency, reduced-precision agreement (scoring's bf16/fp16 switch), the two
reference baselines on the same snapshot, PNGs (ROC, confusion, reliability, training curves), and
a fixed batch of predictions the smoke check replays. Every evaluation names the snapshot it used,
and the model card records its latest one (the card is rewritten; the checkpoint never is).
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    precision_recall_fscore_support,
    roc_auc_score,
    roc_curve,
)

from mmpipe import modelcard
from mmpipe.baselines import reference_baselines
from mmpipe.calibration import expected_calibration_error, probabilities
from mmpipe.catalog import Catalog
from mmpipe.config import Settings
from mmpipe.errors import MmpipeError
from mmpipe.ingest import load_pixels
from mmpipe.splits import snapshot_images
from mmpipe.store import Store


def compute_metrics(labels: np.ndarray, probs: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    """All test metrics from true labels (N,) and probabilities (N, C). Pure."""
    k = len(classes)
    pred = probs.argmax(1)
    idx = list(range(k))
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, pred, labels=idx, zero_division=0
    )
    cm = confusion_matrix(labels, pred, labels=idx)
    total = cm.sum()
    specificity = []
    for c in idx:
        tn = total - cm[c, :].sum() - cm[:, c].sum() + cm[c, c]
        fp = cm[:, c].sum() - cm[c, c]
        specificity.append(float(tn / (tn + fp)) if tn + fp else 0.0)
    aucs: list[float | None] = []
    for c in idx:
        positives = labels == c
        aucs.append(
            float(roc_auc_score(positives, probs[:, c])) if 0 < positives.sum() < len(labels) else None
        )
    valid_auc = [a for a in aucs if a is not None]
    ece, reliability = expected_calibration_error(probs, labels)
    per_class = {
        name: {
            "precision": float(precision[c]),
            "recall": float(recall[c]),
            "f1": float(f1[c]),
            "specificity": specificity[c],
            "auc": aucs[c],
            "support": int(support[c]),
        }
        for c, name in enumerate(classes)
    }
    return {
        "n_images": len(labels),
        "accuracy": float(accuracy_score(labels, pred)),
        "macro_precision": float(np.mean(precision)),
        "macro_recall": float(np.mean(recall)),
        "macro_f1": float(np.mean(f1)),
        "macro_specificity": float(np.mean(specificity)),
        "macro_auc": float(np.mean(valid_auc)) if valid_auc else None,
        "ece": ece,
        "per_class": per_class,
        "confusion": cm.tolist(),
        "reliability": reliability,
    }


def _png(fig: Any) -> bytes:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return buffer.getvalue()


def _figure(*size: float) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, 1, figsize=size)


def plot_confusion(confusion: Sequence[Sequence[int]], classes: Sequence[str], title: str) -> bytes:
    fig, ax = _figure(6, 5)
    cm = np.array(confusion)
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center", color="black")
    ax.set_title(f"confusion matrix: {title}")
    return _png(fig)


def plot_roc(labels: np.ndarray, probs: np.ndarray, classes: Sequence[str], title: str) -> bytes:
    """One-vs-rest ROC curve per class (classes absent from the snapshot are left out)."""
    fig, ax = _figure(6, 5)
    for c, name in enumerate(classes):
        positives = labels == c
        if 0 < positives.sum() < len(labels):
            fpr, tpr, _ = roc_curve(positives, probs[:, c])
            ax.plot(fpr, tpr, label=f"{name} (AUC {roc_auc_score(positives, probs[:, c]):.3f})")
    ax.plot([0, 1], [0, 1], "--", color="gray")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(f"ROC (one vs rest): {title}")
    ax.legend(loc="lower right", fontsize="small")
    return _png(fig)


def plot_reliability(
    before: tuple[float, list], after: tuple[float, list], temperature: float, title: str
) -> bytes:
    """Reliability diagram before and after the card's temperature."""
    fig, ax = _figure(6, 5)
    for (ece, table), label in ((before, "T = 1"), (after, f"T = {temperature:.2f}")):
        if table:
            conf, acc, _ = zip(*table, strict=True)
            ax.plot(conf, acc, "o-", label=f"{label} (ECE {ece:.3f})")
    ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(f"reliability: {title}")
    ax.legend()
    return _png(fig)


def stage_two_start(epochs: Sequence[dict[str, Any]]) -> int | None:
    """The first epoch trained in stage 2 (progressive unfreezing at ``lr_finetune``), as recorded in
    ``epoch_metrics``; None when the run never left stage 1. Pure."""
    return next((e["epoch"] for e in epochs if e["stage"] == 2), None)


def plot_training_curves(epochs: Sequence[dict[str, Any]], title: str) -> bytes:
    """Loss (train, validation) and validation macro-F1 per epoch, from ``epoch_metrics``, with a line
    where stage 2 begins: a reader sees which part of the curve is the fine-tuning."""
    fig, ax = _figure(7, 4.5)
    x = [e["epoch"] for e in epochs]
    start = stage_two_start(epochs)
    if start is not None:
        ax.axvline(start - 0.5, color="grey", linestyle=":", label=f"stage 2 (from epoch {start})")
    ax.plot(x, [e["train_loss"] for e in epochs], "o-", label="train loss")
    ax.plot(x, [e["val_loss"] for e in epochs], "o-", label="validation loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    twin = ax.twinx()
    twin.plot(x, [e["val_macro_f1"] for e in epochs], "s--", color="tab:green", label="validation macro-F1")
    twin.set_ylabel("macro-F1")
    twin.set_ylim(0, 1.02)
    lines = ax.get_legend_handles_labels()
    more = twin.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], loc="center right")
    ax.set_title(f"training curves: {title}")
    return _png(fig)


def precision_agreement(
    model: torch.nn.Module, card: modelcard.ModelCard, images: np.ndarray, reference: np.ndarray
) -> dict[str, float]:
    """Share of predictions a reduced-precision autocast keeps equal to float32 (``reference`` logits),
    on the model's device: bfloat16 on CPU; float16 and bfloat16 on CUDA. Scoring reads it from the card."""
    device = next(model.parameters()).device
    dtypes = (torch.bfloat16,) if device.type == "cpu" else (torch.float16, torch.bfloat16)
    expected = reference.argmax(1)
    return {
        str(dtype).removeprefix("torch."): float(
            (modelcard.logits(model, card, images, autocast=dtype).argmax(1) == expected).mean()
        )
        for dtype in dtypes
    }


BASELINE_COLUMNS = ("n_images", "accuracy", "macro_precision", "macro_recall", "macro_f1")
BASELINE_COLUMNS += ("macro_specificity", "macro_auc")


def ensure_baselines(
    store: Store,
    catalog: Catalog,
    plan_uri: str,
    dataset_version: str,
    snapshot: str,
    images: np.ndarray,
    labels: np.ndarray,
    classes: Sequence[str],
) -> dict[str, dict[str, Any]]:
    """The reference baselines fitted on the plan's train split and scored on ``snapshot``, by name;
    computed once per (dataset version, snapshot), then read back."""
    query = "SELECT * FROM baseline_evaluations WHERE dataset_version = :d AND test_snapshot = :s"
    recorded = catalog.query(query, d=dataset_version, s=snapshot)
    if len(recorded) == 2:
        return {r["baseline"]: r for r in recorded}
    plan = store.get_json(store.key_of(plan_uri))
    train = list({e["image_id"]: e for e in plan["train"]}.values())  # unique images, un-augmented
    pixels = load_pixels(store, train)
    train_images = np.stack([pixels[e["image_id"]] for e in train])
    train_labels = np.array([list(classes).index(e["label"]) for e in train])
    rows = []
    for name, probs in reference_baselines(train_images, train_labels, images, len(classes)).items():
        metrics = compute_metrics(labels, probs, classes)
        rows.append(
            {
                "dataset_version": dataset_version,
                "test_snapshot": snapshot,
                "baseline": name,
                "n_train": len(train),
                **{k: metrics[k] for k in BASELINE_COLUMNS},
                "per_class_json": json.dumps(metrics["per_class"], sort_keys=True),
            }
        )
    catalog.upsert("baseline_evaluations", rows, ["dataset_version", "test_snapshot", "baseline"])
    return {r["baseline"]: r for r in catalog.query(query, d=dataset_version, s=snapshot)}


#: Images of the snapshot (the first by image id) whose evaluation predictions the smoke check replays.
SMOKE_BATCH = 16
#: Largest difference in any probability the smoke check tolerates (another machine's float rounding).
SMOKE_ATOL = 1e-4
#: The same where scoring runs at a reduced precision the card allows (bf16 keeps ~3 significant digits).
SMOKE_ATOL_REDUCED = 2e-2


def evaluate_model(
    settings: Settings, store: Store, catalog: Catalog, model_version: str, snapshot: str
) -> dict:
    """Evaluate ``model_version`` on frozen ``snapshot``: metrics, ECE before/after the card's temperature,
    latency, precision agreement, the baselines, PNGs; UPSERT its row and write the results into the card."""
    found = catalog.query(
        "SELECT m.card_uri, m.training_run_id, t.dataset_version FROM models m "
        "JOIN training_runs t ON t.training_run_id = m.training_run_id WHERE m.model_version = :m",
        m=model_version,
    )
    if not found:
        raise MmpipeError(f"model {model_version!r} not found in the catalog")
    device = modelcard.resolve_device(settings.device)
    model, card = modelcard.load(store, found[0]["card_uri"], device)
    members = snapshot_images(catalog, snapshot)
    pixels = load_pixels(store, members)
    images = np.stack([pixels[m["image_id"]] for m in members])
    labels = np.array([card.classes.index(m["label"]) for m in members])
    started = time.perf_counter()
    raw = modelcard.logits(model, card, images)
    latency_ms = (time.perf_counter() - started) * 1000 / len(images)
    probs = probabilities(raw, card.temperature)
    metrics = compute_metrics(labels, probs, card.classes)
    before = expected_calibration_error(probabilities(raw), labels)
    baselines = ensure_baselines(
        store, catalog, card.plan_uri, found[0]["dataset_version"], snapshot, images, labels, card.classes
    )
    smoke = {
        "image_ids": [m["image_id"] for m in members[:SMOKE_BATCH]],
        "probs": modelcard.predict(model, card, images[:SMOKE_BATCH]).tolist(),
    }
    epochs = catalog.query(
        "SELECT * FROM epoch_metrics WHERE training_run_id = :t ORDER BY epoch", t=found[0]["training_run_id"]
    )
    title = f"{model_version} on {snapshot}"
    prefix = f"reports/evaluations/{model_version}/{snapshot}"
    pngs = {
        "confusion": plot_confusion(metrics["confusion"], card.classes, title),
        "roc": plot_roc(labels, probs, card.classes, title),
        "reliability": plot_reliability(
            before, (metrics["ece"], metrics["reliability"]), card.temperature, title
        ),
    }
    if epochs:
        pngs["training_curves"] = plot_training_curves(epochs, model_version)
    plots = {name: store.put(f"{prefix}/{name}.png", png, "image/png") for name, png in pngs.items()}
    evidence = {
        "temperature": card.temperature,
        "ece_before": before[0],
        "latency_ms": latency_ms,
        "device": str(device),
        "precision_agreement": precision_agreement(model, card, images, raw),
    }
    report_uri = store.put_json(
        f"{prefix}/metrics.json",
        metrics
        | evidence
        | {
            "snapshot": snapshot,
            "plots": plots,
            "baselines": {n: {k: b[k] for k in BASELINE_COLUMNS} for n, b in baselines.items()},
            "smoke_batch": smoke,
        },
    )
    row = {
        "model_version": model_version,
        "test_snapshot": snapshot,
        **{k: metrics[k] for k in ("n_images", "accuracy", "macro_precision", "macro_recall", "macro_f1")},
        **{k: metrics[k] for k in ("macro_specificity", "macro_auc", "ece")},
        "per_class_json": json.dumps(metrics["per_class"], sort_keys=True),
        "confusion_json": json.dumps(metrics["confusion"]),
        "report_uri": report_uri,
        "init": card.init,
        **{k: evidence[k] for k in ("temperature", "ece_before", "latency_ms", "device")},
    }
    catalog.upsert("evaluations", [row], ["model_version", "test_snapshot"])
    summary = {k: metrics[k] for k in ("n_images", "accuracy", "macro_precision", "macro_recall", "macro_f1")}
    summary |= {k: metrics[k] for k in ("macro_specificity", "macro_auc", "ece")}
    summary |= {k: evidence[k] for k in ("ece_before", "latency_ms", "device")}
    summary |= {
        "recall": {c: v["recall"] for c, v in metrics["per_class"].items()},
        "baselines_macro_f1": {n: b["macro_f1"] for n, b in baselines.items()},
        "report_uri": report_uri,
    }
    updated = replace(
        card,
        test_snapshot=snapshot,
        test_metrics=summary,
        precision_agreement=evidence["precision_agreement"],
    )
    store.put_json(store.key_of(found[0]["card_uri"]), updated.to_json())  # the card only: weights untouched
    return {k: v for k, v in row.items() if not k.endswith("_json")}


def smoke_check(
    settings: Settings, store: Store, catalog: Catalog, model_version: str, snapshot: str
) -> tuple[bool, str]:
    """Load the model back from the store through scoring's own loader (``score.Scorer``: channels_last,
    the precision scoring would use) and replay the fixed batch its evaluation recorded:
    (reproduced?, what was found)."""
    from mmpipe import score  # score -> promote -> evaluate: imported here, not at module level

    found = catalog.query(
        "SELECT m.card_uri, e.report_uri FROM models m JOIN evaluations e ON e.model_version = m.model_version "
        "WHERE m.model_version = :m AND e.test_snapshot = :s",
        m=model_version,
        s=snapshot,
    )
    if not found or not found[0]["report_uri"]:
        return False, f"no evaluation report of {model_version} on {snapshot} to replay"
    recorded = store.get_json(store.key_of(found[0]["report_uri"])).get("smoke_batch")
    if not recorded or not recorded["image_ids"]:
        return False, "the evaluation recorded no smoke batch"
    try:
        scorer = score.Scorer.load(settings, store, model_version, found[0]["card_uri"], fit=False)
    except Exception as exc:  # a checkpoint that no longer loads is the failure this check exists for
        return False, f"the model does not load from the store: {type(exc).__name__}: {exc}"
    by_id = {m["image_id"]: m for m in snapshot_images(catalog, snapshot)}
    members = [by_id[i] for i in recorded["image_ids"]]
    pixels = load_pixels(store, members)
    logits = scorer.logits(np.stack([pixels[m["image_id"]] for m in members]))
    probs = probabilities(logits, scorer.card.temperature)
    expected = np.array(recorded["probs"])
    changed = int((probs.argmax(1) != expected.argmax(1)).sum())
    gap = float(np.abs(probs - expected).max())
    if changed or gap > (SMOKE_ATOL if scorer.autocast is None else SMOKE_ATOL_REDUCED):
        return False, (
            f"loaded from the store, {model_version} changed {changed} of {len(members)} predictions "
            f"(largest probability difference {gap:.2g}) since its evaluation"
        )
    return True, f"reloaded through the scoring path, it reproduces its {len(members)} evaluation predictions"


def evaluate_champion(
    settings: Settings, store: Store, catalog: Catalog, snapshot: str, reason: str
) -> dict[str, Any] | None:
    """Measure today's champion on ``snapshot`` once, recording why; None when there is no champion.

    Freezing a new test snapshot calls this, so the champion/challenger comparison on the new snapshot
    is an explicit, recorded step rather than a side effect of promotion. Idempotent per (snapshot, champion).
    """
    from mmpipe.promote import champion, evaluation

    current = champion(catalog)
    if current is None:
        return None
    done = catalog.query(
        "SELECT * FROM champion_evaluations WHERE test_snapshot = :s AND model_version = :m",
        s=snapshot,
        m=current,
    )
    if done:
        return done[0] | {"evaluated_now": False}
    existing = evaluation(catalog, current, snapshot)
    scores = existing or evaluate_model(settings, store, catalog, current, snapshot)
    row = {
        "test_snapshot": snapshot,
        "model_version": current,
        "macro_f1": scores["macro_f1"],
        "accuracy": scores["accuracy"],
        "reason": reason,
    }
    catalog.upsert("champion_evaluations", [row], ["test_snapshot", "model_version"], update=False)
    return row | {"evaluated_now": not existing}
