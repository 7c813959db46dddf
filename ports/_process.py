"""Process ports: a program's stdin and stdout as a port, and its exit status as a message.

As Erlang's ``open_port({spawn_executable, Path}, [{args, Args}, {packet, N},
exit_status])``: the program runs from an argv list (never through a shell), what it
writes to stdout arrives as :class:`~ioserver.Data` (framed by the ``packet`` option), what
the port sends is its stdin, and when it ends an :class:`~ioserver.ExitStatus` arrives
after its last output, just before the final :class:`~ioserver.Closed`.  The I/O thread's
half is :mod:`ioserver._process`.
"""

from __future__ import annotations

import math
import os
import socket
import subprocess
from collections.abc import Mapping, Sequence
from typing import Literal, Unpack

import anyio

from ioserver._conn import STREAM, Conn
from ioserver._contract import ProcessControl, ProcessRequest, RemoteOpens
from ioserver._exceptions import (
    ClosedPortError,
    ConnectError,
    NotSupportedError,
    OptionError,
    PollerLimitError,
    errno_name,
)
from ioserver._messages import Closed, ExitStatus
from ioserver._options import PortOptions, StreamOptions, unix_options
from ioserver._process import ProcessWatcher, cmd_start_process, open_pidfd, socketpair_for_child
from ioserver._server import IOServer

from ._port import Port, _opened, _Request

__all__ = ["ProcessPort", "open_process"]

Stderr = Literal["inherit", "devnull", "stdout", "port"]

#: Seconds between SIGTERM and SIGKILL when a process port closes, by default.
KILL_GRACE = 2.0


class ProcessPort(Port):
    """A :class:`~ports.Port` whose peer is a program (see :func:`open_process`).

    Everything a :class:`~ports.Port` does works: ``send`` writes to the program's stdin,
    ``receive`` gives its stdout, ``send_eof`` closes its stdin, active modes and flow
    control apply.  In addition its messages end with :class:`~ioserver.ExitStatus`
    before the final :class:`~ioserver.Closed`, and it has :attr:`pid`,
    :attr:`exit_status`, :attr:`stderr`, :meth:`terminate` and :meth:`send_signal`.
    Closing it (or its owner ending) terminates the program.
    """

    __slots__ = ("_argv", "_exit_status", "_held_end", "_orders", "_stderr_port", "_watcher")

    def __init__(
        self,
        server: IOServer,
        active: tuple[int, bool],
        options: StreamOptions,
        native: bool = False,
    ) -> None:
        super().__init__(server, active, options, native)
        self._argv: tuple[str | bytes, ...] = ()
        self._exit_status: int | None = None
        self._stderr_port: Port | None = None
        self._watcher: ProcessControl | None = None
        #: The port orders its last messages itself (the native core carries its stream
        #: apart from the watcher): ``ExitStatus`` before the stream's ``Closed``.
        self._orders = False
        #: What of the two came first, held for the other: the ``ExitStatus``, or the
        #: stream's ``Closed`` messages (a second one may follow the first: ``EPIPE``
        #: after ``eof``...).
        self._held_end: list[Closed | ExitStatus] = []

    def _deliver(self, message: object) -> None:
        cls = message.__class__
        if self._orders and (cls is ExitStatus or cls is Closed):
            self._order_end(message)  # type: ignore[arg-type]
            return
        if cls is ExitStatus:
            self._exit_status = message.status  # type: ignore[attr-defined]
        super()._deliver(message)

    def _order_end(self, message: Closed | ExitStatus) -> None:
        """The native core's stream and the watcher end apart: deliver ``ExitStatus``,
        then the stream's ``Closed``, whichever comes first - as ``ProcessWatcher`` orders
        them on the Python core, where it sees both.  A stream that fails terminates the
        program, as there."""
        held = self._held_end
        if isinstance(message, ExitStatus):
            if not held:
                held.append(message)  # the output is not over yet: wait for its end
                return
            ends = [message, *held]
        elif held and isinstance(held[0], ExitStatus):
            ends = [*held, message]
        else:
            name = message.errno_name
            if not held and name not in (None, "ESHUTDOWN") and self._watcher is not None:
                # The stream failed: the program must go too.
                watcher = self._watcher
                self._submit((type(watcher).cmd_terminate, watcher, None))
            held.append(message)
            if name != "ESHUTDOWN":
                return
            # The server stops: its hosted half (the watcher) stopped first, and the exit
            # status it had is delivered already; nothing else follows.
            ends = list(held)
        self._orders = False
        self._held_end = []
        for end in ends:
            self._deliver(end)

    @property
    def pid(self) -> int:
        """The program's process id (do not signal it yourself: use :meth:`send_signal`,
        which cannot hit another process that reused the id after the exit)."""
        assert self._watcher is not None
        return self._watcher.pid

    @property
    def argv(self) -> tuple[str | bytes, ...]:
        """The program and its arguments, as started."""
        return self._argv

    @property
    def exit_status(self) -> int | None:
        """The exit status once :class:`~ioserver.ExitStatus` was delivered to this port
        (its code, or ``-N`` for signal N), else ``None``."""
        return self._exit_status

    @property
    def stderr(self) -> Port | None:
        """With ``stderr="port"``: the port of the program's stderr (receive only: it
        was opened with its sending side shut), else ``None``."""
        return self._stderr_port

    def send_signal(self, number: int) -> None:
        """Send signal ``number`` to the program, unless it has already been reaped.

        Raises:
            ClosedPortError: the port is closed.
        """
        if self._closed:
            raise ClosedPortError("this port is closed")
        watcher = self._watcher  # its class's command: a daemon's client has its own
        assert watcher is not None
        self._submit((type(watcher).cmd_signal, watcher, int(number)))

    def terminate(self) -> None:
        """Ask the program to end: SIGTERM now, SIGKILL after ``kill_grace`` seconds.

        The port stays open, so its :class:`~ioserver.ExitStatus` (``-15`` or ``-9``
        unless the program handled SIGTERM) and final :class:`~ioserver.Closed` arrive.

        Raises:
            ClosedPortError: the port is closed.
        """
        if self._closed:
            raise ClosedPortError("this port is closed")
        watcher = self._watcher
        assert watcher is not None
        self._submit((type(watcher).cmd_terminate, watcher, None))

    def close_nowait(self) -> None:
        """Close the port and terminate the program (SIGTERM, then SIGKILL after
        ``kill_grace`` seconds); the I/O thread reaps it.  Idempotent."""
        if self._closed:
            return
        super().close_nowait()
        watcher = self._watcher
        if watcher is not None:
            self._submit((type(watcher).cmd_terminate, watcher, None))
        if self._stderr_port is not None:
            self._stderr_port.close_nowait()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "ended" if self._ended else "open"
        pid = self._watcher.pid if self._watcher is not None else None
        return f"<ProcessPort pid={pid} {self._argv!r} {state}>"


def _check_argv(argv: object) -> tuple[str | bytes, ...]:
    if isinstance(argv, (str, bytes)):
        raise OptionError(
            "argv is a list of arguments, not a shell command line: write "
            f"[{argv!r}] for a program without arguments, or shlex.split(...) a command"
        )
    if not isinstance(argv, Sequence) or not argv:
        raise OptionError(f"argv must be a non-empty list of arguments, not {argv!r}")
    checked: list[str | bytes] = []
    for index, argument in enumerate(argv):
        if isinstance(argument, os.PathLike):
            argument = os.fspath(argument)
        if not isinstance(argument, (str, bytes)):
            raise OptionError(f"argv[{index}] must be a str, bytes or path, not {argument!r}")
        if (b"\0" in argument) if isinstance(argument, bytes) else ("\0" in argument):
            raise OptionError(f"argv[{index}] contains a NUL character")
        checked.append(argument)
    if not checked[0]:
        raise OptionError("argv[0], the program, is empty")
    return tuple(checked)


def _check_env(env: object) -> dict[str, str] | None:
    if env is None:
        return None
    if not isinstance(env, Mapping):
        raise OptionError(f"env must be a mapping of str to str, or None, not {env!r}")
    for key, value in env.items():
        if not isinstance(key, str) or not isinstance(value, str) or "=" in key or not key:
            raise OptionError(f"env entries are str names (without '=') to str: {key!r}")
    return dict(env)


async def open_process(
    server: IOServer,
    argv: Sequence[str | bytes | os.PathLike[str]],
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    stderr: Stderr = "inherit",
    kill_grace: float = KILL_GRACE,
    **options: Unpack[PortOptions],
) -> ProcessPort:
    """Start a program; return a :class:`ProcessPort` on its stdin and stdout.

    As Erlang's ``open_port({spawn_executable, Path}, [{args, Args}, exit_status,
    {packet, N}...])``.  The program is started directly from ``argv`` (no shell, so no
    quoting problems and no injection); ``argv[0]`` is looked up in ``PATH`` unless it
    contains a slash.  Its stdin and stdout are one end of a Unix socket pair, the port's
    byte stream: every :class:`~ports.PortOptions` option applies (except ``nodelay`` and
    ``keepalive``), e.g. ``packet="line"`` for a line-based program.  Messages: its output
    as :class:`~ioserver.Data`, then :class:`~ioserver.ExitStatus` (exit code, or ``-N``
    for signal N), then :class:`~ioserver.Closed` - ``"eof"`` normally; the exit status
    waits until the program's stdout reached end-of-file, so it follows all the output.

    A program that writes faster than its owner reads is paused by flow control (the
    socket buffer fills and it blocks in ``write``), as a TCP peer is.  ``send_eof()``
    closes its stdin.  Closing the port, its owner ending, or the I/O server stopping
    terminates the program: SIGTERM, then SIGKILL after ``kill_grace`` seconds; it is
    always reaped (no zombie).  When the I/O server stops, every program gets SIGTERM at
    once and its ``kill_grace`` from that moment: the stop waits the longest grace, not
    their sum.

    It checks for cancellation before it acts: a call that raises ``Cancelled`` at once
    started no program (trio's rule).

    Args:
        server: the I/O server (from :func:`ioserver.open`).
        argv: the program and its arguments: a list of str, bytes or paths, never one
            shell string.
        env: the program's whole environment; ``None`` (default) inherits ours.
        cwd: its working directory; ``None`` inherits ours.
        stderr: ``"inherit"`` (default: our stderr), ``"devnull"``, ``"stdout"`` (merged
            into the port's stream) or ``"port"`` (a second, receive-only port, raw bytes,
            available as :attr:`ProcessPort.stderr`; closed with the main port).
        kill_grace: seconds between SIGTERM and SIGKILL when the program is terminated
            (0: SIGKILL at once).
        options: the port's options, see :class:`~ports.PortOptions`.

    Returns:
        The open :class:`ProcessPort`; the program is running.

    Raises:
        ConnectError: the program could not be started: not found (``"ENOENT"``), not
            executable (``"EACCES"``), a missing ``cwd``...  It is an :exc:`OSError`.
        OptionError: ``argv`` is a string, empty or holds a non-string; a wrong ``env``,
            ``stderr`` or ``kill_grace``; an unknown option or a wrong value.
        ClosedPortError: the I/O server is closed.
        NotSupportedError: through a daemon (:func:`client.connect`), ``env``, ``cwd``
            or ``stderr="port"`` (the program runs as the daemon's child: argv only).
        client.ProtocolError: through a daemon that was not started with
            ``--allow-process`` (``kind`` ``"forbidden"``).
    """
    server._check_open("ports.open_process")
    arguments = _check_argv(argv)
    environment = _check_env(env)
    if cwd is not None and not isinstance(cwd, (str, bytes, os.PathLike)):
        raise OptionError(f"cwd must be a path or None, not {cwd!r}")
    if stderr not in ("inherit", "devnull", "stdout", "port"):
        raise OptionError(
            f"stderr must be 'inherit', 'devnull', 'stdout' or 'port', not {stderr!r}"
        )
    if (
        isinstance(kill_grace, bool)
        or not isinstance(kill_grace, (int, float))
        or not math.isfinite(kill_grace)
        or kill_grace < 0
    ):
        raise OptionError(f"kill_grace must be non-negative seconds, not {kill_grace!r}")
    credit, settings = unix_options(dict(options), "a process port")
    # The checkpoint comes before the program starts: a call that raises Cancelled ran
    # nothing (trio's rule).
    await anyio.lowlevel.checkpoint_if_cancelled()
    io = server._io
    # The native core's thread carries the stream itself (its hosted half the watcher).
    port = ProcessPort(server, credit, settings, native=getattr(io, "native", False))
    port._argv = arguments
    if isinstance(io, RemoteOpens):
        # Through a daemon: the program is the daemon's child; argv is all it carries.
        if environment is not None or cwd is not None or stderr == "port":
            raise NotSupportedError(
                "a program started through an ioserver daemon takes argv only: no env, "
                'no cwd, no stderr="port" (it runs as the daemon\'s child, in its '
                "environment and directory)"
            )
        request = _Request(io, server._hub)
        io.submit(
            io.cmd_open_process,
            request,
            ProcessRequest(
                port, server._hub.deliver, arguments, stderr, float(kill_grace), settings, credit
            ),
        )
        # Cancelled, the daemon's program is terminated as its port closes (by the
        # request), and the abandoned port is closed.
        result = await _opened(request, port)
        port._conn, port._watcher = result
        port._local_address = ""
        return port
    stderr_port: Port | None = None
    if stderr == "port":
        raw: StreamOptions = {**settings, "packet": "raw"}
        stderr_port = Port(server, credit, raw)

    ours, theirs = socketpair_for_child()
    error_ours: socket.socket | None = None
    error_theirs: socket.socket | None = None
    try:
        for size, level in (
            (settings["recbuf"], socket.SO_RCVBUF),
            (settings["sndbuf"], socket.SO_SNDBUF),
        ):
            if size:
                ours.setsockopt(socket.SOL_SOCKET, level, size)
        # Before the program starts: a poller that cannot watch these descriptors
        # (select's FD_SETSIZE) refuses the port here, with nothing to undo.
        server._io.check_fd(ours.fileno())
        child_stderr: int | None = None
        if stderr == "devnull":
            child_stderr = subprocess.DEVNULL
        elif stderr == "stdout":
            child_stderr = theirs.fileno()
        elif stderr == "port":
            error_ours, error_theirs = socketpair_for_child()
            server._io.check_fd(error_ours.fileno())
            child_stderr = error_theirs.fileno()
        try:
            # Forks in this thread, as asyncio's subprocess support does (vfork: fast); it
            # waits only for the exec to succeed or fail, never for the program.
            popen = subprocess.Popen(  # noqa: ASYNC220
                arguments,
                stdin=theirs.fileno(),
                stdout=theirs.fileno(),
                stderr=child_stderr,
                env=environment,
                cwd=cwd,
                close_fds=True,
            )
        except OSError as exc:
            name = errno_name(exc.errno)
            raise ConnectError(
                f"cannot start {arguments[0]!r}: {exc.strerror or exc} ({name})",
                exc.errno,
                name,
            ) from None
    except BaseException:
        ours.close()
        if error_ours is not None:
            error_ours.close()
        raise
    finally:
        theirs.close()  # the program has its copies
        if error_theirs is not None:
            error_theirs.close()

    # Built here, handed to the I/O thread by cmd_start_process before any command that
    # uses them (the command queue is FIFO): no syscall is made on the sockets meanwhile.
    hub = server._hub
    pidfd = open_pidfd(popen.pid)
    if pidfd is not None:
        try:
            io.check_fd(pidfd)
        except PollerLimitError:
            # The program started: stop it and wait for it (it has just been exec'd).
            os.close(pidfd)
            popen.kill()
            popen.wait()
            ours.close()
            if error_ours is not None:
                error_ours.close()
            raise
    watcher = ProcessWatcher(io, popen, pidfd, port, hub.deliver, kill_grace)
    port._watcher = watcher
    port._local_address = ""
    port._remote_address = None
    request = _Request(io, hub)
    try:
        carried = io.carry_stream(request, port, ours, arguments[0], settings, credit)
    except BaseException:
        # (A socket the native core refused: not ours to serve either.)  The program
        # started: stop it and wait for it (it has just been exec'd).
        popen.kill()
        popen.wait()
        if pidfd is not None:
            os.close(pidfd)
        ours.close()
        if error_ours is not None:
            error_ours.close()
        raise
    if carried:
        # The native thread carries the stream (it answers the request with its conn);
        # the watcher stays in the hosted half, and the port orders the last messages.
        watcher.stream_here = False
        port._orders = True
    else:
        conn = Conn(ours, STREAM, port, watcher.stream_deliver)
        conn.configure(settings, port._window)
        conn.credit, conn.notify_passive = credit
        watcher.conns.append(conn)
        port._conn = conn
    if stderr_port is not None and error_ours is not None:
        error_conn = Conn(error_ours, STREAM, stderr_port, hub.deliver)
        error_conn.configure(settings, stderr_port._window)
        error_conn.credit, error_conn.notify_passive = credit
        watcher.conns.append(error_conn)
        stderr_port._conn = error_conn
        stderr_port._local_address = ""
        port._stderr_port = stderr_port
    io.submit(cmd_start_process, watcher, None)
    if carried:
        try:
            result = await request.wait()
        except BaseException:
            # Cancelled: the program goes, as when its port closes (its stream is closed
            # by the request's late answer).
            io.submit(ProcessWatcher.cmd_terminate, watcher, None)
            if stderr_port is not None:
                stderr_port.close_nowait()
            raise
        if isinstance(result, BaseException):
            io.submit(ProcessWatcher.cmd_terminate, watcher, None)
            if stderr_port is not None:
                stderr_port.close_nowait()
            raise result
        port._conn = result[0]
    if stderr_port is not None:
        # Receive only: the program's stderr is one-way.  (Not awaited: a cancellation
        # delivered here would leave the program running with its port owned by nobody.)
        stderr_port._send_eof_nowait()
    return port
