"""TCP ports: connect and listen (Erlang's ``gen_tcp``), the loop's half.

A TCP connection is a :class:`~ports.Port` and a listener a :class:`~ports.Listener`
(``ports/_port.py``, which every stream kind shares); this module opens them: it resolves
the address, validates the options (``ioserver._options``) and hands the I/O thread an
open request (``ioserver._contract``).  The I/O thread's half of TCP is
``ioserver/_tcp.py``.  Unix stream sockets open through the same two steps
(:func:`open_stream`, :func:`open_listener`), with their own address and bind.
"""

from __future__ import annotations

import os
import socket
import ssl
from collections.abc import Callable
from functools import partial
from typing import Unpack

import anyio

from ioserver._conn import Conn
from ioserver._contract import ConnectRequest, ListenRequest, SocketAddress
from ioserver._exceptions import ConnectError, NotSupportedError, OptionError, errno_name
from ioserver._hub import Hub
from ioserver._iothread import IOThread
from ioserver._options import (
    LISTEN_OPTIONS,
    ListenOptions,
    PortOptions,
    StreamOptions,
    check_options,
    port_options,
)
from ioserver._server import IOServer
from ioserver._systemd import cmd_listen_inherited, return_listener, take_listener
from ioserver._tls import HANDSHAKE_TIMEOUT

from ._port import Listener, Port, _opened, _Request, _resolve

__all__ = ["WORKER_ENVIRONMENT", "connect_tcp", "listen_tcp", "open_listener", "open_stream"]

#: Set in each worker of ``ioserver serve --workers N`` (to the worker's index).
WORKER_ENVIRONMENT = "IOSERVER_WORKER"

#: The address families whose stream ports the native core's thread carries itself.
_NATIVE_FAMILIES = (socket.AF_INET, socket.AF_INET6, socket.AF_UNIX)


async def connect_tcp(
    server: IOServer,
    host: str,
    port: int,
    *,
    tls: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
    tls_handshake_timeout: float | None = HANDSHAKE_TIMEOUT,
    **options: Unpack[PortOptions],
) -> Port:
    """Connect to ``host:port`` over TCP and return the open :class:`Port`.

    As Erlang's ``gen_tcp:connect/3``.  The I/O thread connects without blocking; names
    are resolved first (numeric addresses need no thread).  Each address is tried in turn.

    With ``tls``, the I/O thread runs a TLS client over the connection (Erlang's
    ``ssl:connect/3``, asyncio's ``open_connection(ssl=...)``): the call returns once the
    handshake succeeded, and the port's ``Data`` and sends are plaintext, in every packet
    mode, under the same flow control and memory budget.  ALPN, client certificates,
    versions and ciphers are the context's (``set_alpn_protocols``,
    ``load_cert_chain``...).  The peer's certificate, the cipher and the ALPN protocol are
    :class:`anyio.streams.tls.TLSAttribute` values: ``port.extra(TLSAttribute.cipher)``.
    Closing the port sends ``close_notify``; :meth:`Port.send_eof` raises
    :exc:`NotImplementedError`, as anyio's ``TLSStream.send_eof``.

    It checks for cancellation before it acts: a call that raises ``Cancelled`` at once
    connected nothing (trio's rule).

    Args:
        server: the I/O server (from :func:`ioserver.open`).
        host: a name or an IPv4/IPv6 address.
        port: the TCP port, 0..65535.
        tls: a client :class:`ssl.SSLContext` (``ssl.create_default_context()``), or
            ``None`` for plaintext.
        server_hostname: the name the server's certificate must match and the SNI sent;
            ``host`` by default (an IP address is matched, and no SNI sent).  Only with
            ``tls``.
        tls_handshake_timeout: seconds the handshake may take after the TCP connect
            (default 10); ``None`` for no bound.
        options: the port's options, see :class:`PortOptions`.

    Raises:
        TLSError: the handshake failed (a certificate that does not verify, a name that
            does not match, a peer that speaks no TLS, the timeout); ``errno_name`` is
            ``"ETLS"`` or ``"ETIMEDOUT"``, ``reason`` OpenSSL's.  Nothing is left open.
        ConnectError: the name did not resolve (``errno_name`` like ``"EAI_NONAME"``) or
            no address accepted the connection (``"ECONNREFUSED"``, ``"ETIMEDOUT"``...):
            the message names the address and the cause.
        OptionError: an unknown option or a wrong value (``tls`` not a client
            :class:`ssl.SSLContext`, ``server_hostname`` without ``tls``...).
        NotSupportedError: ``tls`` on a daemon's server (:func:`client.connect`): an
            :class:`ssl.SSLContext` cannot cross to the daemon's process.
        ClosedPortError: the I/O server is closed.
    """
    hub = server._check_open("ports.connect_tcp")
    _check_tls(server, tls, "ports.connect_tcp", server_side=False)
    if server_hostname is not None and tls is None:
        raise OptionError("server_hostname is given without tls=: it names a TLS server")
    _check_timeout(tls_handshake_timeout)
    credit, settings = port_options(dict(options), "a TCP port")
    # The checkpoint comes before anything is opened: a call that raises Cancelled opened
    # nothing (trio's rule), no peer saw a connection, no address was bound.
    await anyio.lowlevel.checkpoint_if_cancelled()
    addresses = await _resolve(host, port, passive=False)
    error: BaseException | None = None
    for family, address in addresses:
        result = await open_stream(
            server,
            hub,
            family,
            address,
            credit,
            settings,
            tls=tls,
            server_hostname=host if server_hostname is None else server_hostname,
            tls_handshake_timeout=tls_handshake_timeout,
        )
        if isinstance(result, Port):
            return result
        error = result
    assert error is not None
    raise error


async def open_stream(
    server: IOServer,
    hub: Hub,
    family: int,
    address: SocketAddress,
    credit: tuple[int, bool],
    settings: StreamOptions,
    *,
    tls: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
    tls_handshake_timeout: float | None = None,
) -> Port | BaseException:
    """Connect a stream socket of ``family`` (TCP, Unix) to ``address``: the open
    :class:`Port`, or the exception the I/O half answered (a :class:`ConnectError`...).
    With ``tls`` (a client context), the I/O half runs the TLS handshake after the
    connect (``ioserver._tls``) and answers once it is over; ``server_hostname`` (the
    name checked and sent as SNI) and ``tls_handshake_timeout`` go with it."""
    io = server._io
    # The native core's thread carries a TCP or Unix port without TLS itself (its hosted
    # half the others): the port's window is then the native one.
    native = family in _NATIVE_FAMILIES and tls is None
    result_port = Port(server, credit, settings, native)
    request = _Request(io, hub)
    io.submit(
        io.cmd_connect,
        request,
        ConnectRequest(
            result_port,
            hub.deliver,
            family,
            address,
            settings,
            credit,
            tls,
            server_hostname if tls is not None else None,
            tls_handshake_timeout if tls is not None else None,
        ),
    )
    try:
        result = await request.wait()
    except BaseException:
        # Cancelled: the port object is abandoned, and what the I/O thread delivered to it
        # before the connection closed is counted taken (a closed port's _deliver).
        result_port.close_nowait()
        raise
    if isinstance(result, BaseException):
        result_port.close_nowait()  # (the same, for an answer the drain failed to build)
        return result
    result_port._conn, result_port._local_address, result_port._remote_address = result
    return result_port


def _check_tls(
    server: IOServer, tls: ssl.SSLContext | None, function: str, *, server_side: bool
) -> None:
    """Refuse a ``tls`` that is not an :class:`ssl.SSLContext` of the right side, or one
    given to a daemon's server."""
    if tls is None:
        return
    if not isinstance(tls, ssl.SSLContext):
        raise OptionError(f"tls must be an ssl.SSLContext or None, not {type(tls).__name__}")
    if not isinstance(server._io, IOThread):
        raise NotSupportedError(
            f"{function}(tls=...) is not supported through an ioserver daemon "
            "(client.connect()): an ssl.SSLContext, its keys and callbacks cannot cross to "
            "the daemon's process; open TLS ports on a local I/O server (ioserver.open)"
        )
    wrong = ssl.PROTOCOL_TLS_CLIENT if server_side else ssl.PROTOCOL_TLS_SERVER
    if tls.protocol == wrong:
        side = "server" if server_side else "client"
        raise OptionError(
            f"tls is a {'client' if server_side else 'server'} context; {function} needs a "
            f"{side} one (ssl.create_default_context("
            f"{'ssl.Purpose.CLIENT_AUTH' if server_side else ''}))"
        )


def _check_timeout(timeout: float | None) -> None:
    if timeout is not None and (
        isinstance(timeout, bool)
        or not isinstance(timeout, (int, float))
        or not timeout > 0
        or timeout == float("inf")
    ):
        raise OptionError(
            f"tls_handshake_timeout must be a positive number of seconds or None, not {timeout!r}"
        )


async def listen_tcp(
    server: IOServer,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    backlog: int = 1024,
    reuseaddr: bool = True,
    reuseport: bool | None = None,
    tls: ssl.SSLContext | None = None,
    tls_handshake_timeout: float | None = HANDSHAKE_TIMEOUT,
    **options: Unpack[PortOptions],
) -> Listener:
    """Listen on ``host:port`` for TCP connections; return the :class:`Listener`.

    As Erlang's ``gen_tcp:listen/2``, except that the I/O thread accepts by itself: the
    listener's messages are :class:`~ioserver.Accepted` ports.  ``port=0`` picks a free
    port: read it from ``listener.local_address``.  Binds the first address ``host``
    resolves to; IPv6 listeners are IPv6-only.

    It checks for cancellation before it acts: a call that raises ``Cancelled`` at once
    bound nothing (trio's rule).

    Args:
        server: the I/O server.
        host: the address to bind; ``"127.0.0.1"`` by default (never all interfaces
            unless you say ``"0.0.0.0"`` or ``"::"``).
        port: the TCP port, 0..65535.
        backlog: the kernel's queue of connections not yet accepted.
        reuseaddr: ``SO_REUSEADDR`` (default ``True``: restart without waiting).
        reuseport: ``SO_REUSEPORT`` (several processes share the port); by default on
            only in a worker of ``ioserver serve --workers N`` (where the environment
            variable ``IOSERVER_WORKER`` is set), so that the workers share the port.
        tls: a server :class:`ssl.SSLContext` (``ssl.create_default_context(
            ssl.Purpose.CLIENT_AUTH)`` with ``load_cert_chain``): each accepted
            connection runs a TLS server (Erlang's ``ssl:listen/2``); ``None`` for
            plaintext.  ALPN (``set_alpn_protocols``), SNI (``sni_callback``) and client
            certificates (``verify_mode``) are the context's.  The I/O thread runs the
            handshake before the listener delivers the connection: ``Accepted`` comes
            once it succeeded (the port's TLS attributes are then set); a handshake that
            fails (a client that does not trust us or that we do not trust, a plaintext
            or garbage client, the timeout) is an :class:`~ioserver.Error` message on the
            listener (``errno_name`` ``"ETLS"`` or ``"ETIMEDOUT"``, the peer's address and
            OpenSSL's reason in its text), and that connection is closed, nothing else.
            The listener's active count counts TCP connections accepted.
        tls_handshake_timeout: seconds each handshake may take (default 10); ``None``
            for no bound (a client that never finishes then holds its descriptor).
        options: the options of each accepted port, see :class:`PortOptions`.

    Raises:
        ConnectError: the address is in use (``"EADDRINUSE"``), not local
            (``"EADDRNOTAVAIL"``), forbidden (``"EACCES"``), or did not resolve; or the
            socket systemd passed for it could not be adopted (``"EMFILE"``: it is kept
            for a later call).
        OptionError: an unknown option or a wrong value (``tls`` not a server
            :class:`ssl.SSLContext`...).
        NotSupportedError: ``tls`` on a daemon's server (:func:`client.connect`).
        ClosedPortError: the I/O server is closed.
    """
    hub = server._check_open("ports.listen_tcp")
    _check_tls(server, tls, "ports.listen_tcp", server_side=True)
    _check_timeout(tls_handshake_timeout)
    if reuseport is None:
        reuseport = WORKER_ENVIRONMENT in os.environ
    listen_options = {"backlog": backlog, "reuseaddr": reuseaddr, "reuseport": reuseport}
    check_options(listen_options, LISTEN_OPTIONS, "a TCP listener")
    credit, settings = port_options(dict(options), "a TCP listener's ports")
    all_options: ListenOptions = {
        **settings,
        "backlog": backlog,
        "reuseaddr": reuseaddr,
        "reuseport": reuseport,
        "active": credit,
    }
    # The checkpoint comes before anything is opened: a call that raises Cancelled opened
    # nothing (trio's rule), no peer saw a connection, no address was bound.
    await anyio.lowlevel.checkpoint_if_cancelled()
    family, address = (await _resolve(host, port, passive=True))[0]
    io = server._io
    # systemd's socket activation: a socket passed for this very address is adopted.
    inherited = take_listener(family, address) if isinstance(io, IOThread) else None
    return await open_listener(
        server,
        hub,
        family,
        address,
        all_options,
        credit,
        settings,
        inherited,
        io.cmd_listen,
        tls=tls,
        tls_handshake_timeout=tls_handshake_timeout,
    )


async def open_listener(
    server: IOServer,
    hub: Hub,
    family: int,
    address: SocketAddress,
    options: ListenOptions,
    credit: tuple[int, bool],
    settings: StreamOptions,
    inherited: socket.socket | None,
    command: Callable[[object, ListenRequest], None],
    *,
    tls: ssl.SSLContext | None = None,
    tls_handshake_timeout: float | None = None,
) -> Listener:
    """Listen on a stream socket (TCP, Unix): the loop's side every stream listener
    shares.  ``command`` is the I/O half's listen command for the kind (it binds), unless
    systemd passed a socket for this address (``inherited``: it is adopted as it is).
    Each accepted connection becomes a :class:`Port` with ``credit`` and ``settings``;
    with ``tls`` (a server context) once its TLS handshake succeeded, within
    ``tls_handshake_timeout`` seconds (``ioserver._tls``).

    Raises:
        ConnectError: the I/O half could not listen (the address in use...), or
            ``inherited`` could not be adopted (``"EMFILE"``: it goes back for later).
    """
    listener = Listener(server, (-1, False))
    io = server._io
    # The native core's thread serves a TCP or Unix listener without TLS itself (its hosted
    # half the others, and a socket systemd passed): its ports' windows are then the
    # native one.
    native = family in _NATIVE_FAMILIES and tls is None and inherited is None

    def make_port(conn: Conn, local_address: object, remote_address: object) -> Port:
        # Runs on the I/O thread, once per accepted connection.
        accepted = Port(server, credit, settings, native)
        accepted._conn = conn
        accepted._local_address = local_address
        accepted._remote_address = remote_address
        return accepted

    request = _Request(io, hub)
    spec = ListenRequest(
        listener,
        hub.deliver,
        family,
        address,
        options,
        (-1, False),
        make_port,
        tls,
        tls_handshake_timeout if tls is not None else None,
    )
    if inherited is not None:
        assert isinstance(io, IOThread)
        # The I/O thread adopts a copy: if this call is cancelled (or the adoption fails)
        # the request closes that copy, and the passed socket goes back for the next
        # listen on the address - systemd passed it once, and the port may be one this
        # process cannot bind itself.
        try:
            adopted = inherited.dup()
        except OSError as exc:  # (EMFILE...): the passed socket stays for a later listen
            return_listener(family, address, inherited)
            name = errno_name(exc.errno)
            raise ConnectError(
                f"cannot adopt the socket systemd passed for {address!r}: {exc.strerror} ({name})",
                exc.errno,
                name,
            ) from None
        io.submit(partial(cmd_listen_inherited, io, adopted), request, spec)
    else:
        io.submit(command, request, spec)
    try:
        # Closed if cancelled or refused: an Accepted delivered to it closes its port.
        result = await _opened(request, listener)
    except BaseException:
        if inherited is not None:
            return_listener(family, address, inherited)
        raise
    if inherited is not None:
        inherited.close()  # the I/O thread's copy is the listener's
    listener._conn, listener._local_address, _ = result
    return listener
