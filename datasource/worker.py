"""gunicorn's gthread worker with threads of its own for writes (issue 12).

Why: gthread hands every request to one thread pool, first come first served. Under read
load its queue holds dozens of Grafana panels, and a writer's batch waited behind all of
them (issue 12: 7-9 batches in 60 s; benchmarks/load.py under 50 readers: 3 in 60 s, 23 s
each). Here a request whose first bytes are ``POST /api/v1/`` (the ingest API:
predictions, feedback, events, references, models) goes to a pool of ``WRITE_THREADS``
threads that reads never use; everything else goes to the ``--threads`` pool as before,
whose threads run at a lower OS priority (``READ_NICE``) so that under CPU contention a
write runs first. The request line is peeked (``MSG_PEEK``: nothing consumed) when the
connection becomes readable; a new connection whose request has not arrived yet waits for
it in the poller first (gthread's own path for slow clients). Under TLS the request line
is encrypted and every request takes the ordinary pool. Writes also have database
connections reserved for them, and reads a bounded share (``datasource.db``), so a write
waits neither for a thread nor for a connection behind reads.

Used by ``gunicorn -c datasource/gunicorn_conf.py`` (its ``worker_class``), as the image runs.
"""

from __future__ import annotations

import os
import selectors
import socket
import threading
import time
from concurrent import futures
from functools import partial

from gunicorn.workers.gthread import DEFAULT_WORKER_DATA_TIMEOUT, ThreadWorker

WRITE_THREADS = 2  # per worker process; writes of one model are serialized by its lock anyway
WRITE_PREFIX = b"POST /api/v1/"
READ_NICE = 10  # added to the read threads' nice value (Linux, per thread); not the write threads'


def request_kind(conn) -> str | None:
    """"write" if the request waiting on ``conn`` (a gthread TConn) is an ingest write, "read"
    for anything else, None when none of its bytes has arrived yet."""
    parser = getattr(conn, "parser", None)
    buffered = b""
    if parser is not None:  # bytes gunicorn has read ahead already
        try:
            buffered = parser.unreader.buf.getvalue()[:len(WRITE_PREFIX)]
        except AttributeError:
            buffered = b""
    if len(buffered) < len(WRITE_PREFIX):
        try:
            buffered += socket.socket.recv(conn.sock, len(WRITE_PREFIX) - len(buffered),
                                           socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            if not buffered:
                return None
        except (OSError, ValueError, TypeError):
            return "read"
    return "write" if buffered.startswith(WRITE_PREFIX) else "read"


def _lower_priority() -> None:
    """A read thread's initializer: a higher nice value, so that under CPU contention the
    write threads run first (benchmarks/load.py: the writer's batches 0.71 -> 0.52 s p50 under
    50 readers, the readers' throughput unchanged). Raising it needs no privilege."""
    if READ_NICE and hasattr(os, "setpriority") and hasattr(threading, "get_native_id"):
        try:
            tid = threading.get_native_id()
            os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + READ_NICE))
        except OSError:
            pass


class Worker(ThreadWorker):
    """gthread, with ingest writes on ``WRITE_THREADS`` threads of their own."""

    def get_thread_pool(self):
        return futures.ThreadPoolExecutor(max_workers=self.cfg.threads, initializer=_lower_priority)

    def init_process(self):
        from datasource import disconnect

        self.write_pool = futures.ThreadPoolExecutor(max_workers=WRITE_THREADS,
                                                     thread_name_prefix="mlsli-write")
        disconnect.start_watcher()  # from this thread, not from a read thread at READ_NICE
        super().init_process()

    def enqueue_req(self, conn):
        """On the main thread, for a new connection or one that became readable."""
        kind = request_kind(conn)
        if kind is None and not conn.initialized and not conn.data_ready:
            # A new connection whose request is not there yet: wait for it in the poller (as
            # gthread does for a slow client), then choose its pool.
            conn.sock.setblocking(False)
            conn.timeout = time.monotonic() + max(self.cfg.keepalive, DEFAULT_WORKER_DATA_TIMEOUT)
            self.pending_conns.append(conn)
            self.poller.register(conn.sock, selectors.EVENT_READ,
                                 partial(self.on_pending_socket_readable, conn))
            return None
        if kind != "write":
            return super().enqueue_req(conn)
        fs = self.write_pool.submit(self.handle, conn)
        fs.add_done_callback(lambda fut: self.method_queue.defer(self.finish_request, conn, fut))
        return None

    def handle_quit(self, sig, frame):
        self.write_pool.shutdown(wait=False)
        super().handle_quit(sig, frame)
