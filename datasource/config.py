"""Settings, read once from the environment, with defaults that make a demo work.

Every setting is documented here and in the README; unknown ``MLSLI_*``-style
keys are not silently accepted because there are none: the list is closed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields


@dataclass(frozen=True)
class Settings:
    """What the server and the client need to know about their surroundings."""

    database_url: str | None = None  # DATABASE_URL; None -> embedded PostgreSQL
    database_read_url: str | None = None  # DATABASE_READ_URL: a SELECT-only role for reads (optional)
    auto_migrate: int = 1  # AUTO_MIGRATE: 1 migrates a schema that is behind (if the role may); 0 answers 503
    data_dir: str = ".data"  # DATA_DIR: embedded PostgreSQL data, trained models
    ingest_token: str | None = None  # INGEST_TOKEN: when set, writes need a bearer token
    statement_timeout_ms: int = 10_000  # STATEMENT_TIMEOUT_MS: no query runs longer
    max_batch_records: int = 50_000  # MAX_BATCH_RECORDS: records per ingest request
    max_body_bytes: int = 64 * 1024 * 1024  # MAX_BODY_BYTES: request body limit
    pool_size: int = 8  # POOL_SIZE: connections per server process
    read_concurrency: int = 2  # READ_CONCURRENCY: reads per process at once (more wait; writes never)
    fast_parse: int = 1  # FAST_PARSE: 0 validates every JSON ingest body with records.py alone
    metrics_modules: tuple[str, ...] = field(default_factory=tuple)  # METRICS_MODULES (comma list)
    export_config: str | None = None  # EXPORT_CONFIG: YAML of extra SLIs for GET /metrics
    export_window_end: str = "now"  # EXPORT_WINDOW_END: now | latest (each model's last prediction)
    retention: int = 0  # RETENTION: days of raw rows kept (0: all); older weeks dropped hourly
    warm_up: int = 1  # WARM_UP: 1 answers one panel-sized query at start, before the first request
    raw_cache_stale_s: int = 10  # RAW_CACHE_STALE_S: a raw-path value written under may be served this long

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides) -> Settings:
        """Build settings from environment variables, then apply explicit overrides."""
        env = os.environ if env is None else env
        values: dict = {}
        for f in fields(cls):
            raw = env.get(f.name.upper())
            if raw is None or raw == "":
                continue
            if f.name == "metrics_modules":
                values[f.name] = tuple(m.strip() for m in raw.split(",") if m.strip())
            elif f.type == "int":
                values[f.name] = int(raw)
            else:
                values[f.name] = raw
        unknown = set(overrides) - {f.name for f in fields(cls)}
        if unknown:
            raise TypeError(f"unknown settings: {sorted(unknown)}")
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)
