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
from collections.abc import Callable
from functools import partial
from typing import Unpack

from ioserver._conn import Conn
from ioserver._contract import ConnectRequest, ListenRequest, SocketAddress
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
from ioserver._systemd import cmd_listen_inherited, take_listener

from ._port import Listener, Port, _Request, _resolve

__all__ = ["WORKER_ENVIRONMENT", "connect_tcp", "listen_tcp", "open_listener", "open_stream"]

#: Set in each worker of ``ioserver serve --workers N`` (to the worker's index).
WORKER_ENVIRONMENT = "IOSERVER_WORKER"


async def connect_tcp(
    server: IOServer, host: str, port: int, **options: Unpack[PortOptions]
) -> Port:
    """Connect to ``host:port`` over TCP and return the open :class:`Port`.

    As Erlang's ``gen_tcp:connect/3``.  The I/O thread connects without blocking; names
    are resolved first (numeric addresses need no thread).  Each address is tried in turn.

    Args:
        server: the I/O server (from :func:`ioserver.open`).
        host: a name or an IPv4/IPv6 address.
        port: the TCP port, 0..65535.
        options: the port's options, see :class:`PortOptions`.

    Raises:
        ConnectError: the name did not resolve (``errno_name`` like ``"EAI_NONAME"``) or
            no address accepted the connection (``"ECONNREFUSED"``, ``"ETIMEDOUT"``...):
            the message names the address and the cause.
        OptionError: an unknown option or a wrong value.
        ClosedPortError: the I/O server is closed.
    """
    hub = server._check_open("ports.connect_tcp")
    credit, settings = port_options(dict(options), "a TCP port")
    addresses = await _resolve(host, port, passive=False)
    error: BaseException | None = None
    for family, address in addresses:
        result = await open_stream(server, hub, family, address, credit, settings)
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
) -> Port | BaseException:
    """Connect a stream socket of ``family`` (TCP, Unix) to ``address``: the open
    :class:`Port`, or the exception the I/O half answered (a :class:`ConnectError`...)."""
    io = server._io
    result_port = Port(server, credit, settings)
    request = _Request(io, hub)
    io.submit(
        io.cmd_connect,
        request,
        ConnectRequest(result_port, hub.deliver, family, address, settings, credit),
    )
    result = await request.wait()
    if isinstance(result, BaseException):
        return result
    result_port._conn, result_port._local_address, result_port._remote_address = result
    return result_port


async def listen_tcp(
    server: IOServer,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    backlog: int = 1024,
    reuseaddr: bool = True,
    reuseport: bool | None = None,
    **options: Unpack[PortOptions],
) -> Listener:
    """Listen on ``host:port`` for TCP connections; return the :class:`Listener`.

    As Erlang's ``gen_tcp:listen/2``, except that the I/O thread accepts by itself: the
    listener's messages are :class:`~ioserver.Accepted` ports.  ``port=0`` picks a free
    port: read it from ``listener.local_address``.  Binds the first address ``host``
    resolves to; IPv6 listeners are IPv6-only.

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
        options: the options of each accepted port, see :class:`PortOptions`.

    Raises:
        ConnectError: the address is in use (``"EADDRINUSE"``), not local
            (``"EADDRNOTAVAIL"``), forbidden (``"EACCES"``), or did not resolve.
        OptionError: an unknown option or a wrong value.
        ClosedPortError: the I/O server is closed.
    """
    hub = server._check_open("ports.listen_tcp")
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
    family, address = (await _resolve(host, port, passive=True))[0]
    io = server._io
    # systemd's socket activation: a socket passed for this very address is adopted.
    inherited = take_listener(family, address) if isinstance(io, IOThread) else None
    return await open_listener(
        server, hub, family, address, all_options, credit, settings, inherited, io.cmd_listen
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
) -> Listener:
    """Listen on a stream socket (TCP, Unix): the loop's side every stream listener
    shares.  ``command`` is the I/O half's listen command for the kind (it binds), unless
    systemd passed a socket for this address (``inherited``: it is adopted as it is).
    Each accepted connection becomes a :class:`Port` with ``credit`` and ``settings``.

    Raises:
        ConnectError: the I/O half could not listen (the address in use...).
    """
    listener = Listener(server, (-1, False))
    io = server._io

    def make_port(conn: Conn, local_address: object, remote_address: object) -> Port:
        # Runs on the I/O thread, once per accepted connection.
        accepted = Port(server, credit, settings)
        accepted._conn = conn
        accepted._local_address = local_address
        accepted._remote_address = remote_address
        return accepted

    request = _Request(io, hub)
    spec = ListenRequest(listener, hub.deliver, family, address, options, (-1, False), make_port)
    if inherited is not None:
        assert isinstance(io, IOThread)
        io.submit(partial(cmd_listen_inherited, io, inherited), request, spec)
    else:
        io.submit(command, request, spec)
    result = await request.wait()
    if isinstance(result, BaseException):
        raise result
    listener._conn, listener._local_address, _ = result
    return listener
