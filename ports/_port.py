"""Ports: an actor's handle on a socket that the I/O thread owns.

A :class:`Port` is a channel of messages in (:class:`~ioserver.Data`, then one final
:class:`~ioserver.Closed`) and of bytes out.  It is an anyio
:class:`~anyio.abc.ObjectStream` and a trio :class:`~trio.abc.Channel` at once, so code
written for either uses it unchanged.  A :class:`Listener` is a port whose messages are
:class:`~ioserver.Accepted` connections.

The event loop's half of a port (this module) never touches the socket: ``send`` queues a
command for the I/O thread and returns; messages arrive through the loop's hub, which
calls :meth:`_PortBase._deliver` in-loop.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Coroutine, Sequence, Sized
from dataclasses import dataclass
from functools import lru_cache, partial
from typing import TYPE_CHECKING, Any, ClassVar, Self, final

import anyio
import anyio.abc
import trio
import trio.abc
from anyio import TypedAttributeProvider
from anyio.abc import SocketAttribute
from anyio.streams.tls import TLSAttribute

from ioserver._conn import Conn
from ioserver._contract import SocketAddress, inet_address
from ioserver._exceptions import (
    BrokenPortError,
    BusyPortError,
    ClosedPortError,
    ConnectError,
    EndOfPort,
    OptionError,
    SendTimeoutError,
    WouldBlock,
)
from ioserver._flow import Window
from ioserver._framing import PACKET_OVERHEAD, Framer, PacketMode, port_framer
from ioserver._hub import RESUMED, Hub, trio_waits, wait_woken
from ioserver._iothread import IOThread
from ioserver._messages import WRITABLE, Accepted, Closed, Data, Message, Passive
from ioserver._options import (
    Active,
    FlowSettings,
    apply_active_mode,
    parse_active,
)
from ioserver._server import IOServer

from ._mailbox import Mailbox
from ._source import EMPTY, Source, Waiter

#: ``_PortBase._notify`` when an active=N count ran out and its Passive is on its way.
PASSIVE_PENDING = 2

_checkpoint_if_cancelled = trio.lowlevel.checkpoint_if_cancelled
_current_task = trio.lowlevel.current_task
_reschedule = trio.lowlevel.reschedule

__all__ = ["Listener", "Port", "PortStatistics"]


class _VirtualBase:
    """A base class that the type checker sees and the class statement drops.

    anyio's stream ABCs (and :class:`anyio.TypedAttributeProvider` under them) declare no
    ``__slots__``, so a class that inherits them gets a ``__dict__``, and CPython 3.11 then
    makes every instance a values array for it (44 bytes a port, in a second block) though
    no port ever puts anything there.  A port class names such an ABC through this object
    instead: ``__mro_entries__`` removes it from the bases, and :func:`_register_virtual`
    registers the class as the ABC's virtual subclass, so ``isinstance`` and ``issubclass``
    answer as before; what the ABC's classes define that a port does not
    (``TypedAttributeProvider.extra``) ``_PortBase`` takes as it is.  trio's ABCs declare
    ``__slots__ = ()`` and stay real bases.
    """

    __slots__ = ("abc",)

    def __init__(self, abc: type) -> None:
        self.abc = abc

    def __getitem__(self, _item: object) -> _VirtualBase:
        return self  # ``ObjectStream[Message]``: the parameter is the type checker's only

    def __mro_entries__(self, _bases: tuple[object, ...]) -> tuple[()]:
        return ()


def _register_virtual(cls: type, *abcs: type) -> None:
    """Make ``cls`` a virtual subclass of each ABC (see :class:`_VirtualBase`)."""
    for abc in abcs:
        abc.register(cls)  # type: ignore[attr-defined]


if TYPE_CHECKING:
    _ObjectStream = anyio.abc.ObjectStream
    _ObjectReceiveStream = anyio.abc.ObjectReceiveStream
    _ObjectSendStream = anyio.abc.ObjectSendStream
else:
    _ObjectStream = _VirtualBase(anyio.abc.ObjectStream)
    _ObjectReceiveStream = _VirtualBase(anyio.abc.ObjectReceiveStream)
    _ObjectSendStream = _VirtualBase(anyio.abc.ObjectSendStream)


@dataclass(frozen=True, slots=True)
class PortStatistics:
    """A snapshot of one port's counters, as returned by :meth:`Port.statistics`."""

    messages_buffered: int  #: delivered to the port, not yet received
    bytes_received: int  #: read from the socket so far
    bytes_sent: int  #: written to the socket so far
    bytes_queued: int  #: sent by the actor, not yet written to the socket
    active: Active  #: the active mode last set
    closed: bool  #: closed by this side
    bytes_buffered_in: int = 0  #: delivered to the port, not yet taken by its owner
    bytes_buffered_out: int = 0  #: sent by the owner, not yet written to the socket
    peak_buffered: int = 0  #: the most input ever buffered (undelivered + framing)
    pauses: int = 0  #: times reading stopped for backpressure (watermark or budget)
    busy_transitions: int = 0  #: times a send found the port busy (output above high)
    packets_too_large: int = 0  #: packets refused for exceeding packet_size
    #: ``Error`` reports dropped because the port was over its high watermark (its owner
    #: was not taking its messages): UDP and TUN/TAP ports
    errors_dropped: int = 0


class _Request(Waiter):
    """A connect or listen request waiting for the I/O thread's answer."""

    __slots__ = ("cancelled", "hub", "io", "result")

    def __init__(self, io: IOThread, hub: Hub) -> None:
        super().__init__()
        self.io = io
        self.hub = hub
        self.result: object = EMPTY
        self.cancelled = False

    def _deliver(self, result: object) -> None:
        if self.cancelled:
            self._release(result)  # nobody waits any more
            return
        self.result = result
        self.hub.wake(self)

    async def wait(self) -> Any:
        """The I/O thread's answer; if this raises (a cancellation), whatever the I/O
        thread opened for the request is closed, answered already or not (trio's rule:
        the operation did not happen)."""
        try:
            while self.result is EMPTY:
                await self.hub.park(self)
        except BaseException:
            self.cancelled = True
            # Answered in the batch that also delivered the cancellation, before this task
            # resumed: nobody will own it.
            self._release(self.result)
            raise
        return self.result

    def _release(self, result: object) -> None:
        """Close what the I/O thread opened for this request, if it opened something."""
        if isinstance(result, tuple):  # (conn, local address, remote address)
            self.io.submit(self.io.cmd_close, result[0], None)


async def _opened(request: _Request, port: Any) -> Any:
    """The I/O half's answer to ``request``, which opens ``port`` (a port of this
    module's kinds, or one built on them).

    Raises:
        ConnectError, OptionError: what the I/O half answered (``port`` is closed).
        Cancelled: the wait was cancelled: the socket is closed (by the request), and the
            abandoned ``port`` is closed, so that what the I/O half delivered to it before
            the socket closed is counted taken (a closed port's ``_deliver``).
    """
    try:
        result = await request.wait()
    except BaseException:
        port.close_nowait()
        raise
    if isinstance(result, BaseException):
        port.close_nowait()
        raise result
    return result


class _PortBase(Source):
    """What ports and listeners share: the buffer, waiting, closing, owner, select hooks."""

    __slots__ = (
        "_buffer",
        "_closed",
        "_conn",
        "_credit",
        "_ended",
        "_hub",
        "_io",
        "_local_address",
        "_notify",
        "_owner",
        "_remote_address",
        "_select_waiters",
        "_terminal",
        "_waiter",
        "_window",
    )

    def __init__(
        self,
        server: IOServer,
        active: tuple[int, bool],
        framer: Framer | None = None,
        native: bool = False,
    ) -> None:
        hub = server._hub
        self._hub: Hub = hub
        self._io: IOThread = server._io
        self._conn: Conn | None = None
        # A list, not a deque: an empty list holds no item array (56 bytes against a
        # deque's 760, which it keeps), and a port's buffer is short - bounded by its
        # receive watermarks (high_msgq_messages), a listener's by the descriptors it
        # may accept - so pop(0) moves few pointers.  No list at all until the first
        # message stays in the port or a task waits on it: the empty tuple (shared) - a
        # port whose owner is a mailbox never buffers (56 bytes a port less).
        self._buffer: list[Message] | tuple[()] = ()
        self._waiter: Any = None
        # The tasks selecting on this port: an empty tuple (shared) until the first.
        self._select_waiters: list[Waiter] | tuple[()] = ()
        self._closed = False  # closed by this side
        self._terminal = False  # the final Closed message has been delivered
        self._ended = False  # ... and received: receive raises EndOfPort
        # ``_notify``: True - Passive is delivered when an active=N count runs out;
        # PASSIVE_PENDING (2, truthy) - and it ran out: the Passive is on its way (one
        # slot for both, issue 14); False - "once" or passive.
        self._notify: int
        self._credit, self._notify = active
        self._owner: Mailbox | None = None
        self._local_address: object = None
        self._remote_address: object = None
        # Flow control (ioserver._flow): the one object the I/O thread reads of this half.
        # It counts what the owner took, as the I/O half counts what it delivered.
        # Each packet a framer delivers is charged PACKET_OVERHEAD on top of its bytes,
        # popped from the window's sizes as the owner takes it.
        # (The I/O half says which class: the native core's keeps its counters in atomics,
        # for the ports its thread carries itself - ``native``, a TCP port without TLS;
        # its hosted half's ports have the Python core's.)
        window_class = getattr(server._io, "window_class", Window) if native else Window
        window = self._window = window_class(framer, PACKET_OVERHEAD)
        if window.took is None:
            # Asked by the Python core's memory budget; the native core has its counters
            # in atomics and asks nothing of the loop half (and one bound method per port
            # is 64 bytes).
            window.task_waits = self._task_waits

    #: anyio's typed attributes (see :class:`_VirtualBase`: a port inherits no anyio class).
    extra = TypedAttributeProvider.extra

    def _submit(self, command: tuple[Any, Any, Any]) -> None:
        """Queue ``(function, target, argument)`` for the I/O thread (a method, not a bound
        ``commands.put`` kept per port: that was 64 bytes a port)."""
        self._io.commands.put(command)

    def _task_waits(self) -> bool:
        """A task is parked on this port for its next message - ``receive`` or ``select``
        on the port, or on the :class:`Mailbox` that owns it (asked by the I/O thread, for
        the memory budget's reserve: see ioserver._flow)."""
        owner = self._owner
        if owner is not None:
            return bool(owner._waiters)
        return self._receiving() or bool(self._select_waiters)

    def _took_data(self, data: Sized) -> None:
        """Count a Data message as taken (received, handed to an owner, or dropped): its
        charge is its length, or for a framed port the next of the window's sizes."""
        self._took_charge(self._charge_of(data))

    def _charge_of(self, data: Sized) -> int:
        """The charge of a Data message being handed to an owner mailbox: its length, or
        for a framed port its charge popped from the window's sizes (they are popped in
        delivery order; the mailbox keeps it beside the entry, for :meth:`_took_charge`
        when a receive takes the entry - in any order)."""
        sizes = self._window.sizes
        return len(data) if sizes is None else sizes.popleft()

    def _took_charge(self, size: int) -> None:
        """Count a message charged ``size`` as taken: what :meth:`_took_data` does once
        the charge is known (a mailbox entry's, kept since :meth:`_charge_of`)."""
        window = self._window
        took = window.took
        if took is not None:
            generation = took(size)
            if generation is not None:
                self._submit((self._io.cmd_resume, self._conn, generation))
            return
        window.consumed_messages += 1
        window.consumed_bytes += size
        self._hub.consumed_bytes += size
        conn = self._conn
        if conn is not None and conn.pause_generation != window.resume_generation:
            self._maybe_resume()

    def _maybe_resume(self) -> None:
        """The I/O thread paused reading this port: ask it to read again once the owner
        has taken enough (step 2 of the handshake in ioserver._flow)."""
        conn = self._conn
        assert conn is not None
        generation = self._window.resume_due(conn)
        if generation is not None:
            self._submit((self._io.cmd_resume, conn, generation))

    # -- delivery (in-loop, called by the hub) -------------------------------------------
    def _deliver(self, message: Any) -> None:
        if self._closed:
            if message.__class__ is Data:
                self._took_data(message.data)
            elif message.__class__ is Accepted:
                message.port.close_nowait()  # nobody will ever own it
            return
        if message.__class__ is Data:
            if self._credit > 0:
                self._credit -= 1
                if self._credit == 0 and self._notify:
                    self._notify = PASSIVE_PENDING
        elif message.__class__ is Passive:
            if self._notify == PASSIVE_PENDING:
                self._notify = True
        elif message.__class__ is Closed:
            if self._terminal:
                # Receiving ended already (e.g. the peer's EOF); the connection has now
                # broken or closed too: sends must fail, a waiting sender must wake.
                self._on_terminal(message)
                return
            self._terminal = True
            self._on_terminal(message)
        elif message is WRITABLE:
            self._on_writable()
            return
        owner = self._owner
        if owner is not None:
            if message.__class__ is Data and not owner._closed:
                # _to_owner, inlined for a Data (the owner path of every message).
                owner._put_charged((self, message), self._charge_of(message.data))
            else:
                self._to_owner(owner, message)
            return
        buffer = self._buffer
        if isinstance(buffer, list):
            buffer.append(message)
        else:
            self._buffer = [message]
        waiter = self._waiter
        if waiter is not None:
            # Hub.wake, inlined (the hot path of every message).
            self._waiter = None
            if self._hub.is_trio:
                if waiter.custom_sleep_data is self:  # (else a cancellation woke it)
                    _reschedule(waiter, RESUMED)
            elif not waiter.done():
                waiter.set_result(None)
        if self._select_waiters:
            wake = self._hub.wake
            for waiter in self._select_waiters:
                wake(waiter)

    #: The messages charged to the port's window, counted taken as the owner takes them
    #: (a UDP port's are Datagram and Packet).
    _CHARGED: ClassVar[tuple[type, ...]] = (Data,)

    def _to_owner(self, owner: Mailbox, message: Any) -> None:
        """Hand ``message`` to the owner mailbox as ``(self, message)``.  A charged message
        (Data) stays charged to this port - its window's watermarks and the memory budget -
        while it waits in the mailbox: the mailbox keeps its charge beside the entry and
        counts it taken when a receive takes the entry (``Mailbox._put_charged``).  Before,
        it was counted taken here, so an owner whose selective receive never matched let
        its port read without bound."""
        charged = isinstance(message, self._CHARGED)
        if owner.closed:
            # Its owner is gone, as an Erlang port whose owner died: close the port.
            if charged:
                self._took_data(message.data)
            self.close_nowait()
            return
        if charged:
            owner._put_charged((self, message), self._charge_of(message.data))
        else:
            owner.send_nowait((self, message))

    def _on_terminal(self, message: Closed) -> None:
        pass

    def _on_writable(self) -> None:
        pass

    def _receiving(self) -> bool:
        """A task waits in ``receive`` on this port (on trio: and was not cancelled out of
        it, which it leaves as it resumes; see ioserver._hub's trio parking)."""
        if self._waiter is None:
            return False
        return not self._hub.is_trio or trio_waits(self)

    # -- receiving ----------------------------------------------------------------------
    def _take(self) -> Message:
        # (Called with a message buffered: the buffer is a list.)
        message = self._buffer.pop(0)  # type: ignore[union-attr]
        if message.__class__ is Data:
            self._took_data(message.data)
        elif message.__class__ is Closed:
            self._ended = True
        return message

    def _check_can_wait(self, end: type[Exception]) -> None:
        if self._closed:
            raise ClosedPortError("this port is closed")
        if self._ended:
            raise end("this port has delivered its final message")
        if self._owner is not None:
            raise ClosedPortError(
                "this port's messages go to its owner mailbox; receive from the mailbox"
            )
        if self._credit == 0 and self._notify != PASSIVE_PENDING:
            # Passive: ask the I/O thread for one message, as gen_tcp:recv does.  (Not
            # while a Passive notice is on its way: that notice is the next message.)
            self._credit = 1
            self._notify = False
            self._submit((self._io.cmd_read_once, self._conn, None))

    def receive_nowait(self) -> Message:
        """Take the next buffered message without waiting.

        Raises:
            WouldBlock: nothing is buffered.
            EndOfPort: the final message was already received.
            ClosedPortError: the port was closed by this side.
        """
        if self._buffer:
            return self._take()
        if self._closed:
            raise ClosedPortError("this port is closed")
        if self._ended:
            raise EndOfPort("this port has delivered its final message")
        raise WouldBlock("no message is buffered")

    async def receive(self) -> Message:
        """Wait for the next message and return it.

        Returns messages in the order the I/O thread produced them; the last one is always
        a :class:`~ioserver.Closed`.  On a passive port (``active=False``, or after its
        ``"once"``/N credit ran out) the I/O thread reads one message for this call, as
        ``gen_tcp:recv`` does.  A receive that raises ``Cancelled`` took no message: the
        message stays buffered for the next receive (trio's rule).

        Raises:
            EndOfPort: the final message was already received (``async for`` ends here).
            ClosedPortError: the port was closed by this side (also raised in a task that
                was waiting here when another task closed it), or its messages go to an
                owner mailbox.
            BusyPortError: another task is already waiting in ``receive`` on this port.
        """
        return await self._receive(EndOfPort)

    def __aiter__(self) -> _PortBase:
        return self

    def __anext__(self) -> Coroutine[object, None, Message]:
        return self._receive(StopAsyncIteration)

    async def _receive(self, end: type[Exception]) -> Message:
        # The hot path of every actor: written out for speed (one coroutine frame, the
        # park inlined per backend), and commented instead of factored.
        buffer = self._buffer
        hub = self._hub
        if buffer:
            # It will not wait: check for cancellation *before* taking (a receive that
            # raises Cancelled took nothing), and yield every YIELD_EVERY times.  After a
            # yield the buffer may be empty again: then it parks below.
            hub.budget -= 1
            if hub.budget <= 0:
                await hub.checkpoint()
            elif hub.is_trio:
                await _checkpoint_if_cancelled()
        if not buffer:
            if self._waiter is not None and self._receiving():
                raise BusyPortError("receiving")
            if not isinstance(buffer, list):
                # The list the messages it waits for go to (this frame keeps it).
                buffer = self._buffer = []
            while not buffer:
                if self._closed or self._ended or self._credit == 0 or self._owner is not None:
                    self._check_can_wait(end)
                # Park until the hub delivers (Hub.park, inlined).  The waiter is set
                # before the budget pause is read (see MemoryBudget.blocks in ioserver._flow).
                if hub.is_trio:
                    task = self._waiter = _current_task()
                    task.custom_sleep_data = self  # (trio_wake's mark: see ioserver._hub)
                    try:
                        # (In the try: a KeyboardInterrupt here must not leave the port
                        # marked as received on by a task that is elsewhere.)
                        if getattr(self._conn, "global_paused", False):
                            self._want_input()
                        await wait_woken()
                    except BaseException:
                        if self._waiter is task:  # cancelled: no longer waiting here
                            self._waiter = None
                        if task.custom_sleep_data is self:  # raised before it parked
                            task.custom_sleep_data = None
                        raise
                else:
                    future = self._waiter = hub.loop.create_future()
                    if getattr(self._conn, "global_paused", False):
                        self._want_input()
                    try:
                        await future
                    finally:
                        if self._waiter is future:
                            self._waiter = None
        # From here to the return nothing is awaited: a taken message is always returned.
        message = buffer.pop(0)
        if message.__class__ is Data:
            # _took_data, inlined.
            data = message.data
            window = self._window
            took = window.took
            if took is not None:
                size = len(data) if window.sizes is None else window.sizes.popleft()
                generation = took(size)
                if generation is not None:
                    self._submit((self._io.cmd_resume, self._conn, generation))
            else:
                size = len(data) if window.sizes is None else window.sizes.popleft()
                window.consumed_messages += 1
                window.consumed_bytes += size
                hub.consumed_bytes += size
                conn = self._conn
                if conn is not None and conn.pause_generation != window.resume_generation:
                    self._maybe_resume()
        elif message.__class__ is Closed:
            self._ended = True
        return message

    # -- select hooks -------------------------------------------------------------------
    def _select_poll(self) -> object:
        if self._buffer:
            return self._take()
        self._check_can_wait(EndOfPort)
        return EMPTY

    def _select_arm(self, waiter: Waiter) -> None:
        if not isinstance(self._select_waiters, list):
            self._select_waiters = []
        self._select_waiters.append(waiter)
        if getattr(self._conn, "global_paused", False):
            self._want_input()

    def _want_input(self) -> None:
        """A task waits for this port, which the memory budget paused: ask the I/O thread
        for a read into the budget's reserve (see :mod:`ioserver._iothread`)."""
        self._submit((self._io.cmd_want, self._conn, None))

    def _select_disarm(self, waiter: Waiter) -> None:
        if isinstance(self._select_waiters, list):
            try:
                self._select_waiters.remove(waiter)
            except ValueError:
                pass

    # -- owner --------------------------------------------------------------------------
    @property
    def owner(self) -> Mailbox | None:
        """The mailbox this port's messages go to, or ``None`` (they stay in the port)."""
        return self._owner

    def set_owner(self, owner: Mailbox | None) -> None:
        """Send this port's messages to ``owner`` as ``(port, message)`` tuples.

        As Erlang's ``gen_tcp:controlling_process/2``, with the race it documents closed:
        messages already buffered in the port move to the new owner first, in order, then
        every later message follows them; none is lost or duplicated.  ``None`` makes the
        port keep its messages again (those already in a mailbox stay there).

        A message waiting in the mailbox is not taken yet: it counts against this port's
        receive watermarks (``high_msgq_watermark``, ``high_msgq_messages``) and the
        server's ``memory_limit`` until a receive takes it out of the mailbox (see
        :class:`~ports.Mailbox`).  So an owner that leaves this port's messages
        unreceived - a selective receive that never matches them - pauses the port at
        its watermark, and its peer waits.

        Raises:
            ClosedPortError: the port is closed, or a task is waiting on it.
        """
        if self._closed:
            raise ClosedPortError("this port is closed")
        if self._receiving() or self._select_waiters:
            raise ClosedPortError("a task is waiting on this port; it cannot change owner")
        Mailbox._owner_changed(self, self._owner, owner)  # the owner's ports close with it
        self._owner = owner
        conn = self._conn
        if conn is not None and getattr(self._io, "memory_limit", None) is not None:
            # The budget keeps this port's pauses in its owner's cell, so that a task
            # parking on the mailbox finds the paused ones in O(1) (Mailbox._want_input).
            cell = None if owner is None else owner._cell(self._io, conn)
            self._submit((self._io.cmd_owner, conn, cell))
        if owner is not None:
            buffer = self._buffer
            while buffer:
                message = buffer.pop(0)
                if message.__class__ is Closed:
                    self._ended = True
                self._to_owner(owner, message)  # still charged until the owner takes it

    # -- options ------------------------------------------------------------------------
    def setopts(self, *, active: Active | None = None) -> None:
        """Change the port's options, as Erlang's ``inet:setopts/2``.

        Args:
            active: ``True`` - deliver every message as it arrives; ``False`` - deliver
                only when a task waits in :meth:`receive` (one read per call);
                ``"once"`` - deliver one message, then become passive; an int N - deliver
                N more messages (added to a running count), then become passive and
                deliver :class:`~ioserver.Passive`.

        Raises:
            OptionError: an unknown option or a wrong value.
            ClosedPortError: the port is closed.
        """
        if self._closed:
            raise ClosedPortError("this port is closed")
        if active is not None:
            mode = parse_active(active)
            self._credit, self._notify = apply_active_mode(self._credit, bool(self._notify), mode)
            if self._credit == 0 and self._notify:
                self._notify = PASSIVE_PENDING
            self._submit((self._io.cmd_set_active, self._conn, mode))

    @property
    def active(self) -> Active:
        """The active mode now: ``True``, ``False``, ``"once"`` or the remaining count."""
        credit, notify = self._credit, self._notify
        if credit < 0:
            return True
        if notify:
            return credit if credit else False
        return "once" if credit else False

    # -- closing ------------------------------------------------------------------------
    async def aclose(self) -> None:
        """Close the port: the I/O thread writes what is queued, then closes the socket.

        Meanwhile it reads on and drops what arrives (whatever its active mode, its pauses
        and its held packets: nothing more is delivered or charged), so a peer blocked
        writing to us can drain what we flush.  Idempotent.  A task waiting on the port gets
        :exc:`ClosedPortError`; messages not yet received are dropped.  It is a checkpoint.
        """
        self.close_nowait()
        await anyio.lowlevel.checkpoint()

    def close_nowait(self) -> None:
        """Close the port without waiting (see :meth:`aclose`)."""
        if self._closed:
            return
        self._closed = True
        buffer = self._buffer
        messages = buffer[:]
        if isinstance(buffer, list):
            buffer.clear()
        for message in messages:
            if message.__class__ is Data:
                self._took_data(message.data)
            elif message.__class__ is Accepted:
                message.port.close_nowait()  # accepted, never received: close it too
        self._on_writable()  # a sender waiting on a busy port sees the port closed
        if self._conn is not None:
            self._submit((self._io.cmd_close, self._conn, None))
        hub = self._hub
        if self._waiter is not None:
            hub.wake(self)
        for waiter in self._select_waiters:
            hub.wake(waiter)

    @property
    def closed(self) -> bool:
        """True once this side closed the port."""
        return self._closed

    @property
    def local_address(self) -> Any:
        """The socket's own address (``(host, port)`` for IPv4)."""
        return self._local_address

    @property
    def remote_address(self) -> Any:
        """The peer's address, or ``None`` for a listener."""
        address = self._remote_address
        if address is None:
            # An accepted TCP connection's on the native core: its handle keeps the peer
            # and makes the tuple when first asked (issue 14: a tuple and an int less
            # per idle connection).  None for anything else.
            address = self._remote_address = getattr(self._conn, "peer_address", None)
        return address

    @property
    def extra_attributes(self) -> dict[Any, Callable[[], Any]]:
        """anyio typed attributes: :class:`anyio.abc.SocketAttribute` addresses."""
        attributes: dict[Any, Callable[[], Any]] = {
            SocketAttribute.local_address: lambda: self._local_address,
        }
        if self.remote_address is not None:
            attributes[SocketAttribute.remote_address] = lambda: self.remote_address
        attributes.update(tls_attributes(self._conn))
        return attributes

    def statistics(self) -> PortStatistics:
        """The port's counters now (see :class:`PortStatistics`)."""
        conn = self._conn
        return PortStatistics(
            messages_buffered=len(self._buffer),
            bytes_received=conn.bytes_in if conn else 0,
            bytes_sent=conn.bytes_out if conn else 0,
            bytes_queued=conn.out_bytes if conn else 0,
            active=self.active,
            closed=self._closed,
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


class _SendWaiter(Waiter):
    """A port's sender waiting for its output to drain, with what only some ports' sends
    need: the count of the port's busy transitions (sends that found it busy), and whether
    :meth:`Port.send_eof` was called.  Made at the first of these (two slots less a port)."""

    __slots__ = ("eof_sent", "transitions")

    def __init__(self) -> None:
        super().__init__()
        self.transitions = 0
        self.eof_sent = False


@lru_cache(maxsize=64, typed=True)
def _send_options(
    low_watermark: int, send_timeout: float | None, send_timeout_close: bool
) -> tuple[int, float | None, bool]:
    """``(low_watermark, send_timeout, send_timeout_close)``, one tuple for all the ports
    with these options (at most 64 kept: another combination gets a tuple of its own)."""
    return (low_watermark, send_timeout, send_timeout_close)


# Not @final: ports.ProcessPort extends it (a program's stdin/stdout, plus its exit).
class Port(_PortBase, _ObjectStream[Message], trio.abc.Channel[Message]):  # type: ignore[misc]
    """A connected byte stream (TCP, Unix), owned by the I/O thread, used like a channel.

    Receive messages: :class:`~ioserver.Data` for bytes read, then one final
    :class:`~ioserver.Closed` (``reason="eof"`` when the peer closed, an errno name such
    as ``"ECONNRESET"`` when the connection broke) - and with ``active=N``,
    :class:`~ioserver.Passive` when the count runs out.  Send bytes.  Get one from
    :func:`connect_tcp` or from a :class:`Listener`'s :class:`~ioserver.Accepted`.
    """

    __slots__ = (
        "_broken",
        "_framer",
        "_high_watermark",
        "_native_send",
        "_send_options",
        "_send_waiter",
        "_simple_send",
    )

    def __init__(
        self,
        server: IOServer,
        active: tuple[int, bool],
        options: FlowSettings,
        native: bool = False,
    ) -> None:
        framer = port_framer(options)
        super().__init__(server, active, framer, native)
        self._broken: str | None = None
        self._framer: Framer | None = framer
        # Send flow control: the window's queued_bytes (what the owner queued) against the
        # I/O thread's bytes_out; its send_blocked is set while a sender waits "writable".
        self._high_watermark: int = options["high_watermark"]
        # What only a busy send reads: one tuple shared by the ports with the same options
        # (three slots less a port; issue 14, memory per idle connection).
        self._send_options = _send_options(
            options["low_watermark"], options["send_timeout"], options["send_timeout_close"]
        )
        # Made when a send first finds the port busy, or at send_eof (see _SendWaiter).
        self._send_waiter: _SendWaiter | None = None
        # True while send may take its inlined path: open, not broken, no EOF sent, no port
        # cap to check (a packet mode's framing is done there too: each framer's ``frame``
        # is a pure function of the message).  Cleared by each of those changes.
        self._simple_send = (
            server._io.port_buffer_limit is None
            and server._io.send_command == server._hub.cmd_send  # not a daemon's port
        )
        # The native core's send with its watermark check and counting (it holds the
        # bytes object for the I/O thread: Core.send_within), or None.
        self._native_send: Any = (
            None if self._window.took is None else getattr(server._io, "send_within", None)
        )

    def _on_terminal(self, message: Closed) -> None:
        self._broken = message.errno_name
        if self._broken is not None:
            self._simple_send = False
        self._on_writable()

    def close_nowait(self) -> None:
        """Close the port without waiting (see :meth:`aclose`)."""
        self._simple_send = False
        super().close_nowait()

    def _on_writable(self) -> None:
        send_waiter = self._send_waiter
        if send_waiter is not None and send_waiter._waiter is not None:
            self._hub.wake(send_waiter)

    def _check_can_send(self) -> None:
        if self._closed:
            raise ClosedPortError("this port is closed")
        if self._broken is None and self._conn is not None and self._conn.closed:
            self._broken = "EPIPE"  # the I/O thread closed it; its Closed is on its way
            self._simple_send = False
        if self._broken is not None:
            raise BrokenPortError(
                f"the connection is broken ({self._broken})", errno_name=self._broken
            )
        if self._send_waiter is not None and self._send_waiter.eof_sent:
            raise ClosedPortError("send_eof() was called: this port sends nothing more")

    def _encode(self, message: object) -> bytes:
        if self._framer is not None:
            return self._framer.frame(message)
        if message.__class__ is not bytes:
            return _to_bytes(message)
        return message

    def _queue(self, data: bytes) -> None:
        """Hand ``data`` to the I/O thread and charge it to the port and the budget."""
        limit = self._io.port_buffer_limit
        size = len(data)
        conn = self._conn
        assert conn is not None  # (sends check the port is open first)
        window = self._window
        if limit is not None and window.queued_bytes + size - conn.bytes_out > limit:
            self.close_nowait()
            raise BrokenPortError(
                f"port_buffer_limit={limit} exceeded: sending {size} bytes on top of "
                f"{window.queued_bytes - conn.bytes_out} queued; the port is closed",
                errno_name="ENOBUFS",
            )
        window.queued_bytes += size  # the native core's window counts it for its budget
        if window.took is None:  # the Python core's budget counts it in the hub
            self._hub.queued_bytes += size
        self._submit((self._io.send_command, conn, data))

    @property
    def busy(self) -> bool:
        """True while the output not yet written is above the high watermark."""
        conn = self._conn
        return (
            conn is not None and self._window.queued_bytes - conn.bytes_out > self._high_watermark
        )

    @property
    def packet(self) -> PacketMode:
        """The packet mode: ``"raw"`` (bytes as read), ``1``/``2``/``4``, ``"line"``,
        ``"msgpack"`` or ``"resp"`` (see :class:`PortOptions`)."""
        return "raw" if self._framer is None else self._framer.mode

    def send_nowait(self, message: Any) -> None:
        """Queue ``message`` for the I/O thread to write; return at once.

        With ``packet="raw"`` the message is bytes-like (mutable buffers are copied, so
        the caller may reuse its own); with a packet mode it is framed first (a length
        header added, a line ended, an object packed with msgpack).  Writes of one round
        of the I/O thread are gathered into one ``sendmsg``.

        Raises:
            WouldBlock: the port is *busy*: its queued output is above ``high_watermark``
                (as Erlang's busy port); :meth:`send` waits instead.
            ClosedPortError: the port was closed, or :meth:`send_eof` was called.
            BrokenPortError: the connection broke (reset, broken pipe; ``errno_name`` says
                how), or the send would pass ``port_buffer_limit`` (the port is closed).
            PacketTooLarge: the framed message exceeds ``packet_size``.
            TypeError: the message is not of the packet mode's type.
        """
        self._check_can_send()
        data = self._encode(message)
        if self.busy:
            self._get_send_waiter().transitions += 1
            raise WouldBlock("the port is busy: its output is above high_watermark")
        if data:
            self._queue(data)

    async def send(self, message: Any) -> None:
        """Queue ``message`` for the I/O thread to write (see :meth:`send_nowait`).

        It does not wait for the write, except when the port is *busy* (queued output
        above ``high_watermark``): then it waits until the output drains below
        ``low_watermark``, as Erlang's ``gen_tcp:send`` on a busy port - so a slow peer
        slows its own sender and nobody else.  It checks for cancellation and, every few
        calls, yields to the scheduler (see :mod:`ioserver._hub`), before it queues: a
        send that raises ``Cancelled`` queued nothing.

        Raises:
            SendTimeoutError: the port stayed busy for ``send_timeout`` seconds (and was
                closed, with ``send_timeout_close=True``).
            ClosedPortError, BrokenPortError, PacketTooLarge, TypeError: as
                :meth:`send_nowait`.
        """
        hub = self._hub
        # The checkpoint comes first: a send that raises Cancelled queued nothing.
        hub.budget -= 1
        if hub.budget <= 0:
            await hub.checkpoint()
        elif hub.is_trio:
            await _checkpoint_if_cancelled()
        conn = self._conn
        window = self._window
        if self._simple_send and message.__class__ is bytes:
            framer = self._framer
            # _encode, inlined (PacketTooLarge from here queued nothing, as there).
            data = message if framer is None else framer.frame(message)
            native_send = self._native_send
            if not data:
                pass  # raw mode's empty send: nothing to write, the slow path's checks
            elif native_send is not None:
                # The native core checks the watermark, counts queued_bytes and queues
                # the command in one call; False: busy (nothing queued), the slow path.
                if native_send(conn, data, self._high_watermark):
                    return
            elif window.queued_bytes - conn.bytes_out <= self._high_watermark:  # type: ignore[union-attr]
                # _queue and WakeupQueue.put, inlined: P1 append, then P2 read the flag.
                size = len(data)
                window.queued_bytes += size
                hub.queued_bytes += size
                commands = self._io.commands
                commands.items.append((hub.cmd_send, conn, data))
                if commands.asleep:
                    commands.asleep = False
                    commands.wakeup.signal()
                    commands.wakes_sent += 1
                else:
                    commands.wakes_skipped += 1
                return
        self._check_can_send()
        data = self._encode(message)
        if self.busy:
            await self._wait_until_writable()
        if data:
            self._queue(data)

    def _get_send_waiter(self) -> _SendWaiter:
        """The port's send waiter, made when a send first finds the port busy."""
        send_waiter = self._send_waiter
        if send_waiter is None:
            send_waiter = self._send_waiter = _SendWaiter()
        return send_waiter

    async def _wait_until_writable(self) -> None:
        self._get_send_waiter().transitions += 1
        if self._window.send_blocked:  # set for the whole wait of the sender already inside
            raise BusyPortError("waiting to send")
        _low_watermark, send_timeout, send_timeout_close = self._send_options
        try:
            if send_timeout is None:
                await self._park_until_writable()
            else:
                with anyio.fail_after(send_timeout):
                    await self._park_until_writable()
        except TimeoutError:
            if send_timeout_close:
                self.close_nowait()
            raise SendTimeoutError(
                f"the port stayed busy for send_timeout={send_timeout} s"
                + ("; it is closed" if send_timeout_close else "")
            ) from None

    async def _park_until_writable(self) -> None:
        conn = self._conn
        assert conn is not None
        low_watermark = self._send_options[0]
        send_waiter = self._get_send_waiter()
        self._window.send_blocked = True  # written before the re-read of bytes_out below
        try:
            while self._window.queued_bytes - conn.bytes_out > low_watermark:
                self._check_can_send()
                await self._hub.park(send_waiter)
            self._check_can_send()
        finally:
            self._window.send_blocked = False

    def statistics(self) -> PortStatistics:
        """The port's counters now (see :class:`PortStatistics`)."""
        conn = self._conn
        if conn is None:
            return super().statistics()
        framing = 0
        if self._framer is not None:
            # What the framer holds, and the packets decoded past the active credit (a
            # daemon's client port has neither here: the daemon holds them).
            framing = self._framer.buffered + getattr(conn, "held_bytes", 0)
        return PortStatistics(
            messages_buffered=len(self._buffer),
            bytes_received=conn.bytes_in,
            bytes_sent=conn.bytes_out,
            bytes_queued=conn.out_bytes,
            active=self.active,
            closed=self._closed,
            bytes_buffered_in=conn.delivered_bytes - self._window.consumed_bytes + framing,
            bytes_buffered_out=self._window.queued_bytes - conn.bytes_out,
            peak_buffered=conn.peak_buffered,
            pauses=conn.pauses,
            busy_transitions=0 if self._send_waiter is None else self._send_waiter.transitions,
            packets_too_large=conn.packets_too_large,
        )

    async def send_eof(self) -> None:
        """Half-close: the peer reads end-of-file after what was already sent.

        Receiving goes on until the peer closes its side.  Idempotent.

        A TLS port cannot half-close, as anyio's :class:`~anyio.streams.tls.TLSStream`
        cannot: TLS has no end of file of its own before 1.3, and a ``close_notify``
        sent early ends the session for many peers.  Close the port instead (it sends
        ``close_notify``).

        It is a checkpoint, taken first: a call that raises ``Cancelled`` did not
        half-close (trio's rule).

        Raises:
            ClosedPortError: the port is closed.
            NotImplementedError: the port is a TLS connection (``tls=``).
        """
        await anyio.lowlevel.checkpoint()
        self._send_eof_nowait()

    def _send_eof_nowait(self) -> None:
        """Queue the half-close (see :meth:`send_eof`), without a checkpoint."""
        if self._closed:
            raise ClosedPortError("this port is closed")
        if getattr(self._conn, "tls", None) is not None:
            raise NotImplementedError(
                "send_eof() is not supported on a TLS port (as anyio's TLSStream): "
                "close the port, which sends close_notify"
            )
        send_waiter = self._send_waiter
        if not (send_waiter is not None and send_waiter.eof_sent) and self._broken is None:
            self._get_send_waiter().eof_sent = True
            self._simple_send = False
            self._submit((self._io.cmd_send_eof, self._conn, None))

    def __repr__(self) -> str:
        state = "closed" if self._closed else "ended" if self._ended else "open"
        return f"<Port tcp {self._local_address} -> {self.remote_address} {state}>"


@final
class Listener(  # type: ignore[misc]
    _PortBase,
    _ObjectReceiveStream[Accepted],
    trio.abc.ReceiveChannel[Accepted],
):
    """A listening TCP socket; its messages are :class:`~ioserver.Accepted` connections.

    The I/O thread accepts as connections arrive (up to 64 per readiness event) and
    delivers each as an ``Accepted`` carrying a new, open :class:`Port`; whoever receives
    it owns that port.  An accept that fails for lack of resources (``EMFILE``...) is
    delivered as :class:`~ioserver.Error`; the listener then tries again when one of the
    I/O server's ports closes and every 100 ms (as Ranch's acceptors do), however the
    descriptor was freed, and each attempt that fails so is delivered too.
    """

    __slots__ = ()

    async def receive(self) -> Accepted:
        """Wait for the next accepted connection (or :class:`~ioserver.Error`).

        Raises:
            ClosedPortError: the listener was closed by this side.
            BusyPortError: another task is already waiting on this listener.
        """
        return await super().receive()  # type: ignore[return-value]

    def __repr__(self) -> str:
        return f"<Listener tcp {self._local_address} {'closed' if self._closed else 'open'}>"


_register_virtual(Port, anyio.abc.ObjectStream)
_register_virtual(Listener, anyio.abc.ObjectReceiveStream)


#: anyio's TLS attributes and the keys of ``ioserver._tls.tls_info`` that hold them.
_TLS_ATTRIBUTES = {
    TLSAttribute.alpn_protocol: "alpn_protocol",
    TLSAttribute.channel_binding_tls_unique: "channel_binding_tls_unique",
    TLSAttribute.cipher: "cipher",
    TLSAttribute.peer_certificate: "peer_certificate",
    TLSAttribute.peer_certificate_binary: "peer_certificate_binary",
    TLSAttribute.server_side: "server_side",
    TLSAttribute.shared_ciphers: "shared_ciphers",
    TLSAttribute.tls_version: "tls_version",
}


def tls_attributes(conn: object) -> dict[Any, Callable[[], Any]]:
    """anyio's :class:`~anyio.streams.tls.TLSAttribute` values of a TLS port's ``conn``
    (none for a plaintext one), from what the I/O thread copied when the handshake
    succeeded.  ``ssl_object`` is not among them: the I/O thread uses the
    :class:`ssl.SSLObject`, and one must not be used from two threads.
    ``standard_compatible`` is ``False``: a peer's end of the TCP stream without
    ``close_notify`` ends the port as ``"eof"``, as most HTTP peers close."""
    tls = getattr(conn, "tls", None)
    info = None if tls is None else tls.info
    if info is None:
        return {}
    attributes: dict[Any, Callable[[], Any]] = {
        attribute: partial(info.__getitem__, key) for attribute, key in _TLS_ATTRIBUTES.items()
    }
    attributes[TLSAttribute.standard_compatible] = lambda: False
    return attributes


def _to_bytes(data: object) -> bytes:
    if isinstance(data, (bytearray, memoryview)):
        return bytes(data)
    if isinstance(data, bytes):
        return data
    raise TypeError(f"a port sends bytes-like data, not {type(data).__name__}")


_GAI_ERRORS = {getattr(socket, name): name for name in dir(socket) if name.startswith("EAI_")}


#: A socket address as ``getaddrinfo`` returns it (``(int, bytes)``: a family not asked for).
_RawAddress = tuple[str, int] | tuple[str, int, int, int] | tuple[int, bytes]


async def _resolve(host: str, port: int, *, passive: bool) -> list[tuple[int, SocketAddress]]:
    """``[(family, sockaddr)]`` for ``host``; numeric hosts without a thread."""
    if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
        raise OptionError(f"port must be an int in 0..65535, not {port!r}")
    if not isinstance(host, str):
        raise OptionError(f"host must be a str, not {host!r}")
    flags = socket.AI_PASSIVE if passive else 0
    infos: Sequence[tuple[int, int, int, str, _RawAddress]]
    try:
        infos = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=flags | socket.AI_NUMERICHOST
        )
    except socket.gaierror:
        try:
            infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=flags)
        except socket.gaierror as exc:
            name = _GAI_ERRORS.get(exc.errno, "EAI_FAIL")
            raise ConnectError(
                f"cannot resolve host {host!r}: {exc.strerror} ({name})", None, name
            ) from exc
    seen: list[tuple[int, SocketAddress]] = []
    for family, _type, _proto, _canon, sockaddr in infos:
        if family in (socket.AF_INET, socket.AF_INET6):
            address = inet_address(sockaddr)
            if (family, address) not in seen:
                seen.append((family, address))
    if not seen:
        raise ConnectError(f"host {host!r} has no IPv4 or IPv6 address", None, "EAI_NODATA")
    return seen
