"""Evaluate a model on a frozen test snapshot: the numbers promotion and the leaderboard trust.

Metrics follow the papers: accuracy; per-class and macro precision, recall, F1 and specificity;
one-vs-rest AUC-ROC; the confusion matrix; calibration as expected calibration error (ECE) with a
reliability diagram. Every evaluation names the snapshot it used.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support, roc_auc_score

from mmpipe import modelcard
from mmpipe.calibration import expected_calibration_error
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


def render_plots(metrics: dict[str, Any], classes: Sequence[str], title: str) -> bytes:
    """Confusion matrix and reliability diagram as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.8))
    cm = np.array(metrics["confusion"])
    ax1.imshow(cm, cmap="Blues")
    ax1.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax1.set_yticks(range(len(classes)), classes)
    ax1.set_xlabel("predicted")
    ax1.set_ylabel("true")
    for (i, j), v in np.ndenumerate(cm):
        ax1.text(j, i, str(v), ha="center", va="center", color="black")
    ax1.set_title("confusion matrix")
    if metrics["reliability"]:
        conf, acc, _ = zip(*metrics["reliability"], strict=True)
        ax2.plot(conf, acc, "o-", label=f"model (ECE {metrics['ece']:.3f})")
    ax2.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    ax2.set_xlabel("confidence")
    ax2.set_ylabel("accuracy")
    ax2.set_title("reliability")
    ax2.legend()
    fig.suptitle(title)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return buffer.getvalue()


def evaluate_model(
    settings: Settings, store: Store, catalog: Catalog, model_version: str, snapshot: str
) -> dict:
    """Evaluate ``model_version`` on frozen ``snapshot``; UPSERT its row and publish plots."""
    found = catalog.query("SELECT card_uri FROM models WHERE model_version = :m", m=model_version)
    if not found:
        raise MmpipeError(f"model {model_version!r} not found in the catalog")
    model, card = modelcard.load(store, found[0]["card_uri"], modelcard.resolve_device(settings.device))
    members = snapshot_images(catalog, snapshot)
    pixels = load_pixels(store, members)
    images = np.stack([pixels[m["image_id"]] for m in members])
    labels = np.array([card.classes.index(m["label"]) for m in members])
    metrics = compute_metrics(labels, modelcard.predict(model, card, images), card.classes)
    prefix = f"reports/evaluations/{model_version}/{snapshot}"
    plot_uri = store.put(
        f"{prefix}/plots.png",
        render_plots(metrics, card.classes, f"{model_version} on {snapshot}"),
        "image/png",
    )
    report_uri = store.put_json(f"{prefix}/metrics.json", metrics | {"plots": plot_uri, "snapshot": snapshot})
    row = {
        "model_version": model_version,
        "test_snapshot": snapshot,
        **{k: metrics[k] for k in ("n_images", "accuracy", "macro_precision", "macro_recall", "macro_f1")},
        **{k: metrics[k] for k in ("macro_specificity", "macro_auc", "ece")},
        "per_class_json": json.dumps(metrics["per_class"], sort_keys=True),
        "confusion_json": json.dumps(metrics["confusion"]),
        "report_uri": report_uri,
    }
    catalog.upsert("evaluations", [row], ["model_version", "test_snapshot"])
    return {k: v for k, v in row.items() if not k.endswith("_json")}


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
