"""The daemon's worker threads: what the I/O thread must not wait for.

A client's CONNECT, LISTEN or OPEN_UDP may name a host, and its OPEN_PROCESS forks and
execs a program: both block, the one in a resolver, the other in the kernel, so the open
commands (:mod:`ioserver._open_commands`) hand them to :class:`Workers` (a small thread
pool, at most ``max_resolving`` jobs at once: :class:`~._session.ControlLimits`).  A job
runs ``_resolve_name`` or ``_start_program`` in a worker thread, which touches no
state of the I/O thread; its result comes back to the I/O thread (``IOThread.submit``),
where :class:`Workers` opens the port - or drops it, if the session ended meanwhile -
and answers the client (:meth:`~._session.Session.answer`).  The control endpoint
(:mod:`ioserver._control`) owns one :class:`Workers`.
"""

from __future__ import annotations

import errno
import logging
import socket
import subprocess
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

from . import _protocol as P
from ._conn import STREAM, Conn
from ._contract import (
    ConnectRequest,
    ListenRequest,
    ProcessRequest,
    SocketAddress,
    UDPRequest,
    inet_address,
)
from ._exceptions import ConnectError, PollerLimitError, errno_name
from ._iothread import IOThread
from ._process import ProcessWatcher, cmd_start_process, open_pidfd, socketpair_for_child
from ._protocol import ProtocolViolation
from ._session import ControlLimits, Opening
from ._udp import cmd_open_udp

log = logging.getLogger("ioserver")

#: A job for the daemon's worker threads: a name to resolve, a program to start.
Job = tuple[Opening, ConnectRequest | ListenRequest | UDPRequest | ProcessRequest]

_EAI_NAMES = {
    getattr(socket, name): name
    for name in dir(socket)
    if name.startswith("EAI_") and isinstance(getattr(socket, name), int)
}

#: OPEN_PROCESS's ``stderr``: what the program's standard error is (``subprocess``'s).
STDERR = {"inherit": None, "devnull": subprocess.DEVNULL, "stdout": -1}


class Workers:
    """The daemon's worker threads and their jobs in flight (see the module docstring)."""

    def __init__(self, io: IOThread, limits: ControlLimits) -> None:
        self.io = io
        self.limits = limits
        self.names_resolved = 0
        self._resolving = 0
        self._resolver: ThreadPoolExecutor | None = None

    def resolve(self, request: Opening, spec: ConnectRequest | ListenRequest | UDPRequest) -> None:
        """Resolve the address of a CONNECT, LISTEN or OPEN_UDP off the I/O thread, then
        open it.

        Raises:
            ProtocolViolation: ``max_resolving`` jobs are in the worker threads already.
        """
        self._work(_resolve_name, self._resolved, (request, spec), "host names are being resolved")

    def start_program(self, request: Opening, spec: ProcessRequest) -> None:
        """Start a client's program in a worker thread (never a fork on the I/O thread).

        Raises:
            ProtocolViolation: ``max_resolving`` jobs are in the worker threads already.
        """
        self._work(_start_program, self._program_started, (request, spec), "programs are starting")

    def _work(
        self,
        function: Callable[[IOThread, Callable[[Job, object], None], Job], None],
        done: Callable[[Job, object], None],
        job: Job,
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
        self._resolver.submit(_guarded, function, self.io, done, job)

    def _resolved(self, job: Job, result: object) -> None:
        self._resolving -= 1
        request, _ = job
        state = request.state
        session = state.session
        if session.closed or session.ports.get(state.pid) is not state:
            return  # the session ended meanwhile
        if isinstance(result, BaseException):
            session.answer(request, result)
            return
        self.names_resolved += 1
        if isinstance(result, UDPRequest):
            cmd_open_udp(self.io, request, result)
        elif isinstance(result, ListenRequest):
            self.io.cmd_listen(request, result)
        elif isinstance(result, ConnectRequest):
            self.io.cmd_connect(request, result)

    def _program_started(self, job: Job, result: object) -> None:
        self._resolving -= 1
        request, _ = job
        state = request.state
        session = state.session
        if isinstance(result, BaseException):
            if not session.closed and session.ports.get(state.pid) is state:
                session.answer(request, result)
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

    def shutdown(self) -> None:
        """The daemon stops: the jobs not started are dropped."""
        if self._resolver is not None:
            self._resolver.shutdown(wait=False, cancel_futures=True)


def udp_addresses(spec: UDPRequest, numeric: bool) -> UDPRequest | ConnectError:
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


def _resolve_name(io: IOThread, done: Callable[[Job, object], None], job: Job) -> None:
    """In a worker thread: the address of a CONNECT, LISTEN or OPEN_UDP given by name,
    then ``done(job, the request with its address resolved, or ConnectError)`` on the I/O
    thread."""
    _, spec = job
    result: object
    if isinstance(spec, UDPRequest):
        result = udp_addresses(spec, numeric=False)
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


def _guarded(
    function: Callable[[IOThread, Callable[[Job, object], None], Job], None],
    io: IOThread,
    done: Callable[[Job, object], None],
    job: Job,
) -> None:
    """Run a job in a worker thread; one that raises (a bug: each job hands its result,
    error or not, to ``done`` as its last step) still gets ``done`` with the exception,
    so that its client is answered and its place among ``max_resolving`` is given back -
    not an exception kept in a future nobody reads."""
    try:
        function(io, done, job)
    except Exception as exc:
        log.exception("a worker thread's job failed")
        io.submit(done, job, exc)


def _resolve_error(address: object, exc: Exception) -> ConnectError:
    number = getattr(exc, "errno", None) or errno.EINVAL
    name = _EAI_NAMES.get(number, errno.errorcode.get(number, "EINVAL"))
    host = address[0] if isinstance(address, tuple) else address
    return ConnectError(f"cannot resolve {host!r}: {exc} ({name})", number, name)


def _start_error(spec: ProcessRequest, exc: Exception) -> ConnectError:
    number = getattr(exc, "errno", None) or errno.EMFILE
    name = errno_name(number)
    return ConnectError(
        f"cannot start {spec.argv[0]!r}: {getattr(exc, 'strerror', None) or exc} ({name})",
        number,
        name,
    )


def _start_program(io: IOThread, done: Callable[[Job, object], None], job: Job) -> None:
    """In a worker thread: start a client's program (a fork and an exec the I/O thread
    does not wait for), then ``done(job, (watcher, conn) or ConnectError)`` on the I/O
    thread, as ``ports.open_process`` starts a local one."""
    request, spec = job
    assert isinstance(spec, ProcessRequest)
    state = request.state
    try:
        ours, theirs = socketpair_for_child()
    except OSError as exc:  # out of descriptors (EMFILE, ENFILE)
        io.submit(done, job, _start_error(spec, exc))
        return
    try:
        settings = spec.options
        for size, level in (
            (settings["recbuf"], socket.SO_RCVBUF),
            (settings["sndbuf"], socket.SO_SNDBUF),
        ):
            if size:
                ours.setsockopt(socket.SOL_SOCKET, level, size)
        io.check_fd(ours.fileno())
        stderr = STDERR[spec.stderr]
        popen = subprocess.Popen(
            list(spec.argv),
            stdin=theirs.fileno(),
            stdout=theirs.fileno(),
            stderr=theirs.fileno() if stderr == -1 else stderr,
            close_fds=True,
        )
    except (OSError, PollerLimitError) as exc:
        ours.close()
        io.submit(done, job, _start_error(spec, exc))
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
