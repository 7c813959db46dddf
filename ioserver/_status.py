"""``ioserver status``: ask a daemon (or the ``--workers`` supervisor) for its status, and
show it to humans.

The client side of the STATUS request, blocking (no I/O thread, no event loop): the CLI,
the supervisor (which asks each worker, :mod:`~._supervise`) and the ``--metrics``
endpoint (:mod:`~._daemon`) use it.  The status itself is made by the daemon's control
endpoint (:func:`~._control.io_status`).
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

import zmq
import zmq.auth

from . import _ipc
from . import _protocol as P
from ._daemon_config import DaemonError

if TYPE_CHECKING:
    from ._daemon_config import DaemonConfig


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
            server_public, _ = _certificate(curve[0])
            public, secret = _certificate(curve[1])
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


def _certificate(path: str) -> tuple[bytes, bytes | None]:
    """``(public, secret)`` of a certificate file.

    Raises:
        DaemonError: missing, unreadable, or not a certificate.
    """
    try:
        return zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise DaemonError(
            f"cannot read the CURVE certificate {path}: {getattr(exc, 'strerror', None) or exc}"
        ) from None


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


def curve_for(config: DaemonConfig) -> tuple[str, str] | None:
    """The ``curve`` with which the daemon asks its own endpoints (a worker's, for the
    supervisor; its own, for ``--metrics``) for their status; None without CURVE."""
    if not config.curve_secret_key:
        return None
    # The supervisor queries its workers with the server's own certificate: it must be in
    # the allowed keys for that (the daemon's docs say so).
    return config.curve_secret_key, config.curve_secret_key
