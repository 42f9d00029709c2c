"""Ingest validation: the hand-written validator against msgspec, on 50,000-record batches.

The question of the architecture issue: would a well-kept library (msgspec, a C
extension) validate ingest batches at least as fast as ``datasource.records``,
with the same per-record index and field in its errors? Measured here, side by
side in one run, on the HTTP path's input (the JSON body as bytes) and the bulk
client's (Python dicts):

* ``records``: ``json.loads`` (HTTP only) then ``records.parse_predictions``;
* ``msgspec``: ``msgspec.json.decode`` (HTTP) or ``msgspec.convert`` (dicts) into a
  typed Struct with range constraints, then the checks msgspec cannot express
  (epoch-ms or ISO timestamps, the time bounds, segment and feature limits), which
  ``records`` then has to run anyway.

msgspec stops at the first error, so a batch with errors still needs the hand-written
pass to name every bad record: the server's fast path (``datasource.fastparse``, msgspec
pinned in requirements.txt) decodes with msgspec and falls back to ``records`` for a batch
it does not recognise as valid; ``benchmarks/ingest.py --compare-parse`` measures it over
HTTP. Run: ``python benchmarks/validation.py``.
"""

import json
import time
from datetime import UTC, datetime
from typing import Annotated

import common
import numpy as np

from datasource import records

N = 50_000
REPEATS = 7


def _records_json(n: int) -> tuple[list[dict], bytes]:
    d = common.synthesize(n, seed=5)
    recs = []
    for oid, ts, s, b, v in zip(d.ids.tolist(), d.ts_ms.tolist(), d.score.tolist(),
                                d.borough.tolist(), d.vendor.tolist(), strict=True):
        recs.append({"id": oid, "ts": datetime.fromtimestamp(ts / 1000, UTC).isoformat(),
                     "score": s, "segments": {"borough": common.BOROUGHS[b], "vendor": common.VENDORS[v]},
                     "features": {"trip_distance": s * 10, "fare_amount": s * 30}})
    return recs, json.dumps({"model": "m", "records": recs}).encode()


import msgspec  # noqa: E402


class Prediction(msgspec.Struct):
    id: Annotated[str, msgspec.Meta(min_length=1, max_length=records.MAX_ID_LENGTH)]
    ts: datetime
    score: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]
    segments: dict[str, str] = {}
    features: dict[str, float | None] = {}


class Batch(msgspec.Struct):
    model: str
    records: list[Prediction]


def _time(fn) -> list[float]:
    out = []
    for _ in range(REPEATS):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def main() -> None:
    recs, body = _records_json(N)

    def hand_http():
        batch = json.loads(body)
        records.parse_predictions(batch["records"], "binary_classification", N)

    def hand_dicts():
        records.parse_predictions(recs, "binary_classification", N)

    def lib_http():
        batch = msgspec.json.decode(body, type=Batch)
        _rest(batch.records)

    def lib_dicts():
        _rest(msgspec.convert(recs, list[Prediction]))

    def _rest(preds):
        """What msgspec's types cannot say: time bounds, segment/feature limits, NaN features."""
        lo, hi = datetime(1900, 1, 1, tzinfo=UTC), datetime(2200, 1, 1, tzinfo=UTC)
        for p in preds:
            if not lo <= p.ts < hi or len(p.segments) > records.MAX_SEGMENTS:
                raise ValueError(p.id)
            for k, v in p.features.items():
                if len(k) > records.MAX_FEATURE_NAME_LENGTH or (v is not None and v != v):
                    raise ValueError(p.id)

    results = {name: _time(fn) for name, fn in
               [("records, HTTP body", hand_http), ("msgspec, HTTP body", lib_http),
                ("records, client dicts", hand_dicts), ("msgspec, client dicts", lib_dicts)]}
    print(f"{N:,} prediction records per batch, {REPEATS} runs each, p50 / best\n")
    rows = []
    for name, ts in results.items():
        rows.append([name, common.fmt_ms(float(np.median(ts))), common.fmt_ms(min(ts)),
                     f"{N / float(np.median(ts)):,.0f}"])
    print(common.table(["validator", "p50", "best", "records/s (p50)"], rows))
    for path in ("HTTP body", "client dicts"):
        ratio = np.median(results[f"records, {path}"]) / np.median(results[f"msgspec, {path}"])
        print(f"{path}: msgspec is {ratio:.1f}x the speed of records (valid batches only)")


if __name__ == "__main__":
    main()
