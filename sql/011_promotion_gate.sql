-- Select on validation, judge on test: the evidence behind every evaluation and promotion, the
-- reference baselines, and a history of every change of the champion alias.

-- What each evaluation measured besides the scores: the card's init, ECE before the card's
-- temperature (`ece` is after it: what scoring shows), and per-image inference latency.
ALTER TABLE evaluations ADD COLUMN init TEXT;
ALTER TABLE evaluations ADD COLUMN temperature DOUBLE PRECISION;
ALTER TABLE evaluations ADD COLUMN ece_before DOUBLE PRECISION;
ALTER TABLE evaluations ADD COLUMN latency_ms DOUBLE PRECISION;
ALTER TABLE evaluations ADD COLUMN device TEXT;

-- The reference baselines (mmpipe.baselines), fitted on a plan's train split and scored on a snapshot.
CREATE TABLE baseline_evaluations (
    dataset_version TEXT NOT NULL,
    test_snapshot   TEXT NOT NULL,
    baseline        TEXT NOT NULL,             -- majority | linear_thumbnail_16
    n_train         INTEGER NOT NULL,
    n_images        INTEGER NOT NULL,
    accuracy        DOUBLE PRECISION NOT NULL,
    macro_precision DOUBLE PRECISION NOT NULL,
    macro_recall    DOUBLE PRECISION NOT NULL,
    macro_f1        DOUBLE PRECISION NOT NULL,
    macro_specificity DOUBLE PRECISION NOT NULL,
    macro_auc       DOUBLE PRECISION,
    per_class_json  TEXT NOT NULL,
    created_at      TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP,
    PRIMARY KEY (dataset_version, test_snapshot, baseline)
);

-- How the challenger was chosen (on validation: the training_runs column, e.g. best_val_f1, and its
-- value), the gate's primary metric for both models, and every rule of the gate as
-- [{rule, passed, detail}], passed or not.
ALTER TABLE promotions ADD COLUMN selected_by TEXT;
ALTER TABLE promotions ADD COLUMN selection_value DOUBLE PRECISION;
ALTER TABLE promotions ADD COLUMN primary_metric TEXT;
ALTER TABLE promotions ADD COLUMN challenger_score DOUBLE PRECISION;
ALTER TABLE promotions ADD COLUMN champion_score DOUBLE PRECISION;
ALTER TABLE promotions ADD COLUMN checks_json TEXT;

-- One row per alias, locked (SELECT ... FOR UPDATE) by every change of that alias, so that changes
-- serialise even before the alias has its first model.
CREATE TABLE alias_locks (
    alias           TEXT PRIMARY KEY
);

-- Every change of an alias: seq counts up per alias under that lock, so the history is a chain
-- (each row's from_version is the previous row's to_version).
CREATE TABLE alias_history (
    alias           TEXT NOT NULL,
    seq             INTEGER NOT NULL,
    from_version    TEXT,
    to_version      TEXT NOT NULL,
    action          TEXT NOT NULL,             -- promote | rollback | force
    airflow_run_id  TEXT NOT NULL,
    reason          TEXT NOT NULL,
    changed_at      TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP,
    PRIMARY KEY (alias, seq)
);
INSERT INTO alias_history (alias, seq, from_version, to_version, action, airflow_run_id, reason)
SELECT alias, 1, NULL, model_version, 'promote', 'before-011', 'champion before alias history was kept'
FROM model_aliases;

DROP VIEW leaderboard;
CREATE VIEW leaderboard AS
SELECT t.candidate,
       t.backbone,
       e.init,
       t.airflow_run_id,
       e.model_version,
       t.best_val_f1 AS val_macro_f1,
       e.test_snapshot,
       e.accuracy,
       e.macro_f1,
       e.macro_auc,
       e.ece_before,
       e.ece,
       e.latency_ms,
       bm.macro_f1 AS majority_f1,
       bt.macro_f1 AS thumbnail_f1,
       CASE WHEN a.model_version IS NOT NULL THEN 1 ELSE 0 END AS is_champion,
       CASE WHEN EXISTS (SELECT 1 FROM promotions p
                         WHERE p.challenger = e.model_version AND p.decision = 'promoted')
            THEN 1 ELSE 0 END AS promoted,
       e.created_at
FROM evaluations e
JOIN models m ON m.model_version = e.model_version
JOIN training_runs t ON t.training_run_id = m.training_run_id
LEFT JOIN baseline_evaluations bm ON bm.dataset_version = t.dataset_version
     AND bm.test_snapshot = e.test_snapshot AND bm.baseline = 'majority'
LEFT JOIN baseline_evaluations bt ON bt.dataset_version = t.dataset_version
     AND bt.test_snapshot = e.test_snapshot AND bt.baseline = 'linear_thumbnail_16'
LEFT JOIN model_aliases a ON a.alias = 'champion' AND a.model_version = e.model_version;
