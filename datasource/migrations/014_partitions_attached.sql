-- New weeks of raw rows: attached, not created as partitions, and made by another writer
-- meanwhile (issue 11, ingest).
--
-- * CREATE TABLE ... PARTITION OF takes an ACCESS EXCLUSIVE lock on the parent: it waits for
--   every open transaction that wrote to predictions (or feedback), of any model, and every
--   writer that comes after waits behind it. With the bulk client's batches in flight
--   (datasource/store/locks.py) each new week stalled them ~1 s: at 1M predictions over 30
--   days, ten weeks, and half of the backends' samples waited for this function's lock.
--   A table made alone (LIKE the parent: columns, collations, defaults, NOT NULL) and then
--   attached takes SHARE UPDATE EXCLUSIVE on the parent, which writers' locks do not
--   conflict with; attaching builds its indexes (empty) and checks its rows (none).
-- * Writers of different models (or the bulk client's batches) may need the same new week.
--   The advisory lock lets one make it at a time, but the second's to_regclass can still
--   read its backend's cached catalog, miss the week the first committed, and fail
--   ("relation ... already exists": a 500 for its batch; seen once, with two connections
--   writing one week's rows at once). That error now means the week is there.
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
                EXECUTE format('CREATE TABLE %I (LIKE %I INCLUDING DEFAULTS INCLUDING CONSTRAINTS)'
                               ' WITH (fillfactor = %s)', parent || '_p' || to_char(d, 'YYYYMMDD'), parent,
                               CASE parent WHEN 'predictions' THEN 50 ELSE 100 END);
                EXECUTE format('ALTER TABLE %I ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)',
                               parent, parent || '_p' || to_char(d, 'YYYYMMDD'),
                               d::timestamp AT TIME ZONE 'UTC', (d + 7)::timestamp AT TIME ZONE 'UTC');
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
