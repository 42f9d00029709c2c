"""The window grammar and the time grid shared by the server, dashboards and docs.

A window is ``<n><unit>`` (units ``s``, ``m``, ``h``, ``d``, ``w``: ``5m``, ``1h``,
``7d``) or ``cumulative``. The point at time t of a sliding window of width W
covers predictions with timestamp in (t - W, t]; tumbling windows use W = step;
cumulative ones cover (-inf, t]. Points lie on multiples of the step since the
Unix epoch, so the same panel gives the same numbers whenever it is drawn.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

import numpy as np

UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
WINDOW_CHOICES = ("5m", "15m", "1h", "6h", "1d", "7d", "cumulative")
MODES = ("sliding", "tumbling")
DEFAULT_WINDOW = "1h"
MAX_WINDOW_S = 366 * 86400
# Steps the server widens to when Grafana's interval would exceed maxDataPoints.
NICE_STEPS_S = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600,
                43200, 86400, 172800, 604800)
# Cost limits, checked arithmetically before any array is allocated (a 10-year range at a
# 1 s step would otherwise build a 315M-point grid: 9 GB in one worker).
MAX_POINTS = 11_000  # points per series, as Grafana caps maxDataPoints; a larger one is clamped
MAX_POINTS_WITHOUT_LIMIT = MAX_POINTS  # without maxDataPoints: a 400 past this, never a wider step
MAX_DATA_POINTS_ACCEPTED = 10**9  # a maxDataPoints beyond any screen is a client bug: 400
MAX_GRID_BUCKETS = 5_000_000  # buckets of gcd(window, step) per series (partial metrics)
MAX_TARGETS = 50  # targets per request
MAX_POINTS_PER_REQUEST = 2_000_000  # points x series x targets of one request
MAX_STEP_S = 3660 * 86400  # an intervalMs beyond ten years is not a step

_WINDOW_RE = re.compile(r"^\s*(\d+)\s*([smhdw])\s*$")


class WindowError(ValueError):
    """A window, mode, range or step the server cannot honour; the message says why."""


SLIDING, TUMBLING, CUMULATIVE = "sliding", "tumbling", "cumulative"


@dataclass(frozen=True)
class Window:
    """What the point at time t covers: ``sliding`` (t - W, t], ``tumbling`` (t - step, t]
    (windows do not overlap), ``cumulative`` (-inf, t]. A new kind (count-based, say) is a
    new ``kind`` with its own ``width`` and ``bucket`` here.

    ``seconds`` is the width as written (None for cumulative, which has none).
    """

    text: str
    seconds: int | None
    kind: str = SLIDING

    @property
    def cumulative(self) -> bool:
        return self.kind == CUMULATIVE

    @property
    def mode(self) -> str:
        """The dashboards' Mode dropdown value (cumulative windows take any)."""
        return TUMBLING if self.kind == TUMBLING else SLIDING

    def width(self, step: int) -> int:
        """Seconds each point's window covers (bounded kinds only: check ``cumulative`` first)."""
        if self.cumulative:
            raise ValueError("a cumulative window has no width")
        return step if self.kind == TUMBLING else self.seconds

    def bucket(self, step: int) -> int:
        """The widest bucket g such that every point's window is a union of whole g-buckets."""
        if self.kind == SLIDING:
            return math.gcd(self.seconds, step)
        return step

    def earliest(self, first_point: int, step: int) -> int | None:
        """The lower bound (exclusive) of the rows the windows of points from ``first_point``
        read; None for cumulative windows, which read from the model's first prediction."""
        return None if self.cumulative else int(first_point) - self.width(step)

    def slices(self, ts: np.ndarray, points: np.ndarray, step: int) -> tuple[np.ndarray, np.ndarray]:
        """For time-sorted row times ``ts``, each point's window as index bounds [lo, hi)."""
        hi = np.searchsorted(ts, points, side="right")
        if self.cumulative:
            return np.zeros(len(points), dtype=np.int64), hi
        return np.searchsorted(ts, points - self.width(step), side="right"), hi

    def grid_start(self, first_point: int, step: int) -> int:
        """Where a dense bucket grid for points from ``first_point`` starts: the first window's
        lower bound, or one step before the first point for cumulative windows (whose earlier
        sum comes from one prefix bucket)."""
        return int(first_point) - (step if self.cumulative else self.width(step))


def parse_window(text: object, mode: object = None) -> Window:
    """``5m``, ``1h``… or ``cumulative``, with the mode (``sliding`` default, ``tumbling``)."""
    kind = parse_mode(mode)
    if text is None or text == "":
        text = DEFAULT_WINDOW
    if not isinstance(text, str):
        raise WindowError("window must be a string such as '5m', '1h', '7d' or 'cumulative'")
    if text.strip().lower() == "cumulative":
        return Window("cumulative", None, CUMULATIVE)
    m = _WINDOW_RE.match(text)
    if not m:
        raise WindowError(f"window {text[:40]!r} is not of the form <number><s|m|h|d|w> or 'cumulative'")
    seconds = int(m.group(1)) * UNITS[m.group(2)]
    if seconds <= 0:
        raise WindowError("window must be longer than 0")
    if seconds > MAX_WINDOW_S:
        raise WindowError("window must be at most 366 days (use 'cumulative' for longer)")
    return Window(f"{m.group(1)}{m.group(2)}", seconds, kind)


def parse_mode(text: object) -> str:
    if text is None or text == "":
        return SLIDING
    if text not in MODES:
        raise WindowError(f"mode must be one of {', '.join(MODES)}")
    return text


def parse_time(value: object, field: str) -> float:
    """Range bounds as epoch seconds, by the one time parser of the project
    (``records.parse_ts``: ISO-8601, naive meaning UTC, or epoch milliseconds; finite, between
    1900 and 2200, so nothing reaches the grid arithmetic as nan/inf or overflows)."""
    from datasource.records import parse_ts

    try:
        return parse_ts(value).timestamp()
    except ValueError as e:
        if "1900" in str(e) or "finite" in str(e):
            raise WindowError(f"range.{field} must be a finite time between 1900 and 2200") from None
        raise WindowError(f"range.{field} must be an ISO-8601 time or epoch milliseconds") from None


def _interval_s(interval_ms: object) -> int:
    """Grafana's intervalMs as whole seconds (60 when absent); 400 for nan/inf/absurd values."""
    if interval_ms in (None, "", 0):
        return 60
    if isinstance(interval_ms, bool):
        raise WindowError("intervalMs must be a number")
    try:
        ms = float(interval_ms)
    except (TypeError, ValueError, OverflowError):
        raise WindowError("intervalMs must be a number") from None
    if not math.isfinite(ms) or ms > MAX_STEP_S * 1000.0:
        raise WindowError(f"intervalMs must be a finite number of at most {MAX_STEP_S * 1000}")
    return max(1, math.ceil(ms / 1000.0))


def _max_points(max_points: object) -> int | None:
    """maxDataPoints as a whole number, clamped to MAX_POINTS (None when absent)."""
    if max_points in (None, ""):
        return None
    if isinstance(max_points, bool):
        raise WindowError("maxDataPoints must be a whole number")
    try:
        value = float(max_points)
    except (TypeError, ValueError, OverflowError):
        raise WindowError("maxDataPoints must be a whole number") from None
    if not math.isfinite(value) or value != int(value):
        raise WindowError("maxDataPoints must be a whole number")
    if value < 1:
        raise WindowError("maxDataPoints must be at least 1")
    if value > MAX_DATA_POINTS_ACCEPTED:
        raise WindowError(f"maxDataPoints must be at most {MAX_DATA_POINTS_ACCEPTED}")
    return min(int(value), MAX_POINTS)


def choose_step(from_s: float, to_s: float, interval_ms: object, max_points: object) -> int:
    """The step in whole seconds: Grafana's interval rounded up to a nice step, widened so that at
    most maxDataPoints fit."""
    if not (math.isfinite(from_s) and math.isfinite(to_s)):
        raise WindowError("range.from and range.to must be finite")
    if to_s < from_s:
        raise WindowError("range.from is after range.to")
    step = _interval_s(interval_ms)
    # Snap to a nice step: windows (5m, 1h, 1d…) are then whole numbers of buckets of
    # gcd(window, step), instead of millions of 1-second buckets for a step such as 13133 s.
    step = next((n for n in NICE_STEPS_S if n >= step), math.ceil(step / 86400) * 86400)
    span = to_s - from_s
    limit = _max_points(max_points)
    if limit is None:
        if n_points(from_s, to_s, step) > MAX_POINTS_WITHOUT_LIMIT:
            raise WindowError(
                f"{n_points(from_s, to_s, step)} points at a {step}s step exceed "
                f"{MAX_POINTS_WITHOUT_LIMIT}; widen intervalMs or send maxDataPoints")
        return step
    if n_points(from_s, to_s, step) <= limit:
        return step
    needed = span / max(limit - 1, 1)
    for nice in NICE_STEPS_S:
        if nice >= needed and n_points(from_s, to_s, nice) <= limit:
            return nice
    days = max(1, math.ceil(needed / 86400.0))
    while n_points(from_s, to_s, days * 86400) > limit:
        days += 1
    return days * 86400


def n_points(from_s: float, to_s: float, step: int) -> int:
    """How many multiples of ``step`` lie in [from, to]."""
    return max(0, math.floor(to_s / step) - math.ceil(from_s / step) + 1)


def grid_points(from_s: float, to_s: float, step: int) -> np.ndarray:
    """Epoch-aligned multiples of ``step`` within [from, to] (int64 seconds).

    Refuses (WindowError) more than MAX_POINTS points, counted before allocating.
    """
    count = n_points(from_s, to_s, step)
    if count > MAX_POINTS:
        raise WindowError(f"{count} points at a {step}s step exceed {MAX_POINTS} per series; "
                          "widen intervalMs or lower maxDataPoints")
    first = math.ceil(from_s / step) * step
    last = math.floor(to_s / step) * step
    if last < first:
        return np.empty(0, dtype=np.int64)
    return np.arange(first, last + step, step, dtype=np.int64)


def grid_buckets(first_point: int, last_point: int, step: int, window: Window,
                 mode: str | None = None) -> int:
    """How many buckets of ``window.bucket(step)`` a partial metric lays on its dense grid."""
    if mode is not None and not window.cumulative:
        window = replace(window, kind=parse_mode(mode))
    return (int(last_point) - window.grid_start(first_point, step)) // window.bucket(step)


@dataclass(frozen=True)
class Cost:
    points: int  # per series
    buckets: int  # per series, partial metrics
    total_points: int  # points x series x targets


def check_cost(from_s: float, to_s: float, step: int, window: Window | None = None,
               mode: str | None = None, targets: int = 1, series_per_target: int = 1) -> Cost:
    """Refuse (WindowError) a request whose grid would be too large, before anything is allocated.

    ``series_per_target``: models x groups a target draws (``group_by`` draws up
    to engine.TOP_GROUPS + 1). Limits: MAX_TARGETS, MAX_POINTS per series,
    MAX_GRID_BUCKETS per series, MAX_POINTS_PER_REQUEST in all.
    """
    if targets > MAX_TARGETS:
        raise WindowError(f"{targets} targets exceed {MAX_TARGETS} per request")
    points = n_points(from_s, to_s, step)
    if points > MAX_POINTS:
        raise WindowError(f"{points} points at a {step}s step exceed {MAX_POINTS} per series; "
                          "widen intervalMs or lower maxDataPoints")
    buckets = 0
    if window is not None and points:
        first = math.ceil(from_s / step) * step
        last = math.floor(to_s / step) * step
        if mode is not None and not window.cumulative:
            window = replace(window, kind=parse_mode(mode))
        buckets = grid_buckets(first, last, step, window)
        if buckets > MAX_GRID_BUCKETS:
            g = window.bucket(step)
            raise WindowError(f"window {window.text} at a {step}s step needs {buckets} buckets of "
                              f"{g}s (at most {MAX_GRID_BUCKETS}); choose a window that is a "
                              "multiple of the step")
    total = points * max(targets, 1) * max(series_per_target, 1)
    if total > MAX_POINTS_PER_REQUEST:
        raise WindowError(f"{total} points in all exceed {MAX_POINTS_PER_REQUEST} per request; "
                          "fewer targets, a shorter range or a wider step")
    return Cost(points, buckets, total)
