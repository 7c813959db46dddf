"""TUN/TAP ports (Linux): a network device's packets in and out as messages.

The I/O thread's half is :class:`ioserver._tun.TunHandler`, a UDP datagram handler over
the device's descriptor; this module is the actor's half.  A :class:`TunPort` *is* a
:class:`~ports.UDPPort` - the same active modes, receive watermarks, busy port, memory
charges and statistics - whose messages are :class:`~ioserver.Packet` rather than
:class:`~ioserver.Datagram` (a device's packet has no sender address), and whose sends
are packets written to the device.
"""

from __future__ import annotations

import sys
from functools import partial
from typing import Unpack, final

import anyio

from ioserver._contract import RemoteOpens, TunRequest
from ioserver._exceptions import (
    BrokenPortError,
    ClosedPortError,
    NotSupportedError,
    OptionError,
)
from ioserver._messages import Message, Packet
from ioserver._options import MAX_TUN_PACKET, TunOptions, TunSettings, tun_options
from ioserver._server import IOServer
from ioserver._tun import IFNAMSIZ, cmd_open_tun

from ._port import (
    PortStatistics,
    _opened,
    _Request,
    _to_bytes,
)
from ._udp import UDPPort

__all__ = ["MAX_PACKET", "TunOptions", "TunPort", "open_tun"]

#: The largest packet a TUN/TAP device carries (see :data:`ioserver._options.MAX_TUN_PACKET`).
MAX_PACKET = MAX_TUN_PACKET


def _check_name(name: object) -> str:
    if not isinstance(name, str):
        raise OptionError(f"a device name is a str, not {name!r}")
    size = len(name.encode("utf-8", "replace"))
    if size >= IFNAMSIZ or name in (".", "..") or any(c in name for c in "/: \t\n\0"):
        raise OptionError(
            f"{name!r} is not an interface name: at most {IFNAMSIZ - 1} bytes, no '/', ':', "
            "whitespace or NUL, not '.' or '..' (empty: the kernel picks tunN or tapN)"
        )
    return name


@final
class TunPort(UDPPort):
    """A TUN or TAP device's queue owned by the I/O thread, used like a channel of packets.

    Receive messages: :class:`~ioserver.Packet` for each packet the kernel routes to the
    device (an IP packet on TUN, an Ethernet frame on TAP), :class:`~ioserver.Error` for a
    packet larger than ``max_packet`` (``EMSGSIZE``, dropped) or one the kernel refused
    to take (neither closes the port), and, with ``active=N``, :class:`~ioserver.Passive`.
    :class:`~ioserver.Closed` comes when the I/O server stops, the device is deleted under
    the port (``EBADFD``) or the port fails.  Send: ``send(Packet(data))`` or
    ``send(data)``: each is one packet the kernel receives from the device, as if from a
    wire.  Get one from :func:`open_tun`; :attr:`device` is the device's name.
    """

    __slots__ = ("_device", "_mode", "_multi_queue")

    def __init__(self, server: IOServer, active: tuple[int, bool], options: TunSettings):
        super().__init__(server, active, options, 0)
        self._max_payload = MAX_PACKET
        self._device = ""
        self._mode = "tun"
        self._multi_queue: bool = options["multi_queue"]

    @property
    def device(self) -> str:
        """The device's name as the kernel gave it (``tun0``... for an empty name)."""
        return self._device

    @property
    def mode(self) -> str:
        """``"tun"`` (IP packets) or ``"tap"`` (Ethernet frames)."""
        return self._mode

    @property
    def multi_queue(self) -> bool:
        """Whether the device was opened with ``IFF_MULTI_QUEUE``."""
        return self._multi_queue

    async def receive(self) -> Message:
        """Wait for the next message (a :class:`~ioserver.Packet`, mostly).

        On a passive port (``active=False``, or after its ``"once"``/N credit ran out) the
        I/O thread reads one packet for this call.

        Raises:
            EndOfPort: the final :class:`~ioserver.Closed` was already received.
            ClosedPortError: the port was closed by this side, or its messages go to an
                owner mailbox.
            BusyPortError: another task is already waiting in ``receive`` on this port.
        """
        return await super().receive()

    def _check_can_send(self) -> None:
        if self._closed:
            raise ClosedPortError("this port is closed")
        if self._broken is None and self._handler.closed:
            self._broken = "EPIPE"  # the I/O thread closed it; its Closed is on its way
        if self._broken is not None:
            raise BrokenPortError(
                f"the {self._mode.upper()} port on {self._device} failed ({self._broken})",
                self._broken,
            )

    def _item(self, message: object) -> tuple[bytes, None]:
        data = _to_bytes(message.data if isinstance(message, Packet) else message)
        if not 0 < len(data) <= MAX_PACKET:
            raise ValueError(
                f"a packet is 1..{MAX_PACKET} bytes, not {len(data)} (one write to the device)"
            )
        return data, None

    def send_nowait(self, message: Packet | bytes | bytearray | memoryview) -> None:
        """Queue one packet for the I/O thread to write to the device; return at once.

        Args:
            message: a :class:`~ioserver.Packet` or bytes-like data: a whole IP packet
                (TUN) or Ethernet frame (TAP), 1..65553 bytes.

        Raises:
            WouldBlock: the port is *busy* (queued output above ``high_watermark``).
            ClosedPortError: the port was closed by this side.
            BrokenPortError: the port failed (the I/O server stopped, the device was
                deleted...), or the send would pass ``port_buffer_limit`` (the port is
                closed).
            ValueError: an empty packet or one larger than 65553 bytes.
            TypeError: the data is not bytes-like.

        A packet the kernel refuses when it is written (``EINVAL`` for a malformed one...)
        is dropped and reported as an :class:`~ioserver.Error` message (charged as a UDP
        port's, and itself dropped, counted in ``statistics().errors_dropped``, while the
        port is over its high watermark: see :class:`~ports.UDPPort`).
        """
        super().send_nowait(message)

    async def send(self, message: Packet | bytes | bytearray | memoryview) -> None:
        """Queue one packet (see :meth:`send_nowait`); wait only while the port is busy.

        It returns once the packet is queued for the I/O thread, which writes it without
        blocking; when the queued output is above ``high_watermark`` it first waits until
        it drains below ``low_watermark``.

        Raises:
            ClosedPortError, BrokenPortError, ValueError, TypeError: as
                :meth:`send_nowait`.
            BusyPortError: another task is already waiting for this busy port.
        """
        await super().send(message)

    async def send_to(self, data: object, address: object) -> None:
        """Not for a device: its packets carry their addresses inside.

        Raises:
            TypeError: always.
        """
        raise TypeError("a TUN/TAP port sends packets with send(), not send_to()")

    def statistics(self) -> PortStatistics:
        """The port's counters now (see :class:`~ports.PortStatistics`); bytes are whole
        packets (IP headers, or Ethernet headers on TAP, included), and
        ``packets_too_large`` counts packets dropped for exceeding ``max_packet``."""
        return super().statistics()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "ended" if self._ended else "open"
        return f"<TunPort {self._mode} {self._device} {state}>"


async def open_tun(
    server: IOServer,
    name: str = "",
    mode: str = "tun",
    **options: Unpack[TunOptions],
) -> TunPort:
    """Open a TUN or TAP network device (Linux); return its :class:`TunPort`.

    Opens ``/dev/net/tun`` without blocking and attaches it to the device ``name`` with
    the ``TUNSETIFF`` ioctl, ``IFF_TUN`` or ``IFF_TAP``, and ``IFF_NO_PI`` (no
    packet-information header: each read is exactly one packet), creating the device
    when it does not exist (it then goes away when its last descriptor closes, unless it
    was made persistent, e.g. with ``ip tuntap add``).  The device starts down and
    without an address: bring it up and route to it with ``ip`` (see
    ``examples/tun_ping.py``).  The semantics are the kernel's
    (``Documentation/networking/tuntap.rst``); the port's are a UDP port's.

    It checks for cancellation before it acts: a call that raises ``Cancelled`` at once
    opened nothing (trio's rule).

    Args:
        server: the I/O server (from :func:`ioserver.open`).
        name: the device's name, at most 15 bytes; empty, or with ``%d``, the kernel picks
            one (``tun0``, ``tap1``...): read it from :attr:`TunPort.device`.
        mode: ``"tun"`` (IP packets) or ``"tap"`` (Ethernet frames).
        options: see :class:`TunOptions`.

    Raises:
        ConnectError: the device could not be opened; ``errno_name`` says why: ``ENOENT``
            (no ``/dev/net/tun``: the ``tun`` module is not loaded or a container lacks
            the device), ``EPERM`` (creating or attaching a device needs
            ``CAP_NET_ADMIN``), ``EACCES`` (``/dev/net/tun`` is not open to this user),
            ``EBUSY`` (the device is attached to another descriptor and is not
            multi-queue), ``EINVAL`` (it exists with other flags: TUN against TAP, or
            ``multi_queue``).
        OptionError: an unknown option, a wrong value, an invalid name or mode.
        NotSupportedError: not on Linux.
        client.ProtocolError: through a daemon (:func:`client.connect`, where the device
            is in the daemon's network namespace) that was not started with
            ``--allow-tun`` (``kind`` ``"forbidden"``).
        ClosedPortError: the I/O server is closed.
    """
    hub = server._check_open("ports.open_tun")
    if not sys.platform.startswith("linux"):
        raise NotSupportedError(f"TUN/TAP ports are for Linux, not {sys.platform}")
    name = _check_name(name)
    if mode not in ("tun", "tap"):
        raise OptionError(f'mode must be "tun" or "tap", not {mode!r}')
    credit, settings = tun_options(dict(options))
    # The checkpoint comes before anything is opened: a call that raises Cancelled opened
    # nothing (trio's rule), no device was attached.
    await anyio.lowlevel.checkpoint_if_cancelled()
    port = TunPort(server, credit, settings)
    port._mode = mode
    io = server._io
    request = _Request(io, hub)
    io.submit(
        io.cmd_open_tun if isinstance(io, RemoteOpens) else partial(cmd_open_tun, io),
        request,
        TunRequest(port, hub.deliver, name, mode, settings, credit),
    )
    result = await _opened(request, port)  # (closes the abandoned port if cancelled)
    port._conn, given = result
    port._device = port._local_address = given
    return port
