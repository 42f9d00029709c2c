-- Least privilege for mlsli: run once as a superuser (or the database owner with CREATEROLE),
-- in the application database, e.g.
--   psql "$OWNER_URL" -v rw_password="'...'" -v read_password="'...'" -f datasource/roles.sql
--
-- * the schema owner (the role of OWNER_URL) runs the migrations:
--       python -c "from datasource import db; db.migrate_as_owner('$OWNER_URL',
--                  rw_role='mlsli_rw', read_role='mlsli_read')"
--   which also re-grants the two roles below on every table (new tables included);
-- * the server runs as mlsli_rw (DATABASE_URL) with AUTO_MIGRATE=0: it reads and writes the
--   data tables and can create temporary tables (staging of write batches), nothing else;
-- * optionally, read endpoints use mlsli_read (DATABASE_READ_URL): SELECT only.
--
-- Neither server role owns a table, so neither can ALTER, DROP or TRUNCATE one.

CREATE ROLE mlsli_rw LOGIN PASSWORD :rw_password NOSUPERUSER NOCREATEDB NOCREATEROLE;
CREATE ROLE mlsli_read LOGIN PASSWORD :read_password NOSUPERUSER NOCREATEDB NOCREATEROLE;

-- What db.grant_roles() runs (idempotent; migrate_as_owner calls it after migrating):
GRANT USAGE ON SCHEMA public TO mlsli_rw, mlsli_read;
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO mlsli_rw;
GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO mlsli_rw;
GRANT SELECT ON ALL TABLES IN SCHEMA public TO mlsli_read;
GRANT SELECT ON ALL SEQUENCES IN SCHEMA public TO mlsli_read;
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO mlsli_rw;
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT USAGE, SELECT ON SEQUENCES TO mlsli_rw;
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT ON TABLES TO mlsli_read;
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT ON SEQUENCES TO mlsli_read;
-- Writers create weekly partitions of the raw tables, and RETENTION drops old ones, through
-- two SECURITY DEFINER functions of the owner (migration 008); the read role can do neither.
GRANT EXECUTE ON FUNCTION mlsli_add_partitions(text, date[]),
    mlsli_drop_partitions(timestamptz, timestamptz) TO mlsli_rw;
-- PostgreSQL 15+ no longer lets PUBLIC create in schema public; on older servers also run:
--   REVOKE CREATE ON SCHEMA public FROM PUBLIC;
