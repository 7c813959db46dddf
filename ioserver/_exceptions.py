"""The exception hierarchy: one root, compatible with anyio's and trio's.

Every exception raised by ioserver, ports and client derives from :class:`IOServerError`.
Those that mean the same as an anyio or trio exception also derive from both of theirs,
so code written against either library catches them unchanged::

    except anyio.EndOfStream:      # catches ports.EndOfPort
    except trio.ClosedResourceError:  # catches ports.ClosedPortError
"""

from __future__ import annotations

import errno as _errno
from typing import Any

import anyio
import trio

__all__ = [
    "BrokenPortError",
    "BusyPortError",
    "ClosedPortError",
    "ConnectError",
    "EndOfPort",
    "FrameError",
    "IOServerError",
    "NotSupportedError",
    "OptionError",
    "PacketTooLarge",
    "PollerLimitError",
    "SendTimeoutError",
    "TLSError",
    "UnsafeEndpointError",
    "WouldBlock",
    "errno_name",
]


def errno_name(number: int | None) -> str:
    """The symbolic name of an errno value (``104`` → ``"ECONNRESET"``), or ``"EUNKNOWN"``."""
    if number is None:
        return "EUNKNOWN"
    return _errno.errorcode.get(number, f"E{number}")


class IOServerError(Exception):
    """Root of every exception this package raises."""


class ClosedPortError(IOServerError, anyio.ClosedResourceError, trio.ClosedResourceError):
    """The port (or channel, mailbox, I/O server) was closed by this side and cannot be used.

    As anyio's :exc:`~anyio.ClosedResourceError` and trio's
    :exc:`~trio.ClosedResourceError`: raised by an operation on a resource that *you* closed,
    including in another task that was waiting on it when it was closed.
    """


class BrokenPortError(IOServerError, anyio.BrokenResourceError, trio.BrokenResourceError):
    """The connection behind the port is broken (reset by the peer, or the I/O server died).

    As anyio's :exc:`~anyio.BrokenResourceError`. ``errno_name`` names the cause when the
    operating system gave one (``"ECONNRESET"``, ``"EPIPE"``...), else it is ``None``.
    """

    def __init__(self, message: str, errno_name: str | None = None) -> None:
        super().__init__(message)
        self.errno_name = errno_name


class EndOfPort(IOServerError, anyio.EndOfStream, trio.EndOfChannel):
    """Nothing more will ever be received from this port: its final message was delivered.

    As anyio's :exc:`~anyio.EndOfStream` and trio's :exc:`~trio.EndOfChannel`; ``async for``
    over a port ends cleanly on it.
    """


class WouldBlock(IOServerError, anyio.WouldBlock, trio.WouldBlock):
    """A ``*_nowait`` operation could not complete at once (no message buffered, or full).

    As anyio's :exc:`~anyio.WouldBlock` and trio's :exc:`~trio.WouldBlock`.
    """


class BusyPortError(IOServerError, anyio.BusyResourceError, trio.BusyResourceError):
    """Another task is already receiving from this port (a port has one receiver at a time).

    As anyio's :exc:`~anyio.BusyResourceError` and trio's :exc:`~trio.BusyResourceError`.
    To wait on a port together with other sources, use :func:`ports.select`.
    """

    def __init__(self, action: str) -> None:
        # Not through anyio's BusyResourceError.__init__, which words its own message
        # around ``action`` ("Another task is already ... this resource").
        Exception.__init__(self, f"another task is already {action} on this port")
        self.action = action


class ConnectError(IOServerError, OSError):
    """A connection could not be made, or an address could not be bound or resolved.

    It is an :exc:`OSError`: ``errno`` holds the number when the operating system gave one
    and ``errno_name`` its symbolic name (``"ECONNREFUSED"``, ``"EADDRINUSE"``, or
    ``"EAI_NONAME"``-style names for resolver failures).
    """

    def __init__(self, message: str, errno: int | None = None, errno_name: str | None = None):
        if errno is not None:
            super().__init__(errno, message)
        else:
            super().__init__(message)
        self.errno_name = errno_name

    def __str__(self) -> str:
        return str(self.strerror if self.errno is not None else self.args[0])


class TLSError(ConnectError):
    """A TLS handshake failed: the connection was never usable and is closed.

    Raised by :func:`ports.connect_tcp` with ``tls=``: the peer's certificate did not
    verify (a CA not trusted, a host name that does not match), the peer does not speak
    TLS (a plaintext or garbage peer), no protocol version or cipher in common, or the
    handshake took longer than ``tls_handshake_timeout``.  It is a :exc:`ConnectError`:
    ``errno_name`` is ``"ETLS"`` (``"ETIMEDOUT"`` for the timeout), ``reason`` OpenSSL's
    reason (``"CERTIFICATE_VERIFY_FAILED"``, ``"WRONG_VERSION_NUMBER"``...) or ``None``,
    and the message says which and with whom.  On a listener the same failure is an
    :class:`~ioserver.Error` message with that ``errno_name`` and text, and the
    connection is never delivered (see :func:`ports.listen_tcp`).
    """

    def __init__(
        self,
        message: str,
        errno: int | None = None,
        errno_name: str | None = "ETLS",
        reason: str | None = None,
    ) -> None:
        super().__init__(message, errno, errno_name)
        self.reason = reason

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (str(self), self.errno, self.errno_name, self.reason))


class OptionError(IOServerError, ValueError):
    """An option has a wrong name, type or value. The message names the option and why."""


class NotSupportedError(OptionError):
    """The I/O server given cannot carry this kind of port.

    Raised at once by the port function, before anything is opened or started: a TUN
    port off Linux, or a server from
    :func:`client.connect` (an ioserver daemon's) given what its protocol does not carry
    (a process port's ``env``, ``cwd`` or ``stderr="port"``: the program is the daemon's
    child, argv only).  It is an :exc:`OptionError` (a :exc:`ValueError`): an argument is
    the wrong one for this call.
    """


class SendTimeoutError(IOServerError, TimeoutError):
    """A send waited longer than the port's ``send_timeout`` for a busy port to drain.

    As Erlang's ``{error, timeout}`` from ``gen_tcp:send/2`` with ``{send_timeout, T}``;
    with ``send_timeout_close=True`` the port is closed as well.
    """


class UnsafeEndpointError(ConnectError):
    """An ``ipc://`` control endpoint that another user could control: refused.

    Raised by ``ioserver serve`` before it binds and by :func:`client.connect` (and
    ``ioserver status``) before they connect, when the socket's directory is a symbolic
    link, belongs to another uid or is open to group or others (it must be 0700), or the
    socket file is a link, not a socket or another uid's; and by the client when the
    process answering on the socket runs as another uid (its ``SO_PEERCRED``).  The
    message says which and what to do.  It is a :exc:`ConnectError` (``errno_name``
    ``"EPERM"``).
    """


class FrameError(IOServerError, ValueError):
    """Bytes that do not frame as the port's packet mode (``packet=...``) says.

    Raised by a framer.  On receive it stays inside the I/O thread: the owner gets an
    :class:`~ioserver.Error` (``"EPROTO"``, or ``"EMSGSIZE"`` for
    :exc:`PacketTooLarge`) with its text, then the :class:`~ioserver.Closed` that ends
    the port - as Erlang closes a port whose peer breaks ``{packet, N}``.
    """


class PacketTooLarge(FrameError):
    """A message is larger than the port's ``packet_size``.

    Raised by ``send``/``send_nowait`` of a framed port (the message is not sent) and by
    :meth:`ports.rpc.Client.call`; a received one is reported as described for
    :exc:`FrameError`.  ``limit`` is the cap and ``size`` the size the message has, the
    peer announced (a length header) or reached (a line or msgpack object still
    growing), both in ``unit``: bytes, and ``cap`` is ``"packet_size"``; or, for a msgpack
    object of too many items (``ioserver._framing.MSGPACK_MAX_ITEMS``), ``unit`` is
    ``"items"`` and ``cap`` ``"MSGPACK_MAX_ITEMS"``; or, for a received message charged
    more than the memory budget can ever grant one (``memory_limit`` less a read of 64
    KiB: see docs/reference/limits.rst), ``what`` is ``"message"``, ``unit`` ``"bytes
    charged"`` and ``cap`` ``"memory_limit less a read"``.
    """

    def __init__(
        self,
        limit: int,
        size: int,
        what: str = "packet",
        unit: str = "bytes",
        cap: str = "packet_size",
    ) -> None:
        super().__init__(f"{what} of {size} {unit} exceeds {cap}={limit}")
        self.limit = limit
        self.size = size


class PollerLimitError(ConnectError):
    """The I/O thread's poller cannot watch this port's descriptor: the port is not opened.

    Only ``select`` has such a limit: it watches descriptors below ``FD_SETSIZE`` (1024)
    only, as ``select(2)`` does.  Raised by the call that opens the port (a listener that
    accepts such a connection closes it and gets an :class:`~ioserver.Error` with
    ``errno_name="EMFILE"`` instead); every other port goes on.  ``poller`` names the
    backend, ``fd`` the descriptor and ``limit`` the bound.  It is a
    :exc:`ConnectError` (``errno`` ``None``): open fewer descriptors, or choose
    ``poller="epoll"`` or ``"poll"`` in :func:`ioserver.open`.
    """

    def __init__(self, poller: str, fd: int, limit: int) -> None:
        super().__init__(
            f"the {poller} poller cannot watch fd {fd}: it watches descriptors below "
            f"FD_SETSIZE ({limit}) only; use poller='epoll' or 'poll', or open fewer files"
        )
        self.poller = poller
        self.fd = fd
        self.limit = limit

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.poller, self.fd, self.limit))
