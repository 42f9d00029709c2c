-- Room on each page for the rows' next versions (issue 11, ingest).
--
-- A label updates its prediction row (label, label_ts), and every write batch adds its deltas
-- to rollup and score-bin rows that earlier batches wrote. None of those columns is indexed,
-- so PostgreSQL can write the new version on the same page (a HOT update, no index entry),
-- but only where the page has room: at the default fillfactor of 100 a page is full and each
-- update also inserts into every index of the table.
-- * prediction partitions keep 15 % free: most predictions get one label;
-- * the rollup and score-bin levels keep 30 %: their rows are updated by many batches.
ALTER TABLE rollup SET (fillfactor = 70);
ALTER TABLE rollup_5m SET (fillfactor = 70);
ALTER TABLE rollup_1h SET (fillfactor = 70);
ALTER TABLE rollup_1d SET (fillfactor = 70);
ALTER TABLE score_bins_5m SET (fillfactor = 70);
ALTER TABLE score_bins_1h SET (fillfactor = 70);
ALTER TABLE score_bins_1d SET (fillfactor = 70);

DO $$
DECLARE
    part record;
BEGIN
    FOR part IN
        SELECT c.relname FROM pg_inherits i
        JOIN pg_class c ON c.oid = i.inhrelid
        JOIN pg_class p ON p.oid = i.inhparent
        WHERE p.relname = 'predictions' AND p.relnamespace = 'public'::regnamespace
    LOOP
        EXECUTE format('ALTER TABLE %I SET (fillfactor = 85)', part.relname);
    END LOOP;
END
$$;

-- New weekly partitions of predictions are made with the same room (otherwise as in 008).
CREATE OR REPLACE FUNCTION mlsli_add_partitions(parent text, weeks date[]) RETURNS int
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
            EXECUTE format('CREATE TABLE %I PARTITION OF %I FOR VALUES FROM (%L) TO (%L) WITH (fillfactor = %s)',
                           parent || '_p' || to_char(d, 'YYYYMMDD'), parent,
                           d::timestamp AT TIME ZONE 'UTC', (d + 7)::timestamp AT TIME ZONE 'UTC',
                           CASE parent WHEN 'predictions' THEN 85 ELSE 100 END);
            made := made + 1;
        END IF;
    END LOOP;
    RETURN made;
END
$$;
REVOKE EXECUTE ON FUNCTION mlsli_add_partitions(text, date[]) FROM PUBLIC;
