"""Receive flow control: one port's window, the pause handshake, and the memory budget.

Theory of operation
===================

Input flows from a socket, read by the I/O thread, to the task that owns the port, in an
event loop.  Between the two it is *buffered*: delivered to the loop and not yet taken by
the owner.  Three things bound what is buffered, each on its own; a stream's socket is read
only while all three allow it (``IOThread._stream_interest``; handlers have their own
``_reading_changed``).

The active credit
-----------------
Erlang's ``{active, ...}``: -1 reads freely, 0 not at all, N > 0 lets N more **packets**
through (:func:`~._options.apply_active_mode` is the rule both halves apply, so they agree
without asking each other).  A framed read can decode several packets; those beyond the
credit are *held* by the I/O half (``Conn.held``, charged to the budget as framing bytes)
and the socket is not read while any is held.  A grant - ``cmd_set_active`` or a passive
``receive`` (``cmd_read_once``) - delivers held packets first, as far as its credit goes,
and only then reads again; so an EOF or error read later comes after them, as in Erlang.

The window: the port's watermarks
---------------------------------
Each port has a :class:`Window`, the one object both of its halves touch.  The I/O half
(a :class:`ReceiveFlow`: the thread's ``Conn``, a UDP or ZeroMQ handler, the client's
``RemoteConn``) counts what it delivered (``delivered_bytes``, ``delivered_messages``);
the loop half (``ports.Port``, the daemon's ``RemotePortState``) counts in the window what
its owner took (``consumed_bytes``, ``consumed_messages``).  Each side writes only its own
counters; each counter only grows.  The difference is what is buffered.  A message
handed to an owner :class:`~ports.Mailbox` is not taken yet: it stays charged while it
waits there, and is taken as it leaves the mailbox (a ``receive``, selective or not, a
``select``, the mailbox's close).  The port pops its charge from ``sizes`` as it hands
it over (in delivery order) and the mailbox keeps the charge beside the entry, since a
selective receive takes entries out of order (``ports._mailbox``).

A message is charged its size in bytes: a ``bytes`` payload its ``len()``; a decoded
object (a framer with :attr:`~._framing.Framer.decodes_objects`) its share of the wire
bytes it was decoded from, which the I/O half appends to ``window.sizes`` before it
delivers the message and the loop half pops when the owner takes it.  A packet of a framed
port in this process is charged ``window.packet_overhead`` more
(:data:`~._framing.PACKET_OVERHEAD`: what its Python objects hold), and a decoded object
what it holds beyond that (:meth:`~._framing.Framer.object_charges`:
:data:`~._framing.MSGPACK_CHARGES`: a msgpack item by its kind, so that a frame of tiny items
cannot hold many times its charge), so every such port keeps ``window.sizes``; a
daemon's port charges wire bytes, as its client counts them.

Delivered and not taken above a high watermark (``high_msgq_watermark`` bytes, or
``high_msgq_messages``) stops reading this socket alone - TCP then pushes back on this
peer - until the owner has taken it down to the low watermarks (``low_msgq_watermark``,
half the messages).  So that the hot path compares one counter with one number, the I/O
half looks at the window only when its counters pass a *check point* (``check_bytes``,
``check_messages``: what was taken at the last look, plus the high watermark).

The pause handshake
-------------------
The two halves run in two threads and never lock; the pause generation is the fence.

1. The I/O half pauses (:meth:`ReceiveFlow.pause`): it sets ``msgq_paused``, **then**
   bumps ``pause_generation``, **then** re-reads the window's ``consumed_*``; if the owner
   took enough meanwhile, it resumes at once.
2. The loop half, each time its owner takes a message, updates ``consumed_*`` **then**
   compares ``pause_generation`` with the last generation it resumed
   (:meth:`Window.resume_due`); when they differ and the counters are at or below low
   (:meth:`ReceiveFlow.drained`), it asks the I/O half to resume *that* generation
   (``cmd_resume``).
3. The I/O half resumes only if the generation asked is still the current one and the
   counters still say drained (:meth:`ReceiveFlow.may_resume`): a late resume of an
   older pause is ignored.  If it is the current one but the counters no longer say
   drained - a grant delivered held packets (see "The active credit") after the owner
   looked - the pause goes on **under a new generation**, told to a daemon's client
   like a new pause, and the I/O half re-reads as in step 1.  The owner asked for the
   old generation already and would never ask for it again: the new one is what makes
   its next take ask again, so a declined resume cannot leave the port paused for good.

Whichever of 1 and 2 runs second sees the other's write: either the I/O half's re-read
sees the owner's take, or the owner's check sees the new generation.  No pause is left
without a resume.  Behind a daemon the same handshake crosses the wire: the daemon's I/O
thread tells the client of a pause (``window.on_pause``: PAUSED with the generation), the
client's ``RemoteConn`` runs step 2 with its port's window and sends RESUME with the
counters, and the daemon checks them (:meth:`Window.credit_remote`) before step 3.

The memory budget
-----------------
``memory_limit`` (``L``) bounds the input of all ports together, charged from the moment
the I/O thread reads it until an owner takes it, with framing buffers and queued output.
Once a round, :meth:`MemoryBudget.headroom` computes the headroom ``L - memory_in_use()``
(and lets paused ports go); the I/O thread takes it again after the round's poll, which
may have slept while owners queued output, so that the round's reads are admitted against
what is in use when they happen.  It is split in two.  An ordinary read needs a whole
read (64 KiB) of headroom **plus the reserve** (``L // 4``): so ordinary input stops at
three quarters of the budget and the ports it paused resume together at one half.  The
reserve is for the ports whose owner **waits** - a task parked in ``receive``/``select``
on the port, having taken everything delivered to it (:meth:`ReceiveFlow.owner_waits`;
the loop half answers whether a task is parked, ``window.task_waits``) - which may read
while a whole read fits under ``L``.  Such a read is taken at once by the waiting task,
so it frees itself (unless a selective receive on a mailbox leaves it unmatched: it stays
charged there, and its port no longer counts as waiting until it is taken); a port is
never starved by the others' input filling the budget, whatever order an actor reads its
ports in.  When a waiting port finds no room even in the reserve, it is a *reserve
waiter* and is let in first as soon as a read fits (before the others resume at one
half).  An owner that starts waiting on a port already paused by the budget tells the
thread (``cmd_want``); the port writes its waiter before it reads ``global_paused``, the
thread writes ``global_paused`` before it reads the waiter, so one of them sees the
other.  A task waiting on the :class:`~ports.Mailbox` that owns a port waits for it too;
the mailbox does not ask each of its ports (an actor owning 10,000 ports would pay 10,000
reads a park): the budget keeps the paused ports of each owner in the owner's
:class:`OwnerCell` (``cmd_owner`` names it), adding a port there before it reads the
mailbox's waiters, and a parking task appends its waiter before it reads the cell - so a
park costs O(1) while nothing of the mailbox is paused, and when some are one
``cmd_want_owner`` lets those, and only those, try the reserve
(:meth:`MemoryBudget.want_owner`).  The bound stays firm: no read is made that could take
the memory charged for input past ``L``; the reserve is inside it, not on top.  A port of
packets charges each one ``PACKET_OVERHEAD`` more than its bytes, so when the budget is
short it reads only what it could pay for were every byte a packet
(:meth:`MemoryBudget.packet_read_size`); and within a round the headroom goes down by
**what each read was charged** - its packets, the bytes its framer or its held packets
took - not by the bytes it read, or the next port's read would be admitted against memory
already spent.  (A message larger than the reserve cannot be completed by reserve reads
alone: it waits for the budget to free; one charged more than ``memory_limit`` less a
read, which no read could ever complete, fails its port with ``EMSGSIZE``:
``IOThread.message_cap``; and unfinished packets that stall the budget fail the port
holding the most, below, "Progress".) Handlers that read (UDP) ask the same rule through
:meth:`MemoryBudget.read_allowance` and :meth:`MemoryBudget.resumes`.

Progress
--------
What a framer holds of a packet not yet whole is freed only by the reads that complete it
(or by the port's close).  Peers that each send most of a large packet (``packet=4`` with
a large ``packet_size``, a msgpack object: each far under one message's cap) and stop can
together hold the budget with such bytes; then no port reads again - not theirs, not one
whose owner waits - and nothing an owner does frees them.  So the I/O half breaks it: the
budget keeps the ports holding unfinished bytes (:meth:`MemoryBudget.framer_holds`, called
only when a framer's count changes), and when, at a round's :meth:`MemoryBudget.headroom`,

1. a port whose owner waits cannot read, even into the reserve (a reserve waiter is
   paused and less than a read of headroom is left), and
2. the unfinished bytes by themselves leave no room for a read (``L - unfinished <
   read``: were every other charge freed, still no port could read),

the port holding the most unfinished bytes fails (:meth:`MemoryBudget.stall_victim`; the
I/O thread's ``_fail_for_progress``): its owner gets ``Error("ENOBUFS")`` and
``Closed("ENOBUFS")``, its close releases the bytes, and the check repeats until a read
fits; the reserve waiters then read first.  ``failed_ports`` counts it
(``statistics().budget_failed_ports``).  Condition 1 costs O(1) a round; the victim,
O(ports holding unfinished bytes), only at a stall.  Condition 2 keeps slow owners and
slow peers backpressure: a budget full of delivered input, held packets or queued output
fails no port.  The trade-off, as Linux's OOM killer picks the largest process: the
victim can be a legitimate large upload (of two that together need more than the budget,
one fails and the other completes, where neither ever would have).  The native core's
``flow.rs`` has the same rule ("Progress: a stall on unfinished packets"); each budget
applies it to its own ports.

Who writes what
---------------
==========================  =====================  =========================================
field                       written by             read by
==========================  =====================  =========================================
``Window.consumed_*``       the loop half          the I/O half (check, pause, resume)
``Window.sizes``            both: I/O appends,     -
                            loop pops
``Window.packet_overhead``  the loop half, once    the I/O half (``Conn.configure``)
``Window.queued_bytes``,    the loop half          the I/O half (when output drains: is a
``Window.send_blocked``                            sender waiting for WRITABLE?)
``ReceiveFlow.delivered_*`` the I/O half           the loop half (statistics, resume check)
``pause_generation``        the I/O half           the loop half (step 2)
``msgq_paused``, checks     the I/O half           the I/O half only
``OwnerCell.paused``        the I/O half           the loop half (a mailbox's park)
==========================  =====================  =========================================
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sized
from typing import Any, ClassVar, Generic, Protocol, TypeVar

from ._framing import Framer
from ._options import Watermarks

__all__ = ["NO_LIMIT", "OwnerCell", "Pausable", "ReceiveFlow", "Window"]

#: A watermark or check point that is never reached.
NO_LIMIT = 1 << 62


class Pausable(Protocol):
    """An I/O half as the loop half sees it for the handshake (:class:`ReceiveFlow`, or
    anything with its fields)."""

    pause_generation: int

    def drained(self) -> bool: ...


def _nobody_waits() -> bool:
    return False


class Window:
    """One port's flow-control window: the one object both halves of the port touch.

    Made by the loop half (``ports.Port``, the daemon's ``RemotePortState``) and handed to
    the I/O half, which reads it and never writes it (``sizes`` aside, see the module
    docstring).  Attributes are plain, for the hot paths of both threads.
    """

    __slots__ = (
        "consumed_bytes",
        "consumed_messages",
        "framer",
        "on_gone",
        "on_pause",
        "packet_overhead",
        "queued_bytes",
        "resume_generation",
        "send_blocked",
        "sizes",
        "task_waits",
    )

    def __init__(self, framer: Framer | None = None, packet_overhead: int = 0) -> None:
        #: Bytes and messages the owner took (received - from the port, or from the
        #: owner mailbox it was handed to - or dropped).
        self.consumed_bytes = 0
        self.consumed_messages = 0
        #: The last pause generation the loop half asked to end.
        self.resume_generation = 0
        #: The port's framer (None: raw), run by the I/O half; the loop half frames with it.
        self.framer = framer
        #: Bytes charged for each packet beyond its own size (``PACKET_OVERHEAD`` for a
        #: framed port of this process, whose packets stay here as Python objects; 0 for
        #: a daemon's port, which encodes its packets for the client at once).
        self.packet_overhead = packet_overhead if framer is not None else 0
        #: The charge of each undelivered message, as the I/O half computed it: with a
        #: framer that decodes objects, or any framer charging ``packet_overhead``.
        self.sizes: deque[int] | None = (
            deque()
            if framer is not None and (framer.decodes_objects or self.packet_overhead)
            else None
        )
        #: Bytes the owner queued for sending, ever; and whether a sender waits for the
        #: output to drain below the low watermark (then the I/O half delivers WRITABLE).
        self.queued_bytes = 0
        self.send_blocked = False
        #: The loop half's answer to "is a task parked on this port, waiting for its next
        #: message?" (``receive`` or ``select``), asked by the I/O thread only when the
        #: budget is short (see :meth:`ReceiveFlow.owner_waits`).
        self.task_waits: Callable[[], bool] = _nobody_waits
        #: A daemon's client port: the I/O thread tells the client of a pause (with its
        #: generation) and of the port's end through these; None for a local port.
        self.on_pause: Callable[[int], None] | None = None
        self.on_gone: Callable[[], None] | None = None

    #: The native core's window counts a take in one call (``NativeWindow.took``); None
    #: here: the loop half updates the counters above itself.
    took: ClassVar[Callable[..., int | None] | None] = None

    def charge(self, data: Sized) -> int:
        """The bytes a delivered message's payload ``data`` is charged (see the module
        docstring); pops its size for decoded objects: call once, as it is taken."""
        return len(data) if self.sizes is None else self.sizes.popleft()

    def resume_due(self, flow: Pausable) -> int | None:
        """Step 2 of the handshake, once the owner took a message and the I/O half's
        ``pause_generation`` is not the last one resumed: the generation to ask the I/O
        half to end (``cmd_resume``) if the owner has taken enough, else None."""
        generation = flow.pause_generation  # read after the counters were updated
        if flow.drained():
            self.resume_generation = generation
            return generation
        return None

    def credit_remote(
        self, consumed_bytes: int, consumed_messages: int, flow: ReceiveFlow, unsent: int
    ) -> None:
        """A daemon's client says its owner took ``consumed_*``: believe it only as far as
        it was given (``flow.delivered_*`` less the ``unsent`` bytes still queued here for
        it); counters only grow, so a client that does not read stays paused."""
        given = flow.delivered_bytes - unsent
        self.consumed_bytes = max(self.consumed_bytes, min(consumed_bytes, given))
        self.consumed_messages = max(
            self.consumed_messages, min(consumed_messages, flow.delivered_messages)
        )


class ReceiveFlow:
    """The I/O half's side of a port's receive flow control: what it delivered, its
    watermarks, and the pause (see the module docstring).  The stream ``Conn``, the
    receiving handlers (UDP, ZeroMQ) and the client's ``RemoteConn`` are ones."""

    __slots__ = (
        "check_bytes",
        "check_messages",
        "delivered_bytes",
        "delivered_messages",
        "high_msgq",
        "high_msgq_messages",
        "low_msgq",
        "low_msgq_messages",
        "msgq_paused",
        "pause_generation",
        "pauses",
        "peak_buffered",
        "window",
    )

    def init_flow(self, window: Window | None = None) -> None:
        """The state of a port not configured yet (a listener's, an accepted connection's
        before its port is made): no watermark, and a window nobody writes."""
        self.window = _UNCONFIGURED if window is None else window
        self.delivered_messages = 0
        self.delivered_bytes = 0
        self.high_msgq = NO_LIMIT
        self.low_msgq = NO_LIMIT
        self.high_msgq_messages = NO_LIMIT
        self.low_msgq_messages = NO_LIMIT
        self.check_bytes = NO_LIMIT
        self.check_messages = NO_LIMIT
        self.msgq_paused = False
        self.pause_generation = 0
        self.pauses = 0
        self.peak_buffered = 0

    def configure_flow(self, options: Watermarks, window: Window) -> None:
        """Take the port's window and its watermarks (``options`` as validated by
        :func:`~._options.port_options` and the other kinds' ``*_options``)."""
        self.window = window
        self.high_msgq = options["high_msgq_watermark"]
        self.low_msgq = options["low_msgq_watermark"]
        self.high_msgq_messages = options["high_msgq_messages"]
        self.low_msgq_messages = self.high_msgq_messages // 2
        self.check_bytes = self.high_msgq
        self.check_messages = self.high_msgq_messages

    def over_high(self) -> bool:
        """More delivered and not taken than a high watermark allows."""
        window = self.window
        return bool(
            self.delivered_bytes - window.consumed_bytes > self.high_msgq
            or self.delivered_messages - window.consumed_messages > self.high_msgq_messages
        )

    def drained(self) -> bool:
        """The owner took what was delivered down to the low watermarks."""
        window = self.window
        return bool(
            self.delivered_bytes - window.consumed_bytes <= self.low_msgq
            and self.delivered_messages - window.consumed_messages <= self.low_msgq_messages
        )

    def check(self) -> bool:
        """The delivered counters passed the check point: True if reading must pause; else
        move the check point to what was taken plus the high watermarks."""
        window = self.window
        taken_bytes = window.consumed_bytes
        taken_messages = window.consumed_messages
        if (
            self.delivered_bytes - taken_bytes > self.high_msgq
            or self.delivered_messages - taken_messages > self.high_msgq_messages
        ):
            return True
        self.check_bytes = taken_bytes + self.high_msgq
        self.check_messages = taken_messages + self.high_msgq_messages
        return False

    def pause(self) -> bool:
        """Step 1 of the handshake: stop reading until the owner has taken enough.  True if
        this started a pause: the caller stops reading, tells a daemon's client
        (``window.on_pause``), **then** re-checks with :meth:`recheck`, which ends the
        pause at once if the owner took enough meanwhile."""
        self.note_buffered()
        if self.msgq_paused:
            return False
        self.msgq_paused = True
        self.pauses += 1
        self.pause_generation += 1  # written before may_resume() re-reads the window
        return True

    def note_buffered(self) -> None:
        """Keep the peak of what was buffered (delivered, not taken), for statistics."""
        buffered = self.delivered_bytes - self.window.consumed_bytes
        if buffered > self.peak_buffered:
            self.peak_buffered = buffered

    def owner_waits(self) -> bool:
        """Whether a task waits for this port's next message and has taken every message
        delivered to it: input for it would be taken at once (the budget's reserve)."""
        window = self.window
        return window.task_waits() and self.delivered_messages == window.consumed_messages

    def recheck(self) -> bool:
        """Step 1's re-read, after :meth:`pause` wrote the new generation: True if the
        owner already took enough, and reading resumes."""
        if self.msgq_paused and self.drained():
            self.msgq_paused = False
            return True
        return False

    def may_resume(self, generation: int) -> bool:
        """Step 3 (``cmd_resume``): the owner asked to end pause ``generation``; True if
        reading may resume (it is the current pause and the counters still say drained).

        A resume of an older pause is ignored.  A resume of the current pause that the
        counters no longer allow (a grant delivered held packets after the owner looked)
        pauses again under a new generation - told to a daemon's client through
        ``window.on_pause``, as a new pause is - and re-reads the window as step 1 does:
        the owner, which asked for the old generation already, asks again for the new
        one once it has taken enough."""
        if not self.msgq_paused or generation != self.pause_generation:
            return False
        if not self.drained():
            self.pause_generation += 1  # written before recheck() re-reads the window
            on_pause = self.window.on_pause
            if on_pause is not None:
                on_pause(self.pause_generation)
        return self.recheck()


#: The window of a flow not configured yet: nobody takes from it, nobody writes it.
_UNCONFIGURED = Window()


# -- the memory budget ----------------------------------------------------------------------
#: Seconds between two looks at the budget while it pauses reads (owners free memory
#: without telling the I/O thread): the I/O thread's poll and the handlers' rechecks.
BUDGET_RECHECK = 0.005
#: The headroom when there is no budget: every read fits.
UNLIMITED = 1 << 62


class Charges(Protocol):
    """The I/O thread's counters the budget charges (bytes, ever): input handed to the
    loops, framing buffers, and output written, dropped with its port, or handed to a
    daemon."""

    delivered_total: int
    framing_bytes: int
    bytes_out: int
    bytes_discarded: int
    bytes_forwarded: int


class BudgetOwner(Protocol):
    """What charges the budget on the loop's side (a hub, the daemon's sessions): bytes
    its ports queued for output, and input its owners took (bytes, ever)."""

    @property
    def queued_bytes(self) -> int: ...
    @property
    def consumed_bytes(self) -> int: ...
    def _stopped_by_io(self) -> None: ...


class Budgeted(Protocol):
    """A port the budget may pause (the stream ``Conn``)."""

    global_paused: bool
    closed: bool
    pauses: int

    def owner_waits(self) -> bool: ...


E = TypeVar("E", bound=Budgeted)


class OwnerCell:
    """A :class:`~ports.Mailbox`'s cell in one Python I/O half: the ports it owns that the
    memory budget paused (written by the I/O thread only; the mailbox reads whether there
    are any as a task parks on it).  The native core's twin is ``_native.OwnerCell``.

    Whether a task waits on the mailbox the I/O thread asks the loop half directly (the
    mailbox's waiters, through the port's ``window.task_waits``); what it cannot ask
    cheaply is which of the mailbox's ports are paused, so it keeps them here.  A task
    parking on the mailbox appends its waiter, then reads :attr:`paused` (:meth:`park`);
    the I/O thread adds a port to :attr:`paused` before it reads the waiters
    (:meth:`MemoryBudget.blocks`): one of the two sees the other, so a parked owner
    never stays behind a pause it did not hear of, and the park costs O(1) however many
    ports the mailbox owns."""

    __slots__ = ("paused",)

    def __init__(self) -> None:
        #: The owner's ports the budget paused (an ordered set: O(1) add and remove).
        self.paused: dict[Any, None] = {}

    def park(self) -> bool:
        """The loop half, a waiter appended: True if a port of this owner is paused by the
        budget (then it asks the I/O thread to let them try the reserve,
        ``cmd_want_owner``)."""
        return bool(self.paused)

    def unpark(self) -> None:
        """No task waits on the mailbox any more (nothing to do here: the I/O thread asks
        the mailbox's waiters themselves)."""


class MemoryBudget(Generic[E]):
    """The global memory budget of one I/O thread (the theory is in this module's
    docstring, "The memory budget").  The round asks :meth:`headroom` once, then
    :meth:`blocks` before a stream's read that could pass it; handlers that read ask
    :meth:`read_allowance` and :meth:`resumes`.  ``resume`` is called with a stream the
    budget paused when it may read again (the I/O thread recomputes its interest)."""

    def __init__(
        self,
        limit: int | None,
        charges: Charges,
        read_size: int,
        packet_overhead: int,
        resume: Callable[[E], None],
        fail: Callable[[E, int], None] | None = None,
    ) -> None:
        #: ``memory_limit`` in bytes (None: no budget).
        self.limit = limit
        #: ``fail(entry, size)`` fails a port to end a stall on unfinished packets
        #: (:meth:`stall_victim`): its owner is told, and it closes (:meth:`forget`,
        #: with what its framer held).  None: the budget never fails a port.
        self._fail = fail
        self._charges = charges
        self._read_size = read_size
        self._packet_overhead = packet_overhead
        self._resume = resume
        self.peak = 0  # the highest in_use() seen (measured once a round)
        self.pauses = 0  # reads paused because the budget was used up, ever
        self.reserve_reads = 0  # reads made into the reserve, ever
        self.failed_ports = 0  # ports failed to end a stall on unfinished packets, ever
        #: The bytes each framed port's framer holds of a packet not yet whole, for the
        #: ports holding any (kept by :meth:`framer_holds` only when it changes): where a
        #: stall's victim is chosen (:meth:`stall_victim`); and their sum.
        self.unfinished: dict[E, int] = {}
        self.unfinished_total = 0
        #: Hubs (and the daemon's sessions): they count what ports queued/consumed.
        self.owners: list[BudgetOwner] = []
        #: What another budget of the same server charges, in bytes (the native core's,
        #: for the hosted half it runs): counted in :meth:`in_use`, so that one limit
        #: bounds both.  None: no other budget.
        self.external: Callable[[], int] | None = None
        # Ports paused for the budget, in the order they paused, and those among them
        # whose owner was waiting for input, in the order they came (dicts: ordered
        # sets, so that a pause, a release, a ``cmd_want`` and a close cost O(1) each
        # however many ports are paused).
        self.paused: dict[E, None] = {}
        self._reserve_waiters: dict[E, None] = {}
        #: The owner mailbox's cell of each port a mailbox owns (``cmd_owner``; only with
        #: a limit): the budget keeps its paused ones there, for :meth:`want_owner`.
        self.owner_cells: dict[E, OwnerCell] = {}
        #: Bytes of the budget only ports whose owner waits may read into.
        self.reserve = 0 if limit is None else limit // 4
        #: Headroom a read needs when the owner does not wait: a whole read, plus the reserve.
        self.read_floor = read_size + self.reserve
        #: Below this headroom a read of packets could be charged more than is left (each
        #: packet ``packet_overhead`` on top of its bytes): such reads are shortened.
        self.packet_floor = read_size * (1 + packet_overhead) + self.reserve

    def in_use(self) -> int:
        """Bytes charged to the budget now: input delivered to the loops and not yet taken
        by an owner, framing buffers, and output queued by owners and not yet written -
        and what another budget of the server charges (:attr:`external`)."""
        external = self.external
        return self.own_in_use() + (0 if external is None else external())

    def own_in_use(self) -> int:
        """:meth:`in_use` without what another budget charges: this budget's own ports."""
        charges = self._charges
        used = (
            charges.delivered_total
            + charges.framing_bytes
            - charges.bytes_out
            - charges.bytes_discarded
            - charges.bytes_forwarded
        )
        for owner in self.owners:
            used += owner.queued_bytes - owner.consumed_bytes
        return used

    def headroom(self) -> int:
        """Once a round: the headroom, bytes that may still be read before the budget is
        used up (ordinary reads also leave the reserve, see :meth:`blocks`);
        :data:`UNLIMITED` without a budget.

        Ports paused for the budget read again once the total is back at one half of it;
        reserve waiters as soon as one read fits."""
        limit = self.limit
        if limit is None:
            return UNLIMITED
        used = self.in_use()
        if used > self.peak:
            self.peak = used
        headroom = limit - used
        paused = self.paused
        if paused:
            if used <= limit // 2:
                self.paused = {}
                self._reserve_waiters = {}
                for entry in paused:
                    self._unpause(entry)
            elif self._reserve_waiters and headroom >= self._read_size:
                self._release_waiters()
            elif self._reserve_waiters and self._fail is not None:
                # A waiting port cannot read, even into the reserve: stalled, if on
                # unfinished packets fail the port holding the most, until a read fits.
                fail = self._fail
                while (victim := self.stall_victim(headroom)) is not None:
                    entry, size = victim
                    self.failed_ports += 1
                    self.unfinished_gone(entry)
                    fail(entry, size)
                    used = self.in_use()
                    headroom = limit - used
                if used <= limit // 2:
                    return self.headroom()
                if self._reserve_waiters and headroom >= self._read_size:
                    self._release_waiters()
        return headroom

    def _release_waiters(self) -> None:
        """The reserve has room again: the ports whose owner waits try first."""
        paused = self.paused
        waiters, self._reserve_waiters = self._reserve_waiters, {}
        for entry in waiters:
            if entry in paused:
                del paused[entry]
                self._unpause(entry)

    def framer_holds(self, entry: E, before: int, after: int) -> None:
        """``entry``'s framer went from holding ``before`` to ``after`` bytes of a packet
        not yet whole (the I/O thread calls it only when they differ, under a limit)."""
        self.unfinished_total += after - before
        if after:
            self.unfinished[entry] = after
        else:
            self.unfinished.pop(entry, None)

    def unfinished_gone(self, entry: E) -> None:
        """``entry`` no longer holds an unfinished packet (it closed)."""
        size = self.unfinished.pop(entry, None)
        if size is not None:
            self.unfinished_total -= size

    def stall_victim(self, headroom: int) -> tuple[E, int] | None:
        """The port to fail so that the budget makes progress again, with the unfinished
        bytes it holds, if the budget is stalled on unfinished packets (the module
        docstring, "Progress"): a port whose owner waits cannot read, even into the
        reserve (a reserve waiter is paused and ``headroom`` is less than a read), and the
        bytes framers hold of packets not yet whole leave no room for a read by
        themselves - were every other charge freed, no read would fit, so nothing an owner
        or a peer does can end the stall.  The victim holds the most of them.  Asked only
        when a reserve waiter finds no room (:meth:`headroom`), and then O(ports holding
        unfinished bytes)."""
        limit = self.limit
        read = self._read_size
        if (
            limit is None
            or not self._reserve_waiters
            or headroom >= read
            or limit - self.unfinished_total >= read
            or not self.unfinished
        ):
            return None
        entry = max(self.unfinished, key=self.unfinished.__getitem__)
        return entry, self.unfinished[entry]

    def _unpause(self, entry: E) -> None:
        entry.global_paused = False
        cell = self.owner_cells.get(entry)
        if cell is not None:
            cell.paused.pop(entry, None)
        if not entry.closed:
            self._resume(entry)

    def packet_read_size(self, entry: E, headroom: int) -> int:
        """Bytes a port of packets may read when the budget is short: so many that, were
        each byte a packet charged ``packet_overhead`` more, the read still fits what is
        left for it (all of ``headroom`` for a waiting owner, else what the reserve
        leaves).  :meth:`blocks` let the read happen, so that is a whole read at least
        and the answer at least ``read_size // (1 + packet_overhead)`` bytes."""
        room = headroom if entry.owner_waits() else headroom - self.reserve
        return max(min(room // (1 + self._packet_overhead), self._read_size), 1)

    def blocks(self, entry: E, headroom: int) -> bool:
        """A read is due but ``headroom`` is below a whole read plus the reserve: read into
        the reserve if the port's owner waits for input (False), else pause (True).

        ``global_paused`` is written before the port's waiter is read; the port writes its
        waiter before it reads ``global_paused`` (Port._receive): one of the two sees the
        other, so a waiting owner is never left behind a pause it did not hear of.  For a
        port a mailbox owns, the port is added to the mailbox's :class:`OwnerCell` before
        the mailbox's waiters are read; a task parking on the mailbox appends its waiter
        before it reads the cell (``Mailbox._want_input``): the same argument."""
        entry.global_paused = True
        cell = self.owner_cells.get(entry)
        if cell is not None:
            cell.paused[entry] = None
        waits = entry.owner_waits()
        if waits and headroom >= self._read_size:
            entry.global_paused = False
            if cell is not None:
                del cell.paused[entry]
            self.reserve_reads += 1
            return False
        if entry not in self.paused:
            entry.pauses += 1
            self.pauses += 1
            self.paused[entry] = None
        if waits:
            self._reserve_waiters[entry] = None  # once, in the order they came
        self._resume(entry)  # its interest: not read while global_paused
        return True

    def want(self, entry: E) -> None:
        """The owner of a port paused by the budget waits for input: let it try a read
        into the reserve (and pause again, as a reserve waiter, if there is no room)."""
        if entry.closed or not entry.global_paused:
            return
        self.paused.pop(entry, None)
        self._reserve_waiters.pop(entry, None)
        self._unpause(entry)

    def want_owner(self, cell: OwnerCell) -> None:
        """``cmd_want_owner``: a task waits on the mailbox whose cell is ``cell``: each of
        its ports the budget paused may try a read into the reserve (:meth:`want`).
        O(those ports), not O(the ports the mailbox owns).  Not the reserve waiters: they
        are let in first as soon as a read fits (each round checks), and letting one try
        again now would only pause it again, behind the waiters that came after it."""
        waiters = self._reserve_waiters
        for entry in list(cell.paused):
            if entry not in waiters:
                self.want(entry)

    def set_owner(self, entry: E, cell: OwnerCell | None) -> None:
        """``cmd_owner``: ``entry``'s owner is now the mailbox whose cell is ``cell``
        (None: no mailbox).  A paused port moves to the new owner's cell - before its
        waiters are read (see :meth:`blocks`): a task that parked on it before this
        command lets the port try the reserve now."""
        old = self.owner_cells.pop(entry, None)
        if cell is not None and not entry.closed:
            self.owner_cells[entry] = cell
        if not entry.global_paused:
            return
        if old is not None:
            old.paused.pop(entry, None)
        if cell is not None and not entry.closed:
            cell.paused[entry] = None
            if entry.owner_waits():
                self.want(entry)

    def forget(self, entry: E) -> None:
        """``entry`` closed: it is no longer paused, nor owned, nor holds an unfinished
        packet."""
        if self.unfinished:
            self.unfinished_gone(entry)
        cell = self.owner_cells.pop(entry, None) if self.owner_cells else None
        if entry.global_paused:
            self.paused.pop(entry, None)
            self._reserve_waiters.pop(entry, None)
            if cell is not None:
                cell.paused.pop(entry, None)

    def read_allowance(self, entry: ReceiveFlow) -> int:
        """For handlers that read (UDP, TUN): the bytes of input ``entry`` may read now.
        The streams' rule: ordinary reads leave the reserve untouched, reads for a waiting
        owner may use it, and no read may take the input charged past ``limit``.  A
        handler reads only while a whole read fits in the allowance."""
        if self.limit is None:
            return UNLIMITED
        headroom = self.limit - self.in_use()
        return headroom if entry.owner_waits() else headroom - self.reserve

    def resumes(self, entry: ReceiveFlow, size: int) -> bool:
        """For handlers paused by the budget: whether ``entry`` may read again - once the
        total is back at one half of the limit, or at once for a waiting owner when a read
        of ``size`` bytes fits in the reserve."""
        assert self.limit is not None
        used = self.in_use()
        return used <= self.limit // 2 or (self.limit - used >= size and entry.owner_waits())
