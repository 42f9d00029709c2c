"""The one parser of request bodies: JSON (every POST endpoint) and NDJSON (ingest); and the
encoder of the large JSON answers (``json_response``).

Every door in reads its body here, so a hostile body is refused the same way
everywhere, as a 4xx ``BatchError`` with a ``message``, never a 500:

* 415 for a content type other than the route's ``allowed`` ones. Browsers
  send ``text/plain``, form and multipart bodies cross-origin without a CORS
  preflight; refusing them (and a missing type) closes that CSRF door.
* 400 for malformed JSON, naming line and column.
* 400 for nesting deeper than ``MAX_JSON_DEPTH``: checked on the bytes with a
  vectorised bracket count (no recursion), and CPython's own RecursionError
  is caught as well.
* 400 for ``NaN``, ``Infinity``, ``-Infinity``, and numbers that do not fit
  a float (``1e400``, 400-digit integers): JSON has no such values and they
  would reach PostgreSQL or numpy as inf.
* 400 for NUL (``\\u0000``) in any string or key: PostgreSQL text cannot hold
  it, and psycopg2 raises on it.

Use::

    from datasource import http
    body = http.json_body(request)                       # any JSON value
    body = http.json_body(request, expect=dict)          # 400 unless an object
    body = http.json_body(request, empty={})             # blank body -> {}
    raw = http.body_bytes(request)                       # 415 unless JSON; then
    value = fast(raw) if http.plain(raw) else None       # another decoder on plain bytes,
    value = http.loads(raw) if value is None else value  # or this one (every check)
    recs = http.ndjson_lines(request)                    # one record a line
    http.check_url(request)                              # NUL in path or query -> 400
"""

from __future__ import annotations

import json
import math
import re

import msgspec
import numpy as np

from datasource.records import BatchError

JSON_TYPES = ("application/json",)
NDJSON_TYPES = ("application/x-ndjson", "application/ndjson", "application/jsonl")
MAX_JSON_DEPTH = 64  # objects/arrays inside each other; real payloads nest 4 deep
_MISSING = object()

_NOT_STRUCTURE = bytes(b for b in range(256) if b not in b'"[]{}')
_NUL_ESCAPE = re.compile(rb"(?<!\\)(?:\\\\)*\\u0000")  # \u0000 not itself escaped
# A \uD800-\uDFFF escape that is not half of a pair: Python reads it into a string that
# PostgreSQL (UTF-8) cannot store, so it is refused here as the client's mistake.
_LONE_SURROGATE = re.compile(
    rb"\\u[dD][89abAB][0-9a-fA-F]{2}(?!\\u[dD][c-fC-F][0-9a-fA-F]{2})"
    rb"|(?<!\\u[dD][89abAB][0-9a-fA-F]{2})\\u[dD][c-fC-F][0-9a-fA-F]{2}")
# Numbers that may not fit a float: a long digit run or a 3-digit positive exponent, found
# with bytes.translate and ``in`` (C speed; a regex scan costs 0.7 s on a 12 MB batch).
_NUMBER_SHAPE = bytes.maketrans(b"0123456789eE+", b"0000000000ee+")
_NUMBER_SHAPE = bytes(c if c in b"0e+" else 32 for c in _NUMBER_SHAPE)
_LONG_DIGITS = b"0" * 300
_CHUNK = 1 << 20


def _error(message: str, status: int = 400, field: str = "body") -> BatchError:
    return BatchError(message, [{"index": None, "field": field, "message": message}], status)


def _line_col(raw: bytes, offset: int) -> str:
    line = raw.count(b"\n", 0, offset) + 1
    col = offset - (raw.rfind(b"\n", 0, offset) + 1) + 1
    return f"line {line}, column {col}"


def _check_content_type(request, allowed: tuple[str, ...]) -> None:
    mimetype = (request.mimetype or "").lower()
    if mimetype not in allowed:
        raise _error(f"unsupported content type {mimetype or 'none'!r}; send {' or '.join(allowed)}",
                     415, "Content-Type")


def json_depth(raw: bytes) -> int:
    """Deepest nesting of objects and arrays in a JSON text, without parsing or recursing.

    For valid JSON: escape pairs are dropped (``\\\\`` then ``\\"``, left to right as
    JSON reads them), then all but quotes and brackets; a bracket counts when
    an even number of quotes precedes it (outside strings), as a +1/-1 step
    whose running sum is the depth. numpy works in chunks, so memory stays
    bounded whatever the body size.
    """
    if b"\\" in raw:  # a byte search: most bodies have no escape to drop
        raw = raw.replace(b"\\\\", b"").replace(b'\\"', b"")
    shape = raw.translate(None, _NOT_STRUCTURE)
    if shape.count(b"[") + shape.count(b"{") <= 1:
        return int(b"[" in shape or b"{" in shape)
    arr = np.frombuffer(shape, dtype=np.uint8)
    deepest, level, quotes = 0, 0, 0
    for start in range(0, len(arr), _CHUNK):
        part = arr[start:start + _CHUNK]
        is_quote = part == ord('"')
        outside = ((quotes + np.cumsum(is_quote)) & 1) == 0
        quotes += int(is_quote.sum())
        opens = ((part == ord("[")) | (part == ord("{"))) & outside
        closes = ((part == ord("]")) | (part == ord("}"))) & outside
        running = level + np.cumsum(opens.astype(np.int64) - closes)
        if len(running):
            deepest = max(deepest, int(running.max()))
            level = int(running[-1])
    return deepest


def _too_deep(raw: bytes) -> bool:
    """Nesting deeper than MAX_JSON_DEPTH (which takes more than twice as many bytes)."""
    return len(raw) > 2 * MAX_JSON_DEPTH and json_depth(raw) > MAX_JSON_DEPTH


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]} is out of range")
    return value


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > 308:
        raise ValueError(f"integer of {len(text)} digits is out of range")
    return int(text)


def _may_overflow(raw: bytes) -> bool:
    """Whether ``raw`` may hold a number that does not fit a double (a false alarm costs time only)."""
    shape = raw.translate(_NUMBER_SHAPE)
    return _LONG_DIGITS in shape or b"e000" in shape or b"e+000" in shape


def plain(raw: bytes) -> bool:
    """Whether ``loads`` would read ``raw`` without meeting any of its special cases: UTF-8,
    no NUL escape, no number that may not fit a double, nesting within MAX_JSON_DEPTH.

    Only such bytes may go to another decoder (the ingest fast path, ``datasource.fastparse``):
    where both succeed, they read the same values. Any other body goes to ``loads``, which
    refuses it or reads it with its checks, so each limit stays in this one place.
    """
    if (b"\\" in raw and b"\\u0000" in raw) or _may_overflow(raw):
        return False
    if b"\\u" in raw and _LONE_SURROGATE.search(raw):
        return False
    if not raw.isascii():
        try:
            raw.decode("utf-8")  # strict: json.loads would take encoded surrogates, or UTF-16
        except UnicodeDecodeError:
            return False
    return not _too_deep(raw)


def loads(raw: bytes | str, where: str = "request body") -> object:
    """Parse one JSON text with every check above; ``where`` names it in messages."""
    if isinstance(raw, str):
        raw = raw.encode("utf-8", "surrogatepass")
    if b"\\" in raw and b"\\u0000" in raw:
        m = _NUL_ESCAPE.search(raw)
        if m:
            raise _error(f"{where}: strings must not contain NUL (\\u0000), at "
                         f"{_line_col(raw, m.end() - 6)}")
    if b"\\u" in raw:
        m = _LONE_SURROGATE.search(raw)
        if m:
            raise _error(f"{where}: a \\u escape at {_line_col(raw, m.start())} is half of a "
                         "UTF-16 surrogate pair; strings must be valid Unicode")
    hooks = {}
    if _may_overflow(raw):
        hooks = {"parse_float": _finite_float, "parse_int": _bounded_int}
    try:
        value = json.loads(raw, parse_constant=_reject_constant, **hooks)
    except json.JSONDecodeError as e:
        raise _error(f"malformed JSON in {where} at line {e.lineno}, column {e.colno}: {e.msg}") from None
    except UnicodeDecodeError:
        raise _error(f"{where} is not UTF-8 encoded JSON") from None
    except RecursionError:
        raise _error(f"{where} nests objects/arrays deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as e:  # our hooks, or CPython's 4300-digit limit on int()
        raise _error(f"{where}: {e}; JSON numbers must be finite and fit a double") from None
    if _too_deep(raw):
        raise _error(f"{where} nests objects/arrays deeper than {MAX_JSON_DEPTH} levels")
    return value


def json_body(request, *, allowed: tuple[str, ...] = JSON_TYPES, expect: type | None = None,
              empty: object = _MISSING) -> object:
    """The request's JSON body, checked (see the module docstring for every refusal).

    ``allowed``: accepted content types (415 otherwise, a missing type included).
    ``expect=dict`` (or ``list``): 400 unless the body is of that type.
    ``empty``: returned for a blank body (Grafana posts some requests without
    one); without it a blank body is malformed JSON.
    """
    raw = request.get_data(cache=False)
    if empty is not _MISSING and not raw.strip() and (request.mimetype in ("", *allowed)):
        return empty
    _check_content_type(request, allowed)
    value = loads(raw)
    if expect is not None and not isinstance(value, expect):
        kind = {dict: "a JSON object", list: "a JSON array"}.get(expect, expect.__name__)
        raise _error(f"request body must be {kind}")
    return value


def body_bytes(request, *, allowed: tuple[str, ...] = JSON_TYPES) -> bytes:
    """The request's raw body, read (413 past MAX_BODY_BYTES) before its content type is
    checked (415), as ``json_body`` does; for ``plain`` and ``loads`` to take in turn."""
    raw = request.get_data(cache=False)
    _check_content_type(request, allowed)
    return raw


def ndjson_lines(request, *, allowed: tuple[str, ...] = NDJSON_TYPES) -> list:
    """The records of an NDJSON body, one JSON value a line (blank lines skipped).

    Each line gets every check of ``loads``; an error names the line number.
    """
    _check_content_type(request, allowed)
    raw = request.get_data(cache=False)
    return parse_ndjson(raw)


def parse_ndjson(raw: bytes) -> list:
    """``ndjson_lines`` on bytes already read."""
    out = []
    for n, line in enumerate(raw.splitlines(), start=1):
        if line.strip():
            out.append(loads(line, f"NDJSON line {n}"))
    return out


def check_url(request) -> None:
    """400 for a NUL character in the path or a query argument (percent-encoded ``%00``)."""
    if "\x00" in request.path:
        raise _error("the URL path must not contain NUL (%00)", field="path")
    for key, value in request.args.items(multi=True):
        if "\x00" in key or "\x00" in value:
            raise _error(f"query argument {key[:40]!r} must not contain NUL (%00)", field=key[:40])


def _encodable(value):
    """What msgspec cannot encode itself: numpy scalars (as Python numbers)."""
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"cannot encode {type(value).__name__} as JSON")


_ENCODER = msgspec.json.Encoder(enc_hook=_encodable)


def json_response(payload, status: int = 200):
    """A JSON response encoded by msgspec: series answers are tens of thousands of [value, time]
    pairs, which the standard library's encoder took ~2 us each for (5 x 2,016 points: 10 ms of
    a grouped panel's request, measured). NaN and infinities become null, as JSON has neither."""
    from flask import Response

    return Response(_ENCODER.encode(payload), status=status, mimetype="application/json")


def init_app(app) -> None:
    """Check every request's URL for NUL (one hook for all blueprints, before any route runs)."""
    from flask import request

    app.before_request(lambda: check_url(request))
