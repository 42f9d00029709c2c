"""Read TLC yellow-taxi months (real or generated) into one normalised DataFrame shape.

A source is a local path or an http(s) URL to ``yellow_tripdata_YYYY-MM.parquet`` or ``.csv``
(optionally ``.csv.gz``), or a directory holding such files.  Whatever the origin, the result has
the official column names (aliases and case variants such as ``Airport_fee``, ``vendorid`` or
``pickup_location_id`` are renamed), naive New York local datetimes and float64 numbers, so the
pipeline never needs to know where the rows came from.  Null-vendor rows keep NaN codes; newer
codes (``payment_type`` 0 "flex fare", vendors 6 and 7) pass through unchanged.

URLs are downloaded once into a cache directory and read from there: the official files are
50-100 MB each and the replay may read a month several times.
"""

from __future__ import annotations

import re
import shutil
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from loader import tlc


class SourceError(ValueError):
    """A source cannot be used: unreadable, not found, or missing required columns."""


_MONTH_RE = re.compile(r"(\d{4})-(\d{2})\.(parquet|csv|csv\.gz)$")
_CANONICAL = {c.lower(): c for c in tlc.COLUMNS} | tlc.ALIASES


def canonical_name(column: str) -> str | None:
    """The official name for a column spelling, or None if the column is not used."""
    key = column.strip().lower()
    return _CANONICAL.get(key)


def month_of(name: str) -> tuple[int, int] | None:
    """(year, month) encoded in a TLC file name, e.g. ``..._2020-03.parquet`` -> (2020, 3)."""
    m = _MONTH_RE.search(name)
    return (int(m.group(1)), int(m.group(2))) if m else None


def is_url(source: str) -> bool:
    """True for http(s) URLs (s3 and others are not supported without extra packages)."""
    return str(source).startswith(("http://", "https://"))


def download(url: str, cache_dir: Path) -> Path:
    """Fetch ``url`` into ``cache_dir`` once; later calls reuse the file."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    target = cache_dir / url.rstrip("/").rsplit("/", 1)[-1]
    if target.exists() and target.stat().st_size > 0:
        return target
    tmp = target.with_name(target.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as out:
            shutil.copyfileobj(response, out, length=1 << 20)
    except OSError as exc:  # URLError and HTTPError are OSErrors
        tmp.unlink(missing_ok=True)
        raise SourceError(f"cannot download {url}: {exc}") from exc
    tmp.replace(target)
    return target


def _read_raw(path: Path) -> pd.DataFrame:
    """Read only the columns we use, under whatever spelling the file has."""
    name = path.name.lower()
    try:
        if name.endswith(".parquet"):
            names = pq.ParquetFile(path).schema_arrow.names
            wanted = [c for c in names if canonical_name(c)]
            return pq.read_table(path, columns=wanted).to_pandas()
        if name.endswith((".csv", ".csv.gz")):
            return pd.read_csv(path, usecols=lambda c: canonical_name(c) is not None,
                               low_memory=False)
    except FileNotFoundError as exc:
        raise SourceError(f"cannot read {path}: file not found") from exc
    except Exception as exc:  # pyarrow/pandas raise many types for corrupt files
        raise SourceError(f"cannot read {path}: {type(exc).__name__}: {exc}") from exc
    raise SourceError(f"cannot read {path}: expected a .parquet or .csv file")


def normalize(df: pd.DataFrame, origin: str = "<frame>") -> pd.DataFrame:
    """Official names and order, parsed datetimes, float64 numbers; raise on missing columns.

    ``origin`` only serves the error message.  Datetimes stay naive New York local time (the
    TLC convention); tz-aware input is converted to New York and made naive.
    """
    renamed = {}
    for col in df.columns:
        canon = canonical_name(str(col))
        if canon and canon not in renamed.values():
            renamed[col] = canon
    df = df[list(renamed)].rename(columns=renamed)
    missing = [c for c in tlc.REQUIRED if c not in df.columns]
    if missing:
        raise SourceError(
            f"{origin}: missing required column(s) {', '.join(missing)} "
            f"(found: {', '.join(map(str, df.columns)) or 'none'})")
    out = {}
    for col in tlc.COLUMNS:
        if col not in df.columns:
            out[col] = (pd.Series(np.nan, index=df.index) if col != "store_and_fwd_flag"
                        else pd.Series(None, index=df.index, dtype=object))
        elif col in tlc.DATETIME_COLUMNS:
            out[col] = _to_local_naive(df[col], origin, col)
        elif col == "store_and_fwd_flag":
            out[col] = df[col].astype(object).where(df[col].notna(), None)
        else:
            # numeric(…) from Postgres arrives as Decimal; strings or nulls as object
            out[col] = pd.to_numeric(df[col], errors="coerce").astype("float64")
    return pd.DataFrame(out, index=df.index).reset_index(drop=True)


def _to_local_naive(s: pd.Series, origin: str, col: str) -> pd.Series:
    if not pd.api.types.is_datetime64_any_dtype(s):
        try:  # the official CSV format first: parsing with a fixed format is much faster
            s = pd.to_datetime(s, format="%Y-%m-%d %H:%M:%S")
        except (ValueError, TypeError):
            try:
                s = pd.to_datetime(s, format="mixed")
            except (ValueError, TypeError) as exc:
                raise SourceError(f"{origin}: column {col} is not a datetime: {exc}") from exc
    if getattr(s.dt, "tz", None) is not None:
        s = s.dt.tz_convert("America/New_York").dt.tz_localize(None)
    return s.astype("datetime64[us]")


def read_trips(source: str | Path, cache_dir: Path | None = None) -> pd.DataFrame:
    """Read one TLC month from a path or URL and normalise it (see module docstring)."""
    source = str(source)
    if is_url(source):
        path = download(source, Path(cache_dir or ".data/downloads"))
    else:
        path = Path(source)
        if not path.exists():
            raise SourceError(f"cannot read {path}: file not found")
    return normalize(_read_raw(path), origin=str(source))


@dataclass
class MonthFile:
    """One month of a source: where it is and which (year, month) it holds."""

    year: int
    month: int
    location: str


def discover(sources: list[str]) -> list[MonthFile]:
    """Expand paths, URLs and directories into month files, sorted by month.

    A directory contributes every ``yellow_tripdata_YYYY-MM.{parquet,csv,csv.gz}`` it holds
    (parquet wins over csv for the same month).  Files whose name carries no month are rejected
    because the pipeline's date bounds come from the month.
    """
    found: dict[tuple[int, int], MonthFile] = {}
    for src in sources:
        src = str(src)
        if not is_url(src) and Path(src).is_dir():
            files = sorted(Path(src).glob("yellow_tripdata_*"), key=lambda p: p.suffix != ".parquet")
            for p in files:
                ym = month_of(p.name)
                if ym and ym not in found:
                    found[ym] = MonthFile(*ym, str(p))
            continue
        ym = month_of(src)
        if ym is None:
            raise SourceError(f"{src}: cannot tell the month; name files like "
                              "yellow_tripdata_2020-01.parquet")
        found[ym] = MonthFile(*ym, src)
    return [found[k] for k in sorted(found)]


def official_urls(year: int, months: list[int]) -> list[str]:
    """The TLC CloudFront URLs of the given months."""
    return [tlc.OFFICIAL_URL.format(year=year, month=m) for m in months]
