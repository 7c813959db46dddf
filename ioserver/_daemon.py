"""``ioserver serve`` and ``ioserver status``: the daemon, its workers, its status.

One daemon process is an I/O thread, its control endpoint (:mod:`ioserver._control`) and
optionally apps (``--app``) running in the process's event loop.  With ``--workers N`` a
supervisor process starts N daemons (*workers*), share-nothing: each has its own I/O
thread, apps and control endpoint (``<endpoint>-<i>``); listeners opened by apps share
their TCP port through ``SO_REUSEPORT``; each worker is pinned to a core when there are
enough.  The supervisor restarts a worker that dies and answers ``ioserver status`` on the
main endpoint with every worker's status.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import secrets
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import FrameType
from typing import TYPE_CHECKING

import anyio
import zmq
import zmq.auth

from . import _ipc, _systemd
from . import _protocol as P
from ._control import ControlEndpoint, ControlLimits, io_status
from ._exceptions import IOServerError, OptionError
from ._iothread import IOThread
from ._server import IOServer, run

if TYPE_CHECKING:
    from zmq.auth.thread import ThreadAuthenticator

    from ._metrics import MetricsServer

log = logging.getLogger("ioserver")

WORKER_ENVIRONMENT = "IOSERVER_WORKER"  #: set to the worker's index in each worker
# (ports.listen_tcp reads it: listeners share their port with SO_REUSEPORT in workers)


@dataclass
class DaemonConfig:
    """What ``ioserver serve`` was asked to do (see ``ioserver serve --help``)."""

    endpoint: str = ""
    apps: list[str] = field(default_factory=list)
    heartbeat: float = 1.0
    grace: float = 5.0
    backend: str = "asyncio"
    use_uvloop: bool | None = None
    curve_secret_key: str | None = None
    curve_allowed_keys: str | None = None
    allow_all_interfaces: bool = False
    #: The kinds of port clients may open beyond the network (``--allow-process``,
    #: ``--allow-unix``, ``--allow-tun``; see ioserver._control.PERMISSIONS).
    allow: frozenset[str] = frozenset()
    workers: int = 1
    worker_index: int | None = None
    memory_limit: int | None = None
    #: The I/O thread's selector backend (:func:`ioserver.open`'s ``poller``); None: the
    #: platform's best.
    poller: str | None = None
    limits: ControlLimits = field(default_factory=ControlLimits)
    #: ``HOST:PORT`` of the Prometheus endpoint (:mod:`ioserver._metrics`); "" for none.
    metrics: str = ""
    metrics_allow_remote: bool = False
    #: ``ioserver serve``'s own arguments, as given (workers get them again, so that they
    #: read the same --config file and variables, on SIGHUP too); None: rebuilt from here.
    arguments: list[str] | None = None
    #: SIGHUP: returns the configuration as it is now (the CLI reads its file and the
    #: environment again, and configures the logging again); raises OptionError.
    reload: Callable[[], DaemonConfig] | None = field(default=None, repr=False, compare=False)


#: What SIGHUP changes in a running daemon (ControlEndpoint reads them at each request);
#: the logging is configured again too.  Everything else needs a restart.
RELOADABLE_LIMITS = ("max_sessions", "max_ports")


class DaemonError(IOServerError):
    """The daemon cannot start: the endpoint is unsafe, in use, or misconfigured."""


# -- the endpoint ---------------------------------------------------------------------------
def check_endpoint(config: DaemonConfig) -> None:
    """Refuse an unsafe or malformed control endpoint before anything is bound.

    Raises:
        DaemonError: not ``ipc://`` or ``tcp://``; ``tcp://`` without CURVE keys; all
            interfaces (``*``, ``0.0.0.0``, ``::``) without ``--allow-all-interfaces``.
    """
    endpoint = config.endpoint
    if endpoint.startswith("ipc://"):
        if config.curve_secret_key:
            raise DaemonError("CURVE keys are for tcp:// endpoints (ipc:// relies on 0700)")
        return
    if not endpoint.startswith("tcp://"):
        raise DaemonError(
            f"the control endpoint must be ipc://PATH or tcp://HOST:PORT: {endpoint!r}"
        )
    host = endpoint[len("tcp://") :].rpartition(":")[0].strip("[]")
    if host in ("*", "0.0.0.0", "::", "") and not config.allow_all_interfaces:
        raise DaemonError(
            f"refusing to listen on all interfaces ({endpoint}); name one address, or pass "
            "--allow-all-interfaces if you mean it"
        )
    if not (config.curve_secret_key and config.curve_allowed_keys):
        raise DaemonError(
            "a tcp:// control endpoint needs CURVE: --curve-secret-key FILE and "
            "--curve-allowed-keys DIR (make them with zmq.auth.create_certificates)"
        )
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if host not in ("*", "localhost"):
            raise DaemonError(f"tcp:// endpoints take a numeric address, not {host!r}") from None


def prepare_ipc(endpoint: str) -> str | None:
    """Make the ipc endpoint's directory (mode 0700, owned by us) and clear a stale socket.

    Nothing is followed through a symbolic link and nothing another user owns is touched
    (see :mod:`ioserver._ipc`).  Returns the socket path, or None for tcp://.

    Raises:
        UnsafeEndpointError: the directory is a symbolic link, belongs to someone else or
            is open to others; the socket path is a link, not a socket, or someone else's.
        DaemonError: a live daemon already answers on the path.
    """
    if not endpoint.startswith("ipc://"):
        return None
    path = endpoint[len("ipc://") :]
    _ipc.make_directory(os.path.dirname(os.path.abspath(path)))
    if _ipc.check_socket(path):
        if not _ipc.is_stale(path):
            raise DaemonError(f"a daemon already serves {endpoint}")
        os.unlink(path)  # stale: its daemon died without cleaning up
        log.info("removed the stale control socket %s", path)
    return path


def _open_control_socket(
    context: zmq.Context[zmq.Socket[bytes]], config: DaemonConfig
) -> zmq.Socket[bytes]:
    sock: zmq.Socket[bytes] = context.socket(zmq.ROUTER)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    # Per client: frames ZeroMQ queues to send (more wait in the session, charged to the
    # budget), the largest frame it takes (a peer that sends more is disconnected).
    sock.setsockopt(zmq.SNDHWM, config.limits.send_hwm)
    sock.setsockopt(zmq.RCVHWM, 1000)
    sock.setsockopt(zmq.MAXMSGSIZE, config.limits.max_frame)
    sock.setsockopt(zmq.LINGER, 0)
    if config.curve_secret_key:
        public, secret = zmq.auth.load_certificate(config.curve_secret_key)
        if secret is None:
            raise DaemonError(f"{config.curve_secret_key} holds no secret key")
        sock.curve_secretkey = secret
        sock.curve_publickey = public
        sock.curve_server = True
    try:
        sock.bind(config.endpoint)
    except zmq.ZMQError as exc:
        sock.close(linger=0)
        raise DaemonError(f"cannot bind {config.endpoint}: {exc}") from None
    return sock


def _start_authenticator(
    context: zmq.Context[zmq.Socket[bytes]], config: DaemonConfig
) -> ThreadAuthenticator:
    """ZeroMQ's ZAP handler: only the public keys in ``--curve-allowed-keys`` get in."""
    from zmq.auth.thread import ThreadAuthenticator

    directory = config.curve_allowed_keys
    if not directory or not os.path.isdir(directory):
        raise DaemonError(f"--curve-allowed-keys must be a directory of public keys: {directory!r}")
    authenticator = ThreadAuthenticator(context, log=logging.getLogger("ioserver.auth"))
    authenticator.start()
    authenticator.configure_curve(domain="*", location=directory)
    return authenticator


# -- one daemon -----------------------------------------------------------------------------
async def _daemon_main(ios: IOServer, config: DaemonConfig) -> None:
    from ._apps import call_app, load_app

    io = ios._io
    started = time.monotonic()
    worker = config.worker_index
    apps = []
    for spec in config.apps:
        words = shlex.split(spec)
        if not words:
            raise OptionError("--app needs an app: file.py[:function] or module[:function]")
        apps.append((spec, call_app(load_app(words[0])), words[1:]))
    path = prepare_ipc(config.endpoint)
    context = io.zmq_context()
    authenticator = _start_authenticator(context, config) if config.curve_secret_key else None
    try:
        sock = _open_control_socket(context, config)
        if path is not None:
            os.chmod(path, 0o600)
        control: ControlEndpoint | None = None

        def status() -> dict[str, P.Wire]:
            assert control is not None
            return io_status(
                io,
                started,
                {
                    "worker": worker,
                    "endpoint": config.endpoint,
                    "clients": len(control.sessions),
                    "client_ports": sum(len(s.ports) for s in control.sessions.values()),
                    "clients_lost": control.sessions_lost,
                    "clients_refused": control.sessions_refused,
                    "clients_held": sum(s.holding for s in control.sessions.values()),
                    "client_queue_holds": control.holds,
                    "client_bytes_queued": sum(s.held for s in control.sessions.values()),
                    "names_resolved": control.names_resolved,
                    "faults": control.faults,
                    "faults_unanswered": control.faults_unanswered,
                    "apps": list[P.Wire](config.apps),
                },
            )

        control = ControlEndpoint(
            io,
            sock,
            heartbeat=config.heartbeat,
            info={"pid": os.getpid(), "worker": worker},
            status=status,
            limits=config.limits,
            bind_user=authenticator is not None,
            allow=config.allow,
        )
        io.zmq_sockets.add(sock)
        io.submit(_start_control, control, None)
        where = f" worker {worker}" if worker is not None else ""
        # The signals are ours before the daemon says it serves: from then on SIGTERM
        # stops it cleanly and SIGHUP reloads, never their default actions.
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
            log.info(
                "ioserver daemon%s serving %s (pid %d, %s, heartbeat %.3g s)",
                where,
                config.endpoint,
                os.getpid(),
                "CURVE" if authenticator else "ipc 0700" if path else "tcp",
                config.heartbeat,
            )
            _systemd.notify(
                "READY=1", f"STATUS=serving {config.endpoint}", f"MAINPID={os.getpid()}"
            )
            async with anyio.create_task_group() as task_group:
                for spec, function, argv in apps:
                    log.info("starting app %s", spec)
                    task_group.start_soon(function, ios, argv)
                async for number in signals:
                    if number == signal.SIGHUP:
                        hangup(config)
                        continue
                    log.info("%s received: stopping", signal.Signals(number).name)
                    _systemd.notify("STOPPING=1", "STATUS=stopping")
                    break
                task_group.cancel_scope.cancel()
            # Stop accepting clients and close their ports after their output; apps
            # closed theirs as they were cancelled.  Then give the output a grace period
            # - with the signals still ours: another SIGTERM does not cut it short.
            io.submit(_close_control, control, None)
            deadline = time.monotonic() + config.grace
            # The I/O thread's queues, polled: there is no event to wait on.
            while _pending_output(io) and time.monotonic() < deadline:  # noqa: ASYNC110
                await anyio.sleep(0.02)
            left = _pending_output(io)
            if left:
                log.warning("grace period over: %d bytes of output dropped", left)
    finally:
        if authenticator is not None:
            authenticator.stop()
        if path is not None:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
    log.info("ioserver daemon%s stopped", f" worker {worker}" if worker is not None else "")


def hangup(config: DaemonConfig) -> None:
    """SIGHUP: reopen the log files and reload what can change without a restart - the
    logging configuration and :data:`RELOADABLE_LIMITS` - from ``config.reload()``.

    Never raises: a configuration that is wrong now is logged as an error and the running
    one stays, whole."""
    log.info("SIGHUP received: reopening the log files and reloading the configuration")
    _systemd.notify("RELOADING=1", _systemd.reloading(), "STATUS=reloading")
    try:
        _reload(config)
    finally:
        _systemd.notify("READY=1", f"STATUS=serving {config.endpoint}")


def _reload(config: DaemonConfig) -> None:
    from ._logging import reopen_log_files

    reopen_log_files()
    if config.reload is None:
        return
    try:
        new = config.reload()
        _settle(new, quiet=True)
    except Exception as exc:
        log.error("SIGHUP: the configuration was not reloaded (the running one stays): %s", exc)
        return
    for name in RELOADABLE_LIMITS:
        setattr(config.limits, name, getattr(new.limits, name))
    restart = [
        name
        for name in (
            "endpoint",
            "apps",
            "heartbeat",
            "grace",
            "backend",
            "workers",
            "poller",
            "allow",
        )
        if getattr(new, name) != getattr(config, name)
    ]
    restart += [
        name
        for name in ("memory_limit", "max_frame", "session_queue")
        if getattr(new.limits, name, getattr(new, name, None))
        != getattr(config.limits, name, getattr(config, name, None))
    ]
    log.info(
        "SIGHUP: configuration reloaded: logging, max-sessions %d, max-ports %d",
        config.limits.max_sessions,
        config.limits.max_ports,
    )
    if restart:
        log.warning("SIGHUP: changed but needing a restart: %s", ", ".join(restart))


def _start_control(control: ControlEndpoint, _: object) -> None:
    control.start()


def _close_control(control: ControlEndpoint, _: object) -> None:
    control.close_all()


def _pending_output(io: IOThread) -> int:
    """Bytes queued and not yet written, summed over the port table (read from the loop:
    a snapshot, good enough to decide when to stop waiting)."""
    total = 0
    for entry in list(io._table):
        out = getattr(entry, "out_bytes", 0)
        if out and not entry.closed:
            total += out
    return total


def serve(config: DaemonConfig) -> int:
    """Run the daemon (or, with ``workers > 1``, the supervisor); the exit status."""
    _settle(config)
    _systemd.claim_notify_socket()
    # Until the event loop's receiver takes it, SIGHUP must not kill the daemon (its
    # default action): a handler, not SIG_IGN, which programs started from here inherit.
    signal.signal(signal.SIGHUP, _early_hangup)
    # A worker starts with SIGHUP blocked (see _supervise): one sent meanwhile waits for
    # the handler above instead of killing the worker in Python's startup.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
    metrics = _start_metrics(config) if config.worker_index is None else None
    try:
        if config.workers > 1 and config.worker_index is None:
            return _supervise(config)
        if config.worker_index is not None:
            _pin(config.worker_index, config.workers)
        run(
            _run_daemon,
            config,
            backend=config.backend,
            use_uvloop=config.use_uvloop,
            stop_on_signals=False,
            memory_limit=config.memory_limit,
            poller=config.poller,
        )
    finally:
        if metrics is not None:
            metrics.close()
    return 0


def _start_metrics(config: DaemonConfig) -> MetricsServer | None:
    """The ``--metrics`` HTTP endpoint, or None; each scrape asks the daemon (or the
    supervisor, which asks every worker) for its status over the control endpoint.

    Raises:
        OptionError: a malformed or non-loopback address (without the flag).
        DaemonError: the address cannot be bound.
    """
    if not config.metrics:
        return None
    from ._metrics import MetricsServer, parse_address

    host, port = parse_address(config.metrics, allow_remote=config.metrics_allow_remote)
    curve = _curve_for(config)
    try:
        return MetricsServer(
            host, port, lambda: query_status(config.endpoint, timeout=2.0, curve=curve)
        )
    except OSError as exc:
        raise DaemonError(
            f"cannot serve metrics on {config.metrics}: {exc.strerror or exc}"
        ) from None


def _early_hangup(number: int, frame: FrameType | None) -> None:
    log.info("SIGHUP received while starting: nothing to reload yet")


def _settle(config: DaemonConfig, *, quiet: bool = False) -> None:
    """Check ``config`` and fill in what follows from it: the default endpoint, a session
    queue bounded by the memory budget.

    Raises:
        DaemonError: an unsafe endpoint, a wrong heartbeat or grace, a wrong limit.
    """
    if not config.endpoint:
        config.endpoint = P.default_endpoint()
    check_endpoint(config)
    if config.heartbeat <= 0 or config.grace < 0:
        raise DaemonError("--heartbeat must be positive and --grace non-negative seconds")
    try:
        config.limits.check()
    except OptionError as exc:
        raise DaemonError(str(exc)) from None
    limits = config.limits
    if config.memory_limit is not None and limits.session_queue > config.memory_limit // 4:
        # One client that does not read must not hold the whole budget (which pauses
        # every port of the daemon): a quarter at most.
        queue = max(config.memory_limit // 4, 64 * 1024)
        if not quiet:
            log.warning(
                "--session-queue %d is above a quarter of --memory-limit: %d",
                limits.session_queue,
                queue,
            )
        limits.session_queue = queue


async def _run_daemon(ios: IOServer, config: DaemonConfig) -> None:
    await _daemon_main(ios, config)


def _pin(index: int, workers: int) -> None:
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if len(cores) >= workers:
        os.sched_setaffinity(0, {cores[index % len(cores)]})
        log.info("worker %d pinned to core %d", index, cores[index % len(cores)])
    else:
        log.info("worker %d not pinned: %d cores for %d workers", index, len(cores), workers)


# -- the supervisor of workers --------------------------------------------------------------
def worker_endpoint(endpoint: str, index: int) -> str:
    return f"{endpoint}-{index}" if endpoint.startswith("ipc://") else _tcp_plus(endpoint, index)


def _tcp_plus(endpoint: str, index: int) -> str:
    host, _, port = endpoint.rpartition(":")
    return f"{host}:{int(port) + 1 + index}"


def _worker_argv(config: DaemonConfig, index: int) -> list[str]:
    worker = [
        "--endpoint",
        worker_endpoint(config.endpoint, index),
        "--workers",
        str(config.workers),
        "--worker-index",
        str(index),
    ]
    if config.arguments is not None:
        # The user's own arguments: the worker reads the same --config file and
        # environment, now and on SIGHUP; the last of an option given twice wins.
        # The supervisor serves the metrics of all: "--metrics=" turns a worker's off.
        return [sys.executable, "-m", "ioserver", "serve", *config.arguments, *worker, "--metrics="]
    argv = [
        sys.executable,
        "-m",
        "ioserver",
        "serve",
        "--endpoint",
        worker_endpoint(config.endpoint, index),
    ]
    argv += ["--worker-index", str(index), "--workers", str(config.workers)]
    argv += ["--heartbeat", str(config.heartbeat), "--grace", str(config.grace)]
    argv += ["--backend", config.backend]
    if config.use_uvloop is not None:
        argv.append("--uvloop" if config.use_uvloop else "--no-uvloop")
    for app in config.apps:
        argv += ["--app", app]
    if config.curve_secret_key:
        argv += ["--curve-secret-key", config.curve_secret_key]
        argv += ["--curve-allowed-keys", str(config.curve_allowed_keys)]
    if config.allow_all_interfaces:
        argv.append("--allow-all-interfaces")
    argv += [f"--allow-{kind}" for kind in sorted(config.allow)]
    if config.memory_limit is not None:
        argv += ["--memory-limit", str(config.memory_limit)]
    if config.poller is not None:
        argv += ["--poller", config.poller]
    limits = config.limits
    argv += ["--max-frame", str(limits.max_frame), "--max-sessions", str(limits.max_sessions)]
    argv += ["--max-ports", str(limits.max_ports), "--session-queue", str(limits.session_queue)]
    return argv


def _supervise(config: DaemonConfig) -> int:
    """Start the workers, restart those that die, answer status on the main endpoint."""
    path = prepare_ipc(config.endpoint)
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    authenticator = _start_authenticator(context, config) if config.curve_secret_key else None
    sock = _open_control_socket(context, config)
    if path is not None:
        os.chmod(path, 0o600)
    stopping = False

    def stop(number: int, frame: object) -> None:
        nonlocal stopping
        if not stopping:
            log.info("%s received: stopping the workers", signal.Signals(number).name)
        stopping = True

    hangups = 0

    def hangup_later(number: int, frame: FrameType | None) -> None:
        nonlocal hangups
        hangups += 1

    previous = {number: signal.signal(number, stop) for number in (signal.SIGINT, signal.SIGTERM)}
    previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, hangup_later)
    environment = dict(os.environ)
    # Socket activation: the sockets systemd passed to the supervisor go to every worker
    # (LISTEN_PID stays the supervisor's: a worker accepts its parent's; _systemd).
    passed = [fd for fd, _ in _systemd.inherited_fds()]
    workers: list[subprocess.Popen[bytes] | None] = [None] * config.workers
    starts: list[float] = [0.0] * config.workers
    restarts = [0] * config.workers

    def start(index: int) -> None:
        environment[WORKER_ENVIRONMENT] = str(index)
        # The worker inherits the signal mask: SIGHUP stays pending until its handler is
        # in place (serve unblocks it), so a reload sent during its startup cannot kill it.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
        try:
            workers[index] = subprocess.Popen(
                _worker_argv(config, index), env=environment, pass_fds=passed
            )
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
        starts[index] = time.monotonic()
        log.info("worker %d started (pid %d)", index, workers[index].pid)  # type: ignore[union-attr]

    log.info(
        "ioserver supervisor serving %s with %d workers (pid %d)",
        config.endpoint,
        config.workers,
        os.getpid(),
    )
    try:
        for index in range(config.workers):
            start(index)
        _systemd.notify(
            "READY=1",
            f"STATUS=supervising {config.workers} workers, {config.endpoint}",
            f"MAINPID={os.getpid()}",
        )
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        while not stopping:
            try:
                ready = dict(poller.poll(200))
            except zmq.ZMQError as exc:
                if exc.errno == errno.EINTR:
                    continue
                raise
            if sock in ready:
                _supervisor_answer(sock, config, workers, restarts, context)
            if hangups:
                hangups = 0
                hangup(config)  # the supervisor's own log; then each worker does its part
                for process in workers:
                    if process is not None and process.poll() is None:
                        process.send_signal(signal.SIGHUP)
            for index, process in enumerate(workers):
                if process is not None and process.poll() is not None and not stopping:
                    log.error(
                        "worker %d (pid %d) died with status %s; restarting",
                        index,
                        process.pid,
                        process.returncode,
                    )
                    restarts[index] += 1
                    if time.monotonic() - starts[index] < 1.0:
                        time.sleep(1.0)  # it died at once: do not spin
                    start(index)
    finally:
        _systemd.notify("STOPPING=1", "STATUS=stopping the workers")
        for process in workers:
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + config.grace + 5
        for process in workers:
            if process is not None:
                try:
                    process.wait(max(deadline - time.monotonic(), 0.1))
                except subprocess.TimeoutExpired:
                    log.error("worker pid %d did not stop; killing it", process.pid)
                    process.kill()
                    process.wait()
        sock.close(linger=0)
        if authenticator is not None:
            authenticator.stop()
        context.term()
        if path is not None:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        for number, handler in previous.items():
            signal.signal(number, handler)
        log.info("ioserver supervisor stopped")
    return 0


def _supervisor_answer(
    sock: zmq.Socket[bytes],
    config: DaemonConfig,
    workers: list[subprocess.Popen[bytes] | None],
    restarts: list[int],
    context: zmq.Context[zmq.Socket[bytes]],
) -> None:
    """The supervisor speaks just enough of the protocol: HELLO, STATUS, HEARTBEAT, BYE."""
    while True:
        try:
            identity, frame = sock.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return
        except ValueError:
            continue
        replies: list[P.Message] = []
        try:
            messages, _ = P.unpack_frame(
                frame, max_frame=config.limits.max_frame, max_messages=config.limits.max_messages
            )
        except P.ProtocolViolation as exc:
            replies.append([P.FAULT, None, exc.kind, str(exc)])
            messages = []
        answer: dict[str, P.Wire] | None = None  # the workers are asked once per frame at most
        if len(messages) > config.limits.faults_per_frame:
            left = len(messages) - config.limits.faults_per_frame
            replies.append([P.FAULT, None, "limit", f"the supervisor ignored {left} messages"])
        for message in messages[: config.limits.faults_per_frame]:
            if not (isinstance(message, list) and message and P.is_int(message[0])):
                replies.append([P.FAULT, None, "malformed", "a message must be [opcode, ...]"])
            elif message[0] == P.HELLO:
                info: dict[str, P.Wire] = {
                    "version": P.VERSION,
                    "pid": os.getpid(),
                    "worker": None,
                    "heartbeat": config.heartbeat,
                    "workers": config.workers,
                    # It keeps no session: the token is for the client's protocol only.
                    "token": secrets.token_bytes(P.TOKEN_SIZE),
                    "max_frame": config.limits.max_frame,
                    "max_messages": config.limits.max_messages,
                }
                replies.append([P.WELCOME, info])
            elif message[0] == P.STATUS and len(message) == 2 and P.is_int(message[1]):
                if answer is not None:
                    replies.append([P.STATUS_REPLY, message[1], answer])
                    continue
                statuses: list[P.Wire] = []
                for index in range(config.workers):
                    endpoint = worker_endpoint(config.endpoint, index)
                    try:
                        status = query_status(
                            endpoint, timeout=2.0, context=context, curve=_curve_for(config)
                        )
                    except IOServerError as exc:  # DaemonError, UnsafeEndpointError
                        status = {"worker": index, "endpoint": endpoint, "error": str(exc)}
                    process = workers[index]
                    status.setdefault("worker", index)
                    status["restarts"] = restarts[index]
                    status["process"] = process.pid if process is not None else None
                    statuses.append(status)
                answer = {"workers": statuses, "supervisor": os.getpid()}
                replies.append([P.STATUS_REPLY, message[1], answer])
            elif message[0] in (P.HEARTBEAT, P.BYE):
                pass
            else:
                replies.append(
                    [
                        P.FAULT,
                        message[1] if len(message) > 1 and P.is_int(message[1]) else None,
                        "supervisor",
                        f"this endpoint supervises {config.workers} workers; open ports on a "
                        f"worker's endpoint: {worker_endpoint(config.endpoint, 0)} ...",
                    ]
                )
        if replies:
            try:
                sock.send_multipart([identity, P.pack(replies)], zmq.NOBLOCK)
            except zmq.ZMQError:
                pass


def _curve_for(config: DaemonConfig) -> tuple[str, str] | None:
    if not config.curve_secret_key:
        return None
    # The supervisor queries its workers with the server's own certificate: it must be in
    # the allowed keys for that (the daemon's docs say so).
    return config.curve_secret_key, config.curve_secret_key


# -- status ---------------------------------------------------------------------------------
def query_status(
    endpoint: str,
    *,
    timeout: float = 5.0,
    context: zmq.Context[zmq.Socket[bytes]] | None = None,
    curve: tuple[str, str] | None = None,
) -> dict[str, P.Wire]:
    """Ask the daemon (or supervisor) at ``endpoint`` for its status; blocking.

    ``curve`` is ``(server public certificate file, client secret certificate file)``.

    Raises:
        DaemonError: no answer within ``timeout`` seconds, a malformed answer, or (at
            once) an ``ipc://`` socket file that nothing listens on: a stale socket.
        UnsafeEndpointError: an ``ipc://`` endpoint another user could control, or
            answered by a process of another uid (see :mod:`ioserver._ipc`).
    """
    own = context is None
    context = context or zmq.Context()
    sock: zmq.Socket[bytes] = context.socket(zmq.DEALER)
    try:
        sock.setsockopt(zmq.LINGER, 0)
        if curve is not None:
            server_public, _ = zmq.auth.load_certificate(curve[0])
            public, secret = zmq.auth.load_certificate(curve[1])
            if secret is None:
                raise DaemonError(f"{curve[1]} holds no secret key")
            sock.curve_serverkey = server_public
            sock.curve_publickey = public
            sock.curve_secretkey = secret
        ipc = endpoint.startswith("ipc://")
        if ipc and not _ipc.client_check(endpoint[len("ipc://") :]):
            raise DaemonError(f"no ioserver daemon at {endpoint}: the socket file does not exist")
        if ipc and _ipc.is_stale(endpoint[len("ipc://") :]):
            raise DaemonError(_ipc.stale_message(endpoint))
        sock.connect(endpoint)
        sock.send(P.pack([[P.HELLO, P.VERSION], [P.STATUS, 1], [P.BYE]]))
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not sock.poll(int(left * 1000)):
                raise DaemonError(f"no answer from {endpoint} within {timeout} s")
            frame = sock.recv(copy=False)
            uid = _ipc.peer_uid(frame) if ipc else None
            if uid is not None and uid != os.geteuid():
                raise _ipc.refuse_peer(endpoint, uid)
            for message in P.unpack(frame.bytes):
                if isinstance(message, list) and message and message[0] == P.STATUS_REPLY:
                    status = message[2]
                    if not isinstance(status, dict):
                        raise DaemonError(f"a malformed status from {endpoint}")
                    return status
                if isinstance(message, list) and message and message[0] == P.FAULT:
                    kind, text = message[2:4] if len(message) >= 4 else (None, None)
                    raise DaemonError(f"{endpoint} refused: {kind!s}: {text!s}")
    except P.ProtocolViolation as exc:
        raise DaemonError(f"a malformed answer from {endpoint}: {exc}") from None
    finally:
        sock.close(linger=0)
        if own:
            context.term()


def format_status(status: dict[str, P.Wire]) -> str:
    """``ioserver status`` for humans: one block per worker."""
    listed = status.get("workers")
    workers = (
        [worker for worker in listed if isinstance(worker, dict)]
        if isinstance(listed, list)
        else [status]
    )
    lines = []
    for worker in workers:

        def show(name: str, worker: dict[str, P.Wire] = worker) -> str:
            value = worker.get(name)
            return value.decode(errors="replace") if isinstance(value, bytes) else str(value)

        kinds = worker.get("ports_by_kind")
        uptime = worker.get("uptime", 0)
        lines.append(
            f"worker {show('worker') if worker.get('worker') is not None else '-'}"
            f"  pid {show('pid')}"
            f"  uptime {uptime if isinstance(uptime, (int, float)) else 0:.0f} s"
            f"  endpoint {show('endpoint')}"
            + (f"  poller {show('poller')}" if worker.get("poller") else "")
        )
        if "error" in worker:
            lines.append(f"  unreachable: {show('error')}")
            continue
        counts = kinds.items() if isinstance(kinds, dict) else ()
        lines.append(
            f"  ports {show('ports_open')}: "
            + ", ".join(f"{name} {count!s}" for name, count in counts)
            + f"; clients {show('clients')} ({show('client_ports')} ports)"
        )
        lines.append(
            f"  bytes in {show('bytes_in')}  out {show('bytes_out')}"
            f"  queued out {show('bytes_queued_out')}  memory {show('memory_in_use')}"
        )
        lines.append(
            f"  queues: commands {show('command_queue_depth')}"
            f"  events {show('event_queue_depth')}"
            f"  busy ports {show('busy_ports')}  paused ports {show('paused_ports')}"
        )
        lines.append(
            f"  wakes to I/O thread sent {show('wakes_to_io_sent')}"
            f" skipped {show('wakes_to_io_skipped')};"
            f" to loops sent {show('wakes_to_loops_sent')}"
            f" skipped {show('wakes_to_loops_skipped')}"
        )
    return "\n".join(lines)
