-- The three hot tables lose their foreign keys to models: every ingested row paid a
-- per-row check (measured: a 50K-prediction batch 1.05 s -> 0.80 s on a 1M-row table).
-- Rows are only written by datasource.store for a model it has just looked up, and
-- models are never deleted through the API, so the checks guarded nothing.
ALTER TABLE predictions DROP CONSTRAINT IF EXISTS predictions_model_id_fkey;
ALTER TABLE feedback DROP CONSTRAINT IF EXISTS feedback_model_id_fkey;
ALTER TABLE rollup DROP CONSTRAINT IF EXISTS rollup_model_id_fkey;
