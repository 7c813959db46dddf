"""The wake-up protocol under stress: no item lost, no wake-up missed, few wake-ups sent.

The harness can fail: ``test_the_harness_catches_a_broken_ordering`` runs it against a
queue whose producer reads the flag *before* appending (the classic lost wake-up), and
asserts that the harness reports the lost wake-ups.
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
    stop_after_lost: int | None = None,
    pause: float = 0.0,
    pause_every: int = 1,
) -> Outcome:
    """``producers`` threads each queue ``items`` items, ``batch`` at a time (``put`` for
    batch 1, ``append`` + ``notify`` otherwise), calling ``widen`` inside the producer's
    critical window to make races likely, and sleeping ``pause`` seconds between batches;
    one consumer thread follows the protocol and counts the times it slept through an item."""
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
                        if stop_after_lost is not None and lost >= stop_after_lost:
                            return
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
            if pause and (start // batch) % pause_every == pause_every - 1:
                time.sleep(pause)  # longer than SLEEP_LIMIT: no later item hides a loss
            elif start % 64 == 0:
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
    """A deliberately broken producer: it reads the flag before appending.

    To make the lost wake-up happen on any machine, however loaded, the producer holds its
    window open (bounded) until the consumer announces its sleep - the interleaving that a
    stress run otherwise finds only by chance.
    """

    def __init__(self) -> None:
        super().__init__()
        self.consumer_sleeping = threading.Event()

    def prepare_to_sleep(self) -> bool:
        sleeping = super().prepare_to_sleep()
        if sleeping:
            self.consumer_sleeping.set()
        return sleeping

    def woke(self) -> None:
        self.consumer_sleeping.clear()
        super().woke()

    def put(self, item: Any) -> None:
        asleep = self.asleep
        self.consumer_sleeping.wait(5)  # the window between the read and the append
        self.items.append(item)
        if asleep:
            self.consumer_sleeping.clear()  # it is being woken: no longer a sleeper
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
        outcome = hammer(
            queue,
            producers=1,
            items=4,
            batch=1,
            widen=lambda: None,
            stop_after_lost=1,
            # Two puts back to back: the first wakes the sleeping consumer and clears the
            # flag, so the second reads it down, waits in its window until the consumer has
            # drained and gone to sleep again, then appends without a wake-up.
            pause=SLEEP_LIMIT * 1.5,
            pause_every=2,
        )
    finally:
        queue.close()
    assert outcome.lost_wakeups > 0, "the harness did not notice lost wake-ups in a broken queue"
