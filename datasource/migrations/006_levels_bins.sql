-- Rollup levels and score bins (issue 11).
--
-- The same partials at four bucket widths, so that a panel reads the coarsest one that
-- divides its window and step: rollup (1 min), rollup_5m, rollup_1h, rollup_1d. A bucket
-- ending at e of width L holds the predictions with ts in (e - L, e], as the minute rollup.
CREATE TABLE rollup_5m (LIKE rollup INCLUDING ALL);
CREATE TABLE rollup_1h (LIKE rollup INCLUDING ALL);
CREATE TABLE rollup_1d (LIKE rollup INCLUDING ALL);

-- Score bins of classifiers, at 5 min, 1 h and 1 d (a minute level would hold about
-- two rows per prediction, and cost ingest more than it saves): per bucket, segment set (0: all)
-- and score bin k (scores in [k/100, (k+1)/100); bin 100 holds score 1), the predictions,
-- the labeled positives and negatives, and their score sums. From them, any threshold
-- k/100 is exact, and ROC AUC, average precision and calibration are binned.
-- The bin columns must match datasource.store.partials.BIN_PARTIALS.
CREATE TABLE score_bins_5m (
    model_id      int NOT NULL,
    segset_id     int NOT NULL,
    bucket_end    bigint NOT NULL,
    bin           smallint NOT NULL,
    n             bigint NOT NULL DEFAULT 0,
    pos           bigint NOT NULL DEFAULT 0,
    neg           bigint NOT NULL DEFAULT 0,
    sum_score     double precision NOT NULL DEFAULT 0,
    sum_score_lab double precision NOT NULL DEFAULT 0,
    PRIMARY KEY (model_id, segset_id, bucket_end, bin)
);
CREATE TABLE score_bins_1h (LIKE score_bins_5m INCLUDING ALL);
CREATE TABLE score_bins_1d (LIKE score_bins_5m INCLUDING ALL);
