"""The public face of an embedded I/O server: :func:`open`, :class:`IOServer`, :func:`run`."""

from __future__ import annotations

import logging
import os
import signal
import sys
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import anyio

from ._exceptions import ClosedPortError, NotSupportedError, OptionError
from ._hub import Hub, make_hub
from ._iothread import IOThread

__all__ = [
    "CORE_ENVIRONMENT",
    "IO_BACKEND_ENVIRONMENT",
    "IOServer",
    "IOServerStatistics",
    "open",
    "run",
]

#: The environment variable that names the default I/O core (``"python"`` or ``"native"``)
#: where :func:`open` is not given one.
CORE_ENVIRONMENT = "IOSERVER_CORE"

#: The environment variable that names the native core's I/O backend (``"epoll"`` or
#: ``"io_uring"``) where :func:`open` is not given one.  (``IOSERVER_BACKEND`` is
#: ``ioserver serve --backend``'s, the event loop library.)
IO_BACKEND_ENVIRONMENT = "IOSERVER_IO_BACKEND"

#: Deprecated, does nothing: it turned off the Python core's writes through Linux AIO,
#: which were removed (issue 14).  :func:`open` warns (:exc:`DeprecationWarning`) when set.
BATCHED_WRITES_ENVIRONMENT = "IOSERVER_BATCHED_WRITES"

T = TypeVar("T")

#: The native core's I/O backends (see :func:`open`'s ``io_backend``).
IO_BACKENDS = ("epoll", "io_uring")

log = logging.getLogger("ioserver")

#: The smallest memory_limit: four reads of the I/O thread's buffer, so that ordinary reads
#: (up to three quarters) and the reserve of waiting ports (the last quarter) each have room
#: for a whole read.
MIN_MEMORY = 4 * 65536


@dataclass(frozen=True, slots=True)
class IOServerStatistics:
    """A snapshot of an I/O server's counters, as returned by :meth:`IOServer.statistics`.

    The wake-up counters are the proof that the wake-up protocol batches: under load
    ``wakes_to_loop_sent`` and ``wakes_to_io_sent`` grow far slower than
    ``messages_delivered`` and ``commands``, and the ``*_skipped`` counters say how many
    wake-ups were saved because the other side was awake.
    """

    #: the I/O thread's selector backend: "epoll", "poll", "select" or "selectors (...)"
    poller: str
    backend: str  #: the event loop's library: "trio" or "asyncio"
    fd_limit: int  #: the soft open-file limit after raising it to the hard limit
    ports_open: int  #: sockets the I/O thread holds open now (listeners included)
    polls: int  #: rounds of the I/O thread's selector
    events: int  #: readiness events handled
    commands: int  #: commands run by the I/O thread (sends, closes, connects...)
    messages_delivered: int  #: messages the hub handed to ports in this loop
    loop_drains: int  #: times the hub drained its inbox
    bytes_received: int  #: bytes read from all sockets
    bytes_sent: int  #: bytes written to all sockets
    wakes_to_io_sent: int  #: wake-up fd writes towards the I/O thread
    wakes_to_io_skipped: int  #: commands queued while the I/O thread was awake (no write)
    wakes_to_loop_sent: int  #: wake-up fd writes towards the event loop
    wakes_to_loop_skipped: int  #: batches queued while the loop was awake (no write)
    spurious_loop_wakes: int  #: loop wake-ups that found nothing to deliver
    internal_errors: int  #: errors contained by closing the one port concerned
    #: closed stream ports reset because their output was not written within ``linger``
    linger_timeouts: int
    memory_limit: int | None  #: the global budget in bytes (``None``: unlimited)
    port_buffer_limit: int | None  #: the cap of one port in bytes (``None``: unlimited)
    memory_in_use: int  #: bytes buffered now: undelivered input, framing, queued output
    peak_memory: int  #: the highest ``memory_in_use`` seen (measured once a round)
    global_pauses: int  #: reads paused because the budget was used up
    #: Deprecated, always ``False``: the Python core's writes through Linux AIO
    #: (``io_submit``) were removed (issue 14); kept so that code reading it still runs.
    batched_writes: bool
    write_batches: int  #: deprecated, always 0 (see ``batched_writes``)
    batched_write_count: int  #: deprecated, always 0 (see ``batched_writes``)
    #: times the Python I/O thread waited for this loop's flush point (0 on the native core)
    flush_waits: int
    flush_timeouts: int  #: ... of which ended by the 10 ms bound, not by a flush
    #: why the native I/O thread failed, if it did (then the server is closed); ``None``.
    #: (The name is from the Python core's Linux AIO writer, removed in issue 14.)
    batched_writes_error: str | None = None
    #: the I/O core: ``"python"`` (the I/O thread in Python) or ``"native"`` (in Rust)
    core: str = "python"
    #: how the native core's reads and writes reach the kernel: ``"epoll"`` (a syscall
    #: each) or ``"io_uring"`` (a round's in one ``io_uring_enter``); ``None`` on the
    #: Python core
    io_backend: str | None = None
    io_uring_enters: int = 0  #: ``io_uring_enter`` calls the native I/O thread made
    io_uring_submissions: int = 0  #: receives and sends submitted through them
    #: ports failed (``ENOBUFS``) because the memory budget stalled on unfinished packets:
    #: a waiting port could not read and the packets still arriving left no room for a
    #: read (:doc:`/howto/memory`)
    budget_failed_ports: int = 0


class IOServer:
    """A running I/O thread, and the hub that connects it to this event loop.

    Get one from :func:`open` (or :func:`run`); pass it to the port functions of
    :mod:`ports` (``connect_tcp``, ``listen_tcp``...).  All of its methods are called from
    the event loop that opened it.
    """

    __slots__ = ("_closed", "_hub", "_io")

    def __init__(self, io: IOThread, hub: Hub) -> None:
        self._io = io
        self._hub = hub
        self._closed = False

    @property
    def closed(self) -> bool:
        """True once the server was closed: its ports are closed and the thread ended."""
        return self._closed

    def _check_open(self, function: str | None = None) -> Hub:
        """The hub, for a port function about to open a port (``function``: its name,
        as ``"ports.open_udp"``, for a server that carries only some kinds).

        Raises:
            ClosedPortError: the server is closed (or its native I/O thread failed: the
                message says how).
            NotSupportedError: this server cannot carry ``function``'s ports (a local
                server, on either core, carries every kind; see
                :class:`client.RemoteIOServer`).
        """
        if self._closed:
            raise ClosedPortError("this I/O server is closed")
        failure = getattr(self._io, "failure", None)
        if failure is not None:
            raise ClosedPortError(f"this I/O server is closed: {failure}")
        return self._hub

    def statistics(self) -> IOServerStatistics:
        """The server's counters now (see :class:`IOServerStatistics`)."""
        io, hub = self._io, self._hub
        counters = io.counters()  # on the native core, its thread's and its hosted half's
        budget_counters = getattr(io, "budget_counters", None)  # the native core's two budgets
        peak, pauses, _ = (
            (io.budget.peak, io.budget.pauses, 0) if budget_counters is None else budget_counters()
        )
        return IOServerStatistics(
            poller=io.poller_name,
            backend=hub.backend,
            fd_limit=io.fd_limit,
            ports_open=counters["ports_open"],
            polls=counters["polls"],
            events=counters["events"],
            commands=counters["commands_run"],
            messages_delivered=hub.messages,
            loop_drains=hub.drains,
            bytes_received=counters["bytes_in"],
            bytes_sent=counters["bytes_out"],
            wakes_to_io_sent=counters["wakes_sent"],
            wakes_to_io_skipped=counters["wakes_skipped"],
            wakes_to_loop_sent=hub.inbox.wakes_sent,
            wakes_to_loop_skipped=hub.inbox.wakes_skipped,
            spurious_loop_wakes=hub.inbox.spurious_wakes,
            internal_errors=counters["internal_errors"],
            linger_timeouts=counters["linger_timeouts"],
            memory_limit=io.memory_limit,
            port_buffer_limit=io.port_buffer_limit,
            memory_in_use=io.memory_in_use(),
            peak_memory=max(peak, io.memory_in_use()),
            global_pauses=pauses,
            batched_writes=False,
            write_batches=0,
            batched_write_count=0,
            flush_waits=io.flush_waits,
            flush_timeouts=io.flush_timeouts,
            batched_writes_error=getattr(io, "failure", None),
            core="native" if getattr(io, "native", False) else "python",
            io_backend=getattr(io, "io_backend", None),
            io_uring_enters=getattr(io, "io_uring_enters", 0),
            io_uring_submissions=getattr(io, "io_uring_submissions", 0),
            budget_failed_ports=counters["budget_failed_ports"],
        )

    async def aclose(self) -> None:
        """Close every port, stop the I/O thread and wait for it (idempotent).

        Owners of open ports see nothing more from them; their next operation raises
        :exc:`~ports.ClosedPortError`.  Shielded from cancellation: it returns promptly.
        """
        if self._closed:
            return
        self._closed = True
        await self._hub.stop()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{self._io.counters()['ports_open']} ports"
        return f"<IOServer {self._hub.backend} {self._io.poller_name} {state}>"


@asynccontextmanager
async def open(
    *,
    poller: str | None = None,
    memory_limit: int | None = None,
    port_buffer_limit: int | None = None,
    core: str | None = None,
    io_backend: str | None = None,
) -> AsyncIterator[IOServer]:
    """Start an I/O thread for this event loop; stop it, closing every port, on exit.

    ::

        async with ioserver.open() as ios:
            listener = await ports.listen_tcp(ios, "127.0.0.1", 7000)

    Works on trio and on asyncio (directly or through anyio).  At start the process's soft
    open-file limit is raised to the hard limit, and the port table is sized from it.

    Args:
        poller: the I/O thread's selector backend (:doc:`/reference/pollers`):
            ``"epoll"`` (Linux; the default there), ``"poll"`` (POSIX) or ``"select"``
            (descriptors below ``FD_SETSIZE``, 1024, only: a port whose descriptor is at
            or above it is refused with :exc:`~ioserver.PollerLimitError`), or
            ``"selectors"``, the standard library's ``DefaultSelector`` (kqueue on the BSDs
            and macOS: the default where there is no epoll).  ``statistics().poller``
            names the one in use.
        memory_limit: the global budget in bytes for everything the server buffers:
            input delivered to owners and not yet taken, framing buffers and output not
            yet written.  Ordinary reads pause at three quarters of it (TCP backpressure
            on every peer) and resume at one half; the last quarter is a reserve for
            ports whose owner waits in ``receive``/``select``, so that the port an actor
            reads next is never starved by the others' input.  No read is made that could
            take the input charged past the limit (see :doc:`/howto/memory`).
            ``None``: no global budget (each port is still bounded by its watermarks).
        port_buffer_limit: the cap in bytes on one port's buffers (a packet being
            assembled, undelivered input, queued output).  A port that passes it gets an
            :class:`~ioserver.Error` naming the limit, then ``Closed("ENOBUFS")``; a send
            that would pass it closes the port and raises :exc:`~ports.BrokenPortError`.
        core: the I/O core (:doc:`/reference/cores`): ``"native"``, the I/O thread in
            Rust, which never takes the GIL (it carries TCP and Unix streams and a
            program's stdio itself, in every packet mode, with the memory budget of
            ``flow.rs``; UDP, ZeroMQ, TUN, TLS and a daemon's clients run in Python on its
            thread, the hosted half), or ``"python"``, the I/O thread
            written in Python (the reference the native core is tested against; every
            poller).  ``None``: the environment variable ``IOSERVER_CORE`` if set, else
            ``"native"`` - or ``"python"`` if ``poller`` names a poller other than epoll.
            ``statistics().core`` says which.
        io_backend: how the native core's reads and writes reach the kernel
            (:doc:`/reference/cores`): ``"epoll"``, a ``read`` or ``writev`` syscall per port
            as epoll reports it ready; ``"io_uring"``, each round's reads and writes in one
            ``io_uring_enter`` (Linux; readiness still from epoll).  ``None``: the
            environment variable ``IOSERVER_IO_BACKEND`` if set, else io_uring where the
            kernel allows it and epoll where it refuses it.  ``statistics().io_backend``
            says which runs.  The Python core makes a syscall per port: it takes ``None``
            or ``"epoll"`` (its selector is ``poller``) and ignores the variable.

    Raises:
        OptionError: an unknown poller (or one this platform lacks), an unknown core or
            io_backend, a limit that is not a positive int, or an event loop that is
            neither trio nor asyncio.
        NotSupportedError: ``core="native"`` with a poller it does not have;
            ``io_backend="io_uring"`` on the Python core, or where the kernel refuses
            io_uring (``ENOSYS``, ``EPERM`` under a seccomp filter or
            ``kernel.io_uring_disabled``, ``EOPNOTSUPP``: the message names it).
        PollerLimitError: ``poller="select"`` in a process whose descriptors already
            reach ``FD_SETSIZE``: the I/O thread's own wake-up descriptor is beyond it.
    """
    if memory_limit is not None and isinstance(memory_limit, int) and memory_limit < MIN_MEMORY:
        raise OptionError(
            f"memory_limit must be at least {MIN_MEMORY} bytes (four reads), not {memory_limit}"
        )
    for name, value in (("memory_limit", memory_limit), ("port_buffer_limit", port_buffer_limit)):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value <= 0
        ):
            raise OptionError(f"{name} must be a positive int (bytes) or None, not {value!r}")
    core = _choose_core(core, poller)
    io_backend = _choose_io_backend(io_backend, core)
    if BATCHED_WRITES_ENVIRONMENT in os.environ:
        warnings.warn(
            f"{BATCHED_WRITES_ENVIRONMENT} does nothing and will be removed: the Python "
            "core's writes through Linux AIO, which it turned off, are gone (issue 14)",
            DeprecationWarning,
            stacklevel=3,  # through contextlib's __aenter__: the caller's async with
        )
    if core == "native":
        if poller not in (None, "epoll"):
            raise NotSupportedError(
                f"poller={poller!r} is not supported by the native core (core='native'): "
                "it polls with epoll"
            )
        from ._native_core import NativeIOThread

        # It implements what the loop half uses of IOThread (ioserver._contract.IOHalf
        # and the statistics), not the rest: a structural stand-in, hence the cast.
        io = cast(
            IOThread,
            NativeIOThread(
                memory_limit=memory_limit,
                port_buffer_limit=port_buffer_limit,
                io_backend=io_backend,
            ),
        )
    else:
        io = IOThread(poller=poller, memory_limit=memory_limit, port_buffer_limit=port_buffer_limit)
    try:
        hub = make_hub(io)
    except BaseException:
        io.discard()
        raise
    server = IOServer(io, hub)
    body_error: BaseException | None = None
    try:
        async with anyio.create_task_group() as task_group:
            await hub.start(task_group.start_soon)
            io.start()
            try:
                yield server
            except BaseException as exc:
                body_error = exc
                raise
            finally:
                await server.aclose()
    except BaseExceptionGroup as group:
        # The task group (the hub's task) wraps what the caller's own code raised: give
        # the caller back its own exception, as if no task group were there.
        if body_error is not None and list(group.exceptions) == [body_error]:
            raise body_error from None
        raise


def _choose_core(core: str | None, poller: str | None = None) -> str:
    """The core to run: ``core``, else ``$IOSERVER_CORE``, else ``"native"`` - or
    ``"python"`` when ``poller`` names a poller other than epoll, which only the Python
    core has.

    Raises:
        OptionError: not ``"python"`` or ``"native"``.
    """
    from_environment = core is None
    if core is None:
        default = "native" if poller in (None, "epoll") else "python"
        core = os.environ.get(CORE_ENVIRONMENT) or default
    if core not in ("python", "native"):
        where = f" (from ${CORE_ENVIRONMENT})" if from_environment else ""
        raise OptionError(f"core must be 'python' or 'native', not {core!r}{where}")
    return core


def _choose_io_backend(io_backend: str | None, core: str) -> str | None:
    """The native core's I/O backend: ``io_backend``, else ``$IOSERVER_IO_BACKEND``, else
    ``None`` (io_uring where the kernel allows it); always ``None`` for the Python core.

    Raises:
        OptionError: not ``"epoll"``, ``"io_uring"`` or ``None``.
        NotSupportedError: ``"io_uring"`` given to the Python core.
    """
    from_environment = io_backend is None
    if io_backend is None:
        io_backend = os.environ.get(IO_BACKEND_ENVIRONMENT) or None
    if io_backend is not None and io_backend not in IO_BACKENDS:
        where = f" (from ${IO_BACKEND_ENVIRONMENT})" if from_environment else ""
        raise OptionError(
            f"io_backend must be 'epoll', 'io_uring' or None, not {io_backend!r}{where}"
        )
    if core != "native":
        if io_backend == "io_uring" and not from_environment:
            raise NotSupportedError(
                "io_backend='io_uring' is the native core's (core='native'): the Python "
                "core makes a syscall per port"
            )
        return None
    return io_backend


def run(
    main: Callable[..., Awaitable[T]],
    *args: Any,
    backend: str = "asyncio",
    use_uvloop: bool | None = None,
    stop_on_signals: bool = True,
    memory_limit: int | None = None,
    switch_interval: float | None = None,
    poller: str | None = None,
    core: str | None = None,
    io_backend: str | None = None,
) -> T | None:
    """Run ``main(ios, *args)`` on a new event loop with an embedded I/O server.

    Args:
        main: an async function; its first argument is the :class:`IOServer`.
        args: more positional arguments for ``main``.
        backend: ``"asyncio"`` or ``"trio"``.
        use_uvloop: on asyncio, run on uvloop; ``None`` (the default) uses it when it is
            installed.
        stop_on_signals: on SIGINT or SIGTERM, cancel ``main`` and shut down cleanly
            (every port closed, the I/O thread joined) instead of raising
            :exc:`KeyboardInterrupt`; ``run`` then returns ``None``.
        memory_limit: the I/O server's global budget in bytes (see :func:`open`).
        poller: the I/O thread's selector backend (see :func:`open`); ``None``: the
            platform's best.
        core: the I/O core, ``"python"`` or ``"native"`` (see :func:`open`).
        io_backend: the native core's I/O backend, ``"epoll"`` or ``"io_uring"`` (see
            :func:`open`; ``backend`` here is the event loop library).
        switch_interval: deprecated, does nothing (a value other than ``None`` gives a
            :exc:`DeprecationWarning`).  ``run`` used to set :func:`sys.setswitchinterval`
            to 1 ms while ``main`` ran, for the Python core's two threads sharing the GIL;
            it no longer touches the interval (issue 14: it did not pay measurably; see
            ``docs/reference/cores.rst``).  Call :func:`sys.setswitchinterval` yourself to
            tune it.

    Returns:
        What ``main`` returned, or ``None`` if a signal stopped it.

    Raises:
        OptionError: an unknown backend, poller, core or io_backend, or ``use_uvloop=True``
            without uvloop installed.
        NotSupportedError: ``io_backend="io_uring"`` on the Python core.
        PollerLimitError: ``poller="select"`` in a process whose descriptors already
            reach ``FD_SETSIZE`` (1024).
    """
    if backend not in ("asyncio", "trio"):
        hint = " (the native core's I/O backend is io_backend=)" if backend in IO_BACKENDS else ""
        raise OptionError(f"backend must be 'asyncio' or 'trio', not {backend!r}{hint}")
    # An unknown core or io_backend fails here, before the loop starts.
    _choose_io_backend(io_backend, _choose_core(core, poller))
    options: dict[str, Any] = {}
    if backend == "asyncio":
        if use_uvloop is None:
            use_uvloop = _has_uvloop()
        if use_uvloop:
            if not _has_uvloop():
                raise OptionError("use_uvloop=True but uvloop is not installed")
            options["use_uvloop"] = True

    async def _main() -> T | None:
        async with open(
            memory_limit=memory_limit, poller=poller, core=core, io_backend=io_backend
        ) as ios:
            if not stop_on_signals:
                return await main(ios, *args)
            result: list[T] = []
            async with anyio.create_task_group() as task_group:

                async def watch_signals() -> None:
                    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                        async for number in signals:
                            log.info("%s received: stopping", signal.Signals(number).name)
                            task_group.cancel_scope.cancel()

                async def call_main() -> None:
                    result.append(await main(ios, *args))
                    task_group.cancel_scope.cancel()

                task_group.start_soon(watch_signals)
                task_group.start_soon(call_main)
            return result[0] if result else None

    if switch_interval is not None:
        warnings.warn(
            "ioserver.run(switch_interval=...) does nothing and will be removed: run no "
            "longer sets sys.setswitchinterval (call it yourself to tune the GIL)",
            DeprecationWarning,
            stacklevel=2,
        )
    return anyio.run(_main, backend=backend, backend_options=options)


def _has_uvloop() -> bool:
    if sys.platform == "win32":  # pragma: no cover
        return False
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True
