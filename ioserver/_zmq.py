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
bytes are.
"""

from __future__ import annotations

import errno
import logging
from collections import deque
from typing import Any

import zmq

from ._exceptions import errno_name
from ._iothread import Handler, IOThread
from ._messages import PASSIVE, WRITABLE, Closed, Data, Error
from ._poller import READ

log = logging.getLogger("ioserver")

DRAIN_BATCH = 256  # messages received per socket per round before yielding to the others
_SET_DATA = Data.__dict__["data"].__set__
_POLLIN = zmq.POLLIN
_POLLOUT = zmq.POLLOUT
_NOBLOCK = zmq.NOBLOCK
_Again = zmq.Again


class ZmqHandler(Handler):
    """The I/O thread's half of a ZeroMQ port.  Only the I/O thread touches ``sock``
    after the port is adopted; the byte counters are read by the loop for statistics."""

    def __init__(self, io: IOThread, sock: zmq.Socket[bytes], port: Any, deliver: Any) -> None:
        self.io = io
        self.sock = sock
        self.fd: int = sock.getsockopt(zmq.FD)  # type: ignore[assignment]
        self.port = port
        self.deliver = deliver
        self.sizes: deque[int] = port._sizes
        self.credit = -1
        self.notify_passive = False
        self.outq: list[Any] = []
        self.out_bytes = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.messages_in = 0
        self.messages_out = 0
        self.drops = 0
        self.delivered_messages = 0
        self.delivered_bytes = 0
        self.high_msgq = 1 << 62
        self.low_msgq = 1 << 62
        self.high_msgq_messages = 1 << 62
        self.low_msgq_messages = 1 << 62
        self.send_low = 0
        self.msgq_paused = False
        self.pause_generation = 0
        self.pauses = 0
        self.peak_buffered = 0
        self.packets_too_large = 0
        self.linger_ms = 0

    def configure(self, options: dict[str, Any]) -> None:
        self.high_msgq = options["high_msgq_watermark"]
        self.low_msgq = options["low_msgq_watermark"]
        self.high_msgq_messages = options["high_msgq_messages"]
        self.low_msgq_messages = self.high_msgq_messages // 2
        self.send_low = options["low_watermark"]

    def start(self) -> None:
        """Adopt the socket: watch its descriptor and look at its state once."""
        self.io.adopt(self)
        self.io._interest(self, READ)  # type: ignore[arg-type]
        self.io.call_soon(self)

    # -- readiness ------------------------------------------------------------------------
    def on_ready(self, mask: int) -> None:
        if self.closed:
            return
        sock = self.sock
        budget = DRAIN_BATCH
        while True:
            events: int = sock.getsockopt(zmq.EVENTS)  # type: ignore[assignment]
            progressed = False
            if events & _POLLOUT and self.outq:
                progressed = self._send_queued()
                if self.closed:
                    return
            if events & _POLLIN and self.credit and not self.msgq_paused:
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
        sizes = self.sizes
        received = 0
        size_total = 0
        while received < budget and self.credit and not self.msgq_paused:
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
            size_total += size
            sizes.append(size)
            message = object.__new__(Data)
            _SET_DATA(message, frames)
            deliver((port, message))
            self.delivered_messages += 1
            self.delivered_bytes += size
            if self.credit > 0:
                self.credit -= 1
                if self.credit == 0 and self.notify_passive:
                    deliver((port, PASSIVE))
            if (
                self.delivered_bytes - port._consumed_bytes > self.high_msgq
                or self.delivered_messages - port._consumed_messages > self.high_msgq_messages
            ):
                self._pause()
        self.messages_in += received
        self.bytes_in += size_total
        self.io.bytes_in += size_total
        self.io.delivered_total += size_total
        return received

    # -- receive flow control ------------------------------------------------------------
    def _pause(self) -> None:
        """As a stream port's pause (see IOThread._pause_msgq): stop receiving; ZeroMQ's
        own high-water mark then pushes back on the peers."""
        buffered = self.delivered_bytes - self.port._consumed_bytes
        if buffered > self.peak_buffered:
            self.peak_buffered = buffered
        if self.msgq_paused:
            return
        self.msgq_paused = True
        self.pauses += 1
        self.pause_generation += 1  # written before _drained reads the port's counters
        if self._drained():
            self.msgq_paused = False

    def _drained(self) -> bool:
        port = self.port
        return bool(
            self.delivered_bytes - port._consumed_bytes <= self.low_msgq
            and self.delivered_messages - port._consumed_messages <= self.low_msgq_messages
        )

    def resume(self, generation: int) -> None:
        if self.msgq_paused and generation == self.pause_generation and self._drained():
            self.msgq_paused = False
            self.io.call_soon(self)  # rule 4

    def set_active(self, mode: tuple[int, bool]) -> None:
        credit, notify = mode
        if notify and self.notify_passive and self.credit > 0:
            credit += self.credit
        if notify and credit <= 0:
            credit = 0
            self.deliver((self.port, PASSIVE))
        self.credit = credit
        self.notify_passive = notify
        if credit:
            self.io.call_soon(self)

    def read_once(self) -> None:
        if self.credit != 0:
            return
        self.credit = 1
        self.notify_passive = False
        self.io.call_soon(self)

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
                port = self.port
                if port._send_blocked and port._queued_bytes - self.bytes_out <= self.send_low:
                    self.deliver((port, WRITABLE))
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
        self.closed = True
        self.io.release(self)
        self.outq.clear()
        self.out_bytes = 0
        self.io.zmq_sockets.discard(self.sock)
        self.sock.close(linger=self.linger_ms)

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
