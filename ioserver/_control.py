"""The daemon's control endpoint: its clients' ports, served inside the I/O thread.

Theory of operation
-------------------
A client's port has two halves, as every port does: the event loop's half (a
:class:`ports.Port`, in the client process) and the I/O thread's half (a ``Conn``, in the
daemon).  Between them, instead of a deque, is the protocol of :mod:`ioserver._protocol`
over a ZeroMQ ROUTER socket that this module handles *inside the daemon's I/O thread*:
commands are decoded, checked and applied to the ``Conn`` in the round they arrive, and
every event of a round for one client leaves in one frame at the end of that round.  No
event loop stands between a client and its sockets.

The daemon keeps, for each client port, a :class:`RemotePortState`: it stands where a
``Port`` stands for the I/O thread (``conn.port``), with the counters the flow control
reads, updated from the client's messages:

- receive flow control: ``_consumed_*`` are what the client's owner took, as the client
  last reported them (RESUME).  When the delivered bytes pass the high watermark, the
  I/O thread pauses reading as for a local port and tells the client (PAUSED); the
  client answers RESUME once its owner has taken enough - the same generation handshake.
- send flow control: ``_queued_bytes`` counts what the client sent; the I/O thread
  reports ``bytes_out`` (WRITTEN) when the client may be waiting on a busy port.

A session is a client (a ZeroMQ routing id).  A session that sends nothing, not even a
heartbeat, for ``HEARTBEAT_MISSES`` intervals is lost: its ports are closed after their
output is written, so peers see end-of-file.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from typing import Any

import zmq

from . import _protocol as P
from ._exceptions import ConnectError, OptionError
from ._framing import make_framer
from ._iothread import CONNECTING, LISTENER, STREAM, Conn, Handler, IOThread
from ._messages import WRITABLE, Accepted, Closed, Data, Error, Passive
from ._protocol import ProtocolViolation
from ._zmq import ZmqSocketHandler

log = logging.getLogger("ioserver")

RECEIVE_BATCH = 256  # frames taken from the control socket per round


class _Budget:
    """All sessions' share of the daemon's memory budget (a budget owner, as hubs are)."""

    def __init__(self) -> None:
        self.queued_bytes = 0
        self.consumed_bytes = 0

    def _stopped_by_io(self) -> None:
        pass


class RemotePortState:
    """The daemon's stand-in for a client's port (see the module docstring)."""

    _remote = True
    __slots__ = (
        "_consumed_bytes",
        "_consumed_messages",
        "_framer",
        "_queued_bytes",
        "_sizes",
        "conn",
        "low_watermark",
        "pid",
        "reported_bytes_out",
        "session",
    )

    def __init__(self, session: Session, pid: int, options: dict[str, Any]) -> None:
        self.session = session
        self.pid = pid
        packet = options.get("packet", "raw")
        self._framer = (
            None
            if packet in ("raw", 0)
            else make_framer(
                packet, packet_size=options["packet_size"], delimiter=options["delimiter"]
            )
        )
        self._sizes: deque[int] | None = (
            deque() if self._framer is not None and self._framer.decodes_objects else None
        )
        self._consumed_bytes = 0
        self._consumed_messages = 0
        self._queued_bytes = 0
        self.reported_bytes_out = 0
        self.low_watermark = options.get("low_watermark", 0)
        self.conn: Conn | None = None

    @property
    def _send_blocked(self) -> bool:
        # The client may think the port busy: report bytes_out when it drains (WRITTEN).
        return bool(self._queued_bytes - self.reported_bytes_out > self.low_watermark)

    def _paused(self, generation: int) -> None:
        self.session.emit([P.PAUSED, self.pid, generation])

    def _gone(self) -> None:
        self.session.port_gone(self)


class _Request:
    __slots__ = ("rid", "state")

    def __init__(self, rid: int, state: RemotePortState) -> None:
        self.rid = rid
        self.state = state


class Session:
    """One client: its ports, its outgoing events, its liveness."""

    def __init__(self, control: ControlEndpoint, identity: bytes) -> None:
        self.control = control
        self.identity = identity
        self.ports: dict[int, RemotePortState] = {}
        self.outbound: list[Any] = []
        self.pending: deque[bytes] = deque()  # packed frames ZeroMQ could not take yet
        self.last_seen = self.last_sent = time.monotonic()
        self.next_accepted = -1
        self.closed = False
        self.started = time.time()
        self.messages_in = 0
        self.faults = 0

    def emit(self, message: list[Any]) -> None:
        if self.closed:
            return
        if not self.outbound:
            self.control.mark(self)
        self.outbound.append(message)

    def fault(self, rid: Any, kind: str, text: str) -> None:
        self.faults += 1
        self.emit([P.FAULT, rid if P.is_int(rid) else None, kind, text])

    def deliver(self, pair: tuple[Any, Any]) -> None:
        """The I/O thread's ``conn.deliver`` for this client's ports: encode the event."""
        target, message = pair
        cls = message.__class__
        if cls is Data:
            sizes = target._sizes
            if sizes is None:
                data = message.data
                size = len(data)
                self.emit([P.DATA, target.pid, data])
            else:
                size = sizes.popleft()
                self.emit([P.DATA, target.pid, message.data, size])
            # Handed over: the daemon's memory budget no longer holds it.
            self.control.budget.consumed_bytes += size
        elif message is WRITABLE:
            conn = target.conn
            if conn is not None:
                target.reported_bytes_out = conn.bytes_out
                self.emit([P.WRITTEN, target.pid, conn.bytes_out])
        elif cls is Closed:
            self.emit([P.CLOSED, target.pid, message.reason, message.errno_name])
        elif cls is Error:
            self.emit([P.ERROR, target.pid, message.errno_name, message.errno, message.message])
        elif cls is Passive:
            self.emit([P.PASSIVE, target.pid])
        elif cls is Accepted:
            state = message.port
            conn = state.conn
            local = conn.sock.getsockname() if conn is not None and not conn.closed else None
            self.emit(
                [
                    P.ACCEPTED,
                    target.pid,
                    state.pid,
                    P.wire_address(local),
                    P.wire_address(message.address),
                ]
            )
        elif isinstance(target, _Request):
            self._answer(target, message)
        else:  # pragma: no cover - every event the I/O thread makes is handled above
            log.error("no wire form for %r", message)

    def _answer(self, request: _Request, result: Any) -> None:
        state = request.state
        if isinstance(result, tuple):
            conn, local, remote = result
            state.conn = conn
            self.emit([P.OK, request.rid, P.wire_address(local), P.wire_address(remote)])
            if self.closed:
                self.control.io.cmd_close(conn, None)
            return
        self.ports.pop(state.pid, None)
        if isinstance(result, ConnectError):
            self.emit(
                [
                    P.FAILED,
                    request.rid,
                    "ConnectError",
                    result.errno,
                    result.errno_name,
                    str(result),
                ]
            )
        else:
            self.emit([P.FAILED, request.rid, "OptionError", None, None, str(result)])

    def port_gone(self, state: RemotePortState) -> None:
        if self.ports.get(state.pid) is state:
            del self.ports[state.pid]
        self.emit([P.GONE, state.pid])

    def close(self, why: str) -> None:
        """Close every port of the session (after writing their output)."""
        if self.closed:
            return
        io = self.control.io
        count = 0
        for state in list(self.ports.values()):
            conn = state.conn
            if conn is not None and not conn.closed:
                count += 1
                io.cmd_close(conn, None)
        if self.outbound:  # what was answered before the end still goes (best effort)
            self.control._send(self.identity, P.pack(self.outbound))
        self.closed = True
        self.ports.clear()
        self.outbound.clear()
        self.pending.clear()
        log.info("client %s %s: closed its %d ports", self.identity.hex(), why, count)


class ControlEndpoint(ZmqSocketHandler):
    """The daemon's ROUTER socket in the I/O thread (see the module docstring)."""

    def __init__(
        self,
        io: IOThread,
        sock: zmq.Socket[bytes],
        *,
        heartbeat: float,
        info: dict[str, Any],
        status: Any,
    ) -> None:
        super().__init__(io, sock)
        self.heartbeat = heartbeat
        self.info = {**info, "version": P.VERSION, "heartbeat": heartbeat}
        self.status = status  # () -> dict, run on the I/O thread
        self.sessions: dict[bytes, Session] = {}
        self.marked: list[Session] = []
        self.budget = _Budget()
        self.faults = 0
        self.sessions_opened = 0
        self.sessions_lost = 0
        self._timer: Any = None
        io._budget_owners.append(self.budget)
        # Remote clients are served by this thread itself: it must not pause for the flush
        # point of a local app's loop (see ioserver._wakeup).
        io.waits_for_flush = False

    def start(self) -> None:
        super().start()
        self._timer = self.io.call_later(self.heartbeat, self._tick)

    def mark(self, session: Session) -> None:
        self.marked.append(session)
        self.io.mark_dirty(self)

    # -- receiving ------------------------------------------------------------------------
    def on_ready(self, mask: int) -> None:
        if not self.closed:
            self._serve_frames(RECEIVE_BATCH)

    def _handle(self, frames: list[bytes]) -> None:
        if len(frames) != 2:
            log.warning("control endpoint: a message of %d frames ignored", len(frames))
            return
        identity, frame = frames
        session = self.sessions.get(identity)
        try:
            messages = P.unpack(frame)
        except ProtocolViolation as exc:
            self._refuse(identity, session, None, exc.kind, str(exc))
            return
        for message in messages:
            try:
                if not (isinstance(message, list) and message and P.is_int(message[0])):
                    raise ProtocolViolation("malformed", "a message must be [opcode, ...]")
                opcode = message[0]
                if opcode == P.HELLO:
                    session = self._hello(identity, session, message)
                    continue
                if session is None or session.closed:
                    raise ProtocolViolation("no-session", "send HELLO first")
                session.last_seen = time.monotonic()
                session.messages_in += 1
                handler = _COMMANDS.get(opcode)
                if handler is None:
                    raise ProtocolViolation("unknown-opcode", f"unknown opcode {opcode}")
                handler(self, session, message)
            except ProtocolViolation as exc:
                rid = exc.rid
                if (
                    rid is None
                    and len(message) > 1
                    and P.is_int(message[1])
                    and message[0] in (P.CONNECT, P.LISTEN, P.STATUS)
                ):
                    rid = message[1]
                self._refuse(identity, session, rid, exc.kind, str(exc))
            except Exception as exc:  # a bug serving one message: refuse it, keep serving
                self.io.internal_errors += 1
                log.exception("control endpoint: error while serving %r", message[:2])
                self._refuse(identity, session, None, "internal", repr(exc))

    def _refuse(
        self, identity: bytes, session: Session | None, rid: Any, kind: str, text: str
    ) -> None:
        self.faults += 1
        log.warning(
            "control endpoint: refused a message from %s: %s: %s", identity.hex(), kind, text
        )
        if session is not None and not session.closed:
            session.fault(rid, kind, text)
        else:
            self._send(identity, P.pack([[P.FAULT, rid if P.is_int(rid) else None, kind, text]]))

    def _hello(self, identity: bytes, session: Session | None, message: list[Any]) -> Session:
        if len(message) != 2 or not P.is_int(message[1]):
            raise ProtocolViolation("malformed", "HELLO is [1, client_version]")
        if message[1] != P.VERSION:
            raise ProtocolViolation("version", f"client speaks {message[1]}; daemon speaks 1")
        if session is not None:
            session.close("said HELLO again")
        session = Session(self, identity)
        self.sessions[identity] = session
        self.sessions_opened += 1
        log.info("client %s connected", identity.hex())
        session.emit([P.WELCOME, self.info])
        return session

    # -- sending --------------------------------------------------------------------------
    def flush(self) -> None:
        marked, self.marked = self.marked, []
        now = time.monotonic()
        for session in marked:
            if session.closed or not session.outbound:
                continue
            frame = P.pack(session.outbound)
            session.outbound = []
            session.last_sent = now
            if session.pending or not self._send(session.identity, frame):
                session.pending.append(frame)
        self.on_ready(0)  # a send may have taken the fd's edge (see ioserver._zmq)

    def _send(self, identity: bytes, frame: bytes) -> bool:
        try:
            self.sock.send_multipart([identity, frame], zmq.NOBLOCK)
        except zmq.Again:
            return False
        except zmq.ZMQError:
            return True  # EHOSTUNREACH: that client is gone; its heartbeat will tell
        return True

    def _has_pending(self) -> bool:
        return any(session.pending for session in self.sessions.values())

    def _send_pending(self) -> None:
        for session in self.sessions.values():
            pending = session.pending
            while pending:
                if not self._send(session.identity, pending[0]):
                    return
                pending.popleft()

    # -- liveness -------------------------------------------------------------------------
    def _tick(self) -> None:
        if self.closed:
            return
        now = time.monotonic()
        deadline = self.heartbeat * P.HEARTBEAT_MISSES
        for identity, session in list(self.sessions.items()):
            if now - session.last_seen > deadline:
                self.sessions_lost += 1
                session.close(f"lost (silent for {now - session.last_seen:.1f} s)")
                del self.sessions[identity]
            elif now - session.last_sent >= self.heartbeat * 0.9:
                session.emit([P.HEARTBEAT])
        self._timer = self.io.call_later(self.heartbeat, self._tick)

    # -- closing --------------------------------------------------------------------------
    def close_all(self) -> None:
        """Stop serving: close every session's ports (after their output), then the
        socket."""
        for session in self.sessions.values():
            session.close("disconnected: the daemon is stopping")
        self.sessions.clear()
        self._close()

    def _close(self) -> None:
        if self.closed:
            return
        if self._timer is not None:
            self._timer[0] = None
        self._release_socket(0)

    def on_error(self, exc: Exception) -> None:
        log.error("control endpoint failed; it is closed", exc_info=exc)
        self.close_all()

    def on_shutdown(self) -> None:
        self.close_all()


# -- the commands (each runs on the I/O thread; raises ProtocolViolation when refused) ----
def _arity(message: list[Any], count: int, form: str) -> None:
    if len(message) != count:
        raise ProtocolViolation("malformed", f"expected {form}")


def _port(session: Session, pid: Any) -> RemotePortState:
    state = session.ports.get(pid) if P.is_int(pid) else None
    if state is None or state.conn is None:
        raise ProtocolViolation("unknown-port", f"this session has no open port {pid!r}")
    return state


def _open_options(session: Session, rid: int, pid: Any, raw: Any, listen: bool) -> Any:
    from ports._port import _LISTEN_OPTIONS, _check_options, port_options

    if not P.is_int(pid) or pid <= 0:
        raise ProtocolViolation("malformed", "a client's port id is a positive int", rid)
    if pid in session.ports:
        raise ProtocolViolation("duplicate-port", f"port id {pid} is in use", rid)
    if not isinstance(raw, dict):
        raise ProtocolViolation("malformed", "options must be a map", rid)
    options = dict(raw)
    extra: dict[str, Any] = {}
    try:
        if listen:
            for name in ("backlog", "reuseaddr", "reuseport"):
                if name in options:
                    extra[name] = options.pop(name)
            _check_options(extra, _LISTEN_OPTIONS, "a remote TCP listener")
            accept_active = options.pop("accept_active", [-1, False])
            if not (
                isinstance(accept_active, list)
                and len(accept_active) == 2
                and P.is_int(accept_active[0])
                and isinstance(accept_active[1], bool)
            ):
                raise OptionError("accept_active must be [credit, notify]")
            extra["active"] = (accept_active[0], accept_active[1])
        _, settings = port_options(options, "a remote TCP port")
    except OptionError as exc:
        raise ProtocolViolation("bad-option", str(exc), rid) from None
    return settings, extra


def _credit(message: list[Any], at: int) -> tuple[int, bool]:
    credit, notify = message[at], message[at + 1]
    if not P.is_int(credit) or not isinstance(notify, bool) or not -1 <= credit <= 1 << 20:
        raise ProtocolViolation("malformed", "an active mode is [credit: int, notify: bool]")
    return credit, notify


def _cmd_connect(control: ControlEndpoint, session: Session, message: list[Any]) -> None:
    _arity(message, 8, "[10, rid, pid, family, address, options, credit, notify]")
    rid = P.check_int(message[1], "rid")
    family, address = _address(message, rid)
    settings, _ = _open_options(session, rid, message[2], message[5], listen=False)
    active = _credit(message, 6)
    state = RemotePortState(session, message[2], settings)
    session.ports[state.pid] = state
    control.io.cmd_connect(
        _Request(rid, state), (state, session.deliver, family, address, settings, active)
    )


def _cmd_listen(control: ControlEndpoint, session: Session, message: list[Any]) -> None:
    _arity(message, 8, "[11, rid, pid, family, address, options, credit, notify]")
    rid = P.check_int(message[1], "rid")
    family, address = _address(message, rid)
    settings, extra = _open_options(session, rid, message[2], message[5], listen=True)
    active = _credit(message, 6)
    state = RemotePortState(session, message[2], settings)
    session.ports[state.pid] = state

    def make_port(conn: Conn, local_address: Any, remote_address: Any) -> RemotePortState:
        accepted = RemotePortState(session, session.next_accepted, settings)
        session.next_accepted -= 1
        accepted.conn = conn
        session.ports[accepted.pid] = accepted
        return accepted

    control.io.cmd_listen(
        _Request(rid, state),
        (state, session.deliver, family, address, {**extra, **settings}, active, make_port),
    )


def _address(message: list[Any], rid: int) -> tuple[int, Any]:
    try:
        return P.check_address(message[3], message[4])
    except ProtocolViolation as exc:
        exc.rid = rid
        raise


def _cmd_send(control: ControlEndpoint, session: Session, message: list[Any]) -> None:
    _arity(message, 3, "[20, pid, data]")
    state = _port(session, message[1])
    data = message[2]
    if not isinstance(data, bytes):
        raise ProtocolViolation("malformed", "SEND data must be bytes")
    state._queued_bytes += len(data)
    control.budget.queued_bytes += len(data)
    control.io.cmd_send(state.conn, data)  # type: ignore[arg-type]


def _cmd_send_eof(control: ControlEndpoint, session: Session, message: list[Any]) -> None:
    _arity(message, 2, "[21, pid]")
    control.io.cmd_send_eof(_port(session, message[1]).conn, None)  # type: ignore[arg-type]


def _cmd_close(control: ControlEndpoint, session: Session, message: list[Any]) -> None:
    _arity(message, 2, "[22, pid]")
    control.io.cmd_close(_port(session, message[1]).conn, None)  # type: ignore[arg-type]


def _cmd_active(control: ControlEndpoint, session: Session, message: list[Any]) -> None:
    _arity(message, 4, "[23, pid, credit, notify]")
    state = _port(session, message[1])
    control.io.cmd_set_active(state.conn, _credit(message, 2))  # type: ignore[arg-type]


def _cmd_read_once(control: ControlEndpoint, session: Session, message: list[Any]) -> None:
    _arity(message, 2, "[24, pid]")
    control.io.cmd_read_once(_port(session, message[1]).conn, None)  # type: ignore[arg-type]


def _cmd_resume(control: ControlEndpoint, session: Session, message: list[Any]) -> None:
    _arity(message, 5, "[25, pid, generation, consumed_bytes, consumed_messages]")
    state = _port(session, message[1])
    generation = P.check_int(message[2], "generation", 0)
    consumed_bytes = P.check_int(message[3], "consumed_bytes", 0)
    consumed_messages = P.check_int(message[4], "consumed_messages", 0)
    # Counters only grow; a client cannot claim to have taken more than it was given.
    conn = state.conn
    assert conn is not None
    state._consumed_bytes = max(state._consumed_bytes, min(consumed_bytes, conn.delivered_bytes))
    state._consumed_messages = max(
        state._consumed_messages, min(consumed_messages, conn.delivered_messages)
    )
    control.io.cmd_resume(conn, generation)


def _cmd_status(control: ControlEndpoint, session: Session, message: list[Any]) -> None:
    _arity(message, 2, "[30, rid]")
    rid = P.check_int(message[1], "rid")
    session.emit([P.STATUS_REPLY, rid, control.status()])


def _cmd_heartbeat(control: ControlEndpoint, session: Session, message: list[Any]) -> None:
    _arity(message, 1, "[2]")


def _cmd_bye(control: ControlEndpoint, session: Session, message: list[Any]) -> None:
    _arity(message, 1, "[3]")
    session.close("said bye")
    control.sessions.pop(session.identity, None)


_COMMANDS: dict[int, Any] = {
    P.HEARTBEAT: _cmd_heartbeat,
    P.BYE: _cmd_bye,
    P.CONNECT: _cmd_connect,
    P.LISTEN: _cmd_listen,
    P.SEND: _cmd_send,
    P.SEND_EOF: _cmd_send_eof,
    P.CLOSE: _cmd_close,
    P.ACTIVE: _cmd_active,
    P.READ_ONCE: _cmd_read_once,
    P.RESUME: _cmd_resume,
    P.STATUS: _cmd_status,
}


def io_status(io: IOThread, started: float, extra: dict[str, Any]) -> dict[str, Any]:
    """The I/O thread's status for ``ioserver status`` (runs on the I/O thread)."""
    kinds = {"tcp": 0, "tcp_listeners": 0, "connecting": 0, "other": 0}
    busy = paused = queued = 0
    for entry in io._table:
        if entry is None or entry.__class__ is not Conn:
            if isinstance(entry, Handler):
                kinds["other"] += 1
            continue
        if entry.kind == STREAM:
            kinds["tcp"] += 1
            queued += entry.out_bytes
            if entry.msgq_paused or entry.global_paused:
                paused += 1
            if entry.out_bytes > entry.send_low:
                busy += 1
        elif entry.kind == LISTENER:
            kinds["tcp_listeners"] += 1
        elif entry.kind == CONNECTING:
            kinds["connecting"] += 1
    inboxes = io._inboxes
    return {
        "pid": os.getpid(),
        "uptime": round(time.monotonic() - started, 3),
        "ports_open": io.ports_open,
        "ports_by_kind": kinds,
        "bytes_in": io.bytes_in,
        "bytes_out": io.bytes_out,
        "bytes_queued_out": queued,
        "busy_ports": busy,
        "paused_ports": paused,
        "command_queue_depth": len(io.commands.items),
        "event_queue_depth": sum(len(inbox.items) for inbox in inboxes),
        "wakes_to_io_sent": io.commands.wakes_sent,
        "wakes_to_io_skipped": io.commands.wakes_skipped,
        "wakes_to_loops_sent": sum(inbox.wakes_sent for inbox in inboxes),
        "wakes_to_loops_skipped": sum(inbox.wakes_skipped for inbox in inboxes),
        "memory_in_use": io.memory_in_use(),
        "internal_errors": io.internal_errors,
        **extra,
    }
