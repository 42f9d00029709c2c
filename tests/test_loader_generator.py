"""The synthetic generator against the acceptance numbers of the spec (§2, §6), at scale 0.01."""

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from loader import generator, pipeline, sources, tlc, zones

SCALE, SEED = 0.01, 0
MONTHS = [1, 2, 3, 4, 5]

# §2 of taxi-2020-data-and-generator.md, per month Jan..May
LABEL_RATE = [.680, .710, .689, .526, .462]      # P(tip/fare > .1 | fare > 5), all rows
CS_SHARE = [.916, .917, .898, .771, .737]        # congestion_surcharge == 2.5, all rows
CARD_SHARE = [.728, .749, .729, .556, .497]      # payment_type == 1, all rows
MANHATTAN_SHARE = [.918, .920, .913, .896, .849]  # pickup borough
TOLERANCE = 0.02


@pytest.fixture(scope="module")
def months():
    return {m: generator.generate_month(m, scale=SCALE, seed=SEED) for m in MONTHS}


def rates(df: pd.DataFrame) -> dict:
    fare5 = df["fare_amount"] > 5
    return {
        "label": float((df["tip_amount"] / df["fare_amount"] > .1)[fare5].mean()),
        "cs": float((df["congestion_surcharge"] == 2.5).mean()),
        "card": float((df["payment_type"] == tlc.CARD).fillna(False).mean()),
        "manhattan": float((zones.borough_of(df["PULocationID"]) == "Manhattan").mean()),
    }


def test_month_totals_are_exact_at_any_scale(months):
    for m in MONTHS:
        assert generator.month_size(m, 1.0) == generator.OFFICIAL_TRIPS[m]
        assert len(months[m]) == round(SCALE * generator.OFFICIAL_TRIPS[m])
    assert sum(generator.month_size(m, 1.0) for m in MONTHS) == 16_298_018


@pytest.mark.parametrize("month", MONTHS)
def test_acceptance_rates(months, month):
    got = rates(months[month])
    want = {"label": LABEL_RATE, "cs": CS_SHARE, "card": CARD_SHARE,
            "manhattan": MANHATTAN_SHARE}
    for key, table in want.items():
        assert got[key] == pytest.approx(table[month - 1], abs=TOLERANCE), key


def test_volume_collapses_in_march(months):
    per_day = months[3]["tpep_pickup_datetime"].dt.day.value_counts().sort_index()
    assert per_day.loc[2:6].mean() > 10 * per_day.loc[23:27].mean()
    assert len(months[4]) < len(months[1]) / 25


def test_drift_directions(months):
    jan, may = rates(months[1]), rates(months[5])
    assert may["cs"] < jan["cs"] - .1 and may["card"] < jan["card"] - .15
    null_share = [months[m]["VendorID"].isna().mean() for m in MONTHS]
    assert null_share[0] == pytest.approx(.0095, abs=.004)
    assert null_share[4] == pytest.approx(.1675, abs=.02)
    # zero tips among card trips triple in the congestion segment
    def zero_tip(df):
        card = (df["payment_type"] == tlc.CARD).fillna(False) & (df["congestion_surcharge"] > 0)
        return (df.loc[card, "tip_amount"] == 0).mean()
    assert zero_tip(months[5]) > 2 * zero_tip(months[1])


def test_vendor1_arithmetic(months):
    df = pd.concat(months.values())
    df = df[df["fare_amount"] > 0]
    parts = df[["fare_amount", "extra", "mta_tax", "tip_amount", "tolls_amount",
                "improvement_surcharge"]].sum(axis=1)
    v1, v2 = df["VendorID"] == 1, df["VendorID"] == 2
    # vendor 1 books the $2.50 congestion surcharge inside `extra`, and its total excludes it
    assert np.allclose(df.loc[v1, "total_amount"], parts[v1], atol=.005)
    base_extra = (df["extra"] - df["congestion_surcharge"])[v1 & (df["RatecodeID"] != 2)]
    assert set(base_extra.round(2).unique()) <= {0.0, .5, 1.0, 1.5}
    assert (df.loc[v1 & (df["congestion_surcharge"] > 0), "extra"] >= 2.5).all()
    # vendor 2 keeps extra in {0, .5, 1, 1.5} (4.5 at JFK peak) and its total includes cs
    assert set(df.loc[v2, "extra"].round(2).unique()) <= {0.0, .5, 1.0, 1.5, 4.5}
    assert np.allclose(df.loc[v2, "total_amount"], parts[v2] + df.loc[v2, "congestion_surcharge"],
                       atol=.005)


def test_fare_rules(months):
    df = pd.concat(months.values())
    df = df[df["fare_amount"] > 0]
    rc1 = df[df["RatecodeID"] == 1]
    assert np.allclose(rc1["fare_amount"] * 2, np.round(rc1["fare_amount"] * 2))
    assert (rc1["fare_amount"] >= 2.5).all()
    rc2 = df[df["RatecodeID"] == 2]
    assert len(rc2) > 100 and (rc2["fare_amount"] == 52).all()
    jfk_manhattan = rc2["PULocationID"].eq(zones.JFK) | rc2["DOLocationID"].eq(zones.JFK)
    assert jfk_manhattan.all()
    # tips are card-only (null-vendor rows have no payment type)
    tipped = df[df["tip_amount"] > 0]
    assert tipped["payment_type"].isin([tlc.CARD]).where(tipped["VendorID"].notna(), True).all()


def test_negated_twins(months):
    df = months[1]
    neg = df[df["fare_amount"] < 0]
    assert 0 < len(neg) / len(df) < .01
    assert neg["payment_type"].isin([tlc.NO_CHARGE, tlc.DISPUTE]).all()
    assert (neg["total_amount"] < 0).all()


def test_deterministic_for_a_seed():
    a = generator.generate_month(4, scale=SCALE, seed=7)
    b = generator.generate_month(4, scale=SCALE, seed=7)
    c = generator.generate_month(4, scale=SCALE, seed=8)
    pd.testing.assert_frame_equal(a, b)
    assert not a["tpep_pickup_datetime"].equals(c["tpep_pickup_datetime"])


def test_files_in_the_official_schema(tmp_path):
    paths = generator.generate(tmp_path, [2], scale=0.002, seed=1)
    assert paths == [tmp_path / "yellow_tripdata_2020-02.parquet"]
    schema = pq.read_schema(paths[0])
    assert schema.names == tlc.COLUMNS
    assert str(schema.field("VendorID").type) == "int64"
    assert str(schema.field("payment_type").type) == "int64"
    assert str(schema.field("RatecodeID").type) == "double"
    csv = generator.write_month(generator.generate_month(2, 0.002, seed=1),
                                tmp_path / "yellow_tripdata_2020-02.csv")
    from_parquet, from_csv = sources.read_trips(paths[0]), sources.read_trips(csv)
    pd.testing.assert_frame_equal(from_parquet, from_csv, check_exact=False)
    # a second call keeps the existing file: the content only depends on (seed, scale)
    mtime = paths[0].stat().st_mtime_ns
    generator.generate(tmp_path, [2], scale=0.002, seed=1)
    assert paths[0].stat().st_mtime_ns == mtime


def test_generated_month_survives_the_pipeline(months):
    df = sources.normalize(months[1])
    kept = pipeline.clean(df, "2020-01-01", "2020-02-01")
    assert .8 < len(kept) / len(df) < .92  # §2: 86.7% of January fares are above $5
