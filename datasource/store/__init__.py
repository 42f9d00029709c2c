"""All SQL of the project, by subject: ``catalog`` (models, segments, events, references),
``partials`` (the declared partial aggregates), ``writes`` (staged upserts with rollup
upkeep, rebuild, check, schema sync) and ``reads`` (partials per bucket, raw rows).

Design, in short:

* ``predictions`` and ``feedback`` are keyed by (model, output_id). A re-sent
  record replaces the old one (upsert); feedback may come first and joins when
  its prediction arrives.
* ``rollup`` holds mergeable partial aggregates (counts and sums, see
  ``PARTIALS``) per model, one-minute bucket and segment set, plus segset 0 for
  all segments; its columns are derived from the declaration, and it is rebuilt
  when the declared set changes.
* Threshold-dependent partials (``tp``, ``fp``, ``n_pred_pos``…) are kept at the
  model's default threshold; other thresholds are aggregated from raw rows with
  the very same SQL expressions.

Callers use ``from datasource import store`` and ``store.<function>``.
"""

from datasource.store.catalog import (
    Model,
    add_event,
    feature_names,
    get_model,
    list_events,
    list_models,
    reference_column,
    reference_names,
    segment_sets,
    set_reference,
    upsert_model,
)
from datasource.store.partials import (
    COUNT_PARTIALS,
    EPS,
    PARTIALS,
    ROLLUP_BUCKET_S,
    partial_type,
    partials_fingerprint,
)
from datasource.store.reads import (
    bucket_revisions,
    column_rows,
    joined_rows,
    latest_prediction_ts,
    partials_by_bucket,
    rollup_totals,
    table_counts,
)
from datasource.store.writes import (
    check_rollup,
    check_schema,
    rebuild_rollup,
    sync_partials,
    write_feedback,
    write_predictions,
)

__all__ = [
    "COUNT_PARTIALS", "EPS", "PARTIALS", "ROLLUP_BUCKET_S", "Model", "add_event", "bucket_revisions",
    "check_rollup", "check_schema", "column_rows", "feature_names", "get_model", "joined_rows",
    "latest_prediction_ts", "list_events", "list_models", "partial_type", "partials_by_bucket",
    "partials_fingerprint", "rebuild_rollup", "rollup_totals", "reference_column", "reference_names", "segment_sets",
    "set_reference", "sync_partials", "table_counts", "upsert_model", "write_feedback",
    "write_predictions",
]
