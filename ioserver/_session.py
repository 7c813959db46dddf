"""A client of the daemon and its ports: sessions, the remote port state and the limits.

The daemon's control endpoint (:mod:`ioserver._control`: the ROUTER socket, the round,
the dispatch) keeps one :class:`Session` per client.  This module holds what a session
is; the commands a client sends act on it: those on open ports in
:mod:`ioserver._port_commands`, those that open a port in :mod:`ioserver._open_commands`,
with the jobs of the daemon's worker threads in :mod:`ioserver._workers`.  Each of them
sees the endpoint through :class:`Endpoint`, so that none imports the endpoint back.

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
``Conn``, a UDP or TUN port a datagram handler, a ZeroMQ port a ``ZmqHandler``, a
program a ``ProcessWatcher`` and its stream ``Conn``; each has a :class:`RemotePortState`
whose ``kind`` says what its SEND may carry and when its id is released (GONE).

A session is a client: a ZeroMQ routing id *and* the secret token the daemon issued in
its WELCOME, which every later frame must carry.  Its events of a round leave in one
frame at the end of that round (:meth:`Session.emit`, the endpoint's ``flush``).  Output
to a client: DATA stays charged to the memory budget (:class:`SessionBudget`) until
ZeroMQ has taken its frame; when more than ``session_queue`` bytes of DATA wait for one
client the session's ports stop reading (``Conn.queue_paused``: backpressure on their
peers, not memory) until half of it has left (:meth:`Session.hold`, :meth:`Session.release`).

Limits (:class:`ControlLimits`, re-exported by :mod:`ioserver._control`, whose docstring
lists what each bounds): every bound on what one client can make the daemon hold or do.
They are here, below the endpoint, because the sessions and the commands read them too.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, cast

from . import _protocol as P
from ._conn import CONNECTING, STREAM, Conn, Handler
from ._exceptions import ConnectError, OptionError
from ._flow import ReceiveFlow, Window
from ._framing import port_framer
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
from ._options import PortSettings
from ._udp import ERROR_CHARGE, DatagramHandler
from ._zmq import ZmqHandler

if TYPE_CHECKING:
    from ._contract import ConnectRequest, ListenRequest, ProcessRequest, UDPRequest
    from ._iothread import IOThread
    from ._process import ProcessWatcher

log = logging.getLogger("ioserver")

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
    #: bytes of answers other than DATA (replies, events, FAULTs) waiting in the session
    #: for a client that does not read them [the session is dropped, as a lost one].
    reply_queue: int = 1024 * 1024
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


class Endpoint(Protocol):
    """What the sessions and the commands use of the control endpoint
    (``ioserver._control.ControlEndpoint`` meets it)."""

    holds: int  # times a session's ports stopped reading (its queue passed the limit)

    @property
    def io(self) -> IOThread: ...
    @property
    def limits(self) -> ControlLimits: ...
    @property
    def allow(self) -> frozenset[str]: ...
    @property
    def budget(self) -> SessionBudget: ...
    @property
    def sessions(self) -> dict[bytes, Session]: ...
    @property
    def backlogged(self) -> dict[Session, None]: ...
    def mark(self, session: Session) -> None: ...
    def send_now(self, session: Session) -> None: ...
    def send_frame(self, identity: bytes, frame: bytes) -> bool: ...
    def cached_status(self) -> dict[str, P.Wire]: ...
    def resolve(self, request: Opening, spec: ConnectRequest | ListenRequest | UDPRequest) -> None:
        """Resolve a name off the I/O thread, then open (ioserver._workers).

        Raises:
            ProtocolViolation: ``max_resolving`` jobs are in the worker threads already.
        """

    def start_program(self, request: Opening, spec: ProcessRequest) -> None:
        """Start a program off the I/O thread (ioserver._workers).

        Raises:
            ProtocolViolation: ``max_resolving`` jobs are in the worker threads already.
        """


class SessionBudget:
    """All sessions' share of the daemon's memory budget (a budget owner, as hubs are)."""

    def __init__(self) -> None:
        self.queued_bytes = 0
        self.consumed_bytes = 0

    def _stopped_by_io(self) -> None:
        pass


class RemotePortState:
    """The daemon's stand-in for a client's port: its loop half, for the I/O thread (see
    the module docstring)."""

    __slots__ = (
        "_window",
        "conn",
        "kind",
        "low_watermark",
        "pid",
        "reported_bytes_out",
        "session",
        "unsent",
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
        self.unsent = 0  # bytes of its DATA queued in the session, not yet taken by ZeroMQ
        self.reported_bytes_out = 0
        self.low_watermark = options["low_watermark"]
        #: The port's I/O half: a stream Conn, or a handler (UDP, TUN, ZeroMQ).
        self.conn: Conn | Handler | None = None
        self.watcher: ProcessWatcher | None = None  # a process port's program

    def update_send_blocked(self) -> None:
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


class Opening:
    """A client's open request (CONNECT, LISTEN, OPEN_*) until it is answered: the
    target the I/O thread or a worker thread answers (``Session.answer``)."""

    __slots__ = ("rid", "state")

    def __init__(self, rid: int, state: RemotePortState) -> None:
        self.rid = rid
        self.state = state


class Session:
    """One client: its ports, its outgoing events, its liveness."""

    def __init__(self, control: Endpoint, identity: bytes, token: bytes) -> None:
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
        self.unread = 0  # bytes of pending's frames that are not DATA (reply_queue)
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
            if isinstance(target, Opening):
                self.answer(target, message)
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
                target.update_send_blocked()
                self.emit([P.WRITTEN, target.pid, sent])
        elif isinstance(message, Closed):
            self.emit([P.CLOSED, target.pid, message.reason, message.errno_name])
            if target.kind != "stream":
                self.port_gone(target)  # its final message: the handler or program is done
        elif isinstance(message, ExitStatus):
            self.emit([P.EXIT, target.pid, message.status])
        elif isinstance(message, Error):
            self.emit([P.ERROR, target.pid, message.errno_name, message.errno, message.message])
            if target.kind in ("datagram", "tun"):
                # A datagram handler charges its Errors (ioserver._udp.ERROR_CHARGE) as it
                # charges a datagram: they leave the budget as ZeroMQ takes the frame, and
                # the client counts them delivered, then taken.
                self._charge(target, ERROR_CHARGE)
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
        target.unsent += size
        self.held += size
        self.out_size += size
        limits = self.control.limits
        if self.held > limits.session_queue:
            self.hold(target)
        if self.out_size >= limits.max_frame:
            self.control.send_now(self)

    def answer(self, request: Opening, result: object) -> None:
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
            state.unsent -= size
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
                io.cmd_close(io_half(conn), None)
            if state.watcher is not None:
                state.watcher.terminate()  # SIGTERM, SIGKILL after its grace; reaped
        if self.outbound:  # what was answered before the end still goes (best effort)
            self.control.send_frame(self.identity, P.pack(self.outbound))
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


def io_half(conn: Conn | Handler | ReceiveFlow) -> Conn:
    """A port's I/O half as the I/O thread's port commands take it: they dispatch on
    ``kind``, and a handler's (``HANDLER``) has the methods they call (see Handler)."""
    return cast(Conn, conn)
