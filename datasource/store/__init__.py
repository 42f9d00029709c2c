"""All SQL of the project, by subject: ``catalog`` (models, segments, events, references),
``partials`` (the declared partial aggregates), ``writes`` (staged upserts with rollup
upkeep, rebuild, check, schema sync) and ``reads`` (partials per bucket, raw rows).

Design, in short:

* ``predictions`` and ``feedback`` are keyed by (model, output_id). A re-sent
  record replaces the old one (upsert). A label is stored on its prediction's row, so that
  reads never join feedback; a label that comes before its prediction waits in ``feedback``
  and moves onto the row when the prediction arrives. Both are partitioned by week of ts
  (``retention``).
* ``rollup`` holds mergeable partial aggregates (counts and sums, see
  ``PARTIALS``) per model, one-minute bucket and segment set, plus segset 0 for
  all segments; ``rollup_5m``, ``rollup_1h`` and ``rollup_1d`` hold the same at
  coarser widths (``LEVELS``), so long panels read few rows. The columns are derived
  from the declaration, and every level is rebuilt when the declared set changes.
* Threshold-dependent partials (``tp``, ``fp``, ``n_pred_pos``…) are kept at the
  model's default threshold; ``score_bins*`` keep classifiers' counts per score bin
  of width 0.01, from which any threshold k/100 is exact (and ROC AUC, average
  precision, calibration are binned). Other thresholds are aggregated from raw rows
  with the very same SQL expressions.

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
    ALL_TIME_S,
    BIN_BASE_S,
    BIN_PARTIALS,
    COUNT_PARTIALS,
    EPS,
    LEVELS,
    N_BINS,
    PARTIALS,
    ROLLUP_BUCKET_S,
    SCORE_BINS,
    THRESHOLD_PARTIALS,
    bin_index,
    grid_bin,
    partial_type,
    partials_fingerprint,
)
from datasource.store.reads import (
    bucket_revisions,
    column_rows,
    joined_rows,
    latest_prediction_ts,
    partials_by_bucket,
    range_revision,
    rollup_totals,
    score_bins_by_bucket,
    table_counts,
)
from datasource.store.retention import (
    RawRowsDropped,
    apply_retention,
    partitions,
    raw_horizon,
    retention_status,
)
from datasource.store.writes import (
    check_rollup,
    check_schema,
    fold_score_bins,
    make_weeks,
    rebuild_rollup,
    sync_partials,
    write_feedback,
    write_predictions,
)

__all__ = [
    "ALL_TIME_S", "BIN_BASE_S", "BIN_PARTIALS", "LEVELS", "N_BINS", "SCORE_BINS", "THRESHOLD_PARTIALS", "bin_index", "grid_bin",
    "score_bins_by_bucket", "COUNT_PARTIALS", "EPS", "PARTIALS", "ROLLUP_BUCKET_S", "Model", "add_event", "bucket_revisions",
    "check_rollup", "check_schema", "fold_score_bins", "make_weeks", "column_rows", "feature_names", "get_model", "joined_rows",
    "latest_prediction_ts", "list_events", "list_models", "partial_type", "partials_by_bucket",
    "partials_fingerprint", "range_revision", "rebuild_rollup", "rollup_totals", "reference_column", "reference_names", "segment_sets",
    "set_reference", "sync_partials", "table_counts", "upsert_model", "write_feedback",
    "write_predictions", "RawRowsDropped", "apply_retention", "partitions", "raw_horizon",
    "retention_status",
]
