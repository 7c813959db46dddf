"""The commands that open a client's port, one per kind: CONNECT and LISTEN (TCP, Unix),
OPEN_UDP, OPEN_TUN, OPEN_PROCESS, OPEN_ZMQ.

Each runs on the I/O thread for the control endpoint (:mod:`ioserver._control`, which
dispatches to :data:`COMMANDS`): it checks the message - the port id
(:func:`_new_port`: unused, within ``max_ports``), the kind's permission
(:data:`~._session.PERMISSIONS`), the address, the options (the same validation as a
local port's, :mod:`ioserver._options`) - makes the port's
:class:`~._session.RemotePortState` and hands the kind's open request
(:mod:`ioserver._contract`) to the kind's I/O side (:mod:`ioserver._tcp` through the
I/O thread, :mod:`ioserver._unix`, :mod:`ioserver._udp`, :mod:`ioserver._tun`; a
ZeroMQ socket is made here, :func:`_open_zmq`), whose answer reaches the client through
:meth:`~._session.Session.answer`.  What would block the I/O thread - a host name, a
program's start - goes to the worker threads (:mod:`ioserver._workers`).  A refused
message raises ``ProtocolViolation`` with the request id, which the FAULT echoes.

A newcomer adding a port kind adds its ``_cmd_open_KIND`` here, next to its pair
(``ioserver/_KIND.py`` + ``ports/_KIND.py``).
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable, Mapping
from typing import TypeVar

import zmq

from . import _protocol as P
from ._conn import Conn
from ._contract import ConnectRequest, ListenRequest, ProcessRequest, TunRequest, UDPRequest
from ._exceptions import ConnectError, OptionError, PollerLimitError, errno_name
from ._iothread import IOThread
from ._options import (
    LISTEN_OPTIONS,
    FlowSettings,
    ListenOptions,
    StreamOptions,
    ZmqSettings,
    check_options,
    port_options,
    tun_options,
    udp_options,
    unix_options,
    zmq_options,
)
from ._port_commands import Command, active_mode, arity
from ._protocol import ProtocolViolation
from ._session import Endpoint, Opening, RemotePortState, Session
from ._tun import IFNAMSIZ, cmd_open_tun
from ._udp import cmd_open_udp
from ._unix import cmd_listen_unix
from ._workers import STDERR, udp_addresses
from ._zmq import ZmqHandler

_T = TypeVar("_T")


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


def _permit(control: Endpoint, kind: str, rid: int, what: str) -> None:
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


def _cmd_connect(control: Endpoint, session: Session, message: P.Message) -> None:
    arity(message, 8, "[10, rid, pid, family, address, options, credit, notify]")
    rid = P.check_int(message[1], "rid")
    family, address = _address(message, rid)
    unix = family == P.AF_UNIX
    if unix:
        _permit(control, "unix", rid, "a Unix socket path")
    pid = _new_port(session, rid, message[2])
    settings = _open_options(session, rid, pid, message[5], unix)
    active = active_mode(message, 6)
    state = RemotePortState(session, pid, settings)
    spec = ConnectRequest(state, session.deliver, family, address, settings, active)
    if isinstance(address, str) or P.is_numeric_host(family, address[0]):
        session.ports[state.pid] = state
        control.io.cmd_connect(Opening(rid, state), spec)
    else:
        control.resolve(Opening(rid, state), spec)
        session.ports[state.pid] = state


def _cmd_listen(control: Endpoint, session: Session, message: P.Message) -> None:
    arity(message, 8, "[11, rid, pid, family, address, options, credit, notify]")
    rid = P.check_int(message[1], "rid")
    family, address = _address(message, rid)
    unix = family == P.AF_UNIX
    if unix:
        _permit(control, "unix", rid, "a Unix socket path")
    pid = _new_port(session, rid, message[2])
    settings, listen = _listen_options(session, rid, pid, message[5], unix)
    active = active_mode(message, 6)
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
        cmd_listen_unix(control.io, Opening(rid, state), spec)
    elif P.is_numeric_host(family, address[0]):
        control.io.cmd_listen(Opening(rid, state), spec)
    else:
        control.resolve(Opening(rid, state), spec)


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


def _cmd_open_udp(control: Endpoint, session: Session, message: P.Message) -> None:
    arity(message, 8, "[12, rid, pid, bind, connect, options, credit, notify]")
    rid = P.check_int(message[1], "rid")
    pid = _new_port(session, rid, message[2])
    bind = _checked(rid, lambda: P.check_host_port(message[3], "bind"))
    connect = _checked(rid, lambda: P.check_host_port(message[4], "connect"))
    try:
        _, settings = udp_options(_options_map(message[5], rid))
    except OptionError as exc:
        raise ProtocolViolation("bad-option", str(exc), rid) from None
    active = active_mode(message, 6)
    state = RemotePortState(session, pid, settings, "datagram")
    spec = UDPRequest(state, session.deliver, 0, bind, connect, settings, active)
    session.ports[pid] = state
    request = Opening(rid, state)
    if all(address is None or _numeric(address[0]) for address in (bind, connect)):
        result = udp_addresses(spec, numeric=True)
        if isinstance(result, BaseException):
            session.answer(request, result)
        else:
            cmd_open_udp(control.io, request, result)
    else:
        control.resolve(request, spec)


def _numeric(host: str) -> bool:
    return P.is_numeric_host(socket.AF_INET, host) or P.is_numeric_host(socket.AF_INET6, host)


def _cmd_open_tun(control: Endpoint, session: Session, message: P.Message) -> None:
    arity(message, 8, "[13, rid, pid, name, mode, options, credit, notify]")
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
    active = active_mode(message, 6)
    state = RemotePortState(session, pid, settings, "tun")
    session.ports[pid] = state
    spec = TunRequest(state, session.deliver, name, mode, settings, active)
    cmd_open_tun(control.io, Opening(rid, state), spec)


def _cmd_open_process(control: Endpoint, session: Session, message: P.Message) -> None:
    arity(message, 9, "[14, rid, pid, argv, stderr, kill_grace, options, credit, notify]")
    rid = P.check_int(message[1], "rid")
    _permit(control, "process", rid, "running a program")
    pid = _new_port(session, rid, message[2])
    argv = _checked(rid, lambda: P.check_argv(message[3]))
    stderr, kill_grace = message[4], message[5]
    if not isinstance(stderr, str) or stderr not in STDERR:
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
    active = active_mode(message, 7)
    state = RemotePortState(session, pid, settings, "process")
    spec = ProcessRequest(
        state, session.deliver, argv, str(stderr), float(kill_grace), settings, active
    )
    control.start_program(Opening(rid, state), spec)
    session.ports[pid] = state


def _cmd_open_zmq(control: Endpoint, session: Session, message: P.Message) -> None:
    arity(message, 10, "[15, rid, pid, type, bind, connect, topics, options, credit, notify]")
    rid = P.check_int(message[1], "rid")
    pid = _new_port(session, rid, message[2])
    socket_type = message[3]
    if not isinstance(socket_type, str) or socket_type not in P.ZMQ_TYPES:
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
    active = active_mode(message, 8)
    state = RemotePortState(session, pid, settings, "zmq")
    result = _open_zmq(
        control.io, state, session, number, (binds, connects, topics), settings, given, active
    )
    session.ports[pid] = state
    session.answer(Opening(rid, state), result)
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
    try:
        sock: zmq.Socket[bytes] = io.zmq_context().socket(number)
    except zmq.ZMQError as exc:  # out of descriptors (EMFILE): ZeroMQ's own for the socket
        name = errno_name(exc.errno)
        return ConnectError(
            f"cannot open a ZeroMQ socket: {exc.strerror} ({name})", exc.errno, name
        )
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


#: The opcodes of the open commands, for the endpoint's dispatch.
COMMANDS: dict[int, Command] = {
    P.CONNECT: _cmd_connect,
    P.LISTEN: _cmd_listen,
    P.OPEN_UDP: _cmd_open_udp,
    P.OPEN_TUN: _cmd_open_tun,
    P.OPEN_PROCESS: _cmd_open_process,
    P.OPEN_ZMQ: _cmd_open_zmq,
}
