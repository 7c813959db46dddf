"""An HTTP/1.1 static-file server: h11 for the protocol, one actor per connection.

Run it:  python examples/httpd.py --port 8080 --root ./public
         (or: ioserver run examples/httpd.py --port 8080 --root ./public)
Try it:  curl -v http://127.0.0.1:8080/index.html
         curl -I http://127.0.0.1:8080/index.html                  (HEAD)
Load it: wrk -t2 -c100 -d10s http://127.0.0.1:8080/index.html
HTTPS:   python examples/httpd.py --port 8443 --tls-cert cert.pem --tls-key key.pem
         curl --cacert ca.pem https://localhost:8443/index.html

What it does:

- ``GET`` and ``HEAD`` of the files under ``--root``, with ``Content-Length`` and a
  ``Content-Type`` from :mod:`mimetypes`; a directory serves its ``index.html``.
  Keep-alive and pipelining (requests answered in order) come from h11, which does all
  the HTTP parsing and writing.  Other methods get ``405`` (with ``Allow``), a request
  h11 cannot parse gets ``400`` and the connection closed.
- **Timeouts** (RFC 9112 §9.5 lets a server close an idle connection at any time): a
  request head must arrive whole within ``--head-timeout`` seconds (default 10) of its
  first byte - or of the connection's start, for its first request - else the server
  answers ``408`` (if any of it came) and closes, so a client that trickles a head
  (slowloris) holds a connection that long at most; a kept-alive connection with no
  request for ``--idle-timeout`` seconds (default 5, as uvicorn's keep-alive timeout) is
  closed.  Bodies have no timeout here: the request budget bounds them.  A response
  that waits ``send_timeout`` seconds (``serve()``'s, default 60, nginx's) on a busy
  port - a client that stopped reading - is cut, and the connection closed.
- **No request smuggling**: a request with both ``Content-Length`` and
  ``Transfer-Encoding`` is answered ``400`` and the connection closed, unread (RFC 9112
  §6.1: a server must close after such a request), so nothing pipelined behind it - where
  a proxy and this server may disagree on the body's end - is served.
- No way out of the root: the path is percent-decoded and then refused if it holds a
  ``..`` segment or a NUL byte (``404``), and the file's real path (symlinks resolved)
  must lie under the root's real path (``403`` otherwise).
- **Large files are streamed**: a file no larger than a chunk (``STREAM_CHUNK``, 256 KiB,
  or half the request budget if smaller) is read whole; a larger one is read a chunk at a
  time, each chunk only once the previous one was handed to the port, whose ``send``
  waits while the port is busy (output above its high watermark) - so a request holds
  one chunk whatever the file's size, and a slow reader slows the reading of the file.
- **Caching and ranges, as nginx**: ``Last-Modified``, ``ETag`` (``"<mtime>-<size>"`` in
  hex, nginx's) and ``Accept-Ranges: bytes`` on every file; ``If-Match`` /
  ``If-Unmodified-Since`` (``412``) and ``If-None-Match`` / ``If-Modified-Since``
  (``304``, no body) in RFC 9110 §13.2.2's order; a single ``Range`` gets ``206`` with
  ``Content-Range`` (``416`` if it starts past the end; several ranges, another unit or
  bad syntax: the whole file, ``200``), honoured only if ``If-Range`` matches.  ``HEAD``
  gets ``GET``'s head and no body.
- **HTTPS** with ``--tls-cert FILE --tls-key FILE`` (PEM; the certificate file may hold
  the chain): the I/O thread runs TLS (``ports.listen_tcp(tls=...)``), ALPN offers
  ``http/1.1``, and the handler sees the same plaintext as over HTTP.  A client whose
  handshake fails never reaches a handler: the listener's ``Error`` is logged.
- **An access log** in the combined log format (Apache's and nginx's ``combined``) to the
  logger ``ioserver.httpd.access``: standard error by default, ``--access-log FILE``
  (appended to, reopened when logrotate moves it), off with ``--no-access-log``.  Lines
  are buffered as nginx's ``buffer=64k flush=1s`` (:class:`AccessLogHandler`).
- **A memory budget per request** (``--request-memory``, default 1 MiB), kept by a
  :class:`RequestBudget`: every byte a request makes the handler hold is charged to it -
  the body it buffers, the file it reads (whole, or one chunk while it streams), the
  response head it builds.  A body that would exceed it gets ``413`` (and the connection
  closed, since the rest of the body is never read); a handler that would exceed it (a
  budget too small for a head and a chunk) gets ``500`` for that request alone - the
  next request on the same connection is served as usual, and no other connection
  notices.  The budgets of all requests in flight draw on one :class:`MemoryPool`
  (``--handler-memory``, default 64 MiB); a request that finds it used up gets ``503``.
  Once a response is handed to the port, the I/O server's own bounds take over:
  ``--memory-limit`` (``ioserver.open(memory_limit=...)``: input not yet taken plus
  output not yet written, for every connection) and the port watermarks.  So the
  process holds at most ``--handler-memory`` + ``--memory-limit`` bytes of request and
  response data, plus a fixed amount per connection (h11's state and its header buffer,
  capped at 16 KiB).

The handler is sans-I/O (:class:`HttpSession`: bytes in, bytes out), so the benchmark
runs the very same code on plain trio sockets and on asyncio streams
(``bench/servers/http_trio.py``, ``bench/servers/http_asyncio.py``).

Tuning: ``--switch-interval SECONDS`` sets :func:`sys.setswitchinterval` (Python's default
is 5 ms; ``ioserver run`` leaves it alone).  On the Python core the I/O thread and the event
loop share the GIL; with a CPU-heavy handler (h11) the I/O thread waits up to the interval
for it, which delays reads and writes.  See bench/README.md for what it changed when
measured.
"""

from __future__ import annotations

import argparse
import functools
import logging
import math
import mimetypes
import os
import posixpath
import re
import ssl
import stat
import sys
import time
from collections.abc import Sequence
from email.utils import formatdate, mktime_tz, parsedate_tz
from typing import Any
from urllib.parse import unquote_to_bytes

import anyio
import anyio.abc
import h11
from anyio.streams.tls import TLSAttribute

import ioserver
import ports

#: Defaults, in bytes.
REQUEST_MEMORY = 1 << 20
HANDLER_MEMORY = 64 << 20
MAX_HEADERS = 16 * 1024  # h11's cap on a request's head
STREAM_CHUNK = 256 * 1024  # a larger body is streamed from its file, a chunk at a time
FLUSH_AT = 64 * 1024  # pipelined responses are sent once this many bytes are ready
SEPARATE_SEND_AT = 64 * 1024  # a larger body is sent as it is, not joined to its head
LINGER_SECONDS = 2.0  # after a closing response, how long to drain the client's input
LINGER_BYTES = 1 << 20  # ... and how much of it

#: Defaults, in seconds.
HEAD_TIMEOUT = 10.0  # a request head must be whole this long after its first byte
IDLE_TIMEOUT = 5.0  # a kept-alive connection with no request this long is closed
BODY_TIMEOUT = 30.0  # a request body must be whole this long after its head
SEND_TIMEOUT = 60.0  # a response the client takes nothing of this long is cut (nginx's)
ACCESS_LOG_FLUSH = 1.0  # the access log's lines are written at least this often

#: The access log's lines are written once this many bytes wait (nginx's buffer=64k).
ACCESS_LOG_BUFFER = 64 * 1024

# What a connection waits for, for its timeout (HttpSession.waiting_for).
HEAD = 0  # a request head: from its first byte (or the connection's start) until whole
IDLE = 1  # a new request on a kept-alive connection, nothing of it received yet
OTHER = 2  # a response being made: no timeout here
BODY = 3  # a request body: from the end of its head until whole

log = logging.getLogger("httpd")

SERVER_NAME = b"ioserver-httpd"
_OPEN_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK


# -- the memory budget ----------------------------------------------------------------


class BudgetExceeded(Exception):
    """A charge would pass a budget.

    ``scope`` is ``"request"`` (the request's own budget: the request is at fault) or
    ``"server"`` (the shared pool: too much is in flight now); ``what`` names what was
    charged (``"body"``, ``"file"``, ``"response"``), ``size`` its bytes, ``limit`` the
    budget's bytes and ``used`` what was already charged.
    """

    def __init__(self, scope: str, what: str, size: int, used: int, limit: int) -> None:
        super().__init__(
            f"{what} of {size} bytes on top of {used} exceeds the {scope} budget of {limit}"
        )
        self.scope = scope
        self.what = what
        self.size = size
        self.used = used
        self.limit = limit


class MemoryPool:
    """The bytes that all requests in flight may hold together (``limit``).

    Single-threaded: every actor runs in one event loop, so no lock.  ``peak`` is the
    most ever held.
    """

    __slots__ = ("limit", "peak", "used")

    def __init__(self, limit: int) -> None:
        if limit <= 0:
            raise ValueError(f"a memory pool needs a positive limit in bytes, not {limit}")
        self.limit = limit
        self.used = 0
        self.peak = 0

    def __repr__(self) -> str:
        return f"<MemoryPool {self.used}/{self.limit} bytes, peak {self.peak}>"


class RequestBudget:
    """The bytes one request may make its handler hold, charged before they are held.

    Charge before allocating: ``budget.charge(size, "file")`` raises
    :exc:`BudgetExceeded` and nothing was allocated.  Charges count against the request's
    own ``limit`` and, when given, a shared :class:`MemoryPool`; :meth:`release` gives
    everything back to the pool at once (when the request's response has left the
    handler).  Reusable: a small object with no I/O, so any handler can keep one per
    request - ``HttpSession`` does.

    Args:
        limit: the request's budget in bytes (positive).
        pool: the pool shared by every request in flight, or ``None``.
    """

    __slots__ = ("limit", "peak", "pool", "used")

    def __init__(self, limit: int, pool: MemoryPool | None = None) -> None:
        if limit <= 0:
            raise ValueError(f"a request budget needs a positive limit in bytes, not {limit}")
        self.limit = limit
        self.pool = pool
        self.used = 0
        self.peak = 0

    def charge(self, size: int, what: str) -> None:
        """Count ``size`` more bytes held for ``what``.

        Raises:
            BudgetExceeded: the request's budget (``scope="request"``) or the pool
                (``scope="server"``) cannot cover it; nothing was charged.
        """
        used = self.used + size
        if used > self.limit:
            raise BudgetExceeded("request", what, size, self.used, self.limit)
        pool = self.pool
        if pool is not None:
            if pool.used + size > pool.limit:
                raise BudgetExceeded("server", what, size, pool.used, pool.limit)
            pool.used += size
            if pool.used > pool.peak:
                pool.peak = pool.used
        self.used = used
        if used > self.peak:
            self.peak = used

    def release(self) -> None:
        """Give back everything charged (idempotent)."""
        if self.pool is not None:
            self.pool.used -= self.used
        self.used = 0

    def __repr__(self) -> str:
        return f"<RequestBudget {self.used}/{self.limit} bytes, peak {self.peak}>"


# -- the files ------------------------------------------------------------------------


class StaticFiles:
    """Maps request targets to files under ``root``, refusing every way out of it.

    Args:
        root: the directory to serve (it must exist).

    Raises:
        NotADirectoryError: ``root`` is not a directory.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        real = os.path.realpath(root)
        if not os.path.isdir(real):
            raise NotADirectoryError(f"the root to serve is not a directory: {root}")
        self.root = real
        self._prefix = real.rstrip(os.sep) + os.sep
        self._types: dict[str, bytes] = {}
        self._proc = os.path.isdir("/proc/self/fd")

    def open(self, target: bytes) -> tuple[int, int, str, os.stat_result | None]:
        """Open the file ``target`` names: ``(200, fd, real path, its os.fstat)``, else
        ``(status, -1, "", None)`` with ``status`` ``400`` (not an origin-form target),
        ``404`` (no such file, a ``..`` segment, a NUL byte, not a regular file) or
        ``403`` (outside the root through a symlink, or unreadable).

        The check is made on the file actually opened (its path read back from
        ``/proc/self/fd``), so a symlink swapped between a check and the open cannot lead
        out of the root.  The caller closes ``fd``.
        """
        path = target.split(b"?", 1)[0].split(b"#", 1)[0]
        if not path.startswith(b"/"):
            return 400, -1, "", None  # absolute-form ("http://...") and "*" are not for files
        decoded = unquote_to_bytes(path) if b"%" in path else path
        if b"\0" in decoded:
            return 404, -1, "", None
        segments = [segment for segment in decoded.split(b"/") if segment not in (b"", b".")]
        if b".." in segments:
            return 404, -1, "", None
        candidate = self._prefix + os.fsdecode(b"/".join(segments))
        for _ in range(2):  # the path, then a directory's index.html
            try:
                # O_NONBLOCK: opening a FIFO someone left in the root must not hang.
                fd = os.open(candidate, _OPEN_FLAGS)
            except (FileNotFoundError, NotADirectoryError):
                return 404, -1, "", None
            except OSError:
                return 403, -1, "", None
            try:
                real = self._real_path(fd, candidate)
                if real != self.root and not real.startswith(self._prefix):
                    os.close(fd)
                    return 403, -1, "", None
                status = os.fstat(fd)
            except BaseException:
                os.close(fd)
                raise
            if stat.S_ISREG(status.st_mode):
                return 200, fd, real, status
            os.close(fd)
            if not stat.S_ISDIR(status.st_mode):
                return 404, -1, "", None
            candidate = real.rstrip(os.sep) + os.sep + "index.html"
        return 404, -1, "", None

    def _real_path(self, fd: int, path: str) -> str:
        if self._proc:
            try:
                return os.readlink(f"/proc/self/fd/{fd}")
            except OSError:  # pragma: no cover - /proc not mounted
                self._proc = False
        return os.path.realpath(path)  # pragma: no cover - not Linux

    def content_type(self, path: str) -> bytes:
        """The ``Content-Type`` for ``path``, from :mod:`mimetypes` (cached by suffix)."""
        suffix = posixpath.splitext(path)[1].lower()
        known = self._types.get(suffix)
        if known is None:
            guessed, encoding = mimetypes.guess_type("x" + suffix, strict=False)
            if guessed is None or encoding is not None:
                guessed = "application/octet-stream"
            elif guessed.startswith("text/") or guessed in ("application/javascript",):
                guessed += "; charset=utf-8"
            known = self._types[suffix] = guessed.encode()
        return known


# -- one connection, sans-I/O ----------------------------------------------------------


class SessionStatistics:
    """What one :class:`HttpSession` did: requests, and those refused for memory."""

    __slots__ = ("errors_400", "errors_413", "errors_500", "errors_503", "requests")

    def __init__(self) -> None:
        self.requests = 0
        self.errors_400 = 0  #: requests with both Content-Length and Transfer-Encoding
        self.errors_413 = 0  #: bodies over the request budget
        self.errors_500 = 0  #: handlers over the request budget (or failing to read)
        self.errors_503 = 0  #: requests that found the shared pool used up


REASONS = {
    200: b"OK",
    206: b"Partial Content",
    304: b"Not Modified",
    400: b"Bad Request",
    403: b"Forbidden",
    404: b"Not Found",
    405: b"Method Not Allowed",
    408: b"Request Timeout",
    412: b"Precondition Failed",
    413: b"Content Too Large",
    416: b"Range Not Satisfiable",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    503: b"Service Unavailable",
}

_IDLE_OR_SENDING = (h11.IDLE, h11.SEND_RESPONSE)

_date_cache: list[Any] = [0, b""]


def http_date() -> bytes:
    """The ``Date`` header's value now (RFC 9110 IMF-fixdate), formatted once a second."""
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache[0] = now
        _date_cache[1] = formatdate(now, usegmt=True).encode()
    return _date_cache[1]  # type: ignore[no-any-return]


# -- the access log ---------------------------------------------------------------------

#: The access log's logger: one line per response, in the combined log format.
access_logger = logging.getLogger("ioserver.httpd.access")

#: What the access log keeps of one response: the request line, Referer and User-Agent
#: (raw bytes; ``b"-"`` when absent), the status and the body's bytes sent.
AccessEntry = tuple[bytes, bytes, bytes, int, int]

_NO_REQUEST = (b"-", b"-", b"-")  # a response to no request (a 408, a head h11 refused)
_MONTHS = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]
_UNSAFE = re.compile(rb'[^\x20-\x7e]|["\\]')
_log_time_cache: list[Any] = [0, ""]


def _log_fields(request: h11.Request) -> tuple[bytes, bytes, bytes]:
    """The request line, Referer and User-Agent of ``request`` (``b"-"`` when absent)."""
    referer = agent = b"-"
    for name, value in request.headers:
        if name == b"user-agent":
            agent = value
        elif name == b"referer":
            referer = value
    line = b"%s %s HTTP/%s" % (request.method, request.target, request.http_version)
    return line, referer, agent


def _escape(value: bytes) -> str:
    """``value`` for a quoted log field, as Apache writes it: ``"`` and ``\\`` escaped
    with a backslash, other bytes outside printable ASCII as ``\\xhh``."""
    if _UNSAFE.search(value) is not None:
        value = _UNSAFE.sub(
            lambda m: b"\\" + m[0] if m[0] in (b'"', b"\\") else b"\\x%02x" % m[0][0], value
        )
    return value.decode("ascii")


def _log_time() -> str:
    """``[10/Oct/2000:13:55:36 +0000]``: now, local time, formatted once a second (the
    month's English name, whatever the locale, as Apache and nginx write it)."""
    now = int(time.time())
    if _log_time_cache[0] != now:
        local = time.localtime(now)
        offset = local.tm_gmtoff // 60
        sign = "-" if offset < 0 else "+"
        _log_time_cache[0] = now
        _log_time_cache[1] = (
            f"[{local.tm_mday:02d}/{_MONTHS[local.tm_mon - 1]}/{local.tm_year}:"
            f"{local.tm_hour:02d}:{local.tm_min:02d}:{local.tm_sec:02d} "
            f"{sign}{abs(offset) // 60:02d}{abs(offset) % 60:02d}]"
        )
    return _log_time_cache[1]  # type: ignore[no-any-return]


def combined_log_line(host: str, entry: AccessEntry) -> str:
    """One line of the combined log format (Apache's and nginx's ``combined``)::

        %h %l %u %t "%r" %>s %b "%{Referer}i" "%{User-agent}i"

    ``%l`` and ``%u`` are ``-`` (no identd, no authentication); ``%b`` is the body's bytes
    sent, ``-`` for none."""
    line, referer, agent, status, size = entry
    return (
        f'{host} - - {_log_time()} "{_escape(line)}" {status} {size or "-"} '
        f'"{_escape(referer)}" "{_escape(agent)}"'
    )


def write_access_log(host: str, entries: list[AccessEntry]) -> None:
    """Log ``entries`` to :data:`access_logger` (INFO), a record per line, and clear the
    list.  The records are made with ``makeRecord`` and ``handle`` (public
    :class:`logging.Logger` API), which skips the caller lookup of ``info()``: an access
    log has no use for the source line, and it is a third of the cost."""
    logger = access_logger
    if logger.isEnabledFor(logging.INFO):
        for entry in entries:
            line = combined_log_line(host, entry)
            logger.handle(logger.makeRecord(logger.name, logging.INFO, "", 0, line, None, None))
    entries.clear()


class AccessLogHandler(logging.Handler):
    """Writes each record's line to a file (``path``) or to standard error (``None``),
    buffered as nginx's ``access_log ... buffer=64k flush=1s``: the lines wait in memory
    and are written with one ``write`` once :data:`ACCESS_LOG_BUFFER` bytes wait, and at
    each :meth:`flush` (:func:`serve` calls it every :data:`ACCESS_LOG_FLUSH` seconds,
    :func:`logging.shutdown` at exit).  Whole lines only, so processes that share the file
    (``O_APPEND``) do not cut each other's.  A file is reopened at a flush if it was moved
    or removed (logrotate), as :class:`logging.handlers.WatchedFileHandler` does.

    Raises:
        OSError: the file cannot be opened for appending.
    """

    def __init__(self, path: str | None = None) -> None:
        self.path = path
        self._lines: list[str] = []
        self._waiting = 0  # bytes in _lines
        self._identity = (0, 0)
        self._fd = 2 if path is None else self._open(path)
        super().__init__()  # registered for logging.shutdown once it can be closed

    def _open(self, path: str) -> int:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        info = os.fstat(fd)
        self._identity = (info.st_dev, info.st_ino)
        return fd

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        self._lines.append(line)
        self._waiting += len(line) + 1
        if self._waiting >= ACCESS_LOG_BUFFER:
            self.flush()

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            if self._lines:
                data = ("\n".join(self._lines) + "\n").encode("utf-8", "backslashreplace")
                self._lines.clear()
                self._waiting = 0
                view = memoryview(data)
                try:
                    while view:
                        view = view[os.write(self._fd, view) :]
                except OSError as exc:  # a full disk: say so once per batch, go on
                    print(f"httpd: access log not written: {exc}", file=sys.stderr)
            if self.path is not None:
                self._reopen_if_moved(self.path)

    def _reopen_if_moved(self, path: str) -> None:
        try:
            info = os.stat(path)
            moved = (info.st_dev, info.st_ino) != self._identity
        except FileNotFoundError:
            moved = True
        if moved:
            try:
                fd = self._open(path)
            except OSError:
                return  # keep writing where we were: better than losing the lines
            os.close(self._fd)
            self._fd = fd

    def close(self) -> None:
        try:
            self.flush()
            if self.path is not None and self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
        finally:
            super().close()


def flush_access_log() -> None:
    """Write what :data:`access_logger`'s handlers hold (see :class:`AccessLogHandler`)."""
    for handler in access_logger.handlers:
        handler.flush()


async def flush_access_log_periodically() -> None:
    """:func:`flush_access_log` every :data:`ACCESS_LOG_FLUSH` seconds, until cancelled."""
    try:
        while True:
            await anyio.sleep(ACCESS_LOG_FLUSH)
            flush_access_log()
    finally:
        flush_access_log()


def configure_access_log(destination: str | None) -> None:
    """Send :data:`access_logger`'s lines, each alone on its line, to ``destination``: ``"-"``
    for standard error, a file name (appended to; reopened when logrotate moves it), both
    through an :class:`AccessLogHandler`; or ``None`` to turn it off.

    Raises:
        OSError: the file cannot be opened for appending.
    """
    for handler in list(access_logger.handlers):
        access_logger.removeHandler(handler)
        handler.close()
    if destination is None:
        access_logger.disabled = True
        return
    handler = AccessLogHandler(None if destination == "-" else destination)
    handler.setFormatter(logging.Formatter("%(message)s"))
    access_logger.addHandler(handler)
    access_logger.setLevel(logging.INFO)
    access_logger.propagate = False  # not again through the root's handlers, with a prefix
    access_logger.disabled = False


class HttpSession:
    """One HTTP/1.1 connection's protocol and handler, with no I/O (as h11 itself).

    Feed it what the socket read (``b""`` at end of file) with :meth:`feed`, then call
    :meth:`responses` until it returns nothing; send what it returns, in order, and call
    :meth:`sent` once it is handed to the transport.  When :attr:`closing` is true and
    nothing is left to send, half-close and close the connection.

    Args:
        files: what to serve.
        request_memory: each request's budget in bytes (see :class:`RequestBudget`).
        pool: the pool shared by the requests of every connection, or ``None``.
        access_log: keep an :data:`AccessEntry` per response in :attr:`access`.
    """

    __slots__ = (
        "_body",
        "_budget",
        "_budgets",
        "_chunk",
        "_connection",
        "_files",
        "_logged",
        "_method",
        "_pool",
        "_request",
        "_request_memory",
        "_stream",
        "access",
        "closing",
        "statistics",
    )

    def __init__(
        self,
        files: StaticFiles,
        request_memory: int = REQUEST_MEMORY,
        pool: MemoryPool | None = None,
        access_log: bool = False,
    ) -> None:
        self._connection = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADERS)
        self._files = files
        self._request_memory = request_memory
        self._pool = pool
        self._budgets: list[RequestBudget] = []  # of responses returned and not yet sent
        self._method = b""  # of the request being answered
        # The request being read: its head, its budget and the body so far.
        self._request: h11.Request | None = None
        self._budget: RequestBudget | None = None
        self._body: list[bytes] = []
        # A body larger than a chunk is sent a chunk at a time from the file.
        self._chunk = max(1, min(STREAM_CHUNK, request_memory // 2))
        self._stream: FileStream | None = None
        self.closing = False
        self.statistics = SessionStatistics()
        #: With ``access_log``: one :data:`AccessEntry` per response made, in order, for
        #: the caller to write (and clear) once it sent them; else None.
        self.access: list[AccessEntry] | None = [] if access_log else None
        # The request line, Referer and User-Agent of the request being answered.
        self._logged: tuple[bytes, bytes, bytes] = _NO_REQUEST

    def feed(self, data: bytes) -> None:
        """Take bytes read from the client; ``b""`` means it closed its side."""
        if not self.closing:
            self._connection.receive_data(data)

    def release(self) -> None:
        """Release every charge, the request being read included (the connection ended),
        and close the file being streamed, if any."""
        self._end_stream()
        self.sent()
        if self._budget is not None:
            self._budget.release()

    def sent(self) -> None:
        """The responses returned so far were handed to the transport: release their
        requests' bytes from the budgets (and the pool).  A request still being read
        keeps its charges."""
        for budget in self._budgets:
            budget.release()
        self._budgets.clear()

    def responses(self) -> list[bytes]:
        """Serve every request complete so far, in order; return the bytes to send.

        Returns at most about ``FLUSH_AT`` bytes at a time (call again until it returns
        an empty list), so a long pipeline does not pile up responses; a file larger than
        a chunk (``STREAM_CHUNK``, at most half the request budget) comes one chunk per
        call, read from the file only when asked for - so the handler holds one chunk of
        it, and a sender that waits on a busy transport (:meth:`ports.Port.send`) reads
        no further than the client takes.
        """
        if self._stream is not None:
            return self._next_chunk(self._stream)
        connection = self._connection
        out: list[bytes] = []
        size = 0
        while size < FLUSH_AT and not self.closing:
            try:
                event = connection.next_event()
            except h11.RemoteProtocolError as exc:
                if connection.our_state in _IDLE_OR_SENDING:
                    out += self._error(exc.error_status_hint, close=True)
                self.closing = True
                break
            if event is h11.NEED_DATA:
                break
            if event is h11.PAUSED:
                if connection.our_state is h11.DONE and connection.their_state is h11.DONE:
                    connection.start_next_cycle()
                    continue
                self.closing = connection.our_state is h11.MUST_CLOSE
                break
            event_type = type(event)
            if event_type is h11.Request:
                request: h11.Request = event  # type: ignore[assignment]
                self._request = request
                self._method = request.method
                if self.access is not None:
                    self._logged = _log_fields(request)
                self._budget = RequestBudget(self._request_memory, self._pool)
                self.statistics.requests += 1
                self._body = []
                length, encoded = _body_headers(request)
                if length is not None and encoded:
                    # RFC 9112 §6.1: both framings is how requests are smuggled past a
                    # proxy that reads the other one; refuse and close, read no further.
                    self.statistics.errors_400 += 1
                    self._budgets.append(self._budget)
                    out += self._error(400, close=True)
                elif length is not None and length > self._request_memory:
                    self.statistics.errors_413 += 1
                    self._budgets.append(self._budget)
                    out += self._error(413, close=True)
            elif event_type is h11.Data:
                assert self._budget is not None
                data = event.data  # type: ignore[union-attr]
                try:
                    self._budget.charge(len(data), "body")
                except BudgetExceeded as exc:
                    self.statistics.errors_413 += exc.scope == "request"
                    self.statistics.errors_503 += exc.scope == "server"
                    self._budgets.append(self._budget)
                    out += self._error(413 if exc.scope == "request" else 503, close=True)
                    continue
                self._body.append(data)
            elif event_type is h11.EndOfMessage:
                assert self._request is not None and self._budget is not None
                try:
                    chunks = self._respond(self._request, self._budget)
                except Exception:  # a bug in the handler: this request alone fails
                    log.exception("handler failed on %r", self._request.target)
                    self.statistics.errors_500 += 1
                    chunks = self._error(500)
                if self._stream is None:
                    # Its bytes stay charged until the response is handed to the
                    # transport (a streamed body's, until its end).
                    self._budgets.append(self._budget)
                out += chunks
                size += sum(len(chunk) for chunk in chunks)
                if connection.our_state is h11.MUST_CLOSE:
                    self.closing = True
                elif connection.our_state is h11.DONE:
                    connection.start_next_cycle()
                self._request = self._budget = None
                self._body = []
                if self._stream is not None:
                    break  # its body comes next, before any pipelined response
            elif event_type is h11.ConnectionClosed:
                self.closing = True
        if len(out) > 1 and size < SEPARATE_SEND_AT:
            out = [b"".join(out)]
        return out

    def waiting_for(self) -> int:
        """What the connection waits for now, once :meth:`responses` returned nothing:
        :data:`HEAD` (a request head: part of one came, or the connection is new),
        :data:`IDLE` (a next request, nothing of it received), :data:`BODY` (the rest of
        a request's body) or :data:`OTHER`."""
        connection = self._connection
        if connection.their_state is h11.SEND_BODY:
            return BODY
        if connection.their_state is not h11.IDLE:
            return OTHER
        if self.statistics.requests == 0 or connection.trailing_data[0]:
            return HEAD
        return IDLE

    def timed_out(self) -> list[bytes]:
        """The head or body timeout passed: a ``408`` to send if part of a request came
        (else nothing), and the session is closing."""
        self.closing = True
        connection = self._connection
        if connection.their_state is h11.SEND_BODY and connection.our_state is h11.SEND_RESPONSE:
            self._method = b""
            return self._error(408, close=True)
        if connection.their_state is h11.IDLE and connection.trailing_data[0]:
            self._method = b""
            return self._error(408, close=True)
        return []

    def _respond(self, request: h11.Request, budget: RequestBudget) -> list[bytes]:
        """The response to a whole request, as bytes to send - or its head alone, with
        :attr:`_stream` set to send the body from, when the body is larger than a chunk."""
        method = request.method
        if method != b"GET" and method != b"HEAD":
            return self._error(405, headers=[(b"allow", b"GET, HEAD")])
        status, fd, path, info = self._files.open(request.target)
        if status != 200:
            return self._error(status)
        assert info is not None
        streaming = False
        try:
            size = info.st_size
            mtime = int(info.st_mtime)
            etag = b'"%x-%x"' % (mtime, size)  # nginx's: modification time and size, in hex
            validators = [
                (b"last-modified", _http_date_of(mtime)),
                (b"etag", etag),
            ]
            conditions = _conditions(request)
            status = _preconditions(conditions, etag, mtime)
            if status == 412:
                return self._error(412, headers=validators)
            if status == 304:
                # RFC 9110 §15.4.5: the validators and Date, no body, no Content-Length.
                head = self._connection.send(
                    h11.Response(
                        status_code=304,
                        headers=[(b"server", SERVER_NAME), (b"date", http_date()), *validators],
                        reason=REASONS[304],
                    )
                )
                end = self._connection.send(h11.EndOfMessage())
                if self.access is not None:
                    self._log(304, 0)
                return [(head or b"") + (end or b"")]
            start, length = 0, size
            headers = [
                (b"server", SERVER_NAME),
                (b"date", http_date()),
                (b"content-type", self._files.content_type(path)),
                *validators,
                (b"accept-ranges", b"bytes"),
            ]
            ranged = conditions.get(b"range") if method == b"GET" else None
            if ranged is not None and _if_range_holds(conditions.get(b"if-range"), etag, mtime):
                selected = _single_range(ranged, size)
                if selected is None:  # unsatisfiable (RFC 9110 §15.5.17)
                    return self._error(
                        416, headers=[(b"content-range", b"bytes */%d" % size), *validators]
                    )
                if selected != ():
                    start, end_at = selected  # type: ignore[misc]
                    length = end_at - start + 1
                    status = 206
                    headers.append((b"content-range", b"bytes %d-%d/%d" % (start, end_at, size)))
            headers.append((b"content-length", b"%d" % length))
            content = b""
            if method == b"GET" and length > self._chunk:
                # Larger than a chunk: stream it, one chunk held at a time (charged once,
                # for the whole stream), each sent when the port is not busy.
                budget.charge(self._chunk, "file")
                streaming = True
            elif method == b"GET":
                budget.charge(length, "file")  # before reading: it may not fit
                content = _read(fd, start, length)
                if len(content) != length:  # the file shrank meanwhile
                    self.statistics.errors_500 += 1
                    return self._error(500)
            # The head's size, charged before h11 commits to the response: its status
            # line and a line per header.
            budget.charge(32 + sum(len(n) + len(v) + 4 for n, v in headers), "response")
            head = self._connection.send(
                h11.Response(status_code=status, headers=headers, reason=REASONS[status])
            )
            assert head is not None
        except BudgetExceeded as exc:
            streaming = False
            if exc.scope == "server":
                self.statistics.errors_503 += 1
                return self._error(503, headers=[(b"retry-after", b"1")])
            self.statistics.errors_500 += 1
            return self._error(500)
        except OSError:
            streaming = False
            self.statistics.errors_500 += 1
            return self._error(500)
        finally:
            if not streaming:
                os.close(fd)
        if streaming:
            self._stream = FileStream(fd, start, length, budget, status, self._logged)
            return [head]
        if self.access is not None:
            self._log(status, len(content))
        out = [head]
        if content:
            out += self._connection.send_with_data_passthrough(h11.Data(data=content))
        end = self._connection.send(h11.EndOfMessage())
        if end:
            out.append(end)
        return out

    def _next_chunk(self, stream: FileStream) -> list[bytes]:
        """The next chunk of the body being streamed (and its end, after the last)."""
        try:
            data = os.pread(stream.fd, min(self._chunk, stream.remaining), stream.offset)
        except OSError:
            data = b""
        if not data:
            # The file shrank (or failed) under us: the promised length cannot be met,
            # and only closing the connection tells the client so (RFC 9112 §8).
            log.warning("a file ended %d bytes early while it was sent", stream.remaining)
            self._end_stream()
            self.closing = True
            return []
        stream.offset += len(data)
        stream.remaining -= len(data)
        connection = self._connection
        out = connection.send_with_data_passthrough(h11.Data(data=data))
        if stream.remaining == 0:
            self._end_stream()
            end = connection.send(h11.EndOfMessage())
            if end:
                out.append(end)
            if connection.our_state is h11.MUST_CLOSE:
                self.closing = True
            elif connection.our_state is h11.DONE and connection.their_state is h11.DONE:
                connection.start_next_cycle()
        return out

    def _end_stream(self) -> None:
        stream = self._stream
        if stream is not None:
            self._stream = None
            os.close(stream.fd)
            stream.budget.release()
            if self.access is not None:
                # Logged once it ends (or the connection does): the bytes handed out.
                self._logged = stream.logged
                self._log(stream.status, stream.length - stream.remaining)

    def _log(self, status: int, size: int) -> None:
        """Keep the access log entry of the response just made (``size``: body bytes)."""
        assert self.access is not None
        self.access.append((*self._logged, status, size))
        self._logged = _NO_REQUEST

    def _error(
        self, status: int, *, close: bool = False, headers: list[tuple[bytes, bytes]] | None = None
    ) -> list[bytes]:
        """A small text response with ``status``; ``close`` adds ``Connection: close``."""
        connection = self._connection
        if connection.our_state not in _IDLE_OR_SENDING:
            self.closing = True  # a response is already under way: nothing else can be said
            return []
        reason = REASONS.get(status, b"Error")
        body = b"%d %b\n" % (status, reason)
        all_headers = [
            (b"server", SERVER_NAME),
            (b"date", http_date()),
            (b"content-type", b"text/plain; charset=utf-8"),
            (b"content-length", b"%d" % len(body)),
            *(headers or []),
        ]
        if close:
            all_headers.append((b"connection", b"close"))
        out = [
            connection.send(h11.Response(status_code=status, headers=all_headers, reason=reason))
        ]
        if self._method != b"HEAD":  # HEAD answers carry no body
            out.append(connection.send(h11.Data(data=body)))
        out.append(connection.send(h11.EndOfMessage()))
        if self.access is not None:
            self._log(status, 0 if self._method == b"HEAD" else len(body))
        if close or connection.our_state is h11.MUST_CLOSE:
            self.closing = True
        return [chunk for chunk in out if chunk]


def _read(fd: int, offset: int, length: int) -> bytes:
    """Up to ``length`` bytes of the file from ``offset`` (fewer if it shrank meanwhile)."""
    content = os.pread(fd, length, offset)
    if len(content) == length or not content:
        return content
    parts = [content]
    remaining = length - len(content)
    while remaining > 0:
        part = os.pread(fd, remaining, offset + length - remaining)
        if not part:
            break
        parts.append(part)
        remaining -= len(part)
    return b"".join(parts)


class FileStream:
    """A response body being sent from a file: ``remaining`` bytes from ``offset`` of
    ``fd`` (which it owns), with ``budget`` charged one chunk for the whole stream."""

    __slots__ = ("budget", "fd", "length", "logged", "offset", "remaining", "status")

    def __init__(
        self,
        fd: int,
        offset: int,
        remaining: int,
        budget: RequestBudget,
        status: int = 200,
        logged: tuple[bytes, bytes, bytes] | None = None,
    ) -> None:
        self.fd = fd
        self.offset = offset
        self.remaining = remaining
        self.length = remaining
        self.budget = budget
        self.status = status  # and the request's log fields, for the access log at its end
        self.logged = _NO_REQUEST if logged is None else logged


_CONDITIONS = frozenset(
    b"if-match if-none-match if-modified-since if-unmodified-since if-range range".split()
)


def _conditions(request: h11.Request) -> dict[bytes, bytes]:
    """The request's conditional and range headers (h11 lowercased the names); a list
    header given twice is joined with a comma, as RFC 9110 §5.3 allows."""
    found: dict[bytes, bytes] = {}
    for name, value in request.headers:
        if name in _CONDITIONS:
            found[name] = found[name] + b"," + value if name in found else value
    return found


@functools.lru_cache(maxsize=1024)
def _http_date_of(timestamp: int) -> bytes:
    """``Last-Modified``'s value for a modification time (RFC 9110 IMF-fixdate)."""
    return formatdate(timestamp, usegmt=True).encode()


def _parse_http_date(value: bytes | None) -> int | None:
    """An HTTP-date (IMF-fixdate, RFC 850 or asctime) as a POSIX timestamp, or ``None``
    when it is absent or not a date (RFC 9110 §5.6.7: then the condition is ignored)."""
    if value is None:
        return None
    try:
        parsed = parsedate_tz(value.decode("latin-1"))
    except (TypeError, ValueError):  # pragma: no cover - parsedate_tz returns None
        return None
    if parsed is None:
        return None
    try:
        return int(mktime_tz(parsed))
    except (OverflowError, ValueError):
        return None


def _etag_matches(value: bytes, etag: bytes, *, weak: bool) -> bool:
    """Whether the entity-tag list ``value`` (or ``*``) holds ``etag`` - compared weakly
    (``W/`` ignored, for ``If-None-Match``) or strongly (``If-Match``), RFC 9110 §8.8.3.2."""
    value = value.strip()
    if value == b"*":
        return True
    for tag in value.split(b","):
        tag = tag.strip()
        if tag.startswith(b"W/"):
            if not weak:
                continue
            tag = tag[2:]
        if tag == etag:
            return True
    return False


def _preconditions(conditions: dict[bytes, bytes], etag: bytes, mtime: int) -> int:
    """RFC 9110 §13.2.2's evaluation for GET and HEAD: ``412`` (``If-Match`` or
    ``If-Unmodified-Since`` fails), ``304`` (``If-None-Match`` matches, or when it is
    absent, not modified since ``If-Modified-Since``) or ``200`` (serve it)."""
    if not conditions:
        return 200
    if_match = conditions.get(b"if-match")
    if if_match is not None:
        if not _etag_matches(if_match, etag, weak=False):
            return 412
    else:
        since = _parse_http_date(conditions.get(b"if-unmodified-since"))
        if since is not None and mtime > since:
            return 412
    if_none_match = conditions.get(b"if-none-match")
    if if_none_match is not None:
        return 304 if _etag_matches(if_none_match, etag, weak=True) else 200
    since = _parse_http_date(conditions.get(b"if-modified-since"))
    if since is not None and mtime <= since:
        return 304
    return 200


def _if_range_holds(value: bytes | None, etag: bytes, mtime: int) -> bool:
    """Whether ``Range`` applies given ``If-Range`` (RFC 9110 §13.1.5): absent, a strong
    match of the entity-tag, or exactly the ``Last-Modified`` date."""
    if value is None:
        return True
    value = value.strip()
    if value.startswith((b'"', b"W/")):
        return value == etag
    return _parse_http_date(value) == mtime


def _number(digits: bytes) -> int:
    """A range bound: decimal digits, capped at 2**63 (beyond any file's size, and
    short of int()'s limit on long strings)."""
    return 1 << 63 if len(digits) > 18 else int(digits)


def _single_range(value: bytes, size: int) -> tuple[int, int] | tuple[()] | None:
    """The one byte range ``Range: bytes=...`` selects of ``size`` bytes, as ``(first,
    last)`` inclusive; ``()`` to ignore the header and send the whole file (another unit,
    bad syntax, or several ranges - answered 200 whole, as nginx may); ``None`` when
    unsatisfiable (``416``).  RFC 9110 §14.1.2."""
    unit, _, spec = value.partition(b"=")
    if unit.strip().lower() != b"bytes" or b"," in spec:
        return ()
    first_text, dash, last_text = spec.strip().partition(b"-")
    if not dash:
        return ()
    first_text, last_text = first_text.strip(), last_text.strip()
    if not (first_text.isdigit() or first_text == b"") or not (
        last_text.isdigit() or last_text == b""
    ):
        return ()
    if first_text == b"":
        if last_text == b"":
            return ()
        suffix = _number(last_text)  # the last N bytes
        if suffix == 0 or size == 0:
            return None
        return max(0, size - suffix), size - 1
    first = _number(first_text)
    last = _number(last_text) if last_text else None
    if last is not None and last < first:
        return ()  # invalid: ignored (RFC 9110 §14.1.1)
    if first >= size:
        return None
    return first, size - 1 if last is None else min(last, size - 1)


def _body_headers(request: h11.Request) -> tuple[int | None, bool]:
    """The request's ``Content-Length`` (``None`` if absent) and whether it has a
    ``Transfer-Encoding`` (h11 has validated both)."""
    length = None
    encoded = False
    for name, value in request.headers:
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding":
            encoded = True
    return length, encoded


# -- the actors -------------------------------------------------------------------------


class Timeouts:
    """The head, body and idle timeouts of every connection of a server, kept by one task.

    A connection waiting for input publishes its deadline in a :class:`Wait`; the
    :meth:`run` task looks every ``tick`` seconds (an eighth of the shorter timeout, at
    most one second) and cancels the wait of each connection past its deadline.  So a
    connection pays two attribute stores per read, not a timer, and one is closed at most
    ``tick`` seconds after its deadline.

    Args:
        head_timeout: seconds a request head may take (see :func:`serve`).
        idle_timeout: seconds a kept-alive connection may wait for a next request.
        body_timeout: seconds a request body may take, from the end of its head.

    Raises:
        ValueError: a timeout is not a positive number.
    """

    __slots__ = ("body_timeout", "head_timeout", "idle_timeout", "tick", "waits")

    def __init__(
        self,
        head_timeout: float = HEAD_TIMEOUT,
        idle_timeout: float = IDLE_TIMEOUT,
        body_timeout: float = BODY_TIMEOUT,
    ):
        for name, value in (
            ("head_timeout", head_timeout),
            ("idle_timeout", idle_timeout),
            ("body_timeout", body_timeout),
        ):
            if not value > 0 or math.isinf(value):
                raise ValueError(f"{name} must be a positive number of seconds, not {value!r}")
        self.head_timeout = head_timeout
        self.idle_timeout = idle_timeout
        self.body_timeout = body_timeout
        self.tick = min(head_timeout, idle_timeout, body_timeout, 8.0) / 8
        self.waits: set[Wait] = set()

    async def run(self) -> None:
        """Cancel each wait past its deadline, every ``tick`` seconds, until cancelled."""
        while True:
            await anyio.sleep(self.tick)
            now = anyio.current_time()
            for wait in self.waits:
                if wait.deadline <= now:
                    wait.deadline = math.inf
                    wait.scope.cancel()


class Wait:
    """A connection's wait for input: its deadline (``math.inf`` while it is not
    waiting) and the cancel scope :class:`Timeouts` cancels when the deadline passes."""

    __slots__ = ("deadline", "scope")

    def __init__(self, scope: anyio.CancelScope) -> None:
        self.deadline = math.inf
        self.scope = scope


async def serve_connection(
    port: ports.Port,
    files: StaticFiles,
    request_memory: int,
    pool: MemoryPool | None,
    timeouts: Timeouts | None = None,
    access_log: bool = False,
) -> None:
    """One client's actor: feed its bytes to an :class:`HttpSession`, send the answers.

    With ``access_log``, each response is written to :data:`access_logger` once it was
    handed to the port (a streamed one once its last chunk was, or the connection ended).

    With ``timeouts``, only the waits for input are timed: a head must be whole within
    ``head_timeout`` seconds of its first byte (of the connection's start, for the first
    one), and a kept-alive connection waits ``idle_timeout`` seconds for a next request;
    past either it is closed (after a ``408`` if part of a head came).
    """
    session = HttpSession(files, request_memory, pool, access_log)
    statistics = session.statistics
    entries = session.access
    host = str(port.remote_address[0]) if entries is not None else ""
    async with port:
        waiting = HEAD
        with anyio.CancelScope() as scope:
            wait = Wait(scope)
            try:
                if timeouts is not None:
                    timeouts.waits.add(wait)
                    deadline = anyio.current_time() + timeouts.head_timeout
                else:
                    deadline = math.inf
                while True:
                    wait.deadline = deadline
                    message = await port.receive()
                    wait.deadline = math.inf
                    if message.__class__ is ports.Data:
                        session.feed(message.data)  # type: ignore[union-attr]
                    elif message.__class__ is ports.Closed:
                        session.feed(b"")
                    else:
                        continue
                    served = statistics.requests
                    while True:
                        chunks = session.responses()
                        if not chunks:
                            break
                        for chunk in chunks:
                            await port.send(chunk)
                        session.sent()
                        if entries:
                            write_access_log(host, entries)
                    if session.closing:
                        await linger(port)
                        return
                    if timeouts is None:
                        continue
                    # A deadline runs from the moment the wait it bounds began: bytes that
                    # trickle in do not move it, a new request (or its first byte) does.
                    now_waiting = session.waiting_for()
                    if now_waiting != waiting or statistics.requests != served:
                        waiting = now_waiting
                        deadline = anyio.current_time() + (
                            timeouts.head_timeout
                            if waiting == HEAD
                            else timeouts.idle_timeout
                            if waiting == IDLE
                            else timeouts.body_timeout
                            if waiting == BODY
                            else math.inf
                        )
            except (ports.BrokenPortError, ports.EndOfPort):
                return  # the client reset the connection
            except ports.SendTimeoutError:
                return  # the client took nothing for send_timeout seconds: the port closed
            except Exception:  # a bug: this connection alone ends
                log.exception("connection from %s failed", port.remote_address)
                return
            finally:
                if timeouts is not None:
                    timeouts.waits.discard(wait)
                session.release()
                if entries:  # a stream cut short, a response the client did not take
                    write_access_log(host, entries)
        # The deadline passed while waiting for input.
        if waiting in (HEAD, BODY):
            try:
                for chunk in session.timed_out():
                    port.send_nowait(chunk)  # a few hundred bytes on an idle port
                if entries:
                    write_access_log(host, entries)
                await linger(port)
            except (ports.BrokenPortError, ports.EndOfPort, ports.WouldBlock):
                pass


async def linger(port: ports.Port) -> None:
    """Close gracefully after a closing response: half-close, then read and drop what the
    client still sends (a body we refused) until it closes, for ``LINGER_SECONDS`` and
    ``LINGER_BYTES`` at most - closing with unread input would make the kernel reset the
    connection, and the client could lose the response."""
    if port.extra(TLSAttribute.tls_version, None) is None:
        await port.send_eof()  # (a TLS port cannot half-close: close_notify ends it)
    dropped = 0
    with anyio.move_on_after(LINGER_SECONDS):
        async for message in port:
            if message.__class__ is ports.Data:
                dropped += len(message.data)  # type: ignore[union-attr]
                if dropped > LINGER_BYTES:
                    return


async def serve(
    ios: ioserver.IOServer,
    host: str = "127.0.0.1",
    port: int = 8080,
    *,
    root: str | os.PathLike[str] = ".",
    request_memory: int = REQUEST_MEMORY,
    handler_memory: int = HANDLER_MEMORY,
    head_timeout: float = HEAD_TIMEOUT,
    idle_timeout: float = IDLE_TIMEOUT,
    body_timeout: float = BODY_TIMEOUT,
    send_timeout: float = SEND_TIMEOUT,
    access_log: bool = True,
    tls: ssl.SSLContext | None = None,
    task_status: anyio.abc.TaskStatus[Any] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the files under ``root`` on ``host:port``; report the bound address through
    ``task_status``.

    Args:
        ios: the I/O server.
        host: the address to listen on.
        port: the TCP port (0: any free one).
        root: the directory to serve.
        request_memory: each request's budget in bytes.
        handler_memory: the budget in bytes of all requests in flight together.
        head_timeout: seconds a request head may take to arrive whole, from its first
            byte (from the connection's start for the first request); past it the
            server answers ``408`` and closes.
        idle_timeout: seconds a kept-alive connection may wait for its next request
            before it is closed.
        body_timeout: seconds a request body may take to arrive whole, from the end of
            its head (a body trickled byte by byte does not move it); past it the server
            answers ``408`` and closes.
        send_timeout: seconds a response may wait on a busy port (a client that takes
            none of it) before the connection is closed - the port's ``send_timeout``
            (Erlang's), as nginx's ``send_timeout`` (60 s).  A streamed file holds a
            chunk of the pool until it is sent: this bounds how long a client that
            stopped reading holds it.
        access_log: write a line per response to :data:`access_logger`
            (``ioserver.httpd.access``, INFO) in the combined log format; where it goes is
            the logging configuration's business (:func:`configure_access_log`).
        tls: serve HTTPS with this server context (:func:`tls_context`); ``None``: HTTP.

    Raises:
        ValueError: a timeout is not a positive number.
        ioserver.OptionError: ``send_timeout`` is not a positive number.
    """
    timeouts = Timeouts(head_timeout, idle_timeout, body_timeout)
    files = StaticFiles(root)
    pool = MemoryPool(handler_memory)
    async with (
        await ports.listen_tcp(
            ios, host, port, send_timeout=send_timeout, send_timeout_close=True, tls=tls
        ) as listener,
        anyio.create_task_group() as task_group,
    ):
        task_group.start_soon(timeouts.run)
        if access_log:
            task_group.start_soon(flush_access_log_periodically)
        task_status.started(listener.local_address)
        async for accepted in listener:
            if isinstance(accepted, ports.Error):  # e.g. a TLS handshake that failed
                log.info("%s", accepted.message)
            elif isinstance(accepted, ports.Accepted):
                task_group.start_soon(
                    serve_connection,
                    accepted.port,
                    files,
                    request_memory,
                    pool,
                    timeouts,
                    access_log,
                )


def tls_context(cert: str, key: str) -> ssl.SSLContext:
    """A server context for HTTPS: the certificate (chain) and key from PEM files, ALPN
    ``http/1.1``, Python's defaults otherwise (TLS 1.2 and later).

    Raises:
        OSError: a file cannot be read.
        ssl.SSLError: the files hold no certificate or key, or they do not match.
    """
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    context.set_alpn_protocols(["http/1.1"])
    return context


def byte_size(text: str) -> int:
    """``"1048576"``, ``"64k"``, ``"1M"``, ``"2G"`` → bytes (powers of 1024)."""
    text = text.strip()
    scale = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}.get(text[-1:].lower(), 1)
    number = int(text[:-1] if scale != 1 else text)
    if number <= 0:
        raise argparse.ArgumentTypeError(f"a size must be positive, not {text!r}")
    return number * scale


def seconds(text: str) -> float:
    """``"2.5"`` → 2.5 seconds (positive)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"a timeout must be positive and finite, not {text!r}")
    return value


async def main(ios: ioserver.IOServer, argv: Sequence[str] = ()) -> None:
    parser = argparse.ArgumentParser(prog="httpd", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8080, help="TCP port (default 8080)")
    parser.add_argument("--root", default=".", help="directory to serve (default: .)")
    parser.add_argument(
        "--request-memory",
        type=byte_size,
        default=REQUEST_MEMORY,
        help="bytes one request may hold: body, file read, response (default 1M)",
    )
    parser.add_argument(
        "--handler-memory",
        type=byte_size,
        default=HANDLER_MEMORY,
        help="bytes all requests in flight may hold together (default 64M)",
    )
    parser.add_argument(
        "--memory-limit",
        type=byte_size,
        default=None,
        help="the I/O server's budget for buffered input and output "
        "(ioserver.open(memory_limit=...)); default: unlimited",
    )
    parser.add_argument(
        "--head-timeout",
        type=seconds,
        default=HEAD_TIMEOUT,
        help="seconds a request head may take from its first byte; then 408 and close (default 10)",
    )
    parser.add_argument(
        "--body-timeout",
        type=seconds,
        default=BODY_TIMEOUT,
        help="seconds a request body may take after its head; then 408 and close (default 30)",
    )
    parser.add_argument(
        "--idle-timeout",
        type=seconds,
        default=IDLE_TIMEOUT,
        help="seconds a kept-alive connection may wait for its next request (default 5)",
    )
    parser.add_argument(
        "--switch-interval",
        type=float,
        default=None,
        help="sys.setswitchinterval(SECONDS) for this process (default: Python's, 0.005)",
    )
    parser.add_argument(
        "--access-log",
        metavar="FILE",
        default="-",
        help="where the access log goes, a line per response in the combined log format: "
        "a file (appended to; reopened when moved), or - for standard error (the default)",
    )
    parser.add_argument(
        "--no-access-log",
        dest="access_log",
        action="store_const",
        const=None,
        help="write no access log",
    )
    parser.add_argument(
        "--tls-cert", metavar="FILE", help="serve HTTPS: the certificate (chain), PEM"
    )
    parser.add_argument("--tls-key", metavar="FILE", help="the private key of --tls-cert, PEM")
    options = parser.parse_args(argv)
    tls = None
    if (options.tls_cert is None) != (options.tls_key is None):
        parser.error("--tls-cert and --tls-key go together")
    if options.tls_cert is not None:
        try:
            tls = tls_context(options.tls_cert, options.tls_key)
        except (OSError, ssl.SSLError) as exc:
            parser.error(f"--tls-cert/--tls-key: {exc.strerror or exc}")
    if options.switch_interval is not None:
        sys.setswitchinterval(options.switch_interval)
    try:
        configure_access_log(options.access_log)
    except OSError as exc:
        parser.error(f"--access-log {options.access_log}: {exc.strerror or exc}")
    settings = {
        "root": options.root,
        "request_memory": options.request_memory,
        "handler_memory": options.handler_memory,
        "head_timeout": options.head_timeout,
        "idle_timeout": options.idle_timeout,
        "body_timeout": options.body_timeout,
        "access_log": options.access_log is not None,
        "tls": tls,
    }

    async def run(server: ioserver.IOServer) -> None:
        async with anyio.create_task_group() as task_group:
            address = await task_group.start(
                lambda task_status: serve(
                    server, options.host, options.port, **settings, task_status=task_status
                )
            )
            print(
                f"httpd serving {options.root} on "
                f"{'https' if tls else 'http'}://{address[0]}:{address[1]}/",
                flush=True,
            )

    if options.memory_limit is None:
        await run(ios)
    else:
        # `ioserver run` opened `ios` without a budget: serve from one opened with it.
        async with ioserver.open(memory_limit=options.memory_limit) as bounded:
            await run(bounded)


if __name__ == "__main__":
    sys.exit(ioserver.main(["run", __file__, *sys.argv[1:]]))
