"""The options of ports, and their validation: what both halves of a port agree on.

The loop's half of a port (``ports``) validates the options a user gives and hands them,
as a plain dict, to the I/O thread's half (:mod:`~._iothread`), which reads them; the
daemon's open commands (:mod:`~._open_commands`) validate the options a remote client sends
with the same functions.  So this module is on the lower floor, beside the I/O thread,
and imports nothing above it; ``ports`` re-exports the option types users see.

Every port kind's options extend :class:`FlowOptions`: the active mode and the
watermarks of flow control, in both directions (see :mod:`~._flow` for what the
I/O thread does with them).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TypedDict

from ._exceptions import OptionError
from ._framing import DEFAULT_PACKET_SIZE, PacketMode, make_framer

__all__ = [
    "Active",
    "DatagramSettings",
    "FlowOptions",
    "FlowSettings",
    "ListenOptions",
    "PacketMode",
    "PortOptions",
    "PortSettings",
    "StreamOptions",
    "TunOptions",
    "TunSettings",
    "UDPOptions",
    "UDPSettings",
    "Watermarks",
    "ZmqOptions",
    "ZmqSettings",
    "apply_active_mode",
    "check_options",
    "flow_options",
    "parse_active",
    "port_options",
    "reject_unknown_options",
    "tun_options",
    "udp_options",
    "unix_options",
    "watermarks",
    "zmq_options",
]

Active = bool | str | int
"""An active mode: ``True``, ``False``, ``"once"`` or a count N (see :meth:`Port.setopts`)."""

_PACKET_MODES: tuple[PacketMode, ...] = ("raw", "line", "msgpack", "resp", 0, 1, 2, 4)

STREAM_OPTIONS = frozenset({"nodelay", "keepalive", "recbuf", "sndbuf"})
#: The options of a listening socket itself (not of the ports it accepts).
LISTEN_OPTIONS = frozenset({"backlog", "reuseaddr", "reuseport"})

#: Defaults of the flow-control options (bytes, messages).
HIGH_WATERMARK = 256 * 1024
LOW_WATERMARK = 128 * 1024
HIGH_MSGQ_WATERMARK = 256 * 1024
LOW_MSGQ_WATERMARK = 128 * 1024
HIGH_MSGQ_MESSAGES = 4096
#: Seconds a closed stream port may take to write its queued output (the ``linger`` option).
LINGER = 30.0


class FlowOptions(TypedDict, total=False):
    """The options every port kind has: its active mode and the watermarks of its flow
    control (see :class:`PortOptions` for their meaning and defaults).  The options of
    each kind (:class:`PortOptions`, :class:`UDPOptions`, :class:`ZmqOptions`,
    :class:`TunOptions`) extend it.
    """

    active: Active
    high_watermark: int
    low_watermark: int
    high_msgq_watermark: int
    low_msgq_watermark: int
    high_msgq_messages: int


# What the I/O thread reads: the options once validated, every key present (the *Options
# above are what users give, every key optional).
class Watermarks(TypedDict):
    """The watermarks of a port's flow control, validated (bytes, messages)."""

    high_watermark: int
    low_watermark: int
    high_msgq_watermark: int
    low_msgq_watermark: int
    high_msgq_messages: int


class FlowSettings(Watermarks):
    """A port's flow control and framing, validated (:func:`flow_options`)."""

    packet: PacketMode
    packet_size: int
    delimiter: bytes
    send_timeout: float | None
    send_timeout_close: bool


class StreamOptions(FlowSettings):
    """A stream port's options, validated (:func:`port_options`, :func:`unix_options`):
    what the I/O thread applies to its socket and its framing."""

    nodelay: bool
    keepalive: bool
    recbuf: int | None
    sndbuf: int | None
    linger: float | None


class ListenOptions(StreamOptions, total=False):
    """A listener's options: its socket's own (``backlog``, ``reuseaddr``,
    ``reuseport``), and those of each port it accepts with their active mode
    ``(credit, notify_passive)`` as ``active``."""

    backlog: int
    reuseaddr: bool
    reuseport: bool
    active: tuple[int, bool]


def flow_options(
    *,
    packet: object,
    packet_size: object,
    delimiter: object,
    high_watermark: object,
    low_watermark: object,
    high_msgq_watermark: object,
    low_msgq_watermark: object,
    high_msgq_messages: object,
    send_timeout: object,
    send_timeout_close: object,
) -> FlowSettings:
    """Validate the framing and flow-control options of a stream port; return them.

    Raises:
        OptionError: a wrong value, naming it.
    """
    if (
        isinstance(packet_size, bool)
        or not isinstance(packet_size, int)
        or not 0 < packet_size <= MAX_COUNT
    ):
        raise OptionError(
            f"packet_size must be a positive int (bytes) up to 2**63-1, not {packet_size!r}"
        )
    make_framer(packet, packet_size=packet_size, delimiter=delimiter)  # validates
    mode = next(m for m in _PACKET_MODES if m == packet and not isinstance(packet, bool))
    high = _non_negative("high_watermark", high_watermark)
    low = _non_negative("low_watermark", low_watermark)
    if low > high:
        raise OptionError(f"low_watermark={low} is above high_watermark={high}")
    high_msgq = _non_negative("high_msgq_watermark", high_msgq_watermark)
    low_msgq = _non_negative("low_msgq_watermark", low_msgq_watermark)
    if low_msgq > high_msgq:
        raise OptionError(f"low_msgq_watermark={low_msgq} is above high_msgq_watermark={high_msgq}")
    if (
        isinstance(high_msgq_messages, bool)
        or not isinstance(high_msgq_messages, int)
        or not 0 < high_msgq_messages <= MAX_COUNT
    ):
        raise OptionError(
            f"high_msgq_messages must be a positive int up to 2**63-1, not {high_msgq_messages!r}"
        )
    if send_timeout is not None and (
        isinstance(send_timeout, bool)
        or not isinstance(send_timeout, (int, float))
        or send_timeout <= 0
    ):
        raise OptionError(f"send_timeout must be positive seconds or None, not {send_timeout!r}")
    return {
        "packet": mode,
        "packet_size": packet_size,
        # Read by the line framer only, which checked it; other modes never read it.
        "delimiter": delimiter if isinstance(delimiter, bytes) else b"\n",
        "high_watermark": high,
        "low_watermark": low,
        "high_msgq_watermark": high_msgq,
        "low_msgq_watermark": low_msgq,
        "high_msgq_messages": high_msgq_messages,
        "send_timeout": send_timeout,
        "send_timeout_close": bool(send_timeout_close),
    }


#: The largest byte or message count an option takes (the I/O thread counts in 64 bits;
#: a larger watermark would mean no limit, which ``None``-less options spell as this).
MAX_COUNT = 2**63 - 1

#: The longest ``linger``, in seconds: the kernel's ``SO_LINGER`` range (an int of seconds,
#: as Erlang's ``{linger, {true, Seconds}}``); about 68 years.
MAX_LINGER = 2**31 - 1


def _non_negative(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_COUNT:
        raise OptionError(f"{name} must be a non-negative int (bytes) up to 2**63-1, not {value!r}")
    return value


def parse_active(mode: object) -> tuple[int, bool]:
    """``active`` → ``(credit, notify_passive)`` as the I/O thread counts it.

    ``True`` → unlimited (-1); ``False`` → 0; ``"once"`` → 1, no notice; an int N →
    N with a :class:`~ioserver.Passive` notice when it runs out (Erlang's ``{active, N}``,
    -32768..32767; adding to a running count, and 0 or less makes the port passive).
    """
    if mode is True:
        return -1, False
    if mode is False:
        return 0, False
    if mode == "once":
        return 1, False
    if isinstance(mode, int) and not isinstance(mode, bool):
        if not -32768 <= mode <= 32767:
            raise OptionError(f"active={mode}: a count must be in -32768..32767")
        return mode, True
    raise OptionError(f"active must be True, False, 'once' or an int, not {mode!r}")


def reject_unknown_options(given: Iterable[str], known: Iterable[str], what: str) -> None:
    """Raise :class:`OptionError` naming every option of ``given`` not in ``known``."""
    known = set(known)
    unknown = sorted(set(given) - known)
    if unknown:
        raise OptionError(
            f"unknown option{'s' if len(unknown) > 1 else ''} for {what}: "
            f"{', '.join(unknown)} (known: {', '.join(sorted(known))})"
        )


def check_options(options: Mapping[str, object], allowed: frozenset[str], what: str) -> None:
    """Reject options not in ``allowed``, and a ``recbuf``, ``sndbuf`` or ``backlog``
    that is not a positive int below 2**31.

    Raises:
        OptionError: naming the option.
    """
    reject_unknown_options(options, allowed, what)
    for name in ("recbuf", "sndbuf", "backlog"):
        value = options.get(name)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 1 << 31
        ):
            raise OptionError(f"{name} must be a positive int below 2**31 (bytes or connections)")


def apply_active_mode(credit: int, notify: bool, mode: tuple[int, bool]) -> tuple[int, bool]:
    """The ``(credit, notify_passive)`` of a port after the active mode ``mode`` (as
    :func:`parse_active` gives it) is applied to its current ``(credit, notify)``.

    Erlang's rule for ``inet:setopts(S, [{active, N}])``: N adds to a running count, and
    a count that reaches 0 or less makes the port passive (credit 0; with ``notify``, the
    owner is told with :class:`~ioserver.Passive`).  The loop's half and the I/O thread's
    half of a port both apply it, so they agree without asking each other.
    """
    new_credit, new_notify = mode
    if new_notify and notify and credit > 0:
        new_credit += credit
    if new_notify and new_credit <= 0:
        new_credit = 0
    return new_credit, new_notify


class PortOptions(FlowOptions, total=False):
    """The options of a TCP port, for :func:`connect_tcp` and :func:`listen_tcp` (where
    they apply to each accepted port).  All are keyword-only and optional.

    Attributes:
        active: the active mode (see :meth:`Port.setopts`); default ``True``.
        nodelay: disable Nagle's algorithm (``TCP_NODELAY``); default ``True``.
        keepalive: enable ``SO_KEEPALIVE``; default ``False``.
        recbuf: ``SO_RCVBUF`` in bytes; the OS default when ``None``.
        sndbuf: ``SO_SNDBUF`` in bytes; the OS default when ``None``.
        packet: the packet mode, as Erlang's ``{packet, ...}``: ``"raw"`` (default: each
            read is one :class:`~ioserver.Data`), ``1``/``2``/``4`` (a big-endian length
            header, added on send and stripped on receive), ``"line"`` (the delimiter is
            kept at the end of each message) or ``"msgpack"`` (each decoded object is one
            message; ``send`` packs) or ``"resp"`` (Redis commands, each a ``list[bytes]``;
            see :class:`ioserver._framing.RespFramer`).  Framing runs in the I/O thread.
        packet_size: the largest message in bytes (default 64 MiB); a peer that sends more
            (or a header that claims more) gets :class:`~ioserver.Error` ``EMSGSIZE`` and
            the port closed, with nothing allocated for the claimed size.
        delimiter: the one-byte line end for ``packet="line"``; default ``b"\\n"``.
        high_watermark: bytes of queued output above which the port is *busy* (``send``
            waits, ``send_nowait`` raises ``WouldBlock``), as Erlang's option; 256 KiB.
        low_watermark: bytes of queued output below which a busy port is not busy any
            more; 128 KiB.
        high_msgq_watermark: bytes delivered but not yet taken by the owner above which
            the I/O thread stops reading the socket (TCP backpressure on this peer alone),
            as Erlang's ``high_msgq_watermark``; 256 KiB.
        low_msgq_watermark: ... below which it reads again; 128 KiB.
        high_msgq_messages: the same bound counted in messages (resumes at half); 4096.
        send_timeout: seconds a send may wait on a busy port before
            :exc:`~ioserver.SendTimeoutError`; ``None`` (default) waits forever.
        send_timeout_close: close the port when a send times out (Erlang's option).
        linger: seconds :meth:`~ports.Port.close` may take to write the output still
            queued, as Erlang's ``{linger, {true, Seconds}}`` (``SO_LINGER``); default
            30.0.  When they run out (a peer that does not read) the socket is reset
            (``SO_LINGER {1, 0}``: the peer gets ``ECONNRESET``) and what was left is
            dropped (``linger_timeouts`` in the server's statistics).  ``0`` drops the
            queued output and resets at once; ``None`` waits for ever (the descriptor
            and the output stay as long as the peer does not read).  At most
            ``2**31 - 1`` seconds (``SO_LINGER``'s range, about 68 years).
    """

    nodelay: bool
    keepalive: bool
    recbuf: int | None
    sndbuf: int | None
    linger: float | None
    packet: PacketMode
    packet_size: int
    delimiter: bytes
    send_timeout: float | None
    send_timeout_close: bool


_PORT_DEFAULTS: dict[str, object] = {
    "active": True,
    "nodelay": True,
    "keepalive": False,
    "recbuf": None,
    "sndbuf": None,
    "packet": "raw",
    "packet_size": DEFAULT_PACKET_SIZE,
    "delimiter": b"\n",
    "high_watermark": HIGH_WATERMARK,
    "low_watermark": LOW_WATERMARK,
    "high_msgq_watermark": HIGH_MSGQ_WATERMARK,
    "low_msgq_watermark": LOW_MSGQ_WATERMARK,
    "high_msgq_messages": HIGH_MSGQ_MESSAGES,
    "send_timeout": None,
    "send_timeout_close": False,
    "linger": LINGER,
}


def port_options(given: Mapping[str, object], what: str) -> tuple[tuple[int, bool], StreamOptions]:
    """Validate ``given`` port options; return ``(active credit, all options)``.

    Raises:
        OptionError: an unknown option or a wrong value, naming it.
    """
    reject_unknown_options(given, _PORT_DEFAULTS, what)
    options = {**_PORT_DEFAULTS, **given}
    credit = parse_active(options["active"])
    socket_options = {name: options[name] for name in STREAM_OPTIONS}
    check_options({k: v for k, v in socket_options.items() if v is not None}, STREAM_OPTIONS, what)
    flow = flow_options(**{name: options[name] for name in _FLOW_OPTIONS})
    return credit, {
        **flow,
        "nodelay": bool(options["nodelay"]),
        "keepalive": bool(options["keepalive"]),
        "recbuf": _buffer_size(options, "recbuf"),
        "sndbuf": _buffer_size(options, "sndbuf"),
        "linger": _linger(options["linger"]),
    }


def _linger(value: object) -> float | None:
    """``linger``: None (wait for ever) or seconds, a float from 0 to :data:`MAX_LINGER`.

    Raises:
        OptionError: anything else.
    """
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not 0 <= value <= MAX_LINGER
    ):
        raise OptionError(
            f"linger must be seconds from 0 to {MAX_LINGER} or None (for ever), not {value!r}"
        )
    return float(value)


def _buffer_size(options: Mapping[str, object], name: str) -> int | None:
    """``recbuf``/``sndbuf``: None (the system's default) or a positive int below 2**31.

    Raises:
        OptionError: anything else, naming it.
    """
    value = options[name]
    if value is None:
        return None
    return _int_in(options, name, 1, (1 << 31) - 1)


def _int_in(options: Mapping[str, object], name: str, low: int, high: int) -> int:
    """The int option ``name``, checked to be in ``low..high``.

    Raises:
        OptionError: a value that is not, naming it and the range.
    """
    value = options[name]
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise OptionError(f"{name} must be an int in {low}..{high}, not {value!r}")
    return value


def _bool(options: Mapping[str, object], name: str) -> bool:
    value = options[name]
    if not isinstance(value, bool):
        raise OptionError(f"{name} must be a bool, not {value!r}")
    return value


_FLOW_OPTIONS = (
    "packet",
    "packet_size",
    "delimiter",
    "high_watermark",
    "low_watermark",
    "high_msgq_watermark",
    "low_msgq_watermark",
    "high_msgq_messages",
    "send_timeout",
    "send_timeout_close",
)


#: The flow-control defaults every kind of message port shares (FlowOptions less active).
_WATERMARK_DEFAULTS: Watermarks = {
    "high_watermark": HIGH_WATERMARK,
    "low_watermark": LOW_WATERMARK,
    "high_msgq_watermark": HIGH_MSGQ_WATERMARK,
    "low_msgq_watermark": LOW_MSGQ_WATERMARK,
    "high_msgq_messages": HIGH_MSGQ_MESSAGES,
}


def _message_flow(options: Mapping[str, object]) -> FlowSettings:
    """Check the watermarks (and send timeout, where the kind has one) of a port whose
    messages are whole already (datagrams, TUN packets, ZeroMQ messages: no framing).

    Raises:
        OptionError: a wrong value, naming it.
    """
    return flow_options(
        packet="raw",
        packet_size=1,
        delimiter=b"\n",
        **{name: options[name] for name in _WATERMARK_DEFAULTS},
        send_timeout=options.get("send_timeout"),
        send_timeout_close=options.get("send_timeout_close", False),
    )


def watermarks(flow: Watermarks) -> Watermarks:
    """The watermarks of a port's validated options, alone."""
    return {
        "high_watermark": flow["high_watermark"],
        "low_watermark": flow["low_watermark"],
        "high_msgq_watermark": flow["high_msgq_watermark"],
        "low_msgq_watermark": flow["low_msgq_watermark"],
        "high_msgq_messages": flow["high_msgq_messages"],
    }


class UDPOptions(FlowOptions, total=False):
    """The options of :func:`open_udp`.  All are keyword-only and optional.

    Attributes:
        active: the active mode, as for TCP ports (``port.setopts(active=...)``,
            as :meth:`ports.Port.setopts`); each
            datagram counts as one message; default ``True``.
        read_packets: datagrams read per readiness event, as Erlang's ``read_packets``;
            more is faster under load, fewer is fairer to other ports; default 16.
        max_datagram: bytes of the largest datagram received (the receive buffer); a
            larger one is dropped and reported as :class:`~ioserver.Error` ``EMSGSIZE``;
            default 65535 (any UDP datagram), 1..2**24.
        recbuf: ``SO_RCVBUF`` in bytes; the OS default when ``None``.
        sndbuf: ``SO_SNDBUF`` in bytes; the OS default when ``None``.
        reuseaddr: ``SO_REUSEADDR``; default ``False``.
        reuseport: ``SO_REUSEPORT`` (several sockets share the port); default ``False``.
        broadcast: ``SO_BROADCAST`` (send to broadcast addresses); default ``False``.
        high_watermark: bytes of queued output above which the port is *busy* (``send``
            waits, ``send_nowait`` raises ``WouldBlock``); 256 KiB.
        low_watermark: bytes of queued output below which it is not busy any more; 128 KiB.
        high_msgq_watermark: bytes delivered but not yet taken by the owner above which the
            I/O thread stops reading (the kernel then drops datagrams); 256 KiB.
        low_msgq_watermark: ... below which it reads again; 128 KiB.
        high_msgq_messages: the same bound counted in datagrams (resumes at half); 4096.
    """

    read_packets: int
    max_datagram: int
    recbuf: int | None
    sndbuf: int | None
    reuseaddr: bool
    reuseport: bool
    broadcast: bool


class DatagramSettings(Watermarks):
    """What a handler that reads datagrams or packets needs (UDP, TUN/TAP)."""

    read_packets: int
    max_datagram: int


class UDPSettings(DatagramSettings):
    """A UDP port's options, validated (:func:`udp_options`)."""

    active: Active
    recbuf: int | None
    sndbuf: int | None
    reuseaddr: bool
    reuseport: bool
    broadcast: bool


_UDP_DEFAULTS: dict[str, object] = {
    "active": True,
    "read_packets": 16,
    "max_datagram": 65535,
    "recbuf": None,
    "sndbuf": None,
    "reuseaddr": False,
    "reuseport": False,
    "broadcast": False,
    **_WATERMARK_DEFAULTS,
}


def udp_options(given: Mapping[str, object]) -> tuple[tuple[int, bool], UDPSettings]:
    """Validate UDP options; return ``(active credit, all options)``.

    Raises:
        OptionError: an unknown option or a wrong value, naming it.
    """
    reject_unknown_options(given, _UDP_DEFAULTS, "a UDP port")
    options = {**_UDP_DEFAULTS, **given}
    credit = parse_active(options["active"])
    settings: UDPSettings = {
        "active": _active(options),
        "read_packets": _int_in(options, "read_packets", 1, 1 << 16),
        "max_datagram": _int_in(options, "max_datagram", 1, 1 << 24),
        "recbuf": _buffer_size(options, "recbuf"),
        "sndbuf": _buffer_size(options, "sndbuf"),
        "reuseaddr": _bool(options, "reuseaddr"),
        "reuseport": _bool(options, "reuseport"),
        "broadcast": _bool(options, "broadcast"),
        **watermarks(_message_flow(options)),
    }
    return credit, settings


def _active(options: Mapping[str, object]) -> Active:
    """The ``active`` option, checked by :func:`parse_active` already."""
    value = options["active"]
    assert isinstance(value, (bool, str, int))
    return value


#: The largest packet a TUN/TAP device carries: an IP packet of 65535 bytes (the largest
#: MTU) behind an Ethernet header (14) and an 802.1Q tag (4) on a TAP device.
MAX_TUN_PACKET = 65535 + 18


class TunOptions(FlowOptions, total=False):
    """The options of :func:`open_tun`.  All are keyword-only and optional.

    Attributes:
        active: the active mode, as for TCP ports (:meth:`ports.Port.setopts`); each
            packet counts as one message; default ``True``.
        multi_queue: ``IFF_MULTI_QUEUE``: the device has several queues, one per
            descriptor, so several ports (on several I/O servers) may open the same
            device and the kernel spreads the flows over them; every queue of a device
            must be opened with the same value; default ``False``.
        read_packets: packets read per readiness event, as Erlang's ``read_packets``;
            default 16, 1..65536.
        max_packet: bytes of the largest packet received; a larger one is dropped and
            reported as :class:`~ioserver.Error` ``EMSGSIZE``; default 65553 (any IP packet,
            with an Ethernet header and a VLAN tag on a TAP device), 1..65553.
        high_watermark: bytes of queued output above which the port is *busy* (``send``
            waits, ``send_nowait`` raises ``WouldBlock``); 256 KiB.
        low_watermark: bytes of queued output below which it is not busy any more; 128 KiB.
        high_msgq_watermark: bytes delivered but not yet taken by the owner above which the
            I/O thread stops reading (the kernel then drops packets once the device's
            queue, ``txqueuelen``, is full); 256 KiB.
        low_msgq_watermark: ... below which it reads again; 128 KiB.
        high_msgq_messages: the same bound counted in packets (resumes at half); 4096.
    """

    multi_queue: bool
    read_packets: int
    max_packet: int


class TunSettings(Watermarks):
    """A TUN/TAP port's options, validated (:func:`tun_options`)."""

    active: Active
    multi_queue: bool
    read_packets: int
    max_packet: int


_TUN_DEFAULTS: dict[str, object] = {
    "active": True,
    "multi_queue": False,
    "read_packets": 16,
    "max_packet": MAX_TUN_PACKET,
    **_WATERMARK_DEFAULTS,
}


def tun_options(given: Mapping[str, object]) -> tuple[tuple[int, bool], TunSettings]:
    """Validate TUN/TAP options; return ``(active credit, all options)``.

    Raises:
        OptionError: an unknown option or a wrong value, naming it.
    """
    reject_unknown_options(given, _TUN_DEFAULTS, "a TUN/TAP port")
    options = {**_TUN_DEFAULTS, **given}
    credit = parse_active(options["active"])
    settings: TunSettings = {
        "active": _active(options),
        "read_packets": _int_in(options, "read_packets", 1, 1 << 16),
        "max_packet": _int_in(options, "max_packet", 1, MAX_TUN_PACKET),
        "multi_queue": _bool(options, "multi_queue"),
        **watermarks(_message_flow(options)),
    }
    return credit, settings


class ZmqOptions(FlowOptions, total=False):
    """The options of a ZeroMQ port (all keyword-only and optional).

    Attributes:
        active: the active mode, as for TCP ports (see :meth:`Port.setopts`).
        high_watermark: bytes of output queued in the port (not yet taken by ZeroMQ)
            above which the port is *busy*; 256 KiB.  ZeroMQ's own ``sndhwm`` bounds what
            it holds after that.
        low_watermark: ... below which it is not busy any more; 128 KiB.
        high_msgq_watermark: bytes delivered to the owner and not yet taken above which
            the I/O thread stops receiving from the socket (ZeroMQ's ``rcvhwm`` then
            pushes back on the peers); 256 KiB.
        low_msgq_watermark: ... below which it receives again; 128 KiB.
        high_msgq_messages: the same bound in messages (resumes at half); 4096.
        send_timeout: seconds a send may wait on a busy port; ``None`` waits forever.
        send_timeout_close: close the port when a send times out.
        sndhwm: ZeroMQ's ``ZMQ_SNDHWM`` in messages (ZeroMQ's default when ``None``).
        rcvhwm: ZeroMQ's ``ZMQ_RCVHWM`` in messages.
        linger: seconds ZeroMQ keeps trying to deliver queued messages after close;
            default 1.0.
        identity: the ``ZMQ_ROUTING_ID`` of this socket (bytes), as seen by a ROUTER peer.
        router_mandatory: a ROUTER reports an unroutable message as
            :class:`~ioserver.Error` ``EHOSTUNREACH`` instead of dropping it silently.
    """

    send_timeout: float | None
    send_timeout_close: bool
    sndhwm: int | None
    rcvhwm: int | None
    linger: float
    identity: bytes | None
    router_mandatory: bool


class ZmqSettings(Watermarks):
    """A ZeroMQ port's options, validated (:func:`zmq_options`)."""

    active: Active
    send_timeout: float | None
    send_timeout_close: bool
    sndhwm: int | None
    rcvhwm: int | None
    linger: float
    identity: bytes | None
    router_mandatory: bool


#: A port's validated options, whichever its kind (each extends :class:`Watermarks`): what
#: the daemon keeps of a client's port (``_session.RemotePortState``: a ZeroMQ port's
#: :class:`FlowSettings`) and a daemon's client of its ports (``client._remote.RemoteConn``).
PortSettings = StreamOptions | UDPSettings | TunSettings | FlowSettings | ZmqSettings

_ZMQ_DEFAULTS: dict[str, object] = {
    "active": True,
    **_WATERMARK_DEFAULTS,
    "send_timeout": None,
    "send_timeout_close": False,
    "sndhwm": None,
    "rcvhwm": None,
    "linger": 1.0,
    "identity": None,
    "router_mandatory": False,
}


def zmq_options(
    given: Mapping[str, object],
) -> tuple[tuple[int, bool], FlowSettings, ZmqSettings]:
    """Validate ZeroMQ port options; return ``(active credit, flow options, all options)``.

    Raises:
        OptionError: an unknown option or a wrong value, naming it.
    """
    check_options(given, frozenset(_ZMQ_DEFAULTS), "a ZeroMQ port")
    options = {**_ZMQ_DEFAULTS, **given}
    credit = parse_active(options["active"])
    flow = _message_flow(options)
    hwms: dict[str, int | None] = {}
    for name in ("sndhwm", "rcvhwm"):
        value = options[name]
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise OptionError(f"{name} must be an int (messages) or None, not {value!r}")
        hwms[name] = value
    linger = options["linger"]
    if isinstance(linger, bool) or not isinstance(linger, (int, float)) or linger < 0:
        raise OptionError(f"linger must be non-negative seconds, not {linger!r}")
    identity = options["identity"]
    if identity is not None and not isinstance(identity, bytes):
        raise OptionError(f"identity must be bytes or None, not {identity!r}")
    settings: ZmqSettings = {
        "active": _active(options),
        **watermarks(flow),
        "send_timeout": flow["send_timeout"],
        "send_timeout_close": bool(options["send_timeout_close"]),
        "sndhwm": hwms["sndhwm"],
        "rcvhwm": hwms["rcvhwm"],
        "linger": linger,
        "identity": identity,
        "router_mandatory": bool(options["router_mandatory"]),
    }
    return credit, flow, settings


_NOT_FOR_UNIX = ("nodelay", "keepalive")


def unix_options(given: Mapping[str, object], what: str) -> tuple[tuple[int, bool], StreamOptions]:
    """Validate the options of a Unix stream port (a TCP port's, without the TCP ones)."""
    for name in _NOT_FOR_UNIX:
        if name in given:
            raise OptionError(f"{name} is a TCP option; a Unix socket has no such setting")
    credit, settings = port_options(given, what)
    settings["nodelay"] = False
    return credit, settings
