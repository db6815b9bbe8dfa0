"""Promotion: choose a run's challenger on validation, judge it on the frozen test snapshot.

Only candidates whose training succeeded compete; the challenger is the one with the best
validation metric (``training_runs.best_val_f1``), so the test snapshot never chooses, it only
judges that one model. The gate (:func:`gate`, pure) refuses unless every rule passes: the primary
metric beats the champion's by ``min_gain``; it beats the 16x16-thumbnail linear baseline by
``baseline_margin``; no class's recall falls below ``min_class_recall`` nor more than
``max_recall_drop`` below the champion's; and the model loaded back from the store through the
scoring path reproduces its evaluation predictions (the smoke check). A missing piece of evidence
refuses too.

Every change of the champion (promotion, rollback, forced promotion) happens in one transaction
that first locks the alias (``SELECT ... FOR UPDATE`` on PostgreSQL; on SQLite the transaction's
first statement is a write, which takes the database's write lock as ``BEGIN IMMEDIATE`` would), then
reads the champion, decides, and appends to ``alias_history``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from mmpipe import evaluate
from mmpipe.baselines import THUMBNAIL_SIDE
from mmpipe.catalog import Catalog
from mmpipe.config import Settings
from mmpipe.errors import MmpipeError
from mmpipe.store import Store

CHAMPION = "champion"
THUMBNAIL_BASELINE = f"linear_thumbnail_{THUMBNAIL_SIDE}"
#: The validation metric a run's challenger is chosen by (a column of training_runs, recorded by training).
SELECTED_BY = "best_val_f1"


@dataclass(frozen=True)
class Policy:
    """The gate's thresholds (``MMPIPE_PROMOTION_*``)."""

    metric: str = "macro_f1"
    min_gain: float = 0.0
    baseline_margin: float = 0.02
    max_recall_drop: float = 0.05
    min_class_recall: float = 0.8

    @classmethod
    def from_settings(cls, settings: Settings) -> Policy:
        return cls(
            metric=settings.promotion_metric,
            min_gain=settings.promotion_min_gain,
            baseline_margin=settings.promotion_baseline_margin,
            max_recall_drop=settings.promotion_max_recall_drop,
            min_class_recall=settings.promotion_min_class_recall,
        )


@dataclass(frozen=True)
class Check:
    """One rule of the gate and its verdict."""

    rule: str
    passed: bool
    detail: str


def gate(
    policy: Policy,
    challenger: Mapping[str, Any],
    champion: Mapping[str, Any] | None,
    baseline: Mapping[str, Any] | None,
    smoke: Check,
) -> list[Check]:
    """Every rule's verdict for ``challenger`` (an evaluation: metrics and ``per_class``) against the
    champion's evaluation on the same snapshot (None: no champion) and the thumbnail baseline. Pure."""
    m = policy.metric
    score = challenger.get(m)
    checks = []
    if baseline is None or baseline.get(m) is None:
        checks.append(
            Check("beats_baseline", False, f"no {THUMBNAIL_BASELINE} baseline {m} on this snapshot")
        )
    else:
        need = baseline[m] + policy.baseline_margin
        passed = score is not None and score > need
        checks.append(
            Check(
                "beats_baseline",
                passed,
                f"{m} {_fmt(score)} {'>' if passed else '<='} thumbnail baseline {baseline[m]:.4f} "
                f"+ margin {policy.baseline_margin}",
            )
        )
    recalls = {c: v["recall"] for c, v in challenger.get("per_class", {}).items()}
    low = {c: r for c, r in recalls.items() if r < policy.min_class_recall}
    checks.append(
        Check(
            "class_recall_floor",
            bool(recalls) and not low,
            f"recall below {policy.min_class_recall}: {_classes(low)}"
            if low or not recalls
            else f"every class recall >= {policy.min_class_recall}",
        )
    )
    if champion is None:
        checks.append(Check("beats_champion", True, "no champion yet"))
    else:
        best = champion.get(m)
        passed = score is not None and best is not None and score > best + policy.min_gain
        checks.append(
            Check(
                "beats_champion",
                passed,
                f"{m} {_fmt(score)} {'>' if passed else '<='} champion {_fmt(best)} + min gain {policy.min_gain}",
            )
        )
        dropped = {
            c: recalls.get(c, 0.0)
            for c, v in champion.get("per_class", {}).items()
            if recalls.get(c, 0.0) < v["recall"] - policy.max_recall_drop
        }
        checks.append(
            Check(
                "recall_vs_champion",
                not dropped,
                f"recall more than {policy.max_recall_drop} below the champion's: {_classes(dropped)}"
                if dropped
                else f"no class recall more than {policy.max_recall_drop} below the champion's",
            )
        )
    checks.append(smoke)
    return checks


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _classes(recalls: Mapping[str, float]) -> str:
    return ", ".join(f"{c} {r:.3f}" for c, r in sorted(recalls.items())) or "no per-class recall"


def champion(catalog: Catalog) -> str | None:
    return catalog.scalar("SELECT model_version FROM model_aliases WHERE alias = :a", a=CHAMPION)


def _evaluation(conn: Connection, model_version: str, snapshot: str) -> dict[str, Any] | None:
    row = conn.execute(
        sa.text("SELECT * FROM evaluations WHERE model_version = :m AND test_snapshot = :s"),
        {"m": model_version, "s": snapshot},
    ).first()
    if row is None:
        return None
    data = dict(row._mapping)
    return data | {"per_class": json.loads(data.pop("per_class_json"))}


def evaluation(catalog: Catalog, model_version: str, snapshot: str) -> dict[str, Any] | None:
    """The evaluation of a model on a snapshot with ``per_class`` parsed; None if there is none."""
    return catalog.transaction(lambda conn: _evaluation(conn, model_version, snapshot))


def select_challenger(catalog: Catalog, model_versions: Sequence[str]) -> dict[str, Any]:
    """The succeeded candidate with the best validation metric (never the test snapshot's)."""
    rows = catalog.query_in(
        f"SELECT m.model_version, t.status, t.{SELECTED_BY} AS selection_value FROM models m "
        "JOIN training_runs t ON t.training_run_id = m.training_run_id WHERE m.model_version IN ({in})",
        model_versions,
    )
    ok = [r for r in rows if r["status"] == "succeeded" and r["selection_value"] is not None]
    if not ok:
        raise MmpipeError(f"none of the candidates {list(model_versions)} finished training successfully")
    return max(ok, key=lambda r: (r["selection_value"], r["model_version"]))


def lock_alias(conn: Connection, alias: str) -> str | None:
    """Lock ``alias`` for this transaction, then read its model (None: not set yet).

    The read is its own statement after the lock, so on PostgreSQL (read committed) it sees what a
    transaction that held the lock before us committed.
    """
    conn.execute(
        sa.text("INSERT INTO alias_locks (alias) VALUES (:a) ON CONFLICT (alias) DO NOTHING"), {"a": alias}
    )
    if conn.dialect.name == "postgresql":
        conn.execute(sa.text("SELECT alias FROM alias_locks WHERE alias = :a FOR UPDATE"), {"a": alias})
    return conn.execute(
        sa.text("SELECT model_version FROM model_aliases WHERE alias = :a"), {"a": alias}
    ).scalar()


def _change_alias(
    conn: Connection, alias: str, before: str | None, to: str, action: str, run_id: str, reason: str
) -> dict[str, Any]:
    """Point ``alias`` at ``to`` and append the change to the history (caller holds the lock)."""
    seq = conn.execute(
        sa.text("SELECT COALESCE(MAX(seq), 0) + 1 FROM alias_history WHERE alias = :a"), {"a": alias}
    ).scalar()
    change = {
        "alias": alias,
        "seq": seq,
        "from_version": before,
        "to_version": to,
        "action": action,
        "airflow_run_id": run_id,
        "reason": reason,
    }
    conn.execute(
        sa.text(
            "INSERT INTO alias_history (alias, seq, from_version, to_version, action, airflow_run_id, reason) "
            "VALUES (:alias, :seq, :from_version, :to_version, :action, :airflow_run_id, :reason)"
        ),
        change,
    )
    conn.execute(
        sa.text(
            "INSERT INTO model_aliases (alias, model_version) VALUES (:a, :m) ON CONFLICT (alias) "
            "DO UPDATE SET model_version = excluded.model_version, updated_at = CURRENT_TIMESTAMP"
        ),
        {"a": alias, "m": to},
    )
    return change


def history(catalog: Catalog, alias: str = CHAMPION) -> list[dict[str, Any]]:
    return catalog.query("SELECT * FROM alias_history WHERE alias = :a ORDER BY seq", a=alias)


def promotion_id(airflow_run_id: str, snapshot: str) -> str:
    return hashlib.sha256(f"{airflow_run_id}\x00{snapshot}".encode()).hexdigest()[:20]


def judge(
    catalog: Catalog,
    policy: Policy,
    challenger: Mapping[str, Any],
    snapshot: str,
    airflow_run_id: str,
    baseline: Mapping[str, Any] | None,
    smoke: Check,
) -> dict[str, Any]:
    """Apply the gate against the champion read under the alias lock; record the decision and, when
    promoted, the alias change, all in one transaction. Idempotent per (run, snapshot): a retried
    task gets the decision already recorded."""
    pid = promotion_id(airflow_run_id, snapshot)
    version = challenger["model_version"]

    def work(conn: Connection) -> dict[str, Any]:
        current = lock_alias(conn, CHAMPION)
        recorded = conn.execute(
            sa.text("SELECT * FROM promotions WHERE promotion_id = :p"), {"p": pid}
        ).first()
        if recorded is not None:
            return dict(recorded._mapping)
        ours = _evaluation(conn, version, snapshot)
        if ours is None:
            raise MmpipeError(f"challenger {version} has no evaluation on {snapshot}: evaluate it first")
        theirs = _evaluation(conn, current, snapshot) if current else None
        if current and theirs is None:
            raise MmpipeError(
                f"champion {current} has no evaluation on {snapshot}: evaluate it before promoting"
            )
        if current == version:
            checks = [Check("new_model", False, "the challenger is already the champion")]
        else:
            checks = gate(policy, ours, theirs, baseline, smoke)
        promoted = all(c.passed for c in checks)
        failed = [c for c in checks if not c.passed]
        decision = {
            "promotion_id": pid,
            "airflow_run_id": airflow_run_id,
            "challenger": version,
            "champion_before": current,
            "test_snapshot": snapshot,
            "challenger_f1": ours["macro_f1"],
            "champion_f1": theirs["macro_f1"] if theirs else None,
            "decision": "promoted" if promoted else "kept_champion",
            "reason": "; ".join(c.detail for c in (checks if promoted else failed)),
            "selected_by": SELECTED_BY,
            "selection_value": challenger["selection_value"],
            "primary_metric": policy.metric,
            "challenger_score": ours.get(policy.metric),
            "champion_score": theirs.get(policy.metric) if theirs else None,
            "checks_json": json.dumps([asdict(c) for c in checks]),
        }
        conn.execute(
            sa.text(
                f"INSERT INTO promotions ({', '.join(decision)}) VALUES ({', '.join(':' + k for k in decision)})"
            ),
            decision,
        )
        if promoted:
            _change_alias(conn, CHAMPION, current, version, "promote", airflow_run_id, decision["reason"])
        return decision

    return catalog.transaction(work)


def promote_best(
    settings: Settings,
    store: Store,
    catalog: Catalog,
    model_versions: Sequence[str],
    snapshot: str,
    airflow_run_id: str,
) -> dict[str, Any]:
    """Choose the challenger among the succeeded candidates on validation, gather the evidence the
    gate needs on ``snapshot`` (its evaluation and baselines, the champion's, the smoke check), then
    :func:`judge` it."""
    challenger = select_challenger(catalog, model_versions)
    version = challenger["model_version"]
    if evaluation(catalog, version, snapshot) is None:
        evaluate.evaluate_model(settings, store, catalog, version, snapshot)
    evaluate.evaluate_champion(
        settings, store, catalog, snapshot, reason=f"before promotion in {airflow_run_id}"
    )
    dataset_version = catalog.scalar(
        "SELECT t.dataset_version FROM models m JOIN training_runs t ON t.training_run_id = m.training_run_id "
        "WHERE m.model_version = :m",
        m=version,
    )
    baseline = catalog.query(
        "SELECT * FROM baseline_evaluations WHERE dataset_version = :d AND test_snapshot = :s AND baseline = :b",
        d=dataset_version,
        s=snapshot,
        b=THUMBNAIL_BASELINE,
    )
    smoke = Check("smoke_check", *evaluate.smoke_check(settings, store, catalog, version, snapshot))
    policy = Policy.from_settings(settings)
    return judge(
        catalog, policy, challenger, snapshot, airflow_run_id, baseline[0] if baseline else None, smoke
    )


def _known_model(conn: Connection, model_version: str) -> None:
    found = conn.execute(
        sa.text("SELECT 1 FROM models WHERE model_version = :m"), {"m": model_version}
    ).first()
    if found is None:
        raise MmpipeError(f"model {model_version!r} not found in the catalog")


def force(catalog: Catalog, model_version: str, airflow_run_id: str, reason: str) -> dict[str, Any]:
    """Make ``model_version`` champion without the gate: a person's decision, with its reason recorded."""
    if not reason.strip():
        raise MmpipeError("a forced promotion needs a reason (--reason TEXT)")

    def work(conn: Connection) -> dict[str, Any]:
        current = lock_alias(conn, CHAMPION)
        _known_model(conn, model_version)
        if current == model_version:
            raise MmpipeError(f"{model_version} is already the champion")
        return _change_alias(conn, CHAMPION, current, model_version, "force", airflow_run_id, reason)

    return catalog.transaction(work)


def rollback(catalog: Catalog, airflow_run_id: str, reason: str, to: str | None = None) -> dict[str, Any]:
    """Give the champion back to the model it replaced, or to ``to`` (a former champion).

    "The model it replaced" is the ``from_version`` of the promotion or forced change that made the
    current champion champion, so successive rollbacks walk back through the champions.
    """

    def work(conn: Connection) -> dict[str, Any]:
        current = lock_alias(conn, CHAMPION)
        if current is None:
            raise MmpipeError("there is no champion to roll back")
        target = to
        if target is None:
            target = conn.execute(
                sa.text(
                    "SELECT from_version FROM alias_history WHERE alias = :a AND to_version = :c "
                    "AND action <> 'rollback' ORDER BY seq DESC LIMIT 1"
                ),
                {"a": CHAMPION, "c": current},
            ).scalar()
            if target is None:
                raise MmpipeError(f"no champion before {current} to roll back to: name one with --to")
        else:
            was = conn.execute(
                sa.text("SELECT 1 FROM alias_history WHERE alias = :a AND to_version = :t"),
                {"a": CHAMPION, "t": target},
            ).first()
            if was is None:
                raise MmpipeError(f"{target} was never champion: use --force to promote it")
        if target == current:
            raise MmpipeError(f"{target} is already the champion")
        _known_model(conn, target)
        return _change_alias(conn, CHAMPION, current, target, "rollback", airflow_run_id, reason)

    return catalog.transaction(work)
