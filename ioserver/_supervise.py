"""``ioserver serve --workers N``: the supervisor process and its N worker processes.

The supervisor starts N daemons (*workers*) as processes, share-nothing: each runs
:mod:`~._daemon` with its own I/O thread, apps and control endpoint
(:func:`worker_endpoint`); listeners opened by apps share their TCP port through
``SO_REUSEPORT`` (:data:`WORKER_ENVIRONMENT`); each worker is pinned to a core when there
are enough (:func:`pin`).  The supervisor restarts a worker that dies, passes SIGHUP on,
and answers ``ioserver status`` on the main endpoint with every worker's status
(:mod:`~._status`).  Not to be confused with :mod:`~._workers` (the control endpoint's
worker *threads*, in every daemon) nor with ``ports._supervisor`` (actors restarted in one
event loop).
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
from collections import deque
from types import FrameType
from typing import Any

import zmq

from . import _protocol as P
from . import _systemd
from ._daemon_config import (
    DaemonConfig,
    hangup,
    open_control_socket,
    prepare_ipc,
    start_authenticator,
)
from ._exceptions import IOServerError
from ._status import curve_for, query_status

log = logging.getLogger("ioserver")

WORKER_ENVIRONMENT = "IOSERVER_WORKER"  #: set to the worker's index in each worker
# (ports.listen_tcp reads it: listeners share their port with SO_REUSEPORT in workers)


def worker_endpoint(endpoint: str, index: int) -> str:
    """Worker ``index``'s control endpoint: ``ipc://PATH-<index>``, or the main ``tcp://``
    port plus ``1 + index``."""
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


def supervise(config: DaemonConfig) -> int:
    """Start the workers, restart those that die, answer status on the main endpoint;
    the exit status: 0 once stopped by a signal, 1 when workers died more than
    ``max_restarts`` times within ``restart_period`` seconds (Erlang's supervisor
    intensity and period: the supervisor then stops the other workers and exits, for
    systemd's ``Restart=`` to act on, instead of restarting them for ever)."""
    path = prepare_ipc(config.endpoint)
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    authenticator = start_authenticator(context, config) if config.curve_secret_key else None
    sock = open_control_socket(context, config)
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
    # When each recent restart happened (any worker's): more than max_restarts within
    # restart_period seconds and the supervisor gives up, as an OTP supervisor past its
    # restart intensity does (``intensity``, ``period``).
    recent: deque[float] = deque()
    gave_up = False

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
                    now = time.monotonic()
                    recent.append(now)
                    while recent and recent[0] < now - config.restart_period:
                        recent.popleft()
                    giving_up = len(recent) > config.max_restarts
                    log.error(
                        "worker %d (pid %d) died with status %s%s",
                        index,
                        process.pid,
                        process.returncode,
                        "" if giving_up else "; restarting",
                    )
                    if giving_up:
                        log.error(
                            "workers died %d times within %g s (more than --max-restarts "
                            "%d): giving up, stopping the others",
                            len(recent),
                            config.restart_period,
                            config.max_restarts,
                        )
                        _systemd.notify("STATUS=giving up: workers keep dying")
                        gave_up = stopping = True
                        workers[index] = None
                        break
                    restarts[index] += 1
                    if now - starts[index] < 1.0:
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
    return 1 if gave_up else 0


#: Frames the supervisor serves before it looks at its workers again.
FRAMES_PER_PASS = 64
#: Seconds a status gathered from the workers answers STATUS, for every client.
STATUS_FRESH = 1.0
#: The last status gathered from the workers, and when (monotonic).
_last_status: list[Any] = [None, 0.0]


def _supervisor_answer(
    sock: zmq.Socket[bytes],
    config: DaemonConfig,
    workers: list[subprocess.Popen[bytes] | None],
    restarts: list[int],
    context: zmq.Context[zmq.Socket[bytes]],
) -> None:
    """The supervisor speaks just enough of the protocol: HELLO, STATUS, HEARTBEAT, BYE.

    At most :data:`FRAMES_PER_PASS` frames a call, and the workers' status is asked at
    most once every :data:`STATUS_FRESH` seconds, all clients together: a client sending
    STATUS faster than the workers answer would otherwise keep the supervisor here, not
    watching its workers (a dead one not restarted, SIGTERM not seen)."""
    for _ in range(FRAMES_PER_PASS):
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
        if _last_status[0] is not None and time.monotonic() - _last_status[1] < STATUS_FRESH:
            answer = _last_status[0]
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
                            endpoint, timeout=2.0, context=context, curve=curve_for(config)
                        )
                    except IOServerError as exc:  # DaemonError, UnsafeEndpointError
                        status = {"worker": index, "endpoint": endpoint, "error": str(exc)}
                    process = workers[index]
                    status.setdefault("worker", index)
                    status["restarts"] = restarts[index]
                    status["process"] = process.pid if process is not None else None
                    statuses.append(status)
                answer = {"workers": statuses, "supervisor": os.getpid()}
                _last_status[:] = [answer, time.monotonic()]
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


def pin(index: int, workers: int) -> None:
    """Pin worker ``index`` (this process) to one core, when there is a core for each of
    the ``workers``; else leave it to the scheduler (logged either way)."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if len(cores) >= workers:
        os.sched_setaffinity(0, {cores[index % len(cores)]})
        log.info("worker %d pinned to core %d", index, cores[index % len(cores)])
    else:
        log.info("worker %d not pinned: %d cores for %d workers", index, len(cores), workers)
