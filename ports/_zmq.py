"""ZeroMQ sockets as ports: PUSH, PULL, PUB, SUB, DEALER, ROUTER, PAIR (and REQ, REP,
XPUB, XSUB), owned by the I/O thread like every other socket.

A multipart message is one port message: :class:`~ioserver.Data` whose ``data`` is the
list of frames (``list[bytes]``), and ``send`` takes either one ``bytes`` (a one-frame
message) or a list/tuple of frames.  The edge-triggered ``ZMQ_FD`` is handled inside the
I/O thread (see :mod:`ioserver._zmq`), so an actor never misses a message, however busy it
was when the message came.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Any, Unpack, final

import anyio
import zmq

from ioserver._contract import RemoteOpens, ZmqRequest
from ioserver._exceptions import ConnectError, OptionError, errno_name
from ioserver._options import FlowSettings, ZmqOptions, ZmqSettings, zmq_options
from ioserver._server import IOServer
from ioserver._zmq import ZmqHandler

from ._port import Port, _opened, _Request

__all__ = ["ZMQ_SOCKET_TYPES", "ZmqOptions", "ZmqPort", "open_zmq"]

#: The socket types a ZeroMQ port may have, by name.
ZMQ_SOCKET_TYPES: dict[str, int] = {
    name: getattr(zmq, name)
    for name in (
        "PAIR",
        "PUB",
        "SUB",
        "REQ",
        "REP",
        "DEALER",
        "ROUTER",
        "PULL",
        "PUSH",
        "XPUB",
        "XSUB",
    )
}
_TYPE_NAMES = {number: name for name, number in ZMQ_SOCKET_TYPES.items()}


@final
class ZmqPort(Port):
    """A ZeroMQ socket owned by the I/O thread, used like a channel of multipart messages.

    Receive messages: :class:`~ioserver.Data` with ``data`` a ``list[bytes]`` of frames
    (a ROUTER's first frame is the peer's routing id, as in ZeroMQ), and
    :class:`~ioserver.Error` when a send could not be routed; then one final
    :class:`~ioserver.Closed` when the port or the server closes.  Send ``bytes`` or a
    list/tuple of bytes-like frames.  Get one from :func:`open_zmq`.
    """

    __slots__ = ("socket_type",)

    def __init__(self, server: IOServer, active: tuple[int, bool], options: FlowSettings):
        super().__init__(server, active, options)
        self._window.sizes = deque()  # each message's size, appended by the I/O thread
        self._simple_send = False
        self.socket_type = ""

    def _encode(self, message: object) -> Any:
        if message.__class__ is bytes:
            return message if message else [message]
        if isinstance(message, (bytearray, memoryview)):
            return bytes(message) if message else [b""]
        if isinstance(message, (list, tuple)) and message:
            frames = []
            for frame in message:
                if frame.__class__ is not bytes:
                    if not isinstance(frame, (bytearray, memoryview)):
                        raise TypeError(f"a ZeroMQ frame is bytes-like, not {type(frame).__name__}")
                    frame = bytes(frame)
                frames.append(frame)
            return frames
        raise TypeError(
            "a ZeroMQ port sends bytes or a non-empty list of bytes frames, "
            f"not {type(message).__name__}"
        )

    def _queue(self, data: Any) -> None:
        size = len(data) if data.__class__ is bytes else sum(len(frame) for frame in data)
        self._window.queued_bytes += size
        self._hub.queued_bytes += size
        self._submit((self._io.send_command, self._conn, data))

    def __repr__(self) -> str:
        state = "closed" if self._closed else "ended" if self._ended else "open"
        return f"<ZmqPort {self.socket_type} {state}>"


def _endpoints(value: str | Sequence[str], what: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise OptionError(f"{what} must be an endpoint string or a list of them, not {value!r}")
    return list(value)


async def open_zmq(
    server: IOServer,
    socket_type: int | str,
    *,
    bind: str | Sequence[str] = (),
    connect: str | Sequence[str] = (),
    subscribe: bytes | Sequence[bytes] | None = None,
    **options: Unpack[ZmqOptions],
) -> ZmqPort:
    """Open a ZeroMQ socket as a port, bound and/or connected to ``bind``/``connect``.

    ::

        pull = await ports.open_zmq(ios, "PULL", bind="tcp://127.0.0.1:5555")
        async for message in pull:           # Data(data=[b"frame", ...]), then Closed
            ...

    The socket belongs to the I/O server's ZeroMQ context; the I/O thread receives and
    sends on it, so actors never block on ZeroMQ.  ``bind`` returns at once; read the
    bound endpoint (e.g. a ``tcp://127.0.0.1:*`` wildcard port) from ``port.local_address``.

    It checks for cancellation before it acts: a call that raises ``Cancelled`` at once
    opened (bound, connected) nothing (trio's rule).

    Args:
        server: the I/O server.
        socket_type: ``"PUSH"``, ``"PULL"``, ``"PUB"``, ``"SUB"``, ``"DEALER"``,
            ``"ROUTER"``, ``"PAIR"``, ``"REQ"``, ``"REP"``, ``"XPUB"``, ``"XSUB"`` or the
            ``zmq`` constant.
        bind: endpoint(s) to bind (``"tcp://127.0.0.1:5555"``, ``"ipc:///run/x"``,
            ``"inproc://name"``).
        connect: endpoint(s) to connect to (ZeroMQ connects in the background and
            reconnects by itself).
        subscribe: for SUB: the topic prefix(es); ``None`` subscribes to everything.
        options: see :class:`ZmqOptions`.

    Raises:
        OptionError: an unknown socket type or option, or a wrong value.
        ConnectError: an endpoint could not be bound or connected (``errno_name`` such as
            ``"EADDRINUSE"``, ``"EINVAL"`` for a malformed endpoint,
            ``"EPROTONOSUPPORT"`` for an unknown transport).
        ClosedPortError: the I/O server is closed.
        client.ProtocolError: through a daemon (:func:`client.connect`), an endpoint
            that is not ``tcp://`` or ``ipc://`` (``kind`` ``"bad-option"``), or an
            ``ipc://`` one when the daemon was not started with ``--allow-unix``
            (``"forbidden"``).
    """
    hub = server._check_open("ports.open_zmq")
    if isinstance(socket_type, str):
        number = ZMQ_SOCKET_TYPES.get(socket_type.upper())
        if number is None:
            raise OptionError(
                f"unknown ZeroMQ socket type {socket_type!r} (known: {', '.join(ZMQ_SOCKET_TYPES)})"
            )
    elif isinstance(socket_type, int) and socket_type in _TYPE_NAMES:
        number = socket_type
    else:
        raise OptionError(f"unknown ZeroMQ socket type {socket_type!r}")
    credit, settings, given = zmq_options(dict(options))
    linger = given["linger"]
    identity = given["identity"]
    binds = _endpoints(bind, "bind")
    connects = _endpoints(connect, "connect")
    topics: list[bytes]
    if subscribe is None:
        topics = [b""]
    elif isinstance(subscribe, bytes):
        topics = [subscribe]
    elif isinstance(subscribe, (list, tuple)) and all(isinstance(t, bytes) for t in subscribe):
        topics = list(subscribe)
    else:
        raise OptionError(f"subscribe must be bytes or a list of bytes, not {subscribe!r}")

    # The checkpoint comes first, and nothing is awaited once the socket is bound: a call
    # that raises Cancelled opened nothing (trio's rule), no endpoint was bound.
    await anyio.lowlevel.checkpoint()
    io = server._io
    if isinstance(io, RemoteOpens):  # a daemon's client: the socket lives in the daemon
        where = (binds, connects, None if subscribe is None else topics)
        return await _open_remote(server, io, number, where, credit, settings, given)
    sock: zmq.Socket[bytes] = io.zmq_context().socket(number)
    io.zmq_sockets.add(sock)
    try:
        sock.setsockopt(zmq.LINGER, int(linger * 1000))
        if given["sndhwm"] is not None:
            sock.setsockopt(zmq.SNDHWM, given["sndhwm"])
        if given["rcvhwm"] is not None:
            sock.setsockopt(zmq.RCVHWM, given["rcvhwm"])
        if identity is not None:
            sock.setsockopt(zmq.ROUTING_ID, identity)
        if given["router_mandatory"]:
            if number != zmq.ROUTER:
                raise OptionError("router_mandatory applies to ROUTER sockets only")
            sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        if number == zmq.SUB:
            for topic in topics:
                sock.setsockopt(zmq.SUBSCRIBE, topic)
        elif subscribe is not None:
            raise OptionError("subscribe applies to SUB sockets only")
        # Before any bind or connect: a poller that cannot watch the socket's descriptor
        # (select's FD_SETSIZE) refuses the port here, with no peer any the wiser.
        io.check_fd(int(sock.getsockopt(zmq.FD)))
        last_endpoint = None
        for endpoint in binds:
            try:
                sock.bind(endpoint)
            except zmq.ZMQError as exc:
                raise _endpoint_error("bind", endpoint, exc) from None
            last_endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        for endpoint in connects:
            try:
                sock.connect(endpoint)
            except zmq.ZMQError as exc:
                raise _endpoint_error("connect to", endpoint, exc) from None
    except BaseException:
        io.zmq_sockets.discard(sock)
        sock.close(linger=0)
        raise
    port = ZmqPort(server, credit, settings)
    port.socket_type = _TYPE_NAMES[number]
    handler = ZmqHandler(io, sock, port, hub.deliver, settings, credit, int(linger * 1000))
    port._conn = handler  # type: ignore[assignment]
    port._local_address = last_endpoint
    port._remote_address = connects[0] if connects else None
    io.submit(_start, handler, None)
    return port


async def _open_remote(
    server: IOServer,
    io: RemoteOpens,
    number: int,
    where: tuple[list[str], list[str], list[bytes] | None],
    credit: tuple[int, bool],
    settings: FlowSettings,
    given: ZmqSettings,
) -> ZmqPort:
    """``open_zmq`` through a daemon (``client.connect``): it opens, binds and connects
    (``where``: the endpoints to bind, to connect, and a SUB socket's topics)."""
    binds, connects, topics = where
    if topics is not None and number != zmq.SUB:
        raise OptionError("subscribe applies to SUB sockets only")
    if given["router_mandatory"] and number != zmq.ROUTER:
        raise OptionError("router_mandatory applies to ROUTER sockets only")
    port = ZmqPort(server, credit, settings)
    port.socket_type = _TYPE_NAMES[number]
    hub = server._hub
    request = _Request(server._io, hub)
    spec = ZmqRequest(
        port,
        hub.deliver,
        port.socket_type,
        tuple(binds),
        tuple(connects),
        None if topics is None else tuple(topics),
        given,
        credit,
    )
    server._io.submit(io.cmd_open_zmq, request, spec)
    result = await _opened(request, port)  # (closes the abandoned port if cancelled)
    port._conn, port._local_address, port._remote_address = result
    return port


def _start(handler: ZmqHandler, _: object) -> None:
    handler.start()


def _endpoint_error(what: str, endpoint: str, exc: zmq.ZMQError) -> ConnectError:
    name = errno_name(exc.errno)
    return ConnectError(f"cannot {what} {endpoint!r}: {exc.strerror} ({name})", exc.errno, name)
