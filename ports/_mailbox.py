"""A mailbox: an unbounded message queue with Erlang's selective receive."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from itertools import repeat
from typing import Any, Protocol, final

import anyio

from ioserver._exceptions import ClosedPortError, WouldBlock
from ioserver._hub import Parker, current_parker

from ._source import EMPTY, Source, Waiter

__all__ = ["Mailbox"]

#: Held ports are swept of closed ones when their number reaches this (then twice the rest).
_SWEEP_AT = 64

Match = Callable[[Any], bool]


class HeldPort(Protocol):
    """What a mailbox needs of a port it owns or holds (``ports.Port``, ``ports.UDPPort``
    and the other kinds are such ports): it closes them with itself.  A protocol rather
    than the port class, so that ``_mailbox`` does not import ``_port``, which imports it."""

    @property
    def owner(self) -> Mailbox | None: ...

    @property
    def closed(self) -> bool: ...

    def close_nowait(self) -> None: ...

    def _took_charge(self, size: int) -> None: ...


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

    **A port's input stays charged until it is received.**  A message a port delivers
    here (its :class:`~ioserver.Data`, a UDP port's datagrams) counts against that port's
    receive watermarks (``high_msgq_watermark``, ``high_msgq_messages``) and the server's
    ``memory_limit`` while it waits in the mailbox, and is counted taken only when it
    leaves: :meth:`receive` (selective or not), :meth:`receive_nowait`,
    :func:`ports.select`, or the mailbox's :meth:`close`.  So an owner that does not
    receive a port's messages - a selective receive that never matches them - pauses that
    port at its high watermark (TCP pushes back on its peer), and the budget holds, unlike
    an Erlang mailbox; the port's other messages and the other ports it owns are not held
    back by it.  Unmatched messages keep their memory until taken: a receive waiting for
    one port while others' unmatched messages fill the budget gets its port's input
    through the budget's reserve (:doc:`/howto/memory`).

    **Owned ports close with their owner.**  A mailbox remembers the ports it owns (those
    whose :meth:`~ports.Port.set_owner` named it, and those an actor holds with
    :meth:`ports.Actor.own`); :meth:`close` closes them, as the ports of an Erlang process
    close when it ends, so their peers see the connection end.
    """

    __slots__ = (
        "_cells",
        "_charges",
        "_closed",
        "_messages",
        "_parker",
        "_ports",
        "_sweep_at",
        "_waiters",
    )

    def __init__(self) -> None:
        self._messages: deque[Any] = deque()
        self._waiters: list[Waiter] = []
        self._closed = False
        self._parker: Parker | None = None
        # The ports this mailbox owns or holds; closed ones are swept out now and then.
        self._ports: set[HeldPort] = set()
        self._sweep_at = _SWEEP_AT
        # Its cell in each I/O half one of its ports is in, ``{id(half): (weak reference
        # to the I/O thread, cell)}`` (None until a port is owned under a memory budget:
        # ``Port.set_owner``).  The budget keeps the paused ports of the mailbox there
        # (see _want_input).  Weak: a long-lived mailbox keeps no stopped server alive.
        self._cells: dict[int, tuple[Any, Any]] | None = None
        # The charge of each queued message, aligned with ``_messages``: for a
        # ``(port, message)`` entry a port delivered charged (``_put_charged``) its charge
        # to the port's window, else None.  Every path that takes messages out takes
        # their charges with them and tells their ports (``_took``).  Beside the entries,
        # not in them: the user sees the tuples Port.set_owner documents.  None until a
        # port delivers one (most mailboxes never hold one); then kept.
        self._charges: deque[int | None] | None = None

    def send_nowait(self, message: object) -> None:
        """Append ``message`` and wake a waiting receiver.

        Raises:
            ClosedPortError: the mailbox is closed.
        """
        if self._closed:
            raise ClosedPortError("this mailbox is closed")
        self._messages.append(message)
        charges = self._charges
        if charges is not None:
            charges.append(None)
        if self._waiters:
            self._wake_all()

    def _put_charged(self, entry: tuple[HeldPort, Any], charge: int) -> None:
        """A port hands its ``entry``, ``(port, message)``, charged ``charge`` bytes to its
        port's window: it stays charged until a receive (or the mailbox's close) takes it
        out.  (The port checked that this mailbox is open.)"""
        messages = self._messages
        charges = self._charges
        appended = False
        try:
            if charges is None:
                charges = self._charges = deque(repeat(None, len(messages)))
            messages.append(entry)
            appended = True
            charges.append(charge)
        except BaseException:
            # (A MemoryError: the entry is dropped, counted taken as it never arrived, and
            # the two deques stay aligned.)
            if appended:
                messages.pop()
            entry[0]._took_charge(charge)
            raise
        if self._waiters:
            self._wake_all()

    @staticmethod
    def _took(removed: list[tuple[Any, int | None]]) -> list[Any]:
        """Messages removed with their charges: count the charged ones taken (their ports
        may resume reading); the messages, in order."""
        for message, charge in removed:
            if charge is not None:
                message[0]._took_charge(charge)
        return [message for message, _charge in removed]

    async def send(self, message: object) -> None:
        """Append ``message`` (see :meth:`send_nowait`); a checkpoint, taken first: a send
        that raises ``Cancelled`` appended nothing."""
        await anyio.lowlevel.checkpoint()
        self.send_nowait(message)

    def _wake_all(self) -> None:
        parker = self._parker or current_parker()
        waiters, self._waiters = self._waiters, []
        if self._cells:
            self._unparked()
        for waiter in waiters:
            parker.wake(waiter)

    def _find(self, match: Match | None, start: int) -> object:
        messages = self._messages
        if match is None:
            if not messages:
                return EMPTY
            message = messages.popleft()
            charges = self._charges
            if charges is not None:
                # The hot path of an actor receiving its ports' input.
                charge = charges.popleft()
                if charge is not None:
                    message[0]._took_charge(charge)
            return message
        for index in range(start, len(messages)):
            message = messages[index]
            if match(message):
                del messages[index]
                charges = self._charges
                if charges is not None:
                    charge = charges[index]
                    del charges[index]
                    if charge is not None:
                        message[0]._took_charge(charge)
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

        It is a checkpoint, taken before a message is taken: a receive that raises
        ``Cancelled`` (or :exc:`TimeoutError`) took nothing, as in trio.

        Raises:
            TimeoutError: ``timeout`` passed with no matching message.
            ClosedPortError: the mailbox is closed (also while waiting).
        """
        await anyio.lowlevel.checkpoint()
        if self._closed:
            raise ClosedPortError("this mailbox is closed")
        message = self._find(match, 0)
        if message is not EMPTY:
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
            self._want_input()
            try:
                await parker.park(waiter)
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
                    if self._cells and not self._waiters:
                        self._unparked()
            if self._closed:
                raise ClosedPortError("this mailbox was closed")
            message = self._find(match, 0)
            if message is not EMPTY:
                return message

    def __len__(self) -> int:
        """The number of queued messages."""
        return len(self._messages)

    def close(self) -> None:
        """Close the mailbox: queued messages are dropped, waiters get ClosedPortError.

        Every port it owns (or holds) is closed too, at once (see the class docstring):
        its peer sees the connection end.  Idempotent.
        """
        self._closed = True
        charges, self._charges = self._charges, None
        if charges is not None:
            # Dropped: counted taken, so their ports may read on (until they close).
            self._took(list(zip(self._messages, charges, strict=True)))
        self._messages.clear()
        ports, self._ports = self._ports, set()
        for port in ports:
            if port.owner is self or port.owner is None:
                port.close_nowait()
        if self._waiters:
            self._wake_all()

    # -- the ports it owns ----------------------------------------------------------------
    @staticmethod
    def _owner_changed(port: HeldPort, old: Mailbox | None, new: Mailbox | None) -> None:
        """``port``'s owner goes from ``old`` to ``new`` (called by ``set_owner``, first).

        Raises:
            ClosedPortError: ``new`` is closed (the port keeps its owner).
        """
        if new is not None and new._closed:
            raise ClosedPortError("the new owner mailbox is closed")
        if old is not None and old is not new:
            old._ports.discard(port)
        if new is not None:
            new._hold(port)

    def _hold(self, port: HeldPort) -> None:
        """Close ``port`` with this mailbox (it owns the port, or its actor holds it)."""
        ports = self._ports
        ports.add(port)
        if len(ports) >= self._sweep_at:
            # Amortised O(1): a long-lived owner of many short-lived ports keeps no garbage.
            self._ports = {held for held in ports if not held.closed}
            self._sweep_at = max(_SWEEP_AT, 2 * len(self._ports))

    def _holds(self, port: HeldPort) -> bool:
        return port in self._ports and not port.closed

    def _remove_all(self, match: Match) -> list[tuple[Any, int | None]]:
        """Remove every queued message ``match`` accepts; return them in order, each with
        its charge (None: not charged), not yet counted taken."""
        messages = self._messages
        charges = self._charges
        if charges is None:
            queued: list[tuple[Any, int | None]] = [(message, None) for message in messages]
        else:
            queued = list(zip(messages, charges, strict=True))
        verdicts = [bool(match(message)) for message, _charge in queued]
        if not any(verdicts):
            return []
        removed = [pair for pair, verdict in zip(queued, verdicts, strict=True) if verdict]
        kept = [pair for pair, verdict in zip(queued, verdicts, strict=True) if not verdict]
        messages.clear()
        messages.extend(message for message, _charge in kept)
        if charges is not None:
            charges.clear()
            charges.extend(charge for _message, charge in kept)
        return removed

    def _take_all(self, match: Match) -> list[Any]:
        """Remove and return every queued message ``match`` accepts, in order (taken)."""
        return self._took(self._remove_all(match))

    def _move_messages_of(self, port: HeldPort, target: Mailbox) -> None:
        """Move the ``(port, message)`` tuples queued for ``port`` to ``target``, in
        order, each with its charge: they stay charged to ``port`` until taken there
        (``Actor.give``)."""
        moved = self._remove_all(
            lambda message: message.__class__ is tuple and len(message) == 2 and message[0] is port
        )
        for message, charge in moved:
            if charge is None:
                target.send_nowait(message)
            else:
                target._put_charged(message, charge)

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called."""
        return self._closed

    # -- select hooks -------------------------------------------------------------------
    def _select_poll(self) -> object:
        if self._closed:
            raise ClosedPortError("this mailbox is closed")
        return self._find(None, 0)

    def _select_arm(self, waiter: Waiter) -> None:
        self._parker = current_parker()
        self._waiters.append(waiter)
        self._want_input()

    def _want_input(self) -> None:
        """A task now waits on this mailbox (its waiter is set): each port it owns that
        the memory budget paused may read into the budget's reserve, as a port with a
        waiting receiver may.  O(1) however many ports it owns: the I/O half keeps the
        mailbox's paused ports in its cell (``ioserver._flow.OwnerCell``, the native
        ``OwnerCell``), and ``park`` marks the mailbox waiting, then reads whether any is
        paused (the I/O thread adds a paused port to the cell, then reads whether the
        mailbox waits: one of the two sees the other).  Only if one is does it ask the I/O
        thread (``cmd_want_owner``), which lets those ports try the reserve: O(the
        mailbox's paused ports), on the I/O thread."""
        cells = self._cells
        if cells:
            for io_ref, cell in cells.values():
                if cell.park():
                    io = io_ref()
                    if io is not None:
                        io.commands.put((io.cmd_want_owner, cell, None))

    def _unparked(self) -> None:
        """No task waits on this mailbox any more: its cells say so (a stale mark would
        only let a port read once into the reserve with nobody to take it at once)."""
        for _, cell in self._cells.values():  # type: ignore[union-attr]
            cell.unpark()

    def _cell(self, io: Any, conn: object) -> Any:
        """This mailbox's cell in the I/O half of ``conn`` (made the first time): what the
        port tells that half its owner is (``cmd_owner``)."""
        cells = self._cells
        if cells is None:
            cells = self._cells = {}
        cell = io.owner_cell(conn, cells)
        if self._waiters:
            # A task parked before this cell existed (a port handed to a mailbox already
            # received on, as Erlang's controlling_process): mark it now, before the
            # port's cmd_owner is queued, for the I/O thread to see the owner waiting.
            cell.park()
        return cell

    def _select_disarm(self, waiter: Waiter) -> None:
        try:
            self._waiters.remove(waiter)
        except ValueError:
            return
        if self._cells and not self._waiters:
            self._unparked()
