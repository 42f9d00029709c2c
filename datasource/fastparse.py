"""The ingest fast path: a JSON batch body decoded by msgspec into typed records, checked in bulk.

``datasource.records`` stays the definition of a valid record and of every error message.
This module only recognises batches that ``records`` accepts and builds exactly the rows
``records`` builds from them (the same ids, aware-UTC timestamps, floats, segment dicts and
features JSON text). msgspec stops at the first problem and names it in its own words, so
whatever this module does not recognise, a bad record or an unusual but valid spelling
(``"segments": []``, a bool label for a regression model…), makes it answer ``None``: the
caller then runs the precise path on the same bytes (``http.loads`` then
``records.parse_*``), and the client gets today's 400 naming every bad record.

What msgspec checks while decoding (strict types: a bool is not a number, a float is not an
id): the shape, the types, and the limits on lengths and key counts. What is checked here
after: the timestamps (``records.iso_ts`` / ``records.ms_ts``), finite numbers, and the
task's ranges (a classifier's scores in [0, 1], labels 0 or 1), in bulk with numpy, so one
decoded batch serves either task (``FastBatch.rows_for``). Unknown fields are ignored, as
``records`` ignores them. The body limits of ``datasource.http`` (NUL, numbers that do not
fit a double, depth, UTF-8) are applied first: only ``http.plain`` bytes reach msgspec.

Use::

    fast = fastparse.decode("predictions", raw, max_records)   # None: take the precise path
    rows = fast.rows_for(model.task)                           # None: records.py decides
    recs = fast.records()                                      # its input, parsed by http.loads
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated

import msgspec
import numpy as np

from datasource import http, records
from datasource.records import FeedbackRows, PredictionRows

_Id = Annotated[str, msgspec.Meta(min_length=1, max_length=records.MAX_ID_LENGTH)]
_Segments = Annotated[
    dict[Annotated[str, msgspec.Meta(min_length=1, max_length=records.MAX_SEGMENT_KEY_LENGTH)],
         Annotated[str, msgspec.Meta(max_length=records.MAX_SEGMENT_VALUE_LENGTH)]],
    msgspec.Meta(max_length=records.MAX_SEGMENTS)]
_Features = Annotated[
    dict[Annotated[str, msgspec.Meta(min_length=1, max_length=records.MAX_FEATURE_NAME_LENGTH)],
         float | None],
    msgspec.Meta(max_length=records.MAX_FEATURES)]
_BOTH = frozenset(records.TASKS)
_CLASSIFIER = "binary_classification"
_REGRESSION = "regression"


class _Prediction(msgspec.Struct):
    id: _Id | int
    ts: str | int | float
    score: float
    segments: _Segments | None = None
    features: _Features | None = None


class _Feedback(msgspec.Struct):
    id: _Id | int
    ts: str | int | float
    label: float | bool


class _PredictionObject(msgspec.Struct):
    """A Python record (the bulk client's): ``ts`` of any kind ``records.parse_ts`` reads."""

    id: _Id | int
    ts: object
    score: float
    segments: _Segments | None = None
    features: _Features | None = None


class _FeedbackObject(msgspec.Struct):
    id: _Id | int
    ts: object
    label: float | bool


class _Predictions(msgspec.Struct):
    model: str
    records: list[_Prediction]


class _Feedbacks(msgspec.Struct):
    model: str
    records: list[_Feedback]


_DECODERS = {"predictions": msgspec.json.Decoder(_Predictions),
             "feedback": msgspec.json.Decoder(_Feedbacks)}


_JSON = msgspec.json.Encoder().encode
# Records converted per msgspec call: one call holds the GIL throughout (25 ms for 50,000
# records), and the bulk client's writer threads wait for it to return from each statement.
_CONVERT_CHUNK = 2_000
_OBJECTS = {"predictions": list[_PredictionObject], "feedback": list[_FeedbackObject]}


class _Unrecognised(Exception):
    """A record the fast path leaves to ``records`` (which may accept it or name its error)."""


@dataclass(frozen=True)
class FastBatch:
    """A decoded batch: its model name, its rows, and the tasks for which they are valid."""

    model: str
    rows: PredictionRows | FeedbackRows
    tasks: frozenset[str]
    raw: bytes

    def rows_for(self, task: str) -> PredictionRows | FeedbackRows | None:
        """The rows ``records`` builds for a model of ``task``; None when it must decide."""
        return self.rows if task in self.tasks else None

    def records(self) -> list:
        """The batch's records as the precise path reads them (the body is a valid object)."""
        return http.loads(self.raw)["records"]


def decode(kind: str, raw: bytes, max_records: int) -> FastBatch | None:
    """``raw``, a JSON ``{"model": NAME, "records": [...]}`` body of ``kind`` records, as a
    FastBatch; None for anything this path does not recognise as valid."""
    if not http.plain(raw):
        return None
    try:
        batch = _DECODERS[kind].decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
        return None
    if len(batch.records) > max_records:
        return None
    try:
        if kind == "predictions":
            rows, tasks = _predictions(batch.records)
        else:
            rows, tasks = _feedback(batch.records)
    except (_Unrecognised, ValueError, OverflowError):
        return None
    return FastBatch(batch.model, rows, tasks, raw) if tasks else None


def from_objects(kind: str, recs: object, max_records: int) -> FastBatch | None:
    """``recs``, a list of Python records (``Client.local``'s), as a FastBatch; None for
    anything this path does not recognise as valid (``records`` then decides, as for a body).

    msgspec.convert checks the records' shapes, types and limits as ``decode`` checks a
    body's (a numpy float is not a float to it: such a batch takes the precise path); what
    ``http.plain`` checks of a body is checked here (NUL in the texts), and the times are
    read by ``records.parse_ts`` whatever their kind (aware or naive datetimes, ISO text,
    epoch milliseconds). Measured on 50,000 of the benchmark's predictions: 81 and 121 ms
    through ``records.parse_predictions`` in two runs, 42 and 62 ms here."""
    if not isinstance(recs, list) or len(recs) > max_records:
        return None
    batch = []
    try:
        for lo in range(0, len(recs), _CONVERT_CHUNK):
            batch += msgspec.convert(recs[lo:lo + _CONVERT_CHUNK], _OBJECTS[kind])
    except (msgspec.ValidationError, RecursionError):
        return None
    try:
        if kind == "predictions":
            rows, tasks = _predictions(batch, objects=True)
        else:
            rows, tasks = _feedback(batch, objects=True)
    except (_Unrecognised, ValueError, OverflowError):
        return None
    return FastBatch("", rows, tasks, b"") if tasks else None


def _no_nul(texts) -> None:
    """A Python text may hold NUL, which PostgreSQL text cannot (a body's: ``http.plain``)."""
    if any("\x00" in t for t in texts):
        raise _Unrecognised


def _ids(values: list[str | int]) -> list[str]:
    if all(type(v) is str for v in values):
        return values
    ids = [v if type(v) is str else str(v) for v in values]  # records: an int id is its text
    if max(map(len, ids)) > records.MAX_ID_LENGTH:
        raise _Unrecognised
    return ids


def _timestamps(values: list) -> list:
    """As ``records.parse_ts`` on each; ValueError (-> the precise path) for a bad one."""
    if all(type(v) is str for v in values):
        return records.iso_ts_many(values)  # what clients send (Client.remote: isoformat())
    if values and all(type(v) is datetime and v.tzinfo is UTC for v in values):
        return records.utc_times(values)  # what Client.local is given most often
    return list(map(records.parse_ts, values))


def _finite(values: list[float]) -> np.ndarray:
    a = np.array(values, dtype=np.float64)
    if not np.isfinite(a).all():
        raise _Unrecognised
    return a


_EMPTY_FEATURES = records.features_text({})


def _predictions(recs: list[_Prediction] | list[_PredictionObject],
                 objects: bool = False) -> tuple[PredictionRows, frozenset[str]]:
    encode = records.features_text
    ids = _ids([r.id for r in recs])
    ts = _timestamps([r.ts for r in recs])
    scores = [r.score for r in recs]
    segments = [r.segments or {} for r in recs]
    if objects:
        _no_nul(ids)
        if any(b"\\u0000" in text for text in set(map(_JSON, segments))):  # NUL in a key or value
            raise _Unrecognised
    features_json = []
    names: set[str] = set()
    for r in recs:
        feats = r.features
        if feats:
            features_json.append(encode(feats))  # floats or None already, as records cleans them
            names.update(feats)
        else:
            features_json.append(_EMPTY_FEATURES)
    if names:
        _finite([v for r in recs if r.features for v in r.features.values() if v is not None])
        if objects:
            _no_nul(names)
    a = _finite(scores)
    unit = bool(((a >= 0.0) & (a <= 1.0)).all())
    rows = PredictionRows(ids, ts, scores, segments, features_json, names)
    return rows, _BOTH if unit else frozenset((_REGRESSION,))


def _feedback(recs: list[_Feedback] | list[_FeedbackObject],
              objects: bool = False) -> tuple[FeedbackRows, frozenset[str]]:
    ids = _ids([r.id for r in recs])
    if objects:
        _no_nul(ids)
    ts = _timestamps([r.ts for r in recs])
    raw_labels = [r.label for r in recs]
    has_bool = any(type(v) is bool for v in raw_labels)
    labels = [float(v) for v in raw_labels] if has_bool else raw_labels
    a = _finite(labels)
    binary = bool(((a == 0.0) | (a == 1.0)).all())
    tasks = set()
    if binary:
        tasks.add(_CLASSIFIER)  # records reads true/false as 1/0 for a classifier only
    if not has_bool:
        tasks.add(_REGRESSION)
    return FeedbackRows(ids, ts, labels), frozenset(tasks)
