"""The native I/O core's Python half: the I/O half of the contract over ``ioserver._native``.

``ioserver.open(core="native")`` runs the I/O thread in Rust (``native/src/core.rs``): its
own OS thread that never takes the GIL.  This module is what the loop half sees of it,
shaped as the Python core's objects so that ``ports/`` runs unchanged on either:

* :class:`NativeIOThread` stands where ``IOThread`` stands (``IOServer._io``): the commands
  (``cmd_close``... are the native ``Core``'s methods, each taking ``(target, argument)``
  as the contract's ``(function, target, argument)`` commands do), ``send_command`` (the
  native ``Core.send``, which holds the ``bytes`` object instead of copying it), and the
  counters ``IOServer.statistics`` reads;
* :class:`NativeWindow` is a port's flow-control window (``ioserver._flow.Window``) whose
  counters are atomics the I/O thread reads without the GIL;
* :class:`NativeTrioHub`, :class:`NativeAsyncioHub` drain the loop's native inbox with one
  call (``Inbox.take``), which builds every ``(port, message)`` pair of the batch under
  the GIL.

What the native thread carries itself: TCP and Unix stream ports and a program's stdin and
stdout, in raw mode and in every packet mode (1, 2, 4, line, msgpack, resp: framed in Rust,
``native/src/framing.rs``; a msgpack object's wire bytes are decoded in Python, by the
loop's drain, ``Inbox.take``, and a resp command's ``list[bytes]`` is built there) -
connect (TCP to numeric addresses, names being resolved in the loop as before; Unix to a
path or an abstract name), listen and accept, reads, gathered writes, half-close, close
after the queued output within ``linger``, errno names - with the flow control of
``native/src/flow.rs`` (the Rust twin of ``ioserver._flow``): the
watermarks and the pause handshake, the active credit and held packets, ``memory_limit``
(the budget, its reserve for waiting owners, ``cmd_want``, a mailbox's cell with
``cmd_owner`` and ``cmd_want_owner``) and ``port_buffer_limit``.  The
port's socket is either kind (``native/src/sock.rs``): the rest of the thread is one code
path, on both io backends.  A listener is bound on the loop's thread and handed over
(``Core.listen``, ``Core.listen_unix``): a Unix one with the Python core's checks
(``ioserver._unix.listen_unix_socket``: a stale socket file probed and removed, anything
else at the path left alone), and the native thread removes its socket file when it
closes, if the path still names the file it bound (the rule of
``_UnixListenerSocket.close``).  The addresses a Unix port exposes are the Python core's.
A program's stdin and stdout (``ports.open_process``: our end of its socket pair) are a Unix
stream the native thread adopts (``Core.adopt_stream``, :meth:`NativeIOThread.carry_stream`);
its watcher (exit, signals, termination) stays in the hosted half, and the port itself puts
the ``ExitStatus`` before the stream's ``Closed`` (``ports.ProcessPort._order_end``), as the
watcher does where it sees both (the Python core).

Everything else runs on the same thread too, in Python: :class:`NativeIOThread` is also
an ``IOThread`` in its *hosted* mode (no thread of its own), whose rounds the native thread
runs under the GIL when its poller's fd fires or its timer is due (``native/src/hosted.rs``).
Its ports are UDP, ZeroMQ, TUN/TAP, programs' watchers and ``stderr="port"`` streams, TCP
with ``tls=``, a daemon's clients' ports, and any function submitted to the I/O thread (the
daemon's control endpoint).  Those ports have the Python core's window
(``ioserver._flow.Window``, counted in their hub), the native ports a
:class:`NativeWindow`.  The command queue routes by target: a command on a native ``Conn``
goes to the native thread, any other to the hosted half's queue.  One ``memory_limit``
bounds both halves: each budget counts what the other charges (``MemoryBudget.external``,
``Core.set_external_in_use``).
"""

from __future__ import annotations

import atexit
import os
import socket
import threading
import weakref
from collections import deque
from functools import partial
from typing import Any

from . import _native  # the extension module (types: _native.pyi)
from ._contract import ConnectRequest, ListenRequest
from ._exceptions import ConnectError, NotSupportedError, errno_name
from ._flow import Window
from ._framing import Framer
from ._hub import AsyncioHub, TrioHub, log
from ._iothread import IOThread, internal_error_reason, owner_cell_of
from ._tcp import listen_socket
from ._unix import listen_unix_socket, remove_socket_file
from ._wakeup import WakeupQueue

__all__ = [
    "CORES",
    "NATIVE_KINDS",
    "FramedNativeWindow",
    "NativeAsyncioHub",
    "NativeIOThread",
    "NativeTrioHub",
    "NativeWindow",
    "native_window",
]

#: The I/O cores :func:`ioserver.open` can run.
CORES = ("python", "native")

#: The port functions whose ports the native thread carries itself (some of their options
#: aside: see the module docstring); the others' ports are served by the hosted half.
NATIVE_KINDS = frozenset(
    {"ports.connect_tcp", "ports.listen_tcp", "ports.connect_unix", "ports.listen_unix"}
)

#: The address families whose stream ports the native thread carries.
_NATIVE_FAMILIES = (socket.AF_INET, socket.AF_INET6, socket.AF_UNIX)

_NativeConn = _native.Conn
_NativeOwnerCell = _native.OwnerCell


def _bytes(limit: int | None) -> int | None:
    """A limit as the native core takes it (a u64): one past what it could ever count
    (``flow::NO_LIMIT``, 2**62 bytes) is no limit."""
    return None if limit is None or limit >= 1 << 62 else limit


#: A raw port's flow-control window on the native core: :class:`~._flow.Window`'s
#: fields, with ``consumed_*``, ``queued_bytes`` and ``send_blocked`` kept in atomics that
#: the native I/O thread reads without the GIL (what the owner takes and queues is counted
#: for the memory budget there too), with ``resume_generation``.  It is the Rust class
#: itself (``WindowCounters``), not a Python subclass of it: the fields that are the same
#: for every raw native port are its class attributes (``framer``, ``packet_overhead``,
#: ``sizes``; ``on_pause``, ``on_gone`` - the native thread serves no daemon client;
#: ``task_waits`` answers False - it asks nothing of the loop half), so a window is 24
#: bytes, without the 16-byte GC header every instance of a Python class carries (issue
#: 14, memory per idle connection).  :func:`native_window` makes a port's window.
NativeWindow = _native.WindowCounters


class FramedNativeWindow(NativeWindow):
    """A framed port's :data:`NativeWindow`: its ``framer``, ``packet_overhead`` and
    ``sizes`` in slots.

    A framed port's packets are charged ``packet_overhead`` bytes more than their length,
    as on the Python core: the native thread hands each packet's charge to ``sizes``
    (under the GIL, in the drain) before the packet, and the port pops it as its owner
    takes the packet."""

    __slots__ = ("framer", "packet_overhead", "sizes")

    def __init__(self, framer: Framer | None = None, packet_overhead: int = 0) -> None:
        self.framer = framer
        self.packet_overhead = packet_overhead if framer is not None else 0
        # (Without an overhead a packet of bytes is charged its length; a decoded
        # object's charge is never its len(), so it always goes through sizes.)
        self.sizes = (
            deque()
            if self.packet_overhead or (framer is not None and framer.decodes_objects)
            else None
        )

    charge = Window.charge
    resume_due = Window.resume_due


def native_window(framer: Framer | None = None, packet_overhead: int = 0) -> Any:
    """A native port's window: a :data:`NativeWindow` for a raw port (``framer`` None;
    its counters start at 0, it has nothing more to set), a :class:`FramedNativeWindow`
    for a framed one."""
    if framer is None:
        return NativeWindow()
    return FramedNativeWindow(framer, packet_overhead)


class _Commands(WakeupQueue[tuple[Any, Any, Any]]):
    """The command queue of a native core, as the loop half uses it (``put``): the hosted
    half's queue (its items, wake-up fd and flag: ``ioserver._wakeup``), whose ``put``
    routes each command by its target.  A command on a native port (a native ``Conn``)
    is queued for the native thread at once by the native ``Core`` method that stands for
    it (``IOThread.cmd_close`` -> ``Core.close``...); any other goes to the hosted half."""

    def route(self, io: NativeIOThread, core: Any) -> None:
        """Take the native methods of ``core`` for ``io``'s commands."""
        self._core = core
        native = (core.close, core.send_eof, core.set_active, core.read_once, core.resume)
        self._native: dict[Any, Any] = {
            io.cmd_close: core.close,
            io.cmd_send_eof: core.send_eof,
            io.cmd_set_active: core.set_active,
            io.cmd_read_once: core.read_once,
            io.cmd_resume: core.resume,
            io.cmd_want: core.want,
            io.cmd_owner: core.owner,
            io.cmd_want_owner: core.want_owner,
            core.send: core.send,
            core.want: core.want,
            **{method: method for method in native},
        }
        self._native_send = core.send
        self._hosted_send = io.cmd_send

    def put(self, item: tuple[Any, Any, Any]) -> None:
        function, target, argument = item
        if target.__class__ is _NativeConn or target.__class__ is _NativeOwnerCell:
            native = self._native.get(function)
            if native is not None:
                native(target, argument)
                return
            # A Python function on a native port: it runs on the I/O thread too, in the
            # hosted half (an error closes the port: NativeIOThread._internal_error).
        elif function == self._native_send:  # the hub's send, for a hosted port
            item = (self._hosted_send, target, argument)
        WakeupQueue.put(self, item)

    def close(self) -> None:
        """Close both wake-up fds (the thread has ended; or the native core was never
        made, and only the hosted half's is open)."""
        super().close()
        core = getattr(self, "_core", None)
        if core is not None:
            core.close_commands()


class NativeIOThread(IOThread):
    """The native I/O thread, standing where ``IOThread`` stands (see the module docstring),
    with a memory budget of ``memory_limit`` bytes and a cap of ``port_buffer_limit`` bytes
    on a framed port's partial packet (None: no limit; ``ioserver.open`` validates them).

    ``io_backend`` (``native/src/uring.rs``): ``"epoll"``, a ``read``/``writev`` syscall per
    port; ``"io_uring"``, a round's reads and writes in one ``io_uring_enter``; ``None``,
    io_uring where the kernel allows it, else epoll (:attr:`io_uring_failure` says why).

    It is also the hosted half: an ``IOThread`` in hosted mode, whose rounds the native
    thread runs under the GIL when its poller's fd fires or its timer is due
    (``native/src/hosted.rs``).  What the native thread does not carry is served there.

    Raises:
        NotSupportedError: ``io_backend="io_uring"`` where the kernel refuses io_uring (the
            message names the errno: ``ENOSYS``, ``EPERM``, ``EOPNOTSUPP``).
    """

    native = True
    #: Makes a native port's window (``ports.Port`` calls ``window_class(framer, overhead)``).
    window_class = staticmethod(native_window)
    commands_class = _Commands
    commands: _Commands
    #: The hubs that drain a native inbox (``make_hub`` picks one per backend).
    hub_classes: tuple[type[Any], type[Any]]

    def __init__(
        self,
        *,
        memory_limit: int | None = None,
        port_buffer_limit: int | None = None,
        io_backend: str | None = None,
    ) -> None:
        super().__init__(
            poller="epoll",
            name="ioserver-io-native",
            memory_limit=memory_limit,
            port_buffer_limit=port_buffer_limit,
            hosted=True,
        )
        try:
            try:
                core = self._core = _native.Core(
                    min(self.fd_limit, 1 << 16),
                    io_backend,
                    _bytes(memory_limit),
                    _bytes(port_buffer_limit),
                )
            except OSError as exc:
                number = exc.errno or 0
                raise NotSupportedError(
                    f"io_backend='io_uring' is refused here: {errno_name(number)} "
                    f"({os.strerror(number)}); use io_backend='epoll', or None for io_uring "
                    "where the kernel allows it, else epoll"
                ) from exc
            if core.io_uring_failure is not None:
                log.debug("the native core reads and writes with epoll: %s", core.io_uring_failure)
            self.commands.route(self, core)
            #: Sends go to the native thread (``Core.send`` holds the bytes object); one
            #: for a hosted port reaches the hosted half through ``_send_hosted``.
            self.send_command = core.send
            #: Port.send's fast path: the watermark check, the count and the send in one call.
            self.send_within = core.send_within
            # One memory_limit over both halves: the hosted budget counts the native ports'
            # charges, and the native budget the hosted half's (set after each of its rounds).
            if memory_limit is not None:
                self.budget.external = core.own_memory_in_use
            core.host(self._hosted_round, self.stop_hosted, self.poller_fd(), self._send_hosted)
        except BaseException:
            IOThread.discard(self)
            raise
        # What submit() runs on the calling thread: the native opens decide there whether
        # the native thread carries the port; the stop goes to the native thread.
        self._on_caller = frozenset(
            {self.cmd_connect, self.cmd_listen, self.cmd_listen_unix, self.cmd_stop}
        )

    def _hosted_round(self) -> float | None:
        """One round of the hosted half (on the native thread, under the GIL), then tell the
        native budget what the hosted half charges now."""
        timeout = self.run_round()
        if self.memory_limit is not None:
            self._core.set_external_in_use(self.budget.own_in_use())
        return timeout

    @property
    def waits_for_flush(self) -> bool:
        """Always: the native hub's flush point sends the wakes it deferred (a daemon's
        ``waits_for_flush = False`` does not apply to it)."""
        return True

    @waits_for_flush.setter
    def waits_for_flush(self, value: bool) -> None:
        pass

    def _send_hosted(self, conn: Any, data: bytes) -> None:
        WakeupQueue.put(self.commands, (self.cmd_send, conn, data))

    # -- lifecycle ----------------------------------------------------------------------
    def start(self) -> None:
        self._core.start()
        _running.add(self)

    def stop_at_exit(self) -> None:
        """Stop the native thread and wait for it, at interpreter exit, if the server was
        never closed (its loop ended with ``ioserver.open``'s block still open: an abandoned
        context, a ``loop.run_until_complete`` that raised).  The thread must end while the
        interpreter can still run its hosted half's stop: a native thread that takes the GIL
        after finalization began aborts the process (a Python ``daemon`` thread is simply
        never resumed; a native one holds no such promise).  The ports close; their owners'
        loops are gone and see nothing."""
        if self._core.is_alive():
            self._core.stop(None, None)
            self._core.join()  # without the GIL: the hosted half's stop takes it

    def join(self, timeout: float | None = None) -> None:
        self._core.join()

    def is_alive(self) -> bool:
        return bool(self._core.is_alive())

    def discard(self) -> None:
        """Release a core that was never started (the command queue's ``close`` closes
        both wake-up fds)."""
        IOThread.discard(self)

    @property
    def thread_id(self) -> int:
        """The native I/O thread's OS id (``threading.get_native_id()`` there; 0 before
        it runs): hosted handlers run on it."""
        return int(self._core.thread_id)

    def make_inbox(self, hub: Any) -> Any:
        """The native inbox of a new hub (the hub gets the stop notice)."""
        return self._core.new_inbox(hub)

    def submit(self, function: Any, target: object, argument: object) -> None:
        """Queue ``function(target, argument)`` for the I/O thread: a command on a native
        port for the native thread, anything else (a hosted port's command, a Python
        function: the daemon's control endpoint, ZeroMQ and UDP opens...) for the hosted
        half, which runs it on the native thread too."""
        if target.__class__ is _NativeConn:
            self.commands.put((function, target, argument))
        elif function in self._on_caller:
            function(target, argument)
        else:
            WakeupQueue.put(self.commands, (function, target, argument))

    def cmd_stop(self, target: object, argument: object) -> None:
        """Stop the native thread: it stops the hosted half (its ports closed), closes its
        own ports, then gives each hub its stop notice."""
        self._core.stop(target, argument)

    # -- open requests (on the loop's thread: they queue a native command) --------------
    def _host_open(self, command: Any, request: Any, spec: Any) -> None:
        """Open a port on the hosted half: at once if called on the I/O thread (a
        daemon's open, from its control endpoint), else through its command queue."""
        if threading.get_native_id() == self._core.thread_id:
            command(request, spec)
        else:
            WakeupQueue.put(self.commands, (command, request, spec))

    @staticmethod
    def _native_request(request: Any) -> bool:
        """Whether ``request`` waits in a loop of this core (not a daemon's client's)."""
        return isinstance(getattr(request, "hub", None), _NativeDrain)

    def cmd_connect(self, request: Any, spec: ConnectRequest) -> None:
        window = spec.port._window
        if (
            spec.tls is not None
            or not isinstance(window, NativeWindow)
            or spec.family not in _NATIVE_FAMILIES
            or not self._native_request(request)
        ):
            # TLS, a daemon's client's: the hosted half's.
            self._host_open(partial(IOThread.cmd_connect, self), request, spec)
            return
        address = spec.address
        if spec.family == socket.AF_UNIX:
            assert isinstance(address, (str, bytes))
            self._core.connect_unix(
                request,
                spec.port,
                window,
                request.hub.inbox,
                os.fsencode(address),
                address,
                spec.options,
                spec.active,
            )
            return
        if spec.family == socket.AF_INET:
            host, port = address
            flowinfo = scope_id = 0
        else:
            host, port, flowinfo, scope_id = address
        self._core.connect(
            request,
            spec.port,
            window,
            request.hub.inbox,
            host,
            port,
            flowinfo,
            scope_id,
            spec.options,
            spec.active,
        )

    def cmd_listen(self, request: Any, spec: ListenRequest) -> None:
        if (
            spec.tls is not None
            or spec.family not in (socket.AF_INET, socket.AF_INET6)
            or not self._native_request(request)
        ):
            self._host_open(partial(IOThread.cmd_listen, self), request, spec)
            return
        try:
            sock = listen_socket(spec.family, spec.address, spec.options)
        except ConnectError as exc:
            request._deliver(exc)
            return
        try:
            self._core.listen(
                request,
                spec.port,
                spec.make_port,
                request.hub.inbox,
                sock,  # detached by the native core: it owns the fd from here
                spec.options,
                spec.options["active"],
            )
        except BaseException:
            sock.close()  # refused before the detach (after it, a no-op)
            raise

    def cmd_listen_unix(self, request: Any, spec: ListenRequest) -> None:
        """Listen on a Unix path: bound here, on the loop's thread, with the Python core's
        checks (a stale socket file probed and removed, anything else at the path left
        alone: ``ioserver._unix.listen_unix_socket``), then served by the native thread,
        which removes the socket file when the listener closes (if the path still names
        it).  A daemon's open goes to the hosted half."""
        if not self._native_request(request):
            self._host_open(partial(IOThread.cmd_listen_unix, self), request, spec)
            return
        path = spec.address
        assert isinstance(path, (str, bytes))
        try:
            sock, file = listen_unix_socket(path, spec.options.get("backlog", 1024))
        except ConnectError as exc:
            request._deliver(exc)
            return
        try:
            self._core.listen_unix(
                request,
                spec.port,
                spec.make_port,
                request.hub.inbox,
                sock,  # detached by the native core: it owns the fd (and the file) from here
                path,
                file,
                spec.options,
                spec.options["active"],
            )
        except BaseException:
            if sock.fileno() != -1:  # refused before the detach: the file is still ours
                sock.close()
                if file is not None:
                    remove_socket_file(path, file[1])
            raise

    def carry_stream(
        self,
        request: Any,
        port: Any,
        sock: socket.socket,
        given: object,
        options: Any,
        active: tuple[int, bool],
    ) -> bool:
        """Have the native thread carry the connected Unix stream ``sock`` (our end of a
        program's stdin and stdout: ``ports.open_process``) as ``port``'s stream, and
        answer ``request`` with ``(conn, "", "")``: True if it took it (the socket is then
        detached, the native core's), False if the hosted half must serve it (a daemon's
        port)."""
        window = port._window
        if not isinstance(window, NativeWindow) or not self._native_request(request):
            return False
        self._core.adopt_stream(
            request, port, window, request.hub.inbox, sock, given, options, active
        )
        return True

    def owner_cell(self, conn: object, cells: dict[int, tuple[Any, Any]]) -> Any:
        """The cell, in ``conn``'s I/O half, of the mailbox whose cells are ``cells``: for
        a native port the native thread's (``_native.OwnerCell``: atomics the thread reads
        without the GIL), else the hosted half's (``IOThread.owner_cell``)."""
        if conn.__class__ is not _NativeConn:
            return IOThread.owner_cell(self, conn, cells)
        return owner_cell_of(cells, id(self._core), self, _native.OwnerCell)

    def _internal_error(self, conn: object, exc: Exception) -> None:
        """An error while serving one port: close that port only - a native one through
        the native thread (its owner gets ``Closed("internal error: ...", "EIO")``)."""
        if conn.__class__ is _NativeConn:
            self.internal_errors += 1
            log.error("error while serving a port; closing it", exc_info=exc)
            self._core.abort(conn, internal_error_reason(exc))
            return
        IOThread._internal_error(self, conn, exc)

    # -- statistics ---------------------------------------------------------------------
    def memory_in_use(self) -> int:
        """Bytes charged to the memory budget now, both halves: the hosted half's (its
        budget's own count: its ports' input and the output their owners queued, counted
        in the hubs) and the native ports' (``flow::Charges``: input delivered and not
        taken, framing and held packets, output queued and not written, and the written
        buffers the native thread holds until a loop drops them)."""
        return self.budget.own_in_use() + int(self._core.own_memory_in_use())

    def budget_counters(self) -> tuple[int, int, int]:
        """Both budgets' statistics: the most bytes in use either saw at the start of a
        round, the reads either paused because the memory was used up, and the reads made
        into the reserve for waiting owners, ever."""
        core, budget = self._core, self.budget
        return (
            max(budget.peak, int(core.peak_memory)),
            budget.pauses + int(core.global_pauses),
            budget.reserve_reads + int(core.reserve_reads),
        )

    def counters(self) -> dict[str, int]:
        """Both halves' counters, added up (see ``IOThread.counters``)."""
        counters = IOThread.counters(self)
        core = self._core
        for name, native in (
            ("ports_open", core.ports_open),
            ("polls", core.polls),
            ("events", core.events),
            ("commands_run", core.commands_run),
            ("bytes_in", core.bytes_in),
            ("bytes_out", core.bytes_out),
            ("internal_errors", core.internal_errors),
            ("linger_timeouts", core.linger_timeouts),
            ("budget_failed_ports", core.budget_failed_ports),
            ("wakes_sent", core.wakes_sent),
            ("wakes_skipped", core.wakes_skipped),
        ):
            counters[name] += int(native)
        return counters

    @property
    def failure(self) -> str | None:
        """Why the native thread failed (a panic in it, contained), or None."""
        failure: str | None = self._core.failure
        return failure

    @property
    def io_backend(self) -> str:
        """How the reads and writes reach the kernel now: ``"epoll"`` or ``"io_uring"``."""
        return str(self._core.backend)

    @property
    def io_uring_failure(self) -> str | None:
        """Why io_uring is not used where it was wanted (the kernel refused it, so the
        default fell back to epoll; or an ``io_uring_enter`` failed and the thread went on
        with epoll), or None."""
        failure: str | None = self._core.io_uring_failure
        return failure

    @property
    def io_uring_enters(self) -> int:
        return int(self._core.uring_enters)

    @property
    def io_uring_submissions(self) -> int:
        return int(self._core.uring_submissions)


class _NativeDrain:
    """A hub's drain of a native inbox: one native call builds the batch's pairs.

    From the drain to the hub's flush point (once the tasks the batch woke have run: see
    ``Hub._flush``), the sends made on this thread queue their commands without waking the
    native I/O thread; the flush point wakes it once, if it sleeps (the deferred wake of
    ``native/wakeup/``).  So a batch of replies costs one wake, not one per reply.
    """

    inbox: Any
    messages: int
    drains: int
    retry_after: float | None
    flushes: int
    _flush_pending: bool

    def _flush(self) -> None:
        self._flush_pending = False
        _native.Core.flush_wakes()
        self.flushes += 1

    def _drain(self) -> int:
        _native.Core.defer_wakes()
        try:
            pairs = self.inbox.take()
        except BaseException:
            # A KeyboardInterrupt in a decode's Python call (the inbox carries the batch
            # to the next take): no flush point follows, so send the deferred wakes now.
            _native.Core.flush_wakes()
            raise
        for target, message in pairs:
            try:
                target._deliver(message)
            except Exception:  # a bug in one target must not stop delivery to the others
                log.exception("error while delivering %r to %r", message, target)
        count = len(pairs)
        self.messages += count
        self.drains += 1
        # Events postponed (a MemoryError: the inbox counted it once in internal_errors):
        # the next drain after a short wait or the next wake, not at once; and a drain
        # that postponed them all was not a spurious wake.
        postponed = self.inbox.postponed
        self.retry_after = POSTPONED_RETRY if postponed else None
        if not count:
            if not postponed:
                self.inbox.spurious_wakes += 1
            _native.Core.flush_wakes()  # no flush point follows an empty drain
        return count


#: Seconds a hub whose inbox postponed events (a ``MemoryError`` while it moved the hosted
#: half's messages to the loop) waits, unless a wake comes first, before it takes again.
POSTPONED_RETRY = 0.01


class NativeTrioHub(_NativeDrain, TrioHub):
    """The trio hub of a native core."""


class NativeAsyncioHub(_NativeDrain, AsyncioHub):
    """The asyncio hub of a native core."""

    async def start(self, start_soon: Any) -> None:
        import asyncio

        self._loop = self.loop = asyncio.get_running_loop()
        self._loop.add_reader(self.inbox.fileno(), self._on_readable)
        # The reader is registered: announce the sleep (or drain what came already).
        if not self.inbox.prepare_to_sleep():
            self._loop.call_soon(self._on_readable)


NativeIOThread.hub_classes = (NativeTrioHub, NativeAsyncioHub)


#: The native I/O threads started and not yet collected (:meth:`NativeIOThread.stop_at_exit`).
_running: weakref.WeakSet[NativeIOThread] = weakref.WeakSet()


@atexit.register
def _stop_native_threads() -> None:
    """At interpreter exit, before finalization: stop each native I/O thread still running."""
    for io in list(_running):
        io.stop_at_exit()
