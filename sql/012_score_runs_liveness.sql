-- Scoring runs, like ingest runs (008), heartbeat and claim: a run left running by a killed process
-- is marked 'abandoned' (score_runs.status) by the next run or the sweep, and two runs of one model
-- over one prefix at once score each object once (the other counts it skipped, claimed elsewhere).
ALTER TABLE score_runs ADD COLUMN heartbeat_at TIMESTAMP;
-- The process running it whole (host:pid:start time), CLI runs only.
ALTER TABLE score_runs ADD COLUMN owner TEXT;
-- Objects left to a concurrent run of the same model (counted within skipped).
ALTER TABLE score_runs ADD COLUMN claimed_elsewhere INTEGER NOT NULL DEFAULT 0;

-- Objects a running scoring run will score. Deleted when the run is reconciled; a claim of a run no
-- longer running binds nobody.
CREATE TABLE score_claims (
    model_version   TEXT NOT NULL,
    source_key      TEXT NOT NULL,
    run_id          TEXT NOT NULL,
    claimed_at      TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP,
    PRIMARY KEY (model_version, source_key)
);
CREATE INDEX score_claims_run ON score_claims (run_id);
