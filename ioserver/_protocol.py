"""The wire protocol between an ioserver daemon and its clients (version 3).

Transport: one ZeroMQ ROUTER socket in the daemon (the *control endpoint*), one DEALER
socket per client.  Every ZeroMQ message is one frame holding one msgpack array::

    [VERSION, [message, message, ...]]              daemon to client
    [VERSION, [message, message, ...], token]       client to daemon

so that one frame carries every command or event of one round of the sending I/O thread
(batching: one frame per message costs about 1 µs each, a hundred per frame 0.14 µs).
``token`` is the session's secret (16 bytes, ``bin``), issued by the daemon in WELCOME:
every frame of a session after the one that opened it must carry it; the frame that opens
a session (its first message is HELLO) carries ``nil``.  A frame whose token is not its
session's is refused whole (FAULT ``"no-session"``): the ZeroMQ routing id alone does not
make a peer the session's client.  A frame is at most ``max_frame`` bytes (WELCOME says
how many; the daemon's ZeroMQ socket drops a peer that sends more) and holds at most
``max_messages`` messages; a client cuts its batches to fit.
Each message is an array whose first element is its opcode.  ``pid`` is a port id: the
client numbers the ports it opens (1, 2, 3...), the daemon numbers the ports its
listeners accept (-1, -2, -3...); ids are never reused within a session.  ``rid`` is a
request id chosen by the client.  Addresses are arrays (``[host, port]`` or
``[host, port, flowinfo, scope_id]``).

Client to daemon:

=========  ==============================================================================
opcode     message
=========  ==============================================================================
1 HELLO      ``[1, client_version]``: opens the session; answered with WELCOME.  A
             HELLO for a session that exists must come in a frame with its token.
2 HEARTBEAT  ``[2]``: sent when nothing else was sent for a heartbeat interval.
3 BYE        ``[3]``: the client is closing: close every port of the session.
10 CONNECT   ``[10, rid, pid, family, address, options, credit, notify]``: a TCP connect,
             as ``ports.connect_tcp``; ``options`` the port's resolved options (map).
11 LISTEN    ``[11, rid, pid, family, address, options, credit, notify]``: a TCP listener;
             ``options`` also holds ``backlog``, ``reuseaddr``, ``reuseport`` and
             ``accept_active: [credit, notify]`` for the accepted ports.  CONNECT and
             LISTEN take ``AF_UNIX`` (1) with a path for address (permission ``unix``).
12 OPEN_UDP  ``[12, rid, pid, bind, connect, options, credit, notify]``: a UDP socket;
             ``bind``/``connect`` ``[host, port]`` or nil, names resolved by the daemon.
13 OPEN_TUN  ``[13, rid, pid, name, mode, options, credit, notify]``: a TUN/TAP device
             (permission ``tun``); OK's local address is the device's name.
14 OPEN_PROCESS ``[14, rid, pid, argv, stderr, kill_grace, options, credit, notify]``:
             a program, the daemon's child (permission ``process``); OK's remote address
             is its pid.
15 OPEN_ZMQ  ``[15, rid, pid, type, bind, connect, topics, options, credit, notify]``:
             a ZeroMQ socket (``tcp://``, or ``ipc://`` with permission ``unix``).
20 SEND      ``[20, pid, data]``: bytes to write (already framed by the client).
21 SEND_EOF  ``[21, pid]``: half-close.
22 CLOSE     ``[22, pid]``: close after writing what is queued.
23 ACTIVE    ``[23, pid, credit, notify]``: an active mode (-1 unlimited, 0 passive, N).
24 READ_ONCE ``[24, pid]``: a passive port's receiver waits for one message.
25 RESUME    ``[25, pid, generation, consumed_bytes, consumed_messages]``: the owner took
             enough after the receive pause ``generation``.
26 SEND_TO   ``[26, pid, data, address_or_nil]``: a datagram (UDP) or packet (TUN).
27 SIGNAL    ``[27, pid, signal]``: to a process port's program; 0 terminates it.
30 STATUS    ``[30, rid]``: the daemon's status (as ``ioserver status --json``).
=========  ==============================================================================

Daemon to client:

=========  ==============================================================================
1 WELCOME    ``[1, info]``: ``info`` a map: ``version``, ``pid``, ``worker``,
             ``heartbeat`` (seconds between heartbeats; a peer silent for
             ``HEARTBEAT_MISSES`` intervals is lost), ``token`` (the session's secret,
             bin), ``max_frame`` (bytes), ``max_messages`` (per frame).
2 HEARTBEAT  ``[2]``.
4 FAULT      ``[4, rid_or_nil, kind, text]``: a message was refused (kinds below).
5 OK         ``[5, rid, local_address, remote_address]``: a CONNECT or LISTEN succeeded.
6 FAILED     ``[6, rid, error_type, errno, errno_name, text]``: it failed; ``error_type``
             is ``"ConnectError"`` or ``"OptionError"``.
7 STATUS     ``[7, rid, status]``.
10 DATA      ``[10, pid, data]`` or ``[10, pid, data, size]`` (a packet mode that
             decodes objects, ``"msgpack"`` or ``"resp"``: a decoded object and the wire
             bytes it is charged).
11 ACCEPTED  ``[11, listener_pid, pid, local_address, remote_address]``.
12 CLOSED    ``[12, pid, reason, errno_name_or_nil]``: the port's final message.
13 ERROR     ``[13, pid, errno_name, errno, text]``.
14 PASSIVE   ``[14, pid]``.
15 WRITTEN   ``[15, pid, bytes_out]``: the daemon wrote this many bytes of the port's
             output in all (sent when a client may be waiting on a busy port).
16 PAUSED    ``[16, pid, generation]``: the daemon stopped reading the port until the
             client's owner takes enough (answered with RESUME).
17 GONE      ``[17, pid]``: the daemon released the port; its id is dead.
18 DATAGRAM  ``[18, pid, data, address_or_nil]``: a UDP datagram (a TUN packet: nil).
19 EXIT      ``[19, pid, status]``: a process port's program ended (before its CLOSED).
=========  ==============================================================================

FAULT kinds: ``"malformed"`` (not msgpack, not the envelope, wrong arity or types),
``"version"`` (an unsupported protocol version), ``"unknown-opcode"``, ``"no-session"``
(a message before HELLO, or a frame without the session's token), ``"unknown-port"`` (a
port id this session does not own - including another client's), ``"duplicate-port"``,
``"bad-option"``, ``"forbidden"`` (a kind the daemon was not started to allow:
``--allow-process``, ``--allow-unix``, ``--allow-tun``), ``"limit"`` (a limit of the
daemon: sessions, ports per session, host names being resolved, STATUS requests per
round, refusals per frame).  Every message
that crosses the process boundary is validated before use, on both sides; a refused
message never affects another message, port or client.
"""

from __future__ import annotations

import os
import socket
import tempfile
from typing import TypeAlias, TypeGuard

import msgpack

VERSION = 3
HEARTBEAT_MISSES = 3  # intervals of silence after which the peer is lost
MAX_FRAME = 64 * 1024 * 1024 + 4096  # bytes: the largest frame a client accepts
TOKEN_SIZE = 16  # bytes of a session's token

# What the daemon accepts by default (``ioserver serve --max-frame``; WELCOME says).
DEFAULT_MAX_FRAME = 1024 * 1024  # bytes in one client frame
MAX_MESSAGES = 65536  # messages in one frame
MAX_MAP = 64  # entries in a map (a port's options)
MAX_STR = 4096  # characters in a str (host names, option names, texts)

# Client to daemon.
HELLO = 1
HEARTBEAT = 2
BYE = 3
CONNECT = 10
LISTEN = 11
OPEN_UDP = 12
OPEN_TUN = 13
OPEN_PROCESS = 14
OPEN_ZMQ = 15
SEND = 20
SEND_EOF = 21
CLOSE = 22
ACTIVE = 23
READ_ONCE = 24
RESUME = 25
SEND_TO = 26
SIGNAL = 27
STATUS = 30

# Daemon to client.
WELCOME = 1
FAULT = 4
OK = 5
FAILED = 6
STATUS_REPLY = 7
DATA = 10
ACCEPTED = 11
CLOSED = 12
ERROR = 13
PASSIVE = 14
WRITTEN = 15
PAUSED = 16
GONE = 17
DATAGRAM = 18
EXIT = 19

AF_UNIX = int(socket.AF_UNIX)
FAMILIES = frozenset({int(socket.AF_INET), int(socket.AF_INET6), AF_UNIX})

# Bounds on what a client's open request may carry (each is checked before use).
MAX_UNIX_PATH = 107  # bytes of a Unix socket path (sun_path holds 108 with its NUL)
MAX_ARGV = 1024  # arguments of a program, argv[0] included
MAX_ARGV_BYTES = 128 * 1024  # bytes of all of them together
MAX_ENDPOINTS = 16  # ZeroMQ endpoints in one bind or connect list
MAX_ENDPOINT = 256  # characters of a ZeroMQ endpoint
MAX_TOPICS = 64  # SUB topics
MAX_TOPIC = 4096  # bytes of one SUB topic
MAX_KILL_GRACE = 3600.0  # seconds between SIGTERM and SIGKILL for a program
#: ZeroMQ socket types a client may open in the daemon.
ZMQ_TYPES = frozenset(
    {"PAIR", "PUB", "SUB", "REQ", "REP", "DEALER", "ROUTER", "PULL", "PUSH", "XPUB", "XSUB"}
)
#: The transports of a client's ZeroMQ endpoints: ``inproc://`` would reach the daemon's
#: own sockets (its ZAP handler...), ``ipc://`` is a path (permission ``unix``).
ZMQ_TRANSPORTS = ("tcp://", "ipc://")
#: Signals a client may send to its program (SIGSTOP and the like are refused).
SIGNALS = frozenset({1, 2, 3, 9, 10, 12, 14, 15, 18})

#: A value as msgpack encodes and decodes it: what crosses the wire (a memoryview is sent
#: as bin, and decoded as bytes).
Wire: TypeAlias = (
    "bool | int | float | str | bytes | memoryview | list[Wire] | dict[str, Wire] | None"
)
#: One message: ``[opcode, ...]``.
Message: TypeAlias = "list[Wire]"


class ProtocolViolation(Exception):
    """Internal: a message failed validation; ``kind`` is the FAULT kind."""

    def __init__(self, kind: str, text: str, rid: int | None = None) -> None:
        super().__init__(text)
        self.kind = kind
        self.rid = rid


def pack(messages: list[Message], token: bytes | None = None) -> bytes:
    """One frame: the envelope around a round's messages (with the session's token for a
    client's frame to the daemon)."""
    envelope = [VERSION, messages] if token is None else [VERSION, messages, token]
    frame: bytes = msgpack.packb(envelope, use_bin_type=True)
    return frame


def unpack(frame: bytes) -> list[Wire]:
    """The messages of one frame (the client's side: the daemon's frames, up to
    ``MAX_FRAME`` bytes).

    Raises:
        ProtocolViolation: not msgpack, not the envelope, or another version.
    """
    return unpack_frame(
        frame, max_frame=MAX_FRAME, max_messages=MAX_FRAME, max_map=MAX_FRAME, max_str=MAX_FRAME
    )[0]


def unpack_frame(
    frame: bytes,
    *,
    max_frame: int = DEFAULT_MAX_FRAME,
    max_messages: int = MAX_MESSAGES,
    max_map: int = MAX_MAP,
    max_str: int = MAX_STR,
) -> tuple[list[Wire], bytes | None]:
    """The messages of one frame and its token (None if it carries none).

    Decoded with limits, so that a frame cannot make more than a bounded amount of
    objects: at most ``max_frame`` bytes, arrays of at most ``max_messages`` elements,
    maps of ``max_map`` entries, str of ``max_str`` bytes, bin of ``max_frame``
    bytes, no ext.  (msgpack refuses a container whose header passes a limit before it
    allocates it; a frame decodes to at most about 72 bytes of objects per byte.)

    Raises:
        ProtocolViolation: too large, not msgpack, not the envelope, or another version.
    """
    if len(frame) > max_frame:
        raise ProtocolViolation(
            "malformed", f"a frame of {len(frame)} bytes is larger than {max_frame}"
        )
    try:
        envelope = msgpack.unpackb(
            frame,
            raw=False,
            use_list=True,
            strict_map_key=True,
            max_bin_len=max_frame,
            max_str_len=max_str,
            max_array_len=max_messages,
            max_map_len=max_map,
            max_ext_len=0,
        )
    except Exception as exc:
        raise ProtocolViolation("malformed", f"not a msgpack frame: {exc}") from None
    if not (isinstance(envelope, list) and len(envelope) in (2, 3)):
        raise ProtocolViolation("malformed", "a frame must be [version, [messages...], token]")
    version, messages = envelope[0], envelope[1]
    if version != VERSION or isinstance(version, bool):
        raise ProtocolViolation(
            "version", f"protocol version {version!r}; this side speaks {VERSION}"
        )
    if not isinstance(messages, list):
        raise ProtocolViolation("malformed", "a frame must be [version, [messages...], token]")
    token = envelope[2] if len(envelope) == 3 else None
    if token is not None and not isinstance(token, bytes):
        raise ProtocolViolation("malformed", "a frame's token must be bin or nil")
    return messages, token


def is_numeric_host(family: int, host: str) -> bool:
    """Whether ``host`` is a numeric address of ``family`` or ``""`` (the wildcard
    address): nothing to resolve."""
    if host == "":
        return True
    try:
        socket.inet_pton(family, host.partition("%")[0] if family == socket.AF_INET6 else host)
    except (OSError, ValueError):
        return False
    return True


def is_int(value: object) -> TypeGuard[int]:
    """An int that is not a bool (msgpack's true and false are Python bools)."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_int(value: object, what: str, low: int = -(1 << 62), high: int = 1 << 62) -> int:
    if not is_int(value) or not low <= value <= high:
        raise ProtocolViolation("malformed", f"{what} must be an int in {low}..{high}")
    return int(value)


SockAddr: TypeAlias = "tuple[str, int] | tuple[str, int, int, int] | str"


def check_address(family: object, address: object) -> tuple[int, SockAddr]:
    """A ``(family, sockaddr)`` pair from the wire, checked: ``[host, port]`` (IPv4),
    ``[host, port, flowinfo, scope_id]`` (IPv6, the last two optional) or a Unix path
    (``AF_UNIX``: see :func:`check_unix_path`)."""
    if not is_int(family) or family not in FAMILIES:
        raise ProtocolViolation("malformed", f"unknown address family {family!r}")
    if family == AF_UNIX:
        return AF_UNIX, check_unix_path(address)
    size = 2 if family == socket.AF_INET else 4
    if not (isinstance(address, list) and len(address) in (2, size)):
        raise ProtocolViolation("malformed", "an address must be [host, port, ...]")
    host, port, *rest = address
    if not isinstance(host, str) or not is_int(port) or not 0 <= port <= 65535:
        raise ProtocolViolation("malformed", "an address must be [host: str, port: 0..65535]")
    if not all(is_int(value) for value in rest):
        raise ProtocolViolation("malformed", "IPv6 flowinfo and scope_id must be ints")
    if len(rest) == 2:
        flowinfo, scope_id = rest
        return int(family), (host, int(port), int(flowinfo), int(scope_id))
    return int(family), (host, int(port))


def check_host_port(address: object, what: str) -> tuple[str, int] | None:
    """``[host, port]`` or nil (a UDP port's ``bind`` or ``connect``), checked."""
    if address is None:
        return None
    if not (isinstance(address, list) and len(address) == 2):
        raise ProtocolViolation("malformed", f"{what} must be [host, port] or nil")
    host, port = address
    if not isinstance(host, str) or not is_int(port) or not 0 <= port <= 65535:
        raise ProtocolViolation("malformed", f"{what} must be [host: str, port: 0..65535]")
    return host, int(port)


def check_unix_path(path: object) -> str:
    """A Unix socket path from the wire: a str of 1..107 bytes (UTF-8), no NUL but a
    leading one (Linux's abstract namespace)."""
    if not isinstance(path, str) or not path:
        raise ProtocolViolation("malformed", "a Unix socket path is a non-empty str")
    size = len(path.encode("utf-8", "surrogateescape"))
    if size > MAX_UNIX_PATH or "\0" in path[1:]:
        raise ProtocolViolation(
            "malformed",
            f"a Unix socket path is at most {MAX_UNIX_PATH} bytes with no NUL but a leading "
            "one (abstract namespace)",
        )
    return path


def check_argv(argv: object) -> tuple[str | bytes, ...]:
    """A program's argv from the wire: 1..``MAX_ARGV`` str or bin arguments, at most
    ``MAX_ARGV_BYTES`` in all, no NUL, ``argv[0]`` not empty."""
    if not isinstance(argv, list) or not 1 <= len(argv) <= MAX_ARGV:
        raise ProtocolViolation("malformed", f"argv must be a list of 1..{MAX_ARGV} arguments")
    total = 0
    checked: list[str | bytes] = []
    for argument in argv:
        if isinstance(argument, str):
            raw = argument.encode("utf-8", "surrogateescape")
        elif isinstance(argument, bytes):
            raw = argument
        else:
            raise ProtocolViolation("malformed", "each argument of argv must be str or bin")
        if b"\0" in raw:
            raise ProtocolViolation("malformed", "an argument of argv contains a NUL")
        total += len(raw) + 1
        checked.append(argument)
    if total > MAX_ARGV_BYTES:
        raise ProtocolViolation("malformed", f"argv holds more than {MAX_ARGV_BYTES} bytes")
    if not checked[0]:
        raise ProtocolViolation("malformed", "argv[0], the program, is empty")
    return tuple(checked)


def check_endpoints(value: object, what: str) -> list[str]:
    """A list of ZeroMQ endpoints from the wire: at most ``MAX_ENDPOINTS``, each a str of
    at most ``MAX_ENDPOINT`` characters of a transport in ``ZMQ_TRANSPORTS``."""
    if not isinstance(value, list) or len(value) > MAX_ENDPOINTS:
        raise ProtocolViolation("malformed", f"{what} must be a list of <= {MAX_ENDPOINTS} str")
    endpoints: list[str] = []
    for endpoint in value:
        if not isinstance(endpoint, str) or not 0 < len(endpoint) <= MAX_ENDPOINT:
            raise ProtocolViolation(
                "malformed", f"a ZeroMQ endpoint is a str of 1..{MAX_ENDPOINT} characters"
            )
        if not endpoint.startswith(ZMQ_TRANSPORTS) or "\0" in endpoint:
            raise ProtocolViolation(
                "bad-option",
                f"{endpoint!r}: a client's ZeroMQ endpoints are tcp:// or ipc:// (inproc:// "
                "would reach the daemon's own sockets)",
            )
        endpoints.append(endpoint)
    return endpoints


def check_topics(value: object) -> list[bytes] | None:
    """SUB topics from the wire: nil (everything) or at most ``MAX_TOPICS`` bin."""
    if value is None:
        return None
    if not (
        isinstance(value, list)
        and len(value) <= MAX_TOPICS
        and all(isinstance(topic, bytes) and len(topic) <= MAX_TOPIC for topic in value)
    ):
        raise ProtocolViolation("malformed", f"topics must be nil or <= {MAX_TOPICS} bin")
    return [topic for topic in value if isinstance(topic, bytes)]


def wire_address(address: object) -> Wire:
    """A socket address as it crosses the wire: a ``(host, port...)`` tuple as an array,
    a Unix path (str, or bytes for an abstract name) as itself, None (no address) as nil.

    Raises:
        TypeError: anything else (a bug on this side: addresses come from the socket).
    """
    if isinstance(address, tuple):
        return [wire_address(part) for part in address]
    if address is None or isinstance(address, (int, str, bytes)):
        return address
    raise TypeError(f"not a socket address: {address!r}")


def from_wire_address(address: object) -> object:
    if isinstance(address, list):
        return tuple(address)
    return address


def runtime_directory() -> str:
    """The directory of the daemon's default ``ipc://`` endpoint: ``$XDG_RUNTIME_DIR/
    ioserver`` or ``<tmp>/ioserver-<uid>``, made with mode 0700 (only this user)."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base and os.path.isdir(base):
        return os.path.join(base, "ioserver")
    return os.path.join(tempfile.gettempdir(), f"ioserver-{os.getuid()}")


def default_endpoint() -> str:
    """The daemon's default control endpoint: ``ipc://<runtime_directory()>/control``."""
    return f"ipc://{os.path.join(runtime_directory(), 'control')}"
