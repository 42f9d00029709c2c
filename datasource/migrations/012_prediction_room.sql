-- Half of each prediction page kept free (issue 11, ingest; was 15 % in 009).
--
-- A label writes a new version of its prediction's row (label and label_ts: 16 bytes more),
-- and a batch labels many rows of the same pages in one transaction, whose old versions
-- cannot be pruned before it commits. At 15 % free only ~33 % of those updates found room on
-- the page (a HOT update); the others moved the row to another page and inserted it into both
-- indexes. Measured at 1M predictions + 800K labels in 50,000-label batches
-- (benchmarks/ingest.py): HOT updates 33 % -> 100 %, the labels' UPDATE 8.4 s -> 4.6 s, bulk
-- feedback 39K -> 48K rows/s; the partitions end 8 % larger (165 -> 178 MB: the rows moved
-- away at 15 % left holes behind too).
-- Existing partitions keep their filled pages; the setting applies to the pages filled next.
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
        EXECUTE format('ALTER TABLE %I SET (fillfactor = 50)', part.relname);
    END LOOP;
END
$$;

-- New weekly partitions of predictions get the same room (otherwise as in 009; a function is
-- replaced whole, hence the repetition).
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
                           CASE parent WHEN 'predictions' THEN 50 ELSE 100 END);
            made := made + 1;
        END IF;
    END LOOP;
    RETURN made;
END
$$;
REVOKE EXECUTE ON FUNCTION mlsli_add_partitions(text, date[]) FROM PUBLIC;
