"""The TLC yellow-taxi file format, in one place.

The real-file reader (`loader.sources`) and the synthetic generator (`loader.generator`) both
import these names, so a generated month and a downloaded month have the same columns, order,
types and codes, and go through one code path afterwards.
"""

from __future__ import annotations

import pyarrow as pa

#: Official 2020 column names, in the order of the published files.  ``airport_fee`` exists only
#: in the parquet re-release (spelled ``Airport_fee`` in newer files) and is null for 2020.
COLUMNS = [
    "VendorID",
    "tpep_pickup_datetime",
    "tpep_dropoff_datetime",
    "passenger_count",
    "trip_distance",
    "RatecodeID",
    "store_and_fwd_flag",
    "PULocationID",
    "DOLocationID",
    "payment_type",
    "fare_amount",
    "extra",
    "mta_tax",
    "tip_amount",
    "tolls_amount",
    "improvement_surcharge",
    "total_amount",
    "congestion_surcharge",
    "airport_fee",
]

#: Columns without which the pipeline or the replay cannot work (the error names the missing ones).
REQUIRED = [
    "VendorID",
    "tpep_pickup_datetime",
    "tpep_dropoff_datetime",
    "passenger_count",
    "trip_distance",
    "RatecodeID",
    "PULocationID",
    "DOLocationID",
    "payment_type",
    "fare_amount",
    "tip_amount",
    "congestion_surcharge",
]

DATETIME_COLUMNS = ["tpep_pickup_datetime", "tpep_dropoff_datetime"]
AMOUNT_COLUMNS = [
    "fare_amount",
    "extra",
    "mta_tax",
    "tip_amount",
    "tolls_amount",
    "improvement_surcharge",
    "total_amount",
    "congestion_surcharge",
    "airport_fee",
]

#: Parquet schema as TLC publishes it: integer codes are int64 (nullable), the rest float64.
PARQUET_SCHEMA = pa.schema(
    [
        ("VendorID", pa.int64()),
        ("tpep_pickup_datetime", pa.timestamp("us")),
        ("tpep_dropoff_datetime", pa.timestamp("us")),
        ("passenger_count", pa.float64()),
        ("trip_distance", pa.float64()),
        ("RatecodeID", pa.float64()),
        ("store_and_fwd_flag", pa.string()),
        ("PULocationID", pa.int64()),
        ("DOLocationID", pa.int64()),
        ("payment_type", pa.int64()),
        ("fare_amount", pa.float64()),
        ("extra", pa.float64()),
        ("mta_tax", pa.float64()),
        ("tip_amount", pa.float64()),
        ("tolls_amount", pa.float64()),
        ("improvement_surcharge", pa.float64()),
        ("total_amount", pa.float64()),
        ("congestion_surcharge", pa.float64()),
        ("airport_fee", pa.float64()),
    ]
)

#: Other spellings seen in the wild, mapped to the official name.  Lower-case names come from the
#: essay's Postgres ingest (ttb); the snake_case ones from the great_expectations test samples.
ALIASES = {
    "vendor_id": "VendorID",
    "pickup_datetime": "tpep_pickup_datetime",
    "dropoff_datetime": "tpep_dropoff_datetime",
    "rate_code_id": "RatecodeID",
    "ratecode_id": "RatecodeID",
    "pickup_location_id": "PULocationID",
    "dropoff_location_id": "DOLocationID",
}

VENDORS = {1: "CMT", 2: "VeriFone", 6: "Myle", 7: "Helix"}
RATE_CODES = {
    1: "standard",
    2: "jfk",
    3: "newark",
    4: "nassau_westchester",
    5: "negotiated",
    6: "group",
}
CARD, CASH, NO_CHARGE, DISPUTE = 1, 2, 3, 4

OFFICIAL_URL = "https://d37ci6vzurychx.cloudfront.net/trip-data/yellow_tripdata_{year}-{month:02d}.parquet"


def file_name(year: int, month: int, fmt: str = "parquet") -> str:
    """The official file name of one month, e.g. ``yellow_tripdata_2020-01.parquet``."""
    return f"yellow_tripdata_{year}-{month:02d}.{fmt}"
