-- Feature names seen per model (kept at ingest, so listing them never scans
-- predictions) and reference distributions (e.g. the training data) for drift.

CREATE TABLE model_features (
    model_id int NOT NULL REFERENCES models ON DELETE CASCADE,
    name     text NOT NULL,
    PRIMARY KEY (model_id, name)
);

CREATE TABLE reference_columns (
    model_id    int NOT NULL REFERENCES models ON DELETE CASCADE,
    reference   text NOT NULL,
    column_name text NOT NULL,
    num_values  double precision[],
    cat_values  text[],
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (model_id, reference, column_name),
    CHECK ((num_values IS NULL) <> (cat_values IS NULL))
);
