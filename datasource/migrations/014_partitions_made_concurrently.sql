-- A week's partition made by another writer meanwhile (issue 11).
--
-- Writers of different models run at once (each holds its own model's lock), and both may
-- need the same new week. The advisory lock in this function lets one create it at a time,
-- but the second's to_regclass can still read its backend's cached catalog, miss the
-- partition the first committed, and fail on CREATE TABLE ("relation ... already exists":
-- a 500 for its batch). Seen once, with two connections writing one week's rows at once (a
-- prototype of parallel bulk writers). That error now means the week is there.
-- (Otherwise as in 012; a function is replaced whole, hence the repetition.)
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
            BEGIN
                EXECUTE format('CREATE TABLE %I PARTITION OF %I FOR VALUES FROM (%L) TO (%L) WITH (fillfactor = %s)',
                               parent || '_p' || to_char(d, 'YYYYMMDD'), parent,
                               d::timestamp AT TIME ZONE 'UTC', (d + 7)::timestamp AT TIME ZONE 'UTC',
                               CASE parent WHEN 'predictions' THEN 50 ELSE 100 END);
                made := made + 1;
            EXCEPTION WHEN duplicate_table THEN
                NULL;  -- made by a writer that committed after this backend last read the catalog
            END;
        END IF;
    END LOOP;
    RETURN made;
END
$$;
REVOKE EXECUTE ON FUNCTION mlsli_add_partitions(text, date[]) FROM PUBLIC;
