"""Real-format files: a hand-written fixture in the official schema goes through the same path
as generated data; clear errors for missing columns and unreadable files."""

from functools import partial
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from loader import generator, pipeline, replay, sources, tlc

SAMPLES = Path(__file__).resolve().parents[2] / "shared" / "reference" / "tlc-yellow-2020-samples"

CSV_HEADER = ("VendorID,tpep_pickup_datetime,tpep_dropoff_datetime,passenger_count,trip_distance,"
              "RatecodeID,store_and_fwd_flag,PULocationID,DOLocationID,payment_type,fare_amount,"
              "extra,mta_tax,tip_amount,tolls_amount,improvement_surcharge,total_amount,"
              "congestion_surcharge")
# Invented trips in the 2020 CSV layout (legacy files have no airport_fee column).
CSV_ROWS = [
    # vendor 2, card, 20% tip on the total before the tip
    "2,2020-02-03 08:10:11,2020-02-03 08:24:40,1,1.90,1,N,161,237,1,10.5,0,0.5,2.86,0,0.3,16.66,2.5",
    # vendor 1 books the congestion surcharge inside extra (1.0 peak + 2.5)
    "1,2020-02-03 17:02:00,2020-02-03 17:20:05,0,2.40,1,N,230,142,1,12,3.5,0.5,3.26,0,0.3,19.56,2.5",
    # cash: the recorded tip is 0
    "2,2020-02-04 13:00:00,2020-02-04 13:11:30,2,1.10,1,N,236,263,2,8,0,0.5,0,0,0.3,11.3,2.5",
    # JFK flat fare with tolls
    "2,2020-02-05 16:30:00,2020-02-05 17:25:00,1,17.60,2,N,132,164,1,52,4.5,0.5,13.15,6.12,0.3,79.07,2.5",
    # outside the congestion zone, no surcharge
    "2,2020-02-06 09:00:00,2020-02-06 09:09:00,1,1.30,1,N,74,42,2,7,0,0.5,0,0,0.3,7.8,0",
    # store-and-forward, Newark
    "1,2020-02-07 06:00:00,2020-02-07 06:40:00,1,16.80,3,Y,162,1,1,70,0,0,15,12.5,0.3,97.8,0",
    # null-vendor row: codes empty
    ",2020-02-10 11:17:00,2020-02-10 11:49:00,,7.05,,,61,76,,27.5,2.75,0.5,0,0,0.3,31.05,0",
    # refund twin: every amount negated
    "2,2020-02-11 21:05:00,2020-02-11 21:15:00,1,1.20,1,N,48,50,4,-7,-0.5,-0.5,0,0,-0.3,-10.8,-2.5",
    # short fare, dropped by cleaning (fare <= 5)
    "2,2020-02-12 22:00:00,2020-02-12 22:03:00,1,0.40,1,N,237,237,1,4,0.5,0.5,1.0,0,0.3,8.8,2.5",
    # broken clock, dropped by the date bounds
    "2,2008-12-31 23:10:00,2008-12-31 23:20:00,1,1.00,1,N,79,4,1,7,0.5,0.5,1.5,0,0.3,12.3,2.5",
    # across the month end: outside February's drop-off window
    "2,2020-02-29 23:55:00,2020-03-01 00:15:00,1,3.00,1,N,100,79,1,14,0.5,0.5,3.0,0,0.3,20.8,2.5",
]


@pytest.fixture
def real_csv(tmp_path) -> Path:
    path = tmp_path / "yellow_tripdata_2020-02.csv"
    path.write_text("\n".join([CSV_HEADER, *CSV_ROWS]) + "\n")
    return path


@pytest.fixture(scope="module")
def trained():
    jan = sources.normalize(generator.generate_month(1, scale=0.002, seed=5))
    return pipeline.train(jan, "2020-01-01", "2020-02-01")


def test_real_format_csv_goes_through_the_generated_path(real_csv, trained, tmp_path):
    trips = sources.read_trips(real_csv)
    generated = generator.write_month(generator.generate_month(2, 0.002, seed=5),
                                      tmp_path / "gen" / "yellow_tripdata_2020-02.parquet")
    gen_trips = sources.read_trips(generated)
    assert list(trips.columns) == list(gen_trips.columns) == tlc.COLUMNS
    assert trips.dtypes.equals(gen_trips.dtypes)
    month = replay.MonthInput(2020, 2, partial(sources.read_trips, real_csv))
    prepared = replay.prepare_month(trained, month, replay.FeedbackPolicy(missing=0),
                                    replay.parse_time("2020-01-01"),
                                    replay.parse_time("2020-06-01"))
    # 11 rows: negated twin, short fare, 2008 clock and the month-crossing trip are cleaned out
    assert prepared.scored == 7
    preds = prepared.predictions
    assert preds["vendor"].tolist().count("unknown") == 1
    assert set(preds["rate_code"]) == {"standard", "jfk", "newark", "unknown"}
    assert preds["label"].tolist() == [1, 1, 0, 1, 0, 1, 0]  # in pickup order
    records = list(replay.prediction_records(preds))
    assert len(records) == 7 and all(0 <= r["score"] <= 1 for r in records)
    null_row = next(r for r in records if r["segments"]["vendor"] == "unknown")
    assert null_row["features"]["RatecodeID"] == -1 and null_row["features"]["passenger_count"] == -1
    assert len(replay.feedback_frame(preds, replay.FeedbackPolicy(missing=0, cash="none"))) == 5


def test_parquet_with_newer_spellings_and_codes(tmp_path):
    table = pa.table({
        "VendorID": pa.array([2, None, 1], pa.int32()),
        "tpep_pickup_datetime": pa.array(pd.to_datetime(["2020-02-03 08:10:11"] * 3),
                                         pa.timestamp("ns")),
        "tpep_dropoff_datetime": pa.array(pd.to_datetime(["2020-02-03 08:24:40"] * 3),
                                          pa.timestamp("ns")),
        "passenger_count": [1.0, None, 2.0],
        "trip_distance": [1.9, 3.0, 2.0],
        "RatecodeID": [1.0, None, 99.0],
        "store_and_fwd_flag": ["N", None, "N"],
        "PULocationID": [161, 264, 230],
        "DOLocationID": [237, 265, 142],
        "payment_type": pa.array([1, 0, 0], pa.int64()),  # 0: null-vendor rows / flex fare
        "fare_amount": [10.5, 20.0, 12.0],
        "extra": [0.0, 0.0, 3.5],
        "mta_tax": [0.5, 0.5, 0.5],
        "tip_amount": [2.86, 0.0, 3.0],
        "tolls_amount": [0.0, 0.0, 0.0],
        "improvement_surcharge": [0.3, 0.3, 0.3],
        "total_amount": [16.66, 20.8, 19.3],
        "congestion_surcharge": [2.5, None, 2.5],
        "Airport_fee": pa.nulls(3),  # casing of newer files, null-typed
    })
    path = tmp_path / "yellow_tripdata_2020-02.parquet"
    pq.write_table(table, path)
    trips = sources.read_trips(path)
    assert list(trips.columns) == tlc.COLUMNS
    assert trips["airport_fee"].isna().all()
    assert trips["payment_type"].tolist() == [1.0, 0.0, 0.0]
    assert trips["VendorID"].isna().tolist() == [False, True, False]
    preds = replay.segments(trips)
    assert preds["rate_code"].tolist() == ["standard", "unknown", "unknown"]
    assert preds["pickup_borough"].tolist() == ["Manhattan", "Unknown", "Manhattan"]


def test_aliases_from_other_pipelines():
    df = pd.DataFrame({
        "vendorid": [1], "tpep_pickup_datetime": ["2020-01-05 10:00:00"],
        "tpep_dropoff_datetime": ["2020-01-05 10:10:00"], "passenger_count": [1],
        "trip_distance": [1.0], "ratecodeid": [1], "pulocationid": [48], "dolocationid": [50],
        "payment_type": [1], "fare_amount": [7.0], "tip_amount": [2.0],
        "congestion_surcharge": [2.5],
    })
    out = sources.normalize(df)
    assert out.loc[0, "RatecodeID"] == 1 and out.loc[0, "PULocationID"] == 48
    ge = df.rename(columns={"vendorid": "vendor_id", "tpep_pickup_datetime": "pickup_datetime",
                            "tpep_dropoff_datetime": "dropoff_datetime",
                            "ratecodeid": "rate_code_id", "pulocationid": "pickup_location_id",
                            "dolocationid": "dropoff_location_id"})
    pd.testing.assert_frame_equal(sources.normalize(ge), out)


def test_missing_column_is_named(tmp_path):
    path = tmp_path / "yellow_tripdata_2020-02.csv"
    header = CSV_HEADER.replace(",fare_amount", ",fare")
    path.write_text(header + "\n" + CSV_ROWS[0] + "\n")
    with pytest.raises(sources.SourceError, match=r"missing required column\(s\) fare_amount"):
        sources.read_trips(path)


def test_unreadable_files(tmp_path):
    broken = tmp_path / "yellow_tripdata_2020-02.parquet"
    broken.write_bytes(b"this is not parquet")
    with pytest.raises(sources.SourceError, match="cannot read .*yellow_tripdata_2020-02.parquet"):
        sources.read_trips(broken)
    with pytest.raises(sources.SourceError, match="file not found"):
        sources.read_trips(tmp_path / "yellow_tripdata_2020-03.parquet")
    with pytest.raises(sources.SourceError, match="cannot download"):
        sources.download("http://127.0.0.1:9/yellow_tripdata_2020-01.parquet", tmp_path)


def test_discover_directories_and_names(tmp_path, real_csv):
    generator.generate(tmp_path / "d", [1, 2], scale=0.001, seed=0)
    (tmp_path / "d" / "yellow_tripdata_2020-02.csv").write_text(real_csv.read_text())
    found = sources.discover([str(tmp_path / "d")])
    assert [(f.year, f.month) for f in found] == [(2020, 1), (2020, 2)]
    assert found[1].location.endswith(".parquet")  # parquet wins over csv
    with pytest.raises(sources.SourceError, match="cannot tell the month"):
        sources.discover([str(tmp_path / "trips.parquet")])


@pytest.mark.skipif(not SAMPLES.is_dir(), reason="reference samples not available")
def test_reference_samples_agree_with_the_generator():
    """The real 10k-row samples and generated months: same label rate within 3 points."""
    for month in (1, 4, 5):
        real = sources.read_trips(SAMPLES / f"yellow_tripdata_sample_2020-{month:02d}.csv")
        gen = sources.normalize(generator.generate_month(month, scale=0.01, seed=0))
        start = pd.Timestamp(2020, month, 1)
        end = start + pd.offsets.MonthBegin(1)
        rate = [pipeline.label(pipeline.clean(df, start, end)).mean() for df in (real, gen)]
        assert rate[0] == pytest.approx(rate[1], abs=.03), month
