"""Ad hoc filter regexes (``=~``, ``!~``), matched in linear time with RE2.

Python's ``re`` backtracks: ``(a+)+$`` against 30 ``a`` and a ``!`` runs for
minutes, and a request cannot be interrupted. RE2 (``google-re2``) compiles
to an automaton whose matching time is linear in the input, whatever the
pattern, and bounds the memory of the compiled program. What it cannot do
(backreferences, lookaround) is refused with a 400 naming the filter, as is
an invalid or too long pattern.

Semantics are Grafana's for ad hoc filters: the pattern must match the whole
segment value (``fullmatch``), as Prometheus label matchers do.
"""

from __future__ import annotations

import re2

from datasource.records import BatchError

MAX_PATTERN_LENGTH = 200  # characters; a filter is a few alternatives, not a program
MAX_PROGRAM_BYTES = 1 << 20  # RE2's memory budget for one compiled pattern


class Pattern:
    """A compiled filter regex; ``fullmatch(text)`` says whether it matches all of ``text``."""

    __slots__ = ("source", "_regexp")

    def __init__(self, source: str, regexp):
        self.source = source
        self._regexp = regexp

    def fullmatch(self, text: str) -> bool:
        return self._regexp.fullmatch(text) is not None

    def __repr__(self) -> str:
        return f"Pattern({self.source!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, Pattern) and other.source == self.source

    def __hash__(self) -> int:
        return hash(self.source)


def _options():
    opts = re2.Options()
    opts.log_errors = False  # a client's bad pattern is a 400, not a line on stderr
    opts.max_mem = MAX_PROGRAM_BYTES
    return opts


def compile_filter(value: object, where: str) -> Pattern:
    """Compile a filter's value; ``where`` (e.g. ``filters[0]``) names it in the 400."""
    text = "" if value is None else str(value)
    if len(text) > MAX_PATTERN_LENGTH:
        raise _bad(f"{where}.value regex is longer than {MAX_PATTERN_LENGTH} characters", where)
    if "\x00" in text:
        raise _bad(f"{where}.value must not contain NUL", where)
    try:
        return Pattern(text, re2.compile(text, _options()))
    except re2.error as e:
        reason = e.args[0].decode("utf-8", "replace") if e.args and isinstance(e.args[0], bytes) else str(e)
        raise _bad(f"{where}.value is not a valid regex (RE2 syntax: no backreferences or "
                   f"lookaround): {reason}", where) from None


def _bad(message: str, where: str) -> BatchError:
    return BatchError(message, [{"index": None, "field": f"{where}.value", "message": message}])
