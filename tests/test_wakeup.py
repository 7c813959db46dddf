"""The wake-up protocol under stress: no item lost, no wake-up missed, few wake-ups sent.

The harness can fail: ``test_the_harness_catches_a_broken_ordering`` runs it against a
queue whose producer reads the flag *before* appending (the classic lost wake-up), forces
the one interleaving that loses with events (not pauses, so a loaded machine cannot hide
it), and asserts that the harness reports the lost wake-up.
"""

from __future__ import annotations

import selectors
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from ioserver._wakeup import WakeupQueue

# No I/O core of $IOSERVER_CORE's choice (the wake-up queue alone): CI's second pass, on the
# Python core, leaves these tests out (tests/conftest.py checks the mark).
pytestmark = pytest.mark.core_independent

#: How long the consumer may sleep with an item queued before it counts a lost wake-up.
#: No correct producer takes anywhere near this long between its append and its flag check.
SLEEP_LIMIT = 0.5


@dataclass
class Outcome:
    received: list[Any]
    lost_wakeups: int
    wakes_sent: int


def hammer(
    queue: WakeupQueue[Any],
    *,
    producers: int,
    items: int,
    batch: int,
    widen: Callable[[], None],
) -> Outcome:
    """``producers`` threads each queue ``items`` items, ``batch`` at a time (``put`` for
    batch 1, ``append`` + ``notify`` otherwise), calling ``widen`` inside the producer's
    critical window to make races likely; one consumer thread follows the protocol and
    counts the times it slept through an item."""
    total = producers * items
    received: list[Any] = []
    lost = 0
    done = threading.Event()

    def consumer() -> None:
        nonlocal lost
        selector = selectors.DefaultSelector()
        selector.register(queue.wakeup.fileno(), selectors.EVENT_READ)
        try:
            while len(received) < total:
                while queue.items:
                    received.append(queue.items.popleft())
                if len(received) >= total:
                    break
                if queue.prepare_to_sleep():
                    if not selector.select(SLEEP_LIMIT) and queue.items:
                        lost += 1  # asleep with an item queued and nobody woke us
                    queue.wakeup.drain()
                    queue.woke()
        finally:
            selector.close()
            done.set()

    def producer(number: int) -> None:
        for start in range(0, items, batch):
            if batch == 1:
                queue.put((number, start))
            else:
                for index in range(start, min(start + batch, items)):
                    queue.append((number, index))
                widen()
                queue.notify()
            if start % 64 == 0:
                time.sleep(0)  # let the consumer catch up and go to sleep now and then

    threads = [threading.Thread(target=consumer)]
    threads += [threading.Thread(target=producer, args=(n,)) for n in range(producers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not any(thread.is_alive() for thread in threads), "the stress run hung"
    return Outcome(received, lost, queue.wakes_sent)


class WidenedQueue(WakeupQueue[Any]):
    """The real protocol, with a GIL release inside the producer's window (P1 → P2)."""

    def put(self, item: Any) -> None:
        self.items.append(item)
        time.sleep(0)
        if self.asleep:
            self.asleep = False
            self.wakeup.signal()
            self.wakes_sent += 1


class BrokenQueue(WakeupQueue[Any]):
    """A deliberately broken producer: it reads the flag (P2) before appending (P1).

    The lost wake-up it allows needs one interleaving: the producer reads ``asleep`` while
    the consumer is awake, the consumer then announces its sleep (C1) and re-checks an
    empty queue (C2), and only then the producer appends.  A stress run finds that
    interleaving only by chance (and on a loaded machine sometimes not at all), so this
    queue forces it with two events, whatever the scheduler does: the consumer's first
    announcement waits until the producer has read the flag, and the producer's append
    waits until the consumer has announced and re-checked.  Each wait is bounded, so a
    harness that never reaches the interleaving fails instead of hanging.
    """

    def __init__(self) -> None:
        super().__init__()
        self.flag_read = threading.Event()  # the producer has read ``asleep`` (its P2)
        self.announced = threading.Event()  # the consumer has done C1 and C2 after it

    def prepare_to_sleep(self) -> bool:
        if not self.flag_read.is_set():
            assert self.flag_read.wait(5), "the producer never read the flag"
        sleeping = super().prepare_to_sleep()
        self.announced.set()
        return sleeping

    def put(self, item: Any) -> None:
        asleep = self.asleep  # P2 first: the broken order
        self.flag_read.set()
        assert self.announced.wait(5), "the consumer never announced its sleep"
        self.items.append(item)  # P1, too late: the consumer re-checked before it
        if asleep:
            self.asleep = False
            self.wakeup.signal()
            self.wakes_sent += 1


def check_complete(outcome: Outcome, producers: int, items: int) -> None:
    assert len(outcome.received) == producers * items
    assert len(set(outcome.received)) == producers * items  # exactly once
    for number in range(producers):  # each producer's items in its order
        mine = [index for who, index in outcome.received if who == number]
        assert mine == list(range(items))


@pytest.mark.parametrize("queue_class", [WakeupQueue, WidenedQueue])
def test_commands_direction_put_per_item_loses_nothing(queue_class: type) -> None:
    queue = queue_class()
    try:
        outcome = hammer(queue, producers=4, items=5000, batch=1, widen=lambda: None)
    finally:
        queue.close()
    check_complete(outcome, 4, 5000)
    assert outcome.lost_wakeups == 0
    # One wake-up per sleep at most, not one per item.
    assert outcome.wakes_sent < 4 * 5000


def test_events_direction_one_notify_per_batch_loses_nothing() -> None:
    # Towards a loop there is one producer, the I/O thread: it stages a round's events
    # and publishes them with one notify().
    queue: WakeupQueue[Any] = WakeupQueue()
    try:
        outcome = hammer(queue, producers=1, items=20000, batch=50, widen=lambda: time.sleep(0))
    finally:
        queue.close()
    check_complete(outcome, 1, 20000)
    assert outcome.lost_wakeups == 0
    assert outcome.wakes_sent <= 20000 // 50  # at most one per batch


def test_notify_on_an_empty_queue_writes_nothing() -> None:
    queue: WakeupQueue[Any] = WakeupQueue()
    try:
        assert queue.prepare_to_sleep()
        queue.notify()
        assert queue.wakes_sent == 0
        queue.put("x")
        queue.put("y")  # the consumer has not woken yet: no second write
        assert queue.wakes_sent == 1
        assert queue.wakes_skipped == 1
    finally:
        queue.close()


def test_the_harness_catches_a_broken_ordering() -> None:
    queue = BrokenQueue()
    try:
        # One put: the queue forces the losing interleaving (see BrokenQueue), so the
        # harness must report the lost wake-up on every run, however loaded the machine.
        outcome = hammer(queue, producers=1, items=1, batch=1, widen=lambda: None)
    finally:
        queue.close()
    assert outcome.lost_wakeups == 1, "the harness did not notice a lost wake-up"
    assert outcome.wakes_sent == 0
    assert outcome.received == [(0, 0)]  # taken after the consumer's sleep timed out
