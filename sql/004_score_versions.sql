-- Scoring identity includes the object's LastModified as listed: re-uploading identical bytes keeps
-- the ETag but (per S3 semantics) drops the object's tags, so such an object must be scored again.
ALTER TABLE predictions ADD COLUMN source_modified TEXT NOT NULL DEFAULT '';
ALTER TABLE score_failures ADD COLUMN source_modified TEXT NOT NULL DEFAULT '';
