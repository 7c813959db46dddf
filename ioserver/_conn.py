"""The I/O thread's half of a port: the stream ``Conn``, and the ``Handler`` of every
other kind.

An entry of the I/O thread's port table (``IOThread._table``, by fd) is one of these.  Only
the I/O thread writes their fields; a port's loop half reads the counters the contract
names (``ioserver._contract.PortIO``).  A stream ``Conn`` (TCP, Unix, a program's pipes)
is served inline by the round (``ioserver._iothread``: its hot path); every other kind
implements :class:`Handler`, whose methods the round calls.  Both keep the receive flow
control of ``ioserver._flow`` (:class:`~._flow.ReceiveFlow`).
"""

from __future__ import annotations

import socket
import ssl
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

from ._contract import Deliver, LoopHalf, MakePort
from ._flow import BUDGET_RECHECK, ReceiveFlow, Window
from ._framing import Framer
from ._messages import PASSIVE
from ._options import (
    LINGER,
    ListenOptions,
    StreamOptions,
    Watermarks,
    apply_active_mode,
)

__all__ = ["CONNECTING", "HANDLER", "LISTENER", "STREAM", "Conn", "Handler", "ReceivingHandler"]


# Conn.kind
STREAM = 0
LISTENER = 1
CONNECTING = 2
HANDLER = 3  # an entry of another kind (datagrams, ZeroMQ sockets...): see Handler


class TLSLayer(Protocol):
    """What the I/O thread asks of a TLS connection's layer (``ioserver._tls.TLSSocket``,
    which is also the ``Conn``'s ``sock``)."""

    #: The handshake is not over (it may not have started).
    handshaking: bool
    #: The handshake started: the connection's readiness goes to :meth:`on_event`.
    started: bool

    def start(self) -> None: ...

    def on_event(self, mask: int) -> None: ...

    def interest(self, mask: int) -> int: ...

    def abort(self) -> None: ...


class Conn(ReceiveFlow):
    """The I/O thread's half of a port.  Only the I/O thread writes its fields; the event
    loop reads the byte counters (statistics) and the receive flow control's
    (:class:`~._flow.ReceiveFlow`: what was delivered, the pause generation)."""

    __slots__ = (
        "address",
        "bytes_in",
        "bytes_out",
        "close_pending",
        "closed",
        "credit",
        "deliver",
        "dirty",
        "fd",
        "framer",
        "global_paused",
        "held",
        "held_bytes",
        "kind",
        "linger",
        "linger_timer",
        "make_port",
        "mask",
        "notify_passive",
        "options",
        "out_bytes",
        "outq",
        "packet_overhead",
        "packets_too_large",
        "paused",
        "port",
        "queue_paused",
        "read_eof",
        "request",
        "send_low",
        "shutdown_pending",
        "sizes",
        "sock",
        "tls",
        "tls_server",
        "write_closed",
    )

    def __init__(
        self, sock: socket.socket, kind: int, port: LoopHalf | None, deliver: Deliver
    ) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.kind = kind
        self.port = port  # the event loop's half; messages are delivered as (port, message)
        self.deliver = deliver  # the owning loop's inbox.append
        self.credit = -1  # active credit: -1 unlimited (active=True), 0 passive, N > 0
        self.notify_passive = False  # send Passive when credit reaches 0 (active=N)
        self.mask = 0  # interest registered with the poller; 0 = not registered
        # A list, not a deque: an idle connection's empty deque costs 760 bytes, a list 56,
        # and the queue rarely holds more than a few buffers between two flushes.
        self.outq: list[bytes | memoryview] = []
        self.out_bytes = 0
        self.dirty = False
        self.closed = False
        self.read_eof = False
        self.write_closed = False
        self.shutdown_pending = False
        self.close_pending = False
        self.paused = False
        self.bytes_in = 0
        self.bytes_out = 0
        self.request: object = None
        self.make_port: MakePort | None = None
        #: A listener's options: its own, and those of the ports it accepts.
        self.options: ListenOptions | None = None
        #: A connect's peer (for its error message), a listener's own address.
        self.address: object = None
        # Receive flow control (ioserver._flow): delivered_* count what the I/O thread
        # handed to the port; the port's window counts what its owner took; the
        # difference is what is buffered, undelivered, in the event loop.
        # (A listener's window too: the I/O thread tells a daemon's client of its close.)
        self.init_flow(None if port is None else port._window)
        # The window's framer and sizes, copied for the hot path.
        self.framer: Framer | None = None
        self.sizes: deque[int] | None = None
        self.packet_overhead = 0  # bytes charged per packet beyond its own (configure)
        # Packets a framed read decoded beyond the active credit: (payload, wire size)
        # in order, delivered by the next grants (see _deliver_payloads).  Non-empty only
        # while the credit is 0, and then the socket is not read.
        self.held: deque[tuple[Any, int]] | None = None
        self.held_bytes = 0
        self.send_low = 0
        # Seconds a close may take to write the queued output (the ``linger`` option;
        # None: for ever), and the timer that resets the socket when they run out.
        self.linger: float | None = LINGER
        self.linger_timer: list[Callable[[], None] | None] | None = None
        self.global_paused = False
        # A daemon's client port whose session's queue toward the client is full (see
        # ioserver._session, Session.hold): not read until the client takes what is queued.
        self.queue_paused = False
        self.packets_too_large = 0
        # A TLS connection's layer (ioserver._tls.TLSSocket), which is then also ``sock``.
        self.tls: TLSLayer | None = None
        # A TLS listener's server context and the seconds each accepted connection's
        # handshake may take (None: no bound); None for a plaintext listener.
        self.tls_server: tuple[ssl.SSLContext, float | None] | None = None

    def configure(self, options: StreamOptions, window: Window) -> None:
        """Take the flow-control options and the window of the port (see ioserver._flow)."""
        self.configure_flow(options, window)
        self.framer = window.framer
        self.sizes = window.sizes
        # Each packet is charged PACKET_OVERHEAD more than its bytes, where its objects
        # stay (a port in this process); a daemon's port encodes its packets for the
        # client at once, and its flow control counts in wire bytes, as the client's.
        self.packet_overhead = 0 if self.sizes is None else window.packet_overhead
        self.send_low = options["low_watermark"]
        self.linger = options["linger"]


class Handler:
    """An entry of the port table that is not a TCP stream: a UDP socket, a ZeroMQ socket,
    a control endpoint, a process watcher.  The I/O thread calls its methods, and only the
    I/O thread: ``on_ready`` when its fd is ready (or when it asked to run again with
    :meth:`IOThread.call_soon`), ``flush`` at the end of a round in which it was marked
    dirty (``cmd_send`` marks it, as it marks streams; marked again during its own flush,
    it is flushed next round), ``on_error`` when one of its methods raised,
    ``on_shutdown`` when the I/O thread stops.

    Subclasses keep ``fd`` and ``mask`` (the interest registered, see
    :meth:`IOThread._interest`), and, when ports send through ``cmd_send``, the send
    queue fields streams have (``outq``, ``out_bytes``, ``dirty`` and the flags).
    """

    kind = HANDLER
    fd = -1
    mask = 0
    closed = False
    dirty = False
    scheduled = False  # in the next round's call_soon list
    write_closed = False
    shutdown_pending = False
    close_pending = False

    def on_ready(self, mask: int) -> None:
        """The fd is ready (``mask`` is READ/WRITE/ERROR), or the handler asked to run."""

    def flush(self) -> None:
        """The end of a round in which ``cmd_send`` queued output for this entry."""

    def on_error(self, exc: Exception) -> None:
        """One of the methods above raised ``exc``: close what this entry serves."""

    def on_shutdown(self) -> None:
        """The I/O thread stops: tell the owners and release the fd."""

    # The port commands, for ports whose I/O-thread half is a handler (IOThread.cmd_*
    # dispatch here): close after a flush, half-close, an active mode, one passive read,
    # resume after a receive pause of ``generation``.
    def close(self) -> None:
        """``cmd_close``: close once the queued output is written."""

    def send_eof(self) -> None:
        """``cmd_send_eof``: half-close the sending side."""

    def set_active(self, mode: tuple[int, bool]) -> None:
        """``cmd_set_active``: apply an active mode ``(credit, notify_passive)``."""

    def read_once(self) -> None:
        """``cmd_read_once``: a passive port's receiver waits for one message."""

    def resume(self, generation: int) -> None:
        """``cmd_resume``: the owner took enough after the pause ``generation``."""


class ReceivingHandler(Handler, ReceiveFlow):
    """A handler whose port receives messages (UDP, ZeroMQ): the receive flow control of a
    stream ``Conn`` (:class:`~._flow.ReceiveFlow`, the same rule) and the port commands
    that change whether it may read (an active mode, a passive read, the end of a pause).

    Subclasses call :meth:`configure_receiving` once, :meth:`_pause_msgq` when
    ``over_high()`` after a delivery, :meth:`_pause_for_budget` when the memory budget's
    allowance is used up, and implement :meth:`_reading_changed`.
    """

    port: LoopHalf
    deliver: Deliver
    io: Any  # the I/O thread (IOThread: its budget, call_later)
    budget_paused = False  # the memory budget is used up: not reading
    #: Bytes a waiting owner's port needs free to read again before the budget is back at
    #: one half (:meth:`MemoryBudget.resumes`): a whole read; 1 where a message's size is
    #: known only once received (ZeroMQ).
    budget_resume_size = 1

    def configure_receiving(self, options: Watermarks, active: tuple[int, bool]) -> None:
        """Take the active mode and the flow-control options (see ``ports.PortOptions``)."""
        self.credit, self.notify_passive = active
        self.init_flow(self.port._window)
        self.configure_flow(options, self.port._window)
        self.send_low: int = options["low_watermark"]

    def _reading_changed(self) -> None:
        """Whether the port may read changed (credit, pause): act on it."""
        raise NotImplementedError

    def _pause_msgq(self) -> None:
        """Stop reading until the owner has taken enough (the handshake of
        ioserver._flow); resume at once if it already has."""
        if self.pause():
            on_pause = self.window.on_pause
            if on_pause is not None:
                # A daemon's client port: the client cannot read this handler; tell it,
                # as IOThread._pause_msgq tells it of a stream's pause.
                on_pause(self.pause_generation)
            self.recheck()
        self._reading_changed()

    def _pause_for_budget(self) -> None:
        """The memory budget is used up: stop reading, and look again every
        :data:`~._flow.BUDGET_RECHECK` seconds until it lets this port read (the rule of
        :meth:`~._flow.MemoryBudget.resumes`)."""
        if self.budget_paused:
            return
        self.budget_paused = True
        self.pauses += 1
        self._reading_changed()
        self.io.call_later(BUDGET_RECHECK, self._budget_recheck)

    def _budget_recheck(self) -> None:
        if self.closed:
            return
        if self.io.budget.resumes(self, self.budget_resume_size):
            self.budget_paused = False
            self._reading_changed()
        else:
            self.io.call_later(BUDGET_RECHECK, self._budget_recheck)

    def resume(self, generation: int) -> None:
        if not self.closed and self.may_resume(generation):
            self._reading_changed()

    def set_active(self, mode: tuple[int, bool]) -> None:
        self.credit, self.notify_passive = apply_active_mode(self.credit, self.notify_passive, mode)
        if self.notify_passive and not self.credit:
            self.deliver((self.port, PASSIVE))
        self._reading_changed()

    def read_once(self) -> None:
        if self.credit != 0:
            return
        self.credit = 1
        self.notify_passive = False
        self._reading_changed()
