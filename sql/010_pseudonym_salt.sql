-- Which pseudonymisation salt the catalog's pseudonyms were made with, as a fingerprint (an HMAC of a
-- fixed text, never the salt). `mmpipe init` refuses another salt unless it is rotated on purpose:
-- a new salt gives every patient a new key, so patient-level splits would no longer hold.
CREATE TABLE pseudonym_salts (
    fingerprint     TEXT PRIMARY KEY,
    status          TEXT NOT NULL,             -- active | retired
    reason          TEXT NOT NULL,
    recorded_at     TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP
);
