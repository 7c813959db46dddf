"""``select``: wait on several sources at once, take exactly one message."""

from __future__ import annotations

import itertools
import math
from typing import Any

import anyio

from ioserver._hub import Parker, current_parker

from ._source import EMPTY, Source, Waiter
from ._timers import Deadline

__all__ = ["select"]

_rotation = itertools.count()


async def select(*sources: Source, timeout: float | None = None) -> tuple[Source, Any]:
    """Wait until one of ``sources`` has a message; take it and return ``(source, message)``.

    Exactly one message is consumed, from exactly one source; the others keep theirs.  A
    select that raises ``Cancelled`` (or :exc:`TimeoutError`) consumed nothing, even when
    a message arrived in the same tick as the cancellation (trio's rule).  No
    task is spawned: each source's buffer is polled (starting from a rotating position, so
    a busy source cannot starve the others), and only if all are empty does the calling
    task park, with one waiter armed on every source.  This is the single wait over I/O,
    mailboxes and channels that Erlang's ``receive`` gives a process.

    Sources: :class:`~ports.Port`, :class:`~ports.Listener`, :class:`~ports.Mailbox`,
    :class:`~ports.MemoryReceiveChannel` and :class:`~ports.Deadline` (a time, which
    delivers one :class:`~ports.Timeout`).  A passive port is asked for one read while the
    select waits on it, as ``receive`` would.

    Args:
        sources: one or more sources.
        timeout: seconds to wait at most; ``None`` waits forever.

    Returns:
        ``(source, message)``: the source the message came from, and the message.

    Raises:
        TimeoutError: ``timeout`` passed and no source had a message (``timeout=0``
            polls: a message already there is returned).
        EndOfPort: a source has delivered its final message already (a port whose
            :class:`~ioserver.Closed` was received, a channel whose send end is closed and
            drained): stop selecting on it.
        ClosedPortError: a source was closed by this side.
        TypeError: a source is not selectable.
    """
    count = len(sources)
    if not count:
        raise TypeError("select() needs at least one source")
    wake_at = math.inf  # the earliest Deadline among the sources
    for source in sources:
        if not isinstance(source, Source):
            raise TypeError(f"select() cannot wait on {type(source).__name__}")
        if source.__class__ is Deadline:
            wake_at = min(wake_at, source.deadline)
    start = next(_rotation) % count
    order = sources[start:] + sources[:start] if start else sources
    parker = current_parker()
    if timeout is None:
        return await _select(order, parker, wake_at)
    # The first checkpoint and poll come before the timeout's scope: a message already
    # there is taken even with timeout=0 (a poll, as Mailbox.receive's and Erlang's
    # ``after 0``), on both backends - in the scope, trio's checkpoint would raise first.
    taken = await _poll(order, parker)
    if taken is not None:
        return taken
    with anyio.fail_after(timeout):
        return await _select(order, parker, wake_at)


async def _poll(order: tuple[Source, ...], parker: Parker) -> tuple[Source, Any] | None:
    """The checkpoint, then the first message any source of ``order`` holds (taken), or
    None: nothing is awaited after the take."""
    await parker.checkpoint_first()
    for source in order:
        message = source._select_poll()
        if message is not EMPTY:
            return source, message
    return None


async def _select(order: tuple[Source, ...], parker: Parker, wake_at: float) -> tuple[Source, Any]:
    while True:
        # The checkpoint comes before the poll, and nothing is awaited between taking a
        # message and returning it: a select that raises Cancelled took nothing (trio's
        # rule).  After a wake-up the loop comes back here, so a select woken and cancelled
        # in the same tick leaves the message in its source.
        taken = await _poll(order, parker)
        if taken is not None:
            return taken
        waiter = Waiter()
        for source in order:
            source._select_arm(waiter)
        try:
            if wake_at == math.inf:
                await parker.park(waiter)
            else:
                # A Deadline is due at wake_at: park no longer, then poll it again.
                with anyio.CancelScope(deadline=wake_at):
                    await parker.park(waiter)
        finally:
            for source in order:
                source._select_disarm(waiter)
