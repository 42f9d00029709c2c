"""What Grafana and the Infinity datasource (3.11, backend parser) send and keep, emulated.

Shared by the Infinity dashboard and alerting tests:

* ``LiveServer``: the app served over real HTTP on 127.0.0.1 (a free port), so queries go
  through URL encoding and Werkzeug's parsing as Infinity's would;
* ``interpolate``: Grafana's templateSrv for Infinity queries (default format ``glob``,
  explicit ``${var:csv}``, the global ``${__from}``/``${__to}``/``${__interval_ms}``);
* ``request``: the GET Infinity sends for a query (datasource base URL + url + params);
* ``frames``: the backend parser's result, only the declared columns, and the long-to-wide
  step of ``format: timeseries`` (one series per set of string labels).
"""

from __future__ import annotations

import json
import re
import threading
import urllib.error
import urllib.parse
import urllib.request

from werkzeug.serving import make_server

# templateSrv's variable syntax: $var, [[var]] / [[var:fmt]], ${var}, ${var.field}, ${var:fmt}
_VARIABLE = re.compile(r"\$(\w+)|\[\[(\w+?)(?::(\w+))?\]\]|\$\{(\w+)(?:\.([^:^}]+))?(?::([^}]+))?\}")


class LiveServer:
    """A Flask app on a free loopback port in a thread; ``close()`` stops it."""

    def __init__(self, app):
        self._server = make_server("127.0.0.1", 0, app, threaded=True)
        self.url = f"http://127.0.0.1:{self._server.server_port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)


def _format(value, fmt: str) -> str:
    values = value if isinstance(value, list) else [value]
    if fmt == "glob":
        return str(values[0]) if len(values) == 1 else "{" + ",".join(map(str, values)) + "}"
    if fmt in ("csv", "raw"):
        return ",".join(map(str, values))
    raise AssertionError(f"format {fmt} is not emulated")


def interpolate(text: str, variables: dict, fmt: str = "glob") -> str:
    """templateSrv.replace with Infinity's default format; unknown variables stay as written."""
    def one(m: re.Match) -> str:
        name = m.group(1) or m.group(2) or m.group(4)
        explicit = m.group(3) or m.group(6)
        if name not in variables:
            return m.group(0)
        return _format(variables[name], explicit or fmt)

    return _VARIABLE.sub(one, text)


def request(base_url: str, query: dict, variables: dict) -> str:
    """The URL of Infinity's GET: a relative ``url`` gets the datasource's base URL."""
    url = interpolate(query["url"], variables)
    assert url.startswith("/"), "queries are relative to the datasource base URL"
    assert query["url_options"]["method"] == "GET"
    params = [(p["key"], interpolate(p["value"], variables))
              for p in query["url_options"].get("params", [])]
    return base_url + url + ("?" + urllib.parse.urlencode(params) if params else "")


def fetch(url: str) -> tuple[int, object]:
    try:
        with urllib.request.urlopen(url, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def _number(value):
    return None if value is None else float(value)


def frames(query: dict, rows: list) -> list[dict]:
    """The backend parser on a JSON array: declared columns only, then long-to-wide.

    Returns frames ``{"labels": {...}, "time": [...], "values": [...]}`` for timeseries
    and ``{"labels": {...}, "values": [v]}`` per row for a table of labelled numbers
    (what Grafana's numeric-long reader makes of it). Time columns must be epoch ms integers:
    Infinity would otherwise parse them wrongly or keep the long frame.
    """
    assert query["parser"] == "backend" and query["type"] == "json" and query["root_selector"] == ""
    assert isinstance(rows, list)
    cols = query["columns"]
    for row in rows:
        for c in cols:
            assert c["selector"] in row, f"column {c['selector']} missing from {row}"
            value = row[c["selector"]]
            if c["type"] == "timestamp_epoch":
                assert isinstance(value, int) and not isinstance(value, bool), (c, value)
            elif c["type"] == "number":
                assert value is None or isinstance(value, (int, float)), (c, value)
            elif c["type"] == "string":
                assert isinstance(value, str), (c, value)
    labels = [c for c in cols if c["type"] == "string"]
    numbers = [c for c in cols if c["type"] == "number"]
    times = [c for c in cols if c["type"] == "timestamp_epoch"]
    out: dict = {}
    if query["format"] == "timeseries":
        (t,) = times
        stamps = [row[t["selector"]] for row in rows]
        assert stamps == sorted(stamps), "rows not sorted by time: Infinity keeps the long frame"
        for row in rows:
            key = tuple((c["text"], row[c["selector"]]) for c in labels)
            frame = out.setdefault(key, {"labels": dict(key), "time": [], "values": []})
            frame["time"].append(row[t["selector"]])
            frame["values"].append(_number(row[numbers[0]["selector"]]))
        return list(out.values())
    frames_ = []
    for row in rows:
        frames_.append({"labels": {c["text"]: row[c["selector"]] for c in labels},
                        "values": [_number(row[c["selector"]]) for c in numbers]})
    return frames_
