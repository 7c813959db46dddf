"""Open requests: what a loop hands the I/O thread to open a port, as values.

A loop opens a port in two steps (see ``ports._port._Request``): it makes the port's loop
half, then queues an open command carrying one of these frozen dataclasses; the I/O thread
(or, behind a daemon's client, :class:`client._remote.RemoteIO`) opens the socket and
answers the waiting request with ``(conn, local address, remote address)`` or an
exception.  The same values cross from the daemon's control endpoint
(:mod:`~._control`) to its I/O thread, and a request whose host name must be resolved
first is copied with the resolved ``address`` (:func:`dataclasses.replace`).

They name their fields, so that each kind's request says what it carries and the sides
cannot disagree on an order.  None of them is mutated after it is made.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["ConnectRequest", "ListenRequest", "UDPRequest"]

#: Makes the loop's half of an accepted connection, on the I/O thread: called with the
#: connection's I/O half, the local address and the peer's address.
MakePort = Callable[[Any, Any, Any], Any]


@dataclass(frozen=True, slots=True)
class ConnectRequest:
    """Connect a stream socket (TCP, or Unix with ``family=AF_UNIX``)."""

    #: The loop's half of the new port: what its messages are delivered to.
    port: Any
    #: The owning loop's inbox: ``deliver((port or request, message))``.
    deliver: Callable[[Any], None]
    family: int
    #: A socket address of ``family`` (a ``(host, port...)`` tuple, or a path).
    address: Any
    #: The port's validated options (``_options.port_options``).
    options: dict[str, Any]
    #: The active mode ``(credit, notify_passive)`` (``_options.parse_active``).
    active: tuple[int, bool]


@dataclass(frozen=True, slots=True)
class ListenRequest:
    """Listen on a stream socket (TCP, or Unix with ``family=AF_UNIX`` and a path)."""

    #: The loop's half of the listener.
    port: Any
    deliver: Callable[[Any], None]
    family: int
    address: Any
    #: The listening socket's options (``backlog``...) and those of each accepted port,
    #: with ``"active"``: the accepted ports' active mode ``(credit, notify_passive)``.
    options: dict[str, Any]
    #: The listener's own active mode: how many connections it accepts.
    active: tuple[int, bool]
    #: Makes each accepted connection's loop half (see :data:`MakePort`).
    make_port: MakePort


@dataclass(frozen=True, slots=True)
class UDPRequest:
    """Open a UDP socket, bound to ``bind`` and, when ``connect`` is given, connected."""

    port: Any
    deliver: Callable[[Any], None]
    family: int
    bind: Any
    connect: Any
    #: The validated UDP options (``_options.udp_options``).
    options: dict[str, Any]
    active: tuple[int, bool]
