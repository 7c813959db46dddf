"""systemd integration: readiness notification and socket activation, by the documented
protocols (``sd_notify(3)``, ``sd_listen_fds(3)``), without libsystemd.

**Readiness** (``Type=notify``): systemd sets ``NOTIFY_SOCKET`` to an ``AF_UNIX`` datagram
socket (a path, or ``@name`` in the abstract namespace); the service sends it datagrams of
newline-separated ``KEY=VALUE`` assignments: ``READY=1`` once it serves, ``STATUS=...``
(a line ``systemctl status`` shows), ``RELOADING=1`` with ``MONOTONIC_USEC=`` while it
reloads (``Type=notify-reload``), ``STOPPING=1`` when it begins to stop, ``MAINPID=``.
:func:`notify` sends one; without ``NOTIFY_SOCKET`` it does nothing.

**Socket activation**: systemd opens the listening sockets of the ``.socket`` unit and
passes them to the service as descriptors 3, 4, ... with ``LISTEN_FDS`` (how many),
``LISTEN_PID`` (the pid they are for: anyone else ignores them) and ``LISTEN_FDNAMES``
(``FileDescriptorName=``, colon-separated).  :func:`take_listener` is what
``ports.listen_tcp`` and ``ports.listen_unix`` consult: a listener asked for on the very
address of a passed socket (``ListenStream=127.0.0.1:7000`` and
``listen_tcp(ios, "127.0.0.1", 7000)``; a path for a Unix socket) adopts that socket
instead of binding a new one - so the app's code does not change, and connections
that arrived before the app listened are waiting in its backlog.  Each passed socket is
adopted once.  In a worker of ``ioserver serve --workers N`` the sockets passed to the
supervisor (``LISTEN_PID`` its pid) are inherited and adopted by every worker, which
then accept from one shared queue.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import TYPE_CHECKING

from ._tcp import StreamHost, adopt_listener

if TYPE_CHECKING:
    from ._contract import ListenRequest

__all__ = [
    "claim_notify_socket",
    "cmd_listen_inherited",
    "inherited_fds",
    "notify",
    "reloading",
    "take_listener",
]

log = logging.getLogger("ioserver")

SD_LISTEN_FDS_START = 3  #: the first passed descriptor (sd-daemon.h)
WORKER_ENVIRONMENT = "IOSERVER_WORKER"  # as in ioserver._supervise (not imported: cycles)

_lock = threading.Lock()
_table: dict[tuple[int, object], socket.socket] | None = None
_claimed: str | None = None


def claim_notify_socket() -> str | None:
    """Take ``NOTIFY_SOCKET`` out of the environment (so that the programs the daemon
    starts - its workers, ports.open_process - do not speak for it) and keep it for
    :func:`notify`; returns it."""
    global _claimed
    address = os.environ.pop("NOTIFY_SOCKET", None)
    if address:
        _claimed = address
    return _claimed


# -- readiness ------------------------------------------------------------------------------
def notify(*assignments: str, environ: dict[str, str] | None = None) -> bool:
    """Send ``assignments`` (``"READY=1"``, ``"STATUS=serving"``...) to systemd in one
    datagram; True if sent, False without ``NOTIFY_SOCKET``.  Never raises: a failure is
    logged (the service goes on; systemd will time it out if it waited for READY)."""
    if environ is not None:
        address = environ.get("NOTIFY_SOCKET", "")
    else:
        address = _claimed or os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # the abstract namespace
    elif not address.startswith("/"):
        log.warning("NOTIFY_SOCKET=%r is not a path or @name: not notifying", address)
        return False
    payload = "\n".join(assignments).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(payload, address)
    except OSError as exc:
        log.warning("cannot notify systemd at %s: %s", address.lstrip("\0"), exc)
        return False
    return True


def reloading() -> str:
    """The ``MONOTONIC_USEC=`` assignment that must come with ``RELOADING=1``."""
    return f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}"


# -- socket activation ----------------------------------------------------------------------
def inherited_fds(environ: dict[str, str] | None = None) -> list[tuple[int, str]]:
    """The descriptors systemd passed to this process, with their names: ``[(fd, name)]``;
    empty when ``LISTEN_PID`` names another process (or, in a worker of ``--workers``,
    other than its supervisor) or nothing was passed."""
    environ = dict(os.environ) if environ is None else environ
    try:
        pid = int(environ.get("LISTEN_PID", ""))
        count = int(environ.get("LISTEN_FDS", ""))
    except ValueError:
        return []
    mine = pid == os.getpid() or (WORKER_ENVIRONMENT in environ and pid == os.getppid())
    if not mine or count <= 0:
        return []
    names = environ.get("LISTEN_FDNAMES", "").split(":")
    names += ["unknown"] * (count - len(names))
    return [(SD_LISTEN_FDS_START + index, names[index]) for index in range(count)]


def _key(family: int, address: object) -> tuple[int, object]:
    if family in (socket.AF_INET, socket.AF_INET6):
        assert isinstance(address, tuple)  # (host, port, ...) as bind takes it
        return family, (str(address[0]), int(address[1]))
    if isinstance(address, bytes):  # an abstract Unix address, or a path given as bytes
        address = address.decode("utf-8", "surrogateescape")
    if isinstance(address, str) and address and not address.startswith("\0"):
        address = os.path.abspath(address)
    return family, address


def _load() -> dict[tuple[int, object], socket.socket]:
    """The passed listening stream sockets, by (family, address); read once."""
    global _table
    if _table is not None:
        return _table
    table: dict[tuple[int, object], socket.socket] = {}
    for fd, name in inherited_fds():
        try:
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            log.warning("socket activation: descriptor %d (%s) is not a socket: %s", fd, name, exc)
            continue
        if sock.type != socket.SOCK_STREAM or not sock.getsockopt(
            socket.SOL_SOCKET, socket.SO_ACCEPTCONN
        ):
            log.warning(
                "socket activation: descriptor %d (%s) is not a listening stream socket: "
                "left alone",
                fd,
                name,
            )
            sock.detach()
            continue
        sock.set_inheritable(False)
        key = _key(sock.family, sock.getsockname())
        table[key] = sock
        log.info("socket activation: descriptor %d (%s) listens on %s", fd, name, key[1])
    _table = table
    return table


def take_listener(family: int, address: object) -> socket.socket | None:
    """The passed listening socket bound to ``address`` (as ``socket.bind`` takes it, for
    ``family``), now the caller's; None if systemd passed none there (or it was taken)."""
    with _lock:
        return _load().pop(_key(family, address), None)


def return_listener(family: int, address: object, sock: socket.socket) -> None:
    """Put back ``sock``, which :func:`take_listener` gave for ``address``, because it was
    not adopted (the listen was cancelled, or failed): the next listen there takes it."""
    with _lock:
        _load()[_key(family, address)] = sock


def cmd_listen_inherited(
    io: StreamHost, sock: socket.socket, request: object, spec: ListenRequest
) -> None:
    """On the I/O thread: make ``sock``, a passed listening socket, the listener ``spec``
    asked for, as ``ioserver._tcp.listen_tcp`` makes one it bound (answers ``(conn, sockname,
    None)``, or the :exc:`~ioserver.PollerLimitError` of a poller that cannot watch it;
    then only our copy is closed: systemd keeps its own)."""
    sock.setblocking(False)
    adopt_listener(io, request, spec, sock, sock.getsockname())
