"""Replay scored taxi trips into the store as predictions and delayed feedback.

Two halves, kept apart so the first is testable without a database:

* *building records* (pure functions on DataFrames): a prediction per cleaned trip, stamped at
  its pickup, with segments and features; feedback with the trip's label, stamped when the truth
  becomes known (drop-off plus a delay), minus a share that never arrives;
* *writing* through any object with the ``datasource.client.Client`` methods, in batches:
  ``backfill`` as fast as the client takes it, ``live`` paced by a data clock.

Idempotence: a trip's ``output_id`` is a 128-bit hash of its raw columns, and the feedback delay
and the "never arrives" draw are derived from that hash and the seed rather than from a
sequential RNG.  Replaying the same data again, in one go or resumed in pieces, produces the same
records, so the store's upserts leave row counts unchanged.

Time: TLC timestamps are naive New York local time.  They are localised to America/New_York
and converted to UTC (nonexistent spring-forward times shift forward, ambiguous fall-back times
count as daylight time), and every timestamp handed to the client is timezone-aware UTC.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np
import pandas as pd

from loader import pipeline, tlc, zones

NEW_YORK = "America/New_York"
MODEL_NAME = "taxi-high-tip"
SEGMENTS = ["pickup_borough", "vendor", "time_of_day", "rate_code"]
#: Raw inputs of the score worth watching for drift, besides the model's own inputs.
EXTRA_FEATURES = ["fare_amount", "trip_minutes"]
FEATURE_NAMES = pipeline.FEATURES + EXTRA_FEATURES
#: Columns that identify a trip.  Exact duplicate rows in a file collapse to one id (and one
#: prediction), which is the right outcome for a replay.
ID_COLUMNS = [
    "VendorID", "tpep_pickup_datetime", "tpep_dropoff_datetime", "passenger_count",
    "trip_distance", "RatecodeID", "PULocationID", "DOLocationID", "payment_type", "fare_amount",
    "extra", "mta_tax", "tip_amount", "tolls_amount", "improvement_surcharge", "total_amount",
    "congestion_surcharge",
]
TIME_OF_DAY = [(0, "night"), (6, "morning_rush"), (10, "midday"), (16, "evening_rush"),
               (20, "evening")]

_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_NULL = np.int64(-(2 ** 62))


# --------------------------------------------------------------------------------------------
# time


def to_utc(local: pd.Series) -> pd.Series:
    """Naive New York local datetimes -> timezone-aware UTC."""
    if getattr(local.dt, "tz", None) is not None:
        return local.dt.tz_convert("UTC")
    aware = local.dt.tz_localize(NEW_YORK, nonexistent="shift_forward",
                                 ambiguous=np.ones(len(local), dtype=bool))
    return aware.dt.tz_convert("UTC")


def _epoch_us(ts: pd.Series) -> np.ndarray:
    """Aware timestamps as int64 microseconds since the epoch."""
    naive = ts.dt.tz_convert("UTC").dt.tz_localize(None).astype("datetime64[us]")
    return naive.to_numpy().view("int64")


def parse_time(value: str | datetime | pd.Timestamp) -> pd.Timestamp:
    """A command-line time as UTC: naive values are New York local time (the data's clock)."""
    ts = pd.Timestamp(value)
    if ts.tzinfo is None:
        ts = ts.tz_localize(NEW_YORK, nonexistent="shift_forward", ambiguous=True)
    return ts.tz_convert("UTC")


# --------------------------------------------------------------------------------------------
# stable ids and per-trip uniforms


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a fast, well-mixed 64-bit bijection (numpy, wraps mod 2**64)."""
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def _column_ints(s: pd.Series) -> np.ndarray:
    """A column as int64 codes: datetimes in microseconds, numbers in cents, nulls a sentinel."""
    if pd.api.types.is_datetime64_any_dtype(s):
        values = s.astype("datetime64[us]").to_numpy()
        out = values.view("int64").copy()
        out[np.isnat(values)] = _NULL
        return out
    x = pd.to_numeric(s, errors="coerce").to_numpy(dtype="float64", na_value=np.nan)
    out = np.where(np.isfinite(x), np.round(x * 100), 0).astype(np.int64)
    out[~np.isfinite(x)] = _NULL
    return out


def trip_hashes(trips: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Two independent 64-bit hashes per trip from ``ID_COLUMNS`` (version-independent)."""
    n = len(trips)
    with np.errstate(over="ignore"):
        h1 = np.full(n, np.uint64(0x243F6A8885A308D3))
        h2 = np.full(n, np.uint64(0x13198A2E03707344))
        for i, col in enumerate(ID_COLUMNS):
            v = _column_ints(trips[col]).view(np.uint64) + np.uint64(i + 1) * _GOLDEN
            h1 = _mix64(h1 ^ _mix64(v))
            h2 = _mix64(h2 ^ _mix64(v ^ np.uint64(0xA4093822299F31D0)))
    return h1, h2


def trip_ids(trips: pd.DataFrame) -> np.ndarray:
    """Stable 32-hex-digit ``output_id`` of each trip."""
    h1, h2 = trip_hashes(trips)
    return np.array([f"{a:016x}{b:016x}" for a, b in zip(h1.tolist(), h2.tolist(), strict=True)],
                    dtype=object)


def _uniform(h: np.ndarray, seed: int, stream: int) -> np.ndarray:
    """A U(0, 1) per trip, fixed by the trip's hash, the seed and a stream number."""
    with np.errstate(over="ignore"):
        salt = _mix64(np.array([seed * 1_000_003 + stream], dtype=np.uint64))[0]
        x = _mix64(h ^ salt)
    return ((x >> np.uint64(11)).astype(np.float64) + 0.5) / float(2 ** 53)


# --------------------------------------------------------------------------------------------
# segments and features


def _lookup(codes: pd.Series, names: dict[int, str], other) -> np.ndarray:
    """Vectorised code -> name; null is "unknown", unlisted codes go through ``other``."""
    x = pd.to_numeric(codes, errors="coerce").to_numpy(dtype="float64", na_value=np.nan)
    out = np.full(len(x), "unknown", dtype=object)
    known = np.isfinite(x)
    for code in np.unique(x[known]).astype(np.int64):
        out[x == code] = names.get(int(code), other(int(code)))
    return out


def segments(trips: pd.DataFrame) -> pd.DataFrame:
    """Low-cardinality slices: pickup borough, vendor, time of day, rate code.

    Payment type is deliberately absent: tips are recorded for card trips only, so slicing by
    payment would leak the label.
    """
    vendor = _lookup(trips["VendorID"], tlc.VENDORS, other=lambda code: str(code))
    hour = trips["tpep_pickup_datetime"].dt.hour.to_numpy()
    edges = np.array([h for h, _ in TIME_OF_DAY])
    names = np.array([name for _, name in TIME_OF_DAY], dtype=object)
    rate = _lookup(trips["RatecodeID"], tlc.RATE_CODES, other=lambda code: "unknown")
    return pd.DataFrame({
        "pickup_borough": zones.borough_of(trips["PULocationID"]).to_numpy(),
        "vendor": vendor,
        "time_of_day": names[np.searchsorted(edges, hour, side="right") - 1],
        "rate_code": rate,
    }, index=trips.index)


def prediction_frame(scored: pd.DataFrame) -> pd.DataFrame:
    """One row per scored trip: id, ts (pickup, UTC), score, label, segments, features.

    ``scored`` is the output of ``pipeline.score_trips``.  Also carries ``dropoff_ts`` (UTC)
    and ``payment_type`` for the feedback step; those are not written as predictions.
    """
    h1, h2 = trip_hashes(scored)
    minutes = (scored["tpep_dropoff_datetime"] - scored["tpep_pickup_datetime"]
               ).dt.total_seconds() / 60
    frame = pd.DataFrame({
        "id": trip_ids(scored),
        "ts": to_utc(scored["tpep_pickup_datetime"]).astype("datetime64[us, UTC]"),
        "dropoff_ts": to_utc(scored["tpep_dropoff_datetime"]).astype("datetime64[us, UTC]"),
        "score": scored["score"].astype(float),
        "label": scored["label"].astype(int),
        "payment_type": scored["payment_type"],
        "_h1": h1,
        "_h2": h2,
    }, index=scored.index)
    frame = frame.join(segments(scored))
    for name in pipeline.FEATURES:
        frame[name] = scored[name].astype(float)
    frame["fare_amount"] = scored["fare_amount"].astype(float)
    frame["trip_minutes"] = minutes.round(2)
    order = np.lexsort((h1, _epoch_us(frame["ts"])))  # by time, then id hash
    return frame.iloc[order].reset_index(drop=True)


# --------------------------------------------------------------------------------------------
# feedback


@dataclass(frozen=True)
class Delay:
    """How long after drop-off the label becomes known.

    ``dist``: ``lognormal`` (median, sigma), ``exponential`` (given by its median), ``fixed``
    (always the median) or ``none`` (at drop-off).  Minutes.
    """

    dist: str = "lognormal"
    median_minutes: float = 30.0
    sigma: float = 1.0

    def sample(self, u1: np.ndarray, u2: np.ndarray) -> np.ndarray:
        """Delays in minutes from two independent uniforms per trip."""
        m = self.median_minutes
        if self.dist == "none" or m <= 0:
            return np.zeros(len(u1))
        if self.dist == "fixed":
            return np.full(len(u1), float(m))
        if self.dist == "exponential":
            return -np.log(u1) * m / math.log(2)
        if self.dist == "lognormal":
            z = np.sqrt(-2 * np.log(u1)) * np.cos(2 * np.pi * u2)  # Box-Muller
            return m * np.exp(self.sigma * z)
        raise ValueError(f"unknown delay distribution {self.dist!r}")


@dataclass(frozen=True)
class FeedbackPolicy:
    """Which labels arrive, and when.

    ``cash="label"`` (the essay's semantics) sends a cash trip's recorded tip of 0 as label 0;
    ``cash="none"`` treats a cash tip as unknown and sends no feedback for cash trips
    (``payment_type`` 2; null-vendor rows have no payment type and keep their feedback).
    ``missing`` is the share of feedback that never arrives, drawn per trip.
    """

    cash: str = "label"
    missing: float = 0.03
    delay: Delay = field(default_factory=Delay)
    seed: int = 0

    def __post_init__(self):
        if self.cash not in ("label", "none"):
            raise ValueError("cash must be 'label' or 'none'")
        if not 0 <= self.missing <= 1:
            raise ValueError("missing must be within [0, 1]")


def feedback_frame(preds: pd.DataFrame, policy: FeedbackPolicy) -> pd.DataFrame:
    """Feedback rows (id, ts, label) for a ``prediction_frame``, sorted by arrival time."""
    h1, h2 = preds["_h1"].to_numpy(np.uint64), preds["_h2"].to_numpy(np.uint64)
    arrives = _uniform(h1, policy.seed, 1) >= policy.missing
    if policy.cash == "none":
        arrives &= ~(preds["payment_type"] == tlc.CASH).to_numpy(dtype=bool)
    delay = policy.delay.sample(_uniform(h2, policy.seed, 2), _uniform(h1, policy.seed, 3))
    # microseconds since the epoch; a few rows end before they start: known at the pickup then
    known = np.maximum(_epoch_us(preds["dropoff_ts"]), _epoch_us(preds["ts"]))
    ts_us = known + np.round(delay * 60e6).astype(np.int64)
    order = np.lexsort((h1[arrives], ts_us[arrives]))
    return pd.DataFrame({
        "id": preds["id"].to_numpy()[arrives][order],
        "ts": pd.to_datetime(ts_us[arrives][order], unit="us", utc=True),
        "label": preds["label"].to_numpy()[arrives][order],
    })


# --------------------------------------------------------------------------------------------
# records


def prediction_records(frame: pd.DataFrame) -> Iterator[dict]:
    """Client records for predictions (dicts as ``Client.write_predictions`` takes them).

    Feature values are floats; the store reads NaN as missing.
    """
    if not len(frame):
        return
    ts = frame["ts"].dt.to_pydatetime()
    seg_rows = zip(*(frame[c].tolist() for c in SEGMENTS), strict=True)
    feat_rows = zip(*(frame[c].astype("float64").tolist() for c in FEATURE_NAMES), strict=True)
    for id_, t, s, seg, feat in zip(frame["id"].tolist(), ts, frame["score"].tolist(), seg_rows,
                                    feat_rows, strict=True):
        yield {"id": id_, "ts": t, "score": s, "segments": dict(zip(SEGMENTS, seg, strict=True)),
               "features": dict(zip(FEATURE_NAMES, feat, strict=True))}


def feedback_records(frame: pd.DataFrame) -> Iterator[dict]:
    """Client records for feedback (``Client.write_feedback``)."""
    ts = frame["ts"].dt.to_pydatetime() if len(frame) else []
    for id_, t, y in zip(frame["id"].tolist(), ts, frame["label"].tolist(), strict=True):
        yield {"id": id_, "ts": t, "label": int(y)}


def _batches(items: Iterable[dict], size: int) -> Iterator[list[dict]]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


# --------------------------------------------------------------------------------------------
# months


@dataclass
class MonthInput:
    """A month to replay: its first day (New York) and how to load its trips."""

    year: int
    month: int
    load: Callable[[], pd.DataFrame]

    @property
    def start(self) -> pd.Timestamp:
        return pd.Timestamp(self.year, self.month, 1)

    @property
    def end(self) -> pd.Timestamp:
        return self.start + pd.offsets.MonthBegin(1)

    @property
    def label(self) -> str:
        return f"{self.year}-{self.month:02d}"


@dataclass
class PreparedMonth:
    """A month's predictions and feedback, ready to write."""

    month: str
    scored: int
    predictions: pd.DataFrame
    feedback: pd.DataFrame


def prepare_month(trained: pipeline.TrainedModel, month: MonthInput, policy: FeedbackPolicy,
                  start: pd.Timestamp, until: pd.Timestamp) -> PreparedMonth:
    """Clean and score a month (drop-off window = the month), keep pickups in [start, until)."""
    scored = pipeline.score_trips(trained, month.load(), month.start, month.end)
    preds = prediction_frame(scored)
    preds = preds[(preds["ts"] >= start) & (preds["ts"] < until)].reset_index(drop=True)
    return PreparedMonth(month.label, len(scored), preds, feedback_frame(preds, policy))


# --------------------------------------------------------------------------------------------
# summary


@dataclass
class MonthStats:
    month: str
    predictions: int = 0
    feedback: int = 0
    accuracy: float = float("nan")
    label_rate: float = float("nan")
    mean_score: float = float("nan")
    #: arrival times (epoch us, sorted) of the feedback due for this month's predictions:
    #: a live replay's coverage is the share of them that arrived before it stopped
    feedback_due: np.ndarray | None = None
    labeled: int | None = None  # predictions of the month whose feedback was written

    @property
    def coverage(self) -> float:
        """Labeled share of the month's predictions (NaN for a month without predictions)."""
        if not self.predictions:
            return float("nan")
        return (self.feedback if self.labeled is None else self.labeled) / self.predictions


@dataclass
class Summary:
    """What a replay wrote, and how the model did per month."""

    mode: str
    months: list[MonthStats] = field(default_factory=list)
    predictions_written: int = 0
    feedback_written: int = 0
    seconds: float = 0.0
    first_ts: pd.Timestamp | None = None
    last_ts: pd.Timestamp | None = None
    skipped: list[str] = field(default_factory=list)  # months already stored (backfill)

    @property
    def rows(self) -> int:
        return self.predictions_written + self.feedback_written

    def add_month(self, prepared: PreparedMonth, threshold: float) -> MonthStats:
        p = prepared.predictions
        stats = MonthStats(prepared.month, len(p))
        if len(p):
            stats.accuracy = float(((p["score"] >= threshold).astype(int) == p["label"]).mean())
            stats.label_rate = float(p["label"].mean())
            stats.mean_score = float(p["score"].mean())
        self.months.append(stats)
        return stats

    def format(self) -> str:
        lines = [f"{'month':8} {'predictions':>11} {'feedback':>9} {'coverage':>8} "
                 f"{'accuracy':>8} {'label_rate':>10} {'mean_score':>10}"] if self.months else []
        for m in self.months:
            # live counts feedback when it is written (re-sent overlaps included), coverage by
            # the month's own predictions
            lines.append(f"{m.month:8} {m.predictions:11d} {m.feedback:9d} {m.coverage:8.3f} "
                         f"{m.accuracy:8.3f} {m.label_rate:10.3f} {m.mean_score:10.3f}")
        rate = self.rows / self.seconds if self.seconds > 0 else float("inf")
        if self.skipped:
            lines.append(f"{self.mode}: skipped {', '.join(self.skipped)}, already in the store "
                         "(up to its latest prediction; --rewrite writes them again)")
        lines.append(f"{self.mode}: wrote {self.predictions_written:,} predictions and "
                     f"{self.feedback_written:,} feedback rows ({self.rows:,} rows) in "
                     f"{self.seconds:.1f} s, {rate:,.0f} rows/s")
        return "\n".join(lines)


def _write(fn, model: str, records: Iterable[dict], batch_size: int, on_batch=None) -> int:
    written = 0
    for batch in _batches(records, batch_size):
        n = fn(model, batch) if fn is not None else len(batch)
        written += int(n if n is not None else len(batch))
        if on_batch:
            on_batch(len(batch))
    return written


# --------------------------------------------------------------------------------------------
# backfill


def backfill(client, trained: pipeline.TrainedModel, months: Iterable[MonthInput], *,
             start: pd.Timestamp, until: pd.Timestamp, policy: FeedbackPolicy,
             model_name: str = MODEL_NAME, batch_size: int = 20_000,
             progress: bool = True, resume: pd.Timestamp | None = None) -> Summary:
    """Write every prediction in [start, until) and the feedback that arrived before ``until``.

    ``client`` may be None (dry run): records are built and counted but not written.

    ``resume``: the model's latest stored prediction, so that a second run does not write the
    same months again. A backfill writes month by month, each month's predictions in time
    order and then its feedback, so a month whose last prediction is before ``resume`` is
    complete and skipped; the month holding ``resume`` writes its predictions from ``resume``
    on and all its feedback (upserts make the overlap free).
    """
    from tqdm import tqdm

    summary = Summary("backfill")
    t0 = time.perf_counter()
    write_p = client.write_predictions if client is not None else None
    write_f = client.write_feedback if client is not None else None
    bar = tqdm(total=0, unit="rows", disable=not progress, dynamic_ncols=True)
    try:
        for month in months:
            if month.end <= start.tz_convert(NEW_YORK).tz_localize(None) - pd.Timedelta(days=1):
                continue
            if month.start >= until.tz_convert(NEW_YORK).tz_localize(None):
                break
            bar.set_description(month.label)
            prepared = prepare_month(trained, month, policy, start, until)
            preds = prepared.predictions
            if resume is not None and len(preds):
                if preds["ts"].iloc[-1] < resume:
                    summary.skipped.append(month.label)
                    continue
                # all of the month's predictions are in when its last one is (one transaction
                # per batch, batches in time order); its feedback may not be: written again
                last_in = preds["ts"].iloc[-1] == resume
                preds = preds.iloc[:0] if last_in else preds[preds["ts"] >= resume]
            fb = prepared.feedback[prepared.feedback["ts"] < until]
            bar.total += len(preds) + len(fb)
            bar.refresh()
            stats = summary.add_month(prepared, trained.decision_threshold)
            summary.predictions_written += _write(
                write_p, model_name, prediction_records(preds), batch_size, bar.update)
            n_fb = _write(write_f, model_name, feedback_records(fb), batch_size, bar.update)
            summary.feedback_written += n_fb
            stats.feedback = len(fb)
            _span(summary, prepared.predictions)
    finally:
        bar.close()
    summary.seconds = time.perf_counter() - t0
    return summary


def _span(summary: Summary, preds: pd.DataFrame) -> None:
    if len(preds):
        first, last = preds["ts"].iloc[0], preds["ts"].iloc[-1]
        summary.first_ts = first if summary.first_ts is None else min(summary.first_ts, first)
        summary.last_ts = last if summary.last_ts is None else max(summary.last_ts, last)


# --------------------------------------------------------------------------------------------
# live


STEP = pd.Timedelta(hours=6)  # live writes advance at most this much data time at once
FEEDBACK_RESEND = 2 * STEP


def live(client, trained: pipeline.TrainedModel, months: Iterable[MonthInput], *,
         start: pd.Timestamp, until: pd.Timestamp, policy: FeedbackPolicy, speed: float = 3600.0,
         tick: float = 1.0, model_name: str = MODEL_NAME, batch_size: int = 20_000,
         clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
         log: Callable[[str], None] = print, log_every: float = 10.0) -> Summary:
    """Replay with data time advancing ``speed`` data-seconds per wall-second, up to ``until``.

    Every ``tick`` seconds the data clock is read and the events up to it are written in steps
    of at most ``STEP`` of data time: the step's predictions, then its feedback.

    Resume: the data clock starts at the model's latest prediction in the store (asked through
    ``client.latest_prediction_ts``), or at ``start`` on an empty store.  Predictions from that
    instant are (re)sent, and feedback from ``FEEDBACK_RESEND`` earlier, including feedback of
    trips picked up before it (an earlier backfill or run wrote their predictions).  A crash
    between a step's two writes thus loses nothing, and upserts make the overlap free.
    ``clock`` and ``sleep`` are injectable for tests.
    """
    summary = Summary("live")
    resume = client.latest_prediction_ts(model_name) if client is not None else None
    t_data, fb_from, prep_from = start, start, start
    if resume is not None:
        t_data = max(start, pd.Timestamp(resume).tz_convert("UTC"))
        fb_from = t_data - FEEDBACK_RESEND
        # trips picked up this long before fb_from may still have feedback due after it
        prep_from = fb_from - pd.Timedelta(days=2) - pd.Timedelta(
            minutes=20 * policy.delay.median_minutes)
        log(f"resuming {model_name} at {t_data.isoformat()} (latest prediction in the store)")
    if t_data >= until:
        log(f"nothing to do: the store already holds predictions up to {until.isoformat()}")
        return summary
    write_p = client.write_predictions if client is not None else None
    write_f = client.write_feedback if client is not None else None
    wall0, perf0 = clock(), time.perf_counter()
    last_log = wall0
    state = {"done": t_data - pd.Timedelta(microseconds=1)}  # events up to here are written

    def now() -> pd.Timestamp:
        t = t_data + pd.Timedelta(seconds=(clock() - wall0) * speed)
        return min(until - pd.Timedelta(microseconds=1), t).floor("us").as_unit("us")

    def advance(preds, ip, fb, stats, target):
        """Write predictions and feedback up to ``target`` (inclusive), STEP by STEP."""
        while state["done"] < target:
            cut = min(target, state["done"] + STEP)
            jp = int(preds["ts"].searchsorted(cut, side="right"))
            if jp > ip:
                chunk = preds.iloc[ip:jp]
                summary.predictions_written += _write(write_p, model_name,
                                                      prediction_records(chunk), batch_size)
                _span(summary, chunk)
                ip = jp
            jf = int(fb["ts"].searchsorted(cut, side="right"))
            if jf:
                summary.feedback_written += _write(write_f, model_name,
                                                   feedback_records(fb.iloc[:jf]), batch_size)
                if stats is not None:
                    stats.feedback += jf
                fb = fb.iloc[jf:]
            state["done"] = cut
        return ip, fb

    pending = pd.DataFrame({"id": pd.Series(dtype=object),
                            "ts": pd.Series(dtype="datetime64[us, UTC]"),
                            "label": pd.Series(dtype="int64")})
    carry = None  # predictions a month could not write before its end (clock glitches)
    local_from = prep_from.tz_convert(NEW_YORK).tz_localize(None)
    local_until = until.tz_convert(NEW_YORK).tz_localize(None)
    stats = None

    def run_until(preds, stats, cap):
        """Follow the data clock up to ``cap``; returns the unwritten predictions."""
        nonlocal pending, last_log
        ip = 0
        while True:
            target = min(now(), cap)
            ip, pending = advance(preds, ip, pending, stats, target)
            if clock() - last_log >= log_every:
                last_log = clock()
                log(f"data time {target.tz_convert(NEW_YORK):%Y-%m-%d %H:%M} New York: "
                    f"{summary.predictions_written:,} predictions, "
                    f"{summary.feedback_written:,} feedback written")
            if target >= cap:
                return preds.iloc[ip:]
            sleep(tick)

    for month in months:
        if month.end <= local_from:
            continue
        if month.start >= local_until:
            break
        prepared = prepare_month(trained, month, policy, prep_from, until)
        preds = prepared.predictions[prepared.predictions["ts"] >= t_data]
        if carry is not None and len(carry):
            preds = pd.concat([carry, preds]).sort_values(["ts", "id"], kind="stable")
        preds = preds.reset_index(drop=True)
        fb = pd.concat([pending, prepared.feedback[prepared.feedback["ts"] >= fb_from]],
                       ignore_index=True).sort_values(["ts", "id"], kind="stable")
        pending = fb[fb["ts"] < until].reset_index(drop=True)
        if len(preds):
            stats = summary.add_month(PreparedMonth(prepared.month, prepared.scored, preds,
                                                    pending), trained.decision_threshold)
            own = prepared.feedback[prepared.feedback["id"].isin(preds["id"])]
            stats.feedback_due = np.sort(_epoch_us(own["ts"]))
        # the next month's file holds the trips picked up from this month's end on
        cap = min(until, parse_time(month.end)) - pd.Timedelta(microseconds=1)
        carry = run_until(preds, stats, cap)
    # what is left: feedback arriving after the last month's trips, up to `until`
    if carry is None:
        carry = pd.DataFrame(columns=["ts"]).astype({"ts": "datetime64[us, UTC]"})
    if len(pending) or len(carry):
        run_until(carry, stats, until - pd.Timedelta(microseconds=1))
    done_us = state["done"].value // 1000
    for m in summary.months:  # feedback written by the end: everything due up to "done"
        if m.feedback_due is not None:
            m.labeled = int(np.searchsorted(m.feedback_due, done_us, side="right"))
    summary.seconds = time.perf_counter() - perf0
    return summary


def ensure_registered(client, trained: pipeline.TrainedModel, model_name: str) -> None:
    """Register the model (idempotent on the store side) with its decision threshold."""
    test = trained.meta.get("metrics", {}).get("test", {})
    client.register_model(
        model_name, task="binary_classification", threshold=trained.decision_threshold,
        description=(f"NYC taxi high tip (tip > {trained.label_threshold:.0%} of fare), "
                     f"RandomForest depth 4 x 10 trees; test accuracy "
                     f"{test.get('accuracy', float('nan')):.3f}"))


def reference_columns(trips: pd.DataFrame, trained: pipeline.TrainedModel,
                      max_rows: int = 50_000, seed: int = 0) -> dict[str, list]:
    """The training rows' scores, labels, features and segments, as the store's reference (drift,
    and the calibration of the label-free estimates).

    Rebuilds the training split (clean, first 80% by pickup time) from the training month's
    trips; a seeded sample of ``max_rows`` keeps the payload small at full scale.
    """
    window = trained.meta["train_window"]
    data = pipeline.clean(trips, window["start"], window["end"])
    data = data.sort_values("tpep_pickup_datetime", kind="stable")
    data = data.iloc[:int(len(data) * pipeline.TRAIN_FRACTION)]
    if len(data) > max_rows:
        keep = np.sort(np.random.default_rng(seed).choice(len(data), max_rows, replace=False))
        data = data.iloc[keep]
    x = pipeline.featurize(data)
    minutes = (data["tpep_dropoff_datetime"] - data["tpep_pickup_datetime"]).dt.total_seconds()
    # score with its label: the labeled reference CBPE's isotonic calibrator is fitted on
    cols = {"score": pipeline.score(trained.model, x).tolist(),
            "label": pipeline.label(data, trained.label_threshold).astype(float).tolist()}
    cols.update({name: x[name].tolist() for name in pipeline.FEATURES})
    cols["fare_amount"] = data["fare_amount"].astype(float).tolist()
    cols["trip_minutes"] = (minutes / 60).round(2).tolist()
    seg = segments(data)
    cols.update({name: seg[name].tolist() for name in SEGMENTS})
    return cols


def record_training(client, trained: pipeline.TrainedModel, model_name: str,
                    reference: dict[str, list] | None = None) -> None:
    """Record the training run as a model event spanning the training window (an annotation),
    and the training data's features and segments as the drift reference ``training``."""
    if reference:
        client.set_reference(model_name, reference, name="training")
    window = trained.meta["train_window"]
    start, end = parse_time(window["start"]), parse_time(window["end"])
    test, train = trained.meta["metrics"]["test"], trained.meta["metrics"]["train"]
    month = pd.Timestamp(window["start"]).strftime("%Y-%m")
    top = sorted(trained.meta["feature_importances"].items(), key=lambda kv: -kv[1])[:3]
    client.add_event(
        model_name, start.to_pydatetime(),
        title=f"Trained on {month}",
        text=(f"train acc={train['accuracy']:.3f} f1={train['f1']:.3f}; "
              f"test acc={test['accuracy']:.3f} f1={test['f1']:.3f} (n={test['n']}); "
              f"features={','.join(trained.features)}; top importances="
              + ", ".join(f"{k} {v:.2f}" for k, v in top)),
        tags=["training"], time_end=end.to_pydatetime(), kind="training")
