"""Replay: record building (pure), idempotence and live resume.

Two kinds of tests live here:

* the pure ones, and an in-memory ``FakeClient`` standing in for the store (run everywhere);
* STORE TESTS (``test_store_*``): the same checks through the real ``datasource.client``.  They use
  the ``client`` and ``database_url`` fixtures of ``tests/conftest.py`` (a ``Client.local(...)``
  on a fresh database) and count rows with ``datasource.store.table_counts``.
"""

from datetime import UTC, datetime
from functools import partial

import numpy as np
import pandas as pd
import pytest

from loader import generator, pipeline, replay, sources, tlc

SCALE, SEED = 0.002, 3
MODEL = "taxi-high-tip-test"


def _month(m: int) -> pd.DataFrame:
    return sources.normalize(generator.generate_month(m, scale=SCALE, seed=SEED))


def month_inputs(months=(1, 2, 3)):
    return [replay.MonthInput(2020, m, partial(_month, m)) for m in months]


@pytest.fixture(scope="module")
def trained():
    return pipeline.train(_month(1), "2020-01-01", "2020-02-01")


@pytest.fixture(scope="module")
def preds(trained):
    scored = pipeline.score_trips(trained, _month(2), "2020-02-01", "2020-03-01")
    return replay.prediction_frame(scored)


class FakeClient:
    """The store client's write API over dicts keyed by id (upsert semantics)."""

    def __init__(self):
        self.models, self.events = {}, []
        self.predictions, self.feedback = {}, {}

    def register_model(self, name, **kw):
        self.models[name] = kw

    def add_event(self, name, ts, **kw):
        self.events.append((name, ts, kw))

    def set_reference(self, model, columns, name="training"):
        self.references = {"model": model, "columns": columns, "name": name}

    def write_predictions(self, name, records):
        for r in records:
            assert r["ts"].tzinfo is not None and r["ts"].utcoffset().total_seconds() == 0
            self.predictions[(name, r["id"])] = r
        return len(records)

    def write_feedback(self, name, records):
        for r in records:
            assert r["label"] in (0, 1)
            self.feedback[(name, r["id"])] = r
        return len(records)

    def latest_prediction_ts(self, name):
        ts = [r["ts"] for (n, _), r in self.predictions.items() if n == name]
        return max(ts) if ts else None

    def counts(self):
        return len(self.predictions), len(self.feedback)

    def close(self):
        pass


# --------------------------------------------------------------------------------------------
# pure record building


def test_ids_are_stable_unique_and_content_based(preds):
    again = replay.trip_ids(_month(2))
    first = replay.trip_ids(_month(2))
    assert (again == first).all()
    assert preds["id"].is_unique
    assert preds["id"].str.fullmatch(r"[0-9a-f]{32}").all()
    one = sources.normalize(pd.DataFrame([_month(2).iloc[10]]))
    changed = one.copy()
    changed["tip_amount"] += 1
    assert replay.trip_ids(one)[0] != replay.trip_ids(changed)[0]


def test_timestamps_are_new_york_local_converted_to_utc():
    local = pd.Series(pd.to_datetime(["2020-01-15 12:00:00", "2020-04-15 12:00:00",
                                      "2020-03-08 02:30:00"]))
    utc = replay.to_utc(local)
    assert str(utc.dt.tz) == "UTC"
    assert utc.tolist() == [pd.Timestamp("2020-01-15 17:00", tz="UTC"),   # EST, UTC-5
                            pd.Timestamp("2020-04-15 16:00", tz="UTC"),   # EDT, UTC-4
                            pd.Timestamp("2020-03-08 07:00", tz="UTC")]   # nonexistent -> 03:00
    assert replay.parse_time("2020-06-01") == pd.Timestamp("2020-06-01 04:00", tz="UTC")


def test_prediction_records(preds):
    rec = next(replay.prediction_records(preds.head(1)))
    assert set(rec) == {"id", "ts", "score", "segments", "features"}
    assert isinstance(rec["ts"], datetime) and rec["ts"].tzinfo is not None
    assert rec["ts"].astimezone(UTC) == rec["ts"]
    assert 0 <= rec["score"] <= 1
    assert set(rec["segments"]) == set(replay.SEGMENTS)
    assert set(rec["features"]) == set(pipeline.FEATURES) | {"fare_amount", "trip_minutes"}
    assert all(isinstance(v, float) for v in rec["features"].values())
    # a prediction sits at the pickup
    row = preds.iloc[0]
    assert rec["ts"] == row["ts"].to_pydatetime()


def test_segments_are_low_cardinality_and_leak_free(preds):
    assert "payment_type" not in replay.SEGMENTS
    assert set(preds["pickup_borough"]) <= {"Manhattan", "Queens", "Brooklyn", "Bronx",
                                            "Staten Island", "EWR", "Unknown"}
    assert set(preds["vendor"]) <= {"CMT", "VeriFone", "unknown"}
    assert set(preds["time_of_day"]) == {"night", "morning_rush", "midday", "evening_rush",
                                         "evening"}
    assert set(preds["rate_code"]) <= set(tlc.RATE_CODES.values()) | {"unknown"}
    assert preds[replay.SEGMENTS].drop_duplicates().shape[0] < 300


def test_segments_by_hand():
    df = sources.normalize(pd.DataFrame([
        dict(VendorID=1, tpep_pickup_datetime="2020-01-15 05:59:00",
             tpep_dropoff_datetime="2020-01-15 06:10:00", passenger_count=1, trip_distance=1,
             RatecodeID=2, PULocationID=132, DOLocationID=161, payment_type=1, fare_amount=52,
             tip_amount=10, congestion_surcharge=2.5),
        dict(VendorID=None, tpep_pickup_datetime="2020-01-15 16:00:00",
             tpep_dropoff_datetime="2020-01-15 16:10:00", passenger_count=None, trip_distance=1,
             RatecodeID=None, PULocationID=264, DOLocationID=161, payment_type=None,
             fare_amount=8, tip_amount=0, congestion_surcharge=0),
    ]))
    seg = replay.segments(df)
    assert seg.iloc[0].tolist() == ["Queens", "CMT", "night", "jfk"]
    assert seg.iloc[1].tolist() == ["Unknown", "unknown", "evening_rush", "unknown"]


def test_feedback_timing_and_missing_share(preds):
    policy = replay.FeedbackPolicy(missing=0.03, seed=0)
    fb = replay.feedback_frame(preds, policy)
    assert 1 - len(fb) / len(preds) == pytest.approx(0.03, abs=0.01)
    joined = fb.merge(preds[["id", "ts", "dropoff_ts", "label"]], on="id",
                      suffixes=("", "_pred"))
    assert (joined["ts"] >= joined["dropoff_ts"]).all() and (joined["ts"] > joined["ts_pred"]).all()
    delay_min = (joined["ts"] - joined["dropoff_ts"]).dt.total_seconds() / 60
    assert delay_min.median() == pytest.approx(30, rel=0.15)  # lognormal, median 30 min
    assert (joined["label"] == joined["label_pred"]).all()
    # the same policy gives the same feedback; another seed other draws
    pd.testing.assert_frame_equal(fb, replay.feedback_frame(preds, policy))
    other = replay.feedback_frame(preds, replay.FeedbackPolicy(seed=1))
    assert not fb["ts"].reset_index(drop=True).equals(other["ts"].reset_index(drop=True))


@pytest.mark.parametrize("dist,check", [
    ("fixed", lambda d: np.allclose(d, 45)),
    ("none", lambda d: np.allclose(d, 0)),
    ("exponential", lambda d: abs(np.median(d) - 45) < 6),
])
def test_delay_distributions(preds, dist, check):
    policy = replay.FeedbackPolicy(missing=0, delay=replay.Delay(dist, 45))
    fb = replay.feedback_frame(preds, policy).merge(preds[["id", "dropoff_ts", "ts"]], on="id",
                                                    suffixes=("", "_pred"))
    known = np.maximum(fb["dropoff_ts"], fb["ts_pred"])
    assert check(((fb["ts"] - known).dt.total_seconds() / 60).to_numpy())


def test_cash_feedback_none_drops_cash_trips(preds):
    cash = preds["payment_type"] == tlc.CASH
    assert cash.sum() > 100
    default = replay.feedback_frame(preds, replay.FeedbackPolicy(missing=0))
    assert len(default) == len(preds)  # every label arrives, cash ones as label 0
    assert (preds.loc[cash, "label"] == 0).all()
    none = replay.feedback_frame(preds, replay.FeedbackPolicy(cash="none", missing=0))
    assert len(none) == len(preds) - cash.sum()
    assert not set(none["id"]) & set(preds.loc[cash, "id"])


# --------------------------------------------------------------------------------------------
# writing through a client (in memory)


def _backfill(client, trained, until="2020-03-01", **kw):
    return replay.backfill(client, trained, month_inputs(), start=replay.parse_time("2020-01-01"),
                           until=replay.parse_time(until), model_name=MODEL, progress=False,
                           policy=kw.pop("policy", replay.FeedbackPolicy()), **kw)


def test_replay_twice_writes_nothing_new(trained):
    client = FakeClient()
    first = _backfill(client, trained)
    counts = client.counts()
    snapshot = dict(client.feedback)
    second = _backfill(client, trained, batch_size=777)
    assert client.counts() == counts
    assert client.feedback == snapshot
    assert first.predictions_written == second.predictions_written == counts[0]
    assert counts[1] < counts[0]  # missing feedback and the ones due after --until


def test_until_bounds_predictions_and_feedback(trained):
    client = FakeClient()
    until = replay.parse_time("2020-02-10")
    _backfill(client, trained, until="2020-02-10")
    assert max(r["ts"] for r in client.predictions.values()) < until
    assert max(r["ts"] for r in client.feedback.values()) < until


def test_cash_feedback_none_through_backfill(trained):
    client = FakeClient()
    _backfill(client, trained, policy=replay.FeedbackPolicy(cash="none"))
    scored = pipeline.score_trips(trained, _month(2), "2020-02-01", "2020-03-01")
    frame = replay.prediction_frame(scored)
    cash_ids = set(frame.loc[frame["payment_type"] == tlc.CASH, "id"])
    assert cash_ids and not cash_ids & {i for _, i in client.feedback}


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t

    def sleep(self, seconds):
        self.t += seconds


def _live(client, trained, until, speed=5e5):
    clock = FakeClock()
    return replay.live(client, trained, month_inputs(), start=replay.parse_time("2020-01-01"),
                       until=replay.parse_time(until), policy=replay.FeedbackPolicy(),
                       model_name=MODEL, speed=speed, tick=1.0, clock=clock, sleep=clock.sleep,
                       log=lambda _: None)


def test_live_resumes_and_matches_backfill(trained):
    pieces = FakeClient()
    _live(pieces, trained, "2020-01-20")
    resumed_at = pieces.latest_prediction_ts(MODEL)
    assert resumed_at < replay.parse_time("2020-01-20")
    _live(pieces, trained, "2020-02-15")  # restarts from the store's latest prediction
    once = FakeClient()
    _backfill(once, trained, until="2020-02-15")
    assert pieces.counts() == once.counts()
    assert pieces.feedback == once.feedback
    _live(pieces, trained, "2020-02-15")  # a third run only re-sends the overlap
    assert pieces.counts() == once.counts()


def test_live_paces_by_the_data_clock(trained):
    client, clock, seen = FakeClient(), FakeClock(), []
    original = client.write_predictions

    def spy(name, records):
        seen.append((clock.t, max(r["ts"] for r in records)))
        return original(name, records)

    client.write_predictions = spy
    start = replay.parse_time("2020-01-01")
    replay.live(client, trained, month_inputs((1,)), start=start,
                until=replay.parse_time("2020-01-02"), policy=replay.FeedbackPolicy(),
                model_name=MODEL, speed=3600, tick=1.0, clock=clock, sleep=clock.sleep,
                log=lambda _: None)
    assert len(seen) > 20  # one write per data hour or so, not one bulk write
    for wall, latest in seen:  # never ahead of the data clock
        assert latest <= start + pd.Timedelta(seconds=wall * 3600)


def test_reference_is_the_training_split(trained):
    ref = replay.reference_columns(_month(1), trained, max_rows=5_000)
    assert set(ref) == {"score", "label", *replay.FEATURE_NAMES, *replay.SEGMENTS}
    assert len({len(v) for v in ref.values()}) == 1 and len(ref["score"]) == 5_000
    assert all(isinstance(v, str) for v in ref["vendor"])
    assert all(0 <= v <= 1 for v in ref["score"]) and set(ref["label"]) <= {0.0, 1.0}
    assert not any(v != v for v in ref["congestion_surcharge"])  # fillna(-1): no NaN
    full = replay.reference_columns(_month(1), trained, max_rows=10**9)
    n_clean = len(pipeline.clean(_month(1), "2020-01-01", "2020-02-01"))
    assert len(full["score"]) == int(n_clean * pipeline.TRAIN_FRACTION)


def test_training_event_and_registration(trained):
    client = FakeClient()
    replay.ensure_registered(client, trained, MODEL)
    replay.record_training(client, trained, MODEL, replay.reference_columns(_month(1), trained))
    assert client.references["name"] == "training"
    assert client.models[MODEL]["threshold"] == .5
    (name, ts, kw), = client.events
    assert kw["title"] == "Trained on 2020-01" and kw["tags"] == ["training"]
    assert ts == datetime(2020, 1, 1, 5, tzinfo=UTC)
    assert kw["time_end"] == datetime(2020, 2, 1, 5, tzinfo=UTC)
    assert "acc=" in kw["text"] and "congestion_surcharge" in kw["text"]


# --------------------------------------------------------------------------------------------
# STORE TESTS: through datasource.client (fixtures from tests/conftest.py)


@pytest.fixture
def store(request):
    """(client, row_counts) on a fresh database, or skip when the store cannot be set up."""
    try:
        client = request.getfixturevalue("client")
        database_url = request.getfixturevalue("database_url")
        from datasource import db
        from datasource import store as ds_store
    except (pytest.FixtureLookupError, ImportError) as exc:
        pytest.skip(f"store not available: {exc}")

    def row_counts(model_name):
        conn = db.connect(database_url)
        try:
            return ds_store.table_counts(conn, ds_store.get_model(conn, model_name))
        finally:
            conn.close()

    return client, row_counts


def test_store_replay_twice_leaves_identical_row_counts(store, trained):
    client, row_counts = store
    replay.ensure_registered(client, trained, MODEL)
    replay.record_training(client, trained, MODEL, replay.reference_columns(_month(1), trained))
    _backfill(client, trained, until="2020-01-20")
    first = row_counts(MODEL)
    assert first["predictions"] > 3000 and 0 < first["feedback"] < first["predictions"]
    _backfill(client, trained, until="2020-01-20")
    assert row_counts(MODEL) == first


def test_store_live_resume_matches_backfill(store, trained):
    client, row_counts = store
    replay.ensure_registered(client, trained, MODEL)
    _live(client, trained, "2020-01-08")
    latest = client.latest_prediction_ts(MODEL)
    assert latest is not None and latest.tzinfo is not None
    _live(client, trained, "2020-01-16")
    after_live = row_counts(MODEL)
    _backfill(client, trained, until="2020-01-16")
    assert row_counts(MODEL) == after_live
