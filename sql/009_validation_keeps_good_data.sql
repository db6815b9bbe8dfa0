-- Validation that keeps good data: per-image verdicts, bit-depth facts, accounting and re-admission.

-- BitsAllocated (the container) next to BitsStored, and whether samples are floating point, so the
-- bit-depth rule checks header consistency (1 <= stored <= allocated <= 16, or 32 for float/colour).
-- Older rows get the smallest container that holds their BitsStored.
ALTER TABLE images ADD COLUMN bits_allocated INTEGER;
ALTER TABLE images ADD COLUMN float_pixels BOOLEAN NOT NULL DEFAULT FALSE;
UPDATE images SET bits_allocated = CASE
    WHEN bits_stored <= 8 THEN 8 WHEN bits_stored <= 16 THEN 16 ELSE 32 END;

-- The run's accounting after validation: images kept for training and images excluded (by reason in
-- the validation report).
ALTER TABLE ingest_runs ADD COLUMN images_active INTEGER;
ALTER TABLE ingest_runs ADD COLUMN images_excluded INTEGER;

-- An image excluded by an earlier validation that a later one found usable again (a manifest, a
-- header rule or a validation setting was fixed): it re-entered training, and this says when and why.
CREATE TABLE readmissions (
    image_id        TEXT NOT NULL,
    readmitted_by   TEXT NOT NULL,             -- the ingest run whose validation re-evaluated it
    ingest_run_id   TEXT NOT NULL,             -- the image's ingest run (a relabelled image moves to the run that re-read it)
    reason          TEXT NOT NULL,             -- why it had been excluded
    created_at      TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP,
    PRIMARY KEY (image_id, readmitted_by)
);
CREATE INDEX readmissions_run ON readmissions (readmitted_by);
