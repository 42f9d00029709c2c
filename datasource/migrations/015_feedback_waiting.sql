-- feedback keeps only the labels that wait for their prediction (issue 11, ingest).
--
-- Since 008 a label is stored on its prediction's row (label, label_ts), and every read takes
-- it from there; feedback also held every label again, as the record that a re-sent
-- prediction copied its label from. Writing that second copy cost a 50,000-label batch
-- ~110 ms of its ~770 ms in PostgreSQL (benchmarks/README.md). Now:
-- * a label whose prediction is stored goes onto that row only; a re-sent prediction keeps
--   the label its old row held (datasource/store/writes.py);
-- * a label whose prediction has not come waits in feedback, and moves onto the prediction's
--   row when it comes (the feedback row is deleted then);
-- * retention counts the labels dropped with their predictions' weeks as dropped feedback,
--   as it counts the waiting labels of dropped feedback weeks.
-- The rows of feedback whose prediction is stored hold the label that prediction's row holds
-- (the invariant of 008): deleting them loses nothing.
DELETE FROM feedback f USING predictions p
WHERE p.model_id = f.model_id AND p.output_id = f.output_id;

-- (Otherwise as in 008; a function is replaced whole, hence the repetition.)
CREATE OR REPLACE FUNCTION mlsli_drop_partitions(cutoff timestamptz, keys_cutoff timestamptz) RETURNS int
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
            EXECUTE format('INSERT INTO retention_counts AS r (model_id, predictions_dropped, feedback_dropped)'
                           ' SELECT model_id, count(*), count(label) FROM %I GROUP BY model_id'
                           ' ON CONFLICT (model_id) DO UPDATE SET'
                           ' predictions_dropped = r.predictions_dropped + excluded.predictions_dropped,'
                           ' feedback_dropped = r.feedback_dropped + excluded.feedback_dropped', part.relname);
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
