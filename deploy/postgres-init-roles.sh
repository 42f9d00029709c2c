#!/bin/sh
# Run once by the postgres image when it initializes an empty data directory
# (/docker-entrypoint-initdb.d): creates the server's two roles of datasource/roles.sql.
# The migrate service then creates the tables as the owner and grants the roles on them.
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
    -v rw_password="'${MLSLI_RW_PASSWORD}'" -v read_password="'${MLSLI_READ_PASSWORD}'" \
    -f /mlsli/roles.sql
