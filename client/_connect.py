"""``client.connect``: a daemon's I/O server, as the port functions see it."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import anyio
import zmq

import ioserver
from ioserver import _ipc
from ioserver import _protocol as P
from ioserver._exceptions import BrokenPortError, OptionError
from ioserver._hub import Hub
from ioserver._server import IOServer, IOServerStatistics
from ports._port import _Request

from ._exceptions import DaemonUnavailable
from ._remote import RemoteIO

__all__ = ["RemoteIOServer", "connect"]


class RemoteIOServer(IOServer):
    """An I/O server whose sockets live in an ioserver daemon.

    Pass it to any port function (``ports.connect_tcp``, ``ports.open_udp``,
    ``ports.connect_unix``, ``ports.open_process``, ``ports.open_zmq``,
    ``ports.open_tun``...) as you would an :class:`ioserver.IOServer`: the port's socket,
    program or device is the daemon's (its addresses, paths, names and network namespace),
    its messages and flow control are as in-process.  Get one from :func:`connect`.  The
    kinds that let a client act as the daemon's user beyond the network - programs, Unix
    paths (and ``ipc://`` ZeroMQ endpoints), TUN/TAP devices - are refused with
    :exc:`client.ProtocolError` (``kind`` ``"forbidden"``) unless the daemon was started
    with ``--allow-process``, ``--allow-unix``, ``--allow-tun``.
    """

    __slots__ = ("_local", "_remote")

    def __init__(self, remote: RemoteIO, hub: Hub, local: IOServer) -> None:
        super().__init__(remote, hub)  # type: ignore[arg-type]
        self._remote = remote
        self._local = local

    @property
    def endpoint(self) -> str:
        """The daemon's control endpoint."""
        return self._remote.endpoint

    @property
    def daemon_info(self) -> dict[str, P.Wire]:
        """What the daemon said when the session opened: ``version``, ``pid``,
        ``worker``, ``heartbeat`` (seconds)."""
        return dict(self._remote.info)

    def _check_open(self, function: str | None = None) -> Hub:
        hub = super()._check_open()
        if self._remote.lost:
            raise BrokenPortError(
                f"the ioserver daemon at {self.endpoint} is lost: {self._remote.broken_reason}",
                errno_name="ECONNABORTED",
            )
        return hub

    def statistics(self) -> IOServerStatistics:
        """The statistics of the local I/O thread that carries this session."""
        return self._local.statistics()

    async def status(self, *, timeout: float = 5.0) -> dict[str, P.Wire]:
        """The daemon's status, as ``ioserver status --json`` prints it for one worker.

        Raises:
            ioserver.BrokenPortError: the daemon is lost.
            TimeoutError: no answer within ``timeout`` seconds.
        """
        hub = self._check_open()
        request = _Request(self._local._io, hub)
        self._local._io.submit(self._remote.cmd_status, request, hub.deliver)
        with anyio.fail_after(timeout):
            result = await request.wait()
        if isinstance(result, BaseException):
            raise result
        return result  # type: ignore[no-any-return]

    async def aclose(self) -> None:
        """End the session: the daemon closes this client's ports (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if not self._local.closed:
            self._local._io.submit(self._remote.cmd_bye, None, None)
        await anyio.lowlevel.checkpoint()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "lost" if self._remote.lost else "open"
        return f"<RemoteIOServer {self.endpoint} {state}>"


def _curve_keys(value: object, what: str) -> tuple[bytes, bytes | None]:
    """``(public, secret)`` from a Z85 key (bytes/str) or a certificate file path."""
    if isinstance(value, bytes) and len(value) == 40:
        return value, None
    if isinstance(value, str) and len(value) == 40 and not os.path.exists(value):
        return value.encode(), None
    if isinstance(value, (str, os.PathLike)):
        import zmq.auth

        try:
            public, secret = zmq.auth.load_certificate(os.fspath(value))
        except (OSError, ValueError) as exc:
            raise OptionError(f"{what}: cannot read the certificate {value!r}: {exc}") from None
        return public, secret
    raise OptionError(f"{what} must be a Z85 key (40 chars) or a certificate file path")


@asynccontextmanager
async def connect(
    endpoint: str | None = None,
    *,
    timeout: float = 5.0,
    server: IOServer | None = None,
    curve_server_key: bytes | str | os.PathLike[str] | None = None,
    curve_certificate: str | os.PathLike[str] | None = None,
) -> AsyncIterator[RemoteIOServer]:
    """Connect to an ioserver daemon; yield an I/O server the port functions accept.

    ::

        async with client.connect() as ios:          # the default ipc:// endpoint
            listener = await ports.listen_tcp(ios, "127.0.0.1", 7000)

    On exit the session ends and the daemon closes this client's ports (after writing
    their queued output).  If the daemon goes away, every port ends with
    ``Closed("ioserver daemon lost", "ECONNABORTED")`` within a few heartbeat intervals
    and later sends raise :exc:`~ports.BrokenPortError` (an
    :exc:`anyio.BrokenResourceError`).

    It checks for cancellation first, and a call cancelled while it waits for the daemon
    ends the session it began (trio's rule: a call that raises ``Cancelled`` leaves no
    session on ``server``).

    Args:
        endpoint: the daemon's control endpoint, ``ipc://PATH`` or ``tcp://HOST:PORT``;
            default: the daemon's default, ``ipc://<runtime dir>/control``.
        timeout: seconds to wait for the daemon's answer.
        server: a local I/O server to carry the session (its I/O thread owns the ZeroMQ
            socket); by default one is opened for this session and closed with it.
        curve_server_key: for a ``tcp://`` daemon with CURVE: the daemon's public key
            (Z85, 40 characters) or its public certificate file.
        curve_certificate: this client's secret certificate file (made with
            ``zmq.auth.create_certificates``); its public key must be in the daemon's
            allowed keys.

    Raises:
        DaemonUnavailable: no daemon answered within ``timeout`` (none is running at the
            endpoint, or it refused this client's CURVE key), or an ``ipc://`` path does
            not exist; at once, without waiting, for a stale ``ipc://`` socket file
            (nothing listens on it: its daemon died).
        UnsafeEndpointError: an ``ipc://`` endpoint another user could control: its
            directory is a symbolic link, another uid's or open to others (it must be
            0700), the socket file is a link or another uid's, or the process answering
            there runs as another uid.  Nothing but the greeting was sent.
        ioserver.OptionError: a malformed endpoint or CURVE key.
        ProtocolError: the daemon speaks another protocol version.
    """
    endpoint = endpoint or P.default_endpoint()
    if not isinstance(endpoint, str) or not endpoint.startswith(("ipc://", "tcp://")):
        raise OptionError(f"endpoint must be 'ipc://PATH' or 'tcp://HOST:PORT', not {endpoint!r}")
    if endpoint.startswith("ipc://") and not _ipc.client_check(endpoint[len("ipc://") :]):
        raise DaemonUnavailable(
            f"no ioserver daemon at {endpoint}: the socket file does not exist "
            "(start one with `ioserver serve`)",
            None,
            "ENOENT",
        )
    if endpoint.startswith("ipc://") and _ipc.is_stale(endpoint[len("ipc://") :]):
        raise DaemonUnavailable(_ipc.stale_message(endpoint), None, "ECONNREFUSED")
    if (curve_server_key is None) != (curve_certificate is None):
        raise OptionError("CURVE needs both curve_server_key and curve_certificate")
    # The checkpoint comes before the session's socket is made: a call that raises
    # Cancelled opened nothing and said nothing to the daemon (trio's rule).
    await anyio.lowlevel.checkpoint_if_cancelled()
    async with AsyncExitStack() as stack:
        local = server if server is not None else await stack.enter_async_context(ioserver.open())
        hub = local._check_open()
        io = local._io
        sock: zmq.Socket[bytes] = io.zmq_context().socket(zmq.DEALER)
        io.zmq_sockets.add(sock)
        try:
            sock.setsockopt(zmq.LINGER, 200)
            sock.setsockopt(zmq.SNDHWM, 100_000)
            sock.setsockopt(zmq.RCVHWM, 100_000)
            if curve_server_key is not None and curve_certificate is not None:
                server_public, _ = _curve_keys(curve_server_key, "curve_server_key")
                public, secret = _curve_keys(curve_certificate, "curve_certificate")
                if secret is None:
                    raise OptionError("curve_certificate must be a secret certificate file")
                sock.curve_serverkey = server_public
                sock.curve_publickey = public
                sock.curve_secretkey = secret
            try:
                sock.connect(endpoint)
            except zmq.ZMQError as exc:
                raise OptionError(f"cannot connect to {endpoint!r}: {exc}") from None
        except BaseException:
            io.zmq_sockets.discard(sock)
            sock.close(linger=0)
            raise
        remote = RemoteIO(io, sock, endpoint)
        request = _Request(io, hub)
        io.submit(remote.cmd_start, request, hub.deliver)
        result: object = None
        try:
            with anyio.move_on_after(timeout):
                result = await request.wait()
        except BaseException:
            # Cancelled while the daemon answers: the session ends here, as when it does
            # not answer in time (the socket is closed, a WELCOME on its way is dropped).
            if not local.closed:
                io.submit(remote.cmd_bye, None, None)
            raise
        if result is None or isinstance(result, BaseException):
            if not local.closed:
                io.submit(remote.cmd_bye, None, None)
            if result is None:
                raise DaemonUnavailable(
                    f"no ioserver daemon answered at {endpoint} within {timeout} s "
                    "(is one running there? a daemon with CURVE stays silent to a key it "
                    "does not allow)",
                    None,
                    "ETIMEDOUT",
                )
            raise result
        remote_server = RemoteIOServer(remote, hub, local)
        try:
            yield remote_server
        finally:
            with anyio.CancelScope(shield=True):
                await remote_server.aclose()
