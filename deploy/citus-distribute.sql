-- Distribute mlsli's tables on a Citus cluster (docs/scaling.md). Run on the coordinator as
-- the schema owner, after the migrations and after the workers are registered; idempotent:
-- a table that is already a Citus table is left as it is, so it runs on every
-- `docker compose -f docker-compose.yml -f deploy/docker-compose.citus.yml up` and picks up
-- the tables that a new migration created (they are plain coordinator tables until then).
--
--   psql -v ON_ERROR_STOP=1 -f deploy/citus-distribute.sql "$OWNER_URL"
--
-- Where each table goes:
--   * reference (one shard, copied to every node): models, model_events, raw_horizon;
--   * local (on the coordinator only): schema_version, partial_set;
--   * distributed by model_id, co-located with predictions: every other table of the schema,
--     each of which must have a model_id column in every primary key and unique constraint
--     (predictions and feedback with their weekly partitions, segment_sets, model_features,
--     reference_columns, the rollup and score-bin tables at every level, retention_counts,
--     dropped_keys, ...). A weekly partition that mlsli_add_partitions makes later is
--     distributed by Citus as it is created, because its parent is distributed.
-- A table that fits none of these stops the script with its name: decide its place here.
--
-- The grants that migrate_as_owner gave the server's roles are copied to the shards when a
-- table is distributed; later GRANTs on distributed tables are propagated by Citus.

\set ON_ERROR_STOP on

-- Each table of the schema, where it belongs and what Citus made of it so far: NULL (a plain
-- PostgreSQL table), or 'local' too for a table that references a reference table (Citus turns
-- it into a coordinator-local Citus table when models becomes one; create_distributed_table
-- then takes it from there). Partitions are distributed with their parent.
CREATE TEMP VIEW mlsli_placement AS
SELECT c.oid::regclass AS rel,
       c.relname::text AS relname,
       CASE WHEN c.relname IN ('models', 'model_events', 'raw_horizon') THEN 'reference'
            WHEN c.relname IN ('schema_version', 'partial_set') THEN 'local'
            WHEN EXISTS (SELECT 1 FROM pg_attribute a
                         WHERE a.attrelid = c.oid AND a.attname = 'model_id' AND NOT a.attisdropped)
                 THEN 'distributed'
            ELSE 'undecided' END AS placement,
       CASE WHEN p.logicalrelid IS NULL THEN NULL
            WHEN p.partkey IS NOT NULL THEN 'distributed'
            WHEN p.repmodel = 't' THEN 'reference'
            ELSE 'local' END AS citus_type,
       CASE WHEN p.partkey IS NOT NULL THEN column_to_column_name(p.logicalrelid, p.partkey) END
           AS distribution_column,
       p.colocationid
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN pg_dist_partition p ON p.logicalrelid = c.oid
WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'p') AND NOT c.relispartition;

-- Checks before anything changes.
DO $check$
DECLARE
    bad text;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_dist_node WHERE groupid > 0 AND noderole = 'primary' AND isactive) THEN
        RAISE EXCEPTION 'no active Citus worker is registered (citus_add_node first)';
    END IF;
    IF to_regclass('predictions') IS NULL THEN
        RAISE EXCEPTION 'table predictions is missing: run the migrations first';
    END IF;
    SELECT string_agg(relname, ', ' ORDER BY relname) INTO bad
    FROM mlsli_placement WHERE placement = 'undecided';
    IF bad IS NOT NULL THEN
        RAISE EXCEPTION 'no model_id column and no decided place on Citus: %', bad
            USING HINT = 'name the table in deploy/citus-distribute.sql (reference or local)';
    END IF;
    -- Citus enforces a unique constraint of a distributed table only with the distribution column.
    SELECT string_agg(format('%s on %s', i.indexrelid::regclass, m.relname), ', ') INTO bad
    FROM mlsli_placement m
    JOIN pg_index i ON i.indrelid = m.rel AND i.indisunique
    JOIN pg_attribute a ON a.attrelid = m.rel AND a.attname = 'model_id'
    WHERE m.placement = 'distributed' AND m.citus_type IS DISTINCT FROM 'distributed'
      AND NOT a.attnum = ANY (i.indkey::int2[]);
    IF bad IS NOT NULL THEN
        RAISE EXCEPTION 'unique index without model_id, not enforceable on a table distributed by it: %', bad;
    END IF;
END
$check$;

-- Tables that hold rows before they are distributed (an existing single-server database made the
-- coordinator): their local copy is truncated once every table is a Citus table. A partitioned
-- table (predictions, feedback) holds its rows in its weekly partitions, so it is read with
-- them; truncating it truncates them too.
CREATE TEMP TABLE mlsli_had_rows (rel regclass);
DO $rows$
DECLARE
    t regclass;
    partitioned boolean;
    found_row boolean;
BEGIN
    FOR t, partitioned IN
        SELECT m.rel, c.relkind = 'p' FROM mlsli_placement m JOIN pg_class c ON c.oid = m.rel
        WHERE m.placement IN ('reference', 'distributed') AND m.citus_type IS DISTINCT FROM m.placement
    LOOP
        EXECUTE format('SELECT EXISTS (SELECT 1 FROM %s%s)',
                       CASE WHEN partitioned THEN '' ELSE 'ONLY ' END, t) INTO found_row;
        IF found_row THEN
            INSERT INTO mlsli_had_rows VALUES (t);
        END IF;
    END LOOP;
END
$rows$;

-- One statement each (\gexec), in an order that lets every foreign key be created: the
-- reference tables first (models before the tables that reference it), then predictions,
-- which starts the co-location group, then the other tables into that group.
SELECT format('SELECT create_reference_table(%L)', rel)
FROM mlsli_placement WHERE placement = 'reference' AND citus_type IS DISTINCT FROM 'reference'
ORDER BY relname <> 'models', relname
\gexec

SELECT format('SELECT create_distributed_table(%L, %L)', rel, 'model_id')
FROM mlsli_placement WHERE relname = 'predictions' AND citus_type IS DISTINCT FROM 'distributed'
\gexec

SELECT format('SELECT create_distributed_table(%L, %L, colocate_with => %L)', rel, 'model_id', 'predictions')
FROM mlsli_placement
WHERE placement = 'distributed' AND relname <> 'predictions' AND citus_type IS DISTINCT FROM 'distributed'
ORDER BY relname
\gexec

SELECT format('SELECT truncate_local_data_after_distributing_table(%L)', rel)
FROM mlsli_had_rows
\gexec

-- What the cluster now holds must be what is declared above (also catches a table distributed
-- by hand some other way, e.g. by another column or outside the co-location group).
DO $verify$
DECLARE
    bad text;
BEGIN
    SELECT string_agg(format('%s (%s, expected %s)', relname, coalesce(citus_type, 'plain'), placement),
                      ', ' ORDER BY relname) INTO bad
    FROM mlsli_placement m
    WHERE CASE placement
            WHEN 'reference' THEN citus_type IS DISTINCT FROM 'reference'
            WHEN 'local' THEN citus_type IS NOT NULL
            WHEN 'distributed' THEN citus_type IS DISTINCT FROM 'distributed'
                OR distribution_column IS DISTINCT FROM 'model_id'
                OR colocationid IS DISTINCT FROM (SELECT colocationid FROM mlsli_placement
                                                  WHERE relname = 'predictions')
            ELSE true END;
    IF bad IS NOT NULL THEN
        RAISE EXCEPTION 'tables not placed as declared: %', bad;
    END IF;
END
$verify$;

SELECT relname AS "table", placement, distribution_column, colocationid
FROM mlsli_placement ORDER BY placement, relname;
