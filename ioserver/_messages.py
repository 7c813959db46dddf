"""What a port delivers: small immutable messages, one class per kind of event.

They are frozen, slotted dataclasses, so they compare by value, pattern-match with
``match``/``case`` and cost no ``__dict__``.  They play the part of Erlang's port messages:
``{tcp, Socket, Data}`` is :class:`Data`, ``{tcp_closed, Socket}`` is :class:`Closed`,
``{tcp_error, Socket, Reason}`` is :class:`Error`, ``{tcp_passive, Socket}`` is
:class:`Passive`; an accepted connection arrives on a listener as :class:`Accepted`.  A UDP
port delivers :class:`Datagram` (``{udp, Socket, IP, Port, Data}``) and a process port ends
with :class:`ExitStatus` (``{Port, {exit_status, Status}}``) before its :class:`Closed`.
A TUN/TAP port delivers :class:`Packet`: a device's packet has no sender address.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = [
    "Accepted",
    "Closed",
    "Data",
    "Datagram",
    "Error",
    "ExitStatus",
    "Message",
    "Packet",
    "Passive",
]


@dataclass(frozen=True, slots=True)
class Data:
    """Bytes received from the peer (Erlang's ``{tcp, Socket, Data}``).

    ``data`` is what one read returned, so its length is between 1 byte and the port's read
    size: a raw byte stream has no message boundaries.
    """

    data: bytes


@dataclass(frozen=True, slots=True)
class Accepted:
    """A listener accepted a connection: ``port`` is its new, open port.

    ``address`` is the peer's address as the socket module gives it (``(host, port)`` for
    IPv4, ``(host, port, flowinfo, scope_id)`` for IPv6).  The new port has the options the
    listener was opened with (active mode, ``nodelay``...).  Whoever receives this message
    owns the port and must close it.
    """

    port: Any
    address: Any


@dataclass(frozen=True, slots=True)
class Closed:
    """The port's receive side ended; this is always the last message of a port.

    ``reason`` says why, in words: ``"eof"`` (the peer closed or half-closed its side:
    sending still works until you close the port), ``"closed"`` (another task closed the
    port), or an errno name such as ``"ECONNRESET"`` when the connection broke, in which case
    ``errno_name`` holds that same name and sending raises :exc:`~ports.BrokenPortError`.
    As Erlang's ``{tcp_closed, Socket}``.
    """

    reason: str
    errno_name: str | None = None


@dataclass(frozen=True, slots=True)
class Error:
    """An error that did not end the port, e.g. a listener that ran out of file descriptors.

    ``errno_name`` is the symbolic name (``"EMFILE"``), ``errno`` the number and ``message``
    a sentence for humans.  As Erlang's ``{tcp_error, Socket, Reason}``.
    """

    errno_name: str
    errno: int | None
    message: str


@dataclass(frozen=True, slots=True)
class Passive:
    """The port used up its active credit and is now passive (active mode ``False``).

    Sent when an ``active=N`` count reaches zero, as Erlang's ``{tcp_passive, Socket}``;
    call ``port.setopts(active=...)`` to receive more.
    """


@dataclass(frozen=True, slots=True)
class Datagram:
    """One UDP datagram received, or one to send (Erlang's ``{udp, Socket, IP, Port, Data}``).

    ``data`` is the whole datagram (0 bytes or more: UDP keeps message boundaries) and
    ``address`` the peer's address as the socket module gives it: ``(host, port)`` for
    IPv4, ``(host, port, flowinfo, scope_id)`` for IPv6.  An unconnected UDP port sends a
    ``Datagram`` to its ``address``, so a received one can be sent back as it is.
    """

    data: bytes
    address: Any


@dataclass(frozen=True, slots=True)
class Packet:
    """One packet read from a TUN/TAP device, or one to write to it (:func:`ports.open_tun`).

    ``data`` is the whole packet as the kernel hands it over with ``IFF_NO_PI`` (no
    packet-information header): an IPv4 or IPv6 packet on a TUN device, an Ethernet frame
    on a TAP device.  One read of the device is one ``Packet``, one ``Packet`` sent is one
    write, so packet boundaries are kept, as :class:`Datagram` keeps a datagram's.
    """

    data: bytes


@dataclass(frozen=True, slots=True)
class ExitStatus:
    """The program behind a process port ended (Erlang's ``{Port, {exit_status, Status}}``).

    ``status`` is its exit code (0..255), or ``-N`` when signal N ended it, as
    :attr:`subprocess.Popen.returncode`.  It comes after the last :class:`Data` of the
    program's output and just before the port's final :class:`Closed`.
    """

    status: int


Message = Data | Accepted | Closed | Error | Passive | Datagram | Packet | ExitStatus
"""Any message a port delivers."""

PASSIVE = Passive()


class _Writable:
    """Internal: a busy port's output drained below its low watermark (never received)."""

    __slots__ = ()


WRITABLE = _Writable()
