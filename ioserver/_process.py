"""Process ports in the I/O thread: a program's stdin and stdout as a stream, and its exit.

As Erlang's ``open_port({spawn_executable, Path}, [exit_status, ...])``.  The program gets
one end of a ``socketpair`` as its stdin and stdout; our end is an ordinary STREAM
``Conn``, so framing, active modes, flow control, gathered writes and ``send_eof``
(``shutdown(SHUT_WR)``: the program reads end-of-file) work unchanged.  A program that
floods its stdout while its owner does not read is paused as a TCP peer is: the I/O
thread stops reading, the socket buffer fills and the program blocks in ``write``.

A :class:`ProcessWatcher` (a :class:`~._iothread.Handler`) watches the exit, with a pidfd
(``os.pidfd_open``, Linux 5.3+) in the poller, or by polling ``waitpid(WNOHANG)`` every
:data:`POLL_INTERVAL` seconds where pidfds are unavailable.  It reaps the program as soon
as it ends, so no zombie is left; and because only it reaps, the pid cannot be reused
while a signal may still be sent to it.

Theory of operation - the order of the last messages.  The port's final message is
``Closed``, and the exit status must come after the last output.  So the watcher stands
between the stream and the owner's inbox (``stream_deliver`` is the Conn's ``deliver``):
it passes everything through except ``Closed``, which it holds until the program has been
reaped; then it delivers :class:`~._messages.ExitStatus` followed by the held ``Closed``.
Either may come first: the program may exit before we read the end of its output, or
close its stdout long before it exits (a program that hands its stdout to a child that
outlives it delays both until that child closes it too).

On the native core (``ioserver._native_core``), the native I/O thread carries the stream
itself and this watcher stays in the hosted half without seeing it
(:attr:`ProcessWatcher.stream_here` is False): it delivers the exit status once the program
is reaped, and the port orders it before the stream's ``Closed`` and terminates the program
when its stream fails (``ports.ProcessPort._order_end``).

Termination.  A stream that fails (a framing error, the I/O server stopping...) or a
port closed by its owner (``cmd_terminate``) sends SIGTERM, then SIGKILL after
``kill_grace`` seconds (a timer of the I/O thread).  When the I/O thread stops, every
running program gets SIGTERM at once (:func:`stop_programs`), then each is waited for
until its own ``kill_grace`` has passed since that one moment, SIGKILLed if it still runs,
and reaped before the thread ends: N programs take one grace period, not N.  Signals go
through the watcher's pidfd where it holds one (``signal.pidfd_send_signal``), else by
pid; either way only while the program is unreaped, so its pid cannot name another
process yet.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from typing import Any

from ._conn import Conn, Handler
from ._contract import Deliver, LoopHalf
from ._iothread import IOThread
from ._messages import Closed, ExitStatus
from ._poller import READ

__all__ = ["POLL_INTERVAL", "ProcessWatcher", "cmd_start_process", "open_pidfd", "stop_programs"]

log = logging.getLogger("ioserver")

POLL_INTERVAL = 0.02  # seconds between waitpid polls when there is no pidfd
_SHUTDOWN_POLL = 0.002  # seconds between waitpid polls while the I/O thread stops


def open_pidfd(pid: int) -> int | None:
    """A pidfd for ``pid`` (readable once it exits), or ``None`` where unsupported."""
    pidfd_open: Callable[[int], int] | None = getattr(os, "pidfd_open", None)
    if pidfd_open is None:
        return None
    try:
        return pidfd_open(pid)
    except OSError as exc:  # ENOSYS (old kernel), EPERM (a sandbox)...
        log.debug("pidfd_open(%d) failed (%s): polling for the exit instead", pid, exc)
        return None


class ProcessWatcher(Handler):
    """Watches one program and orders its last messages (see the module docstring)."""

    def __init__(
        self,
        io: IOThread,
        popen: subprocess.Popen[bytes],
        pidfd: int | None,
        port: LoopHalf,
        deliver: Deliver,
        kill_grace: float,
    ) -> None:
        self.io = io
        self.popen = popen
        self.pid = popen.pid
        self.pidfd = pidfd
        # The table needs an fd: the pidfd, or without one a descriptor of /dev/null that
        # is never polled (it only makes on_shutdown reach this watcher).
        self.fd = -1
        self.port = port
        self.deliver = deliver  # the owner's inbox
        self.kill_grace = kill_grace
        self.status: int | None = None  # the exit status, once reaped
        self.held: list[Closed] = []  # the stream's final messages, until the status
        self.finished = False  # ExitStatus and the held Closed were delivered
        self.terminating = False
        self.kill_timer: list[Callable[[], None] | None] | None = None
        self.conns: list[Conn] = []  # stdout/stdin, and stderr's when it is a port
        self.mask = 0
        self.closed = False
        #: The stream's messages pass through :meth:`stream_deliver`, which holds its
        #: ``Closed`` for the exit status.  False on the native core, whose thread
        #: carries the stream: the port orders the two (``ports.ProcessPort._deliver``),
        #: and the exit status is delivered as soon as the program is reaped.
        self.stream_here = True

    # -- the stream's messages ----------------------------------------------------------
    def stream_deliver(self, item: tuple[Any, Any]) -> None:
        """The stdout Conn's ``deliver``: every message but ``Closed`` goes straight on."""
        message = item[1]
        if message.__class__ is not Closed:
            self.deliver(item)
            return
        if self.finished:
            self.deliver(item)  # a later Closed (e.g. EPIPE after eof): the port sorts it
            return
        self.held.append(message)
        if message.errno_name is not None:
            # The stream failed or the I/O thread stops: the program must go too.
            if message.errno_name == "ESHUTDOWN":
                self.on_shutdown()
            else:
                self.terminate()
        self._maybe_finish()

    def _maybe_finish(self) -> None:
        if self.status is not None and not self.stream_here and not self.finished:
            self.finished = True
            self.deliver((self.port, ExitStatus(self.status)))
            return
        if self.status is not None and self.held and not self.finished:
            self.finished = True
            self.deliver((self.port, ExitStatus(self.status)))
            for message in self.held:
                self.deliver((self.port, message))
            self.held.clear()

    # -- the exit -----------------------------------------------------------------------
    def on_ready(self, mask: int) -> None:
        # The pidfd is readable, or (without one) the poll timer asked for this call.
        if self._reap() is None and self.pidfd is None and not self.closed:
            self.io.call_later(POLL_INTERVAL, self._poll)

    def _poll(self) -> None:
        # Reap in the event phase of a round, as for a pidfd event (call_soon), so what
        # it delivers is published at the end of that same round.
        if not self.closed:
            self.io.call_soon(self)

    def _reap(self) -> int | None:
        """Collect the exit status if the program ended; return it (``None``: running)."""
        if self.status is not None:
            return self.status
        try:
            pid, wait_status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            # Someone else reaped it (a SIGCHLD handler that waits for any child...).
            log.warning("process %d was reaped by someone else: exit status unknown", self.pid)
            pid, wait_status = self.pid, 255 << 8
        if pid == 0:
            return None
        self._exited(os.waitstatus_to_exitcode(wait_status))
        return self.status

    def _exited(self, status: int) -> None:
        self.status = status
        self.popen.returncode = status  # so Popen never waits for, or warns about, it
        if self.kill_timer is not None:
            self.kill_timer[0] = None
            self.kill_timer = None
        self._release()
        self._maybe_finish()

    def _release(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.fd >= 0:
            self.io.release(self)
            os.close(self.fd)
            self.fd = -1

    # -- signals ------------------------------------------------------------------------
    def send_signal(self, number: int) -> None:
        """Send a signal unless the program was reaped (its pid may be another's now).

        Through the pidfd where the watcher holds one: it names this process and no
        other, whatever happens to the pid.
        """
        if self.status is None:
            try:
                if self.pidfd is not None and not self.closed:
                    signal.pidfd_send_signal(self.pidfd, number)
                else:
                    os.kill(self.pid, number)
            except ProcessLookupError:
                pass

    def terminate(self) -> None:
        """SIGTERM now, SIGKILL after ``kill_grace`` seconds if it still runs."""
        if self.status is not None or self.terminating:
            return
        self.terminating = True
        if self.kill_grace <= 0:
            self.send_signal(signal.SIGKILL)
            return
        self.send_signal(signal.SIGTERM)
        self.kill_timer = self.io.call_later(self.kill_grace, self._kill)

    def _kill(self) -> None:
        self.kill_timer = None
        self.send_signal(signal.SIGKILL)

    # -- commands (queued by the port) ---------------------------------------------------
    def cmd_terminate(self, _: object) -> None:
        self.terminate()

    def cmd_signal(self, number: int) -> None:
        self.send_signal(number)

    # -- the I/O thread's other calls ---------------------------------------------------
    def on_error(self, exc: Exception) -> None:
        log.error("process port of pid %d failed: %r", self.pid, exc)
        self.terminate()

    def on_shutdown(self) -> None:
        """The I/O thread stops: stop every program it runs, this one's included, at once
        (see :func:`stop_programs`); the other watchers then find theirs reaped."""
        if self.status is not None:
            return
        table = self.io._table
        watchers = [entry for entry in table if isinstance(entry, ProcessWatcher)]
        if self not in watchers:
            watchers.append(self)
        stop_programs(watchers)

    def _wait_killed(self) -> None:
        """Block until the SIGKILLed program is reaped (it cannot ignore SIGKILL)."""
        while True:
            try:
                _, wait_status = os.waitpid(self.pid, 0)
            except InterruptedError:
                continue
            except ChildProcessError:
                wait_status = 255 << 8
            break
        self._exited(os.waitstatus_to_exitcode(wait_status))


def stop_programs(watchers: list[ProcessWatcher]) -> None:
    """SIGTERM every running program now; SIGKILL each one still running ``kill_grace``
    seconds (its own) after that moment; return once all are reaped.

    One deadline per program from one start: N programs that ignore SIGTERM take the
    longest ``kill_grace``, not the sum.  Blocks the I/O thread, which is stopping.
    """
    start = time.monotonic()
    running = []
    for watcher in watchers:
        if watcher.status is None:
            watcher.send_signal(signal.SIGKILL if watcher.kill_grace <= 0 else signal.SIGTERM)
            running.append(watcher)
    while running:
        now = time.monotonic()
        waiting = []
        for watcher in running:
            if watcher._reap() is not None:
                continue
            if now >= start + watcher.kill_grace:
                watcher.send_signal(signal.SIGKILL)
                watcher._wait_killed()
                continue
            waiting.append(watcher)
        running = waiting
        if running:
            time.sleep(_SHUTDOWN_POLL)


def cmd_start_process(watcher: ProcessWatcher, _: object) -> None:
    """On the I/O thread: take the program's streams and its watcher into the table."""
    io = watcher.io
    for conn in watcher.conns:
        io.adopt(conn)
        io._stream_interest(conn)
    if watcher.pidfd is not None:
        watcher.fd = watcher.pidfd
        io.adopt(watcher)
        io._interest(watcher, READ)
    else:
        watcher.fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        io.adopt(watcher)
        io.call_soon(watcher)
    # It may have exited already (a pidfd is readable at once then; a poll just looked).


def socketpair_for_child() -> tuple[socket.socket, socket.socket]:
    """``(ours, the child's)``: ours non-blocking, the child's blocking (its own file)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ours.setblocking(False)
    return ours, theirs
