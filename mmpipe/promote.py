"""Promote the best candidate only if it beats the champion on the same frozen test snapshot.

The gate is explicit: challenger macro-F1 must exceed the champion's by more than
``promotion_min_gain`` (ties broken by accuracy when choosing among candidates). The decision,
promoted or not, is one transaction: a promotions row and, when promoted, the champion alias.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

from mmpipe.catalog import Catalog
from mmpipe.errors import MmpipeError

CHAMPION = "champion"


def champion(catalog: Catalog) -> str | None:
    return catalog.scalar("SELECT model_version FROM model_aliases WHERE alias = :a", a=CHAMPION)


def decide(challenger_f1: float, champion_f1: float | None, min_gain: float) -> tuple[bool, str]:
    """The promotion gate (pure)."""
    if champion_f1 is None:
        return True, "no champion yet"
    if challenger_f1 > champion_f1 + min_gain:
        return True, f"macro-F1 {challenger_f1:.4f} beats champion {champion_f1:.4f} by more than {min_gain}"
    return (
        False,
        f"macro-F1 {challenger_f1:.4f} does not beat champion {champion_f1:.4f} by more than {min_gain}",
    )


def evaluation(catalog: Catalog, model_version: str, snapshot: str) -> dict[str, Any] | None:
    rows = catalog.query(
        "SELECT model_version, macro_f1, accuracy FROM evaluations WHERE model_version = :m AND test_snapshot = :s",
        m=model_version,
        s=snapshot,
    )
    return rows[0] if rows else None


def promote_best(
    catalog: Catalog, candidates: Sequence[str], snapshot: str, airflow_run_id: str, min_gain: float
) -> dict[str, Any]:
    """Pick the best evaluated candidate and apply the gate against the champion on ``snapshot``.

    Idempotent per (run, snapshot): a retried task returns the decision already recorded.
    """
    promotion_id = hashlib.sha256(f"{airflow_run_id}\x00{snapshot}".encode()).hexdigest()[:20]
    recorded = catalog.query("SELECT * FROM promotions WHERE promotion_id = :p", p=promotion_id)
    if recorded:
        return recorded[0]
    evaluated = [e for e in (evaluation(catalog, m, snapshot) for m in candidates) if e]
    if not evaluated:
        raise MmpipeError(f"none of the candidates has an evaluation on snapshot {snapshot!r}")
    best = max(evaluated, key=lambda e: (e["macro_f1"], e["accuracy"]))
    current = champion(catalog)
    current_eval = evaluation(catalog, current, snapshot) if current else None
    if current and current_eval is None:
        raise MmpipeError(f"champion {current} has no evaluation on {snapshot}: evaluate it before promoting")
    if current == best["model_version"]:
        promoted, reason = False, "best candidate is already the champion"
    else:
        promoted, reason = decide(
            best["macro_f1"], current_eval["macro_f1"] if current_eval else None, min_gain
        )
    decision = {
        "promotion_id": promotion_id,
        "airflow_run_id": airflow_run_id,
        "challenger": best["model_version"],
        "champion_before": current,
        "test_snapshot": snapshot,
        "challenger_f1": best["macro_f1"],
        "champion_f1": current_eval["macro_f1"] if current_eval else None,
        "decision": "promoted" if promoted else "kept_champion",
        "reason": reason,
    }
    with catalog.begin() as conn:
        catalog.upsert("promotions", [decision], ["promotion_id"], conn)
        if promoted:
            catalog.upsert(
                "model_aliases",
                [{"alias": CHAMPION, "model_version": best["model_version"]}],
                ["alias"],
                conn,
            )
    return decision
