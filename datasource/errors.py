"""The one error type for a client's mistake, whatever door it came in by.

Ingest batches, Grafana payloads, flat-endpoint parameters, auth and content
types all raise ``ClientError``: an HTTP status, a message that says what is
wrong, and optional per-field details ``{"index", "field", "message"}``. The
app turns it into a JSON 4xx; the remote client raises it from a 4xx answer.
"""

from __future__ import annotations

MAX_ERRORS_REPORTED = 100


class ClientError(ValueError):
    """A request the server will not honour as sent; ``errors`` names each bad field."""

    def __init__(self, message: str, errors: list[dict] | None = None, status: int = 400):
        super().__init__(message)
        self.message = message
        self.errors = errors or []
        self.status = status

    def to_json(self) -> dict:
        body = {"message": self.message}
        if self.errors:
            body["errors"] = self.errors[:MAX_ERRORS_REPORTED]
            body["error_count"] = len(self.errors)
        return body
