"""A mailbox: an unbounded message queue with Erlang's selective receive."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any, final

import anyio

from ioserver._exceptions import ClosedPortError, WouldBlock
from ioserver._hub import Parker, current_parker

from ._source import EMPTY, Source, Waiter

__all__ = ["Mailbox"]

Match = Callable[[Any], bool]


@final
class Mailbox(Source):
    """An actor's mailbox: anyone in the loop sends, the owner receives, in order.

    ``receive(match=...)`` is Erlang's selective receive: it takes the *first* message for
    which ``match(message)`` is true, leaving the others queued in their order, and waits
    if none matches yet.  A mailbox is a source for :func:`ports.select` (which takes the
    oldest message) and the owner a port can deliver to (:meth:`ports.Port.set_owner`),
    in which case its messages arrive as ``(port, message)`` tuples.

    Mailboxes are unbounded, as Erlang's are: senders never wait.  Use it from one event
    loop (its thread); the I/O thread reaches it through the loop's hub.
    """

    __slots__ = ("_closed", "_messages", "_parker", "_waiters")

    def __init__(self) -> None:
        self._messages: deque[Any] = deque()
        self._waiters: list[Waiter] = []
        self._closed = False
        self._parker: Parker | None = None

    def send_nowait(self, message: Any) -> None:
        """Append ``message`` and wake a waiting receiver.

        Raises:
            ClosedPortError: the mailbox is closed.
        """
        if self._closed:
            raise ClosedPortError("this mailbox is closed")
        self._messages.append(message)
        if self._waiters:
            self._wake_all()

    async def send(self, message: Any) -> None:
        """Append ``message`` (see :meth:`send_nowait`); a checkpoint."""
        self.send_nowait(message)
        await anyio.lowlevel.checkpoint()

    def _wake_all(self) -> None:
        parker = self._parker or current_parker()
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            parker.wake(waiter)

    def _find(self, match: Match | None, start: int) -> Any:
        messages = self._messages
        if match is None:
            return messages.popleft() if messages else EMPTY
        for index in range(start, len(messages)):
            message = messages[index]
            if match(message):
                del messages[index]
                return message
        return EMPTY

    def receive_nowait(self, match: Match | None = None) -> Any:
        """Take the first message (the first that ``match`` accepts) without waiting.

        Raises:
            WouldBlock: no such message is queued.
            ClosedPortError: the mailbox is closed.
        """
        if self._closed:
            raise ClosedPortError("this mailbox is closed")
        message = self._find(match, 0)
        if message is EMPTY:
            raise WouldBlock("no matching message in the mailbox")
        return message

    async def receive(self, match: Match | None = None, *, timeout: float | None = None) -> Any:
        """Wait for the first message that ``match`` accepts (any message if ``None``).

        As Erlang's ``receive Pattern -> ... after Timeout -> ... end``: messages that do not
        match stay queued, in order, for later receives.  ``match`` may be called more
        than once on a message, so it should be a pure test.

        Args:
            match: a predicate on messages, or ``None``.
            timeout: seconds to wait at most; ``None`` waits forever.

        Raises:
            TimeoutError: ``timeout`` passed with no matching message.
            ClosedPortError: the mailbox is closed (also while waiting).
        """
        if self._closed:
            raise ClosedPortError("this mailbox is closed")
        message = self._find(match, 0)
        if message is not EMPTY:
            await anyio.lowlevel.checkpoint()
            return message
        if timeout is None:
            return await self._wait(match)
        with anyio.fail_after(timeout):
            return await self._wait(match)

    async def _wait(self, match: Match | None) -> Any:
        parker = self._parker = current_parker()
        while True:
            waiter = Waiter()
            self._waiters.append(waiter)
            try:
                await parker.park(waiter)
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
            if self._closed:
                raise ClosedPortError("this mailbox was closed")
            message = self._find(match, 0)
            if message is not EMPTY:
                return message

    def __len__(self) -> int:
        """The number of queued messages."""
        return len(self._messages)

    def close(self) -> None:
        """Close the mailbox: queued messages are dropped, waiters get ClosedPortError."""
        self._closed = True
        self._messages.clear()
        if self._waiters:
            self._wake_all()

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called."""
        return self._closed

    # -- select hooks -------------------------------------------------------------------
    def _select_poll(self) -> Any:
        if self._closed:
            raise ClosedPortError("this mailbox is closed")
        return self._messages.popleft() if self._messages else EMPTY

    def _select_arm(self, waiter: Waiter) -> None:
        self._parker = current_parker()
        self._waiters.append(waiter)

    def _select_disarm(self, waiter: Waiter) -> None:
        try:
            self._waiters.remove(waiter)
        except ValueError:
            pass
