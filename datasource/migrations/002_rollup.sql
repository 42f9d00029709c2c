-- Mergeable partial aggregates per model, one-minute bucket and segment set.
-- segset_id 0 holds the sum over all segment sets of the bucket, so that an
-- unfiltered query reads one row per minute. bucket_end is in epoch seconds:
-- the bucket ending at e holds the predictions with ts in (e - 60 s, e], so a
-- window (t - W, t] on the minute grid is a sum of whole buckets.
-- The partial columns must match datasource.store.PARTIALS (checked at start-up).
CREATE TABLE rollup (
    model_id     int NOT NULL REFERENCES models ON DELETE CASCADE,
    segset_id    int NOT NULL,
    bucket_end   bigint NOT NULL,
    revision     bigint NOT NULL,
    n_pred       bigint NOT NULL DEFAULT 0,
    n_pred_pos   bigint NOT NULL DEFAULT 0,
    n_lab        bigint NOT NULL DEFAULT 0,
    tp           bigint NOT NULL DEFAULT 0,
    fp           bigint NOT NULL DEFAULT 0,
    sum_score    double precision NOT NULL DEFAULT 0,
    sum_score_sq double precision NOT NULL DEFAULT 0,
    sum_label    double precision NOT NULL DEFAULT 0,
    sum_label_sq double precision NOT NULL DEFAULT 0,
    sum_err      double precision NOT NULL DEFAULT 0,
    sum_abs_err  double precision NOT NULL DEFAULT 0,
    sum_sq_err   double precision NOT NULL DEFAULT 0,
    sum_logloss  double precision NOT NULL DEFAULT 0,
    PRIMARY KEY (model_id, segset_id, bucket_end)
);
