-- Suffix sums next to the score bins (issue 11): a panel at a grid threshold k/100 needs, per
-- bucket, only the sums of n, pos, neg and sum_score over the bins >= k. ``suffix`` holds a
-- 101-byte index (byte k: the number of bin records below bin k) then, per bin record, those
-- four sums over its bin and the bins above it (32 bytes), then a record of zeros
-- (datasource/store/bins.py). A threshold read returns one 32-byte record per row, where the
-- whole list of bins was ~2.7 KB per 5-minute row at 1M predictions. Kept inline as ``bins``
-- is: at most 101 + 32 x 102 = 3,365 bytes, with ``bins`` at most 4,141 (under the 8,160-byte
-- tuple target). The partial-set fingerprint changes with this layout, so every model's
-- rollup and bins are rebuilt from raw rows at the next start, which fills the column.
ALTER TABLE score_bins_5m ADD COLUMN suffix bytea NOT NULL DEFAULT '';
ALTER TABLE score_bins_1h ADD COLUMN suffix bytea NOT NULL DEFAULT '';
ALTER TABLE score_bins_1d ADD COLUMN suffix bytea NOT NULL DEFAULT '';
ALTER TABLE score_bins_5m ALTER COLUMN suffix SET STORAGE PLAIN;
ALTER TABLE score_bins_1h ALTER COLUMN suffix SET STORAGE PLAIN;
ALTER TABLE score_bins_1d ALTER COLUMN suffix SET STORAGE PLAIN;
