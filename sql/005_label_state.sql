-- What the stored labels were resolved with, per prefix: a hash of the configured classes and
-- header rules, and one of the label manifests' keys and ETags. A run that sees other hashes
-- re-queues the objects whose labels would change; a run records its hashes once it succeeds.
ALTER TABLE ingest_runs ADD COLUMN rules_hash TEXT;
ALTER TABLE ingest_runs ADD COLUMN manifests_hash TEXT;

CREATE TABLE label_state (
    prefix          TEXT PRIMARY KEY,
    rules_hash      TEXT NOT NULL,
    manifests_hash  TEXT NOT NULL,
    run_id          TEXT NOT NULL               -- the successful run that recorded them
);

-- A frozen test snapshot keeps the labels it was frozen with: a relabelled image changes training
-- data at once, and the test set only through an explicit new freeze.
ALTER TABLE test_snapshot_members ADD COLUMN label TEXT;
UPDATE test_snapshot_members
SET label = (SELECT i.label FROM images i WHERE i.image_id = test_snapshot_members.image_id);
