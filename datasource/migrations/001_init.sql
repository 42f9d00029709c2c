-- Models, raw predictions and feedback, segment sets, model events and the
-- per-minute rollup of mergeable partial aggregates.

CREATE TABLE models (
    model_id    serial PRIMARY KEY,
    name        text NOT NULL UNIQUE,
    task        text NOT NULL CHECK (task IN ('binary_classification', 'regression')),
    threshold   double precision CHECK (threshold >= 0 AND threshold <= 1),
    description text NOT NULL DEFAULT '',
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- Each distinct combination of segment values of a model gets a small integer id,
-- so that raw rows and rollups carry one int instead of a JSON object and
-- filters/group-by resolve against this (small) table first.
CREATE TABLE segment_sets (
    model_id  int NOT NULL REFERENCES models ON DELETE CASCADE,
    segset_id serial,
    segments  jsonb NOT NULL,
    PRIMARY KEY (model_id, segset_id),
    UNIQUE (model_id, segments)
);

CREATE TABLE predictions (
    model_id  int NOT NULL REFERENCES models ON DELETE CASCADE,
    output_id text NOT NULL,
    ts        timestamptz NOT NULL,
    score     double precision NOT NULL,
    segset_id int NOT NULL,
    features  jsonb NOT NULL DEFAULT '{}',
    written_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (model_id, output_id)
);
CREATE INDEX predictions_model_ts ON predictions (model_id, ts);

-- Feedback is keyed like predictions and may arrive first; it joins when the
-- prediction arrives.
CREATE TABLE feedback (
    model_id  int NOT NULL REFERENCES models ON DELETE CASCADE,
    output_id text NOT NULL,
    ts        timestamptz NOT NULL,
    label     double precision NOT NULL,
    written_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (model_id, output_id)
);

CREATE TABLE model_events (
    event_id  bigserial PRIMARY KEY,
    model_id  int NOT NULL REFERENCES models ON DELETE CASCADE,
    ts        timestamptz NOT NULL,
    time_end  timestamptz,
    kind      text NOT NULL DEFAULT 'event',
    title     text NOT NULL,
    text      text NOT NULL DEFAULT '',
    tags      text[] NOT NULL DEFAULT '{}'
);
CREATE INDEX model_events_model_ts ON model_events (model_id, ts);

-- Every write batch takes the next revision; rollup rows remember the last
-- revision that touched them, so cached raw-path results know when to refresh.
CREATE SEQUENCE write_revision;
