"""Taxi zones: borough lookup, pickup/drop-off weights and the congestion zone.

``data/zones.csv`` is public TLC-derived data: the 265 zones of ``taxi+_zone_lookup.csv``
(LocationID, Borough, Zone) with smoothed pickup/drop-off shares before (``*_pre``) and
during (``*_lock``) the spring-2020 lockdown, estimated from 10k-row monthly samples.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd

DATA = Path(__file__).with_name("data")

JFK, LGA, EWR = 132, 138, 1
AIRPORTS = (EWR, JFK, LGA)

#: Manhattan zones outside the congestion-pricing area (south of 96th St).  Chosen from the share
#: of real trips paying the $2.50 surcharge per pickup zone: these all stay below ~50%, the
#: remaining Manhattan zones are above 85%.  Roosevelt and the harbour islands are outside too.
UPPER_MANHATTAN = frozenset(
    {24, 41, 42, 74, 75, 103, 104, 105, 116, 120, 127, 128, 151, 152, 153, 166, 194, 202, 243, 244}
)


@lru_cache(maxsize=1)
def table() -> pd.DataFrame:
    """The zone table indexed by LocationID (1..265), with a boolean ``congestion`` column."""
    df = pd.read_csv(DATA / "zones.csv").set_index("LocationID").sort_index()
    df["congestion"] = (df["Borough"] == "Manhattan") & ~df.index.isin(list(UPPER_MANHATTAN))
    return df


def borough_of(location_ids: pd.Series) -> pd.Series:
    """Borough name per LocationID; unknown, null or out-of-range ids map to ``"Unknown"``."""
    boroughs = table()["Borough"]
    lookup = np.full(max(boroughs.index.max(), 265) + 1, "Unknown", dtype=object)
    lookup[boroughs.index.to_numpy()] = boroughs.to_numpy()
    ids = pd.to_numeric(location_ids, errors="coerce").to_numpy(dtype=float, na_value=np.nan)
    ok = np.isfinite(ids) & (ids >= 0) & (ids < len(lookup))
    out = np.full(len(ids), "Unknown", dtype=object)
    out[ok] = lookup[ids[ok].astype(np.int64)]
    return pd.Series(out, index=location_ids.index, name="borough")
