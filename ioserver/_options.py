"""The options of ports, and their validation: what both halves of a port agree on.

The loop's half of a port (``ports``) validates the options a user gives and hands them,
as a plain dict, to the I/O thread's half (:mod:`~._iothread`), which reads them; the
daemon's control endpoint (:mod:`~._control`) validates the options a remote client sends
with the same functions.  So this module is on the lower floor, beside the I/O thread,
and imports nothing above it; ``ports`` re-exports the option types users see.

Every port kind's options extend :class:`FlowOptions`: the active mode and the
watermarks of flow control, in both directions (see :mod:`~._flow` for what the
I/O thread does with them).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, TypedDict

from ._exceptions import OptionError
from ._framing import DEFAULT_PACKET_SIZE, make_framer

__all__ = [
    "Active",
    "FlowOptions",
    "PortOptions",
    "TunOptions",
    "UDPOptions",
    "ZmqOptions",
    "apply_active_mode",
    "check_options",
    "flow_options",
    "parse_active",
    "port_options",
    "reject_unknown_options",
    "tun_options",
    "udp_options",
    "unix_options",
    "zmq_options",
]

Active = bool | str | int
"""An active mode: ``True``, ``False``, ``"once"`` or a count N (see :meth:`Port.setopts`)."""

STREAM_OPTIONS = frozenset({"nodelay", "keepalive", "recbuf", "sndbuf"})
#: The options of a listening socket itself (not of the ports it accepts).
LISTEN_OPTIONS = frozenset({"backlog", "reuseaddr", "reuseport"})

#: Defaults of the flow-control options (bytes, messages).
HIGH_WATERMARK = 256 * 1024
LOW_WATERMARK = 128 * 1024
HIGH_MSGQ_WATERMARK = 256 * 1024
LOW_MSGQ_WATERMARK = 128 * 1024
HIGH_MSGQ_MESSAGES = 4096


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


def flow_options(
    *,
    packet: Any,
    packet_size: int,
    delimiter: bytes,
    high_watermark: int,
    low_watermark: int,
    high_msgq_watermark: int,
    low_msgq_watermark: int,
    high_msgq_messages: int,
    send_timeout: float | None,
    send_timeout_close: bool,
) -> dict[str, Any]:
    """Validate the framing and flow-control options of a stream port; return them."""
    make_framer(packet, packet_size=packet_size, delimiter=delimiter)  # validates
    pairs = (
        ("high_watermark", high_watermark, "low_watermark", low_watermark),
        ("high_msgq_watermark", high_msgq_watermark, "low_msgq_watermark", low_msgq_watermark),
    )
    for high_name, high, low_name, low in pairs:
        for name, value in ((high_name, high), (low_name, low)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise OptionError(f"{name} must be a non-negative int (bytes), not {value!r}")
        if low > high:
            raise OptionError(f"{low_name}={low} is above {high_name}={high}")
    if (
        isinstance(high_msgq_messages, bool)
        or not isinstance(high_msgq_messages, int)
        or high_msgq_messages <= 0
    ):
        raise OptionError(f"high_msgq_messages must be a positive int, not {high_msgq_messages!r}")
    if send_timeout is not None and (
        isinstance(send_timeout, bool)
        or not isinstance(send_timeout, (int, float))
        or send_timeout <= 0
    ):
        raise OptionError(f"send_timeout must be positive seconds or None, not {send_timeout!r}")
    return {
        "packet": packet,
        "packet_size": packet_size,
        "delimiter": delimiter,
        "high_watermark": high_watermark,
        "low_watermark": low_watermark,
        "high_msgq_watermark": high_msgq_watermark,
        "low_msgq_watermark": low_msgq_watermark,
        "high_msgq_messages": high_msgq_messages,
        "send_timeout": send_timeout,
        "send_timeout_close": bool(send_timeout_close),
    }


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


def check_options(options: dict[str, Any], allowed: frozenset[str], what: str) -> None:
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
    """

    nodelay: bool
    keepalive: bool
    recbuf: int | None
    sndbuf: int | None
    packet: Any
    packet_size: int
    delimiter: bytes
    send_timeout: float | None
    send_timeout_close: bool


_PORT_DEFAULTS: dict[str, Any] = {
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
}


def port_options(given: dict[str, Any], what: str) -> tuple[tuple[int, bool], dict[str, Any]]:
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
    return credit, {**socket_options, **flow}


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
_WATERMARK_DEFAULTS: dict[str, Any] = {
    "high_watermark": HIGH_WATERMARK,
    "low_watermark": LOW_WATERMARK,
    "high_msgq_watermark": HIGH_MSGQ_WATERMARK,
    "low_msgq_watermark": LOW_MSGQ_WATERMARK,
    "high_msgq_messages": HIGH_MSGQ_MESSAGES,
}


def _message_flow(options: dict[str, Any]) -> dict[str, Any]:
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


def _check_ranges(options: dict[str, Any], ranges: tuple[tuple[str, int, int], ...]) -> None:
    """Check that each named option is an int in its range (``None`` passes for the
    socket buffer sizes, ``recbuf`` and ``sndbuf``: the system's default).

    Raises:
        OptionError: a value that is not, naming it and the range.
    """
    for name, low, high in ranges:
        value = options[name]
        if value is None and name in ("recbuf", "sndbuf"):
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise OptionError(f"{name} must be an int in {low}..{high}, not {value!r}")


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


_UDP_DEFAULTS: dict[str, Any] = {
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


def udp_options(given: dict[str, Any]) -> tuple[tuple[int, bool], dict[str, Any]]:
    """Validate UDP options; return ``(active credit, all options)``.

    Raises:
        OptionError: an unknown option or a wrong value, naming it.
    """
    reject_unknown_options(given, _UDP_DEFAULTS, "a UDP port")
    options = {**_UDP_DEFAULTS, **given}
    credit = parse_active(options["active"])
    _check_ranges(
        options,
        (
            ("read_packets", 1, 1 << 16),
            ("max_datagram", 1, 1 << 24),
            ("recbuf", 1, (1 << 31) - 1),
            ("sndbuf", 1, (1 << 31) - 1),
        ),
    )
    for name in ("reuseaddr", "reuseport", "broadcast"):
        if not isinstance(options[name], bool):
            raise OptionError(f"{name} must be a bool, not {options[name]!r}")
    _message_flow(options)
    return credit, options


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


_TUN_DEFAULTS: dict[str, Any] = {
    "active": True,
    "multi_queue": False,
    "read_packets": 16,
    "max_packet": MAX_TUN_PACKET,
    **_WATERMARK_DEFAULTS,
}


def tun_options(given: dict[str, Any]) -> tuple[tuple[int, bool], dict[str, Any]]:
    """Validate TUN/TAP options; return ``(active credit, all options)``.

    Raises:
        OptionError: an unknown option or a wrong value, naming it.
    """
    reject_unknown_options(given, _TUN_DEFAULTS, "a TUN/TAP port")
    options = {**_TUN_DEFAULTS, **given}
    credit = parse_active(options["active"])
    _check_ranges(options, (("read_packets", 1, 1 << 16), ("max_packet", 1, MAX_TUN_PACKET)))
    if not isinstance(options["multi_queue"], bool):
        raise OptionError(f"multi_queue must be a bool, not {options['multi_queue']!r}")
    _message_flow(options)
    return credit, options


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


_ZMQ_DEFAULTS: dict[str, Any] = {
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


def zmq_options(given: dict[str, Any]) -> tuple[tuple[int, bool], dict[str, Any], dict[str, Any]]:
    """Validate ZeroMQ port options; return ``(active credit, flow options, all options)``.

    Raises:
        OptionError: an unknown option or a wrong value, naming it.
    """
    check_options(given, frozenset(_ZMQ_DEFAULTS), "a ZeroMQ port")
    options = {**_ZMQ_DEFAULTS, **given}
    credit = parse_active(options["active"])
    settings = _message_flow(options)
    for name in ("sndhwm", "rcvhwm"):
        value = options[name]
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise OptionError(f"{name} must be an int (messages) or None, not {value!r}")
    linger = options["linger"]
    if isinstance(linger, bool) or not isinstance(linger, (int, float)) or linger < 0:
        raise OptionError(f"linger must be non-negative seconds, not {linger!r}")
    identity = options["identity"]
    if identity is not None and not isinstance(identity, bytes):
        raise OptionError(f"identity must be bytes or None, not {identity!r}")
    return credit, settings, options


_NOT_FOR_UNIX = ("nodelay", "keepalive")


def unix_options(given: dict[str, Any], what: str) -> tuple[tuple[int, bool], dict[str, Any]]:
    """Validate the options of a Unix stream port (a TCP port's, without the TCP ones)."""
    for name in _NOT_FOR_UNIX:
        if name in given:
            raise OptionError(f"{name} is a TCP option; a Unix socket has no such setting")
    credit, settings = port_options(given, what)
    settings["nodelay"] = False
    return credit, settings
