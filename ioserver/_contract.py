"""The contract between a port's two halves, as types mypy checks.

A port has two halves in two threads that never lock (DESIGN.md §2):

* the **loop half** lives in an event loop: ``ports.Port`` and its kinds, or, in a daemon,
  the stand-in for a client's port (``ioserver._session.RemotePortState``);
* the **I/O half** lives on the I/O thread: a stream ``Conn``, a ``Handler`` (UDP,
  ZeroMQ, a process watcher), or, in a daemon's client, ``client._remote.RemoteConn``,
  behind which the daemon plays the I/O thread over ZeroMQ.

What crosses between them is fixed here, and nothing else does:

========================  ===================================================================
from the loop to I/O      commands in the I/O thread's command queue (:class:`IOHalf`), each
                          ``(function, target, argument)``; open requests
                          (:class:`ConnectRequest`...), frozen values
from I/O to the loop      messages ``(port, message)`` through the loop's inbox
                          (:data:`Deliver`); the port is only an address there
shared, one per port      the flow-control :class:`~._flow.Window`: the loop half writes it,
                          the I/O half reads it (:class:`LoopHalf`)
read across, counters     the I/O half's counters (:class:`PortIO`), which the loop half reads
                          for statistics, send backpressure and the resume check
========================  ===================================================================

The I/O thread never reads a loop half's other fields, and the loop half never writes the
I/O half's: each side writes only its own fields, so a read across sees a value that is
old at worst, and every protocol built on such reads says why that is enough (the wake-ups
in :mod:`~._wakeup`, the pause handshake in :mod:`~._flow`, ``send_blocked`` in
``IOThread._notify_writable``).  A native I/O core implements :class:`IOHalf` and
:class:`PortIO` and calls :class:`LoopHalf` through nothing but its window.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from ._flow import Window
from ._options import ListenOptions, StreamOptions, TunSettings, UDPSettings, ZmqSettings

__all__ = [
    "ConnectRequest",
    "Deliver",
    "IOHalf",
    "ListenRequest",
    "LoopHalf",
    "MakePort",
    "PortIO",
    "ProcessControl",
    "ProcessRequest",
    "RemoteOpens",
    "SocketAddress",
    "TunRequest",
    "UDPRequest",
    "ZmqRequest",
    "format_address",
    "inet_address",
]

#: The owning loop's inbox: ``deliver((port or request, message))``, on the I/O thread.
Deliver = Callable[[tuple[Any, Any]], None]


@runtime_checkable
class LoopHalf(Protocol):
    """What the I/O half may touch of a port's loop half: its window, and nothing else.

    Declared by ``ports.Port`` (and every port kind), and the daemon's
    ``RemotePortState``.  Otherwise the loop half is an address: the I/O half delivers
    ``(port, message)`` pairs to it and never reads it.
    """

    @property
    def _window(self) -> Window: ...


#: Makes the loop half of an accepted connection, on the I/O thread: called with the
#: connection's I/O half, the local address and the peer's address.
MakePort = Callable[[Any, object, object], LoopHalf]

#: A socket address as ``socket.connect``/``bind`` take it: ``(host, port)`` (IPv4),
#: ``(host, port, flowinfo, scope_id)`` (IPv6), or a Unix socket's path.
SocketAddress = tuple[str, int] | tuple[str, int, int, int] | str | bytes


def inet_address(
    sockaddr: tuple[str, int] | tuple[str, int, int, int] | tuple[int, bytes],
) -> SocketAddress:
    """An IPv4 or IPv6 socket address as ``socket.getaddrinfo`` returns it, typed: of
    the families asked for (``AF_INET``, ``AF_INET6``), never the ``(int, bytes)`` of
    others, which is an AssertionError."""
    host, port = sockaddr[0], sockaddr[1]
    assert isinstance(host, str) and isinstance(port, int), sockaddr
    if len(sockaddr) == 4:
        return host, port, sockaddr[2], sockaddr[3]
    return host, port


def format_address(address: object) -> str:
    """``host:port`` (``[host]:port`` for IPv6), or the address's repr (a path...); never
    raises (a connect's error is built with it, and must reach its owner): an address
    whose ``repr`` raises is named by its type."""
    if isinstance(address, tuple) and len(address) >= 2:
        host = address[0]
        return f"[{host}]:{address[1]}" if ":" in host else f"{host}:{address[1]}"
    try:
        return repr(address)
    except Exception:
        return f"<{type(address).__name__} whose repr failed>"


@runtime_checkable
class PortIO(Protocol):
    """What the loop half may read of its port's I/O half (``Conn``, a receiving handler,
    the client's ``RemoteConn``): counters it never writes."""

    #: The port is closed on the I/O side (it failed, or a close was carried out).
    closed: bool
    #: Bytes read from the socket, and written to it, so far.
    bytes_in: int
    bytes_out: int
    #: What the I/O half delivered to the port (see ioserver._flow).
    delivered_bytes: int
    delivered_messages: int
    #: The current receive pause (see the handshake in ioserver._flow).
    pause_generation: int
    pauses: int
    peak_buffered: int

    def drained(self) -> bool:
        """The owner took what was delivered down to the low watermarks."""
        ...


# -- open requests ----------------------------------------------------------------------
# A loop opens a port in two steps (see ``ports._port._Request``): it makes the port's loop
# half, then queues an open command carrying one of these frozen values; the I/O thread
# (or, behind a daemon's client, ``client._remote.RemoteIO``) opens the socket and answers
# the waiting request with ``(conn, local address, remote address)`` or an exception.  The
# daemon's control endpoint makes the same values, and copies one with its address once a
# host name is resolved (``dataclasses.replace``).  Named fields: the sides cannot disagree
# on an order.


@dataclass(frozen=True, slots=True)
class ConnectRequest:
    """Connect a stream socket (TCP, or Unix with ``family=AF_UNIX``)."""

    #: The loop's half of the new port: what its messages are delivered to.
    port: LoopHalf
    #: The owning loop's inbox: ``deliver((port or request, message))``.
    deliver: Deliver
    family: int
    #: A socket address of ``family`` (a ``(host, port...)`` tuple, or a path).
    address: SocketAddress
    #: The port's validated options (``_options.port_options``).
    options: StreamOptions
    #: The active mode ``(credit, notify_passive)`` (``_options.parse_active``).
    active: tuple[int, bool]
    #: TLS over the connection (``ioserver._tls``): the client's context, or None.
    tls: ssl.SSLContext | None = None
    #: The name the server's certificate must match, sent as SNI (None: no check).
    server_hostname: str | None = None
    #: Seconds the TLS handshake may take (None: no bound).
    tls_handshake_timeout: float | None = None


@dataclass(frozen=True, slots=True)
class ListenRequest:
    """Listen on a stream socket (TCP, or Unix with ``family=AF_UNIX`` and a path)."""

    #: The loop's half of the listener.
    port: LoopHalf
    deliver: Deliver
    family: int
    address: SocketAddress
    #: The listening socket's options (``backlog``...) and those of each accepted port,
    #: with ``"active"``: the accepted ports' active mode ``(credit, notify_passive)``.
    options: ListenOptions
    #: The listener's own active mode: how many connections it accepts.
    active: tuple[int, bool]
    #: Makes each accepted connection's loop half (see :data:`MakePort`).
    make_port: MakePort
    #: TLS over each accepted connection: the server's context, or None.
    tls: ssl.SSLContext | None = None
    #: Seconds each accepted connection's TLS handshake may take (None: no bound).
    tls_handshake_timeout: float | None = None


@dataclass(frozen=True, slots=True)
class UDPRequest:
    """Open a UDP socket, bound to ``bind`` and, when ``connect`` is given, connected."""

    port: LoopHalf
    deliver: Deliver
    family: int
    #: None: no bind (the kernel binds at ``connect``).
    bind: SocketAddress | None
    connect: SocketAddress | None
    #: The validated UDP options (``_options.udp_options``).
    options: UDPSettings
    active: tuple[int, bool]


@dataclass(frozen=True, slots=True)
class TunRequest:
    """Open ``/dev/net/tun`` and attach it to the TUN or TAP device ``name``."""

    port: LoopHalf
    deliver: Deliver
    #: The device's name (empty: the kernel picks ``tunN``/``tapN``).
    name: str
    #: ``"tun"`` or ``"tap"``.
    mode: str
    #: The validated TUN/TAP options (``_options.tun_options``).
    options: TunSettings
    active: tuple[int, bool]


@dataclass(frozen=True, slots=True)
class ProcessRequest:
    """Start a program whose stdin and stdout are the port's stream (a daemon's client:
    the program runs as the daemon's child; ``ports.open_process`` starts local ones
    itself)."""

    port: LoopHalf
    deliver: Deliver
    #: The program and its arguments (checked: ``ports._process._check_argv``).
    argv: tuple[str | bytes, ...]
    #: ``"inherit"`` (the daemon's stderr), ``"devnull"`` or ``"stdout"``.
    stderr: str
    #: Seconds between SIGTERM and SIGKILL when the port closes.
    kill_grace: float
    #: The port's validated stream options (``_options.unix_options``).
    options: StreamOptions
    active: tuple[int, bool]


@dataclass(frozen=True, slots=True)
class ZmqRequest:
    """Open a ZeroMQ socket in a daemon (``ports.open_zmq`` opens local ones itself)."""

    port: LoopHalf
    deliver: Deliver
    #: The socket type's name (``"PUSH"``...).
    socket_type: str
    bind: tuple[str, ...]
    connect: tuple[str, ...]
    #: SUB topics (None: everything).
    subscribe: tuple[bytes, ...] | None
    #: The port's options as ``_options.zmq_options`` returned them (its third value).
    options: ZmqSettings
    active: tuple[int, bool]


class ProcessControl(Protocol):
    """What a process port asks of the half that runs its program: the local
    ``ProcessWatcher``, or a daemon's client's stand-in for the daemon's one."""

    pid: int

    def cmd_signal(self, number: int) -> None:
        """Send signal ``number`` to the program unless it was reaped."""
        ...

    def cmd_terminate(self, _: object) -> None:
        """SIGTERM now, SIGKILL after the port's ``kill_grace``."""
        ...


@runtime_checkable
class RemoteOpens(Protocol):
    """An I/O half that opens every kind of port by command, in another process: a
    daemon's client (``client._remote.RemoteIO``).  The port functions hand it their
    request, answered as the I/O thread answers (``(conn, local, remote)``; a TUN port
    ``(conn, device)``; a process port ``(conn, pid)``), instead of opening the socket,
    device or program here."""

    def cmd_open_udp(self, request: object, spec: UDPRequest) -> None: ...

    def cmd_open_tun(self, request: object, spec: TunRequest) -> None: ...

    def cmd_listen_unix(self, request: object, spec: ListenRequest) -> None: ...

    def cmd_open_process(self, request: object, spec: ProcessRequest) -> None: ...

    def cmd_open_zmq(self, request: object, spec: ZmqRequest) -> None: ...


class IOHalf(Protocol):
    """What the loop half may ask of the I/O half: commands, each queued as
    ``(function, target, argument)`` on :attr:`commands` and run on the I/O thread.

    Implemented by ``IOThread`` and by the daemon's client's ``RemoteIO`` (which forwards
    them to the daemon).  ``target`` is the port's I/O half (or the waiting request of an
    open).
    """

    #: The command queue (an ``ioserver._wakeup.WakeupQueue``): ``put`` from any loop.
    commands: Any
    #: ``cmd_send``, bound once: the I/O thread recognises it by identity (the hot path).
    send_command: Callable[[Any, Any], None]
    #: Bytes of one port's buffered input past which the port is closed (None: no bound).
    port_buffer_limit: int | None

    def cmd_close(self, conn: object, _: object) -> None:
        """Close once the queued output is written."""
        ...

    def cmd_send_eof(self, conn: object, _: object) -> None:
        """Half-close the sending side once the queued output is written."""
        ...

    def cmd_set_active(self, conn: object, mode: tuple[int, bool]) -> None:
        """Apply an active mode ``(credit, notify_passive)``."""
        ...

    def cmd_read_once(self, conn: object, _: object) -> None:
        """A passive port's receiver waits: let one message through."""
        ...

    def cmd_resume(self, conn: object, generation: int) -> None:
        """The owner took enough after the pause ``generation`` (see ioserver._flow)."""
        ...

    def cmd_want(self, conn: object, _: object) -> None:
        """The owner of a port paused by the memory budget waits for input."""
        ...

    def cmd_connect(self, request: object, spec: ConnectRequest) -> None:
        """Open a connection; answer ``request``."""
        ...

    def cmd_listen(self, request: object, spec: ListenRequest) -> None:
        """Open a listener; answer ``request``."""
        ...
