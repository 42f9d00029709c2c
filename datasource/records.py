"""Validation of ingest records: turns client JSON into clean rows or precise errors.

Both write paths (HTTP and the bulk client) go through here, so a record that
one path accepts the other accepts too, and every rejection names the record
index, the field and the reason. A batch with any error writes nothing.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import cached_property

import msgspec
import numpy as np
import pandas as pd

from datasource.errors import ClientError

MAX_ID_LENGTH = 256
MAX_SEGMENTS = 16
MAX_SEGMENT_KEY_LENGTH = 64
MAX_SEGMENT_VALUE_LENGTH = 128
MAX_FEATURES = 256
MAX_FEATURE_NAME_LENGTH = 128

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MIN_TS = datetime(1900, 1, 1, tzinfo=UTC)
_MAX_TS = datetime(2200, 1, 1, tzinfo=UTC)
_MIN_MS = (_MIN_TS - _EPOCH).total_seconds() * 1000.0
_MAX_MS = (_MAX_TS - _EPOCH).total_seconds() * 1000.0

TASKS = ("binary_classification", "regression")
_FEATURES_JSON = msgspec.json.Encoder().encode


def features_text(features: dict) -> str:
    """A record's clean features (finite floats or None) as the JSON text stored (jsonb: the
    spelling of a number does not matter). msgspec: 0.1 µs a record; json's encoder took 1.5,
    75 ms of a 50,000-prediction batch."""
    return _FEATURES_JSON(features).decode()


BatchError = ClientError  # the name ingest code and the client have always used


@dataclass(frozen=True)
class ModelSpec:
    name: str
    task: str
    threshold: float | None
    description: str = ""


def parse_model(body: object) -> ModelSpec:
    """Validate a model registration: name, task and (for classifiers) a threshold in [0, 1]."""
    if not isinstance(body, dict):
        raise BatchError("body must be a JSON object with 'name' and 'task'")
    errors = []
    name = body.get("name")
    if not isinstance(name, str) or not name.strip() or len(name) > 128:
        errors.append(_err(None, "name", "must be a non-empty string of at most 128 characters"))
    elif _nul(name):
        errors.append(_err(None, "name", "must not contain NUL"))
    task = body.get("task", "binary_classification")
    if task not in TASKS:
        errors.append(_err(None, "task", f"must be one of {', '.join(TASKS)}"))
    threshold = body.get("threshold")
    if task == "binary_classification":
        if threshold is None:
            threshold = 0.5
        if not _is_number(threshold) or not _finite(threshold) or not 0.0 <= float(threshold) <= 1.0:
            errors.append(_err(None, "threshold", "must be a number in [0, 1]"))
    elif threshold is not None:
        errors.append(_err(None, "threshold", "only binary classifiers have a threshold"))
    description = body.get("description", "")
    if not isinstance(description, str) or len(description) > 4000:
        errors.append(_err(None, "description", "must be a string of at most 4000 characters"))
    elif _nul(description):
        errors.append(_err(None, "description", "must not contain NUL"))
    if errors:
        raise BatchError("invalid model", errors)
    return ModelSpec(
        name=name.strip(),
        task=task,
        threshold=None if threshold is None else float(threshold),
        description=description,
    )


def epoch_us(times: Iterable[datetime]) -> np.ndarray:
    """Aware datetimes (as ``parse_ts`` returns them) as int64 microseconds since the epoch,
    exactly, in one vectorized pass (one by one they cost seconds per 100K-row batch)."""
    return pd.to_datetime(list(times), utc=True).as_unit("us").asi8


def parse_ts(value: object) -> datetime:
    """An event time: ISO-8601 (naive means UTC) or epoch milliseconds, as aware UTC.

    Raises ValueError with a reason.
    """
    if isinstance(value, datetime):
        ts = value if value.tzinfo else value.replace(tzinfo=UTC)
    elif isinstance(value, (bool, np.bool_)) or value is None:
        raise ValueError("must be an ISO-8601 string or epoch milliseconds")
    elif _is_number(value):
        return ms_ts(value)
    elif isinstance(value, str):
        return iso_ts(value)
    elif isinstance(value, np.datetime64) and not np.isnat(value):
        return parse_ts(value.astype("datetime64[us]").item())
    else:
        raise ValueError("must be an ISO-8601 string or epoch milliseconds")
    return _utc(ts)


def ms_ts(value: float | int) -> datetime:
    """``parse_ts`` of a real number (epoch milliseconds; not a bool)."""
    if not _finite(value):
        raise ValueError("must be finite")
    if not _MIN_MS <= value < _MAX_MS:
        raise ValueError("must be between 1900 and 2200")
    return _utc(_EPOCH + timedelta(milliseconds=float(value)))


def iso_ts(value: str) -> datetime:
    """``parse_ts`` of a string (ISO-8601, naive meaning UTC)."""
    if _nul(value):
        raise ValueError("must not contain NUL")
    try:
        ts = datetime.fromisoformat(value.strip())
    except ValueError:
        raise ValueError(f"cannot parse {value[:40]!r} as ISO-8601") from None
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=UTC)
    return _utc(ts)


def iso_ts_many(values: list[str]) -> list[datetime]:
    """``iso_ts`` of each string, in one pass (the ingest fast path); ValueError if one is bad,
    without saying which (``iso_ts`` on each does)."""
    if any("\x00" in v for v in values):
        raise ValueError("must not contain NUL")
    fromiso = datetime.fromisoformat
    out = [fromiso(v.strip()) for v in values]
    try:
        out = [ts.astimezone(UTC) if ts.tzinfo is not None else ts.replace(tzinfo=UTC)
               for ts in out]
    except OverflowError:
        raise ValueError("must be between 1900 and 2200") from None
    if out and not (_MIN_TS <= min(out) and max(out) < _MAX_TS):
        raise ValueError("must be between 1900 and 2200")
    return out


def utc_times(values: list[datetime]) -> list[datetime]:
    """``parse_ts`` of datetimes that are all in UTC already: themselves, when they are all
    between 1900 and 2200 (ValueError if one is not)."""
    if not (_MIN_TS <= min(values) and max(values) < _MAX_TS):
        raise ValueError("must be between 1900 and 2200")
    return values


def _utc(ts: datetime) -> datetime:
    """An aware time as UTC, between 1900 and 2200 (year 1 at +01:00 has no UTC: out of range)."""
    try:
        ts = ts.astimezone(UTC)
    except OverflowError:
        raise ValueError("must be between 1900 and 2200") from None
    if not _MIN_TS <= ts < _MAX_TS:
        raise ValueError("must be between 1900 and 2200")
    return ts


def _finite(v) -> bool:
    """Whether a number is finite and fits a double (a 400-digit int does not: OverflowError)."""
    try:
        return math.isfinite(v)
    except OverflowError:
        return False


def _nul(text: str) -> bool:
    """PostgreSQL text cannot hold NUL; psycopg2 raises on it, so it is a client error here."""
    return "\x00" in text


def _is_number(v: object) -> bool:
    """A real number, numpy scalars included, but not a bool."""
    t = type(v)
    if t is float or t is int:  # the common case, without the slow ABC check
        return True
    return isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_))


def _err(index: int | None, field: str, message: str) -> dict:
    return {"index": index, "field": field, "message": message}


def _check_id(rec: dict, i: int, errors: list) -> str | None:
    oid = rec.get("id")
    if isinstance(oid, int) and not isinstance(oid, bool):
        oid = str(oid)
    if not isinstance(oid, str):
        errors.append(_err(i, "id", "is missing" if oid is None else "must be a string"))
        return None
    if not oid:
        errors.append(_err(i, "id", "must not be empty"))
        return None
    if len(oid) > MAX_ID_LENGTH:
        errors.append(_err(i, "id", f"is longer than {MAX_ID_LENGTH} characters"))
        return None
    if _nul(oid):
        errors.append(_err(i, "id", "must not contain NUL"))
        return None
    return oid


def _check_ts(rec: dict, i: int, errors: list) -> datetime | None:
    if "ts" not in rec or rec["ts"] is None:
        errors.append(_err(i, "ts", "is missing"))
        return None
    try:
        return parse_ts(rec["ts"])
    except ValueError as e:
        errors.append(_err(i, "ts", str(e)))
        return None


def _check_segments(rec: dict, i: int, errors: list) -> dict | None:
    seg = rec.get("segments") or {}
    if not isinstance(seg, dict):
        errors.append(_err(i, "segments", "must be an object of string values"))
        return None
    if len(seg) > MAX_SEGMENTS:
        errors.append(_err(i, "segments", f"has more than {MAX_SEGMENTS} keys"))
        return None
    for k, v in seg.items():
        if not k or len(k) > MAX_SEGMENT_KEY_LENGTH:
            errors.append(_err(i, "segments", f"key {k[:70]!r} must have 1 to {MAX_SEGMENT_KEY_LENGTH} characters"))
            return None
        if _nul(k):
            errors.append(_err(i, "segments", f"key {k[:70]!r} must not contain NUL"))
            return None
        if not isinstance(v, str):
            errors.append(_err(i, f"segments.{k}", "must be a string"))
            return None
        if len(v) > MAX_SEGMENT_VALUE_LENGTH:
            errors.append(_err(i, f"segments.{k}", f"is longer than {MAX_SEGMENT_VALUE_LENGTH} characters"))
            return None
        if _nul(v):
            errors.append(_err(i, f"segments.{k}", "must not contain NUL"))
            return None
    return seg


def _check_features(rec: dict, i: int, errors: list) -> dict | None:
    feats = rec.get("features") or {}
    if not isinstance(feats, dict):
        errors.append(_err(i, "features", "must be an object of numbers"))
        return None
    if len(feats) > MAX_FEATURES:
        errors.append(_err(i, "features", f"has more than {MAX_FEATURES} keys"))
        return None
    clean = {}
    for k, v in feats.items():
        if not k or len(k) > MAX_FEATURE_NAME_LENGTH:
            errors.append(_err(i, "features", f"name {k[:70]!r} must have 1 to {MAX_FEATURE_NAME_LENGTH} characters"))
            return None
        if _nul(k):
            errors.append(_err(i, "features", f"name {k[:70]!r} must not contain NUL"))
            return None
        if v is None:
            clean[k] = None
        elif _is_number(v):
            if not _finite(v) and v == v:
                errors.append(_err(i, f"features.{k}", "must be finite"))
                return None
            v = float(v)
            if v != v:
                clean[k] = None  # NaN is how pandas spells "missing"
            elif v in (math.inf, -math.inf):
                errors.append(_err(i, f"features.{k}", "must be finite"))
                return None
            else:
                clean[k] = v
        else:
            errors.append(_err(i, f"features.{k}", "must be a number or null"))
            return None
    return clean


class _Times:
    ts: list[datetime]

    @cached_property
    def ts_us(self) -> np.ndarray:
        """``epoch_us(self.ts)``, once: the bulk client's ``make_weeks`` and the write both
        need it (16 ms a 50,000-row batch)."""
        return epoch_us(self.ts)


@dataclass
class PredictionRows(_Times):
    ids: list[str]
    ts: list[datetime]
    scores: list[float]
    segments: list[dict]
    features_json: list[str]
    feature_names: set[str] = field(default_factory=set)


@dataclass
class FeedbackRows(_Times):
    ids: list[str]
    ts: list[datetime]
    labels: list[float]


def _check_batch(records: object, max_records: int) -> list:
    if not isinstance(records, list):
        raise BatchError("'records' must be a list of objects")
    if len(records) > max_records:
        raise BatchError(
            f"too many records: {len(records)} > {max_records} per request", status=413
        )
    return records


def parse_predictions(records: object, task: str, max_records: int) -> PredictionRows:
    """Validate prediction records for a model of ``task``; raise BatchError listing all problems."""
    records = _check_batch(records, max_records)
    errors: list[dict] = []
    out = PredictionRows([], [], [], [], [])
    is_clf = task == "binary_classification"
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            errors.append(_err(i, "", "must be an object"))
            continue
        n_err = len(errors)
        oid = _check_id(rec, i, errors)
        ts = _check_ts(rec, i, errors)
        score = rec.get("score")
        if not _is_number(score):
            errors.append(_err(i, "score", "is missing" if score is None else "must be a number"))
        elif not _finite(score):
            errors.append(_err(i, "score", "must be finite"))
        elif is_clf and not 0.0 <= score <= 1.0:
            errors.append(_err(i, "score", "must be a probability in [0, 1] for a classifier"))
        seg = _check_segments(rec, i, errors)
        feats = _check_features(rec, i, errors)
        if len(errors) == n_err:
            out.ids.append(oid)
            out.ts.append(ts)
            out.scores.append(float(score))
            out.segments.append(seg)
            out.features_json.append(features_text(feats))
            out.feature_names.update(feats)
    if errors:
        raise BatchError(f"{len(errors)} invalid field(s); nothing was written", errors)
    return out


def parse_feedback(records: object, task: str, max_records: int) -> FeedbackRows:
    """Validate feedback records; classifier labels must be 0 or 1."""
    records = _check_batch(records, max_records)
    errors: list[dict] = []
    out = FeedbackRows([], [], [])
    is_clf = task == "binary_classification"
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            errors.append(_err(i, "", "must be an object"))
            continue
        n_err = len(errors)
        oid = _check_id(rec, i, errors)
        ts = _check_ts(rec, i, errors)
        label = rec.get("label")
        if not _is_number(label):
            if isinstance(label, bool) and is_clf:
                label = int(label)
            else:
                errors.append(_err(i, "label", "is missing" if label is None else "must be a number"))
        if _is_number(label):
            if not _finite(label):
                errors.append(_err(i, "label", "must be finite"))
            elif is_clf and label not in (0, 1):
                errors.append(_err(i, "label", "must be 0 or 1 for a classifier"))
        if len(errors) == n_err:
            out.ids.append(oid)
            out.ts.append(ts)
            out.labels.append(float(label))
    if errors:
        raise BatchError(f"{len(errors)} invalid field(s); nothing was written", errors)
    return out


MAX_REFERENCE_VALUES = 200_000


def parse_reference(body: object) -> tuple[str, dict[str, list]]:
    """A reference distribution: ``{"name": "training", "columns": {col: [numbers or strings]}}``.

    Numeric columns (numbers, null for missing) become floats; categorical
    columns are strings. A column may not mix the two.
    """
    if not isinstance(body, dict):
        raise BatchError("body must be a JSON object with 'name' and 'columns'")
    name = body.get("name", "training")
    errors = []
    if not isinstance(name, str) or not name or len(name) > 64 or _nul(name):
        errors.append(_err(None, "name", "must be 1 to 64 characters, without NUL"))
    columns = body.get("columns")
    if not isinstance(columns, dict) or not columns:
        errors.append(_err(None, "columns", "must be an object of column name -> list of values"))
        raise BatchError("invalid reference", errors)
    clean: dict[str, list] = {}
    for col, values in columns.items():
        field_name = f"columns.{col}"
        if not col or len(col) > MAX_FEATURE_NAME_LENGTH or _nul(col):
            errors.append(_err(None, "columns", f"name {col[:70]!r} is empty, too long or has NUL"))
            continue
        if not isinstance(values, list) or not values:
            errors.append(_err(None, field_name, "must be a non-empty list"))
            continue
        if len(values) > MAX_REFERENCE_VALUES:
            errors.append(_err(None, field_name, f"has more than {MAX_REFERENCE_VALUES} values"))
            continue
        if all(isinstance(v, str) for v in values):
            if any(_nul(v) for v in values):
                errors.append(_err(None, field_name, "values must not contain NUL"))
                continue
            clean[col] = values
        elif all(v is None or _is_number(v) for v in values):
            if any(v is not None and v == v and not _finite(v) for v in values):
                errors.append(_err(None, field_name, "values must be finite"))
                continue
            clean[col] = [float("nan") if v is None else float(v) for v in values]
        else:
            errors.append(_err(None, field_name, "must be all numbers (or null) or all strings"))
    if errors:
        raise BatchError("invalid reference", errors)
    return name, clean
