"""Each Variant A step against hand-computed rows (no database, no generated data)."""

import numpy as np
import pandas as pd
import pytest

from loader import pipeline, sources


def trip(**kw):
    """One trip in the official schema; defaults describe a plain Manhattan card trip."""
    row = dict(VendorID=2, tpep_pickup_datetime="2020-01-15 10:20:30",
               tpep_dropoff_datetime="2020-01-15 10:35:00", passenger_count=1, trip_distance=2.0,
               RatecodeID=1, store_and_fwd_flag="N", PULocationID=237, DOLocationID=161,
               payment_type=1, fare_amount=10.0, extra=0.0, mta_tax=0.5, tip_amount=2.0,
               tolls_amount=0.0, improvement_surcharge=0.3, total_amount=15.3,
               congestion_surcharge=2.5)
    row.update(kw)
    return row


def frame(*rows):
    return sources.normalize(pd.DataFrame(list(rows)))


# (row overrides, expected features) -- computed by hand from the essay's definitions
CASES = [
    # Wednesday 2020-01-15 08:00 is the first work-hours minute; |161 - 237| = 76
    (dict(tpep_pickup_datetime="2020-01-15 08:00:05", passenger_count=2, trip_distance=1.5),
     dict(pickup_weekday=2, pickup_hour=8, pickup_minute=0, work_hours=1, passenger_count=2,
          trip_distance=1.5, RatecodeID=1, congestion_surcharge=2.5, loc_code_diffs=76)),
    # Friday 18:59 is still work hours (hour <= 18) ...
    (dict(tpep_pickup_datetime="2020-01-17 18:59:59", tpep_dropoff_datetime="2020-01-17 19:10:00",
          PULocationID=132, DOLocationID=230, RatecodeID=2),
     dict(pickup_weekday=4, pickup_hour=18, pickup_minute=59, work_hours=1, passenger_count=1,
          trip_distance=2.0, RatecodeID=2, congestion_surcharge=2.5, loc_code_diffs=98)),
    # ... Friday 19:00 is not; 07:59 is not either
    (dict(tpep_pickup_datetime="2020-01-17 19:00:00", tpep_dropoff_datetime="2020-01-17 19:20:00"),
     dict(pickup_weekday=4, pickup_hour=19, pickup_minute=0, work_hours=0)),
    (dict(tpep_pickup_datetime="2020-01-14 07:59:00", tpep_dropoff_datetime="2020-01-14 08:20:00"),
     dict(pickup_weekday=1, pickup_hour=7, pickup_minute=59, work_hours=0)),
    # Saturday noon and Sunday: weekday 5 and 6, never work hours; same zone -> diff 0
    (dict(tpep_pickup_datetime="2020-01-18 12:30:00", tpep_dropoff_datetime="2020-01-18 12:40:00",
          PULocationID=48, DOLocationID=48, congestion_surcharge=0.0),
     dict(pickup_weekday=5, pickup_hour=12, pickup_minute=30, work_hours=0, loc_code_diffs=0,
          congestion_surcharge=0.0)),
    (dict(tpep_pickup_datetime="2020-01-19 09:45:00", tpep_dropoff_datetime="2020-01-19 10:00:00"),
     dict(pickup_weekday=6, pickup_hour=9, pickup_minute=45, work_hours=0)),
    # a null-vendor row: the nulls become -1 (fillna(-1) before featurizing)
    (dict(VendorID=None, passenger_count=None, RatecodeID=None, store_and_fwd_flag=None,
          payment_type=None, PULocationID=7, DOLocationID=265, congestion_surcharge=None),
     dict(passenger_count=-1, RatecodeID=-1, congestion_surcharge=-1, loc_code_diffs=258)),
]


@pytest.mark.parametrize("overrides,expected", CASES)
def test_features_by_hand(overrides, expected):
    x = pipeline.featurize(frame(trip(**overrides)))
    assert list(x.columns) == pipeline.FEATURES
    for name, value in expected.items():
        assert x[name].iloc[0] == pytest.approx(value), name


def test_features_are_floats_in_model_order():
    x = pipeline.featurize(frame(trip(), trip(VendorID=None, passenger_count=None)))
    assert list(x.columns) == pipeline.FEATURES
    assert all(dtype == np.float64 for dtype in x.dtypes)
    assert not x.isna().any().any()


@pytest.mark.parametrize("tip,fare,payment,expected", [
    (2.5, 10.0, 1, 1),    # 25% > 10%
    (1.0, 10.0, 1, 0),    # exactly 10% is not above it
    (1.01, 10.0, 1, 1),
    (0.0, 10.0, 2, 0),    # cash: the recorded tip of 0 is the label (the essay's semantics)
    (0.0, 10.0, 1, 0),    # card, no tip
])
def test_label(tip, fare, payment, expected):
    y = pipeline.label(frame(trip(tip_amount=tip, fare_amount=fare, payment_type=payment)))
    assert y.iloc[0] == expected


def test_label_threshold_is_configurable():
    df = frame(trip(tip_amount=2.5, fare_amount=10.0))  # 25% of the fare
    assert pipeline.label(df, threshold=0.2).iloc[0] == 1
    assert pipeline.label(df, threshold=0.3).iloc[0] == 0


def test_clean_fare_and_date_bounds():
    df = frame(
        trip(fare_amount=5.0),                                        # not > 5
        trip(fare_amount=5.5),                                        # kept
        trip(fare_amount=-12.0),                                      # refund twin
        trip(tpep_pickup_datetime="2020-01-31 23:50:00",
             tpep_dropoff_datetime="2020-02-01 00:05:00"),           # drops off after the end
        trip(tpep_pickup_datetime="2019-12-31 23:55:00",
             tpep_dropoff_datetime="2020-01-01 00:10:00"),           # drops off inside: kept
        trip(tpep_pickup_datetime="2008-01-15 10:20:30",
             tpep_dropoff_datetime="2020-01-15 10:35:00"),           # broken clock
    )
    kept = pipeline.clean(df, "2020-01-01", "2020-02-01")
    assert kept.index.tolist() == [1, 4]


def test_score_trips_adds_score_label_and_features():
    rows = [trip(tip_amount=t, congestion_surcharge=cs, PULocationID=pu)
            for t, cs, pu in [(2.5, 2.5, 237), (0.0, 0.0, 74)] * 20]
    df = frame(*rows)
    trained = pipeline.train(df, "2020-01-01", "2020-02-01")
    scored = pipeline.score_trips(trained, df, "2020-01-01", "2020-02-01")
    assert {"score", "label", *pipeline.FEATURES} <= set(scored.columns)
    assert scored["score"].between(0, 1).all()
    assert scored["label"].tolist() == [1, 0] * 20
