-- The two-stage recipe and resumable training (mmpipe.train, mmpipe.checkpoints): each epoch
-- records its stage (1 = head and late blocks at lr, 2 = progressive unfreezing at lr_finetune);
-- a run records options it ignored (e.g. freezing a random-init backbone) and how often it resumed.
ALTER TABLE epoch_metrics ADD COLUMN stage INTEGER NOT NULL DEFAULT 1;
ALTER TABLE training_runs ADD COLUMN warnings TEXT;
ALTER TABLE training_runs ADD COLUMN resumed INTEGER NOT NULL DEFAULT 0;
