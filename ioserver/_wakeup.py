"""Queues between threads, with a wake-up fd that is written only when the consumer sleeps.

Theory of operation
===================

There are two directions, and each one is a :class:`WakeupQueue`: a ``collections.deque``
(the items), a :class:`Wakeup` fd (an eventfd on Linux, a socketpair elsewhere) and a flag,
``asleep``.  Towards the I/O thread the producers are the event loops' threads and the
consumer is the I/O thread, blocked in its selector; towards an event loop the producer is
the I/O thread and the consumer is that loop's hub, blocked in the loop's own selector.

``deque.append`` and ``deque.popleft`` are atomic (under the GIL; per-object locks on
free-threaded builds), so the items need no lock.  The only question is the wake-up: a
consumer must never sleep while an item is queued for it, and a producer should write the
fd as seldom as possible.  The protocol, after ZeroMQ's ``ypipe`` ("the reader announces it
is going to sleep, the writer signals only then") and Erlang's ``erl_poll.c``
(``wake_poller``: write the wake-up pipe only when the poller is not already woken):

Consumer, before it blocks::

    C1  asleep = True
    C2  if items: asleep = False; do not block   # re-check after announcing
    C3  block until the fd is readable (or some other fd is)
    C4  asleep = False; drain the fd if it was readable; take every item

Producer::

    P1  items.append(x)
    P2  if asleep: asleep = False; write the fd

Why no wake-up is lost: the consumer only blocks (C3) after it saw an empty queue at C2,
which it read after it set the flag at C1.  Take any producer whose item the consumer did
not see at C2.  Its append (P1) therefore came after the read at C2, hence after C1; its
read of the flag (P2) comes after its own append, so it reads ``asleep`` after C1 stored
``True``.  Either that read sees ``True`` and it writes the fd, or it sees ``False``, which
only happens when another producer cleared the flag after C1 - and that producer wrote the
fd.  Either way the fd is written after C1, so the block at C3 returns.  (Every step is one
bytecode-level operation on a shared object, and CPython orders them sequentially; on a
free-threaded build the deque's and the attribute's own locks give the same order.)

Why a burst costs one write: the first producer that sees ``asleep`` clears it before it
writes, so the producers after it see ``False`` and only append.  Two producers racing at
P2 may both write; an eventfd adds the two writes into one readable state, so the consumer
still wakes once.  A consumer that finds items at C2 may race with a producer that saw
``True`` just before C2 cleared it: the fd is then written for an item the consumer already
takes, and the consumer's next block returns at once and finds the queue empty.  That is the
only spurious wake-up the protocol allows, and :attr:`WakeupQueue.spurious_wakes` counts it.

The direction towards an event loop is batched: the I/O thread stages all the events of
one round of its selector with :meth:`WakeupQueue.append` (or the bound ``stage``: a private
list's ``append``, which the consumer never sees), then calls :meth:`WakeupQueue.notify`
once, which publishes the whole batch with one ``deque.extend`` (P1: a single atomic
operation, like one append) and then does P2.  So a burst of events for ten thousand ports
costs one write and one wake of the loop.  ``notify`` on an empty queue writes nothing, so a
side never wakes the other for nothing.

Why stage instead of appending each event as it happens: a consumer that is awake (the
hub re-polls its inbox while events keep coming) would otherwise take the GIL at every
syscall of the I/O thread's round to deliver the few events published so far, and the I/O
thread would then wait for the GIL after each ``recv``.  Published per round, the consumer
finds either nothing (and sleeps on the fd) or a whole batch; measured on 100 connections x
64 B echo: +5-10% throughput and a lower p99.  Only one thread (the I/O thread) may stage
into a given queue: ``staged`` is a plain list, cleared by ``notify``.

The flush point (epoll)
-----------------------

After the I/O thread publishes a batch to a loop, it does not go back to its sockets:
it sets ``IOThread.flush_wanted``, publishes, and then waits on the commands' wake-up fd
alone (a private edge-triggered epoll) for at most ``FLUSH_WAIT`` seconds.  ``asleep``
stays false meanwhile, so the loop's sends only append.  The loop's hub runs its *flush
point* once the tasks woken by that batch have run; there, if ``flush_wanted`` is set, it
clears it and writes the fd.  The I/O thread then runs every command, writes the output and
polls with a zero timeout.  No wake-up can be lost to this: the wait is bounded, and
``flush_wanted`` is set before the batch is published, so the flush that follows the drain
of that batch sees it.  Its point is the GIL: while the loop works, the I/O thread neither
wakes on each readable socket nor waits for the GIL, so the loop's GIL releases (a
handler's file reads) wake no one.  (The native core's hubs use the same flush point to
send the wakes of its thread that they deferred during the batch: ``native/wakeup/``,
``ioserver._native_core``.)
"""

from __future__ import annotations

import operator
import os
import socket
from collections import deque
from typing import Generic, TypeVar

__all__ = ["Wakeup", "WakeupQueue"]

T = TypeVar("T")

_HAS_EVENTFD = hasattr(os, "eventfd")
_ONE = (1).to_bytes(8, "little")


class Wakeup:
    """A wake-up fd: an eventfd where the OS has one, else a non-blocking socketpair.

    ``fileno()`` is the fd to wait on for readability; :meth:`signal` makes it readable from
    any thread; :meth:`drain` makes it unreadable again.  Both ends are non-blocking, so a
    signal never blocks (a full socketpair already means "readable").
    """

    __slots__ = ("_read_fd", "_reader", "_write_fd", "_writer", "is_eventfd")

    def __init__(self) -> None:
        self._reader: socket.socket | None = None
        self._writer: socket.socket | None = None
        if _HAS_EVENTFD:
            fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            self._read_fd = self._write_fd = fd
            self.is_eventfd = True
        else:  # pragma: no cover - platforms without eventfd
            self._reader, self._writer = socket.socketpair()
            self._reader.setblocking(False)
            self._writer.setblocking(False)
            self._read_fd = self._reader.fileno()
            self._write_fd = self._writer.fileno()
            self.is_eventfd = False

    def fileno(self) -> int:
        """The fd that becomes readable when :meth:`signal` is called."""
        return self._read_fd

    def signal(self) -> None:
        """Make the fd readable.  Safe from any thread; never blocks."""
        try:
            os.write(self._write_fd, _ONE)
        except BlockingIOError:  # pragma: no cover - already readable (counter/buffer full)
            pass

    def drain(self) -> None:
        """Consume every pending signal, so the fd is no longer readable."""
        try:
            if self.is_eventfd:
                os.read(self._read_fd, 8)
            else:  # pragma: no cover - platforms without eventfd
                while os.read(self._read_fd, 4096):
                    pass
        except BlockingIOError:
            pass

    def close(self) -> None:
        """Close the fd (both ends of the socketpair)."""
        if self.is_eventfd:
            if self._read_fd >= 0:
                os.close(self._read_fd)
        else:  # pragma: no cover - platforms without eventfd
            assert self._reader is not None and self._writer is not None
            self._reader.close()
            self._writer.close()
        self._read_fd = self._write_fd = -1


class WakeupQueue(Generic[T]):
    """A queue from producer threads to one consumer that sleeps on :attr:`wakeup`.

    See the module's theory of operation for the protocol and why it loses no wake-up.
    Producers call :meth:`put` (append and wake if needed), or - the one batch producer -
    :meth:`append`/``stage`` then :meth:`notify` (publish the batch, one wake).  The
    consumer calls :meth:`prepare_to_sleep` before it blocks, :meth:`woke` after, and pops
    from :attr:`items`.

    The counters are statistics: ``wakes_sent`` (fd writes), ``wakes_skipped`` (a producer
    had something for the consumer but found it awake, so wrote nothing) and
    ``spurious_wakes`` (the consumer woke on the fd and found nothing new).  They are plain
    integers updated without a lock, exact with one producer thread, approximate with more.
    """

    __slots__ = (
        "_published",
        "asleep",
        "items",
        "spurious_wakes",
        "stage",
        "staged",
        "wakes_sent",
        "wakes_skipped",
        "wakeup",
    )

    def __init__(self) -> None:
        self.items: deque[T] = deque()
        # A batch producer's items wait here until notify() publishes them all at once.
        self.staged: list[T] = []
        self.stage = self.staged.append
        # Of ``staged``, the items a notify that failed partway published (see notify).
        self._published = 0
        self.wakeup = Wakeup()
        # A new consumer is not blocked yet; it announces its sleep with prepare_to_sleep().
        self.asleep = False
        self.wakes_sent = 0
        self.wakes_skipped = 0
        self.spurious_wakes = 0

    # -- producer side ------------------------------------------------------------------
    def put(self, item: T) -> None:
        """Append ``item`` (P1) and wake the consumer if it announced its sleep (P2)."""
        self.items.append(item)
        if self.asleep:
            self.asleep = False
            self.wakeup.signal()
            self.wakes_sent += 1
        else:
            self.wakes_skipped += 1

    def append(self, item: T) -> None:
        """Stage ``item`` without waking anyone; call :meth:`notify` after the batch."""
        self.staged.append(item)

    def notify(self) -> None:
        """Publish the staged batch (P1) and wake the consumer if it sleeps (P2).

        Should the publication fail partway (a ``MemoryError`` while the deque grows: it
        takes the items one at a time, so those before the one that failed are published,
        and the consumer may have taken them), the error propagates, and the next notify
        publishes the rest only: nothing twice, nothing lost.  Before, the whole batch
        stayed staged and the next notify (the I/O thread's last, as it ends) published it
        again, the first part twice."""
        staged = self.staged
        if staged:
            rest = iter(staged)
            for _ in range(self._published):  # (only after a failure: rare)
                next(rest)
            try:
                self.items.extend(rest)
            except BaseException:
                # (The item that failed was taken from ``rest`` and not appended.)
                self._published = len(staged) - operator.length_hint(rest) - 1
                raise
            self._published = 0
            staged.clear()
        if self.items:
            if self.asleep:
                self.asleep = False
                self.wakeup.signal()
                self.wakes_sent += 1
            else:
                self.wakes_skipped += 1

    # -- consumer side ------------------------------------------------------------------
    def prepare_to_sleep(self) -> bool:
        """Announce a sleep (C1) and re-check (C2).  True: block now; False: items wait."""
        self.asleep = True
        if self.items:
            self.asleep = False
            return False
        return True

    def woke(self) -> None:
        """Record that the consumer is awake again (C4; the fd is drained separately)."""
        self.asleep = False

    def close(self) -> None:
        """Close the wake-up fd."""
        self.wakeup.close()
