"""The client's side of the daemon protocol: a stand-in for the I/O thread.

Theory of operation
-------------------
A port does not know where its I/O thread is.  It talks to ``server._io`` through commands
``(function, conn, argument)`` queued on ``io.commands``, reads a few counters of its
``conn`` (``bytes_out``, ``delivered_*``, ``pause_generation``, ``closed``), and receives
events through its loop's hub.  :class:`RemoteIO` provides exactly that, so the very same
:class:`ports.Port` class runs against a daemon:

- its ``commands`` queue *is* the queue of the client's own local I/O thread, and its
  ``cmd_*`` functions run there: each encodes a protocol message (see
  :mod:`ioserver._protocol`) into the round's outgoing batch;
- at the end of the round the batch leaves as one frame on a ZeroMQ DEALER socket, which
  the local I/O thread owns like any other socket (a :class:`~ioserver._iothread.Handler`,
  with ZeroMQ's edge-triggered fd handled as :mod:`ioserver._zmq` explains);
- the daemon's events arrive on that socket, are checked, update the port's
  :class:`RemoteConn` counters and are handed to the hub, as local events are.

A session is the routing id of the DEALER socket and the token the daemon's WELCOME
gives: every frame after the HELLO carries it.  Frames are cut to the daemon's
``max_frame`` and ``max_messages`` (WELCOME says them); a SEND larger than half a frame
leaves as several SENDs of the same port, bytes in order.

Heartbeats: each side sends one when it sent nothing for an interval; a daemon silent for
``HEARTBEAT_MISSES`` intervals is lost, and every port then ends with
``Closed("ioserver daemon lost", "ECONNABORTED")`` - sends raise
:exc:`~ports.BrokenPortError`, an :exc:`anyio.BrokenResourceError`.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Callable

import zmq

from ioserver import _ipc
from ioserver import _protocol as P
from ioserver._contract import (
    ConnectRequest,
    Deliver,
    ListenRequest,
    LoopHalf,
    MakePort,
    ProcessRequest,
    TunRequest,
    UDPRequest,
    ZmqRequest,
)
from ioserver._exceptions import BrokenPortError, ConnectError, OptionError
from ioserver._flow import NO_LIMIT, ReceiveFlow
from ioserver._iothread import IOThread
from ioserver._messages import (
    PASSIVE,
    WRITABLE,
    Accepted,
    Closed,
    Data,
    Datagram,
    Error,
    ExitStatus,
    Packet,
)
from ioserver._options import PortSettings, StreamOptions, TunSettings, UDPSettings
from ioserver._protocol import ProtocolViolation
from ioserver._udp import charge_error
from ioserver._zmq import ZmqSocketHandler

from ._exceptions import ProtocolError

log = logging.getLogger("ioserver.client")

RECEIVE_BATCH = 256
_SET_DATA = Data.__dict__["data"].__set__
LOST = Closed("ioserver daemon lost", "ECONNABORTED")
CLIENT_CLOSED = Closed("ioserver closed", "ESHUTDOWN")  # as local ports at shutdown


class RemoteConn(ReceiveFlow):
    """The client's view of the daemon's half of one port: an I/O half (the counters a
    port reads, see ioserver._contract) whose receive flow control (ioserver._flow) is
    fed by the daemon's DATA and PAUSED, with the port's window."""

    __slots__ = (
        "accept_options",
        "bytes_in",
        "bytes_out",
        "close_sent",
        "closed",
        "deliver",
        "make_port",
        "out_bytes",
        "packets_too_large",
        "pid",
        "port",
        "send_low",
        "sizes",
    )

    def __init__(
        self, pid: int, port: LoopHalf | None, deliver: Deliver, options: PortSettings
    ) -> None:
        self.pid = pid
        self.port = port
        self.deliver = deliver
        self.closed = False
        self.close_sent = False  # CLOSE went to the daemon: no more commands for it
        self.bytes_in = 0
        self.bytes_out = 0
        self.out_bytes = 0
        self.init_flow(None if port is None else port._window)
        self.low_msgq = options.get("low_msgq_watermark", NO_LIMIT)
        self.low_msgq_messages = options.get("high_msgq_messages", NO_LIMIT) // 2
        self.send_low = options.get("low_watermark", 0)
        self.packets_too_large = 0
        #: The port's window's sizes (ioserver._flow), for DATA of decoded objects.
        self.sizes: deque[int] | None = None if port is None else port._window.sizes
        self.make_port: MakePort | None = None
        #: A listener's: the options of the ports it accepts (set with ``make_port``).
        self.accept_options: StreamOptions | None = None

    def adopt(self, port: LoopHalf) -> None:
        """The loop half of an accepted connection was made: deliver to it, and share
        its window."""
        self.port = port
        self.window = port._window
        self.sizes = port._window.sizes


class RemoteDatagramConn(RemoteConn):
    """The daemon's half of a UDP or TUN port, as the client sees it: a UDP port's
    handler (``ioserver._udp.DatagramHandler``), whose sends are datagrams (SEND_TO)."""

    __slots__ = ("datagrams_too_large", "out_done", "packets", "remote")

    def __init__(
        self,
        remote: RemoteIO,
        pid: int,
        port: LoopHalf,
        deliver: Deliver,
        options: UDPSettings | TunSettings,
        packets: bool,
    ) -> None:
        super().__init__(pid, port, deliver, options)
        self.remote = remote
        #: Bytes the daemon sent or dropped (its handler's ``out_done``, from WRITTEN).
        self.out_done = 0
        self.datagrams_too_large = 0
        #: A TUN port's: its messages are Packet, not Datagram.
        self.packets = packets

    def cmd_send(self, item: tuple[bytes, object]) -> None:
        """The port's datagram ``(data, address or None)``, on the local I/O thread."""
        data, address = item
        remote = self.remote
        remote.io.bytes_forwarded += len(data)  # the daemon's now (as RemoteIO.cmd_send)
        if not (self.closed or self.close_sent):
            self.out_bytes += len(data)
            remote._emit([P.SEND_TO, self.pid, data, P.wire_address(address)], len(data) + 64)


class RemoteProgram:
    """A program the daemon runs for a process port: the port's ``ProcessControl``."""

    __slots__ = ("conn", "pid", "remote")

    def __init__(self, remote: RemoteIO, conn: RemoteConn, pid: int) -> None:
        self.remote = remote
        self.conn = conn
        #: The program's process id, in the daemon's pid namespace.
        self.pid = pid

    def cmd_signal(self, number: int) -> None:
        if not self.conn.closed:
            self.remote._emit([P.SIGNAL, self.conn.pid, number])

    def cmd_terminate(self, _: object) -> None:
        # The daemon terminates the program when its port closes, and so the port's CLOSE
        # says it too: a SIGNAL after it would name a port the daemon has released.
        if not (self.conn.closed or self.conn.close_sent):
            self.remote._emit([P.SIGNAL, self.conn.pid, 0])


class _Pending:
    __slots__ = ("conn", "opcode", "request")

    def __init__(self, request: object, conn: RemoteConn | None, opcode: int = 0) -> None:
        self.request = request
        self.conn = conn
        #: The open request's opcode: what its OK carries (see RemoteIO._ok).
        self.opcode = opcode


class RemoteIO(ZmqSocketHandler):
    """Plays the I/O thread for ports whose sockets live in a daemon (module docstring).

    Its ``cmd_*`` methods and handler methods run on the client's local I/O thread.
    """

    def __init__(self, local: IOThread, sock: zmq.Socket[bytes], endpoint: str) -> None:
        super().__init__(local, sock)
        self.endpoint = endpoint
        self.commands = local.commands
        self.port_buffer_limit = None
        self.send_command = self.cmd_send
        self.table: dict[int, RemoteConn] = {}
        self.requests: dict[int, _Pending] = {}
        self.outbound: list[P.Message] = []
        self.out_size = 0  # bytes of outbound, roughly: what its frame will take
        self.token: bytes | None = None  # the session's, from WELCOME
        self.max_frame = P.DEFAULT_MAX_FRAME
        self.max_messages = P.MAX_MESSAGES
        self.pending: deque[bytes] = deque()
        self.next_pid = 1
        self.next_rid = 1
        self.heartbeat = 1.0
        self.info: dict[str, P.Wire] = {}
        self.last_seen = self.last_sent = time.monotonic()
        self.lost = False
        self.broken_reason: str | None = None
        self.frames_in = 0
        self.frames_out = 0
        self.faults = 0
        self._hello: tuple[object, Deliver] | None = None
        self._timer: list[Callable[[], None] | None] | None = None
        # ipc://: the first message's sender must run as this user (ioserver._ipc).
        self._peer_unchecked = endpoint.startswith("ipc://")

    def submit(self, function: Callable[..., None], target: object, argument: object) -> None:
        """Queue ``function(target, argument)`` on the local I/O thread (as IOThread's)."""
        self.commands.put((function, target, argument))

    # -- start, stop (commands on the local I/O thread) -----------------------------------
    def cmd_start(self, request: object, deliver: Deliver) -> None:
        """Adopt the socket and say HELLO; the WELCOME answers ``request``."""
        self._hello = (request, deliver)
        self.start()
        self._emit([P.HELLO, P.VERSION])

    def cmd_bye(self, _: object, __: object) -> None:
        """Tell the daemon we leave (it closes our ports), then close the socket."""
        if self.closed:
            return
        if not self.lost:
            self.outbound.append([P.BYE])
            self._send_batch()
        self._end_ports(CLIENT_CLOSED)
        self._close()

    def _end_ports(self, message: Closed) -> None:
        """Every port still open here gets its final message, as the I/O thread's
        shutdown gives local ports theirs."""
        for conn in self.table.values():
            conn.closed = True
            if conn.port is not None:
                conn.deliver((conn.port, message))
        self.table.clear()

    def _start_heartbeat(self, interval: float) -> None:
        self.heartbeat = interval
        self._timer = self.io.call_later(interval, self._tick)

    def _tick(self) -> None:
        if self.closed or self.lost:
            return
        now = time.monotonic()
        if now - self.last_seen > self.heartbeat * P.HEARTBEAT_MISSES:
            self._lose(f"no message from the daemon for {now - self.last_seen:.1f} s")
            return
        if now - self.last_sent >= self.heartbeat * 0.9:
            self._emit([P.HEARTBEAT])
        self._timer = self.io.call_later(self.heartbeat, self._tick)

    def _lose(self, why: str, error: Exception | None = None) -> None:
        """The daemon is gone: end every port and request (with ``error``, by default a
        BrokenPortError), refuse new ones."""
        log.warning("ioserver daemon at %s lost: %s", self.endpoint, why)
        self.lost = True
        self.broken_reason = why
        self._end_ports(LOST)
        if error is None:
            error = BrokenPortError(
                f"the ioserver daemon at {self.endpoint} is lost: {why}",
                errno_name="ECONNABORTED",
            )
        for pending in self.requests.values():
            self._answer(pending, error)
        self.requests.clear()
        if self._hello is not None:
            request, deliver = self._hello
            self._hello = None
            deliver((request, error))
        self._close()

    # -- port commands (run on the local I/O thread) --------------------------------------
    def _emit(self, message: P.Message, size: int = 16) -> None:
        """Queue ``message`` for this round's frame (about ``size`` bytes packed); a frame
        that would pass the daemon's limits leaves first."""
        if self.closed:
            return
        outbound = self.outbound
        if outbound and (
            self.out_size + size > self.max_frame - 1024 or len(outbound) >= self.max_messages - 1
        ):
            self._send_batch()
            outbound = self.outbound
        if not outbound:
            self.io.mark_dirty(self)
        outbound.append(message)
        self.out_size += size

    def _ids(self, request: object, deliver: Deliver) -> tuple[int, int] | None:
        """A new port id and request id, or None (the request answered) when the daemon
        is lost."""
        if self.lost or self.closed:
            deliver((request, BrokenPortError(f"the ioserver daemon at {self.endpoint} is lost")))
            return None
        pid, rid = self.next_pid, self.next_rid
        self.next_pid += 1
        self.next_rid += 1
        return pid, rid

    def _request(self, request: object, conn: RemoteConn, rid: int, opcode: int) -> None:
        self.table[conn.pid] = conn
        self.requests[rid] = _Pending(request, conn, opcode)

    def _open(self, request: object, spec: ConnectRequest | ListenRequest, opcode: int) -> None:
        port, deliver, family, address, options = (
            spec.port,
            spec.deliver,
            spec.family,
            spec.address,
            spec.options,
        )
        credit, notify = spec.active
        ids = self._ids(request, deliver)
        if ids is None:
            return
        pid, rid = ids
        wire = _wire_options(options)
        conn = RemoteConn(pid, port, deliver, options)
        if isinstance(spec, ListenRequest):
            conn.make_port = spec.make_port
            conn.accept_options = spec.options
            accept_credit, accept_notify = spec.options["active"]
            wire["accept_active"] = [accept_credit, accept_notify]
        if family == P.AF_UNIX and isinstance(address, bytes):
            address = os.fsdecode(address)  # a str on the wire; the daemon encodes it back
        self._request(request, conn, rid, opcode)
        self._emit(
            [opcode, rid, pid, int(family), P.wire_address(address), wire, credit, notify], 1024
        )

    def cmd_connect(self, request: object, spec: ConnectRequest) -> None:
        self._open(request, spec, P.CONNECT)

    def cmd_listen(self, request: object, spec: ListenRequest) -> None:
        self._open(request, spec, P.LISTEN)

    def cmd_listen_unix(self, request: object, spec: ListenRequest) -> None:
        self._open(request, spec, P.LISTEN)

    def cmd_open_udp(self, request: object, spec: UDPRequest) -> None:
        ids = self._ids(request, spec.deliver)
        if ids is None:
            return
        pid, rid = ids
        conn = RemoteDatagramConn(self, pid, spec.port, spec.deliver, spec.options, False)
        self._request(request, conn, rid, P.OPEN_UDP)
        bind, connect = P.wire_address(spec.bind), P.wire_address(spec.connect)
        wire = _wire_options(spec.options)
        self._emit([P.OPEN_UDP, rid, pid, bind, connect, wire, *spec.active], 1024)

    def cmd_open_tun(self, request: object, spec: TunRequest) -> None:
        ids = self._ids(request, spec.deliver)
        if ids is None:
            return
        pid, rid = ids
        conn = RemoteDatagramConn(self, pid, spec.port, spec.deliver, spec.options, True)
        self._request(request, conn, rid, P.OPEN_TUN)
        wire = _wire_options(spec.options)
        self._emit([P.OPEN_TUN, rid, pid, spec.name, spec.mode, wire, *spec.active], 1024)

    def cmd_open_process(self, request: object, spec: ProcessRequest) -> None:
        ids = self._ids(request, spec.deliver)
        if ids is None:
            return
        pid, rid = ids
        conn = RemoteConn(pid, spec.port, spec.deliver, spec.options)
        self._request(request, conn, rid, P.OPEN_PROCESS)
        wire = _wire_options(spec.options)
        argv: list[P.Wire] = list(spec.argv)
        size = sum(len(argument) for argument in spec.argv) + 1024
        self._emit(
            [P.OPEN_PROCESS, rid, pid, argv, spec.stderr, spec.kill_grace, wire, *spec.active],
            size,
        )

    def cmd_open_zmq(self, request: object, spec: ZmqRequest) -> None:
        ids = self._ids(request, spec.deliver)
        if ids is None:
            return
        pid, rid = ids
        conn = RemoteConn(pid, spec.port, spec.deliver, spec.options)
        self._request(request, conn, rid, P.OPEN_ZMQ)
        wire = _wire_options(spec.options)
        topics: P.Wire = None if spec.subscribe is None else list(spec.subscribe)
        binds: list[P.Wire] = list(spec.bind)
        connects: list[P.Wire] = list(spec.connect)
        self._emit(
            [P.OPEN_ZMQ, rid, pid, spec.socket_type, binds, connects, topics, wire, *spec.active],
            4096,
        )

    def cmd_send(self, conn: RemoteConn, data: bytes | list[bytes]) -> None:
        if data.__class__ is list:  # a ZeroMQ port's multipart message: one SEND
            frames: list[P.Wire] = list(data)
            size = sum(len(frame) for frame in data)
            self.io.bytes_forwarded += size
            if not (conn.closed or conn.close_sent):
                conn.out_bytes += size
                self._emit([P.SEND, conn.pid, frames], size + 16 * len(frames))
            return
        assert isinstance(data, bytes)
        # Charged to the local budget by the port, released here: it is the daemon's now.
        self.io.bytes_forwarded += len(data)
        if not conn.closed:
            size = len(data)
            conn.out_bytes += size
            chunk = self.max_frame // 2
            if size <= chunk:
                self._emit([P.SEND, conn.pid, data], size + 16)
                return
            view = memoryview(data)
            for start in range(0, size, chunk):
                piece = view[start : start + chunk]
                self._emit([P.SEND, conn.pid, piece], len(piece) + 16)

    def cmd_send_eof(self, conn: RemoteConn, _: object) -> None:
        if not conn.closed:
            self._emit([P.SEND_EOF, conn.pid])

    def cmd_close(self, conn: RemoteConn, _: object) -> None:
        if not (conn.closed or conn.close_sent):
            conn.close_sent = True
            self._emit([P.CLOSE, conn.pid])

    def cmd_set_active(self, conn: RemoteConn, mode: tuple[int, bool]) -> None:
        if not conn.closed:
            self._emit([P.ACTIVE, conn.pid, mode[0], mode[1]])

    def cmd_read_once(self, conn: RemoteConn, _: object) -> None:
        if not conn.closed:
            self._emit([P.READ_ONCE, conn.pid])

    def cmd_resume(self, conn: RemoteConn, generation: int) -> None:
        if not conn.closed:
            window = conn.window
            self._emit(
                [P.RESUME, conn.pid, generation, window.consumed_bytes, window.consumed_messages]
            )

    def cmd_status(self, request: object, deliver: Deliver) -> None:
        if self.lost or self.closed:
            deliver((request, BrokenPortError(f"the ioserver daemon at {self.endpoint} is lost")))
            return
        rid = self.next_rid
        self.next_rid += 1
        self.requests[rid] = _Pending((request, deliver), None)
        self._emit([P.STATUS, rid])

    # -- the socket -----------------------------------------------------------------------
    def flush(self) -> None:
        self._send_batch()
        self.on_ready(0)  # a send may have taken the fd's edge (see ioserver._zmq)

    def _send_batch(self) -> None:
        if not self.outbound or self.closed:
            return
        frame = P.pack(self.outbound, self.token)
        self.outbound = []
        self.out_size = 0
        self.last_sent = time.monotonic()
        if self.pending or not self._send(frame):
            self.pending.append(frame)

    def _send(self, frame: bytes) -> bool:
        try:
            self.sock.send(frame, zmq.NOBLOCK)
        except zmq.Again:
            return False
        self.frames_out += 1
        return True

    def on_ready(self, mask: int) -> None:
        if self.closed:
            return
        if self._peer_unchecked and not self._check_peer():
            return
        self._serve_frames(RECEIVE_BATCH)

    def _check_peer(self) -> bool:
        """Take the first message (the WELCOME) with its ``Peer-Address`` and refuse a
        daemon of another uid before anything but HELLO was sent (:mod:`ioserver._ipc`).
        False when the session was refused."""
        sock = self.sock
        events: int = sock.getsockopt(zmq.EVENTS)  # type: ignore[assignment]
        if not events & zmq.POLLIN:
            return True
        try:
            frame = sock.recv(zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return True
        self._peer_unchecked = False
        uid = _ipc.peer_uid(frame)
        frames = [frame.bytes]
        while frame.more:  # a message arrives whole: the rest is there
            frame = sock.recv(zmq.NOBLOCK, copy=False)
            frames.append(frame.bytes)
        if uid is not None and uid != os.geteuid():
            error = _ipc.refuse_peer(self.endpoint, uid)
            self._lose(str(error), error)
            return False
        self._handle(frames)
        return not self.closed

    def _has_pending(self) -> bool:
        return bool(self.pending)

    def _send_pending(self) -> None:
        while self.pending and self._send(self.pending[0]):
            self.pending.popleft()

    def _handle(self, frames: list[bytes]) -> None:
        self.frames_in += 1
        self.last_seen = time.monotonic()
        if len(frames) != 1:
            self.faults += 1
            log.error("ioserver daemon at %s sent %d frames, not 1", self.endpoint, len(frames))
            return
        try:
            messages = P.unpack(frames[0])
        except ProtocolViolation as exc:
            self.faults += 1
            log.error("ioserver daemon at %s sent a bad frame: %s", self.endpoint, exc)
            if exc.kind == "version" and self._hello is not None:
                # A daemon of another protocol version (its FAULT to our HELLO, in its
                # envelope): refuse the session now rather than time out waiting.
                error = ProtocolError(
                    f"the ioserver daemon at {self.endpoint} speaks another protocol "
                    f"version: {exc} (upgrade the older side)",
                    kind="version",
                )
                self._lose(str(error), error)
            return
        for message in messages:
            try:
                if not (isinstance(message, list) and message and P.is_int(message[0])):
                    raise ProtocolViolation("malformed", "a message must be [opcode, ...]")
                handler = _EVENTS.get(message[0])
                if handler is None:
                    raise ProtocolViolation("unknown-opcode", f"unknown opcode {message[0]}")
                handler(self, message)
            except (ProtocolViolation, ValueError, TypeError, IndexError, KeyError) as exc:
                self.faults += 1
                log.error("ioserver daemon at %s sent a bad message: %s", self.endpoint, exc)

    # -- events ---------------------------------------------------------------------------
    def _conn(self, pid: object) -> RemoteConn | None:
        return self.table.get(pid) if P.is_int(pid) else None

    def _answer(self, pending: _Pending, result: object) -> None:
        request = pending.request
        if isinstance(request, tuple):  # a status request: (request, deliver)
            request, deliver = request
            deliver((request, result))
        elif pending.conn is not None:
            pending.conn.deliver((request, result))

    def _welcome(self, message: P.Message) -> None:
        info = message[1]
        if not isinstance(info, dict) or not P.is_int(info.get("version")):
            raise ProtocolViolation("malformed", "WELCOME is [1, {version, heartbeat, ...}]")
        heartbeat = info.get("heartbeat")
        if not isinstance(heartbeat, (int, float)) or not 0 < heartbeat <= 3600:
            raise ProtocolViolation("malformed", "WELCOME heartbeat must be 0 < s <= 3600")
        token = info.get("token")
        if not isinstance(token, bytes) or len(token) != P.TOKEN_SIZE:
            raise ProtocolViolation("malformed", "WELCOME token must be 16 bytes")
        max_frame = info.get("max_frame")
        max_messages = info.get("max_messages")
        if not (P.is_int(max_frame) and max_frame >= 4096):
            raise ProtocolViolation("malformed", "WELCOME max_frame must be an int >= 4096")
        if not (P.is_int(max_messages) and max_messages >= 16):
            raise ProtocolViolation("malformed", "WELCOME max_messages must be an int >= 16")
        self.token = token
        self.max_frame = int(max_frame)
        self.max_messages = int(max_messages)
        self.info = {name: value for name, value in info.items() if name != "token"}
        if self._timer is None:
            self._start_heartbeat(float(heartbeat))
        if self._hello is not None:
            request, deliver = self._hello
            self._hello = None
            deliver((request, info))

    def _fault(self, message: P.Message) -> None:
        _, rid, kind, text = message
        if not (isinstance(kind, str) and isinstance(text, str)):
            raise ProtocolViolation("malformed", "FAULT is [4, rid, kind: str, text: str]")
        pending = self.requests.pop(rid, None) if P.is_int(rid) else None
        error = ProtocolError(f"the daemon refused a request: {kind}: {text}", kind=kind)
        if pending is not None:
            if pending.conn is not None:
                self.table.pop(pending.conn.pid, None)
            self._answer(pending, error)
        elif self._hello is not None:
            request, deliver = self._hello
            self._hello = None
            deliver((request, error))
        else:
            self.faults += 1
            log.warning(
                "the ioserver daemon at %s refused a message: %s: %s", self.endpoint, kind, text
            )

    def _ok(self, message: P.Message) -> None:
        _, rid, local, remote = message
        pending = self.requests.pop(rid, None) if P.is_int(rid) else None
        if pending is None or pending.conn is None:
            raise ProtocolViolation("malformed", f"OK for an unknown request {rid!r}")
        conn = pending.conn
        if pending.opcode == P.OPEN_TUN:  # the device's name
            if not isinstance(local, str):
                raise ProtocolViolation("malformed", "OK of OPEN_TUN carries the device name")
            self._answer(pending, (conn, local))
        elif pending.opcode == P.OPEN_PROCESS:  # the program's pid
            if not P.is_int(remote) or remote <= 0:
                raise ProtocolViolation("malformed", "OK of OPEN_PROCESS carries a pid")
            self._answer(pending, (conn, RemoteProgram(self, conn, remote)))
        else:
            self._answer(pending, (conn, P.from_wire_address(local), P.from_wire_address(remote)))

    def _failed(self, message: P.Message) -> None:
        _, rid, kind, number, name, text = message
        pending = self.requests.pop(rid, None) if P.is_int(rid) else None
        if pending is None or pending.conn is None:
            raise ProtocolViolation("malformed", f"FAILED for an unknown request {rid!r}")
        self.table.pop(pending.conn.pid, None)
        error: Exception
        if kind == "OptionError":
            error = OptionError(str(text))
        else:
            error = ConnectError(
                str(text),
                number if P.is_int(number) else None,
                name if isinstance(name, str) else None,
            )
        self._answer(pending, error)

    def _status(self, message: P.Message) -> None:
        _, rid, status = message
        pending = self.requests.pop(rid, None) if P.is_int(rid) else None
        if pending is None or not isinstance(status, dict):
            raise ProtocolViolation("malformed", "STATUS for an unknown request")
        self._answer(pending, status)

    def _data(self, message: P.Message) -> None:
        conn = self._conn(message[1])
        if conn is None:
            return  # the port was closed here meanwhile
        data = message[2]
        if len(message) == 4:
            size = message[3]
            if conn.sizes is None or not P.is_int(size) or size < 0:
                raise ProtocolViolation(
                    "malformed", "DATA with a size on a port whose packet mode delivers bytes"
                )
            conn.sizes.append(size)
        elif isinstance(data, bytes):
            size = len(data)  # in the daemon's units, which RESUME reports back
            if conn.sizes is not None:  # a port of packets keeps each one's size
                conn.sizes.append(size)
        else:
            raise ProtocolViolation(
                "malformed", "DATA without a size must carry bytes, on a port that delivers bytes"
            )
        conn.delivered_messages += 1
        conn.delivered_bytes += size
        conn.bytes_in += size
        self.io.delivered_total += size  # charged until the owner takes it
        event = object.__new__(Data)
        _SET_DATA(event, data)
        conn.deliver((conn.port, event))

    def _accepted(self, message: P.Message) -> None:
        _, listener_pid, pid, local, remote = message
        listener = self._conn(listener_pid)
        if listener is None or listener.make_port is None or listener.accept_options is None:
            return
        if not P.is_int(pid) or pid >= 0 or pid in self.table:
            raise ProtocolViolation("malformed", f"ACCEPTED with a bad port id {pid!r}")
        options = listener.accept_options
        conn = RemoteConn(pid, None, listener.deliver, options)
        self.table[pid] = conn
        address = P.from_wire_address(remote)
        port = listener.make_port(conn, P.from_wire_address(local), address)
        conn.adopt(port)
        conn.deliver((listener.port, Accepted(port, address)))

    def _closed(self, message: P.Message) -> None:
        _, pid, reason, name = message
        conn = self._conn(pid)
        if conn is not None:
            conn.deliver((conn.port, Closed(str(reason), name if isinstance(name, str) else None)))

    def _error(self, message: P.Message) -> None:
        _, pid, name, number, text = message
        conn = self._conn(pid)
        if conn is not None:
            event = Error(str(name), number if P.is_int(number) else None, str(text))
            conn.deliver((conn.port, event))
            if isinstance(conn, RemoteDatagramConn):
                charge_error(conn, self.io)  # as the daemon's handler charged it

    def _datagram(self, message: P.Message) -> None:
        _, pid, data, address = message
        conn = self._conn(pid)
        if conn is None:
            return  # the port was closed here meanwhile
        if not isinstance(conn, RemoteDatagramConn) or not isinstance(data, bytes):
            raise ProtocolViolation(
                "malformed", "DATAGRAM is [18, pid of a UDP/TUN port, bin, ...]"
            )
        size = len(data)
        conn.delivered_messages += 1
        conn.delivered_bytes += size
        conn.bytes_in += size
        self.io.delivered_total += size  # charged until the owner takes it
        if conn.packets:
            event: Datagram | Packet = Packet(data)
        elif isinstance(address, list):
            event = Datagram(data, P.from_wire_address(address))
        else:
            raise ProtocolViolation("malformed", "a UDP port's DATAGRAM carries an address")
        conn.deliver((conn.port, event))

    def _exit(self, message: P.Message) -> None:
        _, pid, status = message
        conn = self._conn(pid)
        if conn is not None:
            conn.deliver((conn.port, ExitStatus(P.check_int(status, "exit status", -255, 255))))

    def _passive(self, message: P.Message) -> None:
        conn = self._conn(message[1])
        if conn is not None:
            conn.deliver((conn.port, PASSIVE))

    def _written(self, message: P.Message) -> None:
        conn = self._conn(message[1])
        if conn is None:
            return
        conn.bytes_out = P.check_int(message[2], "bytes_out", 0)
        if isinstance(conn, RemoteDatagramConn):
            conn.out_done = conn.bytes_out  # a datagram handler reports sent or dropped
        window = conn.window
        if window.send_blocked and window.queued_bytes - conn.bytes_out <= conn.send_low:
            conn.deliver((conn.port, WRITABLE))

    def _paused(self, message: P.Message) -> None:
        conn = self._conn(message[1])
        if conn is None:
            return
        generation = P.check_int(message[2], "generation", 0)
        conn.pauses += 1
        conn.pause_generation = generation  # written before the counters are read
        if conn.drained():  # step 1's re-check, done here for the daemon (ioserver._flow)
            self.cmd_resume(conn, generation)

    def _gone(self, message: P.Message) -> None:
        conn = self.table.pop(message[1], None) if P.is_int(message[1]) else None
        if conn is not None:
            conn.closed = True

    def _heartbeat(self, message: P.Message) -> None:
        pass

    # -- closing --------------------------------------------------------------------------
    def _close(self) -> None:
        if self.closed:
            return
        if self._timer is not None:
            self._timer[0] = None
        self._release_socket(200)

    def on_error(self, exc: Exception) -> None:
        log.error("the connection to the ioserver daemon failed", exc_info=exc)
        self._lose(f"internal error: {exc!r}")

    def on_shutdown(self) -> None:
        if not self.lost:
            self.outbound.append([P.BYE])
            self._send_batch()
        self._end_ports(CLIENT_CLOSED)
        self._close()


_EVENTS: dict[int, Callable[[RemoteIO, P.Message], None]] = {
    P.WELCOME: RemoteIO._welcome,
    P.HEARTBEAT: RemoteIO._heartbeat,
    P.FAULT: RemoteIO._fault,
    P.OK: RemoteIO._ok,
    P.FAILED: RemoteIO._failed,
    P.STATUS_REPLY: RemoteIO._status,
    P.DATA: RemoteIO._data,
    P.ACCEPTED: RemoteIO._accepted,
    P.CLOSED: RemoteIO._closed,
    P.ERROR: RemoteIO._error,
    P.PASSIVE: RemoteIO._passive,
    P.WRITTEN: RemoteIO._written,
    P.PAUSED: RemoteIO._paused,
    P.GONE: RemoteIO._gone,
    P.DATAGRAM: RemoteIO._datagram,
    P.EXIT: RemoteIO._exit,
}


def _wire_options(options: PortSettings) -> dict[str, P.Wire]:
    """A port's validated options as they cross: ``active`` goes apart (credit, notify),
    and ``nodelay``/``keepalive`` when they are off (a Unix or process port has none).

    Raises:
        TypeError: an option whose value has no msgpack form (a bug: every validated
            option is a scalar, ``active`` aside).
    """
    wire: dict[str, P.Wire] = {}
    for name, value in options.items():
        if name == "active" or (name in ("nodelay", "keepalive") and not value):
            continue
        if value is not None and not isinstance(value, (int, float, str, bytes)):
            raise TypeError(f"option {name}={value!r} does not cross the wire")
        wire[name] = value
    return wire
