"""TCP in the I/O thread: the sockets of connections and listeners.

The I/O thread's half of a TCP port is a stream ``Conn`` (``ioserver/_iothread.py``: the
round reads, frames and writes it, and connects and accepts in ``IOThread.cmd_connect``,
``cmd_listen`` and the listener's readiness); this module makes and configures its
sockets, and says what went wrong in the terms a user reads.  The loop's half is
``ports/_tcp.py``.  Unix stream sockets share all but the listening socket
(``ioserver/_unix.py``).
"""

from __future__ import annotations

import os
import socket
from typing import Any

from ._exceptions import ConnectError, errno_name

__all__ = ["apply_stream_options", "connect_error", "format_address", "listen_socket"]


def listen_socket(family: int, address: Any, options: dict[str, Any]) -> socket.socket:
    """A non-blocking TCP socket bound to ``address`` and listening, with the listen
    options (``backlog``, ``reuseaddr``, ``reuseport``); IPv6 sockets are IPv6-only.

    Raises:
        ConnectError: the socket could not be made, bound or put to listen (the message
            names the address and the cause, e.g. ``"EADDRINUSE"``).
    """
    sock = None
    try:
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        if options.get("reuseaddr", True):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if options.get("reuseport", False):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
        sock.listen(options.get("backlog", 1024))
    except OSError as exc:
        if sock is not None:
            sock.close()
        name = errno_name(exc.errno)
        raise ConnectError(
            f"cannot listen on {format_address(address)}: {exc.strerror or exc} ({name})",
            exc.errno,
            name,
        ) from None
    return sock


def apply_stream_options(sock: socket.socket, options: dict[str, Any]) -> None:
    """Set a connection's socket options (``nodelay`` on TCP, ``keepalive``, ``recbuf``,
    ``sndbuf``: see ``ports.PortOptions``)."""
    if sock.family in (socket.AF_INET, socket.AF_INET6) and options.get("nodelay", True):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if options.get("keepalive"):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    if options.get("recbuf"):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, options["recbuf"])
    if options.get("sndbuf"):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, options["sndbuf"])


def format_address(address: object) -> str:
    """``host:port`` (``[host]:port`` for IPv6), or the address's repr (a path...)."""
    if isinstance(address, tuple) and len(address) >= 2:
        host = address[0]
        return f"[{host}]:{address[1]}" if ":" in host else f"{host}:{address[1]}"
    return repr(address)


def connect_error(number: int | None, address: object) -> ConnectError:
    """The :class:`ConnectError` of a failed connect to ``address`` with errno ``number``."""
    name = errno_name(number)
    reason = os.strerror(number) if number else "unknown error"
    where = f" to {format_address(address)}" if address is not None else ""
    return ConnectError(f"cannot connect{where}: {reason} ({name})", number, name)
