"""The I/O thread: one thread, one selector, every socket.

The thread owns each socket from creation to close; nothing else ever makes a syscall on
one.  It takes commands from the event loops through one :class:`~._wakeup.WakeupQueue`
(``send``, ``close``, ``connect``, ``listen``...) and turns what happens on the sockets into
messages, which it appends to the inbox of the loop that owns the port (another
``WakeupQueue``), waking that loop once per round of the selector.

A round of the loop::

    events = poll()                  # blocks only when no command is queued (see _wakeup)
    run every queued command         # so options set before data arrived apply to it
    handle each event                # recv_into the shared buffer, accept, finish a connect
    run every queued command again   # sends only append to the port's output queue...
    flush each port that got output  # ...so a port's writes of one round are one sendmsg
    notify each loop's inbox         # one wake-up per loop per round, none if it is awake

The flush takes the list of ports marked dirty so far; what a flush marks dirty (a
handler's reply to what it read meanwhile, an event a write caused for a daemon's client)
is flushed in the next round, which then polls without blocking.  So a round ends however
fast a peer keeps a handler busy, and no handler is run again from its own flush.  Each
port's write is one system call and its result is applied to that port at once, before the
next entry's flush runs (a handler's flush may act on a port written earlier in the round).

Work per round is bounded: a stream reads once per readiness event, a listener accepts
:data:`~._tcp.ACCEPT_BATCH` connections, and a handler that has more than its own budget to do
(e.g. ZeroMQ's ``DRAIN_BATCH`` messages) asks to run again with :meth:`IOThread.call_soon`.

Errors are contained: an exception while handling one port's event or command closes that
port with a :class:`~._messages.Closed` message naming the error, and the thread goes on.

Hosted
------
With ``hosted=True`` (the native core's Python half: ``ioserver._native_core``) the I/O
half has no thread of its own.  Its loop is a generator (:meth:`IOThread._rounds`, the one
the thread runs without ever pausing) that pauses between two rounds; the native thread
resumes it for one round (:meth:`IOThread.run_round`) under the GIL when this half's
poller fd fires (its command queue's wake-up fd is in that poller) or when the seconds the
last round returned have passed.  A round polls without blocking, and one that found work
asks for the next at once: the host's poller is edge-triggered, so a descriptor of this
half that is still ready would not wake it again.  The hubs' inboxes are the host's, and
so are the stop notices (:meth:`IOThread.stop_hosted` closes this half's ports only).

Receive flow control
--------------------
Three things decide whether a stream's socket is read, each on its own
(``_stream_interest``): the active credit, the port's watermarks and the global memory
budget.  Their rules, the pause handshake with the port's loop half and the budget's
reserve for waiting owners are written once, in :mod:`~._flow` (its theory of
operation); this thread applies them: ``_check_msgq``/``_pause_msgq``/``cmd_resume`` for
the watermarks, its :class:`~._flow.MemoryBudget` and ``cmd_want`` for the budget (and
``cmd_owner``/``cmd_want_owner`` for ports a mailbox owns: its ``OwnerCell``; and
``_fail_for_progress`` when unfinished packets stall the budget, "Progress").  What it
may read of a port's loop half - its :class:`~._flow.Window`, nothing else - is the
contract of :mod:`~._contract`.
"""

from __future__ import annotations

import errno
import heapq
import logging
import resource
import select
import socket
import struct
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from ._conn import CONNECTING, HANDLER, LISTENER, STREAM, Conn, Handler
from ._contract import ConnectRequest, ListenRequest
from ._exceptions import ConnectError, errno_name
from ._flow import BUDGET_RECHECK, UNLIMITED, MemoryBudget, OwnerCell, Window
from ._framing import PACKET_OVERHEAD, FrameError, Framer, PacketTooLarge
from ._messages import PASSIVE, WRITABLE, Closed, Data, Error
from ._options import apply_active_mode
from ._poller import ERROR, READ, WRITE, make_poller
from ._tcp import connect_stream, listen_tcp, on_connect_event, on_listener_event
from ._tls import take_input
from ._unix import cmd_listen_unix
from ._wakeup import WakeupQueue

__all__ = ["IOThread", "raise_open_file_limit"]

if TYPE_CHECKING:
    import zmq

#: ``struct linger {l_onoff=1, l_linger=0}``: close with an RST (see ``IOThread._reset``).
_RESET = struct.pack("ii", 1, 0)

log = logging.getLogger("ioserver")

READ_SIZE = 65536  # bytes: the shared receive buffer, and so the largest Data message
IOV_MAX = 1024  # buffers gathered in one sendmsg
#: Seconds between two accepts of a listener out of descriptors (``EMFILE``...), which also
#: tries again whenever one of this thread's ports closes: descriptors freed elsewhere in
#: the process (the application's files, other threads) tell this thread nothing.  Ranch's
#: acceptors wait 100 ms after ``{error, emfile}``; nginx retries after
#: ``accept_mutex_delay`` (500 ms).
ACCEPT_RETRY = 0.1
#: Seconds the I/O thread waits for the loop's flush after handing it a batch, at most (see
#: the "flush point" in ioserver._wakeup): a bound for a loop that never flushes, not a delay.
#: The flush point is the one GIL workaround of this thread that still pays (issue 14,
#: interleaved A/B on a shared 2-core machine, Python's 5 ms switch interval):
#: examples/httpd.py under wrk -c100 does 1.35x the requests/s with it than without (faster
#: in 7 of 8 rounds; with the old Linux AIO writes as well 1.37x, 14 of 14: the writes added
#: nothing).  On 100 x 64 B echo it neither pays nor costs through the noise, and with one
#: connection it adds about 2 us to the round trip's p50 (18 us against 16).  The bound: on
#: httpd, 10 ms gave 1.24x asyncio streams, 2 ms 1.11x, 50 ms no more than 10 ms (issue 7).
FLUSH_WAIT = 0.01
#: Seconds the ending I/O thread keeps trying to publish a loop's last batch (its stop
#: notice) should publishing fail (a ``MemoryError``): see ``IOThread._publish_last``.
LAST_PUBLISH_TIMEOUT = 5.0
_READABLE = READ | ERROR
_WRITABLE = WRITE | ERROR

# Sets Data.data on an instance made with object.__new__: the frozen dataclass's __init__
# costs a Python frame and an object.__setattr__ per message.
_SET_DATA = Data.__dict__["data"].__set__


def owner_cell_of(
    cells: dict[int, tuple[Any, Any]], key: int, io: Any, make: Callable[[], Any]
) -> Any:
    """The cell under ``key`` (an I/O half's ``id``) in a mailbox's ``cells``, made by
    ``make()`` the first time or when the entry there is a stopped half's (its weak
    reference dead: the same ``id`` now names another object).  Entries of halves that
    ended are dropped whenever a cell is made."""
    entry = cells.get(key)
    if entry is not None and entry[0]() is io:
        return entry[1]
    for stale in [k for k, (ref, _) in cells.items() if not _alive(ref())]:
        del cells[stale]
    cell = make()
    cells[key] = (weakref.ref(io), cell)
    return cell


def _alive(io: Any) -> bool:
    return io is not None and bool(io.is_alive())


def raise_open_file_limit() -> int:
    """Raise the soft open-file limit to the hard limit; return the (new) soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):  # pragma: no cover - e.g. a hard limit of infinity
            pass
    return soft


def internal_error_reason(exc: BaseException) -> str:
    """The ``Closed`` reason of a port closed for an internal error: ``"internal error:
    <repr>"``, or ``"internal error"`` if the error's ``repr`` itself fails."""
    try:
        return f"internal error: {exc!r}"
    except Exception:
        return "internal error"


#: What a port's owner gets when even its internal error cannot be reported.
_INTERNAL_ERROR = Closed("internal error", "EIO")


class _WakeupSlot:
    """Stands in the port table at the command queue's wake-up fd."""

    __slots__ = ("kind",)

    def __init__(self) -> None:
        self.kind = -1


def _over_budget(cap: int, size: int) -> PacketTooLarge:
    """A message charged ``size`` bytes that the budget can never grant (``cap``:
    :attr:`IOThread.message_cap`)."""
    return PacketTooLarge(cap, size, "message", "bytes charged", "memory_limit less a read")


class IOThread:
    """The I/O thread and its state.  Loops talk to it only through :meth:`submit`."""

    #: Not the native core (``ioserver._native_core.NativeIOThread``).
    native = False
    #: What makes a port's flow-control window, ``window_class(framer, packet_overhead)``
    #: (the loop half calls it).
    window_class: Callable[[Any, int], Any] = Window
    #: The class of the command queue (the native core's routes its own commands).
    commands_class: type[WakeupQueue[Any]] = WakeupQueue

    def __init__(
        self,
        *,
        poller: str | None = None,
        name: str = "ioserver-io",
        memory_limit: int | None = None,
        port_buffer_limit: int | None = None,
        hosted: bool = False,
    ) -> None:
        #: Hosted: no thread of its own; another I/O thread (the native core's) runs its
        #: rounds, one :meth:`run_round` at a time (see "Hosted" in the module docstring).
        self.hosted = hosted
        self.memory_limit = memory_limit
        self.port_buffer_limit = port_buffer_limit
        #: The most one message may be charged: ``memory_limit`` less a read.  A port
        #: reads only while a whole read fits under ``memory_limit``, so a packet still
        #: arriving charged more than this by itself would never be read further; such a
        #: port, and one whose whole message is charged more, fails with ``EMSGSIZE``
        #: (:meth:`_deliver_framed`).  None: no limit.
        self.message_cap = None if memory_limit is None else max(0, memory_limit - READ_SIZE)
        self.framing_bytes = 0
        #: The global memory budget (see "Receive flow control" above); it charges the
        #: counters below, and resumes a port it paused by recomputing its interest.
        self.budget: MemoryBudget[Conn] = MemoryBudget(
            memory_limit,
            self,
            READ_SIZE,
            PACKET_OVERHEAD,
            self._stream_interest,
            self._fail_for_progress,
        )
        self.delivered_total = 0  # bytes of Data payloads handed to the loops, ever
        self.bytes_discarded = 0  # queued output dropped because its port closed
        self.bytes_forwarded = 0  # output of a daemon's ports, handed to the daemon
        self.fd_limit = raise_open_file_limit()
        self._poller = make_poller(poller)
        self.poller_name = self._poller.name
        self.commands: WakeupQueue[tuple[Callable[..., None], Any, Any]] = self.commands_class()
        try:
            # select's FD_SETSIZE: in a process with a thousand files open already, the
            # server cannot start (PollerLimitError names the poller and the limit).
            self._poller.register_wakeup(self.commands.wakeup.fileno())
        except BaseException:
            self._poller.close()
            self.commands.close()
            raise
        # The port table: fd -> Conn, sized from the open-file limit (capped; it grows).
        self._table: list[Any] = [None] * min(self.fd_limit, 1 << 16)
        self._wakeup_slot = _WakeupSlot()
        self._put_table(self.commands.wakeup.fileno(), self._wakeup_slot)
        self._inboxes: list[WakeupQueue[tuple[Any, Any]]] = []
        self._dirty: list[Conn | Handler] = []
        # Handlers that asked to run next round without waiting for their fd (see
        # call_soon), and timers as a heap of (deadline, sequence, callback).
        self._ready: list[Handler] = []
        # TLS streams whose layer holds input their socket will not signal (ioserver._tls).
        self.tls_input: list[Conn] = []
        # Their layers' buffer for ciphertext read (one per thread: it reads one socket
        # at a time), made by the first TLS connection (ioserver._tls.TLSSocket).
        self.tls_scratch: memoryview | None = None
        self._timers: list[tuple[float, int, list[Callable[[], None] | None]]] = []
        self._timer_sequence = 0
        # ZeroMQ: one context per I/O server, made on first use; every socket made from it,
        # so that shutdown can close those still on their way to the thread.
        self._zmq_context: zmq.Context[zmq.Socket[bytes]] | None = None
        self.zmq_sockets: set[zmq.Socket[bytes]] = set()
        self._paused_listeners: list[Conn] = []
        #: Listeners told they ran out of descriptors, that accepted nothing since
        #: (``_tcp.on_listener_event``: an episode is told once, not at every retry).
        self._told_exhausted: set[Conn] = set()
        # The timer that lets them try again (ACCEPT_RETRY), while any is paused.
        self._accept_retry: list[Callable[[], None] | None] | None = None
        self._buffer = bytearray(READ_SIZE)
        self._view = memoryview(self._buffer)
        # The flush point: after handing a loop a batch, wait for that loop's flush
        # (ioserver._wakeup) on the wake-up fd alone, through an edge-triggered epoll of its
        # own.  (Not when hosted: the flush point is the host's.)
        self._flush_epoll: select.epoll | None = None
        if not hosted and self._poller.wakeup_is_edge_triggered:
            self._flush_epoll = select.epoll()
            self._flush_epoll.register(
                self.commands.wakeup.fileno(), select.EPOLLIN | select.EPOLLET
            )
        #: Set by this thread before it hands a loop a batch, cleared by that loop's flush,
        #: which then writes the wake-up fd (see ioserver._wakeup).
        self.flush_wanted = False
        self.flush_waits = 0
        self.flush_timeouts = 0
        #: Whether this thread waits for the loop's flush point: with epoll, and not when
        #: it also serves a daemon's remote clients (ioserver._control).
        self.waits_for_flush = self._flush_epoll is not None
        self._stopping = False
        self.ports_open = 0
        self.polls = 0
        self.events = 0
        self.commands_run = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.internal_errors = 0
        #: Closed stream ports reset because their queued output was not written within
        #: their ``linger`` seconds (a peer that does not read), or at once (``linger=0``).
        self.linger_timeouts = 0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        # A hosted half's rounds: the generator of _rounds, paused between two rounds.
        self._hosted_rounds: Iterator[float | None] | None = None
        #: ``cmd_send`` bound once: the I/O thread recognises it by identity and runs it
        #: inlined.  Ports queue ``(send_command, conn, data)``.
        self.send_command: Callable[[Conn, bytes], None] = self.cmd_send

    # -- the loops' side ----------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, function: Callable[..., None], target: object, argument: object) -> None:
        """Queue ``function(target, argument)`` to run on the I/O thread."""
        self.commands.put((function, target, argument))

    def make_inbox(self, hub: object) -> WakeupQueue[tuple[Any, Any]]:
        """A new loop's inbox, which this thread fills (``hub`` drains it)."""
        inbox: WakeupQueue[tuple[Any, Any]] = WakeupQueue()
        self.add_inbox(inbox)
        return inbox

    def add_inbox(self, inbox: WakeupQueue[tuple[Any, Any]]) -> None:
        """Make ``inbox`` one that is notified after every round (runs on the I/O thread)."""
        self._inboxes.append(inbox)

    def zmq_context(self) -> zmq.Context[zmq.Socket[bytes]]:
        """The server's ZeroMQ context, made on first use."""
        if self._zmq_context is None:
            import zmq

            self._zmq_context = zmq.Context()
        return self._zmq_context

    # -- for handlers (run on the I/O thread) ---------------------------------------------
    def call_soon(self, handler: Handler) -> None:
        """Run ``handler.on_ready(0)`` next round, without waiting for its fd (e.g. a
        ZeroMQ socket with messages left after a bounded drain: its fd will not fire).

        Once per round however often it is asked: a handler that asks from each of its
        runs in a round (its fd's event, its own call, its flush) runs once more, not once
        per ask, so its work per round stays bounded."""
        if not handler.scheduled:
            handler.scheduled = True
            self._ready.append(handler)

    def call_later(
        self, delay: float, callback: Callable[[], None]
    ) -> list[Callable[[], None] | None]:
        """Call ``callback()`` on the I/O thread in ``delay`` seconds; return a handle
        whose ``[0] = None`` cancels it."""
        self._timer_sequence += 1
        handle: list[Callable[[], None] | None] = [callback]
        heapq.heappush(self._timers, (time.monotonic() + delay, self._timer_sequence, handle))
        return handle

    def check_fd(self, fd: int) -> None:
        """Raise :exc:`~ioserver.PollerLimitError` if the poller cannot watch ``fd``
        (select's ``FD_SETSIZE``).  Any thread may call it: it reads constants only."""
        self._poller.check(fd)

    def adopt(self, entry: Conn | Handler) -> None:
        """Put a handler (or stream) in the port table under its fd.

        Raises :exc:`~ioserver.PollerLimitError`, and changes nothing, when the poller
        cannot watch that fd (select's ``FD_SETSIZE``): the caller refuses that port."""
        self._poller.check(entry.fd)  # PollerLimitError: this port only, nothing changed
        self._put_table(entry.fd, entry)
        self.ports_open += 1

    _adopt = adopt

    def release(self, entry: Conn | Handler) -> None:
        """Take ``entry`` out of the table and the poller (it closes its fd itself)."""
        self._interest(entry, 0)
        if 0 <= entry.fd < len(self._table) and self._table[entry.fd] is entry:
            self._table[entry.fd] = None
            self.ports_open -= 1

    def mark_dirty(self, entry: Conn | Handler) -> None:
        """Flush ``entry`` at the end of this round (of the next one when called during
        the round's flushes: a flush never leads to another flush in the same round)."""
        if not entry.dirty:
            entry.dirty = True
            self._dirty.append(entry)

    def _run_timers(self) -> float:
        """Run the timers that are due; return seconds until the next (-1.0: none, 0.0
        when one ran: what it delivered is published at the end of this round, so the
        round must not block in poll before that)."""
        timers = self._timers
        now = time.monotonic()
        ran = False
        while timers and timers[0][0] <= now:
            ran = True
            _, _, handle = heapq.heappop(timers)
            callback = handle[0]
            if callback is not None:
                try:
                    callback()
                except Exception:
                    self.internal_errors += 1
                    log.exception("a timer of the I/O thread failed")
        if ran:
            return 0.0
        if not timers:
            return -1.0
        return max(timers[0][0] - now, 0.0)

    # -- the table ----------------------------------------------------------------------
    def _put_table(self, fd: int, entry: Conn | Handler | _WakeupSlot) -> None:
        table = self._table
        if fd >= len(table):
            table.extend([None] * (max(fd + 1, 2 * len(table)) - len(table)))
        table[fd] = entry

    def _interest(self, conn: Conn | Handler, mask: int) -> None:
        """Set what the poller watches for ``conn``, with no syscall if nothing changes."""
        old = conn.mask
        if mask == old:
            return
        if old == 0:
            self._poller.register(conn.fd, mask)
        elif mask == 0:
            self._poller.unregister(conn.fd)
        else:
            self._poller.modify(conn.fd, mask)
        conn.mask = mask

    def _stream_interest(self, conn: Conn) -> None:
        mask = 0
        if not conn.read_eof and (
            # A port closed while it flushes its output reads on, whatever its active mode,
            # its held packets and its pauses (this thread drops what comes: nothing is
            # delivered nor charged), so that a peer which is itself blocked writing to us
            # can drain what we flush to it.
            conn.close_pending
            or (
                conn.credit
                and not conn.held
                and not conn.msgq_paused
                and not conn.global_paused
                and not conn.queue_paused
            )
        ):
            mask = READ
        if conn.outq:
            mask |= WRITE
        if conn.tls is not None:
            mask = conn.tls.interest(mask)
        self._interest(conn, mask)

    # -- the thread ---------------------------------------------------------------------
    def _run(self) -> None:
        try:
            for _ in self._rounds():
                pass  # a thread's rounds never pause (only a hosted half's do)
        except BaseException:  # pragma: no cover - a bug in the loop itself
            log.exception("the I/O thread failed")
            raise
        finally:
            self._shutdown()

    def _rounds(self) -> Iterator[float | None]:
        """The rounds of the I/O thread, until it stops.

        A generator, so that a hosted half (``hosted=True``) can pause between two rounds
        (:meth:`run_round`) with every local below kept; a thread's rounds never pause
        (``hosted`` is false: the loop does not yield), so they cost what a plain loop
        does."""
        hosted = self.hosted
        events: list[tuple[int, int]] = []
        commands = self.commands
        pending = commands.items
        poll = self._poller.poll
        table = self._table
        dirty = self._dirty
        inboxes = self._inboxes
        # The dirty list of the round after (see the flushes below).
        spare: list[Conn | Handler] = []
        buffer = self._buffer
        view = self._view
        write = self._write
        broken = self._broken
        run_commands = self._run_commands
        new_message = object.__new__
        set_data = _SET_DATA
        flush_wait = False
        unpublished = False  # a notify failed partway: the next round must not block
        wait_for_flush = self._wait_for_flush
        budget = self.budget
        read_floor = budget.read_floor
        packet_floor = budget.packet_floor
        while not self._stopping:
            # Bytes this round may still read: the budget is firm, so a read that
            # could pass it is not made (the port pauses instead).
            headroom = UNLIMITED if budget.limit is None else budget.headroom()
            if flush_wait:
                # The loop is busy with the batch we handed it: let it run without
                # us taking the GIL until it flushes (see ioserver._wakeup).
                flush_wait = False
                if not self._ready and not dirty:
                    wait_for_flush()
                timeout = 0.0
            else:
                timeout = -1.0 if commands.prepare_to_sleep() else 0.0
            if budget.paused and timeout < 0:
                # Owners release memory without telling this thread: while reads are
                # paused for the budget, look again every few milliseconds.
                timeout = BUDGET_RECHECK
            if self._timers:
                due = self._run_timers()
                if due >= 0 and (timeout < 0 or due < timeout):
                    timeout = due
            if self._ready or dirty or self.tls_input or unpublished:
                # Handlers to run, output from last round's flushes, a batch to publish.
                timeout = 0.0
                unpublished = False
            if hosted:
                # Pause until the host runs the next round: at once while this round
                # found work (the host's poller is edge-triggered, and this poller's
                # level-triggered descriptors still ready do not signal it again), else
                # when this poller's fd fires or in ``timeout`` seconds (None: no timer).
                yield 0.0 if events else (None if timeout < 0 else timeout)
                if budget.limit is not None:
                    headroom = budget.headroom()
                timeout = 0.0  # the host polled: this poll only collects
            events = poll(timeout)
            if self.tls_input:
                events = events + take_input(self)
            commands.asleep = False
            self.polls += 1
            self.events += len(events)
            if pending:
                # Options set before data arrived apply to that data.
                run_commands()
            if budget.limit is not None:
                # The poll may have slept while owners queued output (and took input):
                # this round's reads are admitted against what is in use now, not the
                # figure from before the sleep (the pauses and releases stay the top's).
                headroom = budget.limit - budget.in_use()
            received = 0
            for fd, mask in events:
                conn = table[fd]
                if conn is None:
                    continue
                try:
                    if conn.kind == STREAM:
                        # The hot path, inlined: one recv_into the shared buffer, one
                        # Data message to the owning loop's inbox.
                        if mask & _WRITABLE and conn.outq:
                            write(conn)
                            if conn.closed:
                                continue
                        if not (mask & _READABLE and conn.mask & READ):
                            continue
                        if conn.close_pending:
                            # Closing: what arrives is dropped here (not the budget's).
                            self._drop_input(conn)
                            continue
                        if headroom < read_floor and budget.blocks(conn, headroom):
                            continue
                        # A port of packets charges each one PACKET_OVERHEAD too:
                        # when the budget is short, it reads only what it can charge.
                        framed_short = headroom < packet_floor and conn.packet_overhead
                        try:
                            if framed_short:
                                n = conn.sock.recv_into(
                                    buffer, budget.packet_read_size(conn, headroom)
                                )
                            else:
                                n = conn.sock.recv_into(buffer)
                        except BlockingIOError:
                            continue
                        except OSError as exc:
                            broken(conn, exc.errno)
                            continue
                        if n:
                            received += n
                            headroom -= n
                            conn.bytes_in += n
                            port = conn.port
                            if conn.framer is None:
                                try:
                                    message = new_message(Data)  # Data() without __init__
                                    set_data(message, bytes(view[:n]))
                                    conn.deliver((port, message))
                                except Exception:
                                    # Not delivered (a MemoryError): not charged either.
                                    # The port fails as an internal error (below); before,
                                    # the read stayed charged to the budget for good.
                                    self.delivered_total -= n
                                    raise
                                conn.delivered_messages += 1
                                conn.delivered_bytes += n
                                if conn.credit > 0:
                                    self._spend_credit(conn, 1)
                            else:
                                # A framed read is charged more than its n bytes
                                # (PACKET_OVERHEAD a packet, decoded objects their
                                # share): all of it comes off this round's headroom,
                                # or the next port's read would be admitted against
                                # memory already spent.
                                mark = self.delivered_total + self.framing_bytes
                                delivered = self._deliver_framed(conn, n)
                                headroom -= self.delivered_total + self.framing_bytes - mark
                                if not delivered:
                                    continue
                            if (
                                conn.delivered_bytes > conn.check_bytes
                                or conn.delivered_messages > conn.check_messages
                            ):
                                self._check_msgq(conn)
                        else:
                            self._eof(conn)
                    elif conn.kind == HANDLER:
                        if received:
                            # A handler that reads asks the budget (read_allowance),
                            # which must see the streams' reads of this round too.
                            self.bytes_in += received
                            self.delivered_total += received
                            received = 0
                        conn.on_ready(mask)
                    elif conn.kind == LISTENER:
                        on_listener_event(self, conn, mask)
                    elif conn.kind == CONNECTING:
                        on_connect_event(self, conn, mask)
                    elif not self._poller.wakeup_is_edge_triggered:
                        commands.wakeup.drain()
                except Exception as exc:
                    self._internal_error(conn, exc)
            self.bytes_in += received
            self.delivered_total += received
            if self._ready:
                ready, self._ready = self._ready, []
                for handler in ready:
                    handler.scheduled = False
                    if not handler.closed:
                        try:
                            handler.on_ready(0)
                        except Exception as exc:
                            self._internal_error(handler, exc)
            if pending:
                # Sends queued while this round read (the loop ran during
                # its syscalls) leave in this round's flush.
                run_commands()
            if dirty:
                # This round's entries.  What their flushes mark dirty (a handler's
                # reply to what it read in its flush...) is the next round's: no
                # handler runs again from its own flush, and a round ends however
                # fast a peer keeps sending (the next round then polls without
                # blocking, see the top of the loop).
                self._dirty = spare
                sent_total = 0
                for conn in dirty:
                    conn.dirty = False
                    if conn.closed or conn.mask & WRITE:
                        continue
                    try:
                        if isinstance(conn, Handler):
                            conn.flush()
                            continue
                        outq = conn.outq
                        if len(outq) != 1:
                            if outq:
                                write(conn)
                            continue
                        # _write, inlined for one buffer sent whole.
                        try:
                            sent = conn.sock.send(outq[0])
                        except BlockingIOError:
                            sent = 0
                        except OSError as exc:
                            broken(conn, exc.errno)
                            continue
                        if (
                            sent == conn.out_bytes
                            and not conn.close_pending
                            and not conn.shutdown_pending
                        ):
                            conn.bytes_out += sent
                            sent_total += sent
                            conn.out_bytes = 0
                            outq.clear()
                            if conn.window.send_blocked:
                                self._notify_writable(conn)
                        else:
                            self._sent(conn, sent)
                    except Exception as exc:
                        self._internal_error(conn, exc)
                self.bytes_out += sent_total
                dirty.clear()
                spare, dirty = dirty, self._dirty
            if (
                len(inboxes) == 1
                and inboxes[0].staged
                and self.waits_for_flush
                and not self._stopping
            ):
                # The loop gets a batch: wait for its flush point before the next round
                # (the top of the loop).  Set before the batch is published, so that the
                # flush which follows its drain sees it.  Not in the last round: no round
                # waits for that flush, and the hub may run it after it closed the
                # wake-up fd (the stop notice comes in the same drain).
                self.flush_wanted = True
                flush_wait = True
            for inbox in inboxes:
                try:
                    inbox.notify()
                except Exception as exc:
                    # (A MemoryError while the batch is published: what was not published
                    # stays staged, and goes in the next round's notify, which comes at
                    # once: that round polls without blocking.)
                    unpublished = True
                    self.internal_errors += 1
                    log.error("error while publishing a batch to a loop", exc_info=exc)
            table = self._table  # it may have grown

    def counters(self) -> dict[str, int]:
        """The counters :meth:`IOServer.statistics` reports (``ports_open``, ``polls``,
        ``events``, ``commands_run``, ``bytes_in``, ``bytes_out``, ``internal_errors``,
        ``linger_timeouts``, ``budget_failed_ports``, and the wakes towards this thread,
        ``wakes_sent`` and ``wakes_skipped``): a native core adds its thread's to its
        hosted half's."""
        commands = self.commands
        return {
            "ports_open": self.ports_open,
            "polls": self.polls,
            "events": self.events,
            "commands_run": self.commands_run,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "internal_errors": self.internal_errors,
            "linger_timeouts": self.linger_timeouts,
            "budget_failed_ports": self.budget.failed_ports,
            "wakes_sent": commands.wakes_sent,
            "wakes_skipped": commands.wakes_skipped,
        }

    # -- hosted (the native core runs the rounds: ioserver._native_core) ----------------
    def poller_fd(self) -> int:
        """The fd of this half's poller (an epoll fd, itself pollable): readable when one
        of its ports (or its command queue's wake-up fd) is ready.  A host watches it."""
        return self._poller.fileno()

    def run_round(self) -> float | None:
        """Run one round of a hosted half (on the host's thread, under the GIL): poll this
        half's poller without blocking, run its commands, handlers and timers, and hand
        what it delivers to the hubs' inboxes (``conn.deliver``).

        Returns:
            Seconds until this half wants its next round (0.0: at once, it found work),
            or None: not until its poller's fd is readable.
        """
        rounds = self._hosted_rounds
        if rounds is None:
            rounds = self._hosted_rounds = self._rounds()
            next(rounds)  # up to the first pause: the first round's timeout
        try:
            return next(rounds)
        except StopIteration:  # stopped (stop_hosted)
            return None

    def stop_hosted(self) -> None:
        """Stop a hosted half: one last round (the commands queued before the stop), then
        close every port, each owner getting its final ``Closed``.  The stop notices are
        the host's to give, once its own ports are closed too."""
        self._stopping = True
        rounds = self._hosted_rounds
        if rounds is not None:
            try:
                next(rounds)  # the last round: it ends the loop, so no pause comes
            except StopIteration:
                pass
            except Exception:
                self.internal_errors += 1
                log.exception("the hosted I/O half failed in its last round")
            self._hosted_rounds = None
        self._shutdown()

    def discard(self) -> None:
        """Release the fds of a thread that was never started."""
        self._poller.close()
        self._close_flush_epoll()
        self.commands.close()

    def _close_flush_epoll(self) -> None:
        if self._flush_epoll is not None:
            self._flush_epoll.close()

    def _wait_for_flush(self) -> None:
        """Block, without the GIL, until the loop flushes or :data:`FLUSH_WAIT` passes.

        Only the wake-up fd is watched (through its own edge-triggered epoll), so that
        sockets becoming ready while the loop works do not make this thread take the GIL
        from it; they are all read in the round that follows, with a zero timeout.
        """
        wait = FLUSH_WAIT
        if self._timers:
            due = self._run_timers()
            if 0 <= due < wait:
                wait = due
        if self.flush_wanted:
            assert self._flush_epoll is not None
            if not self._flush_epoll.poll(wait):
                self.flush_timeouts += 1
            self.flush_waits += 1
        self.flush_wanted = False

    def _run_commands(self) -> None:
        """Run every queued command; ``cmd_send``, the one of every echo, inlined."""
        pending = self.commands.items
        popleft = pending.popleft
        send_command = self.send_command
        dirty = self._dirty
        ran = 0
        while pending:
            function, target, argument = popleft()
            ran += 1
            try:
                if function is send_command:
                    if (
                        target.closed
                        or target.write_closed
                        or target.shutdown_pending
                        or target.close_pending
                    ):
                        self.bytes_discarded += len(argument)
                        continue
                    target.outq.append(argument)
                    target.out_bytes += len(argument)
                    if not target.dirty:
                        target.dirty = True
                        dirty.append(target)
                else:
                    function(target, argument)
            except Exception as exc:
                self._internal_error(target, exc)
        self.commands_run += ran

    def _internal_error(self, conn: object, exc: Exception) -> None:
        """A bug or an unexpected error while serving one port: close that port only.

        A second fault while reporting it (a ``repr`` of the error that raises, a
        ``MemoryError``) must not end the thread either: the owner then gets
        ``Closed("internal error", "EIO")``, and the port is closed whatever happens."""
        self.internal_errors += 1
        log.error("error while serving a port; closing it", exc_info=exc)
        if isinstance(conn, Conn) and not conn.closed:
            try:
                if conn.request is not None:
                    conn.deliver((conn.request, exc))
                    conn.request = None
                conn.deliver((conn.port, Closed(internal_error_reason(exc), "EIO")))
            except Exception:
                try:
                    log.exception("a second error while reporting an error; closing the port")
                    conn.deliver((conn.port, _INTERNAL_ERROR))
                except Exception:  # (out of memory: nothing more can be told)
                    pass
            finally:
                self._close(conn)
        elif isinstance(conn, Handler) and not conn.closed:
            try:
                conn.on_error(exc)
            except Exception:
                log.exception("a handler failed while closing after an error")

    def _shutdown(self) -> None:
        # Every owner hears of it once: a final Closed, and sends fail with ESHUTDOWN.
        closed = Closed("ioserver closed", "ESHUTDOWN")
        for conn in list(self._table):
            if isinstance(conn, Conn) and not conn.closed:
                if conn.request is not None:
                    conn.deliver((conn.request, ConnectError("the I/O server is stopping")))
                elif conn.port is not None:
                    conn.deliver((conn.port, closed))
                self._close(conn)
            elif isinstance(conn, Handler) and not conn.closed:
                try:
                    conn.on_shutdown()
                except Exception:
                    log.exception("a handler failed while the I/O thread stopped")
        for conn in self._paused_listeners:
            if not conn.closed:
                self._close(conn)
        if self._zmq_context is not None:
            for sock in list(self.zmq_sockets):  # made, never adopted
                sock.close(linger=0)
            self.zmq_sockets.clear()
            self._zmq_context.term()
        self._poller.close()
        self._close_flush_epoll()
        if self.hosted:
            return  # the host gives the stop notices, after its own ports
        # Every hub hears that the thread ended, whether it was asked to stop or failed.
        for hub in self.budget.owners:
            hub._stopped_by_io()
        for inbox in self._inboxes:
            self._publish_last(inbox)

    def _publish_last(self, inbox: WakeupQueue[tuple[Any, Any]]) -> None:
        """Publish ``inbox``'s last batch (its ports' final messages and the stop notice),
        trying again for up to :data:`LAST_PUBLISH_TIMEOUT` seconds should it fail (a
        ``MemoryError`` while the deque grows; ``notify`` publishes only what it has not
        yet, so nothing goes twice).  Without it the loop would never hear that the
        thread stopped, and closing the server would hang."""
        deadline = time.monotonic() + LAST_PUBLISH_TIMEOUT
        while True:
            try:
                inbox.notify()
                return
            except Exception as exc:
                self.internal_errors += 1
                log.error("error while publishing the last batch to a loop", exc_info=exc)
                if time.monotonic() >= deadline:
                    return
                time.sleep(0.01)  # (this thread is ending: let memory free meanwhile)

    def _drop_input(self, conn: Conn) -> None:
        """One read of a port closed while it flushes its output (``close_pending``): what
        arrives is counted in ``bytes_in`` and dropped, neither delivered nor charged; an
        error ends the port as for any read, the peer's end only its reading."""
        try:
            n = conn.sock.recv_into(self._buffer)
        except BlockingIOError:
            return
        except OSError as exc:
            self._broken(conn, exc.errno)
            return
        if n:
            conn.bytes_in += n
            self.bytes_in += n
        else:
            # The peer's end: nobody to tell; the queued output is still flushed (the
            # port closes once it is written, or at its linger).
            conn.read_eof = True
            self._stream_interest(conn)

    def _close(self, conn: Conn) -> None:
        """Release the socket and its fd; no message is sent."""
        if conn.closed:
            return
        conn.closed = True
        if conn.linger_timer is not None:
            conn.linger_timer[0] = None  # the output went (or the port broke) in time
            conn.linger_timer = None
        on_gone = conn.window.on_gone
        if on_gone is not None:
            on_gone()  # a daemon's client port: the client forgets it
        self.budget.forget(conn)  # (its budget pause, its owner's cell)
        if conn.kind == STREAM and conn.framer is not None:
            self.framing_bytes -= conn.framer.buffered + conn.held_bytes
            conn.held = None
            conn.held_bytes = 0
        self._interest(conn, 0)
        if self._table[conn.fd] is conn:
            self._table[conn.fd] = None
        conn.sock.close()
        conn.outq.clear()
        self.bytes_discarded += conn.out_bytes
        conn.out_bytes = 0
        self.ports_open -= 1
        if self._told_exhausted:
            self._told_exhausted.discard(conn)
        if self._paused_listeners:
            # A descriptor was freed: listeners that ran out of them may accept again.
            self._retry_listeners()

    # -- streams ------------------------------------------------------------------------
    def _spend_credit(self, conn: Conn, messages: int) -> None:
        conn.credit = max(conn.credit - messages, 0)
        if conn.credit == 0:
            self._stream_interest(conn)
            if conn.notify_passive:
                conn.deliver((conn.port, PASSIVE))

    def _deliver_framed(self, conn: Conn, n: int) -> bool:
        """Feed a read to the port's framer and deliver the whole messages; False if the
        port was closed for a framing error.

        The active credit counts packets, not reads (Erlang's ``{active, once}`` is one
        packet): packets decoded beyond it are held, in order, for the next grants."""
        framer = conn.framer
        assert framer is not None  # (the hot path calls this for framed ports only)
        before = framer.buffered
        try:
            # bytes unless the framer decodes objects (decodes_objects, below)
            payloads: list[Any] = framer.feed(self._view[:n])
        except FrameError as exc:
            self.delivered_total -= n
            # (A failed framer emptied itself.)
            self.framing_bytes += framer.buffered - before
            self._frame_error(conn, exc)
            return False
        after = framer.buffered
        # Only the bytes of an unfinished packet are charged while it arrives (its items
        # when it is whole): see the native framed_read.
        cap = self.message_cap
        self.framing_bytes += after - before
        if after != before and cap is not None:
            # A packet started, grew or ended: where a stall's victim is chosen.
            self.budget.framer_holds(conn, before, after)
        if after > conn.peak_buffered:
            conn.peak_buffered = after
        if self.port_buffer_limit is not None and after > self.port_buffer_limit:
            self.delivered_total -= n
            self._buffer_limit_error(conn, after)
            return False
        if cap is not None:
            # One still arriving that can never fit: its bytes and items walked so far.
            pending = after + (framer.pending_charge if conn.packet_overhead else 0)
            if pending > cap:
                self.delivered_total -= n
                self._frame_error(conn, _over_budget(cap, pending))
                return False
        # The round adds n to delivered_total (as for raw reads): what is delivered adds
        # itself back (see _deliver_payloads), what is held is charged as framing.
        self.delivered_total -= n
        if payloads:
            if not framer.decodes_objects:  # bytes payloads: their own length
                shares = [len(payload) for payload in payloads]
            else:
                # Decoded objects: charge the wire bytes this read consumed, shared among
                # its messages; the port credits each back as its owner takes it.
                share, extra = divmod(n + before - after, len(payloads))
                shares = [share] * len(payloads)
                shares[-1] += extra
            overhead = conn.packet_overhead
            if overhead:
                # What a packet holds in Python objects beyond its bytes: charged too, so
                # that many small packets cannot pass the budget; and what a decoded
                # object holds beyond that (MSGPACK_CHARGES by kind of item...), so that
                # many tiny items cannot either.
                more = framer.object_charges(payloads)
                if more is None:
                    shares = [share + overhead for share in shares]
                else:
                    shares = [share + overhead + m for share, m in zip(shares, more, strict=True)]
            if cap is not None and max(shares) > cap:
                # The same message, arrived in fewer reads: none of the read's messages is
                # delivered, as for a framing error.
                self._frame_error(conn, _over_budget(cap, max(shares)))
                return False
            self._deliver_payloads(conn, payloads, shares)
        return True

    def _deliver_payloads(self, conn: Conn, payloads: list[object], shares: list[int]) -> None:
        """Deliver decoded packets while the active credit lasts; hold the rest.

        Each delivered packet spends one credit; when the credit reaches 0 the port turns
        passive (and with ``active=N`` its owner gets :class:`~ioserver.Passive` after the
        last packet).  Held packets are charged to the budget as framing bytes until a
        grant (:meth:`_deliver_held`) delivers them."""
        credit = conn.credit
        count = len(payloads)
        if 0 <= credit < count:
            rest = count - credit
            held = conn.held
            if held is None:
                held = conn.held = deque()
            held.extend(zip(payloads[credit:], shares[credit:], strict=True))
            held_size = sum(shares[credit:])
            conn.held_bytes += held_size
            self.framing_bytes += held_size
            if conn.held_bytes > conn.peak_buffered:
                conn.peak_buffered = conn.held_bytes
            del payloads[credit:]
            del shares[credit:]
            count -= rest
            if not count:
                self._stream_interest(conn)
                return
        # The messages are built first, so that a failure while building them (a
        # MemoryError: the port is then closed as an internal error) leaves no size
        # without its message and no message delivered uncounted; then the sizes: a
        # message's size must be there before the message can be taken (the loop thread
        # pops it when the owner takes the message; the daemon's deliver pops it at once).
        messages = []
        for payload in payloads:
            message = object.__new__(Data)
            _SET_DATA(message, payload)
            messages.append(message)
        if conn.sizes is not None:
            conn.sizes.extend(shares)
        port = conn.port
        deliver = conn.deliver
        for message in messages:
            deliver((port, message))
        size = sum(shares)
        conn.delivered_messages += count
        conn.delivered_bytes += size
        self.delivered_total += size
        if credit > 0:
            self._spend_credit(conn, count)

    def _deliver_held(self, conn: Conn) -> None:
        """A grant (an active mode, a passive read) came: deliver held packets first, as
        far as the credit goes; the socket is read again only once none is held."""
        held = conn.held
        assert held is not None
        count = len(held) if conn.credit < 0 else min(conn.credit, len(held))
        payloads: list[object] = []
        shares: list[int] = []
        for _ in range(count):
            payload, share = held.popleft()
            payloads.append(payload)
            shares.append(share)
        size = sum(shares)
        conn.held_bytes -= size
        self.framing_bytes -= size
        if payloads:
            self._deliver_payloads(conn, payloads, shares)
            if (
                conn.delivered_bytes > conn.check_bytes
                or conn.delivered_messages > conn.check_messages
            ):
                self._check_msgq(conn)

    def _frame_error(self, conn: Conn, exc: FrameError) -> None:
        """The peer broke the packet mode: tell the owner why, then close the port.

        (A framer that raised has emptied its buffer; _close releases what is left.)"""
        if isinstance(exc, PacketTooLarge):
            conn.packets_too_large += 1
            name, number = "EMSGSIZE", errno.EMSGSIZE
        else:
            name, number = "EPROTO", errno.EPROTO
        conn.deliver((conn.port, Error(name, number, str(exc))))
        conn.deliver((conn.port, Closed(name, name)))
        self._close(conn)

    def _buffer_limit_error(self, conn: Conn, size: int) -> None:
        message = f"port_buffer_limit={self.port_buffer_limit} exceeded: {size} bytes buffered"
        conn.deliver((conn.port, Error("ENOBUFS", errno.ENOBUFS, message)))
        conn.deliver((conn.port, Closed("ENOBUFS", "ENOBUFS")))
        self._close(conn)

    def _fail_for_progress(self, conn: Conn, size: int) -> None:
        """The budget stalled on unfinished packets and ``conn`` holds the most of them
        (:meth:`MemoryBudget.stall_victim`): its owner gets ``Error("ENOBUFS")`` and
        ``Closed("ENOBUFS")``, as for a port over ``port_buffer_limit``, and the port
        closes, which releases what its framer held."""
        message = (
            f"memory_limit={self.memory_limit} spent on unfinished packets: "
            f"this port held the most, {size} bytes"
        )
        if conn.closed:
            return
        if conn.port is not None and not conn.close_pending:
            conn.deliver((conn.port, Error("ENOBUFS", errno.ENOBUFS, message)))
            conn.deliver((conn.port, Closed("ENOBUFS", "ENOBUFS")))
        self._close(conn)

    # -- receive flow control -----------------------------------------------------------
    def _check_msgq(self, conn: Conn) -> None:
        """The delivered counters passed the check point (see ioserver._flow): pause if the
        owner is behind by more than a high watermark."""
        if conn.check():
            self._pause_msgq(conn)

    def _pause_msgq(self, conn: Conn) -> None:
        """Too much undelivered in the loop: stop reading this socket, so TCP pushes back
        on this peer alone, until the port asks to resume (``cmd_resume``); if its owner
        already took enough, resume at once (the handshake of ioserver._flow)."""
        if conn.closed:
            conn.note_buffered()
            return
        if not conn.pause():
            return
        self._stream_interest(conn)
        on_pause = conn.window.on_pause
        if on_pause is not None:
            # A daemon's client port: the client cannot read this Conn; tell it.
            on_pause(conn.pause_generation)
        if conn.recheck():
            self._stream_interest(conn)

    def cmd_resume(self, conn: Conn | Handler, generation: int) -> None:
        """The port's owner took enough: read again (if this is still the same pause; if
        a grant delivered held packets since, the pause goes on under a new generation,
        which the owner's next take asks to end: :meth:`~._flow.ReceiveFlow.may_resume`)."""
        if isinstance(conn, Handler):
            conn.resume(generation)
            return
        if conn.may_resume(generation) and not conn.closed:
            self._stream_interest(conn)

    # -- the memory budget (ioserver._flow.MemoryBudget) -------------------------------
    def memory_in_use(self) -> int:
        """Bytes charged to the memory budget now (:meth:`MemoryBudget.in_use`)."""
        return self.budget.in_use()

    def cmd_want(self, conn: Conn, _: object) -> None:
        """The owner of a port paused by the budget waits for input: let it try a read into
        the reserve (and pause again, as a reserve waiter, if there is no room)."""
        self.budget.want(conn)

    def cmd_owner(self, conn: object, cell: OwnerCell | None) -> None:
        """A stream port's owner is now the mailbox whose cell here is ``cell`` (None: no
        mailbox; ``ports.Port.set_owner``, only with a memory budget): the budget keeps
        the port's pauses in that cell, so that a task parking on the mailbox asks the
        I/O thread for the paused ones only (:meth:`MemoryBudget.set_owner`).  Other
        targets (listeners, handlers) have no budget pause: ignored."""
        if conn.__class__ is Conn and conn.kind == STREAM:
            self.budget.set_owner(conn, cell)

    def cmd_want_owner(self, cell: OwnerCell, _: object) -> None:
        """A task parked on the mailbox whose cell is ``cell`` while ports of it are paused
        by the budget: let each try a read into the reserve
        (:meth:`MemoryBudget.want_owner`: O(its paused ports))."""
        self.budget.want_owner(cell)

    def owner_cell(self, conn: object, cells: dict[int, tuple[Any, Any]]) -> Any:
        """The cell, in ``conn``'s I/O half, of the mailbox whose cells are ``cells``
        (``{id(half): (weak reference to the I/O thread, cell)}``; made the first time):
        what ``cmd_owner`` names it by.  The mailbox holds this thread weakly, so a
        long-lived mailbox does not keep a stopped server alive."""
        return owner_cell_of(cells, id(self), self, OwnerCell)

    def _eof(self, conn: Conn) -> None:
        conn.read_eof = True
        framer = conn.framer
        if framer is not None and framer.buffered:
            self._deliver_rest(conn, framer)
        conn.deliver((conn.port, Closed("eof")))

    def _deliver_rest(self, conn: Conn, framer: Framer) -> None:
        """The peer's end of file: deliver what the framer's unfinished bytes still make
        (:meth:`~._framing.Framer.finish`: a ``"line"`` port's last line, unterminated),
        before the ``Closed("eof")``.  Its bytes move from the framing charge to the
        delivered one.  The socket is read only while the credit allows a packet and none
        is held, so the credit lets it through (the native core's ``Core::eof_rest``)."""
        before = framer.buffered
        payloads = framer.finish()
        after = framer.buffered
        self.framing_bytes += after - before
        if after != before and self.message_cap is not None:
            self.budget.framer_holds(conn, before, after)
        if not payloads:
            return
        overhead = conn.packet_overhead
        shares = [len(payload) + overhead for payload in payloads]  # type: ignore[arg-type]
        self._deliver_payloads(conn, payloads, shares)  # (no read follows: no pause check)
        if conn.write_closed:
            self._close(conn)
        else:
            self._stream_interest(conn)

    def _write(self, conn: Conn) -> None:
        outq = conn.outq
        try:
            if len(outq) == 1:
                sent = conn.sock.send(outq[0])
            elif len(outq) <= IOV_MAX:
                sent = conn.sock.sendmsg(outq)
            else:
                sent = conn.sock.sendmsg(outq[:IOV_MAX])
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self._broken(conn, exc.errno)
            return
        self._sent(conn, sent)

    def _sent(self, conn: Conn, sent: int) -> None:
        """The bookkeeping after a write of ``sent`` bytes from ``conn.outq``."""
        outq = conn.outq
        conn.bytes_out += sent
        self.bytes_out += sent
        if conn.window.send_blocked:
            self._notify_writable(conn)
        if sent == conn.out_bytes:
            # Everything went (the common case): no per-buffer bookkeeping.
            conn.out_bytes = 0
            outq.clear()
            if conn.close_pending:
                self._close(conn)
                return
            if conn.shutdown_pending:
                self._shutdown_write(conn)
                if conn.closed:
                    return
        else:
            conn.out_bytes -= sent
            done = 0  # whole buffers written
            while sent:
                size = len(outq[done])
                if sent >= size:
                    done += 1
                    sent -= size
                else:
                    outq[done] = memoryview(outq[done])[sent:]
                    break
            del outq[:done]
        if (conn.mask & WRITE) != (WRITE if outq else 0):
            self._stream_interest(conn)

    def _notify_writable(self, conn: Conn) -> None:
        """A sender waits on this busy port: tell it once the output drained below low.

        The port sets ``send_blocked`` before it re-reads ``bytes_out``; we update
        ``bytes_out`` before we read ``send_blocked``: one of the two sees the other."""
        if conn.window.queued_bytes - conn.bytes_out <= conn.send_low:
            conn.deliver((conn.port, WRITABLE))

    def _shutdown_write(self, conn: Conn) -> None:
        conn.shutdown_pending = False
        conn.write_closed = True
        try:
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            self._broken(conn, exc.errno)
            return
        if conn.read_eof:
            self._close(conn)

    def _broken(self, conn: Conn, number: int | None) -> None:
        """The connection failed (reset, broken pipe...): tell the owner and release it."""
        name = errno_name(number)
        conn.deliver((conn.port, Closed(name, name)))
        self._close(conn)

    # -- commands on streams (run on the I/O thread) -------------------------------------
    def cmd_send(self, conn: Conn, data: bytes) -> None:
        if conn.closed or conn.write_closed or conn.shutdown_pending or conn.close_pending:
            self.bytes_discarded += len(data)  # the port broke or closed meanwhile
            return
        conn.outq.append(data)
        conn.out_bytes += len(data)
        if not conn.dirty:
            conn.dirty = True
            self._dirty.append(conn)

    def cmd_send_eof(self, conn: Conn | Handler, _: object) -> None:
        """Half-close the sending side once the queued output is written."""
        if isinstance(conn, Handler):
            conn.send_eof()
            return
        if conn.closed or conn.write_closed or conn.shutdown_pending:
            return
        if conn.outq:
            conn.shutdown_pending = True
        else:
            self._shutdown_write(conn)

    def cmd_close(self, conn: Conn | Handler, _: object) -> None:
        """Close once the queued output is written (Erlang's close after a flush), within
        the port's ``linger`` seconds: then (at once for ``linger=0``) the socket is reset
        and what is left dropped (:meth:`_linger_expired`)."""
        if conn.closed:
            return
        if isinstance(conn, Handler):
            conn.close()
            return
        if conn.kind == STREAM and conn.linger == 0:
            self._reset(conn)
        elif conn.kind == STREAM and conn.outq:
            conn.close_pending = True
            if conn.linger is not None and conn.linger_timer is None:
                conn.linger_timer = self.call_later(conn.linger, lambda: self._linger_expired(conn))
            self._stream_interest(conn)
        else:
            self._close(conn)

    def _linger_expired(self, conn: Conn) -> None:
        """A closed port's ``linger`` ran out with output still queued: reset it."""
        conn.linger_timer = None
        if not conn.closed:
            self._reset(conn)

    def _reset(self, conn: Conn) -> None:
        """Close ``conn`` with ``SO_LINGER {1, 0}``: the kernel drops what it holds and
        sends an RST (the peer gets ``ECONNRESET``), freeing the socket at once, as
        Erlang's ``{linger, {true, 0}}``; the queued output is dropped (``_close``)."""
        self.linger_timeouts += 1
        try:
            if conn.tls is not None:
                conn.tls.abort()  # no close_notify, no lingering ciphertext
            else:
                conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
        except OSError:
            pass  # the socket is broken already: closing it is all there is to do
        self._close(conn)

    def cmd_set_active(self, conn: Conn | Handler, mode: tuple[int, bool]) -> None:
        """Apply an active mode ``(credit, notify_passive)`` (see ``ports.parse_active``)."""
        if conn.closed:
            return
        if isinstance(conn, Handler):
            conn.set_active(mode)
            return
        credit, notify = apply_active_mode(conn.credit, conn.notify_passive, mode)
        if notify and not credit:
            conn.deliver((conn.port, PASSIVE))
        conn.credit = credit
        conn.notify_passive = notify
        if conn.kind == STREAM:
            if credit and conn.held:
                self._deliver_held(conn)
            self._stream_interest(conn)
        elif conn.kind == LISTENER and not conn.paused:
            self._interest(conn, READ if credit else 0)

    def cmd_read_once(self, conn: Conn | Handler, _: object) -> None:
        """A passive port's receiver waits: let one message through (``gen_tcp:recv``)."""
        if isinstance(conn, Handler):
            if not conn.closed:
                conn.read_once()
            return
        if conn.closed or conn.credit != 0:
            return
        conn.credit = 1
        conn.notify_passive = False
        if conn.kind == STREAM:
            if conn.held:
                self._deliver_held(conn)
            self._stream_interest(conn)
        elif not conn.paused:
            self._interest(conn, READ)

    # -- connect, listen and accept (TCP and Unix streams: see ioserver._tcp) ----------
    def cmd_connect(self, request: object, spec: ConnectRequest) -> None:
        """Connect a stream socket; answer ``request`` (:func:`~._tcp.connect_stream`)."""
        connect_stream(self, request, spec)

    def cmd_listen(self, request: object, spec: ListenRequest) -> None:
        """Listen on a TCP address; answer ``request`` (:func:`~._tcp.listen_tcp`)."""
        listen_tcp(self, request, spec)

    def cmd_listen_unix(self, request: object, spec: ListenRequest) -> None:
        """Listen on a Unix path; answer ``request`` (:func:`~._unix.cmd_listen_unix`)."""
        cmd_listen_unix(self, request, spec)

    def carry_stream(
        self,
        request: object,
        port: Any,
        sock: socket.socket,
        given: object,
        options: Any,
        active: tuple[int, bool],
    ) -> bool:
        """Have a native thread carry the connected stream ``sock`` as ``port``'s (a
        program's stdio): False here, where this thread serves it as a ``Conn`` (the native
        core's says True when it took it, and answers ``request``)."""
        return False

    def _pause_listener(self, listener: Conn) -> None:
        """Stop watching a listener that ran out of descriptors until one of this thread's
        ports closes (``_close``) or :data:`ACCEPT_RETRY` passes: its level-triggered
        readiness would spin."""
        listener.paused = True
        self._interest(listener, 0)
        self._paused_listeners.append(listener)
        if self._accept_retry is None:
            self._accept_retry = self.call_later(ACCEPT_RETRY, self._retry_listeners)

    def _retry_listeners(self) -> None:
        """Watch again the listeners that ran out of descriptors: one of this thread's
        ports freed one, or :data:`ACCEPT_RETRY` passed.  A listener whose accept fails so
        again is paused again (:meth:`_pause_listener`)."""
        retry = self._accept_retry
        if retry is not None:
            retry[0] = None  # a close came first: the timer is not needed
            self._accept_retry = None
        paused, self._paused_listeners = self._paused_listeners, []
        for listener in paused:
            if not listener.closed:
                listener.paused = False
                self._put_table(listener.fd, listener)
                self._interest(listener, READ if listener.credit else 0)

    # -- stop ---------------------------------------------------------------------------
    def cmd_stop(self, target: object, _: object) -> None:
        """Close every port and end the thread; each hub then gets its stop notice."""
        self._stopping = True
