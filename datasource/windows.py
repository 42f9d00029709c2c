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
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np

UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
WINDOW_CHOICES = ("5m", "15m", "1h", "6h", "1d", "7d", "cumulative")
MODES = ("sliding", "tumbling")
DEFAULT_WINDOW = "1h"
MAX_WINDOW_S = 366 * 86400
# Steps the server widens to when Grafana's interval would exceed maxDataPoints.
NICE_STEPS_S = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600,
                43200, 86400, 172800, 604800)
MAX_POINTS_WITHOUT_LIMIT = 100_000
MAX_GRID_BUCKETS = 5_000_000

_WINDOW_RE = re.compile(r"^\s*(\d+)\s*([smhdw])\s*$")


class WindowError(ValueError):
    """A window, mode, range or step the server cannot honour; the message says why."""


@dataclass(frozen=True)
class Window:
    """``seconds`` is None for cumulative windows."""

    text: str
    seconds: int | None

    @property
    def cumulative(self) -> bool:
        return self.seconds is None


def parse_window(text: object) -> Window:
    if text is None or text == "":
        text = DEFAULT_WINDOW
    if not isinstance(text, str):
        raise WindowError("window must be a string such as '5m', '1h', '7d' or 'cumulative'")
    if text.strip().lower() == "cumulative":
        return Window("cumulative", None)
    m = _WINDOW_RE.match(text)
    if not m:
        raise WindowError(f"window {text[:40]!r} is not of the form <number><s|m|h|d|w> or 'cumulative'")
    seconds = int(m.group(1)) * UNITS[m.group(2)]
    if seconds <= 0:
        raise WindowError("window must be longer than 0")
    if seconds > MAX_WINDOW_S:
        raise WindowError("window must be at most 366 days (use 'cumulative' for longer)")
    return Window(f"{m.group(1)}{m.group(2)}", seconds)


def parse_mode(text: object) -> str:
    if text is None or text == "":
        return "sliding"
    if text not in MODES:
        raise WindowError(f"mode must be one of {', '.join(MODES)}")
    return text


def parse_time(value: object, field: str) -> float:
    """Grafana range bounds: ISO-8601 strings (UTC) or epoch milliseconds -> epoch seconds."""
    try:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value) / 1000.0
        if isinstance(value, str):
            ts = datetime.fromisoformat(value.strip())
            if ts.tzinfo is None:
                ts = ts.replace(tzinfo=UTC)
            return ts.timestamp()
    except (ValueError, OverflowError):
        pass
    raise WindowError(f"range.{field} must be an ISO-8601 time or epoch milliseconds")


def choose_step(from_s: float, to_s: float, interval_ms: object, max_points: object) -> int:
    """The step in whole seconds: Grafana's interval rounded up to a nice step, widened so that at
    most maxDataPoints fit."""
    if to_s < from_s:
        raise WindowError("range.from is after range.to")
    try:
        step = max(1, math.ceil(float(interval_ms) / 1000.0)) if interval_ms else 60
    except (TypeError, ValueError):
        raise WindowError("intervalMs must be a number") from None
    # Snap to a nice step: windows (5m, 1h, 1d…) are then whole numbers of buckets of
    # gcd(window, step), instead of millions of 1-second buckets for a step such as 13133 s.
    step = next((n for n in NICE_STEPS_S if n >= step), math.ceil(step / 86400) * 86400)
    span = to_s - from_s
    if max_points in (None, ""):
        if n_points(from_s, to_s, step) > MAX_POINTS_WITHOUT_LIMIT:
            raise WindowError(
                f"{n_points(from_s, to_s, step)} points at a {step}s step exceed "
                f"{MAX_POINTS_WITHOUT_LIMIT}; widen intervalMs or send maxDataPoints")
        return step
    try:
        limit = int(max_points)
    except (TypeError, ValueError):
        raise WindowError("maxDataPoints must be a whole number") from None
    if limit < 1:
        raise WindowError("maxDataPoints must be at least 1")
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
    """Epoch-aligned multiples of ``step`` within [from, to] (int64 seconds)."""
    first = math.ceil(from_s / step) * step
    last = math.floor(to_s / step) * step
    if last < first:
        return np.empty(0, dtype=np.int64)
    return np.arange(first, last + step, step, dtype=np.int64)


def bucket_width(window: Window, step: int, mode: str) -> int:
    """The widest bucket g such that every window is a union of whole g-buckets."""
    if window.cumulative or mode == "tumbling":
        return step
    return math.gcd(window.seconds, step)


def span_of(window: Window, step: int, mode: str) -> int | None:
    """Width of each point's window in seconds (None: cumulative)."""
    if window.cumulative:
        return None
    return step if mode == "tumbling" else window.seconds
