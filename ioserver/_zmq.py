"""ZeroMQ sockets as ports: the I/O thread's half.

Theory of operation
-------------------
A ZeroMQ socket is not a file descriptor one reads.  It exposes ``ZMQ_FD``, a descriptor
that becomes readable when *something may have changed*, and ``ZMQ_EVENTS``, the real
state (``POLLIN``: a message can be received, ``POLLOUT``: one can be sent).  The
descriptor is edge-triggered in spirit: reading ``ZMQ_EVENTS`` (and any send or receive)
resets it, and it does not fire again for messages that were already queued.  So the
trap is this: a burst arrives while the owner is busy (the port is passive or paused),
we look at ``EVENTS`` and do not read; the descriptor is now quiet, and the burst would
sit there forever.

The rules that avoid it, all in this module:

1. Whenever the descriptor fires, or the handler is asked to run, loop on ``EVENTS``
   until it shows nothing we can act on: receive while ``POLLIN`` and the owner wants
   messages, send while ``POLLOUT`` and output is queued.
2. A drain is bounded (``DRAIN_BATCH`` messages) so that one busy socket cannot starve
   the others; if it stops with messages left, it asks to run again next round
   (:meth:`IOThread.call_soon`), since the descriptor will not fire for them.
3. After every send (the end of a round's flush), ``EVENTS`` is read again: a send can
   consume the edge of messages that arrived meanwhile.
4. Whenever the owner makes reading possible again (an active mode, a passive receive,
   the end of a receive pause), the handler runs next round whether or not the
   descriptor fires.

Messages are lists of frames (``list[bytes]``, multipart as one message); each is
charged its total size in bytes to the port's receive flow control, as a stream port's
bytes are, and to the global memory budget (``memory_limit``, see ``ioserver._flow``):
a drain asks the budget once (:meth:`MemoryBudget.read_allowance`, the UDP handler's
rule: ordinary reads stop short of the reserve, a port whose owner waits may read into
it) and stops receiving once what it delivered used the allowance up - a message's size
is known only once it is received, so the limit may be passed by one message - then the
port stays paused for the budget, looking again every few milliseconds
(:meth:`MemoryBudget.resumes`), and ZeroMQ's high-water mark holds the rest back.
"""

from __future__ import annotations

import errno
import logging
from typing import Any

import zmq

from ._conn import Handler, ReceivingHandler
from ._contract import Deliver, LoopHalf
from ._exceptions import errno_name
from ._iothread import IOThread
from ._messages import PASSIVE, WRITABLE, Closed, Data, Error
from ._options import Watermarks
from ._poller import READ

log = logging.getLogger("ioserver")

DRAIN_BATCH = 256  # messages received per socket per round before yielding to the others
_SET_DATA = Data.__dict__["data"].__set__
_POLLIN = zmq.POLLIN
_POLLOUT = zmq.POLLOUT
_NOBLOCK = zmq.NOBLOCK
_Again = zmq.Again


class ZmqSocketHandler(Handler):
    """A ZeroMQ socket in the I/O thread's table: a ZeroMQ port, the daemon's control
    endpoint, a client's connection to a daemon.  Only the I/O thread touches ``sock``
    once :meth:`start` ran.  It keeps the rules of the module docstring."""

    # Receive zmq.Frame objects (whose metadata, e.g. ZAP's "User-Id", can be read)
    # instead of bytes: slower, for the control endpoint under CURVE.
    _copy = True

    def __init__(self, io: IOThread, sock: zmq.Socket[bytes]) -> None:
        self.io = io
        self.sock = sock
        fd = sock.getsockopt(zmq.FD)
        assert isinstance(fd, int)
        self.fd = fd

    def start(self) -> None:
        """Adopt the socket: watch its descriptor and look at its state once (rule 4)."""
        self.io.adopt(self)
        self.io._interest(self, READ)
        self.io.call_soon(self)

    def _release_socket(self, linger_ms: int) -> None:
        """Leave the table and close the socket (ZeroMQ keeps trying ``linger_ms``)."""
        self.closed = True
        self.io.release(self)
        self.io.zmq_sockets.discard(self.sock)
        self.sock.close(linger=linger_ms)

    # -- for sockets that carry one protocol frame per message (control and client) -----
    def _has_pending(self) -> bool:
        """Frames wait for ZeroMQ to take them (it said EAGAIN)."""
        return False

    def _send_pending(self) -> None:
        """Send the frames that wait, as far as ZeroMQ takes them."""

    def _handle(self, frames: list[bytes]) -> None:
        """One message received."""

    def _more_later(self) -> bool:
        """True when this round's work is done: the next frames wait for the next round."""
        return False

    def _serve_frames(self, batch: int) -> None:
        """Receive and handle up to ``batch`` messages, sending what waits whenever
        ``EVENTS`` allows (rules 1 and 2)."""
        sock = self.sock
        for _ in range(batch):
            events = sock.getsockopt(zmq.EVENTS)
            assert isinstance(events, int)
            if events & _POLLOUT and self._has_pending():
                self._send_pending()
            if not events & _POLLIN:
                return
            try:
                frames = sock.recv_multipart(_NOBLOCK, copy=self._copy)
            except _Again:
                return
            self._handle(frames)  # type: ignore[arg-type]
            if self.closed:
                return
            if self._more_later():
                break
        self.io.call_soon(self)  # more may be queued: the descriptor will not fire for them


class ZmqHandler(ZmqSocketHandler, ReceivingHandler):
    """The I/O thread's half of a ZeroMQ port; the byte counters are read by the loop for
    statistics."""

    def __init__(
        self,
        io: IOThread,
        sock: zmq.Socket[bytes],
        port: LoopHalf,
        deliver: Deliver,
        options: Watermarks,
        active: tuple[int, bool],
        linger_ms: int,
    ) -> None:
        super().__init__(io, sock)
        self.port = port
        self.deliver = deliver
        self.configure_receiving(options, active)
        self.linger_ms = linger_ms
        self.outq: list[Any] = []
        self.out_bytes = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.messages_in = 0
        self.messages_out = 0
        self.drops = 0
        self.packets_too_large = 0
        self.budget_paused = False  # the memory budget is used up: not receiving

    # -- readiness ------------------------------------------------------------------------
    def on_ready(self, mask: int) -> None:
        if self.closed:
            return
        sock = self.sock
        budget = DRAIN_BATCH
        while True:
            events = sock.getsockopt(zmq.EVENTS)
            assert isinstance(events, int)
            progressed = False
            if events & _POLLOUT and self.outq:
                progressed = self._send_queued()
                if self.closed:
                    return
            if events & _POLLIN and self.credit and not self.msgq_paused and not self.budget_paused:
                received = self._receive(budget)
                if self.closed:
                    return
                budget -= received
                if budget <= 0:
                    self.io.call_soon(self)  # rule 2: the descriptor will not fire again
                    return
                progressed = progressed or received > 0
            if not progressed:
                return

    def _receive(self, budget: int) -> int:
        sock = self.sock
        deliver = self.deliver
        port = self.port
        sizes = self.window.sizes
        assert sizes is not None  # a ZeroMQ port's window always has them (ports.ZmqPort)
        received = 0
        size_total = 0  # of the messages delivered
        read_total = 0  # of the messages read
        # The memory budget's allowance for this drain (the module docstring).
        allowance = self.io.budget.read_allowance(self)
        try:
            while received < budget and self.credit and not self.msgq_paused:
                if size_total >= allowance:
                    self._pause_for_budget()
                    break
                try:
                    frames = sock.recv_multipart(_NOBLOCK)
                except _Again:
                    break
                except zmq.ZMQError as exc:
                    self._error(exc)
                    break
                size = 0
                for frame in frames:
                    size += len(frame)
                received += 1
                read_total += size
                # The message is built first, then its size appended (charged: the port
                # pops it as its owner takes the message, the daemon's deliver at once, so
                # it comes before the deliver), then delivered - a size without its
                # message, or a message without its size, never stays.  Should the build
                # or the deliver fail (a MemoryError: the port is then closed as an
                # internal error), the messages delivered before it are counted below
                # and this one is not.  Before, its size was appended before it was
                # built, and the read's delivered total added only after the loop: the
                # charges shifted and the budget counted taken what it never counted
                # delivered (as a packet's charge, ioserver._iothread._deliver_payloads).
                message = object.__new__(Data)
                _SET_DATA(message, frames)
                sizes.append(size)
                try:
                    deliver((port, message))
                except BaseException:
                    # Not delivered: its size taken back (the last, as only this thread
                    # appends; a daemon's deliver, which pops it at once, leaves none).
                    if sizes:
                        sizes.pop()
                    raise
                size_total += size
                self.delivered_messages += 1
                self.delivered_bytes += size
                if self.credit > 0:
                    self.credit -= 1
                    if self.credit == 0 and self.notify_passive:
                        deliver((port, PASSIVE))
                if self.over_high():
                    self._pause_msgq()
        finally:
            self.messages_in += received
            self.bytes_in += read_total
            self.io.bytes_in += read_total
            self.io.delivered_total += size_total
        return received

    def _reading_changed(self) -> None:
        if self.credit and not self.msgq_paused and not self.budget_paused:
            self.io.call_soon(self)  # rule 4: the descriptor may have gone quiet meanwhile

    # -- sending --------------------------------------------------------------------------
    def flush(self) -> None:
        """The end of a round with sends queued: send, then look at EVENTS (rule 3)."""
        if not self.closed:
            self._send_queued()
            if not self.closed:
                self.on_ready(0)

    def _send_queued(self) -> bool:
        sock = self.sock
        outq = self.outq
        sent = 0
        sent_bytes = 0
        try:
            for message in outq:
                try:
                    if message.__class__ is bytes:
                        sock.send(message, _NOBLOCK)
                        sent_bytes += len(message)
                    else:
                        sock.send_multipart(message, _NOBLOCK)
                        for frame in message:
                            sent_bytes += len(frame)
                except _Again:
                    break
                except zmq.ZMQError as exc:
                    # A message this socket cannot send now (e.g. EHOSTUNREACH from a
                    # ROUTER with ROUTER_MANDATORY, EFSM from REQ out of turn): tell the
                    # owner, drop that message, keep the port.
                    self.drops += 1
                    name = errno_name(exc.errno)
                    self.deliver((self.port, Error(name, exc.errno, f"send failed: {exc}")))
                    sent_bytes += _size(message)
                sent += 1
        finally:
            if sent:
                del outq[:sent]
                self.out_bytes = sum(_size(m) for m in outq) if outq else 0
                self.messages_out += sent
                self.bytes_out += sent_bytes
                self.io.bytes_out += sent_bytes
                window = self.window
                if window.send_blocked and window.queued_bytes - self.bytes_out <= self.send_low:
                    self.deliver((self.port, WRITABLE))
        if self.close_pending and not outq:
            self._close()
        return bool(sent)

    def send_eof(self) -> None:
        """ZeroMQ has no half-close: sending simply ends (queued messages still go)."""

    # -- closing --------------------------------------------------------------------------
    def close(self) -> None:
        """Close after sending what is queued; ZeroMQ's linger covers what it holds."""
        if self.outq:
            self._send_queued()
        if self.outq:
            # Still blocked by the high-water mark: what is left is dropped, as a ZeroMQ
            # socket closed with a zero linger drops it.
            self.io.bytes_discarded += self.out_bytes
        self._close()

    def _close(self) -> None:
        if self.closed:
            return
        self.outq.clear()
        self.out_bytes = 0
        self._release_socket(self.linger_ms)

    def _error(self, exc: zmq.ZMQError) -> None:
        name = errno_name(exc.errno)
        self.deliver((self.port, Closed(name, name)))
        self._close()

    def on_error(self, exc: Exception) -> None:
        number = getattr(exc, "errno", None) or errno.EIO
        self.deliver((self.port, Closed(f"internal error: {exc!r}", errno_name(number))))
        self._close()

    def on_shutdown(self) -> None:
        self.deliver((self.port, Closed("ioserver closed", "ESHUTDOWN")))
        self._close()


def _size(message: Any) -> int:
    if message.__class__ is bytes:
        return len(message)
    return sum(len(frame) for frame in message)
