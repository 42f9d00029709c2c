-- The fingerprint of the declared partial set the rollup was built for
-- (datasource.store.partials_fingerprint). No row yet: the next start-up
-- rebuilds the rollup once and records it, so a partial added in code is never
-- served as the zeros of a DEFAULT.
CREATE TABLE partial_set (
    id          int PRIMARY KEY DEFAULT 1 CHECK (id = 1),
    fingerprint text NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
