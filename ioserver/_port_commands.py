"""The commands on a client's open ports: SEND, SEND_TO, SIGNAL, SEND_EOF, CLOSE, ACTIVE,
READ_ONCE, RESUME.

Each runs on the I/O thread, in the round its frame arrives, for the control endpoint
(:mod:`ioserver._control`, which dispatches to :data:`COMMANDS`), on a port of the
session (:mod:`ioserver._session`): it checks the message, updates the port's
:class:`~._session.RemotePortState` (its window: what the client sent, what its owner
took) and hands the port's I/O half the same command a local port's loop would queue.
A refused message raises ``ProtocolViolation`` (the endpoint answers FAULT).  The
commands that open a port are :mod:`ioserver._open_commands`'s; the helpers here
(:func:`arity`, :func:`active_mode`) serve them too.
"""

from __future__ import annotations

from collections.abc import Callable

from . import _protocol as P
from ._conn import Conn
from ._flow import ReceiveFlow
from ._protocol import ProtocolViolation
from ._session import Endpoint, RemotePortState, Session, io_half
from ._udp import DatagramHandler
from ._zmq import ZmqHandler

#: A command: ``(endpoint, session, message)``; raises ProtocolViolation when refused.
Command = Callable[[Endpoint, Session, P.Message], None]


def arity(message: P.Message, count: int, form: str) -> None:
    """Refuse a message of other than ``count`` elements (``form`` says which)."""
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
    return io_half(conn)


def active_mode(message: P.Message, at: int) -> tuple[int, bool]:
    credit, notify = message[at], message[at + 1]
    if not P.is_int(credit) or not isinstance(notify, bool) or not -1 <= credit <= 1 << 20:
        raise ProtocolViolation("malformed", "an active mode is [credit: int, notify: bool]")
    return credit, notify


def _cmd_send(control: Endpoint, session: Session, message: P.Message) -> None:
    arity(message, 3, "[20, pid, data]")
    state = _port(session, message[1])
    data = message[2]
    conn = state.conn  # (_conn, inlined: a SEND is the daemon's hot path)
    assert conn is not None
    if data.__class__ is bytes:
        assert isinstance(data, bytes)
        if state.kind == "datagram" or state.kind == "tun":
            raise ProtocolViolation("malformed", "a UDP or TUN port sends with SEND_TO")
        state._window.queued_bytes += len(data)
        state.update_send_blocked()
        control.budget.queued_bytes += len(data)
        control.io.cmd_send(io_half(conn), data)
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
    state.update_send_blocked()
    control.budget.queued_bytes += size
    if conn.closed:
        control.io.bytes_discarded += size  # it closed meanwhile: dropped, as cmd_send does
        return
    conn.outq.append(frames)  # as IOThread.cmd_send queues a local ZeroMQ port's message
    conn.out_bytes += size
    control.io.mark_dirty(conn)


def _cmd_send_to(control: Endpoint, session: Session, message: P.Message) -> None:
    arity(message, 4, "[26, pid, data, address]")
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
    state.update_send_blocked()
    control.budget.queued_bytes += len(data)
    handler.cmd_send((data, target))


def _cmd_signal(control: Endpoint, session: Session, message: P.Message) -> None:
    arity(message, 3, "[27, pid, signal]")
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


def _cmd_send_eof(control: Endpoint, session: Session, message: P.Message) -> None:
    arity(message, 2, "[21, pid]")
    control.io.cmd_send_eof(_conn(_port(session, message[1])), None)


def _cmd_close(control: Endpoint, session: Session, message: P.Message) -> None:
    arity(message, 2, "[22, pid]")
    state = _port(session, message[1])
    control.io.cmd_close(_conn(state), None)
    if state.watcher is not None:
        state.watcher.terminate()  # as a local process port's close: SIGTERM, then SIGKILL
    if state.kind != "stream":
        session.port_gone(state)  # the client closed it: no final message comes


def _cmd_active(control: Endpoint, session: Session, message: P.Message) -> None:
    arity(message, 4, "[23, pid, credit, notify]")
    state = _port(session, message[1])
    control.io.cmd_set_active(_conn(state), active_mode(message, 2))


def _cmd_read_once(control: Endpoint, session: Session, message: P.Message) -> None:
    arity(message, 2, "[24, pid]")
    control.io.cmd_read_once(_conn(_port(session, message[1])), None)


def _cmd_resume(control: Endpoint, session: Session, message: P.Message) -> None:
    arity(message, 5, "[25, pid, generation, consumed_bytes, consumed_messages]")
    state = _port(session, message[1])
    generation = P.check_int(message[2], "generation", 0)
    consumed_bytes = P.check_int(message[3], "consumed_bytes", 0)
    consumed_messages = P.check_int(message[4], "consumed_messages", 0)
    # Counters only grow; a client cannot claim to have taken more than it was given, nor
    # what is still queued here for it: a client that does not read stays paused.
    conn = state.conn
    if not isinstance(conn, ReceiveFlow):
        raise ProtocolViolation("malformed", "RESUME for a port that does not receive")
    state._window.credit_remote(consumed_bytes, consumed_messages, conn, state.unsent)
    control.io.cmd_resume(io_half(conn), generation)


#: The opcodes of the commands on open ports, for the endpoint's dispatch.
COMMANDS: dict[int, Command] = {
    P.SEND: _cmd_send,
    P.SEND_TO: _cmd_send_to,
    P.SIGNAL: _cmd_signal,
    P.SEND_EOF: _cmd_send_eof,
    P.CLOSE: _cmd_close,
    P.ACTIVE: _cmd_active,
    P.READ_ONCE: _cmd_read_once,
    P.RESUME: _cmd_resume,
}
