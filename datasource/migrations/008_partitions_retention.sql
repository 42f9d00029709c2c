-- Raw rows partitioned by time, labels on the prediction row, retention (issue 11).
--
-- * predictions and feedback are partitioned by RANGE (ts) in weeks (7 days from the epoch,
--   Thursdays at 00:00 UTC): RETENTION drops whole weeks of raw rows, and a raw-path read
--   of a window scans only the weeks it overlaps.
-- * PostgreSQL cannot enforce a unique key without the partition key, so (model_id,
--   output_id) is unique because every writer of a model holds its advisory lock and
--   replaces a key by delete-then-insert (datasource/store/writes.py); each partition has a
--   plain index on the key for that lookup.
-- * The label (and its time) is copied onto the prediction row at write time: every read
--   is of predictions alone, without a join to feedback (which stays the record of labels,
--   for labels that arrive before their prediction and for re-sent predictions).
-- * Partitions are created on demand by the writers through mlsli_add_partitions, a
--   SECURITY DEFINER function of the owner (the server's role owns no table), and dropped
--   by mlsli_drop_partitions (RETENTION), which keeps the keys of dropped predictions
--   (hashed) so that a late label for one is counted, not stored as an orphan.

CREATE FUNCTION mlsli_week_start(ts timestamptz) RETURNS date
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT date '1970-01-01' + (floor((extract(epoch FROM ts) / 86400) / 7) * 7)::int
$$;

CREATE FUNCTION mlsli_add_partitions(parent text, weeks date[]) RETURNS int
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
DECLARE
    d date;
    made int := 0;
BEGIN
    IF parent NOT IN ('predictions', 'feedback') THEN
        RAISE EXCEPTION 'not a partitioned raw table: %', parent;
    END IF;
    PERFORM pg_advisory_xact_lock(715018, -1);  -- one creator at a time
    FOREACH d IN ARRAY weeks LOOP
        IF (d - date '1970-01-01') % 7 <> 0 THEN
            RAISE EXCEPTION 'a week starts on a multiple of 7 days from the epoch, not %', d;
        END IF;
        IF to_regclass(format('%I', parent || '_p' || to_char(d, 'YYYYMMDD'))) IS NULL
           AND d >= coalesce((SELECT horizon::date FROM raw_horizon WHERE id = 1), '-infinity') THEN
            EXECUTE format('CREATE TABLE %I PARTITION OF %I FOR VALUES FROM (%L) TO (%L)',
                           parent || '_p' || to_char(d, 'YYYYMMDD'), parent,
                           d::timestamp AT TIME ZONE 'UTC', (d + 7)::timestamp AT TIME ZONE 'UTC');
            made := made + 1;
        END IF;
    END LOOP;
    RETURN made;
END
$$;

-- The time before which raw rows were dropped (one row; none: nothing dropped yet).
CREATE TABLE raw_horizon (
    id      int PRIMARY KEY CHECK (id = 1),
    horizon timestamptz NOT NULL
);

-- What retention did, per model: rows dropped, and late labels that found their
-- prediction dropped (counted here, not stored).
CREATE TABLE retention_counts (
    model_id            int PRIMARY KEY,
    predictions_dropped bigint NOT NULL DEFAULT 0,
    feedback_dropped    bigint NOT NULL DEFAULT 0,
    late_labels         bigint NOT NULL DEFAULT 0,
    late_label_last_ts  timestamptz
);

-- Keys of dropped predictions, hashed (hashtextextended, 64 bits: a false match needs a
-- collision among the model's dropped keys), with the cutoff that dropped them: kept until
-- the cutoff has moved on by RETENTION again.
CREATE TABLE dropped_keys (
    model_id   int NOT NULL,
    key_hash   bigint NOT NULL,
    dropped_by timestamptz NOT NULL
);
CREATE INDEX dropped_keys_key ON dropped_keys (model_id, key_hash);
CREATE INDEX dropped_keys_cutoff ON dropped_keys (dropped_by);

CREATE FUNCTION mlsli_drop_partitions(cutoff timestamptz, keys_cutoff timestamptz) RETURNS int
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
DECLARE
    part record;
    dropped int := 0;
    upper timestamptz;
BEGIN
    PERFORM pg_advisory_xact_lock(715018, -1);
    FOR part IN
        SELECT c.relname, p.relname AS parent,
               to_date(right(c.relname, 8), 'YYYYMMDD') AS week
        FROM pg_inherits i
        JOIN pg_class c ON c.oid = i.inhrelid
        JOIN pg_class p ON p.oid = i.inhparent
        WHERE p.relname IN ('predictions', 'feedback')
          AND p.relnamespace = 'public'::regnamespace
        ORDER BY week
    LOOP
        upper := (part.week + 7)::timestamp AT TIME ZONE 'UTC';
        CONTINUE WHEN upper > cutoff;
        IF part.parent = 'predictions' THEN
            EXECUTE format('INSERT INTO dropped_keys (model_id, key_hash, dropped_by)'
                           ' SELECT model_id, hashtextextended(output_id, 0), %L FROM %I',
                           cutoff, part.relname);
            EXECUTE format('INSERT INTO retention_counts AS r (model_id, predictions_dropped)'
                           ' SELECT model_id, count(*) FROM %I GROUP BY model_id'
                           ' ON CONFLICT (model_id) DO UPDATE SET predictions_dropped ='
                           ' r.predictions_dropped + excluded.predictions_dropped', part.relname);
        ELSE
            EXECUTE format('INSERT INTO retention_counts AS r (model_id, feedback_dropped)'
                           ' SELECT model_id, count(*) FROM %I GROUP BY model_id'
                           ' ON CONFLICT (model_id) DO UPDATE SET feedback_dropped ='
                           ' r.feedback_dropped + excluded.feedback_dropped', part.relname);
        END IF;
        EXECUTE format('DROP TABLE %I', part.relname);
        INSERT INTO raw_horizon AS h (id, horizon) VALUES (1, upper)
        ON CONFLICT (id) DO UPDATE SET horizon = greatest(h.horizon, excluded.horizon);
        dropped := dropped + 1;
    END LOOP;
    DELETE FROM dropped_keys WHERE dropped_by < keys_cutoff;  -- late labels for these are no longer told apart
    RETURN dropped;
END
$$;

-- Only the server's write role may create or drop partitions (db.grant_roles grants it).
REVOKE EXECUTE ON FUNCTION mlsli_add_partitions(text, date[]) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION mlsli_drop_partitions(timestamptz, timestamptz) FROM PUBLIC;

-- predictions and feedback as partitioned tables, with their rows (and each prediction's label)
ALTER TABLE predictions RENAME TO predictions_unpartitioned;
ALTER TABLE feedback RENAME TO feedback_unpartitioned;
-- The same columns and defaults (no keys or indexes: those are made after the rows move,
-- once the old tables and their index names are gone), predictions with its label.
CREATE TABLE predictions (
    LIKE predictions_unpartitioned INCLUDING DEFAULTS,
    label    double precision,      -- the feedback's label, copied at write time
    label_ts timestamptz            -- and its time (both NULL: no feedback yet)
) PARTITION BY RANGE (ts);
CREATE TABLE feedback (LIKE feedback_unpartitioned INCLUDING DEFAULTS) PARTITION BY RANGE (ts);

SELECT mlsli_add_partitions('predictions', array_agg(DISTINCT mlsli_week_start(ts)))
FROM predictions_unpartitioned HAVING count(*) > 0;
SELECT mlsli_add_partitions('feedback', array_agg(DISTINCT mlsli_week_start(ts)))
FROM feedback_unpartitioned HAVING count(*) > 0;

INSERT INTO predictions (model_id, output_id, ts, score, segset_id, features, written_at, label, label_ts)
SELECT p.model_id, p.output_id, p.ts, p.score, p.segset_id, p.features, p.written_at, f.label, f.ts
FROM predictions_unpartitioned p
LEFT JOIN feedback_unpartitioned f ON f.model_id = p.model_id AND f.output_id = p.output_id;
INSERT INTO feedback SELECT * FROM feedback_unpartitioned;
DROP TABLE predictions_unpartitioned, feedback_unpartitioned;

CREATE INDEX predictions_key ON predictions (model_id, output_id);
CREATE INDEX predictions_model_ts ON predictions (model_id, ts);
CREATE INDEX feedback_key ON feedback (model_id, output_id);
