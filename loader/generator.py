"""Synthetic NYC yellow-taxi months, January to May 2020.

Why synthetic: the real files are 50-100 MB per month and need a network; the demo and the
tests must run offline.  The generator follows the spec in
``taxi-2020-data-and-generator.md`` §6: it reproduces the marginals that matter to the
"high tip" model (month volumes, congestion-surcharge share, card share, zero tips, null-vendor
rows, hour profile, zones, fares) and, above all, the three spring-2020 shifts that make a
January-trained model decay the way it did on the real data:

* covariate shift: fewer congestion-zone trips, other hours and zones, faster trips, more
  null-vendor rows;
* concept shift: a lower card share and more zero tips within each segment;
* prior shift: the share of high-tip trips falls from about .70 to about .50.

Every parameter moves with a regime ``r(d)``: 0 until 8 March, linear to 1 on 23 March, then 1.
A value is ``(1 - r) * pre + r * lock``, where ``pre`` is the month's own value in January and
February, ``lock`` is April's (May's in May), and March's ``pre`` is solved so that the
volume-weighted March mean equals March's own §2 value.

Beyond §6, a few shapes are fitted to the real 10k-row monthly samples so the marginals land on
§2: trip lengths (congestion-zone trips median 1.6 mi, same-zone .55 mi, a heavier right tail),
where surcharge-free trips start (upper Manhattan, airports, outer boroughs), null-vendor rows
(half of them outside Manhattan), a lower card share for fares <= $5 and a higher one for
airport trips outside the zone, and more token tips outside the zone during the lockdown.  The
January model trained on this data decays as Variant A does on the real samples (accuracy
Feb .73, Apr .61, May .64-.65); ``tests/test_loader_generator.py`` and
``tests/test_loader_pipeline.py`` check the §2 and §6 acceptance numbers.

Determinism: one ``numpy.random.Generator`` per month, seeded from ``SeedSequence([seed, year,
month])``, so a month is identical whether it is generated alone or with the others, and the
output depends only on ``(seed, scale, month)``.  Month sizes are exact: ``round(scale *
official count)`` trips, spread over the days by a multinomial draw (a Poisson process
conditioned on its total), so ``scale=1`` gives the official row counts.
"""

from __future__ import annotations

import calendar
from collections.abc import Iterable, Iterator
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from loader import tlc, zones

YEAR = 2020
MONTHS = (1, 2, 3, 4, 5)
DEFAULT_SCALE = 0.005

#: Official row counts of the TLC yellow files (a scale factor of 1.0 reproduces them exactly).
OFFICIAL_TRIPS = {1: 6_405_008, 2: 6_299_354, 3: 3_007_292, 4: 237_993, 5: 348_371}

LOCKDOWN_START = np.datetime64("2020-03-08")  # r = 0 up to this day, then linear ...
LOCKDOWN_DAYS = 15  # ... reaching 1 on 23 March

# Share of pickups per hour of day (0-23h), January and April 2020.
HOURS_PRE = np.array([2.9, 2.0, 1.5, 1.1, .6, .8, 2.0, 3.8, 4.6, 4.5, 4.6, 4.9,
                      5.7, 5.6, 6.0, 5.3, 5.3, 6.2, 7.2, 6.4, 5.2, 5.7, 4.4, 3.5])
HOURS_LOCK = np.array([1.6, .6, .4, .3, .3, 1.2, 4.2, 6.3, 5.9, 5.5, 6.0, 5.9,
                       6.5, 6.6, 6.5, 7.4, 7.0, 7.0, 5.3, 4.7, 3.6, 2.6, 2.1, 2.5])

# Per-month targets (Jan, Feb, Mar, Apr, May); March is produced by the regime mix.
NULL_VENDOR = (.0095, .0092, .0134, .080, .1675)
NULL_CS = (0, 0, .075, .35, .36)
NULL_TIPPED = (0, 0, .06, .52, .25)
NULL_TINY_TIP = (.25, .25, .25, .25, .20)  # share of their tips that are token amounts
P_CS = (.925, .925, .909, .808, .813)
CARD_CS = (.758, .785, .779, .660, .651)
CARD_NO_CS = (.562, .570, .520, .476, .493)
TIP0_CS = (.023, .018, .020, .048, .053)
TIP0_NO_CS = (.20, .20, .20, .34, .37)

# (pre, lockdown) pairs.
JFK_SHARE = (.026, .004)  # of congestion trips: JFK <-> Manhattan at the $52 flat rate
LGA_SHARE = (.018, .007)  # of congestion trips: LaGuardia <-> Manhattan
PU_OUTSIDE_CS = (.027, .07)  # of congestion city trips: picked up outside the zone ...
CS_FROM_UPPER_MANHATTAN = (.7, .7)  # ... mostly in upper Manhattan
NO_CS_FROM_CZ = (.12, .10)  # of trips without surcharge: picked up inside the zone anyway
NO_CS_UPPER_MANHATTAN = (.32, .70)  # ... and of the others: picked up in upper Manhattan
SAME_ZONE_CS = (.032, .04)  # drop-off zone == pickup zone, for trips within the zone
SAME_ZONE_NO_CS = (.15, .15)  # ... and for trips outside it (more local)
VENDOR1 = (.335, .44)
PASSENGER_SHIFT = (0.0, .36)  # share of 2+ passenger trips that become 1 passenger
ZERO_DISTANCE = (.01, .028)
CS_DISTANCE = (1.6, 1.8)  # lognormal median, miles
NO_CS_DISTANCE = (1.3, 1.5)
NULL_DISTANCE = (7.0, 6.0)
SPEED = (9.9, 15.4)  # lognormal median, mph
NO_CHARGE = (.005, .012)
DISPUTE = (.003, .005)
TOLLS_CS = (.035, .008)
TOLLS_NO_CS = (.105, .06)
# Card share is lower on short trips: subtract this for fares <= $5 (congestion, other).
SHORT_CARD_CS = (.05, .06)
SHORT_CARD_NO_CS = (.20, .20)
AIRPORT_CARD_NO_CS = (.15, .10)  # card-share gap, off-zone airport vs other off-zone trips

PASSENGERS = np.arange(7)
PASSENGERS_V1 = np.array([.055, .741, .147, .035, .019, .002, .001])
PASSENGERS_V2 = np.array([0, .697, .148, .043, .021, .055, .036])

# Tip presets on the vendor's base: 20%, 25%, 30%, 15%, a tiny tip, round dollars, free-form.
# The tiny tip (index 4) is drawn separately, with a share that rises off-zone in the lockdown.
TIP_PRESETS = np.cumsum([.50, .10, .055, .05, .04, .20])
TINY_TIP = (.04, .12)
TINY_TIP_CS = (.04, .05)


def month_size(month: int, scale: float) -> int:
    """Number of trips in a generated month: ``round(scale * official count)``."""
    return int(round(scale * OFFICIAL_TRIPS[month]))


@lru_cache(maxsize=1)
def daily_volume() -> pd.Series:
    """Relative daily trip volume for Jan-May 2020 (shipped ``data/daily_volume.csv``)."""
    df = pd.read_csv(zones.DATA / "daily_volume.csv", parse_dates=["date"])
    return df.set_index("date")["trips"].astype(float)


def regime(dates: np.ndarray) -> np.ndarray:
    """Lockdown regime r in [0, 1] for each ``datetime64[D]`` date."""
    days = (dates.astype("datetime64[D]") - LOCKDOWN_START).astype(float)
    return np.clip(days / LOCKDOWN_DAYS, 0.0, 1.0)


@lru_cache(maxsize=1)
def march_mean_regime() -> float:
    """Volume-weighted mean of r over March (about .16)."""
    vol = daily_volume()
    vol = vol[vol.index.month == 3]
    return float((vol * regime(vol.index.to_numpy())).sum() / vol.sum())


def _month_params(month: int, table: tuple) -> tuple[float, float]:
    """(pre, lock) values of a per-month table (Jan, Feb, Mar, Apr, May) for one month.

    March's ``pre`` is solved so that the volume-weighted March mean equals March's own target:
    the real March shows the lockdown's effects later than a linear regime would.
    """
    if month <= 2:
        return table[month - 1], table[month - 1]
    lock = table[4] if month >= 5 else table[3]
    if month == 3:
        rbar = march_mean_regime()
        return float(np.clip((table[2] - rbar * lock) / (1 - rbar), 0, 1)), lock
    return lock, lock


def _mix(r: np.ndarray, pre: float, lock: float) -> np.ndarray:
    return pre + r * (lock - pre)


class _Zones:
    """Zone ids and weights arranged for fast segment-restricted draws."""

    def __init__(self) -> None:
        t = zones.table()
        self.ids = t.index.to_numpy()
        self.cz = t["congestion"].to_numpy()
        self.airport = np.isin(self.ids, [zones.JFK, zones.LGA])
        self.manhattan = (t["Borough"] == "Manhattan").to_numpy()
        self.outer = t["Borough"].isin(["Bronx", "Brooklyn", "Queens"]).to_numpy() & ~self.airport
        self.w = {k: t[k].to_numpy(dtype=float) for k in ("pu_pre", "do_pre", "pu_lock", "do_lock")}

    def weights(self, end: str, lock: bool, where: np.ndarray) -> np.ndarray:
        w = np.where(where, self.w[f"{end}_{'lock' if lock else 'pre'}"], 0.0)
        return w / w.sum()

    def draw(self, rng, end: str, lock: np.ndarray, where: np.ndarray, out: np.ndarray,
             mask: np.ndarray) -> None:
        """Fill ``out[mask]`` with zones drawn from ``end`` weights restricted to ``where``."""
        for flag in (False, True):
            idx = np.flatnonzero(mask & (lock == flag))
            if len(idx):
                out[idx] = rng.choice(self.ids, size=len(idx), p=self.weights(end, flag, where))


def _lognormal(rng, median, sigma, n, sigma_right=None) -> np.ndarray:
    """Lognormal draws; ``sigma_right`` widens the upper half (real trip lengths are skewed)."""
    z = rng.standard_normal(n)
    if sigma_right is not None:
        return np.exp(np.log(median) + z * np.where(z < 0, sigma, sigma_right))
    return np.exp(np.log(median) + sigma * z)


def _round_half(x: np.ndarray) -> np.ndarray:
    return np.round(x * 2) / 2


def generate_month(month: int, scale: float = DEFAULT_SCALE, seed: int = 0) -> pd.DataFrame:
    """One synthetic month in the official schema (column order, names and nullable codes).

    Returns a DataFrame ready for ``write_month``: ``VendorID`` and ``payment_type`` are
    nullable ``Int64``, datetimes are naive New York local time, ``airport_fee`` is null.
    """
    if month not in OFFICIAL_TRIPS:
        raise ValueError(f"the generator covers 2020-01 to 2020-05, not month {month}")
    rng = np.random.default_rng(np.random.SeedSequence([seed, YEAR, month]))
    n = month_size(month, scale)
    zt = _Zones()
    p = lambda table: _month_params(month, table)  # noqa: E731

    # -- 1. pickup day and time ---------------------------------------------------------------
    vol = daily_volume()
    vol = vol[vol.index.month == month]
    counts = rng.multinomial(n, (vol / vol.sum()).to_numpy())
    day = np.repeat(vol.index.to_numpy().astype("datetime64[D]"), counts)
    r = regime(day)
    lock = rng.random(n) < r  # which regime's profiles (hours, zones) a trip is drawn from
    hour = np.where(lock, rng.choice(24, n, p=HOURS_LOCK / HOURS_LOCK.sum()),
                    rng.choice(24, n, p=HOURS_PRE / HOURS_PRE.sum()))
    second = rng.integers(0, 3600, n)
    pickup = day.astype("datetime64[s]") + (hour * 3600 + second).astype("timedelta64[s]")
    weekday = (day.astype("datetime64[D]").view("int64") + 3) % 7  # 1970-01-01: a Thursday

    # -- 2. null-vendor rows ------------------------------------------------------------------
    null = rng.random(n) < _mix(r, *p(NULL_VENDOR))
    ok = ~null

    # -- 3. segment: congestion surcharge, JFK flat rate, LaGuardia --------------------------
    cs = ok & (rng.random(n) < _mix(r, *p(P_CS)))
    u = rng.random(n)
    jfk_share = _mix(r, *JFK_SHARE)
    jfk = cs & (u < jfk_share)
    lga = cs & ~jfk & (u < jfk_share + _mix(r, *LGA_SHARE))
    city = cs & ~jfk & ~lga
    no_cs = ok & ~cs
    cs |= null & (rng.random(n) < _mix(r, *p(NULL_CS)))

    # -- 4. zones -----------------------------------------------------------------------------
    pu = np.zeros(n, dtype=np.int64)
    do = np.zeros(n, dtype=np.int64)
    cz, air = zt.cz, zt.airport
    always = np.ones(n, dtype=bool)  # null-vendor rows use the (outer-heavy) lockdown weights
    # congestion city trips: mostly inside the zone, a few come in from outside
    pu_in = city & (rng.random(n) >= _mix(r, *PU_OUTSIDE_CS))
    zt.draw(rng, "pu", lock, cz & ~air, pu, pu_in)
    zt.draw(rng, "do", lock, ~air, do, pu_in)
    from_upper = city & ~pu_in & (rng.random(n) < _mix(r, *CS_FROM_UPPER_MANHATTAN))
    zt.draw(rng, "pu", lock, ~cz & zt.manhattan, pu, from_upper)
    zt.draw(rng, "pu", lock, ~cz & ~zt.manhattan & ~air, pu, city & ~pu_in & ~from_upper)
    zt.draw(rng, "do", lock, cz & ~air, do, city & ~pu_in)
    # airport trips: one end at the airport, the other in the congestion zone
    for airport, mask, p_from in ((zones.JFK, jfk, .6), (zones.LGA, lga, .55)):
        from_airport = mask & (rng.random(n) < p_from)
        pu[from_airport] = airport
        zt.draw(rng, "do", lock, cz, do, from_airport)
        to_airport = mask & ~from_airport
        zt.draw(rng, "pu", lock, cz, pu, to_airport)
        do[to_airport] = airport
    # trips without the surcharge: upper Manhattan, outer boroughs, airports <-> outer boroughs,
    # and a few from the zone to outside it that were not charged
    from_cz = no_cs & (rng.random(n) < _mix(r, *NO_CS_FROM_CZ))
    zt.draw(rng, "pu", lock, cz, pu, from_cz)
    upper = no_cs & ~from_cz & (rng.random(n) < _mix(r, *NO_CS_UPPER_MANHATTAN))
    zt.draw(rng, "pu", lock, ~cz & zt.manhattan, pu, upper)
    zt.draw(rng, "pu", lock, ~cz & ~zt.manhattan, pu, no_cs & ~from_cz & ~upper)
    zt.draw(rng, "do", lock, ~cz, do, no_cs)
    # null-vendor rows: about half in Manhattan, half in the outer boroughs (Brooklyn first)
    for end, out in (("pu", pu), ("do", do)):
        in_manhattan = null & (rng.random(n) < .48)
        zt.draw(rng, end, always, zt.manhattan, out, in_manhattan)
        zt.draw(rng, end, always, zt.outer, out, null & ~in_manhattan)
    p_same = np.select([pu_in, no_cs & ~from_cz, null], [_mix(r, *SAME_ZONE_CS),
                                                         _mix(r, *SAME_ZONE_NO_CS), .05], 0.0)
    same = rng.random(n) < p_same
    do[same] = pu[same]
    same = pu == do

    # -- 5. vendor and passengers -------------------------------------------------------------
    v1 = ok & (rng.random(n) < _mix(r, *VENDOR1))
    vendor = np.where(null, 0, np.where(v1, 1, 2))
    passengers = np.where(v1, rng.choice(PASSENGERS, n, p=PASSENGERS_V1),
                          rng.choice(PASSENGERS, n, p=PASSENGERS_V2)).astype(float)
    shift = (passengers >= 2) & (rng.random(n) < _mix(r, *PASSENGER_SHIFT))
    passengers[shift] = 1

    # -- 6. distance --------------------------------------------------------------------------
    airport_trip = np.isin(pu, zones.AIRPORTS) | np.isin(do, zones.AIRPORTS)
    dist = np.select(
        [same, jfk, lga, ((pu == zones.EWR) | (do == zones.EWR)),
         no_cs & airport_trip & ((pu == zones.JFK) | (do == zones.JFK)),
         no_cs & airport_trip, null, no_cs],
        [_lognormal(rng, .55, .6, n), _lognormal(rng, 17.5, .2, n), _lognormal(rng, 9.5, .25, n),
         _lognormal(rng, 17.0, .2, n), _lognormal(rng, 11.0, .4, n), _lognormal(rng, 7.0, .4, n),
         _lognormal(rng, _mix(r, *NULL_DISTANCE), .8, n),
         _lognormal(rng, _mix(r, *NO_CS_DISTANCE), .6, n, 1.0)],
        _lognormal(rng, _mix(r, *CS_DISTANCE), .6, n, .77))
    dist = np.round(dist, 2)
    dist[rng.random(n) < _mix(r, *ZERO_DISTANCE)] = 0.0

    # -- 7. duration --------------------------------------------------------------------------
    speed = _lognormal(rng, _mix(r, *SPEED), .35, n)
    speed = np.where(airport_trip & ~same, speed * 2.5, speed)  # highways
    speed = np.where(null, speed * 1.4, speed)
    minutes = dist / speed * 60 + rng.exponential(.8, n)
    duration = np.round(minutes * 60).astype(np.int64)

    # -- 8. rate code -------------------------------------------------------------------------
    rate = np.ones(n)
    rate[do == zones.EWR] = 3
    u = rng.random(n)
    rate[(rate == 1) & (u < .005)] = 5
    rate[(rate == 1) & (u >= .005) & (u < .0055)] = 4
    rate[(rate == 1) & (u >= .0055) & (u < .0056)] = 99
    rate[jfk] = 2

    # -- 9. fare ------------------------------------------------------------------------------
    metered = np.maximum(2.5, _round_half(2.08 + 1.87 * dist + .357 * minutes
                                          + rng.normal(0, .5, n)))
    fare = np.where(rate == 2, 52.0, metered)
    fare = np.where(rate == 3, metered + 17.5, fare)
    fare = np.where(rate == 5, np.round(rng.uniform(20, 90, n), 2), fare)

    # -- 10. extra (night, peak; vendor 1 books the congestion surcharge here) ----------------
    night = (hour >= 20) | (hour < 6)
    peak = (weekday < 5) & (hour >= 16) & (hour < 20)
    extra = .5 * night + 1.0 * peak
    extra = np.where(rate == 2, 4.5 * peak, extra)
    cs_amount = np.where(cs, 2.5, 0.0)
    extra = np.where(v1, extra + cs_amount, extra)
    extra = np.where(null, np.where(rng.random(n) < 1 - r, 2.75, 0.0), extra)

    # -- 11. other amounts --------------------------------------------------------------------
    mta = np.where((rate == 3) | ((rate == 5) & (rng.random(n) < .7)), 0.0, .5)
    improvement = np.full(n, .3)
    p_toll = np.where(cs, _mix(r, *TOLLS_CS), _mix(r, *TOLLS_NO_CS))
    p_toll = np.where(lga, .35, p_toll)
    p_toll = np.where((rate == 2) | (rate == 3), .74, p_toll)
    tolls = np.where(rng.random(n) < p_toll, np.where(rate == 3, 12.5, 6.12), 0.0)

    # -- 12. payment type ---------------------------------------------------------------------
    short = fare <= 5
    p_card = np.where(cs, _mix(r, *p(CARD_CS)), _mix(r, *p(CARD_NO_CS)))
    p_card -= np.where(short, np.where(cs, _mix(r, *SHORT_CARD_CS),
                                       _mix(r, *SHORT_CARD_NO_CS)), 0.0)
    p_card -= .05 * (hour < 6)
    # off-zone airport trips (JFK -> Brooklyn, ...) pay by card more often than other off-zone
    # trips; the segment's mean stays on target
    off_airport = no_cs & airport_trip
    boost = _mix(r, *AIRPORT_CARD_NO_CS)
    share = off_airport.sum() / max(no_cs.sum(), 1)
    p_card += np.where(off_airport, boost * (1 - share), np.where(no_cs, -boost * share, 0.0))
    p_nc, p_disp = _mix(r, *NO_CHARGE), _mix(r, *DISPUTE)
    u = rng.random(n)
    payment = np.select([u < p_card, u < p_card + p_nc, u < p_card + p_nc + p_disp],
                        [tlc.CARD, tlc.NO_CHARGE, tlc.DISPUTE], tlc.CASH)
    payment = np.where(null, 0, payment)

    # -- 13. tips: card only, presets on a vendor-specific base --------------------------------
    base_v2 = fare + extra + mta + tolls + improvement + cs_amount
    base_v1 = fare + extra + mta + improvement
    base = np.where(v1, base_v1, base_v2)
    p_tip0 = np.where(cs, _mix(r, *p(TIP0_CS)), _mix(r, *p(TIP0_NO_CS)))
    tipped = (payment == tlc.CARD) & (rng.random(n) >= p_tip0)
    tipped |= null & (rng.random(n) < _mix(r, *p(NULL_TIPPED)))
    preset = np.searchsorted(TIP_PRESETS, rng.random(n), side="right")
    # lockdown: more token tips off-zone; null-vendor rows tip less generously
    p_tiny = np.select([null, cs], [_mix(r, *p(NULL_TINY_TIP)), _mix(r, *TINY_TIP_CS)],
                       _mix(r, *TINY_TIP))
    preset = np.where(rng.random(n) < p_tiny, 4, np.where(preset == 4, 0, preset))
    frac = np.choose(preset, [np.full(n, .20), np.full(n, .25), np.full(n, .30), np.full(n, .15),
                              rng.uniform(.02, .08, n), rng.normal(.20, .05, n),
                              np.clip(rng.normal(.19, .06, n), .01, .6)])
    tip = np.round(base * frac, 2)
    tip = np.where(preset == 5, np.maximum(1.0, np.round(base * frac)), tip)
    tip = np.where(tipped, tip, 0.0)

    # -- 14. total ----------------------------------------------------------------------------
    total = fare + extra + mta + tip + tolls + improvement + np.where(v1, 0.0, cs_amount)

    # -- 15. store-and-forward flag -----------------------------------------------------------
    flag = np.where(rng.random(n) < np.where(v1, .025, .0025), "Y", "N").astype(object)
    flag[null] = None

    # -- timestamp quirks of the real files ---------------------------------------------------
    round_minute = null & (rng.random(n) < .65)
    pickup = np.where(round_minute, pickup.astype("datetime64[m]").astype("datetime64[s]"),
                      pickup)
    duration = np.where(round_minute, np.round(duration / 60) * 60, duration).astype(np.int64)
    u = rng.random(n)
    duration = np.where((vendor == 2) & (u < .003), 86400 - rng.integers(1, 600, n), duration)
    duration = np.where((u >= .003) & (u < .004), -rng.integers(0, 600, n) * (u < .0035),
                        duration)
    dropoff = pickup + duration.astype("timedelta64[s]")
    glitch = rng.random(n) < 1e-5  # a handful of rows carry a 2008 clock
    years = np.datetime64("2020-01-01") - np.datetime64("2008-01-01")
    pickup = np.where(glitch, pickup - years, pickup)
    dropoff = np.where(glitch, dropoff - years, dropoff)

    df = pd.DataFrame({
        "VendorID": pd.array(np.where(null, pd.NA, vendor), dtype="Int64"),
        "tpep_pickup_datetime": pickup.astype("datetime64[us]"),
        "tpep_dropoff_datetime": dropoff.astype("datetime64[us]"),
        "passenger_count": np.where(null, np.nan, passengers),
        "trip_distance": dist,
        "RatecodeID": np.where(null, np.nan, rate),
        "store_and_fwd_flag": flag,
        "PULocationID": pu,
        "DOLocationID": do,
        "payment_type": pd.array(np.where(null, pd.NA, payment), dtype="Int64"),
        "fare_amount": fare,
        "extra": extra,
        "mta_tax": mta,
        "tip_amount": tip,
        "tolls_amount": tolls,
        "improvement_surcharge": improvement,
        "total_amount": total,
        "congestion_surcharge": cs_amount,
        "airport_fee": np.full(n, np.nan),
    })
    df = _add_negated_twins(df, rng)
    amounts = [c for c in tlc.AMOUNT_COLUMNS if c != "airport_fee"]
    df[amounts] = df[amounts].round(2) + 0.0  # + 0.0 turns -0.0 into 0.0
    return df.sort_values("tpep_pickup_datetime", kind="stable").reset_index(drop=True)


def _add_negated_twins(df: pd.DataFrame, rng) -> pd.DataFrame:
    """Refunds: about half the no-charge/dispute trips get a twin with every amount negated.

    The twin overwrites a random other row so the month keeps its exact size.
    """
    source = df["payment_type"].isin([tlc.NO_CHARGE, tlc.DISPUTE]).to_numpy(dtype=bool)
    source &= rng.random(len(df)) < .5
    src = np.flatnonzero(source)
    others = np.flatnonzero(~source)
    if not len(src) or len(others) < len(src):
        return df
    victims = rng.choice(others, size=len(src), replace=False)
    twins = df.iloc[src].copy()
    amounts = [c for c in tlc.AMOUNT_COLUMNS if c != "airport_fee"]
    twins[amounts] = -twins[amounts]
    twins.index = df.index[victims]
    df.loc[twins.index] = twins
    return df


def iter_months(months: Iterable[int] = MONTHS, scale: float = DEFAULT_SCALE,
                seed: int = 0) -> Iterator[tuple[int, pd.DataFrame]]:
    """Stream generated months without touching the disk: yields ``(month, frame)``."""
    for month in months:
        yield month, generate_month(month, scale=scale, seed=seed)


def write_month(df: pd.DataFrame, path: Path) -> Path:
    """Write one month as TLC parquet (int64 codes, float64 amounts) or CSV, by suffix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    if path.suffix == ".csv":
        df.to_csv(tmp, index=False, date_format="%Y-%m-%d %H:%M:%S")
    else:
        table = pa.Table.from_pandas(df[tlc.COLUMNS], schema=tlc.PARQUET_SCHEMA,
                                     preserve_index=False)
        pq.write_table(table, tmp)
    tmp.replace(path)  # atomic: a reader never sees half a month
    return path


def generate(out_dir: Path, months: Iterable[int] = MONTHS, scale: float = DEFAULT_SCALE,
             seed: int = 0, fmt: str = "parquet", overwrite: bool = False) -> list[Path]:
    """Write ``yellow_tripdata_2020-MM.<fmt>`` for each month into ``out_dir``.

    Existing files are kept unless ``overwrite``: the output only depends on (seed, scale).
    """
    paths = []
    for month in months:
        path = Path(out_dir) / tlc.file_name(YEAR, month, fmt)
        if overwrite or not path.exists():
            write_month(generate_month(month, scale=scale, seed=seed), path)
        paths.append(path)
    return paths


def days_in_month(month: int) -> int:
    """Number of days of a 2020 month."""
    return calendar.monthrange(YEAR, month)[1]
