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
``Port`` stands for the I/O thread (``conn.port``: a loop half, see ioserver._contract),
with the flow-control window the I/O thread reads, updated from the client's messages:

- receive flow control: the window's ``consumed_*`` are what the client's owner took, as
  the client last reported them (RESUME, checked by ``Window.credit_remote``).  When the
  delivered bytes pass the high watermark, the I/O thread pauses reading as for a local
  port and tells the client (PAUSED, through ``window.on_pause``); the client answers
  RESUME once its owner has taken enough - the same generation handshake (ioserver._flow).
- send flow control: the window's ``queued_bytes`` counts what the client sent; the I/O
  thread reports ``bytes_out`` (WRITTEN) when the client may be waiting on a busy port
  (``send_blocked``: more sent than written and reported, beyond the low watermark).

Every kind of port crosses (protocol version 3): a TCP or Unix stream or listener is a
``Conn``, a UDP or TUN port a datagram handler, a ZeroMQ port a ``ZmqHandler`` made
here, a program a ``ProcessWatcher`` and its stream ``Conn`` (started by a worker
thread); each has a :class:`RemotePortState` whose ``kind`` says what its SEND may carry
and when its id is released (GONE).  The kinds that let a client act as the daemon's user
beyond the network - programs, Unix paths, TUN devices (:data:`PERMISSIONS`) - are
served only when the daemon was started to allow them (FAULT ``"forbidden"``).

A session is a client: a ZeroMQ routing id *and* the secret token the daemon issued in
its WELCOME, which every later frame must carry (a peer that takes over an orphaned
session's routing id does not know it, so it gets no port of that session).  A session
that sends nothing, not even a heartbeat, for ``HEARTBEAT_MISSES`` intervals is lost: its
ports are closed after their output is written, so peers see end-of-file.

Limits (:class:`ControlLimits`): every bound on what one client can make the daemon hold
or do is here, so that a refusal is cheap and memory stays under the budget:

- frames: ZeroMQ drops a peer that sends more than ``max_frame`` bytes
  (``ZMQ_MAXMSGSIZE``); a frame is decoded with msgpack's limits; after
  ``faults_per_frame`` refusals the rest of a frame is ignored; refusals are logged at
  most ``log_per_second`` times a second;
- sessions (``max_sessions``), ports a session opens (``max_ports``), jobs of the
  worker threads (``max_resolving``): host names are resolved and programs forked there,
  never on the I/O thread;
- what an open request carries (paths, argv, endpoints, topics, device names, signals)
  is checked and bounded by :mod:`ioserver._protocol` before use;
- STATUS is computed at most once a round and answered at most ``status_per_round``
  times per session and round;
- output to a client: DATA stays charged to the memory budget until ZeroMQ has taken
  its frame, and ZeroMQ queues at most ``send_hwm`` frames per client
  (``ZMQ_SNDHWM``).  When more than ``session_queue`` bytes of DATA wait for one client
  the session's ports stop reading (``Conn.queue_paused``: backpressure on their peers,
  not memory) until half of it has left.  A RESUME counts only what has left the
  daemon as taken, so a client that does not read cannot resume its ports blindly.
"""

from __future__ import annotations

import errno
import hmac
import logging
import os
import secrets
import socket
import subprocess
import time
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import TypeVar, cast

import zmq

from . import _protocol as P
from ._conn import CONNECTING, LISTENER, STREAM, Conn, Handler
from ._contract import (
    ConnectRequest,
    ListenRequest,
    ProcessRequest,
    SocketAddress,
    TunRequest,
    UDPRequest,
    inet_address,
)
from ._exceptions import ConnectError, OptionError, PollerLimitError, errno_name
from ._flow import ReceiveFlow, Window
from ._framing import port_framer
from ._iothread import IOThread
from ._messages import (
    WRITABLE,
    Accepted,
    Closed,
    Data,
    Datagram,
    Error,
    ExitStatus,
    Packet,
    Passive,
)
from ._options import (
    LISTEN_OPTIONS,
    FlowSettings,
    ListenOptions,
    PortSettings,
    StreamOptions,
    ZmqSettings,
    check_options,
    port_options,
    tun_options,
    udp_options,
    unix_options,
    zmq_options,
)
from ._process import ProcessWatcher, cmd_start_process, open_pidfd, socketpair_for_child
from ._protocol import ProtocolViolation
from ._tun import IFNAMSIZ, cmd_open_tun
from ._udp import DatagramHandler, cmd_open_udp
from ._unix import cmd_listen_unix
from ._zmq import ZmqHandler, ZmqSocketHandler

log = logging.getLogger("ioserver")
_T = TypeVar("_T")

RECEIVE_BATCH = 256  # frames taken from the control socket per round
#: Messages the control endpoint runs per round of the I/O thread, all clients together:
#: a frame holds up to ``max_messages`` (65,536), which at 1-2 us each would keep the
#: thread from every other socket, timer and heartbeat for 100 ms or more.  The rest of a
#: frame waits for the next round (``call_soon``), before any later frame is read, so a
#: client's messages still run in order.
MESSAGE_BUDGET = 2048
_EAI_NAMES = {
    getattr(socket, name): name
    for name in dir(socket)
    if name.startswith("EAI_") and isinstance(getattr(socket, name), int)
}


#: The kinds of port a daemon serves only when started with ``--allow-KIND``: each lets a
#: client act as the daemon's user beyond the network (docs: "Limits and security").
#: ``process``: run any program; ``unix``: Unix socket paths and ``ipc://`` ZeroMQ
#: endpoints on the daemon's file system; ``tun``: TUN/TAP devices in its namespace.
PERMISSIONS = ("process", "unix", "tun")


@dataclass
class ControlLimits:
    """The control endpoint's bounds on one client (``ioserver serve`` options; the docs'
    "Limits and security" page).  What a client that passes one gets is in brackets."""

    #: bytes in one frame from a client: ``ZMQ_MAXMSGSIZE`` [ZeroMQ disconnects it].
    max_frame: int = P.DEFAULT_MAX_FRAME
    #: messages in one frame, elements of any array [FAULT "malformed", frame dropped].
    max_messages: int = P.MAX_MESSAGES
    #: sessions open at once [HELLO answered with FAULT "limit"].
    max_sessions: int = 1024
    #: ports of one session, accepted ones included [CONNECT/LISTEN: FAULT "limit"].
    max_ports: int = 4096
    #: bytes of DATA queued for one client before its ports stop reading [backpressure].
    session_queue: int = 4 * 1024 * 1024
    #: frames ZeroMQ queues for one client (``ZMQ_SNDHWM``) [they wait in the session].
    send_hwm: int = 32
    #: jobs in the worker threads at once, all sessions: host names being resolved,
    #: programs being started [CONNECT/LISTEN/OPEN_UDP/OPEN_PROCESS: FAULT "limit"].
    max_resolving: int = 64
    #: STATUS requests answered per session and round [FAULT "limit"].
    status_per_round: int = 4
    #: refusals answered per frame [the rest of the frame is ignored, one FAULT says so].
    faults_per_frame: int = 16
    #: refused-message log lines per second [counted, one line says how many].
    log_per_second: int = 10

    def check(self) -> None:
        """Raises OptionError: a limit is not a positive int."""
        for name, value in vars(self).items():
            if not P.is_int(value) or value <= 0:
                raise OptionError(f"the control endpoint's {name} must be a positive int")


class _Budget:
    """All sessions' share of the daemon's memory budget (a budget owner, as hubs are)."""

    def __init__(self) -> None:
        self.queued_bytes = 0
        self.consumed_bytes = 0

    def _stopped_by_io(self) -> None:
        pass


class RemotePortState:
    """The daemon's stand-in for a client's port (see the module docstring)."""

    __slots__ = (
        "_unsent",
        "_window",
        "conn",
        "kind",
        "low_watermark",
        "pid",
        "reported_bytes_out",
        "session",
        "watcher",
    )

    def __init__(
        self, session: Session, pid: int, options: PortSettings, kind: str = "stream"
    ) -> None:
        self.session = session
        self.pid = pid
        #: ``"stream"`` (TCP, Unix), ``"process"``, ``"datagram"`` (UDP), ``"tun"``,
        #: ``"zmq"``: what its SEND may carry and when its id is released.
        self.kind = kind
        window = self._window = Window(port_framer(options) if kind != "zmq" else None)
        window.on_pause = self._paused
        if kind == "stream":
            # A stream Conn tells when the I/O thread releases it.  A handler does not,
            # and a program's port lives until its exit status: those are released at
            # their final Closed, or when the client closes them (Session.deliver).
            window.on_gone = self._gone
        if kind == "zmq":
            window.sizes = deque()  # each message's size, as ports.ZmqPort's window
        self._unsent = 0  # bytes of its DATA queued in the session, not yet taken by ZeroMQ
        self.reported_bytes_out = 0
        self.low_watermark = options["low_watermark"]
        #: The port's I/O half: a stream Conn, or a handler (UDP, TUN, ZeroMQ).
        self.conn: Conn | Handler | None = None
        self.watcher: ProcessWatcher | None = None  # a process port's program

    def _update_send_blocked(self) -> None:
        """The client may think the port busy: have the I/O thread report ``bytes_out``
        when it drains (WRITTEN).  Called whenever what it sent or was told changes."""
        window = self._window
        window.send_blocked = window.queued_bytes - self.reported_bytes_out > self.low_watermark

    def bytes_out(self) -> int:
        """What its I/O half sent (a datagram handler: sent or dropped), for WRITTEN."""
        conn = self.conn
        if isinstance(conn, DatagramHandler):
            return conn.out_done
        if isinstance(conn, (Conn, ZmqHandler)):
            return conn.bytes_out
        return 0

    def _paused(self, generation: int) -> None:
        self.session.emit([P.PAUSED, self.pid, generation])

    def _gone(self) -> None:
        self.session.port_gone(self)


class _Request:
    __slots__ = ("rid", "state")

    def __init__(self, rid: int, state: RemotePortState) -> None:
        self.rid = rid
        self.state = state


#: A job for the daemon's worker threads: a name to resolve, a program to start.
_Job = tuple[_Request, "ConnectRequest | ListenRequest | UDPRequest | ProcessRequest"]


class Session:
    """One client: its ports, its outgoing events, its liveness."""

    def __init__(self, control: ControlEndpoint, identity: bytes, token: bytes) -> None:
        self.control = control
        self.identity = identity
        self.token = token
        self.user: str | None = None  # the ZAP User-Id of its client (CURVE: its key)
        self.ports: dict[int, RemotePortState] = {}
        self.outbound: list[P.Message] = []
        # The DATA of ``outbound`` as (port, bytes charged), credited when ZeroMQ takes
        # the frame; ``pending`` holds the frames ZeroMQ could not take yet, with theirs.
        self.out_credits: list[tuple[RemotePortState, int]] = []
        self.out_size = 0
        self.pending: deque[tuple[bytes, list[tuple[RemotePortState, int]]]] = deque()
        self.held = 0  # bytes of DATA in outbound and pending (charged to the budget)
        self.holding = False  # its ports stopped reading: ``held`` passed session_queue
        self.status_round = -1
        self.status_count = 0
        self.last_seen = self.last_sent = time.monotonic()
        self.next_accepted = -1
        self.closed = False
        self.started = time.time()
        self.messages_in = 0
        self.faults = 0

    def emit(self, message: P.Message) -> None:
        if self.closed:
            return
        if not self.outbound:
            self.control.mark(self)
        self.outbound.append(message)

    def fault(self, rid: object, kind: str, text: str) -> None:
        self.faults += 1
        self.emit([P.FAULT, rid if P.is_int(rid) else None, kind, text])

    def deliver(self, pair: tuple[object, object]) -> None:
        """The I/O thread's ``conn.deliver`` for this client's ports: encode the event."""
        target, message = pair
        if not isinstance(target, RemotePortState):
            if isinstance(target, _Request):
                self._answer(target, message)
            else:  # pragma: no cover - the I/O thread delivers to what it was given
                log.error("no wire form for %r to %r", message, target)
            return
        if isinstance(message, Data):
            sizes = target._window.sizes
            if sizes is None:
                data = message.data
                size = len(data)
                self.emit([P.DATA, target.pid, data])
            else:
                size = sizes.popleft()
                self.emit([P.DATA, target.pid, message.data, size])
            self._charge(target, size)
        elif isinstance(message, (Datagram, Packet)):
            data = message.data
            address = P.wire_address(message.address) if isinstance(message, Datagram) else None
            self.emit([P.DATAGRAM, target.pid, data, address])
            self._charge(target, len(data))
        elif message is WRITABLE:
            if target.conn is not None:
                sent = target.bytes_out()
                target.reported_bytes_out = sent
                target._update_send_blocked()
                self.emit([P.WRITTEN, target.pid, sent])
        elif isinstance(message, Closed):
            self.emit([P.CLOSED, target.pid, message.reason, message.errno_name])
            if target.kind != "stream":
                self.port_gone(target)  # its final message: the handler or program is done
        elif isinstance(message, ExitStatus):
            self.emit([P.EXIT, target.pid, message.status])
        elif isinstance(message, Error):
            self.emit([P.ERROR, target.pid, message.errno_name, message.errno, message.message])
        elif isinstance(message, Passive):
            self.emit([P.PASSIVE, target.pid])
        elif isinstance(message, Accepted) and isinstance(message.port, RemotePortState):
            state = message.port
            conn = state.conn
            local = conn.sock.getsockname() if isinstance(conn, Conn) and not conn.closed else None
            self.emit(
                [
                    P.ACCEPTED,
                    target.pid,
                    state.pid,
                    P.wire_address(local),
                    P.wire_address(message.address),
                ]
            )
        else:  # pragma: no cover - every event the I/O thread makes is handled above
            log.error("no wire form for %r", message)

    def _charge(self, target: RemotePortState, size: int) -> None:
        """A DATA or DATAGRAM of ``size`` bytes was queued for the client: it stays the
        daemon's memory until ZeroMQ takes its frame (``sent``)."""
        self.out_credits.append((target, size))
        target._unsent += size
        self.held += size
        self.out_size += size
        limits = self.control.limits
        if self.held > limits.session_queue:
            self.hold(target)
        if self.out_size >= limits.max_frame:
            self.control.send_now(self)

    def _answer(self, request: _Request, result: object) -> None:
        state = request.state
        if isinstance(result, tuple):
            if len(result) == 2:  # a TUN port: (handler, device name)
                conn, local = result
                remote = None
            else:
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

    def sent(self, credits: list[tuple[RemotePortState, int]]) -> None:
        """ZeroMQ took a frame: its DATA leaves the budget and the session's queue."""
        total = 0
        for state, size in credits:
            state._unsent -= size
            total += size
        if total:
            self.control.budget.consumed_bytes += total
            self.held -= total
            if self.holding and self.held <= self.control.limits.session_queue // 2:
                self.release()

    def hold(self, target: RemotePortState) -> None:
        """Too much waits for the client: stop reading the session's ports (the port that
        delivered, if they already stopped: an accepted one, or one that read again)."""
        if not self.holding:
            self.holding = True
            self.control.holds += 1
            for state in self.ports.values():
                self._hold(state.conn)
        else:
            self._hold(target.conn)

    def _hold(self, conn: Conn | Handler | None) -> None:
        # A handler (UDP, TUN, ZeroMQ) is held by its window alone: its messages are few
        # and bounded by their watermarks, and the kernel or ZeroMQ drops or queues more.
        if not isinstance(conn, Conn) or conn.closed or conn.queue_paused:
            return
        if conn.kind == STREAM:
            conn.queue_paused = True
            self.control.io._stream_interest(conn)
        elif conn.kind == CONNECTING:
            conn.queue_paused = True  # read from when it connects

    def release(self) -> None:
        """Half of the queue left: the session's ports read again."""
        self.holding = False
        io = self.control.io
        for state in self.ports.values():
            conn = state.conn
            if isinstance(conn, Conn) and conn.queue_paused:
                conn.queue_paused = False
                if conn.kind == STREAM and not conn.closed:
                    io._stream_interest(conn)

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
                io.cmd_close(_entry(conn), None)
            if state.watcher is not None:
                state.watcher.terminate()  # SIGTERM, SIGKILL after its grace; reaped
        if self.outbound:  # what was answered before the end still goes (best effort)
            self.control._send(self.identity, P.pack(self.outbound))
        self.closed = True
        self.ports.clear()
        self.outbound.clear()
        # What was queued for the client is dropped: it leaves the budget.
        self.sent(self.out_credits)
        self.out_credits = []
        while self.pending:
            self.sent(self.pending.popleft()[1])
        self.control.backlogged.pop(self, None)
        # A session that had no port (`ioserver status`, a probe) is not news at INFO.
        log.log(
            logging.INFO if count else logging.DEBUG,
            "client %s %s: closed its %d ports",
            self.identity.hex(),
            why,
            count,
        )


class ControlEndpoint(ZmqSocketHandler):
    """The daemon's ROUTER socket in the I/O thread (see the module docstring)."""

    def __init__(
        self,
        io: IOThread,
        sock: zmq.Socket[bytes],
        *,
        heartbeat: float,
        info: dict[str, P.Wire],
        status: Callable[[], dict[str, P.Wire]],
        limits: ControlLimits | None = None,
        bind_user: bool = False,
        allow: frozenset[str] = frozenset(),
    ) -> None:
        super().__init__(io, sock)
        #: The kinds of :data:`PERMISSIONS` this daemon serves (``--allow-KIND``).
        self.allow = allow
        # Under CURVE a session is also bound to the client's key, the ZAP "User-Id" of
        # its frames: a token alone, leaked, does not let another key in.
        self._copy = not bind_user
        self.limits = limits = limits or ControlLimits()
        self.heartbeat = heartbeat
        self.info = {
            **info,
            "version": P.VERSION,
            "heartbeat": heartbeat,
            "max_frame": limits.max_frame,
            "max_messages": limits.max_messages,
        }
        self.status = status  # () -> dict, run on the I/O thread
        self.sessions: dict[bytes, Session] = {}
        self.marked: list[Session] = []
        self.backlogged: dict[Session, None] = {}  # sessions with frames ZeroMQ refused
        # The round's message budget (MESSAGE_BUDGET), and the rest of a frame it cut.
        self._budget = MESSAGE_BUDGET
        self._budget_round = -1
        self._rest: tuple[bytes, Session | None, str | None, list[P.Wire], int, int] | None = None
        self.budget = _Budget()
        self.faults = 0
        self.faults_unanswered = 0
        self.sessions_opened = 0
        self.sessions_lost = 0
        self.sessions_refused = 0
        self.holds = 0
        self.names_resolved = 0
        self._resolving = 0
        self._resolver: ThreadPoolExecutor | None = None
        self._status_cache: tuple[int, dict[str, P.Wire]] | None = None
        self._log_window = 0.0
        self._log_count = 0
        self._log_suppressed = 0
        self._timer: list[Callable[[], None] | None] | None = None
        io.budget.owners.append(self.budget)
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
        if self.closed:
            return
        polls = self.io.polls
        if self._budget_round != polls:  # a new round: a new budget
            self._budget_round = polls
            self._budget = MESSAGE_BUDGET
        rest = self._rest
        if rest is not None:  # the rest of a frame cut short by the last round's budget
            self._rest = None
            self._run(*rest)
            if self._rest is not None or self.closed:
                if not self.closed:
                    self.io.call_soon(self)
                return
        if self._budget > 0:
            self._serve_frames(RECEIVE_BATCH)
        else:
            self.io.call_soon(self)

    def _more_later(self) -> bool:
        """The round's message budget is spent: read no more frames this round."""
        return self._rest is not None or self._budget <= 0

    def _handle(self, frames: list[bytes]) -> None:
        if len(frames) != 2:
            self._log_refusal("a message of %d frames ignored", len(frames))
            return
        user: str | None = None
        if not self._copy:  # zmq.Frame objects: bind the session to the client's key
            received = cast("list[zmq.Frame]", frames)  # read with copy=False (ZmqSocketHandler)
            try:
                value = received[-1].get("User-Id")
            except zmq.ZMQError:
                value = None
            user = value if isinstance(value, str) else None
            frames = [frame.bytes for frame in received]
        identity, frame = frames
        session = self.sessions.get(identity)
        limits = self.limits
        try:
            messages, token = P.unpack_frame(
                frame, max_frame=limits.max_frame, max_messages=limits.max_messages
            )
        except ProtocolViolation as exc:
            self._refuse(identity, None, None, exc.kind, str(exc))
            return
        if session is not None and (
            token is None or not hmac.compare_digest(token, session.token) or user != session.user
        ):
            # The routing id is a session's, the token is not: another connection (a
            # peer that took an orphaned session's routing id, say).  Nothing of it runs.
            self._refuse(
                identity,
                None,
                None,
                "no-session",
                "this frame does not carry its session's token (a session's frames carry "
                "the token of its WELCOME, and under CURVE come from its client's key)",
            )
            return
        self._run(identity, session, user, messages, 0, 0)

    def _run(
        self,
        identity: bytes,
        session: Session | None,
        user: str | None,
        messages: list[P.Wire],
        start: int,
        refused: int,
    ) -> None:
        """Run ``messages[start:]`` of one frame (its token already checked), as far as
        the round's message budget goes; keep the rest in ``_rest`` for the next round."""
        limits = self.limits
        for index in range(start, len(messages)):
            if self._budget <= 0:
                self._rest = (identity, session, user, messages, index, refused)
                return
            self._budget -= 1
            message = messages[index]
            try:
                if not (isinstance(message, list) and message and P.is_int(message[0])):
                    raise ProtocolViolation("malformed", "a message must be [opcode, ...]")
                opcode = message[0]
                if opcode == P.HELLO:
                    session = self._hello(identity, session, message)
                    session.user = user
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
                rid: object = exc.rid
                if rid is None and isinstance(message, list) and message[0] in _REQUESTS:
                    rid = message[1] if len(message) > 1 else None  # echoed if an int
                self._refuse(identity, session, rid, exc.kind, str(exc))
                refused += 1
            except Exception as exc:  # a bug serving one message: refuse it, keep serving
                self.io.internal_errors += 1
                shown = message[:2] if isinstance(message, list) else message
                log.exception("control endpoint: error while serving %r", shown)
                self._refuse(identity, session, None, "internal", repr(exc))
                refused += 1
            if refused >= limits.faults_per_frame and index + 1 < len(messages):
                # A refusal costs little, a frame of them would not: the rest is dropped.
                left = len(messages) - index - 1
                self.faults_unanswered += left
                self._refuse(
                    identity,
                    session,
                    None,
                    "limit",
                    f"{refused} messages of this frame were refused: its other {left} are ignored",
                )
                return

    def _refuse(
        self, identity: bytes, session: Session | None, rid: object, kind: str, text: str
    ) -> None:
        self.faults += 1
        self._log_refusal("refused a message from %s: %s: %s", identity.hex(), kind, text[:200])
        if session is not None and not session.closed:
            session.fault(rid, kind, text)
        else:
            self._send(identity, P.pack([[P.FAULT, rid if P.is_int(rid) else None, kind, text]]))

    def _log_refusal(self, form: str, *args: object) -> None:
        """Log a refusal, at most ``log_per_second`` lines a second; the others are
        counted and one line says how many (at the next refusal or heartbeat tick)."""
        now = time.monotonic()
        if now - self._log_window >= 1.0:
            self._log_summary()
            self._log_window = now
            self._log_count = 0
        if self._log_count < self.limits.log_per_second:
            self._log_count += 1
            log.warning("control endpoint: " + form, *args)
        else:
            self._log_suppressed += 1

    def _log_summary(self) -> None:
        if self._log_suppressed:
            log.warning(
                "control endpoint: %d more refused messages were not logged", self._log_suppressed
            )
            self._log_suppressed = 0

    def _hello(self, identity: bytes, session: Session | None, message: P.Message) -> Session:
        if len(message) != 2 or not P.is_int(message[1]):
            raise ProtocolViolation("malformed", "HELLO is [1, client_version]")
        if message[1] != P.VERSION:
            raise ProtocolViolation(
                "version", f"client speaks {message[1]}; daemon speaks {P.VERSION}"
            )
        if session is not None and not session.closed:
            # A frame with the session's token (_handle checked): the client starts over.
            session.close("said HELLO again")
            self.sessions.pop(identity, None)
        if len(self.sessions) >= self.limits.max_sessions:
            self.sessions_refused += 1
            raise ProtocolViolation(
                "limit", f"the daemon serves {len(self.sessions)} sessions, its limit"
            )
        session = Session(self, identity, secrets.token_bytes(P.TOKEN_SIZE))
        self.sessions[identity] = session
        self.sessions_opened += 1
        log.debug("client %s connected", identity.hex())
        session.emit([P.WELCOME, {**self.info, "token": session.token}])
        return session

    def cached_status(self) -> dict[str, P.Wire]:
        """The status, computed at most once a round (it scans the port table)."""
        round_ = self.io.polls
        cache = self._status_cache
        if cache is None or cache[0] != round_:
            cache = self._status_cache = (round_, self.status())
        return cache[1]

    # -- host names: resolved by worker threads, never by the I/O thread -----------------
    def resolve(self, request: _Request, spec: ConnectRequest | ListenRequest | UDPRequest) -> None:
        """Resolve the address of a CONNECT, LISTEN or OPEN_UDP off the I/O thread, then
        open it.

        Raises:
            ProtocolViolation: ``max_resolving`` jobs are in the worker threads already.
        """
        self._work(_resolve_name, self._resolved, (request, spec), "host names are being resolved")

    def start_program(self, request: _Request, spec: ProcessRequest) -> None:
        """Start a client's program in a worker thread (never a fork on the I/O thread).

        Raises:
            ProtocolViolation: ``max_resolving`` jobs are in the worker threads already.
        """
        self._work(_start_program, self._program_started, (request, spec), "programs are starting")

    def _work(
        self,
        function: Callable[[IOThread, Callable[[_Job, object], None], _Job], None],
        done: Callable[[_Job, object], None],
        job: _Job,
        what: str,
    ) -> None:
        if self._resolving >= self.limits.max_resolving:
            raise ProtocolViolation(
                "limit",
                f"{self._resolving} {what} or other jobs are in the daemon's worker threads; "
                "try again",
                job[0].rid,
            )
        if self._resolver is None:
            self._resolver = ThreadPoolExecutor(4, thread_name_prefix="ioserver-resolve")
        self._resolving += 1
        self._resolver.submit(function, self.io, done, job)

    def _resolved(self, job: _Job, result: object) -> None:
        self._resolving -= 1
        request, _ = job
        state = request.state
        session = state.session
        if session.closed or session.ports.get(state.pid) is not state:
            return  # the session ended meanwhile
        if isinstance(result, BaseException):
            session._answer(request, result)
            return
        self.names_resolved += 1
        if isinstance(result, UDPRequest):
            cmd_open_udp(self.io, request, result)
        elif isinstance(result, ListenRequest):
            self.io.cmd_listen(request, result)
        elif isinstance(result, ConnectRequest):
            self.io.cmd_connect(request, result)

    def _program_started(self, job: _Job, result: object) -> None:
        self._resolving -= 1
        request, _ = job
        state = request.state
        session = state.session
        if isinstance(result, BaseException):
            if not session.closed and session.ports.get(state.pid) is state:
                session._answer(request, result)
            return
        assert isinstance(result, tuple)
        watcher, conn = result
        cmd_start_process(watcher, None)  # into the table: it will be reaped, whatever comes
        if session.closed or session.ports.get(state.pid) is not state:
            self.io.cmd_close(conn, None)
            watcher.terminate()
            return
        state.conn = conn
        state.watcher = watcher
        session.emit([P.OK, request.rid, "", watcher.pid])

    # -- sending --------------------------------------------------------------------------
    def flush(self) -> None:
        marked, self.marked = self.marked, []
        for session in marked:
            if not session.closed and session.outbound:
                self.send_now(session)
        self.on_ready(0)  # a send may have taken the fd's edge (see ioserver._zmq)

    def send_now(self, session: Session) -> None:
        """Pack the session's outbound messages into a frame and hand it to ZeroMQ, or
        queue it behind the frames ZeroMQ refused (``send_hwm``)."""
        frame = P.pack(session.outbound)
        credits = session.out_credits
        session.outbound = []
        session.out_credits = []
        session.out_size = 0
        session.last_sent = time.monotonic()
        if session.pending or not self._send(session.identity, frame):
            session.pending.append((frame, credits))
            self.backlogged[session] = None
        else:
            session.sent(credits)

    def _send(self, identity: bytes, frame: bytes) -> bool:
        try:
            self.sock.send_multipart([identity, frame], zmq.NOBLOCK)
        except zmq.Again:
            return False
        except zmq.ZMQError:
            return True  # EHOSTUNREACH: that client is gone; its heartbeat will tell
        return True

    def _has_pending(self) -> bool:
        return bool(self.backlogged)

    def _send_pending(self) -> None:
        # Each backlogged session as far as ZeroMQ takes its frames: a client that does
        # not read holds up its own frames only.
        for session in list(self.backlogged):
            pending = session.pending
            while pending:
                frame, credits = pending[0]
                if not self._send(session.identity, frame):
                    break
                pending.popleft()
                session.sent(credits)
            if not pending:
                del self.backlogged[session]

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
        if now - self._log_window >= 1.0:
            self._log_summary()
        self._timer = self.io.call_later(self.heartbeat, self._tick)

    # -- closing --------------------------------------------------------------------------
    def close_all(self) -> None:
        """Stop serving: close every session's ports (after their output), then the
        socket."""
        for session in self.sessions.values():
            session.close("disconnected: the daemon is stopping")
        self.sessions.clear()
        if self._resolver is not None:
            self._resolver.shutdown(wait=False, cancel_futures=True)
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
def _arity(message: P.Message, count: int, form: str) -> None:
    if len(message) != count:
        raise ProtocolViolation("malformed", f"expected {form}")


def _port(session: Session, pid: object) -> RemotePortState:
    state = session.ports.get(pid) if P.is_int(pid) else None
    if state is None or state.conn is None:
        raise ProtocolViolation("unknown-port", f"this session has no open port {pid!r}")
    return state


def _conn(state: RemotePortState) -> Conn:
    """The I/O half of a port :func:`_port` found open."""
    conn = state.conn
    assert conn is not None
    return _entry(conn)


def _entry(conn: Conn | Handler | ReceiveFlow) -> Conn:
    """A port's I/O half as the I/O thread's port commands take it: they dispatch on
    ``kind``, and a handler's (``HANDLER``) has the methods they call (see Handler)."""
    return cast(Conn, conn)


def _new_port(session: Session, rid: int, pid: object) -> int:
    """The id of a port the client opens, checked: positive, unused, within the limit."""
    if not P.is_int(pid):
        raise ProtocolViolation("malformed", "a client's port id is a positive int", rid)
    pid = P.check_int(pid, "pid", 1)
    if pid in session.ports:
        raise ProtocolViolation("duplicate-port", f"port id {pid} is in use", rid)
    limit = session.control.limits.max_ports
    if len(session.ports) >= limit:
        raise ProtocolViolation("limit", f"this session has {limit} ports, its limit", rid)
    return pid


def _permit(control: ControlEndpoint, kind: str, rid: int, what: str) -> None:
    """Refuse a kind of :data:`PERMISSIONS` the daemon was not started to allow."""
    if kind not in control.allow:
        raise ProtocolViolation(
            "forbidden",
            f"{what} is refused: this daemon was not started with --allow-{kind} "
            f"(IOSERVER_ALLOW_{kind.upper()}=1, or allow-{kind} = true in its config file)",
            rid,
        )


def _options_map(raw: object, rid: int) -> dict[str, object]:
    if not isinstance(raw, dict):
        raise ProtocolViolation("malformed", "options must be a map", rid)
    return dict(raw)


def _open_options(
    session: Session, rid: int, pid: object, raw: object, unix: bool = False
) -> StreamOptions:
    """A client's stream port's options (CONNECT, OPEN_PROCESS), validated."""
    _new_port(session, rid, pid)
    try:
        return _stream_options(_options_map(raw, rid), unix)
    except OptionError as exc:
        raise ProtocolViolation("bad-option", str(exc), rid) from None


def _stream_options(options: Mapping[str, object], unix: bool) -> StreamOptions:
    if unix:
        return unix_options(options, "a remote Unix socket port")[1]
    return port_options(options, "a remote TCP port")[1]


def _listen_options(
    session: Session, rid: int, pid: object, raw: object, unix: bool
) -> tuple[StreamOptions, ListenOptions]:
    """A client's listener's options (LISTEN), validated: those of each accepted port,
    and the listener's (theirs with ``backlog``, ``reuseaddr``, ``reuseport`` and the
    accepted ports' active mode ``accept_active`` as ``active``)."""
    _new_port(session, rid, pid)
    options = _options_map(raw, rid)
    try:
        own = {name: options.pop(name) for name in sorted(LISTEN_OPTIONS) if name in options}
        check_options(own, LISTEN_OPTIONS, "a remote listener")
        accept_active = options.pop("accept_active", [-1, False])
        if not (
            isinstance(accept_active, list)
            and len(accept_active) == 2
            and P.is_int(accept_active[0])
            and isinstance(accept_active[1], bool)
        ):
            raise OptionError("accept_active must be [credit, notify]")
        settings = _stream_options(options, unix)
    except OptionError as exc:
        raise ProtocolViolation("bad-option", str(exc), rid) from None
    backlog = own.get("backlog")
    listen: ListenOptions = {
        **settings,
        # The I/O thread's defaults (ioserver._tcp) for those the client left out.
        "backlog": backlog if isinstance(backlog, int) else 1024,  # checked: positive
        "reuseaddr": bool(own.get("reuseaddr", True)),
        "reuseport": bool(own.get("reuseport", False)),
        "active": (int(accept_active[0]), accept_active[1]),
    }
    return settings, listen


def _credit(message: P.Message, at: int) -> tuple[int, bool]:
    credit, notify = message[at], message[at + 1]
    if not P.is_int(credit) or not isinstance(notify, bool) or not -1 <= credit <= 1 << 20:
        raise ProtocolViolation("malformed", "an active mode is [credit: int, notify: bool]")
    return credit, notify


def _cmd_connect(control: ControlEndpoint, session: Session, message: P.Message) -> None:
    _arity(message, 8, "[10, rid, pid, family, address, options, credit, notify]")
    rid = P.check_int(message[1], "rid")
    family, address = _address(message, rid)
    unix = family == P.AF_UNIX
    if unix:
        _permit(control, "unix", rid, "a Unix socket path")
    pid = _new_port(session, rid, message[2])
    settings = _open_options(session, rid, pid, message[5], unix)
    active = _credit(message, 6)
    state = RemotePortState(session, pid, settings)
    spec = ConnectRequest(state, session.deliver, family, address, settings, active)
    if isinstance(address, str) or P.is_numeric_host(family, address[0]):
        session.ports[state.pid] = state
        control.io.cmd_connect(_Request(rid, state), spec)
    else:
        control.resolve(_Request(rid, state), spec)
        session.ports[state.pid] = state


def _cmd_listen(control: ControlEndpoint, session: Session, message: P.Message) -> None:
    _arity(message, 8, "[11, rid, pid, family, address, options, credit, notify]")
    rid = P.check_int(message[1], "rid")
    family, address = _address(message, rid)
    unix = family == P.AF_UNIX
    if unix:
        _permit(control, "unix", rid, "a Unix socket path")
    pid = _new_port(session, rid, message[2])
    settings, listen = _listen_options(session, rid, pid, message[5], unix)
    active = _credit(message, 6)
    state = RemotePortState(session, pid, settings)

    def make_port(conn: Conn, local_address: object, remote_address: object) -> RemotePortState:
        accepted = RemotePortState(session, session.next_accepted, settings)
        session.next_accepted -= 1
        accepted.conn = conn
        session.ports[accepted.pid] = accepted
        if session.holding:
            conn.queue_paused = True  # its first read waits for the session's queue
        return accepted

    spec = ListenRequest(state, session.deliver, family, address, listen, active, make_port)
    session.ports[state.pid] = state
    if isinstance(address, str):
        cmd_listen_unix(control.io, _Request(rid, state), spec)
    elif P.is_numeric_host(family, address[0]):
        control.io.cmd_listen(_Request(rid, state), spec)
    else:
        control.resolve(_Request(rid, state), spec)


def _address(message: P.Message, rid: int) -> tuple[int, P.SockAddr]:
    try:
        return P.check_address(message[3], message[4])
    except ProtocolViolation as exc:
        exc.rid = rid
        raise


def _checked(rid: int, check: Callable[[], _T]) -> _T:
    """``check()``, its ProtocolViolation answering request ``rid``."""
    try:
        return check()
    except ProtocolViolation as exc:
        exc.rid = rid
        raise


def _cmd_open_udp(control: ControlEndpoint, session: Session, message: P.Message) -> None:
    _arity(message, 8, "[12, rid, pid, bind, connect, options, credit, notify]")
    rid = P.check_int(message[1], "rid")
    pid = _new_port(session, rid, message[2])
    bind = _checked(rid, lambda: P.check_host_port(message[3], "bind"))
    connect = _checked(rid, lambda: P.check_host_port(message[4], "connect"))
    try:
        _, settings = udp_options(_options_map(message[5], rid))
    except OptionError as exc:
        raise ProtocolViolation("bad-option", str(exc), rid) from None
    active = _credit(message, 6)
    state = RemotePortState(session, pid, settings, "datagram")
    spec = UDPRequest(state, session.deliver, 0, bind, connect, settings, active)
    session.ports[pid] = state
    request = _Request(rid, state)
    if all(address is None or _numeric(address[0]) for address in (bind, connect)):
        result = _udp_addresses(spec, numeric=True)
        if isinstance(result, BaseException):
            session._answer(request, result)
        else:
            cmd_open_udp(control.io, request, result)
    else:
        control.resolve(request, spec)


def _numeric(host: str) -> bool:
    return P.is_numeric_host(socket.AF_INET, host) or P.is_numeric_host(socket.AF_INET6, host)


def _udp_addresses(spec: UDPRequest, numeric: bool) -> UDPRequest | ConnectError:
    """``spec`` with its family and socket addresses, as ``ports.open_udp`` picks them
    (``connect``'s family; ``bind`` of the same); blocking unless ``numeric``."""
    flags = socket.AI_NUMERICHOST if numeric else 0
    try:
        remote: SocketAddress | None = None
        family = socket.AF_INET
        if spec.connect is not None:
            host, port = _host_port(spec.connect)
            info = socket.getaddrinfo(host, port, 0, socket.SOCK_DGRAM, 0, flags)
            family, remote = info[0][0], inet_address(info[0][4])
        local: SocketAddress | None = None
        if spec.bind is not None:
            host, port = _host_port(spec.bind)
            infos = socket.getaddrinfo(
                host or None, port, 0, socket.SOCK_DGRAM, 0, flags | socket.AI_PASSIVE
            )
            if spec.connect is not None:
                infos = [info for info in infos if info[0] == family]
                if not infos:
                    return ConnectError(
                        f"bind={spec.bind!r} and connect={spec.connect!r} are of different "
                        "families",
                        errno.EAFNOSUPPORT,
                        "EAFNOSUPPORT",
                    )
            family, local = infos[0][0], inet_address(infos[0][4])
    except (OSError, UnicodeError) as exc:
        return _resolve_error(spec.connect or spec.bind, exc)
    return replace(spec, family=int(family), bind=local, connect=remote)


def _host_port(address: SocketAddress) -> tuple[str, int]:
    """The ``(host, port)`` of an address a client gave by name (``P.check_host_port``,
    ``P.check_address``): never a Unix path, which is not resolved."""
    assert isinstance(address, tuple), address
    return address[0], address[1]


def _cmd_open_tun(control: ControlEndpoint, session: Session, message: P.Message) -> None:
    _arity(message, 8, "[13, rid, pid, name, mode, options, credit, notify]")
    rid = P.check_int(message[1], "rid")
    _permit(control, "tun", rid, "a TUN/TAP device")
    pid = _new_port(session, rid, message[2])
    name, mode = message[3], message[4]
    if not isinstance(name, str) or len(name.encode("utf-8", "replace")) >= IFNAMSIZ:
        raise ProtocolViolation("malformed", f"a device name is a str of < {IFNAMSIZ} bytes", rid)
    if name in (".", "..") or any(c in name for c in "/: \t\n\0"):
        raise ProtocolViolation("bad-option", f"{name!r} is not an interface name", rid)
    if mode not in ("tun", "tap"):
        raise ProtocolViolation("bad-option", 'mode must be "tun" or "tap"', rid)
    try:
        _, settings = tun_options(_options_map(message[5], rid))
    except OptionError as exc:
        raise ProtocolViolation("bad-option", str(exc), rid) from None
    active = _credit(message, 6)
    state = RemotePortState(session, pid, settings, "tun")
    session.ports[pid] = state
    spec = TunRequest(state, session.deliver, name, mode, settings, active)
    cmd_open_tun(control.io, _Request(rid, state), spec)


_STDERR = {"inherit": None, "devnull": subprocess.DEVNULL, "stdout": -1}


def _cmd_open_process(control: ControlEndpoint, session: Session, message: P.Message) -> None:
    _arity(message, 9, "[14, rid, pid, argv, stderr, kill_grace, options, credit, notify]")
    rid = P.check_int(message[1], "rid")
    _permit(control, "process", rid, "running a program")
    pid = _new_port(session, rid, message[2])
    argv = _checked(rid, lambda: P.check_argv(message[3]))
    stderr, kill_grace = message[4], message[5]
    if stderr not in _STDERR:
        raise ProtocolViolation(
            "bad-option", 'stderr must be "inherit", "devnull" or "stdout"', rid
        )
    if (
        not isinstance(kill_grace, (int, float))
        or isinstance(kill_grace, bool)
        or not 0 <= kill_grace <= P.MAX_KILL_GRACE
    ):
        raise ProtocolViolation(
            "bad-option", f"kill_grace must be 0..{P.MAX_KILL_GRACE:g} seconds", rid
        )
    settings = _open_options(session, rid, pid, message[6], unix=True)
    active = _credit(message, 7)
    state = RemotePortState(session, pid, settings, "process")
    spec = ProcessRequest(
        state, session.deliver, argv, str(stderr), float(kill_grace), settings, active
    )
    control.start_program(_Request(rid, state), spec)
    session.ports[pid] = state


def _cmd_open_zmq(control: ControlEndpoint, session: Session, message: P.Message) -> None:
    _arity(message, 10, "[15, rid, pid, type, bind, connect, topics, options, credit, notify]")
    rid = P.check_int(message[1], "rid")
    pid = _new_port(session, rid, message[2])
    socket_type = message[3]
    if socket_type not in P.ZMQ_TYPES:
        raise ProtocolViolation(
            "bad-option", f"a ZeroMQ socket type is one of {', '.join(sorted(P.ZMQ_TYPES))}", rid
        )
    binds = _checked(rid, lambda: P.check_endpoints(message[4], "bind"))
    connects = _checked(rid, lambda: P.check_endpoints(message[5], "connect"))
    topics = _checked(rid, lambda: P.check_topics(message[6]))
    if any(endpoint.startswith("ipc://") for endpoint in binds + connects):
        _permit(control, "unix", rid, "an ipc:// endpoint (a path on the daemon's machine)")
    for endpoint in binds:
        host = endpoint[len("tcp://") :].rpartition(":")[0].strip("[]")
        if endpoint.startswith("tcp://") and host != "*" and not _numeric(host):
            # ZeroMQ would resolve a name in bind() itself, on the I/O thread.
            raise ProtocolViolation(
                "bad-option", f"{endpoint!r}: bind a numeric address or * in the daemon", rid
            )
    number = int(getattr(zmq, str(socket_type)))
    if topics is not None and number != zmq.SUB:
        raise ProtocolViolation("bad-option", "topics apply to SUB sockets only", rid)
    try:
        active, settings, given = zmq_options(_options_map(message[7], rid))
    except OptionError as exc:
        raise ProtocolViolation("bad-option", str(exc), rid) from None
    active = _credit(message, 8)
    state = RemotePortState(session, pid, settings, "zmq")
    result = _open_zmq(
        control.io, state, session, number, (binds, connects, topics), settings, given, active
    )
    session.ports[pid] = state
    session._answer(_Request(rid, state), result)
    if isinstance(result, tuple) and isinstance(result[0], ZmqHandler):
        result[0].start()


def _open_zmq(
    io: IOThread,
    state: RemotePortState,
    session: Session,
    number: int,
    where: tuple[list[str], list[str], list[bytes] | None],
    settings: FlowSettings,
    given: ZmqSettings,
    active: tuple[int, bool],
) -> tuple[ZmqHandler, str | None, str | None] | ConnectError | OptionError:
    """A client's ZeroMQ socket, made, bound and connected on the I/O thread (ZeroMQ's
    bind and connect do not block: it connects in its own threads)."""
    binds, connects, topics = where
    sock: zmq.Socket[bytes] = io.zmq_context().socket(number)
    io.zmq_sockets.add(sock)
    linger = int(given["linger"] * 1000)
    try:
        sock.setsockopt(zmq.LINGER, linger)
        for hwm, option in ((given["sndhwm"], zmq.SNDHWM), (given["rcvhwm"], zmq.RCVHWM)):
            if hwm is not None:
                sock.setsockopt(option, hwm)
        if given["identity"] is not None:
            sock.setsockopt(zmq.ROUTING_ID, given["identity"])
        if given["router_mandatory"]:
            if number != zmq.ROUTER:
                raise OptionError("router_mandatory applies to ROUTER sockets only")
            sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        if number == zmq.SUB:
            for topic in [b""] if topics is None else topics:
                sock.setsockopt(zmq.SUBSCRIBE, topic)
        io.check_fd(int(sock.getsockopt(zmq.FD)))
        local: str | None = None
        what, endpoint = "bind", ""
        for endpoint in binds:
            sock.bind(endpoint)
            local = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        what = "connect to"
        for endpoint in connects:
            sock.connect(endpoint)
    except (OptionError, PollerLimitError) as exc:
        io.zmq_sockets.discard(sock)
        sock.close(linger=0)
        if isinstance(exc, PollerLimitError):
            return ConnectError(str(exc), errno.EMFILE, "EMFILE")
        return exc
    except zmq.ZMQError as exc:
        io.zmq_sockets.discard(sock)
        sock.close(linger=0)
        name = errno_name(exc.errno)
        return ConnectError(f"cannot {what} {endpoint!r}: {exc.strerror} ({name})", exc.errno, name)
    handler = ZmqHandler(io, sock, state, session.deliver, settings, active, linger)
    return handler, local, connects[0] if connects else None


def _cmd_send(control: ControlEndpoint, session: Session, message: P.Message) -> None:
    _arity(message, 3, "[20, pid, data]")
    state = _port(session, message[1])
    data = message[2]
    conn = state.conn  # (_conn, inlined: a SEND is the daemon's hot path)
    assert conn is not None
    if data.__class__ is bytes:
        assert isinstance(data, bytes)
        if state.kind == "datagram" or state.kind == "tun":
            raise ProtocolViolation("malformed", "a UDP or TUN port sends with SEND_TO")
        state._window.queued_bytes += len(data)
        state._update_send_blocked()
        control.budget.queued_bytes += len(data)
        control.io.cmd_send(_entry(conn), data)
        return
    if not (isinstance(conn, ZmqHandler) and isinstance(data, list) and data):
        raise ProtocolViolation("malformed", "SEND data must be bin (a ZeroMQ port: [bin...])")
    frames: list[bytes] = []
    for frame in data:  # a multipart message: the frames are bin
        if not isinstance(frame, bytes):
            raise ProtocolViolation("malformed", "a ZeroMQ message is a list of bin")
        frames.append(frame)
    size = sum(len(frame) for frame in frames)
    state._window.queued_bytes += size
    state._update_send_blocked()
    control.budget.queued_bytes += size
    if conn.closed:
        control.io.bytes_discarded += size  # it closed meanwhile: dropped, as cmd_send does
        return
    conn.outq.append(frames)  # as IOThread.cmd_send queues a local ZeroMQ port's message
    conn.out_bytes += size
    control.io.mark_dirty(conn)


def _cmd_send_to(control: ControlEndpoint, session: Session, message: P.Message) -> None:
    _arity(message, 4, "[26, pid, data, address]")
    state = _port(session, message[1])
    handler = state.conn
    data, address = message[2], message[3]
    if not isinstance(handler, DatagramHandler):
        raise ProtocolViolation("malformed", "SEND_TO is for UDP and TUN ports")
    if not isinstance(data, bytes):
        raise ProtocolViolation("malformed", "SEND_TO data must be bin")
    target: tuple[str, int] | tuple[str, int, int, int] | None = None
    if address is not None:
        if state.kind == "tun":
            raise ProtocolViolation("malformed", "a TUN port's packets carry no address")
        family = handler.sock.family
        checked = P.check_address(int(family), address)[1]
        # A name would make the I/O thread block in a resolver: numeric hosts only.
        if isinstance(checked, str) or not P.is_numeric_host(family, checked[0]):
            raise ProtocolViolation(
                "malformed", "SEND_TO takes a numeric address of the port's family"
            )
        target = checked
    state._window.queued_bytes += len(data)
    state._update_send_blocked()
    control.budget.queued_bytes += len(data)
    handler.cmd_send((data, target))


def _cmd_signal(control: ControlEndpoint, session: Session, message: P.Message) -> None:
    _arity(message, 3, "[27, pid, signal]")
    state = _port(session, message[1])
    number = P.check_int(message[2], "signal", 0, 64)
    watcher = state.watcher
    if watcher is None:
        raise ProtocolViolation("malformed", "SIGNAL is for process ports")
    if number == 0:
        watcher.terminate()
    elif number in P.SIGNALS:
        watcher.send_signal(number)
    else:
        raise ProtocolViolation(
            "bad-option", f"signal {number} is not one a client may send ({sorted(P.SIGNALS)})"
        )


def _cmd_send_eof(control: ControlEndpoint, session: Session, message: P.Message) -> None:
    _arity(message, 2, "[21, pid]")
    control.io.cmd_send_eof(_conn(_port(session, message[1])), None)


def _cmd_close(control: ControlEndpoint, session: Session, message: P.Message) -> None:
    _arity(message, 2, "[22, pid]")
    state = _port(session, message[1])
    control.io.cmd_close(_conn(state), None)
    if state.watcher is not None:
        state.watcher.terminate()  # as a local process port's close: SIGTERM, then SIGKILL
    if state.kind != "stream":
        session.port_gone(state)  # the client closed it: no final message comes


def _cmd_active(control: ControlEndpoint, session: Session, message: P.Message) -> None:
    _arity(message, 4, "[23, pid, credit, notify]")
    state = _port(session, message[1])
    control.io.cmd_set_active(_conn(state), _credit(message, 2))


def _cmd_read_once(control: ControlEndpoint, session: Session, message: P.Message) -> None:
    _arity(message, 2, "[24, pid]")
    control.io.cmd_read_once(_conn(_port(session, message[1])), None)


def _cmd_resume(control: ControlEndpoint, session: Session, message: P.Message) -> None:
    _arity(message, 5, "[25, pid, generation, consumed_bytes, consumed_messages]")
    state = _port(session, message[1])
    generation = P.check_int(message[2], "generation", 0)
    consumed_bytes = P.check_int(message[3], "consumed_bytes", 0)
    consumed_messages = P.check_int(message[4], "consumed_messages", 0)
    # Counters only grow; a client cannot claim to have taken more than it was given, nor
    # what is still queued here for it: a client that does not read stays paused.
    conn = state.conn
    if not isinstance(conn, ReceiveFlow):
        raise ProtocolViolation("malformed", "RESUME for a port that does not receive")
    state._window.credit_remote(consumed_bytes, consumed_messages, conn, state._unsent)
    control.io.cmd_resume(_entry(conn), generation)


def _cmd_status(control: ControlEndpoint, session: Session, message: P.Message) -> None:
    _arity(message, 2, "[30, rid]")
    rid = P.check_int(message[1], "rid")
    round_ = control.io.polls
    if session.status_round != round_:
        session.status_round = round_
        session.status_count = 0
    session.status_count += 1
    if session.status_count > control.limits.status_per_round:
        raise ProtocolViolation(
            "limit", f"more than {control.limits.status_per_round} STATUS in one round", rid
        )
    session.emit([P.STATUS_REPLY, rid, control.cached_status()])


def _cmd_heartbeat(control: ControlEndpoint, session: Session, message: P.Message) -> None:
    _arity(message, 1, "[2]")


def _cmd_bye(control: ControlEndpoint, session: Session, message: P.Message) -> None:
    _arity(message, 1, "[3]")
    session.close("said bye")
    control.sessions.pop(session.identity, None)


#: The opcodes whose second element is a request id, which a FAULT echoes.
_REQUESTS = frozenset(
    {P.CONNECT, P.LISTEN, P.OPEN_UDP, P.OPEN_TUN, P.OPEN_PROCESS, P.OPEN_ZMQ, P.STATUS}
)

_COMMANDS: dict[int, Callable[[ControlEndpoint, Session, P.Message], None]] = {
    P.HEARTBEAT: _cmd_heartbeat,
    P.BYE: _cmd_bye,
    P.CONNECT: _cmd_connect,
    P.LISTEN: _cmd_listen,
    P.OPEN_UDP: _cmd_open_udp,
    P.OPEN_TUN: _cmd_open_tun,
    P.OPEN_PROCESS: _cmd_open_process,
    P.OPEN_ZMQ: _cmd_open_zmq,
    P.SEND: _cmd_send,
    P.SEND_TO: _cmd_send_to,
    P.SIGNAL: _cmd_signal,
    P.SEND_EOF: _cmd_send_eof,
    P.CLOSE: _cmd_close,
    P.ACTIVE: _cmd_active,
    P.READ_ONCE: _cmd_read_once,
    P.RESUME: _cmd_resume,
    P.STATUS: _cmd_status,
}


def _resolve_name(io: IOThread, done: Callable[[_Job, object], None], job: _Job) -> None:
    """In a worker thread: the address of a CONNECT, LISTEN or OPEN_UDP given by name,
    then ``done(job, the request with its address resolved, or ConnectError)`` on the I/O
    thread."""
    _, spec = job
    result: object
    if isinstance(spec, UDPRequest):
        result = _udp_addresses(spec, numeric=False)
        io.submit(done, job, result)
        return
    assert not isinstance(spec, ProcessRequest)
    listen = isinstance(spec, ListenRequest)
    family, address = spec.family, spec.address
    try:
        host, port = _host_port(address)
        infos = socket.getaddrinfo(
            host, port, family, socket.SOCK_STREAM, 0, socket.AI_PASSIVE if listen else 0
        )
        result = replace(spec, address=inet_address(infos[0][4]))
    except (OSError, UnicodeError) as exc:
        result = _resolve_error(address, exc)
    io.submit(done, job, result)


def _resolve_error(address: object, exc: Exception) -> ConnectError:
    number = getattr(exc, "errno", None) or errno.EINVAL
    name = _EAI_NAMES.get(number, errno.errorcode.get(number, "EINVAL"))
    host = address[0] if isinstance(address, tuple) else address
    return ConnectError(f"cannot resolve {host!r}: {exc} ({name})", number, name)


def _start_program(io: IOThread, done: Callable[[_Job, object], None], job: _Job) -> None:
    """In a worker thread: start a client's program (a fork and an exec the I/O thread
    does not wait for), then ``done(job, (watcher, conn) or ConnectError)`` on the I/O
    thread, as ``ports.open_process`` starts a local one."""
    request, spec = job
    assert isinstance(spec, ProcessRequest)
    state = request.state
    ours, theirs = socketpair_for_child()
    result: object
    try:
        settings = spec.options
        for size, level in (
            (settings["recbuf"], socket.SO_RCVBUF),
            (settings["sndbuf"], socket.SO_SNDBUF),
        ):
            if size:
                ours.setsockopt(socket.SOL_SOCKET, level, size)
        io.check_fd(ours.fileno())
        stderr = _STDERR[spec.stderr]
        popen = subprocess.Popen(
            list(spec.argv),
            stdin=theirs.fileno(),
            stdout=theirs.fileno(),
            stderr=theirs.fileno() if stderr == -1 else stderr,
            close_fds=True,
        )
    except (OSError, PollerLimitError) as exc:
        ours.close()
        number = getattr(exc, "errno", None) or errno.EMFILE
        name = errno_name(number)
        result = ConnectError(
            f"cannot start {spec.argv[0]!r}: {getattr(exc, 'strerror', None) or exc} ({name})",
            number,
            name,
        )
        io.submit(done, job, result)
        return
    finally:
        theirs.close()  # the program has its copy
    pidfd = open_pidfd(popen.pid)
    watcher = ProcessWatcher(io, popen, pidfd, state, spec.deliver, spec.kill_grace)
    conn = Conn(ours, STREAM, state, watcher.stream_deliver)
    conn.configure(settings, state._window)
    conn.credit, conn.notify_passive = spec.active
    watcher.conns.append(conn)
    io.submit(done, job, (watcher, conn))


def io_status(io: IOThread, started: float, extra: dict[str, P.Wire]) -> dict[str, P.Wire]:
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
            if entry.msgq_paused or entry.global_paused or entry.queue_paused:
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
        "poller": io.poller_name,
        "ports_open": io.ports_open,
        "ports_by_kind": dict[str, P.Wire](kinds),
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
