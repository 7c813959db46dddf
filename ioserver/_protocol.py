"""The wire protocol between an ioserver daemon and its clients (version 2).

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
             ``accept_active: [credit, notify]`` for the accepted ports.
20 SEND      ``[20, pid, data]``: bytes to write (already framed by the client).
21 SEND_EOF  ``[21, pid]``: half-close.
22 CLOSE     ``[22, pid]``: close after writing what is queued.
23 ACTIVE    ``[23, pid, credit, notify]``: an active mode (-1 unlimited, 0 passive, N).
24 READ_ONCE ``[24, pid]``: a passive port's receiver waits for one message.
25 RESUME    ``[25, pid, generation, consumed_bytes, consumed_messages]``: the owner took
             enough after the receive pause ``generation``.
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
=========  ==============================================================================

FAULT kinds: ``"malformed"`` (not msgpack, not the envelope, wrong arity or types),
``"version"`` (an unsupported protocol version), ``"unknown-opcode"``, ``"no-session"``
(a message before HELLO, or a frame without the session's token), ``"unknown-port"`` (a
port id this session does not own - including another client's), ``"duplicate-port"``,
``"bad-option"``, ``"unsupported"`` (a kind of port the protocol does not carry, as an
``AF_UNIX`` address: TCP only), ``"limit"`` (a limit of the daemon: sessions, ports per
session, host names being resolved, STATUS requests per round, refusals per frame).  Every message
that crosses the process boundary is validated before use, on both sides; a refused
message never affects another message, port or client.
"""

from __future__ import annotations

import os
import socket
import tempfile
from typing import Any, TypeGuard

import msgpack

VERSION = 2
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
SEND = 20
SEND_EOF = 21
CLOSE = 22
ACTIVE = 23
READ_ONCE = 24
RESUME = 25
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

FAMILIES = frozenset({int(socket.AF_INET), int(socket.AF_INET6)})
# Families a local port may use that the protocol does not carry (refused as "unsupported").
_OTHER_FAMILIES = {int(socket.AF_UNIX): "AF_UNIX"}


class ProtocolViolation(Exception):
    """Internal: a message failed validation; ``kind`` is the FAULT kind."""

    def __init__(self, kind: str, text: str, rid: int | None = None) -> None:
        super().__init__(text)
        self.kind = kind
        self.rid = rid


def pack(messages: list[Any], token: bytes | None = None) -> bytes:
    """One frame: the envelope around a round's messages (with the session's token for a
    client's frame to the daemon)."""
    envelope = [VERSION, messages] if token is None else [VERSION, messages, token]
    frame: bytes = msgpack.packb(envelope, use_bin_type=True)
    return frame


def unpack(frame: bytes) -> list[Any]:
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
) -> tuple[list[Any], bytes | None]:
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
    return isinstance(value, int) and not isinstance(value, bool)


def check_int(value: object, what: str, low: int = -(1 << 62), high: int = 1 << 62) -> int:
    if not is_int(value) or not low <= value <= high:
        raise ProtocolViolation("malformed", f"{what} must be an int in {low}..{high}")
    return int(value)


def check_address(family: object, address: object) -> tuple[int, tuple[str, int, *tuple[int, ...]]]:
    """A ``(family, sockaddr)`` pair from the wire, checked."""
    if family not in FAMILIES or isinstance(family, bool):
        if is_int(family) and family in _OTHER_FAMILIES:
            raise ProtocolViolation(
                "unsupported",
                f"address family {family} ({_OTHER_FAMILIES[family]}) is not supported: "
                "the daemon carries TCP ports only (AF_INET, AF_INET6)",
            )
        raise ProtocolViolation("malformed", f"unknown address family {family!r}")
    size = 2 if family == socket.AF_INET else 4
    if not (isinstance(address, list) and len(address) in (2, size)):
        raise ProtocolViolation("malformed", "an address must be [host, port, ...]")
    host, port, *rest = address
    if not isinstance(host, str) or not is_int(port) or not 0 <= port <= 65535:
        raise ProtocolViolation("malformed", "an address must be [host: str, port: 0..65535]")
    if not all(is_int(value) for value in rest):
        raise ProtocolViolation("malformed", "IPv6 flowinfo and scope_id must be ints")
    assert is_int(family)
    return family, (host, port, *(int(value) for value in rest))


def wire_address(address: object) -> object:
    """A socket address as it crosses the wire (tuples become arrays by themselves)."""
    return list(address) if isinstance(address, tuple) else address


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
