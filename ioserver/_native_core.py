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

What the native core carries now (issue 14's first slice): TCP ports in raw mode and in the
packet modes whose packets are bytes (1, 2, 4, line: framed in Rust, ``native/src/framing.rs``)
- connect
(numeric addresses; names are resolved in the loop as before), listen and accept, reads,
gathered writes, half-close, close after the queued output within ``linger``, errno names -
with the flow control of ``native/src/flow.rs`` (the Rust twin of ``ioserver._flow``): the
watermarks and the pause handshake, the active credit and held packets, ``memory_limit``
(the budget, its reserve for waiting owners, ``cmd_want``) and ``port_buffer_limit``.
Every other kind and the packet modes that decode objects (msgpack, resp) raise
:exc:`~ioserver.NotSupportedError` naming the core; ``core="python"`` (the default)
carries them.
"""

from __future__ import annotations

import os
import socket
from collections import deque
from collections.abc import Mapping
from typing import Any

from . import _native  # the extension module (types: _native.pyi)
from ._contract import ConnectRequest, ListenRequest
from ._exceptions import ConnectError, NotSupportedError, errno_name
from ._flow import Window
from ._framing import Framer, port_framer
from ._hub import AsyncioHub, TrioHub, log
from ._iothread import raise_open_file_limit
from ._tcp import listen_socket

__all__ = [
    "CORES",
    "NATIVE_KINDS",
    "NativeAsyncioHub",
    "NativeIOThread",
    "NativeTrioHub",
    "NativeWindow",
]

#: The I/O cores :func:`ioserver.open` can run.
CORES = ("python", "native")

#: The port functions the native core carries; the others raise NotSupportedError.
NATIVE_KINDS = frozenset({"ports.connect_tcp", "ports.listen_tcp"})


def _bytes(limit: int | None) -> int | None:
    """A limit as the native core takes it (a u64): one past what it could ever count
    (``flow::NO_LIMIT``, 2**62 bytes) is no limit."""
    return None if limit is None or limit >= 1 << 62 else limit


def _nobody_waits() -> bool:
    return False


def _framed_error(options: Mapping[str, Any]) -> NotSupportedError:
    return NotSupportedError(
        f"packet={options.get('packet')!r} is not supported by the native core "
        "(core='native') yet: use packet='raw' or core='python'"
    )


class NativeWindow(_native.WindowCounters):
    """A port's flow-control window on the native core: :class:`~._flow.Window`'s fields,
    with ``consumed_*``, ``queued_bytes`` and ``send_blocked`` kept in atomics that the
    native I/O thread reads without the GIL (``WindowCounters``, in Rust; what the owner
    takes and queues is counted for the memory budget there too), with
    ``resume_generation``.  ``framer``, ``packet_overhead`` and ``sizes`` are the loop
    half's own, in slots (no ``__dict__``); the fields that are the same for every native
    port are class attributes: the native thread asks nothing of the loop half
    (``task_waits``) and serves no daemon client (``on_pause``, ``on_gone``).

    A framed port's packets are charged ``packet_overhead`` bytes more than their length,
    as on the Python core: the native thread hands each packet's charge to ``sizes``
    (under the GIL, in the drain) before the packet, and the port pops it as its owner
    takes the packet."""

    __slots__ = ("framer", "packet_overhead", "sizes")

    on_pause = None
    on_gone = None
    task_waits = staticmethod(_nobody_waits)

    def __init__(self, framer: Framer | None = None, packet_overhead: int = 0) -> None:
        self.consumed_bytes = 0
        self.consumed_messages = 0
        self.resume_generation = 0
        self.framer = framer
        self.packet_overhead = packet_overhead if framer is not None else 0
        self.sizes: deque[int] | None = deque() if self.packet_overhead else None
        self.queued_bytes = 0
        self.send_blocked = False

    charge = Window.charge
    resume_due = Window.resume_due


class _Budget:
    """The native core's memory budget as the Python core's :class:`~._flow.MemoryBudget`
    is read: its statistics (kept by the native thread's ``flow::Budget``) and the hubs
    that get the thread's stop notice (``owners``; what their ports queue and take is
    counted in the native windows, not here)."""

    def __init__(self, core: Any, limit: int | None) -> None:
        self._core = core
        self.limit = limit
        self.owners: list[Any] = []

    @property
    def peak(self) -> int:
        """The most bytes in use at the start of a round (measured with a limit only)."""
        return int(self._core.peak_memory)

    @property
    def pauses(self) -> int:
        """Reads paused because the budget was used up, ever."""
        return int(self._core.global_pauses)

    @property
    def reserve_reads(self) -> int:
        """Reads made into the reserve for waiting owners, ever."""
        return int(self._core.reserve_reads)


class _Commands:
    """The contract's command queue, as the loop half uses it (``put``): each command is
    ``(function, target, argument)``, and ``function`` is a native ``Core`` method that
    queues it for the I/O thread."""

    __slots__ = ("_core",)

    def __init__(self, core: Any) -> None:
        self._core = core

    def put(self, item: tuple[Any, Any, Any]) -> None:
        function, target, argument = item
        function(target, argument)

    @property
    def wakes_sent(self) -> int:
        return int(self._core.wakes_sent)

    @property
    def wakes_skipped(self) -> int:
        return int(self._core.wakes_skipped)

    def close(self) -> None:
        """Close the wake-up fd (the thread has ended)."""
        self._core.close_commands()


class NativeIOThread:
    """The native I/O thread, standing where ``IOThread`` stands (see the module docstring),
    with a memory budget of ``memory_limit`` bytes and a cap of ``port_buffer_limit`` bytes
    on a framed port's partial packet (None: no limit; ``ioserver.open`` validates them).

    ``io_backend`` (``native/src/uring.rs``): ``"epoll"``, a ``read``/``writev`` syscall per
    port; ``"io_uring"``, a round's reads and writes in one ``io_uring_enter``; ``None``,
    io_uring where the kernel allows it, else epoll (:attr:`io_uring_failure` says why).

    Raises:
        NotSupportedError: ``io_backend="io_uring"`` where the kernel refuses io_uring (the
            message names the errno: ``ENOSYS``, ``EPERM``, ``EOPNOTSUPP``).
    """

    native = True
    window_class = NativeWindow
    #: The hub has a flush point: the sends of the tasks a batch woke wake the I/O thread
    #: once, there (``Core.defer_wakes``/``flush_wakes``), not each.
    waits_for_flush = True
    flush_wanted = False
    poller_name = "epoll"
    #: The hubs that drain a native inbox (``make_hub`` picks one per backend).
    hub_classes: tuple[type[Any], type[Any]]

    def __init__(
        self,
        *,
        memory_limit: int | None = None,
        port_buffer_limit: int | None = None,
        io_backend: str | None = None,
    ) -> None:
        self.memory_limit = memory_limit
        self.port_buffer_limit = port_buffer_limit
        self.fd_limit = raise_open_file_limit()
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
        self.commands = _Commands(core)
        self.send_command = core.send
        #: Port.send's fast path: the watermark check, the count and the send in one call.
        self.send_within = core.send_within
        self.cmd_close = core.close
        self.cmd_send_eof = core.send_eof
        self.cmd_set_active = core.set_active
        self.cmd_read_once = core.read_once
        self.cmd_resume = core.resume
        self.cmd_want = core.want
        self.cmd_stop = core.stop
        self.budget = _Budget(core, memory_limit)
        # What submit() can queue: the commands above, and the open requests below.
        self._known = frozenset(
            {
                core.close,
                core.send_eof,
                core.set_active,
                core.read_once,
                core.resume,
                core.want,
                core.stop,
                core.send,
                self.cmd_connect,
                self.cmd_listen,
            }
        )
        # The Python core's statistics that have no native counterpart (its AIO writer
        # and its flush point's waits).
        self._writer = None
        self._failed_writer = None
        self.flush_waits = 0
        self.flush_timeouts = 0

    # -- lifecycle ----------------------------------------------------------------------
    def start(self) -> None:
        self._core.start()

    def join(self, timeout: float | None = None) -> None:
        self._core.join()

    def is_alive(self) -> bool:
        return bool(self._core.is_alive())

    def discard(self) -> None:
        """Release a core that was never started."""
        self._core.close_commands()

    def zmq_context(self) -> Any:
        """Raises NotSupportedError: ZeroMQ ports run on the Python core only (so far)."""
        raise NotSupportedError(
            "ZeroMQ ports are not supported by the native core (core='native') yet: "
            "use core='python'"
        )

    def make_inbox(self, hub: Any) -> Any:
        """The native inbox of a new hub (the hub gets the stop notice)."""
        return self._core.new_inbox(hub)

    def submit(self, function: Any, target: object, argument: object) -> None:
        """Queue a command (``function`` one of this object's ``cmd_*``).

        Raises:
            NotSupportedError: ``function`` is anything else - a Python function to run on
                the I/O thread, which the native thread does not run (yet).
        """
        if function not in self._known:
            raise NotSupportedError(
                f"{function!r} cannot run on the native core's I/O thread (core='native'): "
                "it runs no Python code yet; use core='python'"
            )
        function(target, argument)

    # -- open requests (on the loop's thread: they queue a native command) --------------
    def cmd_connect(self, request: Any, spec: ConnectRequest) -> None:
        window = spec.port._window
        framer = window.framer
        if (framer is not None and framer.decodes_objects) or not isinstance(window, NativeWindow):
            request._deliver(_framed_error(spec.options))
            return
        address = spec.address
        if spec.family == socket.AF_INET:
            host, port = address
            flowinfo = scope_id = 0
        elif spec.family == socket.AF_INET6:
            host, port, flowinfo, scope_id = address
        else:
            request._deliver(NotSupportedError("the native core (core='native') connects TCP only"))
            return
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
        framer = port_framer(spec.options)
        if framer is not None and framer.decodes_objects:
            request._deliver(_framed_error(spec.options))
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

    # -- statistics ---------------------------------------------------------------------
    def memory_in_use(self) -> int:
        """Bytes charged to the memory budget now, as the Python core counts them: input
        delivered to the loops and not yet taken (a packet with its overhead), framing
        buffers and held packets, output queued by owners and not yet written - plus the
        written buffers the native thread still holds until a loop drops them (one
        formula, ``flow::Charges::in_use``, which the budget uses too)."""
        return int(self._core.memory_in_use())

    @property
    def peak_memory(self) -> int:
        return self.budget.peak

    @property
    def global_pauses(self) -> int:
        return self.budget.pauses

    @property
    def linger_timeouts(self) -> int:
        """Closed stream ports reset because their output was not written in ``linger``."""
        return int(self._core.linger_timeouts)

    @property
    def failure(self) -> str | None:
        """Why the native thread failed (a panic in it, contained), or None."""
        failure: str | None = self._core.failure
        return failure

    @property
    def batching_error(self) -> str | None:
        return self.failure

    @property
    def ports_open(self) -> int:
        return int(self._core.ports_open)

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

    @property
    def polls(self) -> int:
        return int(self._core.polls)

    @property
    def events(self) -> int:
        return int(self._core.events)

    @property
    def commands_run(self) -> int:
        return int(self._core.commands_run)

    @property
    def bytes_in(self) -> int:
        return int(self._core.bytes_in)

    @property
    def bytes_out(self) -> int:
        return int(self._core.bytes_out)

    @property
    def internal_errors(self) -> int:
        return int(self._core.internal_errors)


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
    flushes: int
    _flush_pending: bool

    def _flush(self) -> None:
        self._flush_pending = False
        _native.Core.flush_wakes()
        self.flushes += 1

    def _drain(self) -> int:
        _native.Core.defer_wakes()
        pairs = self.inbox.take()
        for target, message in pairs:
            try:
                target._deliver(message)
            except Exception:  # a bug in one target must not stop delivery to the others
                log.exception("error while delivering %r to %r", message, target)
        count = len(pairs)
        self.messages += count
        self.drains += 1
        if not count:
            self.inbox.spurious_wakes += 1
            _native.Core.flush_wakes()  # no flush point follows an empty drain
        return count


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
