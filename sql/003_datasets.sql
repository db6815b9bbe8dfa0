-- Training-ready datasets: validation reports linked from ingest runs, plan lineage, and the
-- recorded re-evaluation of the champion on each newly frozen test snapshot.

-- The batch validation report (JSON, linking the GX Data Docs) next to the ingest run report.
ALTER TABLE ingest_runs ADD COLUMN validation_report_uri TEXT;

-- plan -> validations -> ingest runs (source objects hang off ingest runs and images).
CREATE TABLE dataset_lineage (
    dataset_version TEXT NOT NULL,
    kind            TEXT NOT NULL,             -- ingest_run | batch_validation | dataset_validation
    ref             TEXT NOT NULL,
    PRIMARY KEY (dataset_version, kind, ref)
);
CREATE INDEX dataset_lineage_ref ON dataset_lineage (kind, ref);

-- The champion of the day, evaluated on a test snapshot it had not yet been measured on.
CREATE TABLE champion_evaluations (
    test_snapshot   TEXT NOT NULL,
    model_version   TEXT NOT NULL,
    macro_f1        DOUBLE PRECISION NOT NULL,
    accuracy        DOUBLE PRECISION NOT NULL,
    reason          TEXT NOT NULL,
    created_at      TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP,
    PRIMARY KEY (test_snapshot, model_version)
);
