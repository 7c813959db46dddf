"""The daemon's configuration: what ``ioserver serve`` was asked, its checks, SIGHUP's reload.

What the two processes ``ioserver serve`` can be share, so it lies below both: the single
daemon (:mod:`~._daemon`) and the ``--workers`` supervisor (:mod:`~._supervise`) take a
:class:`DaemonConfig`, check and complete it (:func:`settle`), bind their control endpoint
from it (:func:`prepare_ipc`, :func:`open_control_socket`, :func:`start_authenticator`)
and reload it on SIGHUP (:func:`hangup`).  Reading the settings from a file and the environment is
:mod:`~._config`'s; this module holds what they become.
"""

from __future__ import annotations

import ipaddress
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import zmq
import zmq.auth

from . import _ipc, _systemd
from . import _protocol as P
from ._control import ControlLimits
from ._exceptions import IOServerError, OptionError, UnsafeEndpointError

if TYPE_CHECKING:
    from zmq.auth.thread import ThreadAuthenticator

log = logging.getLogger("ioserver")


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
    #: With ``workers > 1``: the supervisor gives up (exit status 1) when workers die more
    #: than ``max_restarts`` times within ``restart_period`` seconds (Erlang's supervisor
    #: ``intensity`` and ``period``).
    max_restarts: int = 5
    restart_period: float = 30.0
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


def settle(config: DaemonConfig, *, quiet: bool = False) -> None:
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
    if config.max_restarts < 0 or not config.restart_period > 0:
        raise DaemonError("--max-restarts must be 0 or more and --restart-period positive seconds")
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
        DaemonError: a live daemon already answers on the path; the path is longer than
            a Unix socket's can be; its directory cannot be made.
    """
    if not endpoint.startswith("ipc://"):
        return None
    path = endpoint[len("ipc://") :]
    # Before any directory is made for it: a path bind() would refuse leaves none behind.
    longest = zmq.IPC_PATH_MAX_LEN or 107
    if len(os.fsencode(path)) > longest:
        raise DaemonError(
            f"the socket path of {endpoint} is longer than the {longest} bytes a Unix "
            "socket's path can have; choose a shorter one"
        )
    directory = os.path.dirname(os.path.abspath(path))
    try:
        _ipc.make_directory(directory)
    except UnsafeEndpointError:
        raise
    except OSError as exc:  # a parent not ours to write in, a read-only file system...
        raise DaemonError(
            f"cannot make the control socket's directory {directory}: "
            f"{exc.strerror or exc}; choose another endpoint"
        ) from None
    if _ipc.check_socket(path):
        if not _ipc.is_stale(path):
            raise DaemonError(f"a daemon already serves {endpoint}")
        os.unlink(path)  # stale: its daemon died without cleaning up
        log.info("removed the stale control socket %s", path)
    return path


def open_control_socket(
    context: zmq.Context[zmq.Socket[bytes]], config: DaemonConfig
) -> zmq.Socket[bytes]:
    # The key first: an error once the socket exists must close it, or the context's
    # term() at the daemon's exit waits for it forever (a hang, not an exit status).
    public = secret = None
    if config.curve_secret_key:
        try:
            public, secret = zmq.auth.load_certificate(config.curve_secret_key)
        except (OSError, ValueError) as exc:
            raise DaemonError(
                f"cannot read the CURVE secret key {config.curve_secret_key}: "
                f"{getattr(exc, 'strerror', None) or exc}"
            ) from None
        if secret is None:
            raise DaemonError(f"{config.curve_secret_key} holds no secret key")
    sock: zmq.Socket[bytes] = context.socket(zmq.ROUTER)
    try:
        _configure_control_socket(sock, config, public, secret)
    except BaseException:
        sock.close(linger=0)
        raise
    return sock


def _configure_control_socket(
    sock: zmq.Socket[bytes], config: DaemonConfig, public: bytes | None, secret: bytes | None
) -> None:
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    # Per client: frames ZeroMQ queues to send (more wait in the session, charged to the
    # budget), the largest frame it takes (a peer that sends more is disconnected).
    sock.setsockopt(zmq.SNDHWM, config.limits.send_hwm)
    sock.setsockopt(zmq.RCVHWM, 1000)
    sock.setsockopt(zmq.MAXMSGSIZE, config.limits.max_frame)
    sock.setsockopt(zmq.LINGER, 0)
    if secret is not None and public is not None:
        sock.curve_secretkey = secret
        sock.curve_publickey = public
        sock.curve_server = True
    try:
        sock.bind(config.endpoint)
    except zmq.ZMQError as exc:
        raise DaemonError(f"cannot bind {config.endpoint}: {exc}") from None


def start_authenticator(
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


# -- SIGHUP -----------------------------------------------------------------------------------
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
        settle(new, quiet=True)
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
            "max_restarts",
            "restart_period",
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
