"""UDP ports: datagrams in and out, with addresses, as messages (Erlang's ``gen_udp``).

The I/O thread's half is :class:`ioserver._udp.DatagramHandler`; this module is the
actor's half.  A :class:`UDPPort` shares the TCP ports' machinery (buffer, waiting,
owner, select, active modes, receive watermarks) through ``_PortBase``; what differs is
that a message is a :class:`~ioserver.Datagram` rather than :class:`~ioserver.Data` (so
this module counts what the owner takes of them), and that sends are datagrams with
addresses.  The common port commands (close, active modes, resume) reach the handler
through the I/O thread's ``Handler`` dispatch.
"""

from __future__ import annotations

import socket
from functools import partial
from typing import Any, Unpack

import anyio
import anyio.abc
import trio
import trio.abc

from ioserver._contract import RemoteOpens, SocketAddress, UDPRequest
from ioserver._exceptions import (
    BrokenPortError,
    BusyPortError,
    ClosedPortError,
    EndOfPort,
    OptionError,
    WouldBlock,
)
from ioserver._hub import Hub
from ioserver._messages import Closed, Datagram, Error, Message, Packet
from ioserver._options import UDPOptions, UDPSettings, Watermarks, udp_options
from ioserver._server import IOServer
from ioserver._udp import ERROR_CHARGE, DatagramHandler, cmd_open_udp

from ._port import (
    PASSIVE_PENDING,
    PortStatistics,
    _ObjectReceiveStream,
    _ObjectSendStream,
    _opened,
    _PortBase,
    _register_virtual,
    _Request,
    _resolve,
    _to_bytes,
)
from ._source import Waiter

__all__ = ["UDPOptions", "UDPPort", "open_udp"]

#: The largest UDP payload: 65535 minus the UDP header (8) and the IPv4 header (20);
#: IPv6's header (40) is not counted in its payload length, so 65527 there.
MAX_UDP_PAYLOAD_IPV4 = 65507
MAX_UDP_PAYLOAD_IPV6 = 65527
#: The messages that carry received data: a UDP port's, and a TUN/TAP port's
#: (``ports._tun.TunPort`` is a UDP port whose packets have no address).
_RECEIVED = (Datagram, Packet)


class UDPPort(  # type: ignore[misc]
    _PortBase,
    _ObjectReceiveStream[Message],
    _ObjectSendStream[Any],
    trio.abc.Channel[Any],
):
    """A UDP socket owned by the I/O thread, used like a channel of datagrams.

    Receive messages: :class:`~ioserver.Datagram` ``(data, address)`` for each datagram,
    :class:`~ioserver.Error` for a datagram too large for ``max_datagram`` (``EMSGSIZE``,
    dropped) or an error the network reported (``ECONNREFUSED`` when a connected port's
    peer has no socket on its port...) - neither closes the port - and, with
    ``active=N``, :class:`~ioserver.Passive`.  :class:`~ioserver.Closed` comes only when
    the I/O server stops or the port fails.  Send: ``send(data)`` on a connected port,
    ``send(Datagram(data, address))``, ``send((data, address))`` or
    :meth:`send_to` on any.  Get one from :func:`open_udp`.

    An ``Error`` counts against the receive watermarks and ``memory_limit`` as a small
    datagram does, until its owner takes it; one that would come while the port is over
    its high watermark (its owner is not taking its messages) is dropped and counted in
    ``statistics().errors_dropped``, as the kernel drops datagrams then.
    """

    __slots__ = (
        "_broken",
        "_busy_transitions",
        "_connected",
        "_family",
        "_high_watermark",
        "_low_watermark",
        "_max_payload",
        "_send_waiter",
    )

    def __init__(
        self, server: IOServer, active: tuple[int, bool], options: Watermarks, family: int
    ) -> None:
        super().__init__(server, active)
        self._family = family
        self._connected = False
        self._broken: str | None = None
        self._max_payload = (
            MAX_UDP_PAYLOAD_IPV6 if family == socket.AF_INET6 else MAX_UDP_PAYLOAD_IPV4
        )
        # The window's queued_bytes: what the owner queued, against the handler's out_done.
        self._high_watermark: int = options["high_watermark"]
        self._low_watermark: int = options["low_watermark"]
        self._send_waiter = Waiter()
        self._busy_transitions = 0

    @property
    def _handler(self) -> DatagramHandler:
        return self._conn  # type: ignore[return-value]

    # -- receiving: count Datagram messages as _PortBase counts Data ----------------------
    # An Error is charged too (ERROR_CHARGE bytes and one message: the handler counts it
    # delivered, ioserver._udp.DatagramHandler._error), so that a flood of them pauses
    # the port; every path that takes a message counts it taken (_took).
    #: Charged as _PortBase's Data are, in an owner mailbox too (``_PortBase._to_owner``).
    _CHARGED = _RECEIVED

    def _took(self, message: object) -> None:
        """Count ``message`` taken if it was charged (a datagram, a packet, an Error)."""
        if isinstance(message, _RECEIVED):
            self._took_data(message.data)
        elif message.__class__ is Error:
            self._took_charge(ERROR_CHARGE)

    def _deliver(self, message: Any) -> None:
        if isinstance(message, _RECEIVED):
            if self._closed:
                self._took_data(message.data)
            elif self._credit > 0:
                self._credit -= 1
                if self._credit == 0 and self._notify:
                    self._notify = PASSIVE_PENDING
        elif message.__class__ is Error and self._closed:
            self._took_charge(ERROR_CHARGE)
        super()._deliver(message)

    def _to_owner(self, owner: Any, message: Any) -> None:
        if message.__class__ is Error:
            # Charged until the owner takes it, as a datagram (_PortBase._to_owner).
            if owner.closed:
                self._took_charge(ERROR_CHARGE)
                self.close_nowait()
            else:
                owner._put_charged((self, message), ERROR_CHARGE)
            return
        super()._to_owner(owner, message)

    def _take(self) -> Message:
        message = super()._take()
        self._took(message)
        return message

    async def _receive(self, end: type[Exception]) -> Message:
        message = await super()._receive(end)
        self._took(message)
        return message

    async def receive(self) -> Message:
        """Wait for the next message (a :class:`~ioserver.Datagram`, mostly).

        On a passive port (``active=False``, or after its ``"once"``/N credit ran out) the
        I/O thread reads one datagram for this call, as ``gen_udp:recv`` does.

        Raises:
            EndOfPort: the final :class:`~ioserver.Closed` was already received.
            ClosedPortError: the port was closed by this side, or its messages go to an
                owner mailbox.
            BusyPortError: another task is already waiting in ``receive`` on this port.
        """
        return await self._receive(EndOfPort)

    # -- sending ------------------------------------------------------------------------
    def _on_terminal(self, message: Closed) -> None:
        self._broken = message.errno_name or message.reason
        self._on_writable()

    def _on_writable(self) -> None:
        if self._send_waiter._waiter is not None:
            self._hub.wake(self._send_waiter)

    def _check_can_send(self) -> None:
        if self._closed:
            raise ClosedPortError("this port is closed")
        if self._broken is None and self._handler.closed:
            self._broken = "EPIPE"  # the I/O thread closed it; its Closed is on its way
        if self._broken is not None:
            raise BrokenPortError(f"the UDP port failed ({self._broken})", self._broken)

    def _item(self, message: Any) -> tuple[bytes, Any]:
        """``message`` as the handler queues it: ``(data, address or None)``."""
        if isinstance(message, Datagram):
            data, address = message.data, message.address
        elif isinstance(message, tuple):
            if len(message) != 2:
                raise TypeError(
                    "a UDP port sends bytes (when connected), a Datagram or a (data, address) "
                    f"pair, not a tuple of {len(message)} items"
                )
            data, address = message
        else:
            if not self._connected:
                raise ValueError(
                    "this UDP port is not connected: send a Datagram(data, address) or a "
                    "(data, address) pair, or use send_to(data, address)"
                )
            data, address = message, None
        data = _to_bytes(data)
        if len(data) > self._max_payload:
            raise ValueError(
                f"a datagram of {len(data)} bytes exceeds the largest UDP payload "
                f"({self._max_payload} bytes over "
                f"{'IPv6' if self._family == socket.AF_INET6 else 'IPv4'})"
            )
        if address is not None:
            address = self._check_address(address)
        return data, address

    def _check_address(self, address: object) -> Any:
        # Only numeric addresses: a name would make the I/O thread block in a resolver.
        if (
            not isinstance(address, tuple)
            or len(address) not in ((2,) if self._family == socket.AF_INET else (2, 4))
            or not isinstance(address[0], str)
            or not isinstance(address[1], int)
            or isinstance(address[1], bool)
            or not 0 < address[1] <= 65535
        ):
            raise ValueError(
                f"a UDP address is a (host, port) tuple with a numeric host and a port in "
                f"1..65535 (IPv6 also (host, port, flowinfo, scope_id)), not {address!r}"
            )
        host = address[0].split("%", 1)[0]
        try:
            socket.inet_pton(self._family, host)
        except OSError:
            family = "IPv6" if self._family == socket.AF_INET6 else "IPv4"
            raise ValueError(
                f"{address[0]!r} is not a numeric {family} address (this port is {family}; "
                "resolve names before sending, e.g. with anyio.getaddrinfo)"
            ) from None
        return address

    @property
    def busy(self) -> bool:
        """True while the output not yet sent is above the high watermark."""
        return self._window.queued_bytes - self._handler.out_done > self._high_watermark

    def _queue(self, item: tuple[bytes, Any]) -> None:
        size = len(item[0])
        limit = self._io.port_buffer_limit
        if limit is not None and self._window.queued_bytes + size - self._handler.out_done > limit:
            self.close_nowait()
            raise BrokenPortError(
                f"port_buffer_limit={limit} exceeded: sending {size} bytes on top of "
                f"{self._window.queued_bytes - self._handler.out_done} queued; the port is closed",
                errno_name="ENOBUFS",
            )
        self._window.queued_bytes += size
        self._hub.queued_bytes += size
        handler = self._handler  # its class's cmd_send: a daemon's client has its own
        self._submit((type(handler).cmd_send, handler, item))

    def send_nowait(self, message: Any) -> None:
        """Queue one datagram for the I/O thread to send; return at once.

        Args:
            message: bytes-like data (a connected port only), a
                :class:`~ioserver.Datagram`, or a ``(data, address)`` pair; ``address`` is
                ``(host, port)`` with a numeric host of the port's family (IPv6 may add
                ``flowinfo, scope_id``).

        Raises:
            WouldBlock: the port is *busy* (queued output above ``high_watermark``).
            ClosedPortError: the port was closed by this side.
            BrokenPortError: the port failed (the I/O server stopped...), or the send
                would pass ``port_buffer_limit`` (the port is closed).
            ValueError: no address on an unconnected port, an address that is not numeric
                or not of the port's family, or data larger than a UDP datagram can be
                (65507 bytes over IPv4, 65527 over IPv6).
            TypeError: the data is not bytes-like.

        A datagram the kernel refuses later (no route, ``ECONNREFUSED`` reported by ICMP
        for an earlier one...) is dropped and reported as an :class:`~ioserver.Error`
        message - unless the port is over its high watermark then (its owner is not
        taking its messages): the report is dropped too and counted in
        ``statistics().errors_dropped``.  UDP promises no delivery.
        """
        self._check_can_send()
        item = self._item(message)
        if self.busy:
            self._busy_transitions += 1
            raise WouldBlock("the port is busy: its output is above high_watermark")
        self._queue(item)

    async def send(self, message: Any) -> None:
        """Queue one datagram (see :meth:`send_nowait`); wait only while the port is busy.

        As ``gen_udp:send``: it returns once the datagram is queued for the I/O thread,
        which sends it without blocking; when the queued output is above
        ``high_watermark`` it first waits until it drains below ``low_watermark``.

        Raises:
            ClosedPortError, BrokenPortError, ValueError, TypeError: as
                :meth:`send_nowait`.
            BusyPortError: another task is already waiting for this busy port.
        """
        await self._hub.checkpoint_first()  # first: a send that raises Cancelled sent nothing
        self._check_can_send()
        item = self._item(message)
        if self.busy:
            await self._wait_until_writable()
        self._queue(item)

    async def send_to(self, data: object, address: object) -> None:
        """Send ``data`` as one datagram to ``address`` (see :meth:`send`).

        Args:
            data: bytes-like, at most 65507 bytes (IPv4) or 65527 (IPv6).
            address: ``(host, port)`` with a numeric host of the port's family.
        """
        await self.send((data, address))

    async def _wait_until_writable(self) -> None:
        self._busy_transitions += 1
        if self._window.send_blocked:
            raise BusyPortError("waiting to send")
        handler = self._handler
        self._window.send_blocked = True  # written before the re-read of out_done below
        try:
            while self._window.queued_bytes - handler.out_done > self._low_watermark:
                self._check_can_send()
                await self._hub.park(self._send_waiter)
            self._check_can_send()
        finally:
            self._window.send_blocked = False

    # -- closing and statistics ---------------------------------------------------------
    def close_nowait(self) -> None:
        """Close the port without waiting: what the kernel takes at once is sent, the rest
        of the queued output and every undelivered datagram are dropped.  Idempotent."""
        if self._closed:
            return
        for message in self._buffer:
            self._took(message)
        super().close_nowait()

    def statistics(self) -> PortStatistics:
        """The port's counters now (see :class:`~ports.PortStatistics`); bytes are
        datagram payloads, ``packets_too_large`` counts datagrams dropped for exceeding
        ``max_datagram``, and ``errors_dropped`` the ``Error`` reports dropped while the
        port was over its high watermark."""
        handler = self._handler
        return PortStatistics(
            messages_buffered=len(self._buffer),
            bytes_received=handler.bytes_in,
            bytes_sent=handler.bytes_out,
            bytes_queued=handler.out_bytes,
            active=self.active,
            closed=self._closed,
            bytes_buffered_in=handler.delivered_bytes - self._window.consumed_bytes,
            bytes_buffered_out=self._window.queued_bytes - handler.out_done,
            peak_buffered=handler.peak_buffered,
            pauses=handler.pauses,
            busy_transitions=self._busy_transitions,
            packets_too_large=handler.datagrams_too_large,
            errors_dropped=getattr(handler, "errors_dropped", 0),
        )

    def __repr__(self) -> str:
        state = "closed" if self._closed else "ended" if self._ended else "open"
        peer = f" -> {self._remote_address}" if self._remote_address is not None else ""
        return f"<UDPPort {self._local_address}{peer} {state}>"


_register_virtual(UDPPort, anyio.abc.ObjectReceiveStream, anyio.abc.ObjectSendStream)


async def open_udp(
    server: IOServer,
    bind: tuple[str, int] | None = None,
    connect: tuple[str, int] | None = None,
    **options: Unpack[UDPOptions],
) -> UDPPort:
    """Open a UDP socket; return its :class:`UDPPort`.

    As Erlang's ``gen_udp:open/2`` (and ``gen_udp:connect/3`` with ``connect``).  IPv4 or
    IPv6 follows the addresses given; an IPv6 socket is IPv6-only.

    It checks for cancellation before it acts: a call that raises ``Cancelled`` at once
    opened nothing (trio's rule).

    Args:
        server: the I/O server (from :func:`ioserver.open`).
        bind: ``(host, port)`` to bind; port 0 picks a free one (read it from
            ``port.local_address``).  Default: ``("127.0.0.1", 0)`` when not connecting,
            else whatever the kernel picks for ``connect``'s family.
        connect: ``(host, port)`` of the only peer: ``send(data)`` goes there, only its
            datagrams are received, and ICMP errors (``ECONNREFUSED`` when nothing
            listens there) are reported as :class:`~ioserver.Error` messages.
        options: see :class:`UDPOptions`.

    Raises:
        ConnectError: a name did not resolve, or the address could not be bound
            (``"EADDRINUSE"``, ``"EADDRNOTAVAIL"``...) or connected.
        OptionError: an unknown option or a wrong value.
        ClosedPortError: the I/O server is closed.

    Through a daemon (:func:`client.connect`) the socket is the daemon's: it resolves
    ``bind`` and ``connect`` (the machine that sends resolves), and a failure is a
    ``ConnectError`` as here.
    """
    hub = server._check_open("ports.open_udp")
    credit, settings = udp_options(dict(options))
    # The checkpoint comes before anything is opened: a call that raises Cancelled opened
    # nothing (trio's rule), no peer saw a connection, no address was bound.
    await anyio.lowlevel.checkpoint_if_cancelled()
    io = server._io
    if isinstance(io, RemoteOpens):
        # The daemon resolves names and picks the family: the machine that sends does.
        return await _open_remote(server, io, hub, bind, connect, credit, settings)
    remote: SocketAddress | None = None
    family: int = socket.AF_INET
    if connect is not None:
        family, remote = (await _resolve(*_host_port(connect, "connect"), passive=False))[0]
    local: SocketAddress | None = None
    if bind is not None:
        candidates = await _resolve(*_host_port(bind, "bind"), passive=True)
        if connect is not None:
            matching = [pair for pair in candidates if pair[0] == family]
            if not matching:
                raise OptionError(
                    f"bind={bind!r} and connect={connect!r} are of different families"
                )
            candidates = matching
        family, local = candidates[0]
    elif connect is None:
        local = ("127.0.0.1", 0)
    port = UDPPort(server, credit, settings, family)
    request = _Request(io, hub)
    io.submit(
        partial(cmd_open_udp, io),
        request,
        UDPRequest(port, hub.deliver, family, local, remote, settings, credit),
    )
    result = await _opened(request, port)
    port._conn, port._local_address, port._remote_address = result
    port._connected = remote is not None
    return port


async def _open_remote(
    server: IOServer,
    io: RemoteOpens,
    hub: Hub,
    bind: object,
    connect: object,
    credit: tuple[int, bool],
    settings: UDPSettings,
) -> UDPPort:
    """``open_udp`` through a daemon (``client.connect``): the names go as they are."""
    remote = None if connect is None else _host_port(connect, "connect")
    local = ("127.0.0.1", 0) if bind is None and connect is None else bind
    local = None if local is None else _host_port(local, "bind")
    port = UDPPort(server, credit, settings, socket.AF_UNSPEC)
    request = _Request(server._io, hub)
    server._io.submit(
        io.cmd_open_udp,
        request,
        UDPRequest(port, hub.deliver, socket.AF_UNSPEC, local, remote, settings, credit),
    )
    result = await _opened(request, port)
    port._conn, port._local_address, port._remote_address = result
    # The daemon chose the family: its addresses say which ((host, port) is IPv4).
    local_address = port._local_address
    ipv6 = isinstance(local_address, tuple) and len(local_address) == 4
    family = socket.AF_INET6 if ipv6 else socket.AF_INET
    port._family = family
    port._max_payload = MAX_UDP_PAYLOAD_IPV6 if family == socket.AF_INET6 else MAX_UDP_PAYLOAD_IPV4
    port._connected = remote is not None
    return port


def _host_port(address: object, name: str) -> tuple[str, int]:
    if not isinstance(address, tuple) or len(address) != 2:
        raise OptionError(f"{name} must be a (host, port) tuple, not {address!r}")
    return address[0], address[1]
