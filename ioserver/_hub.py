"""The hub: the event loop's end of the I/O thread's events, on trio or asyncio.

One hub per event loop drains that loop's inbox (a :class:`~._wakeup.WakeupQueue` filled by
the I/O thread) and hands each ``(target, message)`` to its target, in-loop: a port, a
pending connect or listen request, or the hub itself (the stop notice).  The targets wake
the task waiting on them through :meth:`Hub.park` / :meth:`Hub.wake`, which are the only
backend-specific operations; ports, select and mailboxes are written once above them.

How each backend waits and wakes, chosen because each is the cheapest its loop offers:

* trio: the hub is a task blocked in ``trio.lowlevel.wait_readable`` on the inbox's fd; a
  parked task waits in ``wait_task_rescheduled`` and is woken by ``reschedule`` - no Event
  object, no channel, one trip through the scheduler; and with nothing built for either
  (one abort function, trap message and outcome for every park: see "trio: how a task
  parks and is woken" below).
* asyncio: the hub is an ``add_reader`` callback on the inbox's fd, so a wake-up runs the
  drain straight from the loop's selector with no task switch; a parked task awaits a
  fresh future, woken by ``set_result``.

**Checkpoints.**  An operation that completes at once (a message was already buffered; a
send only queues a command) does not yield to the scheduler every time: that would double
the cost of a message on trio.  Instead it checks for cancellation (trio's
``checkpoint_if_cancelled``), and every :data:`YIELD_EVERY`-th such operation on this loop
is a full checkpoint.  So cancellation is always seen promptly, and an actor that never
waits for input still lets the others run.

That checkpoint comes *before* the operation acts (:meth:`Parker.checkpoint_first`), never
after: trio's rule is that an operation that raises ``Cancelled`` did not happen, so a
receive that raises took nothing and a send that raises queued nothing.  Once it has acted,
the operation returns without awaiting again.  A task woken from :meth:`Parker.park` takes
its message only after the park returned (it polls again), so a wake-up and a cancellation
in the same tick leave the message where it was.
"""

from __future__ import annotations

import asyncio
import logging
import types
import weakref
from collections.abc import Callable, Generator
from typing import TYPE_CHECKING, Any, Protocol

import anyio
import outcome
import sniffio
import trio

from ._wakeup import WakeupQueue

if TYPE_CHECKING:
    from ._iothread import IOThread

__all__ = [
    "RESUMED",
    "YIELD_EVERY",
    "Hub",
    "Parkable",
    "Parker",
    "current_parker",
    "make_hub",
    "trio_waits",
    "trio_wake",
    "wait_woken",
    "yield_at_next_operation",
]

log = logging.getLogger("ioserver")

#: Operations that complete without waiting between two full checkpoints, per loop.
YIELD_EVERY = 32


# -- trio: how a task parks and is woken ---------------------------------------------------
#
# A port's owner task parks once for every message it waits for and is woken once, so on
# trio this pair is the hot path of every message.  ``wait_task_rescheduled`` and
# ``reschedule`` as trio's documentation shows them build three objects each time (the
# abort function bound to the parked object, trio's ``WaitTaskRescheduled`` trap message, an
# ``outcome.Value(None)``), two of them frozen attrs classes (about 0.4 and 0.6 µs each on a
# 2-vCPU VM), and run two more coroutine frames: the echo's loop thread spent 5.3 µs a
# message on trio (2.7 on uvloop), 3.4 without them (bench/README.md).  So:
#
# * one abort function for every park (:func:`_abort_park`), which knows nothing of the
#   object parked on: a task that parks on ``obj`` sets its ``custom_sleep_data`` (trio's
#   slot for "the code implementing a sleep", which trio resets to ``None`` whenever it
#   reschedules the task) to ``obj``, and :func:`trio_wake` reschedules the task only while
#   that is still ``obj`` - after an abort (a cancellation) it is not, and a later wake
#   leaves the task alone (trio forbids a second reschedule);
# * so one trap message serves every park (:data:`_PARK`, trio's own, taken once from
#   ``wait_task_rescheduled(_abort_park)`` at import), yielded by :func:`wait_woken`;
# * and one outcome, :data:`RESUMED`, for every wake-up.
#
# Cancellation is trio's own: the abort succeeds, trio reschedules the task with its
# ``Cancelled``, raised from the park; the parked object's ``_waiter`` still names the task
# until then (the parker clears it as the exception passes), which :func:`trio_waits`
# tells apart from a task still parked.


class _Resumed(outcome.Outcome[None]):
    """The outcome of a wake-up: ``None``, as ``outcome.Value(None)``, but one object for
    every wake-up (:data:`RESUMED`): it may be unwrapped any number of times."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "RESUMED"

    def unwrap(self) -> None:
        return None

    def send(self, gen: Any) -> Any:
        return gen.send(None)

    async def asend(self, agen: Any) -> Any:
        return await agen.asend(None)


#: What ``trio.lowlevel.reschedule`` is given to wake a parked task (see :class:`_Resumed`).
RESUMED: outcome.Outcome[None] = _Resumed()


def _abort_park(raise_cancel: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
    """The abort function of every park: a cancelled task is rescheduled with its
    ``Cancelled`` at once (trio resets its ``custom_sleep_data``, so no wake reaches it)."""
    return trio.lowlevel.Abort.SUCCEEDED


def _trap_message() -> object:
    """trio's trap message for ``wait_task_rescheduled(_abort_park)``: what that coroutine
    yields to trio's run loop, taken by running it to its yield once.  ``None`` if it is not
    the message expected (another trio): then :func:`wait_woken` is trio's own call."""
    coroutine = trio.lowlevel.wait_task_rescheduled(_abort_park)  # noqa: ASYNC105 (run by hand)
    try:
        message = coroutine.send(None)
    except BaseException:  # pragma: no cover - a trio whose trap does not yield first
        return None
    finally:
        coroutine.close()
    if type(message).__name__ != "WaitTaskRescheduled" or (
        getattr(message, "abort_func", None) is not _abort_park
    ):
        return None  # pragma: no cover - another trio
    return message


#: trio's trap message for a park with :func:`_abort_park`: frozen, so one serves every park.
_PARK = _trap_message()

if _PARK is not None:

    @types.coroutine
    def wait_woken() -> Generator[Any, Any, None]:
        """Park the current task until :func:`trio_wake` (or a cancellation): what
        ``await trio.lowlevel.wait_task_rescheduled(_abort_park)`` does, yielding the one
        trap message instead of making one.  Set ``custom_sleep_data`` first."""
        resumed = yield _PARK
        if resumed is not RESUMED:
            resumed.unwrap()  # trio's Error(Cancelled) raises here; a Value returns None

else:  # pragma: no cover - another trio

    async def wait_woken() -> None:  # type: ignore[misc]
        """Park the current task until :func:`trio_wake` (or a cancellation)."""
        await trio.lowlevel.wait_task_rescheduled(_abort_park)


def trio_wake(obj: Parkable) -> None:
    """Wake the trio task parked on ``obj`` (its ``_waiter``), if it still is."""
    task = obj._waiter
    if task is not None:
        obj._waiter = None
        if task.custom_sleep_data is obj:  # else a cancellation rescheduled it already
            trio.lowlevel.reschedule(task, RESUMED)


def trio_waits(obj: Parkable) -> bool:
    """A trio task is parked on ``obj`` and not yet cancelled out of the park."""
    task = obj._waiter
    return task is not None and task.custom_sleep_data is obj


class Parkable(Protocol):
    """Something a task can park on: it keeps the parked waiter in ``_waiter`` (a trio task,
    or an asyncio future)."""

    _waiter: Any


class Parker:
    """How tasks wait and are woken on one backend: the only backend-specific operations.

    Ports, select, mailboxes and channels are written once against this interface.
    ``budget`` counts the operations that completed without waiting since the last full
    checkpoint (see the module docstring).
    """

    backend = "abstract"
    is_trio = False

    def __init__(self) -> None:
        self.budget = YIELD_EVERY

    async def park(self, obj: Parkable) -> None:
        """Block the current task until :meth:`wake` is called on ``obj`` (or cancelled)."""
        raise NotImplementedError

    def wake(self, obj: Parkable) -> None:
        """Wake the task parked on ``obj``, if any.  Call from the loop's thread only."""
        raise NotImplementedError

    async def checkpoint(self) -> None:
        """A full checkpoint: yield to the scheduler, raise if cancelled."""
        raise NotImplementedError

    async def checkpoint_if_cancelled(self) -> None:
        """Raise if the current task is cancelled, without yielding."""

    async def checkpoint_first(self) -> None:
        """The checkpoint of an operation that may complete without waiting, taken before
        it acts (see the module docstring).

        Raises ``Cancelled`` (trio) or :exc:`asyncio.CancelledError` if the task is
        cancelled: then the operation has not happened.  Every :data:`YIELD_EVERY`-th call
        also yields to the scheduler first, so what the operation saw before may have
        changed: poll after this, never before.
        """
        self.budget -= 1
        if self.budget <= 0:
            await self.checkpoint()
        else:
            await self.checkpoint_if_cancelled()


class TrioParker(Parker):
    backend = "trio"
    is_trio = True

    async def park(self, obj: Parkable) -> None:
        task = obj._waiter = trio.lowlevel.current_task()
        task.custom_sleep_data = obj
        try:
            await wait_woken()
        except BaseException:
            if obj._waiter is task:  # cancelled: the task is no longer parked on obj
                obj._waiter = None
            raise

    wake = staticmethod(trio_wake)

    async def checkpoint(self) -> None:
        self.budget = YIELD_EVERY
        await trio.lowlevel.checkpoint()

    async def checkpoint_first(self) -> None:
        self.budget -= 1
        if self.budget <= 0:
            self.budget = YIELD_EVERY
            await trio.lowlevel.checkpoint()
        else:
            await trio.lowlevel.checkpoint_if_cancelled()

    checkpoint_if_cancelled = staticmethod(trio.lowlevel.checkpoint_if_cancelled)


class AsyncioParker(Parker):
    backend = "asyncio"

    async def park(self, obj: Parkable) -> None:
        future = obj._waiter = asyncio.get_running_loop().create_future()
        try:
            await future
        finally:
            if obj._waiter is future:
                obj._waiter = None

    def wake(self, obj: Parkable) -> None:
        future = obj._waiter
        if future is not None:
            obj._waiter = None
            if not future.done():
                future.set_result(None)

    async def checkpoint(self) -> None:
        self.budget = YIELD_EVERY
        await asyncio.sleep(0)

    async def checkpoint_first(self) -> None:
        # asyncio delivers a cancellation at the next suspension, so only the periodic
        # yield matters here.
        self.budget -= 1
        if self.budget <= 0:
            self.budget = YIELD_EVERY
            await asyncio.sleep(0)


_PARKERS: dict[str, Parker] = {"trio": TrioParker(), "asyncio": AsyncioParker()}

#: Every live hub: :func:`yield_at_next_operation` resets their budgets.
_HUBS: weakref.WeakSet[Hub] = weakref.WeakSet()  # Hubs, each also a Parker


def yield_at_next_operation() -> None:
    """Make the next operation that completes without waiting a full checkpoint.

    For a cancellation made by the running task itself (``ActorSystem.shutdown`` called
    in the body of its ``async with``): trio's operations see it at once
    (``checkpoint_if_cancelled``), but asyncio delivers a cancellation only at the
    task's next suspension, and an operation that completes without waiting suspends
    only every :data:`YIELD_EVERY`-th time.  With every budget spent, the next one
    suspends, so the task is cancelled there on both backends.  Costs one yield per loop.
    """
    for parker in _PARKERS.values():
        parker.budget = 0
    for hub in list(_HUBS):
        hub.budget = 0


def current_parker() -> Parker:
    """The :class:`Parker` for the async library running this task."""
    library = sniffio.current_async_library()
    try:
        return _PARKERS[library]
    except KeyError:
        from ._exceptions import OptionError

        raise OptionError(f"ioserver runs on trio or asyncio, not {library!r}") from None


class _Stop:
    """The I/O thread's last message to a hub."""


_STOP = _Stop()


class Hub(Parker):
    """The loop side of the I/O thread for one event loop (see the module docstring).

    A hub is also the :class:`Parker` of its backend (``TrioHub(Hub, TrioParker)``: the
    backend's methods come before the abstract ones), so ports park through it.
    """

    def __init__(self, io: IOThread) -> None:
        super().__init__()
        self.io = io
        # The I/O half makes the inbox: a WakeupQueue the Python I/O thread fills, or a
        # native one (ioserver._native_core) with the same consumer side.
        self.inbox: WakeupQueue[tuple[Any, Any]] = io.make_inbox(self)
        self.stopped = False
        #: The hub's task ended before the stop notice (trio): something not an
        #: ``Exception`` escaped a drain; :meth:`stop` then drains by itself.
        self.task_ended = False
        self.drains = 0
        self.flushes = 0  # wake-ups of the I/O thread at a flush point
        self._flush_pending = False
        self.messages = 0
        self._waiter: Any = None
        self.deliver: Callable[[tuple[Any, Any]], None] = self.inbox.stage
        self.cmd_send = io.send_command  # bound once: ports queue it with every send
        self.loop: Any = None  # asyncio's loop, for the ports' inlined park
        # The loop's side of the Python core's memory budget: bytes its ports queued for
        # output and bytes of input their owners took.  Written here, read by the I/O
        # thread.  (A port with a native window counts its own, in the native budget.)
        self.queued_bytes = 0
        self.consumed_bytes = 0
        io.budget.owners.append(self)
        _HUBS.add(self)

    #: Set by a drain whose inbox postponed events (the native inbox, on a MemoryError):
    #: the seconds to wait - for the next wake or this long - before draining again,
    #: instead of at once (which spun the loop for as long as memory stayed short).
    retry_after: float | None = None

    # -- draining -----------------------------------------------------------------------
    def _drain(self) -> int:
        """Hand every message of the inbox to its target; the number handed."""
        items = self.inbox.items
        popleft = items.popleft
        count = 0
        while items:
            target, message = popleft()
            count += 1
            try:
                target._deliver(message)
            except Exception:  # a bug in one target must not stop delivery to the others
                log.exception("error while delivering %r to %r", message, target)
        self.messages += count
        self.drains += 1
        if not count:
            self.inbox.spurious_wakes += 1
        return count

    def _flush(self) -> None:
        """The flush point: the tasks woken by the last drain have run; wake the I/O
        thread if it waits for this (see the flush point in :mod:`ioserver._wakeup`)."""
        self._flush_pending = False
        io = self.io
        if io.flush_wanted:
            io.flush_wanted = False
            io.commands.wakeup.signal()
            self.flushes += 1

    def _deliver(self, message: object) -> None:
        # The hub is the target of the I/O thread's stop notice.
        self.stopped = True
        self.wake(self)

    # -- lifecycle ----------------------------------------------------------------------
    async def start(self, start_soon: Callable[..., object]) -> None:
        """Start draining; call before the I/O thread starts."""
        raise NotImplementedError

    async def _run(self) -> None:
        """Drain until the I/O thread has stopped (a hub that drains from a task)."""
        raise NotImplementedError

    async def stop(self) -> None:
        """Stop the I/O thread (closing every port) and wait until it has ended."""
        with anyio.CancelScope(shield=True):
            if not self.stopped and self.io.is_alive():
                self.io.submit(self.io.cmd_stop, None, None)
                while not self.stopped:
                    if self.task_ended:
                        # Nobody else drains any more (see TrioHub._run): the stop
                        # notice, and what comes before it, are taken here.
                        await self._run()
                    else:
                        await self.park(self)
            self.io.join()
            self._teardown()
            self.inbox.close()
            # The thread has ended and left its queue's flag down, so no producer writes
            # the fd any more: it can be closed.
            self.io.commands.close()

    def _stopped_by_io(self) -> None:
        # Runs on the I/O thread as it ends; the drain delivers it in-loop.
        self.inbox.append((self, _STOP))

    def _teardown(self) -> None:
        pass


class TrioHub(Hub, TrioParker):
    async def start(self, start_soon: Callable[..., object]) -> None:
        start_soon(self._run)

    async def _run(self) -> None:
        """Drain until the I/O thread has stopped (also run by :meth:`stop` itself if the
        hub's task ended before that)."""
        try:
            await self._drain_until_stopped()
        finally:
            if not self.stopped:
                # A KeyboardInterrupt or another exception not an ``Exception`` left a
                # drain: the task that waits in stop() must not wait for this one.
                self.task_ended = True
                self.wake(self)

    # KeyboardInterrupt-protected, as trio's own I/O manager is: trio's SIGINT handler then
    # raises the interrupt in the main task, not in the middle of a drain (which would end
    # the only task delivering the I/O thread's messages, its stop notice among them).
    @trio.lowlevel.enable_ki_protection
    async def _drain_until_stopped(self) -> None:
        inbox = self.inbox
        fd = inbox.wakeup.fileno()
        wait_readable = trio.lowlevel.wait_readable
        drain = self._drain
        with trio.CancelScope(shield=True):
            # Shielded: the hub must keep delivering until the I/O thread has stopped,
            # even while the surrounding task group is being cancelled.
            io = self.io
            checkpoint = trio.lowlevel.cancel_shielded_checkpoint
            while True:
                delivered = drain()
                if self.stopped:
                    return
                if delivered and io.waits_for_flush:
                    # Two trips through the scheduler: whatever order trio runs its
                    # batch in, every task woken by the drain has run by the second.
                    await checkpoint()
                    await checkpoint()
                    self._flush()
                    continue
                if inbox.prepare_to_sleep():
                    retry = self.retry_after
                    if retry is None:
                        await wait_readable(fd)
                    else:
                        with trio.move_on_after(retry):
                            await wait_readable(fd)
                    inbox.wakeup.drain()
                    inbox.woke()
                else:
                    await trio.lowlevel.cancel_shielded_checkpoint()

    def _teardown(self) -> None:
        trio.lowlevel.notify_closing(self.inbox.wakeup.fileno())


class AsyncioHub(Hub, AsyncioParker):
    async def start(self, start_soon: Callable[..., object]) -> None:
        self._loop = self.loop = asyncio.get_running_loop()
        self._loop.add_reader(self.inbox.wakeup.fileno(), self._on_readable)
        # The reader is registered: from now on the I/O thread may wake us.
        self.inbox.asleep = True

    _retry: asyncio.TimerHandle | None = None

    def _on_readable(self) -> None:
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        inbox = self.inbox
        inbox.wakeup.drain()
        inbox.woke()
        try:
            if self._drain() and self.io.waits_for_flush and not self._flush_pending:
                # Runs after the callbacks queued so far: the steps of the woken tasks.
                self._flush_pending = True
                self._loop.call_soon(self._flush)
        finally:
            # Also when a KeyboardInterrupt leaves the drain: the inbox is then neither
            # asleep nor drained, and no wake-up would come for what it holds (the stop
            # notice among it) while the loop cancels its tasks.
            if not inbox.prepare_to_sleep():
                # Events arrived while draining: take them on the next loop iteration,
                # so the tasks woken so far run first.
                self._loop.call_soon(self._on_readable)
            elif self.retry_after is not None:
                # Events postponed: again at the next wake, or after this wait.
                self._retry = self._loop.call_later(self.retry_after, self._on_readable)

    async def park(self, obj: Parkable) -> None:
        future = obj._waiter = self._loop.create_future()
        try:
            await future
        finally:
            if obj._waiter is future:
                obj._waiter = None

    def _teardown(self) -> None:
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        self._loop.remove_reader(self.inbox.wakeup.fileno())


def make_hub(io: IOThread) -> Hub:
    """The hub for the event loop running this task (trio, or asyncio through anyio)."""
    # An I/O half may bring its own hubs (the native core's drain its native inbox).
    hub_classes: tuple[type[Hub], type[Hub]] = getattr(io, "hub_classes", (TrioHub, AsyncioHub))
    if current_parker().is_trio:
        return hub_classes[0](io)
    return hub_classes[1](io)
