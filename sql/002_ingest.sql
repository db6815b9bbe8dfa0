-- Ingest at hospital depth: label manifests, decoding facts per image, and duplicates that keep
-- enough to take over an image whose original source is superseded.

-- The label manifests currently under the ingest prefixes (mirrors the store: one row per key).
CREATE TABLE label_manifests (
    manifest_key    TEXT PRIMARY KEY,
    etag            TEXT NOT NULL,
    status          TEXT NOT NULL,             -- ok | invalid
    detail          TEXT,                      -- why it is invalid (row numbers, never values)
    entries_json    TEXT NOT NULL,             -- {relative path: label}
    recorded_at     TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP
);

-- Technical facts of the decoded image (no PHI: coded values only).
ALTER TABLE images ADD COLUMN body_part TEXT;
ALTER TABLE images ADD COLUMN n_frames INTEGER;
ALTER TABLE images ADD COLUMN photometric TEXT;
ALTER TABLE images ADD COLUMN transfer_syntax TEXT;

-- What the duplicate itself was: its label (conflicts are reported) and pseudonymous keys.
ALTER TABLE duplicates ADD COLUMN frame INTEGER;
ALTER TABLE duplicates ADD COLUMN label TEXT;
ALTER TABLE duplicates ADD COLUMN label_source TEXT;
ALTER TABLE duplicates ADD COLUMN patient_key TEXT;
ALTER TABLE duplicates ADD COLUMN study_key TEXT;
CREATE INDEX duplicates_of ON duplicates (duplicate_of);
CREATE INDEX quarantine_reason ON quarantine (reason);
