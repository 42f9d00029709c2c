-- Score bins kept as parts (issue 11, ingest): a write batch appends its delta of a bucket and
-- segment set as a row of its own, keyed by the batch's write revision, instead of reading the
-- stored row, adding, and writing it back whole. The sum of a key's rows is its bins (reads
-- already sum rows: a panel's bucket spans several rows of a coarser or finer level). A writer
-- folds a key's rows into one once it has MAX_PARTS of them (datasource/store/bins.py).
-- Why: a late label changes one bin of a row holding up to 101 (with its suffix sums, ~5 KB),
-- and a batch of 1,000 labels spread over two days rewrote ~1,500 such rows per level.
-- The rows written so far are each the whole of their key: revision 0.
ALTER TABLE score_bins_5m ADD COLUMN revision bigint NOT NULL DEFAULT 0;
ALTER TABLE score_bins_1h ADD COLUMN revision bigint NOT NULL DEFAULT 0;
ALTER TABLE score_bins_1d ADD COLUMN revision bigint NOT NULL DEFAULT 0;
ALTER TABLE score_bins_5m DROP CONSTRAINT score_bins_5m_pkey,
    ADD PRIMARY KEY (model_id, segset_id, bucket_end, revision);
ALTER TABLE score_bins_1h DROP CONSTRAINT score_bins_1h_pkey,
    ADD PRIMARY KEY (model_id, segset_id, bucket_end, revision);
ALTER TABLE score_bins_1d DROP CONSTRAINT score_bins_1d_pkey,
    ADD PRIMARY KEY (model_id, segset_id, bucket_end, revision);
