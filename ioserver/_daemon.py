"""``ioserver serve``: one daemon process, or the ``--workers`` supervisor in its place.

One daemon process is an I/O thread, its control endpoint (:mod:`ioserver._control`) and
optionally apps (``--app``) running in the process's event loop; SIGHUP reloads its
configuration (:mod:`~._daemon_config`), ``--metrics`` serves its status
(:mod:`~._status`).  :func:`serve` runs it, or with ``--workers N`` the supervisor
(:mod:`~._supervise`), which runs N of these as worker processes.
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import time
from types import FrameType
from typing import TYPE_CHECKING

import anyio

from . import _protocol as P
from . import _systemd
from ._control import ControlEndpoint, io_status
from ._daemon_config import (
    DaemonConfig,
    DaemonError,
    hangup,
    open_control_socket,
    prepare_ipc,
    settle,
    start_authenticator,
)
from ._exceptions import OptionError
from ._iothread import IOThread
from ._server import IOServer, run
from ._status import curve_for, query_status
from ._supervise import pin, supervise

if TYPE_CHECKING:
    from ._metrics import MetricsServer

log = logging.getLogger("ioserver")


def serve(config: DaemonConfig) -> int:
    """Run the daemon (or, with ``workers > 1``, the supervisor); the exit status."""
    settle(config)
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
            return supervise(config)
        if config.worker_index is not None:
            pin(config.worker_index, config.workers)
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


async def _run_daemon(ios: IOServer, config: DaemonConfig) -> None:
    await _daemon_main(ios, config)


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
    authenticator = start_authenticator(context, config) if config.curve_secret_key else None
    try:
        sock = open_control_socket(context, config)
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
            _log_early_hangups()
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


def _start_control(control: ControlEndpoint, _: object) -> None:
    control.start()


def _close_control(control: ControlEndpoint, _: object) -> None:
    control.close_all()


def _pending_output(io: IOThread) -> int:
    """Bytes queued and not yet written, summed over the port table, and on the native
    core over its own thread's ports too (read from the loop: a snapshot, good enough to
    decide when to stop waiting)."""
    total = 0
    for entry in list(io._table):
        out = getattr(entry, "out_bytes", 0)
        if out and not entry.closed:
            total += out
    core = getattr(io, "_core", None)  # the native core: the ports its thread carries
    if core is not None:
        total += int(core.pending_output)
    return total


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
    curve = curve_for(config)
    try:
        return MetricsServer(
            host, port, lambda: query_status(config.endpoint, timeout=2.0, curve=curve)
        )
    except OSError as exc:
        raise DaemonError(
            f"cannot serve metrics on {config.metrics}: {exc.strerror or exc}"
        ) from None


#: SIGHUPs received before the event loop's receiver took the signal (``_early_hangup``).
_early_hangups = 0


def _early_hangup(number: int, frame: FrameType | None) -> None:
    """SIGHUP while the daemon starts: counted, and logged once the event loop runs
    (``_log_early_hangups``).  A signal handler must not write the log: it runs between
    two bytecodes of whatever the main thread was doing, and if that was a write to the
    same stream (an app printing to stderr while it loads), the nested write raises
    ``RuntimeError: reentrant call`` out of the handler and the daemon dies."""
    global _early_hangups
    _early_hangups += 1


def _log_early_hangups() -> None:
    """Say, from the event loop, that SIGHUPs came while the daemon started."""
    global _early_hangups
    count, _early_hangups = _early_hangups, 0
    if count:
        log.info(
            "SIGHUP received while starting%s: nothing to reload yet",
            f" ({count} times)" if count > 1 else "",
        )
