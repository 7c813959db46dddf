"""Timers as messages: ``send_after`` / ``cancel_timer``, and deadlines as select sources.

Theory of operation
-------------------

Erlang delivers a timer as an ordinary message (``erlang:send_after/3``), so a process
waits for "a reply or a timeout" with the one ``receive`` it already has.  Here a timer
service does the same for mailboxes and actors: :meth:`TimerService.send_after` pushes a
:class:`TimerRef` on a heap ordered by deadline (the event loop's clock,
:func:`anyio.current_time`), and one task per service sleeps until the earliest deadline,
then delivers every timer that is due with the destination's ``send_nowait`` - the same
in-loop path a port's messages take.  A new timer earlier than the one the task sleeps
for moves the task's cancel-scope deadline forward; no task is spawned per timer.

A cancelled timer stays on the heap until its deadline (removing from the middle of a heap
costs O(n)); when cancelled timers are more than half of the heap it is rebuilt without
them, so a pattern like "reset an idle timeout on every message" keeps the heap bounded.

Structured concurrency: the service's task runs in the actor system's task group
(:func:`ports.open_actor_system`).  When the system ends, the service is closed: every
pending timer is cancelled and nothing is delivered later.  A timer never outlives the
system that started it.

A :class:`Deadline` is the other face of a timer: a source for :func:`ports.select` that
delivers one :class:`Timeout` message at a given time, with no service and no task
(``select`` parks under a cancel scope with that deadline).
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, final

import anyio
import anyio.abc

from ioserver._exceptions import ClosedPortError, EndOfPort

from ._source import EMPTY, Empty, Source, Waiter

__all__ = ["Deadline", "Timeout", "TimerRef", "TimerService", "check_seconds"]

_PENDING, _FIRED, _CANCELLED = 0, 1, 2
_REBUILD_AT = 64  # cancelled timers on the heap before a rebuild is considered

_sequence = itertools.count()


def check_seconds(seconds: object, what: str = "seconds") -> float:
    """``seconds`` as a float, checked.

    Raises:
        TypeError: not a number.
        ValueError: negative or NaN.
    """
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
        raise TypeError(f"{what} must be a number of seconds, not {type(seconds).__name__}")
    if math.isnan(seconds) or seconds < 0:
        raise ValueError(f"{what} must be zero or more seconds, not {seconds!r}")
    return float(seconds)


@final
class TimerRef:
    """A timer started by :func:`ports.send_after`: Erlang's ``TimerRef``.

    Cancel it with :meth:`cancel` (or :func:`ports.cancel_timer`).  Compare by identity.
    """

    __slots__ = ("_deadline", "_destination", "_message", "_service", "_state")

    def __init__(
        self, service: TimerService, deadline: float, destination: object, message: object
    ) -> None:
        self._service = service
        self._deadline = deadline
        self._destination = destination
        self._message = message
        self._state = _PENDING

    @property
    def deadline(self) -> float:
        """When the message is (or was) due, on the event loop's clock (seconds)."""
        return self._deadline

    @property
    def active(self) -> bool:
        """True until the timer fires or is cancelled."""
        return self._state == _PENDING

    def remaining(self) -> float | None:
        """Seconds left before the message is sent, or ``None`` if it fired or was
        cancelled, as Erlang's ``erlang:read_timer/1``."""
        if self._state != _PENDING:
            return None
        return max(self._deadline - anyio.current_time(), 0.0)

    def cancel(self) -> bool:
        """Cancel the timer, as Erlang's ``erlang:cancel_timer/1``.

        Returns:
            ``True`` if the timer was pending and now will never send its message;
            ``False`` if it had fired already (the message may be in the destination's
            mailbox: a selective receive can drop it), was cancelled before, or its actor
            system has ended.
        """
        if self._state != _PENDING:
            return False
        self._state = _CANCELLED
        self._destination = self._message = None  # release them now, not at the deadline
        self._service._cancelled += 1
        return True

    def __repr__(self) -> str:
        state = ("pending", "fired", "cancelled")[self._state]
        return f"<TimerRef due at {self._deadline:.3f} {state}>"


class TimerService:
    """The timers of one actor system: a heap and one task (see the module docstring).

    ``deliver(destination, message)`` is called in-loop for each timer that fires; it
    resolves the destination (a mailbox, an actor, a registered name) and drops the message
    if nobody is there any more, as Erlang does.
    """

    def __init__(self, deliver: Callable[[Any, Any], None]) -> None:
        self._deliver = deliver
        self._heap: list[tuple[float, int, TimerRef]] = []
        self._cancelled = 0  # cancelled timers still on the heap
        self._sleep: anyio.CancelScope | None = None
        self._closed = False
        self.fired = 0

    def send_after(self, seconds: float, destination: object, message: object) -> TimerRef:
        """Schedule ``message`` for ``destination`` in ``seconds``; return its reference.

        Raises:
            ClosedPortError: the service has ended (its actor system is closed).
        """
        if self._closed:
            raise ClosedPortError("this actor system has ended: it starts no timer")
        deadline = anyio.current_time() + seconds
        ref = TimerRef(self, deadline, destination, message)
        heap = self._heap
        heapq.heappush(heap, (deadline, next(_sequence), ref))
        sleep = self._sleep
        if sleep is not None and deadline < sleep.deadline:
            sleep.deadline = deadline  # wake the service's task earlier
        if self._cancelled >= _REBUILD_AT and 2 * self._cancelled > len(heap):
            self._rebuild()
        return ref

    def _rebuild(self) -> None:
        self._heap = [entry for entry in self._heap if entry[2]._state == _PENDING]
        heapq.heapify(self._heap)
        self._cancelled = 0

    @property
    def pending(self) -> int:
        """The number of timers that have neither fired nor been cancelled."""
        return len(self._heap) - self._cancelled

    async def run(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        """Deliver timers as they come due, until cancelled; then :meth:`close`."""
        task_status.started()
        try:
            while True:
                heap = self._heap
                now = anyio.current_time()
                while heap and heap[0][0] <= now:
                    ref = heapq.heappop(heap)[2]
                    if ref._state == _PENDING:
                        ref._state = _FIRED
                        destination, message = ref._destination, ref._message
                        ref._destination = ref._message = None
                        self.fired += 1
                        self._deliver(destination, message)
                    else:
                        self._cancelled -= 1
                    heap = self._heap  # a delivery never starts timers, but be safe
                with anyio.CancelScope(deadline=heap[0][0] if heap else math.inf) as sleep:
                    self._sleep = sleep
                    await anyio.sleep_forever()
                self._sleep = None
        finally:
            self._sleep = None
            self.close()

    def close(self) -> None:
        """Cancel every pending timer; start none any more.  Idempotent."""
        self._closed = True
        for _, _, ref in self._heap:
            if ref._state == _PENDING:
                ref._state = _CANCELLED
                ref._destination = ref._message = None
        self._heap = []
        self._cancelled = 0


@dataclass(frozen=True, slots=True)
class Timeout:
    """What a :class:`Deadline` delivers when its time comes.

    ``deadline`` is the time it was set for, on the event loop's clock (seconds).
    """

    deadline: float


@final
class Deadline(Source):
    """A point in time as a source for :func:`ports.select`: one :class:`Timeout` message.

    ``select(port, mailbox, Deadline(5))`` returns ``(deadline, Timeout(...))`` if neither
    the port nor the mailbox had a message within 5 seconds - the ``after`` clause of
    Erlang's ``receive``, as one more source, so one deadline can span several selects::

        deadline = ports.Deadline(30)          # the whole exchange must end within 30 s
        while True:
            source, message = await ports.select(port, deadline)
            if source is deadline:
                break
            ...

    It delivers its message once; a select on it afterwards raises
    :exc:`~ports.EndOfPort`, as any source that has delivered its final message.  It needs
    no task and no actor system: ``select`` parks under a cancel scope with this deadline.
    Create it in a running event loop (it reads the loop's clock).

    Args:
        seconds: seconds from now (the event loop's clock); 0 or more.

    Raises:
        TypeError: ``seconds`` is not a number.
        ValueError: ``seconds`` is negative or NaN.
    """

    __slots__ = ("_delivered", "_when")

    def __init__(self, seconds: float) -> None:
        self._when = anyio.current_time() + check_seconds(seconds)
        self._delivered = False

    @classmethod
    def at(cls, when: float) -> Deadline:
        """A deadline at ``when``, an absolute time on the event loop's clock
        (:func:`anyio.current_time`), as ``anyio.CancelScope(deadline=...)``.

        Raises:
            TypeError: ``when`` is not a number.
        """
        if isinstance(when, bool) or not isinstance(when, (int, float)):
            raise TypeError(f"when must be a time in seconds, not {type(when).__name__}")
        deadline = cls(0)
        deadline._when = float(when)
        return deadline

    @property
    def deadline(self) -> float:
        """The time it is due, on the event loop's clock (seconds)."""
        return self._when

    @property
    def expired(self) -> bool:
        """True once its time has come (whether or not its message was taken)."""
        return anyio.current_time() >= self._when

    def remaining(self) -> float:
        """Seconds left before it is due (0.0 once due)."""
        return max(self._when - anyio.current_time(), 0.0)

    def __repr__(self) -> str:
        return f"<Deadline at {self._when:.3f}{' delivered' if self._delivered else ''}>"

    # -- select hooks: select parks with the earliest deadline, then polls again ---------
    def _select_poll(self) -> Timeout | Empty:
        if self._delivered:
            raise EndOfPort("this deadline has delivered its Timeout already")
        if anyio.current_time() >= self._when:
            self._delivered = True
            return Timeout(self._when)
        return EMPTY

    def _select_arm(self, waiter: Waiter) -> None:
        pass

    def _select_disarm(self, waiter: Waiter) -> None:
        pass
