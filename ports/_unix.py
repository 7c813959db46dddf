"""Unix stream sockets: the same ports as TCP, on a path (Erlang's ``{local, Path}``).

A connection is an ordinary :class:`~ports.Port` (framing, active modes, flow control,
``send_eof``... all as for TCP) and a listener an ordinary :class:`~ports.Listener`; only
the address differs: a file system path, or on Linux a name in the abstract namespace
(a path starting with ``"\\0"``).
"""

from __future__ import annotations

import os
import socket
from typing import Unpack

import anyio

from ioserver._contract import RemoteOpens
from ioserver._options import (
    LISTEN_OPTIONS,
    ListenOptions,
    PortOptions,
    check_options,
    unix_options,
)
from ioserver._server import IOServer
from ioserver._systemd import take_listener
from ioserver._unix import check_path

from ._port import Listener, Port
from ._tcp import open_listener, open_stream

__all__ = ["connect_unix", "listen_unix"]


async def connect_unix(
    server: IOServer, path: str | bytes | os.PathLike[str], **options: Unpack[PortOptions]
) -> Port:
    """Connect to the Unix stream socket at ``path``; return the open :class:`Port`.

    As Erlang's ``gen_tcp:connect({local, Path}, 0, Options)``.  The port is a TCP-like
    byte stream with every :class:`~ports.PortOptions` option except ``nodelay`` and
    ``keepalive``; its ``remote_address`` is the path.

    It checks for cancellation before it acts: a call that raises ``Cancelled`` at once
    connected nothing (trio's rule).

    Args:
        server: the I/O server (from :func:`ioserver.open`).
        path: the socket's file system path (str, bytes or path-like, at most 107
            bytes), or on Linux an abstract name starting with ``"\\0"``.
        options: the port's options, see :class:`~ports.PortOptions`.

    Raises:
        ConnectError: nothing listens there (``"ECONNREFUSED"``), no such file
            (``"ENOENT"``), no permission (``"EACCES"``)...
        OptionError: a wrong path, an unknown option or a wrong value.
        ClosedPortError: the I/O server is closed.
        client.ProtocolError: through a daemon (:func:`client.connect`, where the path is
            on the daemon's machine) that was not started with ``--allow-unix``
            (``kind`` ``"forbidden"``).
    """
    hub = server._check_open("ports.connect_unix")
    address = check_path(path)
    credit, settings = unix_options(dict(options), "a Unix socket port")
    # The checkpoint comes before anything is opened: a call that raises Cancelled opened
    # nothing (trio's rule), no peer saw a connection, no address was bound.
    await anyio.lowlevel.checkpoint_if_cancelled()
    result = await open_stream(server, hub, socket.AF_UNIX, address, credit, settings)
    if isinstance(result, BaseException):
        raise result
    return result


async def listen_unix(
    server: IOServer,
    path: str | bytes | os.PathLike[str],
    *,
    backlog: int = 1024,
    **options: Unpack[PortOptions],
) -> Listener:
    """Listen on the Unix stream socket ``path``; return the :class:`~ports.Listener`.

    As :func:`~ports.listen_tcp`: the listener's messages are :class:`~ioserver.Accepted`
    ports, each a byte stream with the given options.  The socket file is managed:

    * a *stale* socket file at ``path`` (left by a process that ended without removing
      it: nothing accepts on it) is removed before binding;
    * a *live* one (another listener) makes this fail with ``"EADDRINUSE"``;
    * a file that is not a socket is never removed (``"EADDRINUSE"`` too);
    * the listener removes its socket file when it closes (if it is still its own).

    It checks for cancellation before it acts: a call that raises ``Cancelled`` at once
    bound nothing (trio's rule).

    Args:
        server: the I/O server.
        path: a file system path (at most 107 bytes) or, on Linux, an abstract name
            starting with ``"\\0"`` (no file at all).
        backlog: the kernel's queue of connections not yet accepted.
        options: the options of each accepted port (see :class:`~ports.PortOptions`;
            not ``nodelay`` nor ``keepalive``).

    Raises:
        ConnectError: the path is in use (``"EADDRINUSE"``), its directory does not
            exist (``"ENOENT"``) or is not writable (``"EACCES"``); or the socket systemd
            passed for it could not be adopted (``"EMFILE"``: it is kept for a later
            call).
        OptionError: a wrong path, an unknown option or a wrong value.
        ClosedPortError: the I/O server is closed.
        client.ProtocolError: through a daemon (:func:`client.connect`, where the path is
            on the daemon's machine) that was not started with ``--allow-unix``
            (``kind`` ``"forbidden"``).
    """
    hub = server._check_open("ports.listen_unix")
    address = check_path(path)
    check_options({"backlog": backlog}, LISTEN_OPTIONS, "a Unix socket listener")
    credit, settings = unix_options(dict(options), "a Unix socket listener's ports")
    all_options: ListenOptions = {
        **settings,
        "backlog": backlog,
        "reuseaddr": False,  # not read for a path (the socket file is managed instead)
        "reuseport": False,
        "active": credit,
    }
    io = server._io
    # The checkpoint comes before anything is opened: a call that raises Cancelled opened
    # nothing (trio's rule), no peer saw a connection, no address was bound.
    await anyio.lowlevel.checkpoint_if_cancelled()
    # systemd's socket activation: a socket passed for this very path is adopted.
    # A daemon's client: the path is the daemon's, and so would be an inherited socket.
    inherited: socket.socket | None = None
    if not isinstance(io, RemoteOpens):
        inherited = take_listener(socket.AF_UNIX, address)
    return await open_listener(
        server,
        hub,
        socket.AF_UNIX,
        address,
        all_options,
        credit,
        settings,
        inherited,
        io.cmd_listen_unix,
    )
