"""A memory channel that :func:`ports.select` can wait on, next to ports and mailboxes."""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, final

import anyio.abc
import trio.abc

from ioserver._exceptions import BrokenPortError, ClosedPortError, EndOfPort, WouldBlock
from ioserver._hub import Parker, current_parker

from ._source import EMPTY, Empty, Source, Waiter

__all__ = [
    "MemoryChannelStatistics",
    "MemoryReceiveChannel",
    "MemorySendChannel",
    "open_memory_channel",
]

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class MemoryChannelStatistics:
    """A snapshot of a memory channel, as trio's ``MemoryChannelStatistics``."""

    current_buffer_used: int  #: messages buffered now
    max_buffer_size: float  #: the capacity (``math.inf`` for unbounded)
    open_send_channels: int  #: 1 while the send end is open, else 0
    open_receive_channels: int  #: 1 while the receive end is open, else 0
    tasks_waiting_send: int  #: senders waiting for room
    tasks_waiting_receive: int  #: receivers (and selects) waiting for a message


class _State(Generic[T]):
    __slots__ = (
        "buffer",
        "capacity",
        "parker",
        "receive_closed",
        "receive_waiters",
        "send_closed",
        "send_waiters",
    )

    def __init__(self, capacity: float) -> None:
        self.buffer: deque[T] = deque()
        self.capacity = capacity
        self.send_closed = False
        self.receive_closed = False
        self.send_waiters: list[Waiter] = []
        self.receive_waiters: list[Waiter] = []
        self.parker: Parker | None = None

    def wake(self, waiters: list[Waiter]) -> None:
        if waiters:
            parker = self.parker or current_parker()
            for waiter in waiters:
                parker.wake(waiter)
            waiters.clear()


async def _park(state: _State[Any], waiters: list[Waiter]) -> None:
    parker = state.parker = current_parker()
    waiter = Waiter()
    waiters.append(waiter)
    try:
        await parker.park(waiter)
    finally:
        if waiter in waiters:
            waiters.remove(waiter)


@final
class MemorySendChannel(anyio.abc.ObjectSendStream[T], trio.abc.SendChannel[T]):
    """The sending end of :func:`open_memory_channel`."""

    __slots__ = ("_closed", "_state")

    def __init__(self, state: _State[T]) -> None:
        self._state = state
        self._closed = False

    def send_nowait(self, item: T) -> None:
        """Buffer ``item`` if there is room.

        Raises:
            WouldBlock: the buffer is full.
            ClosedPortError: this end is closed.
            BrokenPortError: the receive end is closed: nobody will ever receive it.
        """
        state = self._state
        if self._closed:
            raise ClosedPortError("this channel's send end is closed")
        if state.receive_closed:
            raise BrokenPortError("the channel's receive end is closed")
        if len(state.buffer) >= state.capacity:
            raise WouldBlock("the channel's buffer is full")
        state.buffer.append(item)
        state.wake(state.receive_waiters)

    async def send(self, item: T) -> None:
        """Buffer ``item``, waiting for room if the buffer is full.

        A checkpoint, taken before it buffers: a send that raises ``Cancelled`` buffered
        nothing (trio's rule).

        Raises:
            ClosedPortError, BrokenPortError: as :meth:`send_nowait`.
        """
        state = self._state
        while True:
            # Checkpoint, then act: a send that raises Cancelled buffered nothing.
            await anyio.lowlevel.checkpoint()
            try:
                self.send_nowait(item)
            except WouldBlock:
                await _park(state, state.send_waiters)
            else:
                return

    async def aclose(self) -> None:
        """Close this end (see :meth:`close`); a checkpoint."""
        self.close()
        await anyio.lowlevel.checkpoint()

    def close(self) -> None:
        """Close this end: receivers get :exc:`EndOfPort` once the buffer is drained.

        Idempotent; synchronous, as trio's ``MemorySendChannel.close``.
        """
        if not self._closed:
            self._closed = True
            state = self._state
            state.send_closed = True
            state.wake(state.receive_waiters)
            state.wake(state.send_waiters)

    async def __aenter__(self) -> MemorySendChannel[T]:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def statistics(self) -> MemoryChannelStatistics:
        """The channel's counters now."""
        return _statistics(self._state)


@final
class MemoryReceiveChannel(Source, anyio.abc.ObjectReceiveStream[T], trio.abc.ReceiveChannel[T]):
    """The receiving end of :func:`open_memory_channel`; a source for :func:`ports.select`."""

    __slots__ = ("_closed", "_state")

    def __init__(self, state: _State[T]) -> None:
        self._state = state
        self._closed = False

    def receive_nowait(self) -> T:
        """Take the oldest buffered item.

        Raises:
            WouldBlock: the buffer is empty.
            EndOfPort: the buffer is empty and the send end is closed.
            ClosedPortError: this end is closed.
        """
        item = self._select_poll()
        if item is EMPTY:
            raise WouldBlock("the channel's buffer is empty")
        return item

    async def receive(self) -> T:
        """Wait for the oldest item and take it.

        A checkpoint, taken before it takes: a receive that raises ``Cancelled`` took
        nothing, even when a send woke it in the same tick (trio's rule).

        Raises:
            EndOfPort: the send end is closed and the buffer drained (``async for`` ends).
            ClosedPortError: this end is closed.
        """
        state = self._state
        while True:
            # Checkpoint, then take: a receive that raises Cancelled took nothing, even
            # when it was woken by a send in the same tick as the cancellation.
            await anyio.lowlevel.checkpoint()
            item = self._select_poll()
            if item is not EMPTY:
                return item
            await _park(state, state.receive_waiters)

    def _select_poll(self) -> T | Empty:
        if self._closed:
            raise ClosedPortError("this channel's receive end is closed")
        state = self._state
        if state.buffer:
            item = state.buffer.popleft()
            state.wake(state.send_waiters)
            return item
        if state.send_closed:
            raise EndOfPort("the channel's send end is closed")
        return EMPTY

    def _select_arm(self, waiter: Waiter) -> None:
        self._state.parker = current_parker()
        self._state.receive_waiters.append(waiter)

    def _select_disarm(self, waiter: Waiter) -> None:
        try:
            self._state.receive_waiters.remove(waiter)
        except ValueError:
            pass

    async def aclose(self) -> None:
        """Close this end (see :meth:`close`); a checkpoint."""
        self.close()
        await anyio.lowlevel.checkpoint()

    def close(self) -> None:
        """Close this end: buffered items are dropped, senders get BrokenPortError.

        Idempotent; synchronous, as trio's ``MemoryReceiveChannel.close``.
        """
        if not self._closed:
            self._closed = True
            state = self._state
            state.receive_closed = True
            state.buffer.clear()
            state.wake(state.send_waiters)
            state.wake(state.receive_waiters)

    def __aiter__(self) -> MemoryReceiveChannel[T]:
        return self

    async def __anext__(self) -> T:
        try:
            return await self.receive()
        except EndOfPort:
            raise StopAsyncIteration from None

    async def __aenter__(self) -> MemoryReceiveChannel[T]:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def statistics(self) -> MemoryChannelStatistics:
        """The channel's counters now."""
        return _statistics(self._state)


def _statistics(state: _State[Any]) -> MemoryChannelStatistics:
    return MemoryChannelStatistics(
        current_buffer_used=len(state.buffer),
        max_buffer_size=state.capacity,
        open_send_channels=0 if state.send_closed else 1,
        open_receive_channels=0 if state.receive_closed else 1,
        tasks_waiting_send=len(state.send_waiters),
        tasks_waiting_receive=len(state.receive_waiters),
    )


def open_memory_channel(
    max_buffer_size: float,
) -> tuple[MemorySendChannel[Any], MemoryReceiveChannel[Any]]:
    """A channel of Python objects within one event loop, as trio's
    :func:`~trio.open_memory_channel`, whose receive end :func:`ports.select` can wait on.

    Args:
        max_buffer_size: how many items may wait in the buffer before ``send`` waits;
            ``0`` makes every send wait for room (there is no rendezvous: an item is
            buffered while a receiver is waiting), ``math.inf`` never waits.

    Returns:
        ``(send_channel, receive_channel)``.

    Raises:
        ValueError: ``max_buffer_size`` is negative or not a number.
    """
    if not isinstance(max_buffer_size, (int, float)) or isinstance(max_buffer_size, bool):
        raise ValueError("max_buffer_size must be an int or math.inf")
    if max_buffer_size < 0 or (isinstance(max_buffer_size, float) and max_buffer_size != math.inf):
        raise ValueError("max_buffer_size must be a non-negative int or math.inf")
    state: _State[Any] = _State(max_buffer_size)
    return MemorySendChannel(state), MemoryReceiveChannel(state)
