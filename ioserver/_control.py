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

This module is the endpoint itself: the sessions by routing id, the round (frames read,
the per-round message budget, refusals), the dispatch of each message to its command,
the frames sent back, the heartbeats, and the I/O thread's status (:func:`io_status`).
The rest of the daemon's side is one idea per module, below this one, none importing it
back (they see the endpoint as :class:`ioserver._session.Endpoint`):

- :mod:`ioserver._session`: a client (``Session``: its ports, its outgoing frame, its
  queue's backpressure), the daemon's stand-in for each of its ports
  (``RemotePortState``, the loop half the I/O thread sees) and the limits;
- :mod:`ioserver._port_commands`: the commands on open ports (SEND, SEND_TO, SIGNAL,
  SEND_EOF, CLOSE, ACTIVE, READ_ONCE, RESUME);
- :mod:`ioserver._open_commands`: the commands that open a port, one per kind (CONNECT,
  LISTEN, OPEN_UDP, OPEN_TUN, OPEN_PROCESS, OPEN_ZMQ);
- :mod:`ioserver._workers`: what the I/O thread must not wait for (host names, programs'
  start-up), in worker threads.

Every kind of port crosses (protocol version 3).  The kinds that let a client act as the
daemon's user beyond the network (programs, Unix paths, TUN devices: :data:`PERMISSIONS`)
are served only when the daemon was started to allow them (FAULT ``"forbidden"``).

A session is a client: a ZeroMQ routing id *and* the secret token the daemon issued in
its WELCOME, which every later frame must carry (a peer that takes over an orphaned
session's routing id does not know it, so it gets no port of that session).  A session
that sends nothing, not even a heartbeat, for ``HEARTBEAT_MISSES`` intervals is lost: its
ports are closed after their output is written, so peers see end-of-file.

Limits (:class:`ControlLimits`, defined in :mod:`ioserver._session`, which the commands
read too): every bound on what one client can make the daemon hold or do, so that a
refusal is cheap and memory stays under the budget:

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
  Answers that are not DATA are not held back so: past ``reply_queue`` bytes of them
  waiting for one client, its session is dropped (``_drop_unread``).
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable, Sequence
from typing import cast

import zmq

from . import _protocol as P
from ._conn import CONNECTING, LISTENER, STREAM, Conn, Handler
from ._contract import ConnectRequest, ListenRequest, ProcessRequest, UDPRequest
from ._iothread import IOThread
from ._open_commands import COMMANDS as OPEN_COMMANDS
from ._port_commands import COMMANDS as PORT_COMMANDS
from ._port_commands import Command, arity
from ._protocol import ProtocolViolation
from ._session import PERMISSIONS as PERMISSIONS  # the daemon's --allow-KIND: re-exported
from ._session import ControlLimits as ControlLimits  # ioserver serve's limits: re-exported
from ._session import Endpoint, Opening, Session, SessionBudget
from ._workers import Workers
from ._zmq import ZmqSocketHandler

log = logging.getLogger("ioserver")

RECEIVE_BATCH = 256  # frames taken from the control socket per round
#: Messages the control endpoint runs per round of the I/O thread, all clients together:
#: a frame holds up to ``max_messages`` (65,536), which at 1-2 us each would keep the
#: thread from every other socket, timer and heartbeat for 100 ms or more.  The rest of a
#: frame waits for the next round (``call_soon``), before any later frame is read, so a
#: client's messages still run in order.
MESSAGE_BUDGET = 2048


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
        self.unread: dict[Session, None] = {}  # sessions past reply_queue, to drop (flush)
        # The round's message budget (MESSAGE_BUDGET), and the rest of a frame it cut.
        self._budget = MESSAGE_BUDGET
        self._budget_round = -1
        self._rest: tuple[bytes, Session | None, str | None, list[P.Wire], int, int] | None = None
        self.budget = SessionBudget()
        self.faults = 0
        self.faults_unanswered = 0
        self.sessions_opened = 0
        self.sessions_lost = 0
        self.sessions_refused = 0
        self.holds = 0
        #: The worker threads: host names resolved, programs started (ioserver._workers).
        self.workers = Workers(io, limits)
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
                if (
                    rid is None
                    and isinstance(message, list)
                    and len(message) > 1
                    and P.is_int(message[0])  # (not [] nor an unhashable [[...], ...])
                    and message[0] in _REQUESTS
                ):
                    rid = message[1]  # echoed if an int
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
            fault: P.Message = [P.FAULT, rid if P.is_int(rid) else None, kind, text]
            self.send_frame(identity, P.pack([fault]))

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

    # -- host names and programs: the worker threads (ioserver._workers) ----------------
    def resolve(self, request: Opening, spec: ConnectRequest | ListenRequest | UDPRequest) -> None:
        """Resolve the address of a CONNECT, LISTEN or OPEN_UDP off the I/O thread, then
        open it.

        Raises:
            ProtocolViolation: ``max_resolving`` jobs are in the worker threads already.
        """
        self.workers.resolve(request, spec)

    def start_program(self, request: Opening, spec: ProcessRequest) -> None:
        """Start a client's program in a worker thread (never a fork on the I/O thread).

        Raises:
            ProtocolViolation: ``max_resolving`` jobs are in the worker threads already.
        """
        self.workers.start_program(request, spec)

    @property
    def names_resolved(self) -> int:
        """Host names the worker threads resolved (``ioserver status``)."""
        return self.workers.names_resolved

    # -- sending --------------------------------------------------------------------------
    def flush(self) -> None:
        marked, self.marked = self.marked, []
        for session in marked:
            if not session.closed and session.outbound:
                self.send_now(session)
        if self.unread:
            self._drop_unread()
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
        if session.pending or not self.send_frame(session.identity, frame):
            session.pending.append((frame, credits))
            self.backlogged[session] = None
            session.unread += _unread(frame, credits)
            if session.unread > self.limits.reply_queue:
                # Dropped at the end of the round (flush), not in the middle of a delivery.
                self.unread[session] = None
                self.io.mark_dirty(self)
        else:
            session.sent(credits)

    def _drop_unread(self) -> None:
        """Drop the sessions whose answers other than DATA passed ``reply_queue``: DATA
        stops their ports (``session_queue``), but replies and FAULTs only grow while the
        client asks and does not read."""
        unread, self.unread = self.unread, {}
        for session in unread:
            if session.closed or session.unread <= self.limits.reply_queue:
                continue
            self.sessions_lost += 1
            log.warning(
                "control endpoint: client %s dropped: %d bytes of its answers wait unread "
                "(more than %d)",
                session.identity.hex(),
                session.unread,
                self.limits.reply_queue,
            )
            session.close("dropped (it does not read its answers)")
            if self.sessions.get(session.identity) is session:
                del self.sessions[session.identity]

    def send_frame(self, identity: bytes, frame: bytes) -> bool:
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
                if not self.send_frame(session.identity, frame):
                    break
                pending.popleft()
                session.unread -= _unread(frame, credits)
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
        self.workers.shutdown()
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


#: Bytes a DATA or DATAGRAM message takes around its data (opcode, port id, an address):
#: not counted against reply_queue, so that many small messages of data, which their
#: ports' windows bound, never drop a session as answers would.
_DATA_FRAMING = 64


def _unread(frame: bytes, credits: Sequence[tuple[object, int]]) -> int:
    """The bytes of a frame for a client that are not its DATA (held by session_queue)."""
    data = sum(size + _DATA_FRAMING for _, size in credits)
    return max(len(frame) - data, 0)


# -- the endpoint's own commands (on the I/O thread; raise ProtocolViolation when refused)
def _cmd_status(control: Endpoint, session: Session, message: P.Message) -> None:
    arity(message, 2, "[30, rid]")
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


def _cmd_heartbeat(control: Endpoint, session: Session, message: P.Message) -> None:
    arity(message, 1, "[2]")


def _cmd_bye(control: Endpoint, session: Session, message: P.Message) -> None:
    arity(message, 1, "[3]")
    session.close("said bye")
    control.sessions.pop(session.identity, None)


#: The opcodes whose second element is a request id, which a FAULT echoes.
_REQUESTS = frozenset(
    {P.CONNECT, P.LISTEN, P.OPEN_UDP, P.OPEN_TUN, P.OPEN_PROCESS, P.OPEN_ZMQ, P.STATUS}
)

#: Every command a session may send after HELLO: the endpoint's own, those that open a
#: port (ioserver._open_commands) and those on open ports (ioserver._port_commands).
_COMMANDS: dict[int, Command] = {
    P.HEARTBEAT: _cmd_heartbeat,
    P.BYE: _cmd_bye,
    **OPEN_COMMANDS,
    **PORT_COMMANDS,
    P.STATUS: _cmd_status,
}


def io_status(io: IOThread, started: float, extra: dict[str, P.Wire]) -> dict[str, P.Wire]:
    """The I/O thread's status for ``ioserver status`` (runs on the I/O thread)."""
    kinds = {
        "tcp": 0,
        "tcp_listeners": 0,
        "unix": 0,
        "unix_listeners": 0,
        "connecting": 0,
        "other": 0,
    }
    busy = paused = queued = 0
    for entry in io._table:
        if entry is None or entry.__class__ is not Conn:
            if isinstance(entry, Handler):
                kinds["other"] += 1
            continue
        unix = entry.sock.family == socket.AF_UNIX  # (a program's stdio too)
        if entry.kind == STREAM:
            kinds["unix" if unix else "tcp"] += 1
            queued += entry.out_bytes
            if entry.msgq_paused or entry.global_paused or entry.queue_paused:
                paused += 1
            if entry.out_bytes > entry.send_low:
                busy += 1
        elif entry.kind == LISTENER:
            kinds["unix_listeners" if unix else "tcp_listeners"] += 1
        elif entry.kind == CONNECTING:
            kinds["connecting"] += 1
    core = getattr(io, "_core", None)
    if core is not None:  # the native core: its own ports are not in the hosted table
        # Each kind a count of its own: a difference of the thread's counters, read one by
        # one while it changes them, could read -1.
        kinds["tcp_listeners"] += int(core.tcp_listeners_open)
        kinds["unix_listeners"] += int(core.unix_listeners_open)
        kinds["unix"] += int(core.unix_streams)
        # (Connecting ones among them: the native thread does not count them apart.)
        kinds["tcp"] += int(core.tcp_streams)
        queued += int(core.pending_output)
        busy += int(core.busy_streams)
        # (A port paused by both its watermarks and the budget counts twice: rare, as
        # neither reads the socket, so the other has no read to pause.)
        paused += int(core.msgq_paused_streams) + int(core.budget_paused_streams)
    inboxes = io._inboxes
    counters = io.counters()  # on the native core, its thread's and its hosted half's
    return {
        "pid": os.getpid(),
        "uptime": round(time.monotonic() - started, 3),
        "poller": io.poller_name,
        "ports_open": counters["ports_open"],
        "ports_by_kind": dict[str, P.Wire](kinds),
        "bytes_in": counters["bytes_in"],
        "bytes_out": counters["bytes_out"],
        "bytes_queued_out": queued,
        "busy_ports": busy,
        "paused_ports": paused,
        "command_queue_depth": len(io.commands.items),
        "event_queue_depth": sum(len(inbox.items) for inbox in inboxes),
        "wakes_to_io_sent": counters["wakes_sent"],
        "wakes_to_io_skipped": counters["wakes_skipped"],
        "wakes_to_loops_sent": sum(inbox.wakes_sent for inbox in inboxes),
        "wakes_to_loops_skipped": sum(inbox.wakes_skipped for inbox in inboxes),
        "memory_in_use": io.memory_in_use(),
        "internal_errors": counters["internal_errors"],
        "linger_timeouts": counters["linger_timeouts"],
        **extra,
    }
