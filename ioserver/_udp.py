"""UDP sockets in the I/O thread: each datagram in is one message, each send one datagram.

A :class:`DatagramHandler` is a :class:`~._iothread.Handler`: the I/O thread calls it when
its socket is ready, and the actor's :class:`ports.UDPPort` talks to it through commands,
as a TCP port talks to its ``Conn``.

Theory of operation:

The port commands common to every kind (``IOThread.cmd_close``, ``cmd_set_active``,
``cmd_read_once``, ``cmd_resume``) reach it through the :class:`~._iothread.Handler`
methods ``close``, ``set_active``, ``read_once`` and ``resume``; sends come as
``cmd_send``, queued by the port directly.

* **Receiving.**  On readiness it reads up to ``read_packets`` datagrams (Erlang's option
  of that name), each with ``recvmsg_into`` into a buffer of ``max_datagram`` bytes (the
  I/O thread's shared one when it is big enough), and delivers each as a
  :class:`~._messages.Datagram`.  A datagram larger than the buffer (``MSG_TRUNC``) is
  dropped and reported as :class:`~._messages.Error` ``EMSGSIZE``; an ICMP error reported on
  the socket (``ECONNREFUSED`` on a connected socket...) is an ``Error`` too.  Neither
  closes the port: UDP is connectionless, so the next datagram may be fine.
* **Receive flow control** is the TCP ports' (``ioserver._flow``): ``delivered_*``
  count what this thread handed to the port, the port's window's ``consumed_*`` what its
  owner took; past the high watermark the handler stops reading (the kernel then drops
  datagrams: UDP has no other backpressure) until the owner drains below the low one.
  Active modes count datagrams as TCP ports count packets.  An ``Error`` (a datagram
  too large, an ICMP error, a send refused) is charged to the window and the budget too,
  :data:`ERROR_CHARGE` bytes and one message, so that a flood of them pauses the port as
  datagrams do; one that would find the port over its high watermark or paused (nobody
  takes them: a socket error is reported even when the port does not read) is dropped
  and counted in ``errors_dropped``, as the kernel drops datagrams then.  The global memory budget
  applies as to streams (see ``ioserver._flow``): ordinary reads stop short of its
  reserve, a port whose owner waits may read into it, no read may pass the limit, and a
  paused handler looks again every few milliseconds (``MemoryBudget.resumes``).
* **Sending** never blocks the thread: ``cmd_send`` queues ``(data, address)`` and the end
  of the round flushes the queue with ``send``/``sendto`` until ``EAGAIN``, then waits for
  the socket to be writable.  A datagram the kernel refuses (``EMSGSIZE``,
  ``ECONNREFUSED`` from an earlier ICMP error, ``ENETUNREACH``...) is dropped and reported
  as an ``Error``.  The port is *busy* above its high watermark of queued bytes, as a TCP
  port; ``out_done`` (bytes sent or dropped) is what the port compares with what it queued.
"""

from __future__ import annotations

import errno
import os
import socket
from collections import deque
from typing import Any

from ._conn import ReceivingHandler
from ._contract import Deliver, LoopHalf, UDPRequest
from ._exceptions import ConnectError, PollerLimitError, errno_name
from ._iothread import READ_SIZE, IOThread
from ._messages import PASSIVE, WRITABLE, Closed, Datagram, Error
from ._options import DatagramSettings
from ._poller import ERROR, READ, WRITE

__all__ = ["ERROR_CHARGE", "DatagramHandler", "charge_error", "cmd_open_udp"]

_MSG_TRUNC = getattr(socket, "MSG_TRUNC", 0)
# With MSG_TRUNC in the flags, Linux returns a truncated datagram's real length.
_RECV_FLAGS = _MSG_TRUNC if hasattr(socket, "SO_PEERCRED") else 0
#: What an :class:`Error` message is charged to its port's window and the memory budget:
#: about what its objects hold (the message, its sentence).  Both halves use it: the
#: handler as it delivers one, the port (``ports.UDPPort``) as its owner takes one.
ERROR_CHARGE = 256


def charge_error(conn: Any, io: Any) -> None:
    """Count an :class:`Error` delivered to ``conn``'s port (a ``DatagramHandler``, or a
    daemon client's ``RemoteDatagramConn`` of one): :data:`ERROR_CHARGE` bytes and one
    message to its window and to ``io``'s memory budget, as a datagram is charged its
    own, until the owner takes it (``ports.UDPPort`` counts it taken).  Called once it
    is delivered: one whose delivery raised is not charged."""
    conn.delivered_messages += 1
    conn.delivered_bytes += ERROR_CHARGE
    io.delivered_total += ERROR_CHARGE


class DatagramHandler(ReceivingHandler):
    """The I/O thread's half of a UDP port (see the module docstring).

    A packet device's handler (``ioserver._tun``) subclasses it: its ``sock`` need only
    have ``fileno``, ``recvmsg_into``, ``send``, ``getsockopt`` and ``close``;
    ``message`` makes the message of one read from ``(data, address)``, and the
    ``*_detail`` hooks word its errors.
    """

    message: Any = Datagram

    def __init__(
        self,
        io: IOThread,
        sock: socket.socket,
        port: LoopHalf,
        deliver: Deliver,
        options: DatagramSettings,
        active: tuple[int, bool],
    ) -> None:
        self.io = io
        self.sock = sock
        self.fd = sock.fileno()
        self.port = port
        self.deliver = deliver
        self.configure_receiving(options, active)
        self.read_packets: int = options["read_packets"]
        size: int = options["max_datagram"]
        self.max_datagram = size
        # The shared buffer of the thread when it is big enough: only this thread reads it.
        self.view = io._view[:size] if size <= READ_SIZE else memoryview(bytearray(size))
        self.outq: deque[tuple[bytes, Any]] = deque()
        self.out_bytes = 0  # queued, not yet sent
        self.out_done = 0  # sent or dropped: the port's send flow control counts these
        self.bytes_in = 0
        self.bytes_out = 0  # sent
        self.datagrams_in = 0
        self.datagrams_out = 0
        self.datagrams_too_large = 0
        self.errors = 0  # errors taken from the socket or its sends, ever
        self.errors_dropped = 0  # ... of them, dropped: the port was over its watermark
        self.budget_paused = False
        self.budget_resume_size = size  # a whole datagram's read (_pause_for_budget)
        self.mask = 0
        self.dirty = False
        self.closed = False

    # -- interest -----------------------------------------------------------------------
    def _update_interest(self) -> None:
        if self.closed:
            return
        mask = 0
        if self.credit and not self.msgq_paused and not self.budget_paused:
            mask = READ
        if self.outq:
            mask |= WRITE
        self.io._interest(self, mask)

    # -- the I/O thread's calls ---------------------------------------------------------
    def on_ready(self, mask: int) -> None:
        if mask & (WRITE | ERROR) and self.outq:
            self._write()
            if self.closed:
                return
        if self.mask & READ and mask & (READ | ERROR):
            self._read()
        elif mask & ERROR:
            # An error is pending and nobody reads: take it, or level-triggered epoll spins.
            number = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if number:
                self._error(number, "")

    def flush(self) -> None:
        if self.outq and not self.closed:
            self._write()

    def on_error(self, exc: Exception) -> None:
        self.deliver((self.port, Closed(f"internal error: {exc!r}", "EIO")))
        self._close()

    def on_shutdown(self) -> None:
        self.deliver((self.port, Closed("ioserver closed", "ESHUTDOWN")))
        self._close()

    # -- receiving ----------------------------------------------------------------------
    def _read(self) -> None:
        io = self.io
        # A read takes a datagram, or an Error charged ERROR_CHARGE: whichever is larger.
        size = max(len(self.view), ERROR_CHARGE)
        allowance = io.budget.read_allowance(self)
        if allowance < size:
            self._pause_for_budget()
            return
        recvmsg_into = self.sock.recvmsg_into
        buffers = [self.view]
        port = self.port
        deliver = self.deliver
        message = self.message
        received = 0
        charged = 0  # received, and ERROR_CHARGE for each Error delivered
        for _ in range(self.read_packets):
            if charged + size > allowance:
                break  # the next datagram might not fit in the budget
            try:
                n, _, flags, address = recvmsg_into(buffers, 0, _RECV_FLAGS)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                # An ICMP error queued on the socket (ECONNREFUSED, EHOSTUNREACH...): the
                # read consumed it; the next one may find a datagram.
                error: tuple[int | None, str] | None = (exc.errno, self._read_error_detail())
            else:
                error = None
                if flags & _MSG_TRUNC:
                    self.datagrams_too_large += 1
                    detail = self._too_large_detail(n, len(self.view), address)
                    error = (errno.EMSGSIZE, detail)
            if error is not None:
                # An Error message instead of a datagram, charged ERROR_CHARGE (_error).
                self._error(*error)
                if self.closed:
                    break
                charged += ERROR_CHARGE
                if self.over_high():
                    self._pause_msgq()
                    break
                continue
            received += n
            charged += n
            self.datagrams_in += 1
            deliver((port, message(bytes(self.view[:n]), address)))
            # Charged once delivered, each, not after the loop: should a later datagram's
            # delivery raise (a MemoryError), those before it stay charged (the loop sees
            # none of them before this round publishes its batch).
            io.delivered_total += n
            self.delivered_messages += 1
            self.delivered_bytes += n
            credit = self.credit
            if credit > 0:
                self.credit = credit = credit - 1
                if credit == 0:
                    if self.notify_passive:
                        deliver((port, PASSIVE))
                    break
            if self.over_high():
                self._pause_msgq()
                break
        self.bytes_in += received
        io.bytes_in += received
        self._update_interest()

    def _read_error_detail(self) -> str:
        return " (reported by the network for an earlier datagram)"

    def _too_large_detail(self, n: int, size: int, address: object) -> str:
        real = f"{n} bytes" if n > size else "more"
        return (
            f": a datagram of {real} from {address!r} exceeds max_datagram={size} "
            "bytes; it was dropped"
        )

    def _dropped_detail(self, size: int, address: object) -> str:
        return f": a datagram of {size} bytes to {address!r} was dropped"

    def _error(self, number: int | None, detail: str) -> None:
        """Deliver an :class:`Error` that does not close the port, charged
        :data:`ERROR_CHARGE` bytes and one message as a datagram is charged its own; or,
        when the port is paused or over its high watermark (its owner does not take its
        messages: nothing would bound them, as a socket error is reported even to a port
        that does not read), drop it and count it in ``errors_dropped``."""
        self.errors += 1
        if self.msgq_paused or self.budget_paused or self.over_high():
            self.errors_dropped += 1
            return
        name = errno_name(number)
        reason = os.strerror(number) if number else "unknown error"
        self.deliver((self.port, Error(name, number, f"{reason} ({name}){detail}")))
        charge_error(self, self.io)

    def _reading_changed(self) -> None:
        self._update_interest()

    # -- sending ------------------------------------------------------------------------
    def _write(self) -> None:
        outq = self.outq
        sock = self.sock
        io = self.io
        sent_bytes = 0
        while outq:
            data, address = outq[0]
            try:
                if address is None:
                    sock.send(data)
                else:
                    sock.sendto(data, address)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                outq.popleft()
                size = len(data)
                self.out_bytes -= size
                self.out_done += size
                io.bytes_discarded += size
                self._error(exc.errno, self._dropped_detail(size, address))
                continue
            outq.popleft()
            size = len(data)
            sent_bytes += size
            self.out_bytes -= size
            self.out_done += size
            self.datagrams_out += 1
        self.bytes_out += sent_bytes
        io.bytes_out += sent_bytes
        window = self.window
        if window.send_blocked and window.queued_bytes - self.out_done <= self.send_low:
            self.deliver((self.port, WRITABLE))
        if (self.mask & WRITE) != (WRITE if outq else 0):
            self._update_interest()

    # -- commands (queued by the port, run on the I/O thread) ----------------------------
    def cmd_send(self, item: tuple[bytes, Any]) -> None:
        if self.closed:
            self.io.bytes_discarded += len(item[0])
            return
        self.outq.append(item)
        self.out_bytes += len(item[0])
        self.io.mark_dirty(self)

    def cmd_close(self, _: object) -> None:
        if self.closed:
            return
        if self.outq:
            self._write()  # what the kernel takes now leaves; the rest is dropped
        self._close()

    def close(self) -> None:  # IOThread.cmd_close dispatches here
        self.cmd_close(None)

    def send_eof(self) -> None:
        """UDP has no end of stream: nothing to do."""

    def _close(self) -> None:
        if self.closed:
            return
        self.io.release(self)
        self.closed = True
        self.sock.close()
        self.io.bytes_discarded += self.out_bytes
        self.out_done += self.out_bytes
        self.out_bytes = 0
        self.outq.clear()


def cmd_open_udp(io: IOThread, request: object, spec: UDPRequest) -> None:
    """Create, bind and connect a UDP socket on the I/O thread; answer ``request`` with
    ``(handler, local_address, remote_address)`` or the exception."""
    port, deliver, family, bind, connect = (
        spec.port,
        spec.deliver,
        spec.family,
        spec.bind,
        spec.connect,
    )
    options, active = spec.options, spec.active
    sock = None
    where = "open"  # (socket() itself, or an option: out of descriptors, no IPv6...)
    try:
        sock = socket.socket(family, socket.SOCK_DGRAM)
        sock.setblocking(False)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if options["reuseaddr"]:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if options["reuseport"]:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if options["broadcast"]:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        if options["recbuf"]:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, options["recbuf"])
        if options["sndbuf"]:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, options["sndbuf"])
        where = "bind"
        if bind is not None:
            sock.bind(bind)
        where = "connect"
        if connect is not None:
            sock.connect(connect)  # UDP: no handshake, returns at once
        local = sock.getsockname()
    except OSError as exc:
        if sock is not None:
            sock.close()
        name = errno_name(exc.errno)
        if where == "open":
            what = "cannot open a UDP socket"
        else:
            address = bind if where == "bind" else connect
            what = f"cannot {where} a UDP socket {'on' if where == 'bind' else 'to'} {address!r}"
        deliver((request, ConnectError(f"{what}: {exc.strerror or exc} ({name})", exc.errno, name)))
        return
    except Exception as exc:  # e.g. an option the OS refuses with OverflowError
        if sock is not None:
            sock.close()
        deliver((request, exc))
        return
    handler = DatagramHandler(io, sock, port, deliver, options, active)
    try:
        io.adopt(handler)
    except PollerLimitError as exc:
        sock.close()
        deliver((request, exc))
        return
    deliver((request, (handler, local, connect)))
    handler._update_interest()
