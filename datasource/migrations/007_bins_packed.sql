-- Score bins packed per bucket and segment set (issue 11): one row per bucket_end and
-- segment set holding its non-empty bins as 41-byte records (bin smallint as one byte, then
-- n, pos, neg, sum_score, sum_score_lab as little-endian float64; sorted by bin), laid out by
-- datasource/store/bins.py. A 7-day panel at a 5-minute step reads 2,016 rows instead of
-- ~133K. At most 101 records (4,141 bytes): kept inline (no TOAST, no compression).
-- The partial-set fingerprint changes with this layout, so the rollup and the bins are
-- rebuilt from raw rows at the next start.
DROP TABLE score_bins_5m, score_bins_1h, score_bins_1d;
CREATE TABLE score_bins_5m (
    model_id   int NOT NULL,
    segset_id  int NOT NULL,
    bucket_end bigint NOT NULL,
    bins       bytea NOT NULL,
    PRIMARY KEY (model_id, segset_id, bucket_end)
) WITH (toast_tuple_target = 8160);
ALTER TABLE score_bins_5m ALTER COLUMN bins SET STORAGE PLAIN;
CREATE TABLE score_bins_1h (LIKE score_bins_5m INCLUDING ALL) WITH (toast_tuple_target = 8160);
CREATE TABLE score_bins_1d (LIKE score_bins_5m INCLUDING ALL) WITH (toast_tuple_target = 8160);
