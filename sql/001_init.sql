-- mmpipe catalog, version 1. Portable SQL (PostgreSQL and SQLite): text keys, no serials,
-- JSON kept as TEXT, UPSERT via ON CONFLICT. Applied once by `mmpipe db upgrade`.

CREATE TABLE ingest_runs (
    run_id          TEXT PRIMARY KEY,
    prefix          TEXT NOT NULL,
    status          TEXT NOT NULL,             -- running | succeeded | failed
    listed          INTEGER NOT NULL DEFAULT 0,
    ingested        INTEGER NOT NULL DEFAULT 0,
    duplicates      INTEGER NOT NULL DEFAULT 0,
    quarantined     INTEGER NOT NULL DEFAULT 0,
    images          INTEGER NOT NULL DEFAULT 0,
    report_uri      TEXT,
    started_at      TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP,
    finished_at     TIMESTAMP
);

-- One row per (key, ETag) seen: the incremental ledger. A changed ETag supersedes the old row.
CREATE TABLE source_objects (
    source_key      TEXT NOT NULL,
    etag            TEXT NOT NULL,
    size_bytes      BIGINT NOT NULL,
    run_id          TEXT NOT NULL,
    status          TEXT NOT NULL,             -- ingested | duplicate | quarantined | superseded
    n_images        INTEGER NOT NULL DEFAULT 0,
    n_quarantined   INTEGER NOT NULL DEFAULT 0,
    recorded_at     TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP,
    PRIMARY KEY (source_key, etag)
);

CREATE TABLE images (
    image_id        TEXT PRIMARY KEY,          -- content hash of the canonical pixels
    source_key      TEXT NOT NULL,
    source_etag     TEXT NOT NULL,
    member_path     TEXT NOT NULL,             -- '' for a plain object, archive member path otherwise
    frame           INTEGER,
    label           TEXT NOT NULL,
    label_source    TEXT NOT NULL,             -- prefix | manifest | header_rule
    modality        TEXT,                      -- DICOM Modality header (not PHI)
    patient_key     TEXT NOT NULL,             -- salted hash, never the PatientID
    study_key       TEXT NOT NULL,             -- salted hash, never the StudyInstanceUID
    orig_rows       INTEGER NOT NULL,
    orig_cols       INTEGER NOT NULL,
    bits_stored     INTEGER NOT NULL,
    pixel_mean      DOUBLE PRECISION NOT NULL,
    pixel_std       DOUBLE PRECISION NOT NULL,
    shard_uri       TEXT NOT NULL,
    shard_index     INTEGER NOT NULL,
    ingest_run_id   TEXT NOT NULL,
    status          TEXT NOT NULL DEFAULT 'active',   -- active | retired | excluded
    status_reason   TEXT,
    created_at      TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP
);
CREATE INDEX images_status_label ON images (status, label);
CREATE INDEX images_source ON images (source_key, source_etag);
CREATE INDEX images_run ON images (ingest_run_id);

-- Identical pixel content seen again: recorded, not stored twice.
CREATE TABLE duplicates (
    source_key      TEXT NOT NULL,
    source_etag     TEXT NOT NULL,
    member_path     TEXT NOT NULL,
    duplicate_of    TEXT NOT NULL,
    run_id          TEXT NOT NULL,
    PRIMARY KEY (source_key, source_etag, member_path)
);

CREATE TABLE quarantine (
    source_key      TEXT NOT NULL,
    source_etag     TEXT NOT NULL,
    member_path     TEXT NOT NULL,
    reason          TEXT NOT NULL,             -- fixed enum, see mmpipe.imaging.Reason
    detail          TEXT NOT NULL,
    run_id          TEXT NOT NULL,
    record_uri      TEXT NOT NULL,
    created_at      TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP,
    PRIMARY KEY (source_key, source_etag, member_path)
);

CREATE TABLE validations (
    validation_id   TEXT PRIMARY KEY,
    subject         TEXT NOT NULL,             -- ingest run id or dataset version
    suite           TEXT NOT NULL,             -- batch | dataset
    success         BOOLEAN NOT NULL,
    n_critical      INTEGER NOT NULL,
    n_warnings      INTEGER NOT NULL,
    results_json    TEXT NOT NULL,
    docs_uri        TEXT,
    created_at      TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP
);

-- Stable patient-level split assignment: first assignment wins forever.
CREATE TABLE patient_splits (
    patient_key     TEXT PRIMARY KEY,
    split           TEXT NOT NULL              -- train | val | test
);

CREATE TABLE test_snapshots (
    name            TEXT PRIMARY KEY,
    n_images        INTEGER NOT NULL,
    content_hash    TEXT NOT NULL,
    members_uri     TEXT NOT NULL,
    reason          TEXT NOT NULL,
    created_at      TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP
);

CREATE TABLE test_snapshot_members (
    name            TEXT NOT NULL,
    image_id        TEXT NOT NULL,
    PRIMARY KEY (name, image_id)
);

CREATE TABLE dataset_versions (
    dataset_version TEXT PRIMARY KEY,          -- hash of members + policies + seed
    plan_uri        TEXT NOT NULL,
    test_snapshot   TEXT NOT NULL,
    seed            INTEGER NOT NULL,
    n_train         INTEGER NOT NULL,
    n_val           INTEGER NOT NULL,
    class_counts    TEXT NOT NULL,             -- JSON
    created_at      TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP
);

CREATE TABLE training_runs (
    training_run_id TEXT PRIMARY KEY,
    airflow_run_id  TEXT NOT NULL,
    candidate       TEXT NOT NULL,
    backbone        TEXT NOT NULL,
    candidate_json  TEXT NOT NULL,
    dataset_version TEXT NOT NULL,
    status          TEXT NOT NULL,             -- running | succeeded | failed
    device          TEXT,
    epochs_run      INTEGER,
    best_val_f1     DOUBLE PRECISION,
    seconds         DOUBLE PRECISION,
    model_version   TEXT,
    started_at      TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP,
    finished_at     TIMESTAMP
);

CREATE TABLE epoch_metrics (
    training_run_id TEXT NOT NULL,
    epoch           INTEGER NOT NULL,
    lr              DOUBLE PRECISION NOT NULL,
    train_loss      DOUBLE PRECISION NOT NULL,
    val_loss        DOUBLE PRECISION NOT NULL,
    val_accuracy    DOUBLE PRECISION NOT NULL,
    val_macro_f1    DOUBLE PRECISION NOT NULL,
    seconds         DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (training_run_id, epoch)
);

CREATE TABLE models (
    model_version   TEXT PRIMARY KEY,
    training_run_id TEXT NOT NULL,
    backbone        TEXT NOT NULL,
    checkpoint_uri  TEXT NOT NULL,
    card_uri        TEXT NOT NULL,
    created_at      TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP
);

CREATE TABLE evaluations (
    model_version   TEXT NOT NULL,
    test_snapshot   TEXT NOT NULL,
    n_images        INTEGER NOT NULL,
    accuracy        DOUBLE PRECISION NOT NULL,
    macro_precision DOUBLE PRECISION NOT NULL,
    macro_recall    DOUBLE PRECISION NOT NULL,
    macro_f1        DOUBLE PRECISION NOT NULL,
    macro_specificity DOUBLE PRECISION NOT NULL,
    macro_auc       DOUBLE PRECISION,
    ece             DOUBLE PRECISION NOT NULL,
    per_class_json  TEXT NOT NULL,
    confusion_json  TEXT NOT NULL,
    report_uri      TEXT,
    created_at      TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP,
    PRIMARY KEY (model_version, test_snapshot)
);

CREATE TABLE model_aliases (
    alias           TEXT PRIMARY KEY,          -- 'champion'
    model_version   TEXT NOT NULL,
    updated_at      TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP
);

CREATE TABLE promotions (
    promotion_id    TEXT PRIMARY KEY,
    airflow_run_id  TEXT NOT NULL,
    challenger      TEXT NOT NULL,
    champion_before TEXT,
    test_snapshot   TEXT NOT NULL,
    challenger_f1   DOUBLE PRECISION NOT NULL,
    champion_f1     DOUBLE PRECISION,
    decision        TEXT NOT NULL,             -- promoted | kept_champion
    reason          TEXT NOT NULL,
    created_at      TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP
);

CREATE TABLE predictions (
    source_key      TEXT NOT NULL,
    source_etag     TEXT NOT NULL,
    member_path     TEXT NOT NULL,
    model_version   TEXT NOT NULL,
    predicted       TEXT NOT NULL,
    confidence      DOUBLE PRECISION NOT NULL,
    probs_json      TEXT NOT NULL,
    needs_review    BOOLEAN NOT NULL,
    run_id          TEXT NOT NULL,
    created_at      TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP,
    PRIMARY KEY (source_key, source_etag, member_path, model_version)
);

CREATE TABLE score_failures (
    source_key      TEXT NOT NULL,
    source_etag     TEXT NOT NULL,
    member_path     TEXT NOT NULL,
    model_version   TEXT NOT NULL,
    reason          TEXT NOT NULL,
    detail          TEXT NOT NULL,
    run_id          TEXT NOT NULL,
    PRIMARY KEY (source_key, source_etag, member_path, model_version)
);

CREATE VIEW leaderboard AS
SELECT t.candidate,
       t.backbone,
       t.airflow_run_id,
       e.model_version,
       e.test_snapshot,
       e.accuracy,
       e.macro_f1,
       e.macro_auc,
       e.ece,
       CASE WHEN a.model_version IS NOT NULL THEN 1 ELSE 0 END AS is_champion,
       CASE WHEN EXISTS (SELECT 1 FROM promotions p
                         WHERE p.challenger = e.model_version AND p.decision = 'promoted')
            THEN 1 ELSE 0 END AS promoted,
       e.created_at
FROM evaluations e
JOIN models m ON m.model_version = e.model_version
JOIN training_runs t ON t.training_run_id = m.training_run_id
LEFT JOIN model_aliases a ON a.alias = 'champion' AND a.model_version = e.model_version;
