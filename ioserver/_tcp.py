"""TCP in the I/O thread: connecting, listening and accepting.

The I/O thread's half of a TCP port is a stream ``Conn``: once connected (or accepted) the
round reads, frames and writes it inline (``ioserver/_iothread.py``, its hot path).  This
module holds the rest, the pair of ``ports/_tcp.py``:

* **connect** (:func:`connect_stream`): a non-blocking ``connect_ex``; the ``Conn`` waits in the
  table as ``CONNECTING`` until the socket is writable (:func:`on_connect_event`), then
  becomes a ``STREAM`` and the request is answered ``(conn, sockname, peername)``.
* **listen** (:func:`listen_tcp`, :func:`open_listener`): bind and listen, then
  :func:`adopt_listener` puts the ``LISTENER`` in the table.  :func:`open_listener` is the
  step every stream listener shares (TCP, Unix: ``ioserver/_unix.py`` binds its path and
  keeps its socket file; a socket systemd passed goes to :func:`adopt_listener` at once).
* **accept** (:func:`on_listener_event`): up to :data:`ACCEPT_BATCH` connections per
  readiness event, each made a port by the listener's ``make_port`` and announced with
  an :class:`~._messages.Accepted` message.  A process out of descriptors stops watching
  the listener until one of the thread's ports closes (``IOThread._close``) or
  ``ACCEPT_RETRY`` passes (``IOThread._pause_listener``).
* **TLS** (``ioserver/_tls.py``): a connect or a listener with a context wraps each
  connection in a ``TLSSocket``; the ``Conn`` stays ``CONNECTING`` through the handshake
  (:func:`on_connect_event` hands it the readiness), and the layer calls back
  ``_connected`` or ``_accepted`` once it succeeded.  A listener's context and handshake
  timeout are its ``Conn.tls_server``.

Unix stream connections are the same ``Conn``: :func:`connect_stream` with ``AF_UNIX``.  What
these functions need of the I/O thread is :class:`StreamHost` (``IOThread`` is one), so
that this module does not import the round that dispatches to it.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Callable
from functools import partial
from typing import Protocol

from ._conn import CONNECTING, LISTENER, STREAM, Conn
from ._contract import ConnectRequest, ListenRequest, SocketAddress, format_address
from ._exceptions import ConnectError, PollerLimitError, errno_name
from ._messages import PASSIVE, Accepted, Error
from ._options import ListenOptions, StreamOptions
from ._poller import READ, WRITE
from ._tls import TLSHost, TLSSocket, accept_tls

__all__ = [
    "ACCEPT_BATCH",
    "StreamHost",
    "adopt_listener",
    "apply_stream_options",
    "connect_error",
    "connect_stream",
    "format_address",
    "listen_bound",
    "listen_socket",
    "listen_tcp",
    "on_connect_event",
    "on_listener_event",
    "open_listener",
]

ACCEPT_BATCH = 64  # connections accepted per readiness event of a listener
_ACCEPT_EXHAUSTED = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class StreamHost(TLSHost, Protocol):
    """What connecting, listening and accepting use of the I/O thread (``IOThread``):
    registration in its table and poller, and the stream interest rule; and what a TLS
    connection's layer uses (:class:`~._tls.TLSHost`)."""

    #: The listeners whose owner was told they ran out of descriptors, and that accepted
    #: nothing since (see :func:`on_listener_event`).
    _told_exhausted: set[Conn]

    def check_fd(self, fd: int) -> None: ...
    def _stream_interest(self, conn: Conn) -> None: ...
    def _pause_listener(self, listener: Conn) -> None: ...


# -- sockets ------------------------------------------------------------------------------
def apply_stream_options(sock: socket.socket, options: StreamOptions) -> None:
    """Set a connection's socket options (``nodelay`` on TCP, ``keepalive``, ``recbuf``,
    ``sndbuf``: see ``ports.PortOptions``)."""
    if sock.family in (socket.AF_INET, socket.AF_INET6) and options.get("nodelay", True):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if options.get("keepalive"):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    recbuf = options.get("recbuf")
    if recbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, recbuf)
    sndbuf = options.get("sndbuf")
    if sndbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)


def connect_error(number: int | None, address: object) -> ConnectError:
    """The :class:`ConnectError` of a failed connect to ``address`` with errno ``number``."""
    name = errno_name(number)
    reason = os.strerror(number) if number else "unknown error"
    where = f" to {format_address(address)}" if address is not None else ""
    return ConnectError(f"cannot connect{where}: {reason} ({name})", number, name)


# -- connect ------------------------------------------------------------------------------
def connect_stream(io: StreamHost, request: object, spec: ConnectRequest) -> None:
    """On the I/O thread: start connecting a stream socket (``IOThread.cmd_connect``);
    answer ``request`` with ``(conn, sockname, peername)`` or a :class:`ConnectError`
    (a :exc:`~ioserver.PollerLimitError` if the poller cannot watch the socket)."""
    port, deliver, family, address = spec.port, spec.deliver, spec.family, spec.address
    options, active = spec.options, spec.active
    try:
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as exc:
        deliver((request, connect_error(exc.errno, address)))
        return
    try:
        io.check_fd(sock.fileno())  # before connecting: no peer sees it
    except PollerLimitError as exc:
        sock.close()
        deliver((request, exc))
        return
    sock.setblocking(False)
    conn = Conn(sock, CONNECTING, port, deliver)
    conn.configure(options, port._window)
    conn.credit, conn.notify_passive = active
    conn.request = request
    conn.address = address
    try:
        apply_stream_options(sock, options)
        if spec.tls is not None:  # the handshake follows the connect (ioserver._tls)
            TLSSocket(
                io,
                conn,
                spec.tls,
                server_side=False,
                server_hostname=spec.server_hostname,
                timeout=spec.tls_handshake_timeout,
                established=partial(_connected, io, conn),
            )
        result = sock.connect_ex(address)
    except OSError as exc:
        result = exc.errno or errno.EINVAL
    except Exception as exc:  # e.g. an option the OS refuses with OverflowError
        sock.close()
        deliver((request, exc))
        return
    io.adopt(conn)
    if result == 0:
        _connected(io, conn)
    elif result == errno.EINPROGRESS or (
        result in (errno.EAGAIN, errno.EWOULDBLOCK) and family != socket.AF_UNIX
    ):
        io._interest(conn, WRITE)
    else:
        # (A Unix connect is done at once or fails: its EAGAIN is a listener's full
        # backlog, and the socket, unconnected, would never become ready.)
        _connect_failed(io, conn, result)


def on_connect_event(io: StreamHost, conn: Conn, mask: int) -> None:
    """A ``CONNECTING`` socket is ready: connected, or failed (``SO_ERROR``); or its
    TLS handshake (connected or accepted) goes on (``ioserver._tls``)."""
    tls = conn.tls
    if tls is not None and tls.started:
        tls.on_event(mask)
        return
    result = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if result:
        _connect_failed(io, conn, result)
    else:
        _connected(io, conn)


def _connected(io: StreamHost, conn: Conn) -> None:
    """Connected: answer the request ``(conn, sockname, peername)``; a TLS connection
    first runs its handshake, which calls this again once it succeeded."""
    tls = conn.tls
    if tls is not None and tls.handshaking:
        tls.start()
        return
    conn.kind = STREAM
    request, conn.request = conn.request, None
    conn.deliver((request, (conn, conn.sock.getsockname(), conn.sock.getpeername())))
    io._stream_interest(conn)


def _connect_failed(io: StreamHost, conn: Conn, number: int) -> None:
    request, conn.request = conn.request, None
    conn.deliver((request, connect_error(number, conn.address)))
    io._close(conn)


# -- listen -------------------------------------------------------------------------------
def open_listener(
    io: StreamHost,
    request: object,
    spec: ListenRequest,
    bind: Callable[[], socket.socket],
    where: str,
    sockname: Callable[[socket.socket], object] = socket.socket.getsockname,
) -> None:
    """On the I/O thread: the listen step every stream kind shares.  ``bind()`` makes the
    kind's socket and binds it (TCP: :func:`_bind_tcp`; Unix: its path, see
    ``ioserver/_unix.py``); then it listens with the ``backlog`` option (1024 by
    default) and becomes the listener (:func:`adopt_listener`).  A failure answers
    ``request`` with a :class:`ConnectError` naming ``where`` and the cause (e.g.
    ``"EADDRINUSE"``), and the socket is closed."""
    sock = None
    try:
        sock = bind()
        sock.listen(spec.options.get("backlog", 1024))
        name = sockname(sock)
    except OSError as exc:
        if sock is not None:
            sock.close()
        error = errno_name(exc.errno)
        spec.deliver(
            (
                request,
                ConnectError(
                    f"cannot listen on {where}: {exc.strerror or exc} ({error})",
                    exc.errno,
                    error,
                ),
            )
        )
        return
    adopt_listener(io, request, spec, sock, name)


def _bind_tcp(family: int, address: SocketAddress, options: ListenOptions) -> socket.socket:
    """A non-blocking TCP socket bound to ``address``, with the listen options
    (``reuseaddr``, ``reuseport``); IPv6 sockets are IPv6-only."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        if options.get("reuseaddr", True):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if options.get("reuseport", False):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
    except BaseException:
        sock.close()
        raise
    return sock


def listen_socket(family: int, address: SocketAddress, options: ListenOptions) -> socket.socket:
    """A non-blocking TCP socket bound to ``address`` and listening (:func:`_bind_tcp`,
    then ``backlog``): the native core's listen step, made on the loop's thread.

    Raises:
        ConnectError: the socket could not be made, bound or put to listen (the message
            names the address and the cause, e.g. ``"EADDRINUSE"``).
    """
    return listen_bound(
        lambda: _bind_tcp(family, address, options),
        options.get("backlog", 1024),
        format_address(address),
    )


def listen_bound(bind: Callable[[], socket.socket], backlog: int, where: str) -> socket.socket:
    """``bind()`` (it makes a socket of its kind and binds it), then listen with
    ``backlog``: the native core's listen step of every stream kind (TCP:
    :func:`listen_socket`; Unix: ``ioserver._unix.listen_unix_socket``).  A socket whose
    ``listen`` fails is closed.

    Raises:
        ConnectError: naming ``where`` and the cause (e.g. ``"EADDRINUSE"``).
    """
    try:
        sock = bind()
    except OSError as exc:
        raise _listen_error(exc, where) from None
    try:
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise _listen_error(exc, where) from None
    return sock


def _listen_error(exc: OSError, where: str) -> ConnectError:
    error = errno_name(exc.errno)
    return ConnectError(
        f"cannot listen on {where}: {exc.strerror or exc} ({error})", exc.errno, error
    )


def listen_tcp(io: StreamHost, request: object, spec: ListenRequest) -> None:
    """On the I/O thread: listen on a TCP address (``IOThread.cmd_listen``); answer
    ``request`` with ``(conn, sockname, None)`` or a :class:`ConnectError`."""
    open_listener(
        io,
        request,
        spec,
        lambda: _bind_tcp(spec.family, spec.address, spec.options),
        format_address(spec.address),
    )


def adopt_listener(
    io: StreamHost, request: object, spec: ListenRequest, sock: socket.socket, sockname: object
) -> None:
    """Make the listening socket ``sock`` (bound and listening, non-blocking) the
    listener ``spec`` asked for, and answer ``request`` with ``(conn, sockname, None)``:
    the step every kind of stream listener shares (TCP, Unix, a socket systemd passed).
    A poller that cannot watch it (select's ``FD_SETSIZE``) answers
    :exc:`~ioserver.PollerLimitError` instead, and ``sock`` is closed."""
    conn = Conn(sock, LISTENER, spec.port, spec.deliver)
    conn.make_port = spec.make_port
    conn.options = spec.options
    conn.address = sockname
    if spec.tls is not None:
        conn.tls_server = (spec.tls, spec.tls_handshake_timeout)
    conn.credit, conn.notify_passive = spec.active
    try:
        io.adopt(conn)
    except PollerLimitError as exc:
        sock.close()
        spec.deliver((request, exc))
        return
    spec.deliver((request, (conn, sockname, None)))
    io._interest(conn, READ if conn.credit else 0)


# -- accept -------------------------------------------------------------------------------
def on_listener_event(io: StreamHost, listener: Conn, mask: int) -> None:
    """A listener is readable: accept up to :data:`ACCEPT_BATCH` connections (fewer if
    its active credit runs out), each a ``STREAM`` port announced with ``Accepted``.

    A failed accept is an ``Error`` to the listener's owner; out of descriptors (then
    retried every ``ACCEPT_RETRY``), once an episode: the retries are not told again until
    a connection was accepted (``io._told_exhausted``)."""
    make_port = listener.make_port
    assert make_port is not None
    options = listener.options
    assert options is not None
    local_address = listener.address
    tls_server = listener.tls_server
    deliver = listener.deliver
    lport = listener.port
    told = io._told_exhausted
    for _ in range(ACCEPT_BATCH):
        if not listener.credit:
            break
        try:
            sock, address = listener.sock.accept()
        except BlockingIOError:
            return
        except OSError as exc:
            if exc.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EINTR):
                continue
            exhausted = exc.errno in _ACCEPT_EXHAUSTED
            if not (exhausted and listener in told):
                name = errno_name(exc.errno)
                message = f"accept failed: {exc.strerror} ({name})"
                deliver((lport, Error(name, exc.errno, message)))
            if exhausted:
                told.add(listener)
                # Level-triggered readiness would spin: stop watching the listener
                # until a port closes or ACCEPT_RETRY passes (IOThread._pause_listener).
                io._pause_listener(listener)
            return
        if told:
            told.discard(listener)  # (an episode out of descriptors ends)
        try:
            io.check_fd(sock.fileno())
        except PollerLimitError as exc:
            # As a listener out of descriptors: the connection is refused, the
            # listener and every other port go on.
            sock.close()
            deliver((lport, Error("EMFILE", None, f"accept refused: {exc}")))
            continue
        sock.setblocking(False)
        conn = Conn(sock, STREAM, None, deliver)
        try:
            apply_stream_options(sock, options)
        except OSError:
            sock.close()  # the peer is already gone (e.g. reset before we looked)
            continue
        conn.credit, conn.notify_passive = options["active"]
        port = make_port(conn, local_address, address)
        conn.port = port
        conn.configure(options, port._window)
        io.adopt(conn)
        if tls_server is None:
            _accepted(io, conn, lport, address)
        else:  # Accepted once the handshake succeeded (ioserver._tls)
            context, timeout = tls_server
            accept_tls(
                io,
                conn,
                context,
                timeout,
                lport,
                address,
                partial(_accepted, io, conn, lport, address),
            )
        credit = listener.credit
        if credit > 0:
            listener.credit = credit = credit - 1
            if credit == 0:
                io._interest(listener, 0)
                if listener.notify_passive:
                    deliver((lport, PASSIVE))


def _accepted(io: StreamHost, conn: Conn, lport: object, address: object) -> None:
    """An accepted connection is the listener's: ``Accepted`` (a TLS one's once its
    handshake succeeded), and the stream's interest set."""
    conn.kind = STREAM
    conn.deliver((lport, Accepted(conn.port, address)))
    io._stream_interest(conn)
