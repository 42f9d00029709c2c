"""Stop the work of a request whose HTTP client has gone away.

Why: under gunicorn's gthread worker nothing stops a busy request thread. gunicorn's
``--timeout`` watches the worker's heartbeat, which its main loop keeps beating, and no
one reads the request's socket until the response is written. A Grafana panel whose
viewer navigated away, or a script that gave up, kept a thread, a pooled connection and an
open transaction until its query was done (issue 12: 346 s after the client left).

How: one watcher thread per worker process (started at the first ``watch``) polls the
sockets of the requests that are computing, every ``POLL_S``. The peer has closed when
the socket reports a hang-up or (Linux) the peer's FIN (``POLLRDHUP``), or is readable and
``recv(1, MSG_PEEK)`` returns ``b""``; readable with bytes and no FIN is a keep-alive
client pipelining its next request, not a disconnect, and that socket is not watched
further. On a close the request's ``on_gone`` runs on the watcher thread:
``query.Service`` marks its ``Deadline`` passed (the engine's Python loops check it) and
cancels the running PostgreSQL statement with ``conn.cancel()``. The request then unwinds
as any failed request does: the pool rolls the connection back and takes it back clean,
and the client, gone, is answered 499 (as nginx logs "client closed request").

The socket is the WSGI environ's ``gunicorn.socket`` (or Werkzeug's ``werkzeug.socket``).
Without one (the Flask test client) ``watch`` does nothing. Behind a proxy this sees the
proxy's connection: nginx closes it when its client aborts (``proxy_ignore_client_abort
off``, the default), and so does Grafana's data source proxy when a panel's request is
cancelled. A client that half-closes (``shutdown(SHUT_WR)``) after sending its request
counts as gone, as it does for nginx.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import threading
import time
from collections.abc import Callable

from datasource.errors import ClientError

log = logging.getLogger(__name__)

POLL_S = 0.1  # how often the watcher looks at the registered sockets
_RDHUP = getattr(select, "POLLRDHUP", 0)  # Linux: the peer's FIN without polling for data
_HANGUP = select.POLLHUP | select.POLLERR


class ClientGone(ClientError):
    """The client closed its connection while its request was being computed."""

    def __init__(self):
        super().__init__("the client closed the connection; its query was cancelled", status=499)


class Deadline(float):
    """A ``time.monotonic()`` value that has also passed once ``cancel()`` was called.

    The engine checks ``time.monotonic() > deadline``. When the right operand's type is a
    subclass of the left one's, Python asks the right operand first (its reflected
    ``__lt__``), so that comparison is also true after a cancel, with no change to the
    engine. Arithmetic (``deadline - now``) gives plain floats.
    """

    def __new__(cls, at: float):
        self = super().__new__(cls, at)
        self._cancelled = threading.Event()
        return self

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def __lt__(self, other):  # deadline < now, and now > deadline (reflected): passed
        return True if self.cancelled else float.__lt__(self, other)

    def __le__(self, other):
        return True if self.cancelled else float.__le__(self, other)

    def __gt__(self, other):  # deadline > now, and now < deadline (reflected): not yet
        return False if self.cancelled else float.__gt__(self, other)

    def __ge__(self, other):
        return False if self.cancelled else float.__ge__(self, other)

    __hash__ = float.__hash__


def request_socket():
    """The current WSGI request's client socket, or None (no request, or a server without one)."""
    try:
        from flask import has_request_context, request
    except ImportError:  # pragma: no cover - the server always has Flask
        return None
    if not has_request_context():
        return None
    environ = request.environ
    return environ.get("gunicorn.socket") or environ.get("werkzeug.socket")


class _Entry:
    """One watched request: its socket and what to do once its client is gone."""

    def __init__(self, sock, on_gone: Callable[[], None]):
        self.sock = sock
        self.on_gone = on_gone
        self.lock = threading.Lock()  # held while on_gone runs; the request waits on it to end
        self.active = True
        self.gone = False
        self.watchable = True

    def fire(self) -> None:
        with self.lock:
            if not self.active or self.gone:
                return
            self.gone = True
            try:
                self.on_gone()
            except Exception:
                log.exception("cancelling the request of a gone client failed")

    def end(self) -> None:
        """After this returns on_gone is not running and never will."""
        with self.lock:
            self.active = False


def _peer_closed(sock, events: int) -> bool | None:
    """True: closed; False: bytes are waiting (a pipelined request); None: nothing to say."""
    if events & (_HANGUP | _RDHUP):  # reset, or the peer's FIN (after a TLS close_notify too)
        return True
    try:
        # the base class's recv: raw bytes also under TLS (peeked, never consumed)
        data = socket.socket.recv(sock, 1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except (BlockingIOError, InterruptedError):
        return None
    except OSError:  # reset, or not connected any more
        return True
    return data == b""


class _Watcher:
    """The per-process thread polling the registered sockets."""

    def __init__(self):
        self._lock = threading.Condition()
        self._entries: dict[int, _Entry] = {}
        self._thread: threading.Thread | None = None
        self._pid: int | None = None

    def start(self) -> None:
        with self._lock:
            self._start_locked()

    def _start_locked(self) -> None:
        if self._thread is None or self._pid != os.getpid() or not self._thread.is_alive():
            self._pid = os.getpid()  # a fork (gunicorn's workers) starts its own thread
            self._thread = threading.Thread(target=self._run, name="mlsli-disconnect", daemon=True)
            self._thread.start()

    def add(self, entry: _Entry) -> None:
        with self._lock:
            self._start_locked()
            self._entries[id(entry)] = entry
            self._lock.notify()

    def remove(self, entry: _Entry) -> None:
        with self._lock:
            self._entries.pop(id(entry), None)

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._entries:
                    self._lock.wait()
                entries = [e for e in self._entries.values() if e.watchable and not e.gone]
            try:
                self._poll_once(entries)
            except Exception:  # never let the watcher die: a request would then run unwatched
                log.exception("disconnect watcher")
                time.sleep(POLL_S)

    def _poll_once(self, entries: list[_Entry]) -> None:
        poller = select.poll()
        by_fd: dict[int, _Entry] = {}
        for e in entries:
            try:
                fd = e.sock.fileno()
            except (OSError, ValueError):
                continue
            if fd < 0:
                continue
            poller.register(fd, _RDHUP or select.POLLIN)
            by_fd[fd] = e
        if not by_fd:  # only requests already cancelled: they are ending
            time.sleep(POLL_S)
            return
        for fd, events in poller.poll(POLL_S * 1000):
            e = by_fd.get(fd)
            if e is None or events & select.POLLNVAL:
                continue
            closed = _peer_closed(e.sock, events)
            if closed:
                e.fire()
            elif closed is False:
                e.watchable = False  # readable with data: polling it again would spin


_WATCHER = _Watcher()


def start_watcher() -> None:
    """Start this process's watcher thread now (else the first ``watch`` does): from a thread
    at normal priority, as the thread that starts it passes on its own (datasource.worker)."""
    _WATCHER.start()


@contextlib.contextmanager
def watch(sock, on_gone: Callable[[], None]):
    """Run ``on_gone()`` (on another thread) if the peer of ``sock`` closes within the block.

    ``on_gone`` runs at most once, and never after the block has ended: leaving the block
    waits for a running ``on_gone`` to return. ``sock`` None watches nothing.
    """
    if sock is None:
        yield None
        return
    entry = _Entry(sock, on_gone)
    _WATCHER.add(entry)
    try:
        yield entry
    finally:
        entry.end()
        _WATCHER.remove(entry)
