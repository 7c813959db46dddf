"""Typed request/reply over one port: a multiplexing client and a concurrent server.

The public face is :mod:`ports.rpc`; the message types and their encoding live in
:mod:`ports._rpc_codec`.

**Theory of operation.**  A :class:`Client` owns one port.  One *reader* task (started by
``async with client``) receives every frame; callers never receive.  Each call takes the
next request id, records a small waiter under it, sends its frame and parks on the waiter;
the reader decodes each reply, pops the waiter of its id and wakes that caller alone.  So
any number of calls are in flight on one port and replies may come in any order.  A call
that times out or is cancelled removes its waiter; when its reply comes later the reader
finds no waiter, drops the reply and counts it (``late_replies_dropped``).

A server (:func:`serve`) reads requests from its port and runs each handler in its own
task of a task group, so a slow request does not hold up the others; each task sends its
reply when done, out of order.  At most ``max_concurrent_calls`` handlers run at once;
past that the server stops reading, so the port's receive watermark pushes back on the
peer (TCP backpressure) instead of tasks piling up.

Sends never take turns with a lock unless the port is *busy*: a send first tries
``send_nowait``; only when the port's output is above its high watermark does the sender
queue on a lock and wait (a port allows one waiting sender at a time).

**Envelopes** (the wire format of the messages themselves is in :mod:`ports._rpc_codec`
and ``docs/reference/rpc-wire-format.rst``): each frame is one msgpack array,

* ``[0, id, request]`` - a request; ``id`` is an int from 1 up, unique per client;
* ``[1, id, reply]`` - the reply to request ``id``;
* ``[2, id, code, message]`` - an error answer to request ``id`` (``id`` is nil when the
  frame was too malformed to hold one); ``code`` is ``"decode"`` (the server could not
  decode the request), ``"handler"`` (the handler raised) or ``"encode"`` (the handler's
  reply could not be encoded); ``message`` is a str for humans.

Frames travel on a port opened with ``packet=4`` (recommended: each frame is its own
length-prefixed packet, so a malformed frame is answered and the connection goes on) or
``packet=1``/``2``, or ``packet="msgpack"`` (the I/O thread parses the stream; bytes that
are not msgpack at all then end the connection, as the framing cannot resynchronise).
"""

from __future__ import annotations

import logging
import types
import typing
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Generic, TypeVar, Unpack, final

import anyio
import anyio.abc
import msgspec

from ioserver._exceptions import (
    BrokenPortError,
    ClosedPortError,
    EndOfPort,
    OptionError,
    WouldBlock,
)
from ioserver._framing import DEFAULT_PACKET_SIZE, PacketTooLarge
from ioserver._messages import Accepted, Closed, Data
from ioserver._options import PortOptions
from ioserver._server import IOServer

from ._port import Listener, Port
from ._rpc_codec import (
    DEFAULT_MAX_DEPTH,
    Codec,
    DecodeLimits,
    RPCDecodeError,
    RPCError,
    packb,
    tag_of,
    to_wire,
    unpack_envelope,
)
from ._source import Waiter
from ._tcp import connect_tcp

__all__ = [
    "Client",
    "ClientStatistics",
    "Interface",
    "RPCRemoteError",
    "ServerStatistics",
    "connect",
    "serve",
    "serve_listener",
]

log = logging.getLogger("ports.rpc")

Request = TypeVar("Request")
Reply = TypeVar("Reply")

REQUEST = 0
REPLY = 1
ERROR = 2

#: Handlers that may run at once on one server port, by default.
DEFAULT_MAX_CONCURRENT_CALLS = 1024


class RPCRemoteError(RPCError):
    """The server answered a call with an error: its handler raised, or its reply could
    not be encoded.

    ``code`` is ``"handler"`` or ``"encode"`` (see the envelope format in
    :mod:`ports.rpc`), ``message`` the server's description, such as
    ``"KeyError: 'x'"``.  The server goes on serving; only this call failed.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"the server answered with an error ({code}): {message}")
        self.code = code
        self.message = message


def _top_classes(tp: Any) -> frozenset[type] | None:
    """The classes a top-level value of ``tp`` may have, when ``tp`` is a message class or
    a union of them (maybe with ``None``); else ``None`` (no quick check)."""
    union = typing.get_origin(tp) in (typing.Union, types.UnionType)
    members = typing.get_args(tp) if union else (tp,)
    classes: set[type] = set()
    for member in members:
        if member is type(None):
            classes.add(type(None))
        elif isinstance(member, type) and issubclass(member, msgspec.Struct):
            classes.add(member)
        else:
            return None
    return frozenset(classes)


@final
class Interface(Generic[Request, Reply]):
    """What a client and a server agree on: the request type and the reply type.

    Build one per service, at import time, and share it: it builds both types' msgspec
    decoders once (see :class:`Codec`).  The types are usually sum types - unions of
    message classes (:class:`ports.rpc.Message`), one per variant::

        class Get(rpc.Message):
            key: str

        class Put(rpc.Message):
            key: str
            value: bytes

        class Value(rpc.Message):
            value: bytes | None

        class Ok(rpc.Message):
            pass

        STORE: Interface[Get | Put, Value | Ok] = Interface(Get | Put, Value | Ok)

    Args:
        request: the type of requests (see :class:`Codec` for what it may be).
        reply: the type of replies.
        max_depth: the deepest nesting a decoded request or reply may have.
        namespace: names for string annotations that are not module-level names.

    Raises:
        TypeError: a type cannot be carried (see :class:`Codec`).
        ValueError: ``max_depth`` is not a positive int.
    """

    __slots__ = ("_reply_classes", "_request_classes", "reply", "request")

    def __init__(
        self,
        request: Any,
        reply: Any,
        *,
        max_depth: int = DEFAULT_MAX_DEPTH,
        namespace: dict[str, Any] | None = None,
    ) -> None:
        self.request: Codec[Request] = Codec(request, max_depth=max_depth, namespace=namespace)
        self.reply: Codec[Reply] = Codec(reply, max_depth=max_depth, namespace=namespace)
        self._request_classes = _top_classes(request)
        self._reply_classes = _top_classes(reply)

    def __repr__(self) -> str:
        return f"Interface({self.request!r} -> {self.reply!r})"


def _framing(port: Any) -> bool:
    """True when ``port`` carries bytes frames (packet 1, 2, 4), False for msgpack.

    Raises:
        ioserver.OptionError: the port is not a connected :class:`Port` with one of those modes.
    """
    if not isinstance(port, Port):
        raise OptionError(f"typed RPC runs over a connected ports.Port, not {port!r}")
    framer = port._framer
    mode = framer.mode if framer is not None else "raw"
    if mode == "msgpack":
        return False
    if mode in (1, 2, 4):
        return True
    raise OptionError(
        f"typed RPC needs a port opened with packet=4 (or 1, 2, 'msgpack'), not packet={mode!r}"
    )


def _frame_limits(port: Port, codec: Codec[Any]) -> DecodeLimits:
    """What one frame received on ``port`` may decode to: derived from the port's
    ``packet_size`` (see :meth:`DecodeLimits.for_packet_size`); the envelope adds one
    level of nesting to the codec's ``max_depth``."""
    framer = port._framer
    packet_size = getattr(framer, "_limit", DEFAULT_PACKET_SIZE)
    return DecodeLimits.for_packet_size(packet_size, max_depth=codec.max_depth + 1)


_ID_SIZES = {0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8}


def _peek_ident(data: Any, kinds: tuple[int, ...]) -> int | None:
    """The id of an envelope ``[kind, id, ...]`` read from the frame's first bytes, when
    ``kind`` is one of ``kinds`` - so a frame refused before decoding (over its limits)
    can still be answered to its call; else ``None``."""
    if len(data) < 3 or data[0] not in (0x93, 0x94) or data[1] not in kinds:
        return None
    first = data[2]
    if first < 0x80:
        return int(first)
    size = _ID_SIZES.get(first)
    if size is None or len(data) < 3 + size:
        return None
    return int.from_bytes(data[3 : 3 + size], "big")


class _Sender:
    """Sends frames for many tasks on one port; only a busy port makes them take turns."""

    __slots__ = ("lock", "port")

    def __init__(self, port: Port) -> None:
        self.port = port
        self.lock = anyio.Lock()

    async def send(self, frame: object) -> None:
        try:
            self.port.send_nowait(frame)
        except WouldBlock:
            # A port lets one sender wait for it to drain: the others queue on the lock.
            async with self.lock:
                await self.port.send(frame)


def _encoder(bytes_frames: bool) -> Callable[[Any], Any]:
    return packb if bytes_frames else to_wire


# -- client ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ClientStatistics:
    """A snapshot of a :class:`Client`'s counters, from :meth:`Client.statistics`."""

    calls: int  #: requests sent
    replies: int  #: replies (and error answers) handed to their callers
    in_flight: int  #: calls sent and not yet answered, timed out or cancelled
    timeouts: int  #: calls that raised TimeoutError
    cancelled: int  #: calls whose task was cancelled while waiting
    late_replies_dropped: int  #: replies that came after their call timed out or was cancelled
    decode_errors: int  #: replies that did not decode (the caller got RPCDecodeError)
    remote_errors: int  #: error answers from the server (RPCDecodeError or RPCRemoteError)
    protocol_errors: int  #: frames that were not a reply to any call (ignored)


class _Call(Waiter):
    __slots__ = ("done", "error", "replied", "result")

    def __init__(self) -> None:
        super().__init__()
        self.done = False
        self.replied = False  # done by a frame from the server (not by _fail_all)
        self.result: Any = None
        self.error: BaseException | None = None


@final
class Client(Generic[Request, Reply]):
    """Calls a server's typed handlers over one port, many calls at a time.

    Use it as an async context manager: entering starts the reader task (in a task group
    of its own), leaving closes the port and ends the reader::

        async with rpc.Client(port, STORE) as client:
            reply = await client.call(Get("x"), timeout=5)

    or get a connected one with :func:`connect`.  Any number of tasks may call at once;
    the client matches each reply to its call by the request id.  The client owns the port:
    receive nothing from it yourself.

    Args:
        port: a connected :class:`Port` opened with ``packet=4`` (or ``1``, ``2``,
            ``"msgpack"``).
        interface: the request and reply types.

    Raises:
        ioserver.OptionError: ``port`` is not a port with a packet mode typed RPC can use.
    """

    __slots__ = (
        "_bytes_frames",
        "_calls",
        "_closed_error",
        "_counts",
        "_encode",
        "_interface",
        "_last_id",
        "_limits",
        "_parker",
        "_port",
        "_sender",
        "_task_group",
    )

    def __init__(self, port: Port, interface: Interface[Request, Reply]) -> None:
        self._bytes_frames = _framing(port)
        self._encode = _encoder(self._bytes_frames)
        self._port = port
        self._interface = interface
        self._limits = _frame_limits(port, interface.reply)
        self._sender = _Sender(port)
        self._calls: dict[int, _Call] = {}
        self._last_id = 0
        self._parker: Any = port._hub
        self._task_group: anyio.abc.TaskGroup | None = None
        # Set once calls can no longer be made: (exception class, message).
        self._closed_error: tuple[type[Exception], str] | None = None
        # calls, replies, timeouts, cancelled, late, decode errors, remote errors, protocol
        self._counts = [0] * 8

    @property
    def port(self) -> Port:
        """The port the client calls over."""
        return self._port

    async def __aenter__(self) -> Client[Request, Reply]:
        if self._task_group is not None:
            raise RuntimeError("this client was entered already")
        task_group = anyio.create_task_group()
        await task_group.__aenter__()
        self._task_group = task_group
        task_group.start_soon(self._read)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool | None:
        self._close()
        task_group = self._task_group
        assert task_group is not None
        task_group.cancel_scope.cancel()
        return await task_group.__aexit__(exc_type, exc, traceback)

    async def aclose(self) -> None:
        """Close the client and its port; calls in flight raise :exc:`ClosedPortError`.

        Idempotent.  Leaving the ``async with`` block does the same.
        """
        self._close()
        await anyio.lowlevel.checkpoint()

    def _close(self) -> None:
        if self._closed_error is None or self._closed_error[0] is not ClosedPortError:
            self._fail_all(ClosedPortError, "the RPC client is closed")
        self._port.close_nowait()

    def _fail_all(self, error: type[Exception], message: str) -> None:
        self._closed_error = (error, message)
        calls = self._calls
        self._calls = {}
        for call in calls.values():
            call.error = error(message)
            call.done = True
            self._parker.wake(call)

    async def call(self, request: Request, *, timeout: float | None = None) -> Reply:
        """Send ``request``, wait for its reply and return it, decoded and validated.

        Many calls may wait at once on one client; each returns its own reply whatever
        the order the server answers in.

        It checks for cancellation (and ``timeout``) before it sends: a call that raises
        ``Cancelled`` or :exc:`TimeoutError` before its request was queued sent nothing,
        and the server never runs it (trio's rule).  One cancelled or timed out while it
        waits for the reply was sent: the server may have run it.

        Args:
            request: a value of the interface's request type.
            timeout: the most seconds to wait (sending included); ``None`` waits for ever.
                A call that times out is forgotten: its reply, if it ever comes, is
                dropped and counted in ``late_replies_dropped``.

        Returns:
            The reply, of the interface's reply type.

        Raises:
            TimeoutError: no reply within ``timeout`` seconds.
            RPCDecodeError: the reply did not match the reply type; or, with ``remote``
                true, the server could not decode the request (it goes on serving).
            RPCRemoteError: the server's handler raised, or its reply could not be
                encoded.
            TypeError: ``request`` is not of the request type (a quick check of its
                class, then of what msgpack can pack).
            ioserver.ClosedPortError: the client is closed (or was never entered).
            ioserver.BrokenPortError: the connection ended or broke; calls in flight then raise it
                too.
            ioserver.PacketTooLarge: the request's frame exceeds the port's ``packet_size``.
        """
        if self._closed_error is not None or self._task_group is None:
            error, message = self._closed_error or (
                ClosedPortError,
                "the RPC client is not started: use it in 'async with'",
            )
            raise error(message)
        classes = self._interface._request_classes
        if classes is not None and request.__class__ not in classes:
            raise TypeError(
                f"{type(request).__name__} is not a request of {self._interface.request!r}"
            )
        self._last_id = ident = self._last_id + 1
        frame = self._encode([REQUEST, ident, request])
        call = _Call()
        counts = self._counts
        try:
            if timeout is None:
                await self._send_call(ident, call, frame)
                while not call.done:
                    await self._parker.park(call)
            else:
                with anyio.fail_after(timeout):
                    await self._send_call(ident, call, frame)
                    while not call.done:
                        await self._parker.park(call)
        except TimeoutError:
            counts[2] += 1
            self._dropped(call)
            raise TimeoutError(f"no reply to {tag_of(type(request))} within {timeout} s") from None
        except anyio.get_cancelled_exc_class():
            counts[3] += 1
            self._dropped(call)
            raise
        finally:
            if not call.done:
                self._calls.pop(ident, None)
        if call.error is not None:
            raise call.error
        result: Reply = call.result
        return result

    def _dropped(self, call: _Call) -> None:
        """``call`` raised Cancelled or TimeoutError: a reply the reader took for it in
        the same tick (after the cancellation, before the task resumed) reached nobody -
        a late reply, not one handed to its caller."""
        if call.replied:
            counts = self._counts
            counts[1] -= 1
            counts[4] += 1

    async def _send_call(self, ident: int, call: _Call, frame: object) -> None:
        """Record ``call`` under ``ident`` and send its request ``frame``.

        The checkpoint comes first (trio's rule): a call cancelled, or out of time, before
        its request was queued raises having sent nothing - the server never runs it.
        """
        await anyio.lowlevel.checkpoint_if_cancelled()
        self._calls[ident] = call
        self._counts[0] += 1
        await self._sender.send(frame)

    # -- the reader task ------------------------------------------------------------------
    async def _read(self) -> None:
        port = self._port
        try:
            while True:
                message = await port.receive()
                cls = message.__class__
                if cls is Data:
                    self._on_frame(message.data)  # type: ignore[union-attr]
                elif cls is Closed:
                    reason = message.reason  # type: ignore[union-attr]
                    self._fail_all(
                        BrokenPortError,
                        f"the connection ended ({reason}) with the call in flight"
                        if reason == "eof"
                        else f"the connection broke ({reason})",
                    )
                    return
        except (ClosedPortError, EndOfPort):
            pass  # closed by this side: _close failed the calls already

    def _on_frame(self, data: Any) -> None:
        counts = self._counts
        if self._bytes_frames:
            try:
                envelope = unpack_envelope(
                    data, self._limits, (REPLY,), self._interface.reply._depth_bound + 1
                )
            except RPCDecodeError as exc:
                ident = _peek_ident(data, (REPLY, ERROR))
                refused = self._calls.pop(ident, None) if ident is not None else None
                if refused is not None:  # its call gets the error, at once
                    counts[5] += 1
                    counts[1] += 1
                    refused.error = exc
                    refused.done = refused.replied = True
                    self._parker.wake(refused)
                    return
                counts[7] += 1
                log.warning("RPC client on %r: ignoring a malformed frame: %s", self._port, exc)
                return
        else:
            envelope = data
        if envelope.__class__ is not list or len(envelope) < 3:
            counts[7] += 1
            log.warning("RPC client on %r: ignoring a frame that is no reply", self._port)
            return
        kind, ident = envelope[0], envelope[1]
        call = self._calls.pop(ident, None) if ident.__class__ is int else None
        if call is None:
            if ident.__class__ is int and 0 < ident <= self._last_id:
                counts[4] += 1  # its call timed out or was cancelled
            else:
                counts[7] += 1
                log.warning(
                    "RPC client on %r: ignoring a frame for no call: %.200r", self._port, envelope
                )
            return
        if kind == REPLY and len(envelope) == 3:
            try:
                call.result = self._interface.reply.from_wire(envelope[2])
            except RPCDecodeError as exc:
                call.error = exc
                counts[5] += 1
        elif (
            kind == ERROR
            and len(envelope) == 4
            and envelope[2].__class__ is str
            and envelope[3].__class__ is str
        ):
            counts[6] += 1
            code, text = envelope[2], envelope[3]
            call.error = (
                RPCDecodeError(text, remote=True)
                if code == "decode"
                else RPCRemoteError(code, text)
            )
        else:
            counts[7] += 1
            call.error = RPCDecodeError(f"malformed reply envelope: {envelope!r:.200}")
        counts[1] += 1
        call.done = call.replied = True
        self._parker.wake(call)

    def statistics(self) -> ClientStatistics:
        """The client's counters now (see :class:`ClientStatistics`)."""
        counts = self._counts
        return ClientStatistics(
            calls=counts[0],
            replies=counts[1],
            in_flight=len(self._calls),
            timeouts=counts[2],
            cancelled=counts[3],
            late_replies_dropped=counts[4],
            decode_errors=counts[5],
            remote_errors=counts[6],
            protocol_errors=counts[7],
        )

    def __repr__(self) -> str:
        return f"<rpc.Client {self._interface!r} on {self._port!r}>"


async def connect(
    server: IOServer,
    host: str,
    port: int,
    interface: Interface[Request, Reply],
    **options: Unpack[PortOptions],
) -> Client[Request, Reply]:
    """Connect to an RPC server over TCP; return a :class:`Client` to enter::

        async with await rpc.connect(ios, "127.0.0.1", 7001, STORE) as client:
            ...

    Args:
        server: the I/O server.
        host: the server's name or address.
        port: its TCP port.
        interface: the request and reply types.
        options: port options (see :class:`~ports.PortOptions`); ``packet`` defaults to 4.

    Raises:
        ioserver.ConnectError, ioserver.OptionError, ioserver.ClosedPortError: as
            :func:`~ports.connect_tcp`.
    """
    options.setdefault("packet", 4)
    opened = await connect_tcp(server, host, port, **options)
    try:
        return Client(opened, interface)
    except BaseException:
        opened.close_nowait()
        raise


# -- server ---------------------------------------------------------------------------------


@dataclass(slots=True)
class ServerStatistics:
    """What :func:`serve` did on one port (returned when it ends)."""

    requests: int = 0  #: well-formed requests received (each ran its handler)
    replies: int = 0  #: replies sent (error answers included)
    decode_errors: int = 0  #: frames that did not decode (each answered with an error)
    handler_errors: int = 0  #: handlers that raised (each answered with an error)
    encode_errors: int = 0  #: replies that could not be encoded (answered with an error)
    unsent: int = 0  #: answers lost because the connection had ended
    peak_in_flight: int = 0  #: the most handlers running at once


async def serve(
    port: Port,
    interface: Interface[Request, Reply],
    handler: Callable[[Request], Awaitable[Reply]],
    *,
    max_concurrent_calls: int = DEFAULT_MAX_CONCURRENT_CALLS,
    close: bool = True,
) -> ServerStatistics:
    """Answer typed requests on ``port`` until the peer closes it; return the statistics.

    Each well-formed request runs ``await handler(request)`` in its own task, so many run
    at once and replies go out as they are ready, in any order.  A frame that does not
    decode (not msgpack, an unknown tag, a wrong field type, a missing or extra field,
    too deep) is answered with a ``"decode"`` error and the port goes on serving; a
    handler that raises an :exc:`Exception` is answered with a ``"handler"`` error (and
    logged on the ``ports.rpc`` logger) - the caller gets :exc:`RPCDecodeError` or
    :exc:`RPCRemoteError`.  As an OTP ``gen_server`` that answers ``{error, Reason}``
    instead of crashing.

    When the peer closes (or the connection breaks), ``serve`` waits for the handlers
    still running, sends their replies if it still can, closes the port (unless
    ``close=False``) and returns.  Cancel it to stop serving at once: the handlers running
    are cancelled (their callers get no reply), and no request is taken from the port that
    no handler started - with ``close=False`` the next server of the port gets them.

    Args:
        port: a connected port opened with ``packet=4`` (or ``1``, ``2``, ``"msgpack"``).
        interface: the request and reply types.
        handler: an async function from a request to its reply.
        max_concurrent_calls: the most handlers running at once on this port; past it,
            the server stops reading (the peer is pushed back by TCP flow control).
        close: close the port when done.

    Returns:
        The counters of what was served (see :class:`ServerStatistics`).

    Raises:
        ioserver.OptionError: ``port`` has a packet mode typed RPC cannot use, or
            ``max_concurrent_calls`` is not a positive int.
    """
    bytes_frames = _framing(port)
    if (
        isinstance(max_concurrent_calls, bool)
        or not isinstance(max_concurrent_calls, int)
        or max_concurrent_calls <= 0
    ):
        raise OptionError(
            f"max_concurrent_calls must be a positive int, not {max_concurrent_calls!r}"
        )
    encode = _encoder(bytes_frames)
    sender = _Sender(port)
    statistics = ServerStatistics()
    room: anyio.Event | None = None  # set when a handler ends below the limit
    request_codec = interface.request
    limits = _frame_limits(port, request_codec)
    request_depth = request_codec._depth_bound + 1  # the envelope is one level
    reply_classes = interface._reply_classes
    in_flight = 0

    async def answer(frame: object, ident: Any) -> None:
        try:
            try:
                await sender.send(frame)
            except PacketTooLarge as exc:
                statistics.encode_errors += 1
                log.error("RPC reply on %r cannot be sent: %s", port, exc)
                await sender.send(encode([ERROR, ident, "encode", f"PacketTooLarge: {exc}"]))
        except (BrokenPortError, ClosedPortError):
            statistics.unsent += 1  # the peer is gone: nobody to answer
            return
        statistics.replies += 1

    async def run(ident: int, request: Any) -> None:
        nonlocal in_flight, room
        try:
            try:
                reply = await handler(request)
            except Exception as exc:
                statistics.handler_errors += 1
                log.exception("RPC handler failed on %r for %.200r", port, request)
                frame = encode([ERROR, ident, "handler", f"{type(exc).__name__}: {exc}"])
            else:
                try:
                    if reply_classes is not None and reply.__class__ not in reply_classes:
                        raise TypeError(
                            f"the handler returned {type(reply).__name__}, "
                            f"not a reply of {interface.reply!r}"
                        )
                    frame = encode([REPLY, ident, reply])
                except (TypeError, ValueError) as exc:
                    statistics.encode_errors += 1
                    log.error("RPC reply on %r cannot be sent: %s", port, exc)
                    frame = encode([ERROR, ident, "encode", f"{type(exc).__name__}: {exc}"])
            await answer(frame, ident)
        finally:
            in_flight -= 1
            if room is not None:
                room.set()
                room = None

    async with anyio.create_task_group() as task_group:
        try:
            while True:
                while in_flight >= max_concurrent_calls:
                    # At the limit: stop reading (the port's watermark pushes back on the
                    # peer) until a handler ends.  A plain counter: no semaphore per call.
                    # Before the receive, not after it: cancelled here, ``serve`` has
                    # taken no request it did not start (it stays in the port).
                    room = room or anyio.Event()
                    await room.wait()
                message = await port.receive()
                cls = message.__class__
                if cls is Closed:
                    break
                if cls is not Data:
                    continue  # Error, Passive: nothing to answer
                data: Any = message.data  # type: ignore[union-attr]
                ident: Any = None
                try:
                    envelope = (
                        unpack_envelope(data, limits, (REQUEST,), request_depth)
                        if bytes_frames
                        else data
                    )
                    if envelope.__class__ is list and len(envelope) >= 2:
                        ident = envelope[1] if envelope[1].__class__ is int else None
                    if (
                        envelope.__class__ is not list
                        or len(envelope) != 3
                        or envelope[0] != REQUEST
                        or ident is None
                    ):
                        raise RPCDecodeError(
                            f"not a request envelope [0, id, request]: {_summary(envelope)}"
                        )
                    request = request_codec.from_wire(envelope[2])
                except RPCDecodeError as exc:
                    if ident is None and bytes_frames:
                        ident = _peek_ident(data, (REQUEST,))
                    statistics.decode_errors += 1
                    await answer(encode([ERROR, ident, "decode", str(exc)]), ident)
                    continue
                statistics.requests += 1
                in_flight += 1
                if in_flight > statistics.peak_in_flight:
                    statistics.peak_in_flight = in_flight
                task_group.start_soon(run, ident, request)
        except (EndOfPort, ClosedPortError):
            pass
    if close:
        await port.aclose()
    return statistics


def _summary(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 100 else text[:97] + "..."


async def serve_listener(
    listener: Listener,
    interface: Interface[Request, Reply],
    handler: Callable[[Request], Awaitable[Reply]],
    *,
    max_concurrent_calls: int = DEFAULT_MAX_CONCURRENT_CALLS,
    task_status: anyio.abc.TaskStatus[Any] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve every connection ``listener`` accepts with :func:`serve`, until cancelled.

    Each connection is served in its own task; it ends alone (a malformed stream, a
    broken connection) and the others go on.  Open the listener with ``packet=4``::

        listener = await ports.listen_tcp(ios, "127.0.0.1", 7001, packet=4)
        await rpc.serve_listener(listener, STORE, handle)

    Args:
        listener: a listener whose ports have a packet mode typed RPC can use.
        interface: the request and reply types.
        handler: an async function from a request to its reply.
        max_concurrent_calls: the most handlers running at once per connection.
        task_status: reports the listener's local address once serving
            (``await task_group.start(serve_listener, ...)``).

    Raises:
        ioserver.ClosedPortError: the listener was closed while serving.
    """

    async def serve_one(port: Port) -> None:
        try:
            await serve(port, interface, handler, max_concurrent_calls=max_concurrent_calls)
        except OptionError as exc:
            log.error("RPC server: %s", exc)
        finally:
            port.close_nowait()

    async with anyio.create_task_group() as task_group:
        task_status.started(listener.local_address)
        async for accepted in listener:
            if isinstance(accepted, Accepted):
                task_group.start_soon(serve_one, accepted.port)
