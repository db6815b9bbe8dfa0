-- Scoring (issue 9): every listed object gets a fate, and each run reconciles its counts.

-- One row per object and model: the object's latest fate under that model. Finding the unscored
-- objects reads these rows only for objects listed after the model's watermark (score_runs), never
-- every prediction ever written.
CREATE TABLE scored_objects (
    model_version   TEXT NOT NULL,
    source_key      TEXT NOT NULL,
    source_etag     TEXT NOT NULL,
    source_modified TEXT NOT NULL,
    fate            TEXT NOT NULL,             -- tagged | unreadable | unknown | failed
    reason          TEXT NOT NULL,             -- unreadable/failed: why; tagged/unknown: ''
    settled         BOOLEAN NOT NULL,          -- false: a transient fault, the next run takes it again
    modality        TEXT,                      -- the predicted class (tagged)
    confidence      DOUBLE PRECISION,
    review_reasons  TEXT NOT NULL,             -- comma-separated: low_confidence, out_of_distribution, ...
    images          INTEGER NOT NULL,
    tags_written    INTEGER NOT NULL,          -- mmpipe's tags on the object (the rest: sidecar only)
    tags_left_out   INTEGER NOT NULL,
    sidecar_uri     TEXT,
    run_id          TEXT NOT NULL,
    scored_at       TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP,
    PRIMARY KEY (model_version, source_key)
);
CREATE INDEX scored_objects_run ON scored_objects (run_id, fate);

-- One row per scoring run: listed = tagged + unreadable + unknown + skipped + failed.
CREATE TABLE score_runs (
    run_id          TEXT PRIMARY KEY,
    model_version   TEXT NOT NULL,
    prefix          TEXT NOT NULL,
    modified_from   TEXT NOT NULL,             -- LastModified range scored ('' = open)
    modified_to     TEXT NOT NULL,
    forced          BOOLEAN NOT NULL,
    status          TEXT NOT NULL,             -- running | finished | incomplete
    listed          INTEGER NOT NULL,
    skipped         INTEGER NOT NULL,          -- already scored by this model
    tagged          INTEGER NOT NULL DEFAULT 0,
    unreadable      INTEGER NOT NULL DEFAULT 0,
    unknown         INTEGER NOT NULL DEFAULT 0,
    failed          INTEGER NOT NULL DEFAULT 0,
    not_reached     INTEGER NOT NULL DEFAULT 0, -- to score but without a fate (a batch task that died)
    listed_at       TEXT NOT NULL,             -- ISO time the listing started
    watermark       TEXT,                      -- objects modified before it are all settled (this model, prefix)
    started_at      TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP,
    finished_at     TIMESTAMP
);
CREATE INDEX score_runs_model ON score_runs (model_version, status);
