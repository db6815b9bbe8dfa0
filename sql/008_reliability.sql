-- Faults become retries (docs/reliability.md). New statuses, no DDL needed for them:
-- ingest_runs.status 'abandoned' (a run left running by a killed process), and
-- source_objects.status 'queued' (recorded, to be processed again: a changed label or a released quarantine).

-- What a run left unrecorded for the next run (never quarantined), and what it left to a concurrent run.
ALTER TABLE ingest_runs ADD COLUMN store_errors INTEGER NOT NULL DEFAULT 0;
ALTER TABLE ingest_runs ADD COLUMN decoder_errors INTEGER NOT NULL DEFAULT 0;
ALTER TABLE ingest_runs ADD COLUMN claimed_elsewhere INTEGER NOT NULL DEFAULT 0;
-- Liveness: a running run without a heartbeat for abandon_after_hours, or whose process
-- (owner = host:pid:start time, CLI runs only) is gone, is marked abandoned.
ALTER TABLE ingest_runs ADD COLUMN heartbeat_at TIMESTAMP;
ALTER TABLE ingest_runs ADD COLUMN owner TEXT;

-- One row per object (member) a run could not settle: a store error after the retries, or an
-- unexpected exception in mmpipe's decoding (a bug). The object stays unseen; the next run takes it.
CREATE TABLE ingest_errors (
    run_id          TEXT NOT NULL,
    source_key      TEXT NOT NULL,
    source_etag     TEXT NOT NULL,
    member_path     TEXT NOT NULL,
    kind            TEXT NOT NULL,             -- store_error | decoder_error
    error           TEXT NOT NULL,             -- one line: the store's answer, or exception type and where
    traceback       TEXT NOT NULL,             -- decoder errors: frames and type, never the message
    created_at      TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP,
    PRIMARY KEY (run_id, source_key, source_etag, member_path)
);

-- Objects a batch is decoding now. Another run skips them while the claiming run is running, so
-- two runs over the same prefix never decode, shard or record one object twice. Deleted at commit.
CREATE TABLE ingest_claims (
    source_key      TEXT NOT NULL,
    etag            TEXT NOT NULL,
    run_id          TEXT NOT NULL,
    claimed_at      TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP,
    PRIMARY KEY (source_key, etag)
);

-- `mmpipe quarantine release`: what was re-queued after a fix, and why.
CREATE TABLE quarantine_releases (
    release_id      TEXT PRIMARY KEY,
    reason          TEXT NOT NULL,
    run_filter      TEXT,                      -- only what this ingest run quarantined, if given
    objects         INTEGER NOT NULL,
    members         INTEGER NOT NULL,
    members_json    TEXT NOT NULL,             -- [{source_key, source_etag, member_path, reason}]
    released_at     TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP
);
