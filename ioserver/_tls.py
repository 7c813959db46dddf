"""TLS on the I/O thread: :class:`ssl.SSLObject` over two :class:`ssl.MemoryBIO`.

A TLS connection is an ordinary stream ``Conn`` whose ``sock`` is a :class:`TLSSocket`:
the object the I/O thread reads and writes as it reads and writes a socket
(``recv_into``, ``send``, ``sendmsg``, ``close``), which decrypts after the socket read
and encrypts before the socket write.  So what lies above it - packet modes, the active
credit, the watermarks, the memory budget, batched flushes of a round - sees plaintext
and is unchanged: a ``Data`` message, a frame, a charge to the budget is plaintext.  The
same split (records in, plaintext out, through memory buffers) is the one rustls offers a
native I/O core (``rustls::Connection::read_tls``/``reader``).

Life of a TLS connection
------------------------
1. **Handshake.**  The ``Conn`` stays of kind ``CONNECTING`` (a connect) or is made so (an
   accepted connection): its readiness goes to :meth:`TLSSocket.on_event`, which feeds
   the socket's bytes to OpenSSL, writes what OpenSSL answers and sets the interest
   itself.  A timer bounds it (``tls_handshake_timeout``, :data:`HANDSHAKE_TIMEOUT` by
   default).  No port is published yet: ``connect_tcp`` is still waiting, and the
   listener's ``Accepted`` is not delivered, so no command can reach the connection.
2. **Established.**  The attributes (peer certificate, cipher, ALPN protocol...) are
   copied once into :attr:`TLSSocket.info`, which the loop half reads (never the
   ``SSLObject``: OpenSSL releases the GIL while it works, and one ``SSL`` must not be used
   from two threads).  The ``Conn`` becomes a ``STREAM``; the connect is answered or
   ``Accepted`` delivered.
3. **Failure.**  A handshake that fails (the certificate does not verify, the peer speaks
   no TLS, it closed, the timer ran out) closes that connection alone: a connect gets
   :exc:`~ioserver.TLSError`, a listener an :class:`~ioserver.Error` message.  After the
   handshake a record that does not decrypt is an ``Error`` then a ``Closed`` on the port
   (``errno_name="ETLS"``).
4. **Close.**  ``close`` sends ``close_notify`` before it closes the socket; what the
   socket does not take at once is written after the port is gone, for :data:`LINGER`
   seconds at most (``_Linger``, an entry of the port table until then).  A peer's
   ``close_notify``, or its end of the TCP stream without one, is the port's end of file
   (``Closed("eof")``).

Bounds
------
What the layer holds per connection is bounded, whatever the peer sends: ciphertext read
and not yet decrypted is at most one read of the I/O thread (:data:`READ_LIMIT`, or one
:data:`RECORD` when the budget shortens the read), plus the record OpenSSL is decrypting;
each encryption takes at most :data:`CHUNK` bytes of plaintext, and the next is not taken
until the ciphertext of the last is in the kernel.  These bytes are not charged to the
memory budget (they are the kernel's socket buffer, moved): the budget counts plaintext.
Plaintext a read could not hand over (the read's size was reached) stays in OpenSSL and
the connection is read again next round (``IOThread.tls_input``), the socket having no
more to signal.  Output counts as written (``bytes_out``, the send watermarks, the budget)
only once its ciphertext is in the kernel: a slow TLS peer holds its sender back as a slow
plaintext peer does.
"""

from __future__ import annotations

import errno
import socket
import ssl
import struct
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from ._conn import CONNECTING, Conn, Handler
from ._contract import format_address
from ._exceptions import TLSError
from ._messages import Closed, Error
from ._poller import READ, WRITE

#: A timer's handle (``IOThread.call_later``): ``[0] = None`` cancels it.
Timer = list[Callable[[], None] | None]


class TLSHost(Protocol):
    """What the layer uses of the I/O thread (``ioserver._iothread.IOThread``, which
    imports this module): its own API for the kinds it serves."""

    #: Streams whose layer holds input their socket will not signal (:func:`take_input`).
    tls_input: list[Conn]
    #: The thread's buffer for ciphertext read (made by the first TLS connection).
    tls_scratch: memoryview | None
    #: The thread is stopping: it closes every descriptor itself.
    _stopping: bool
    #: Closed ports reset because their output was not written within their linger.
    linger_timeouts: int

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer: ...
    def adopt(self, entry: Conn | Handler) -> None: ...
    def release(self, entry: Conn | Handler) -> None: ...
    def _interest(self, conn: Conn | Handler, mask: int) -> None: ...
    def _close(self, conn: Conn) -> None: ...


__all__ = [
    "CHUNK",
    "HANDSHAKE_TIMEOUT",
    "LINGER",
    "READ_LIMIT",
    "TLSHost",
    "TLSSocket",
    "accept_tls",
    "take_input",
    "tls_info",
]

#: Seconds a TLS handshake may take by default, from the TCP connection to its end.
HANDSHAKE_TIMEOUT = 10.0
#: Bytes of plaintext encrypted at once (then written before more is taken).
CHUNK = 65536
#: Bytes of ciphertext read at most per read of a connection; a read is never less than
#: a whole TLS record (:data:`RECORD`), so a partial record always completes.
READ_LIMIT = 65536
#: The largest TLS record on the wire: 16 KiB of plaintext plus header and expansion.
RECORD = 16384 + 2048 + 5
#: Seconds a closed TLS connection may take at most to write its last ciphertext and its
#: ``close_notify`` when the socket could not take them at once (the peer not reading);
#: less when the port's ``linger`` option is shorter.
LINGER = 5.0


def tls_info(sslobj: ssl.SSLObject) -> dict[str, Any]:
    """The attributes of an established connection, as anyio's ``TLSAttribute`` names
    them (taken once, on the I/O thread)."""
    return {
        "alpn_protocol": sslobj.selected_alpn_protocol(),
        "channel_binding_tls_unique": sslobj.get_channel_binding("tls-unique"),
        "cipher": sslobj.cipher(),
        "peer_certificate": sslobj.getpeercert(False),
        "peer_certificate_binary": sslobj.getpeercert(True),
        "server_side": sslobj.server_side,
        "server_hostname": sslobj.server_hostname,
        "shared_ciphers": sslobj.shared_ciphers() if sslobj.server_side else None,
        "tls_version": sslobj.version(),
    }


class TLSSocket:
    """The socket face of a TLS connection, on the I/O thread only (see the module).

    ``conn.sock`` is this object from the start of the handshake to the close.
    """

    __slots__ = (
        "accepted",
        "ahead",
        "conn",
        "eof",
        "established",
        "handshaking",
        "incoming",
        "info",
        "input",
        "io",
        "out",
        "outgoing",
        "queued",
        "read_closed",
        "scratch",
        "sock",
        "sslobj",
        "started",
        "timeout",
        "timer",
    )

    def __init__(
        self,
        io: TLSHost,
        conn: Conn,
        context: ssl.SSLContext,
        *,
        server_side: bool,
        server_hostname: str | None = None,
        timeout: float | None = HANDSHAKE_TIMEOUT,
        accepted: tuple[object, object] | None = None,
        established: Callable[[], None],
    ) -> None:
        self.io = io
        self.conn = conn
        self.sock: socket.socket = conn.sock
        # The I/O thread's buffer for ciphertext read (one per thread: it reads one
        # socket at a time), so a read allocates nothing.
        scratch = io.tls_scratch
        if scratch is None:
            scratch = io.tls_scratch = memoryview(bytearray(READ_LIMIT + RECORD))
        self.scratch: memoryview = scratch
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        # ValueError/SSLError here (a bad server_hostname...) reach the caller: connect_stream
        # answers its request with it.
        self.sslobj = context.wrap_bio(
            self.incoming,
            self.outgoing,
            server_side=server_side,
            server_hostname=None if server_side else server_hostname,
        )
        self.timeout = timeout
        self.timer: Timer | None = None
        self.accepted = accepted  # (listener's port, peer address) of an accepted connection
        # What the handshake's success does (ioserver._tcp): answer the connect, or
        # deliver the listener's Accepted; either sets the stream's interest.
        self.established = established
        self.handshaking = True
        self.started = False
        self.info: dict[str, Any] | None = None  # set once, when the handshake succeeded
        self.out: bytes | memoryview = b""  # ciphertext the socket did not take yet
        self.ahead = 0  # plaintext at the head of conn.outq encrypted into self.out
        self.input = False  # OpenSSL may hold plaintext a read could not take
        self.queued = False  # in IOThread.tls_input
        self.eof = False  # the socket's end of file was read
        self.read_closed = False  # the peer's close_notify (or end of file) was read
        conn.sock = self  # type: ignore[assignment]
        conn.tls = self

    # -- the socket's face, for what the I/O thread asks of conn.sock --------------------
    def fileno(self) -> int:
        return self.sock.fileno()

    @property
    def family(self) -> int:
        """The underlying socket's address family (``ioserver status`` counts by it)."""
        return self.sock.family

    def getsockname(self) -> object:
        return self.sock.getsockname()

    def getpeername(self) -> object:
        return self.sock.getpeername()

    def getsockopt(self, level: int, option: int) -> int:
        return self.sock.getsockopt(level, option)

    def shutdown(self, how: int) -> None:
        """Send ``close_notify``, then shut the socket down (``ports.Port.send_eof``
        refuses TLS ports, as anyio's ``TLSStream``; this is for completeness)."""
        self._close_notify()
        self.sock.shutdown(how)

    def close(self) -> None:
        """Send ``close_notify`` if the connection is established, then close the socket.

        What the socket does not take at once (its buffer is full of this connection's last
        output, the peer not reading yet) is written by a :class:`_Linger` after the port
        is gone, for :data:`LINGER` seconds at most: the peer reads a clean end, not a
        truncation."""
        self._cancel_timer()
        if not self.handshaking:
            self._close_notify()
            if self.out and not self.io._stopping:  # (a stopping thread closes every fd)
                linger = self.conn.linger
                seconds = LINGER if linger is None else min(LINGER, linger)
                _Linger(self.io, self.sock, bytes(self.out), seconds).start()
                return
        self.sock.close()

    def abort(self) -> None:
        """Make the next :meth:`close` a reset: no ``close_notify``, the ciphertext not
        written dropped, the socket closed with ``SO_LINGER {1, 0}`` (the port's ``linger``
        ran out, ``IOThread._reset``).

        Raises:
            OSError: the socket refused the option (it is broken; close it anyway).
        """
        self.handshaking = True  # (as after a fatal alert: close sends nothing more)
        self.out = b""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    def _close_notify(self) -> None:
        try:
            self.sslobj.unwrap()
        except (ssl.SSLError, ValueError):
            pass  # SSLWantReadError: sent, the peer's answer is not waited for
        try:
            self._flush()
        except OSError:
            pass

    # -- the handshake -------------------------------------------------------------------
    def start(self) -> None:
        """The TCP connection is up: arm the timeout and send the first flight."""
        self.started = True
        if self.timeout is not None:
            self.timer = self.io.call_later(self.timeout, self._timed_out)
        self.on_event(0)

    def on_event(self, mask: int) -> None:
        """The socket is ready during the handshake (or the handshake starts: ``0``)."""
        conn = self.conn
        try:
            if mask & ~WRITE:
                data = self.sock.recv(RECORD)
                if not data:
                    self._fail("the peer closed the connection during the TLS handshake")
                    return
                self.incoming.write(data)
            try:
                self.sslobj.do_handshake()
                done = True
            except ssl.SSLWantReadError:
                done = False
            self._flush()
        except BlockingIOError:
            done = False
        except ssl.SSLError as exc:
            try:
                self._flush()  # the alert OpenSSL wrote: the peer learns why
            except OSError:
                pass
            self._fail(_describe(exc), getattr(exc, "reason", None))
            return
        except OSError as exc:
            name = errno.errorcode.get(exc.errno or 0, "EUNKNOWN")
            self._fail(f"the connection failed during the TLS handshake ({name})", None, name)
            return
        if done:
            self._established()
        elif not conn.closed:
            self.io._interest(conn, READ | (WRITE if self.out else 0))

    def _established(self) -> None:
        self._cancel_timer()
        self.handshaking = False
        self.info = tls_info(self.sslobj)
        self.input = True  # the peer's first data may have come with its last flight
        self.accepted = None
        self.established()  # the connect answered, or Accepted; the stream's interest set

    def _timed_out(self) -> None:
        self.timer = None
        if self.handshaking and not self.conn.closed:
            self._fail(
                f"the TLS handshake did not finish within {self.timeout} s",
                None,
                "ETIMEDOUT",
            )

    def _cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer[0] = None
            self.timer = None

    def _fail(self, why: str, reason: str | None = None, name: str = "ETLS") -> None:
        """The handshake failed: tell whoever waits for this connection, close it."""
        conn = self.conn
        number = errno.ETIMEDOUT if name == "ETIMEDOUT" else None
        if self.accepted is not None:
            lport, address = self.accepted
            message = f"TLS handshake with {format_address(address)} failed: {why}"
            conn.deliver((lport, Error(name, number, message)))
        elif conn.request is not None:
            request, conn.request = conn.request, None
            address = conn.address
            message = f"TLS handshake with {format_address(address)} failed: {why}"
            conn.deliver((request, TLSError(message, number, name, reason)))
        self.handshaking = True  # nothing to notify the peer of: close at once
        self.io._close(conn)

    # -- the established stream, as the round reads and writes it ------------------------
    def recv_into(self, buffer: bytearray, nbytes: int = 0) -> int:
        """Read ciphertext, decrypt at most ``nbytes`` (all of ``buffer`` for 0) bytes
        into ``buffer``; 0 at the peer's end.  Raises :exc:`BlockingIOError` when no
        whole record is there yet, :exc:`OSError` as the socket does."""
        if self.read_closed:
            return 0
        size = nbytes or len(buffer)
        incoming = self.incoming
        # Ciphertext held stays within one read (or one record, for a read shortened by
        # the budget): decrypting it never gives much more than the read may take.
        limit = max(size, RECORD)
        if not self.eof and incoming.pending < limit:
            scratch = self.scratch
            try:
                got = self.sock.recv_into(scratch, limit - incoming.pending)
            except BlockingIOError:
                if not self.input:
                    raise
                got = -1  # a read of what OpenSSL holds (see take_input)
            if got > 0:
                incoming.write(scratch[:got])
            elif got == 0:
                self.eof = True
                incoming.write_eof()
        read = self.sslobj.read
        view = memoryview(buffer)
        filled = 0
        try:
            while filled < size:
                want = size - filled
                n: int = read(want, view[filled:size])  # type: ignore[assignment]
                if not n:  # the peer's close_notify (Python's read returns 0 for it)
                    raise ssl.SSLZeroReturnError
                filled += n
                if n < want and not incoming.pending and not self.eof:
                    # A record ended and no byte of another is here: the next read would
                    # only raise SSLWantReadError (the common case, spared its cost).
                    self.input = False
                    break
            else:
                self.input = True  # the read's size was reached: there may be more
        except ssl.SSLWantReadError:
            self.input = False
        except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
            # The peer's close_notify, or the end of the TCP stream without one (a
            # "ragged" end, as most HTTP peers close): the end of file either way.
            self.read_closed = True
            self.input = filled > 0  # come back for the 0 after this read's data
        except ssl.SSLError as exc:
            self._broken(exc)
            raise BlockingIOError from None
        finally:
            view.release()
        if self.outgoing.pending:
            self._flush()  # what reading made OpenSSL say (a session ticket, a key update)
        if self.input:
            self._queue()
        if filled:
            return filled
        if self.read_closed:
            return 0
        raise BlockingIOError

    def send(self, data: bytes | memoryview) -> int:
        size = len(data)
        if self.out or self.outgoing.pending or size > CHUNK or not size:
            return self._send((data,))
        # The common case, inlined: nothing pending, one buffer, one encryption.
        try:
            self.sslobj.write(data)
        except ssl.SSLError as exc:
            raise OSError(errno.EPROTO, _describe(exc)) from None
        out = self.outgoing.read()
        try:
            sent = self.sock.send(out)
        except BlockingIOError:
            sent = 0
        if sent == len(out):
            return size
        self.out = memoryview(out)[sent:]
        self.ahead = size
        return 0

    def sendmsg(self, buffers: list[bytes | memoryview]) -> int:
        return self._send(buffers)

    def _send(self, buffers: Sequence[bytes | memoryview]) -> int:
        """Encrypt and write the plaintext of ``buffers`` (the head of ``conn.outq``);
        return how many plaintext bytes are now wholly in the kernel, as ciphertext.

        Plaintext already encrypted (:attr:`ahead`) is at the head of ``buffers`` until
        its ciphertext is written: it is counted then, and skipped when encrypting."""
        credit = 0
        if self.out or self.outgoing.pending:
            self._flush()
            if self.out:
                return 0
            credit, self.ahead = self.ahead, 0
        skip = credit
        parts: list[bytes | memoryview] = []
        size = 0
        for buffer in buffers:
            length = len(buffer)
            if skip >= length:
                skip -= length
                continue
            if skip:
                buffer = memoryview(buffer)[skip:]
                length -= skip
                skip = 0
            if size + length > CHUNK:
                parts.append(memoryview(buffer)[: CHUNK - size])
                size = CHUNK
                break
            parts.append(buffer)
            size += length
            if size == CHUNK:
                break
        if size:
            try:
                self.sslobj.write(parts[0] if len(parts) == 1 else b"".join(parts))
            except ssl.SSLError as exc:  # e.g. after a fatal alert: the stream is broken
                raise OSError(errno.EPROTO, _describe(exc)) from None
            self.ahead = size
            self._flush()
            if not self.out:
                credit += size
                self.ahead = 0
        return credit

    def _flush(self) -> None:
        """Write the pending ciphertext (this connection's, in order) as far as the socket
        takes it.  Raises :exc:`OSError` (not ``BlockingIOError``) if the socket broke."""
        out = self.out
        if self.outgoing.pending:
            more = self.outgoing.read()
            out = bytes(out) + more if out else more
        if not out:
            return
        try:
            sent = self.sock.send(out)
        except BlockingIOError:
            sent = 0
        self.out = b"" if sent == len(out) else memoryview(out)[sent:]

    def _broken(self, exc: ssl.SSLError) -> None:
        """A record that does not decrypt after the handshake: ``Error`` then ``Closed``
        on the port, as a framing error is."""
        conn = self.conn
        why = _describe(exc)
        conn.deliver((conn.port, Error("ETLS", None, f"TLS failed: {why}")))
        conn.deliver((conn.port, Closed("ETLS", "ETLS")))
        self.handshaking = True  # no close_notify after a fatal alert
        self.io._close(conn)

    # -- reads the socket does not signal -------------------------------------------------
    def interest(self, mask: int) -> int:
        """``IOThread._stream_interest``'s last word: a stream that may read again while
        OpenSSL holds plaintext is read next round (its socket has nothing to signal)."""
        if mask & READ and self.input:
            self._queue()
        return mask

    def _queue(self) -> None:
        if not self.queued:
            self.queued = True
            self.io.tls_input.append(self.conn)


class _Linger(Handler):
    """The last ciphertext of a closed TLS connection (its ``close_notify`` at least),
    written as the socket takes it, then the socket closed; given up after
    ``seconds`` (at most :data:`LINGER`; a peer that never reads: then the socket is
    reset, as ``IOThread._reset`` does), or at the first error."""

    def __init__(self, io: TLSHost, sock: socket.socket, out: bytes, seconds: float) -> None:
        self.io = io
        self.sock = sock
        self.fd = sock.fileno()
        self.out = out
        self.seconds = seconds
        self.timer: Timer | None = None

    def start(self) -> None:
        try:
            self.io.adopt(self)  # the fd the closed connection held: no poller limit
        except Exception:
            self.sock.close()
            return
        self.io._interest(self, WRITE)
        self.timer = self.io.call_later(self.seconds, self._expired)

    def on_ready(self, mask: int) -> None:
        try:
            sent = self.sock.send(self.out)
        except BlockingIOError:
            return
        except OSError:
            sent = len(self.out)  # the peer is gone: nothing more to do
        self.out = self.out[sent:]
        if not self.out:
            self.on_shutdown()

    def on_error(self, exc: Exception) -> None:
        self.on_shutdown()

    def _expired(self) -> None:
        """The peer did not take the rest in time: reset (the kernel frees the socket
        and what it holds at once), counted in ``linger_timeouts``."""
        self.timer = None
        if self.closed:
            return
        self.io.linger_timeouts += 1
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass  # broken already: closing it is all there is to do
        self.on_shutdown()

    def on_shutdown(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.timer is not None:
            self.timer[0] = None
        self.io.release(self)
        self.sock.close()


def accept_tls(
    io: TLSHost,
    conn: Conn,
    context: ssl.SSLContext,
    timeout: float | None,
    lport: object,
    address: object,
    established: Callable[[], None],
) -> None:
    """A listener with ``tls`` (its server ``context``, the handshake's ``timeout`` in
    seconds) accepted ``conn``: start its handshake; ``established`` delivers the
    listener's ``Accepted`` when it succeeds (an ``Error`` comes if it fails)."""
    conn.kind = CONNECTING
    try:
        tls = TLSSocket(
            io,
            conn,
            context,
            server_side=True,
            timeout=timeout,
            accepted=(lport, address),
            established=established,
        )
    except Exception as exc:  # OpenSSL refused to make the connection's state
        message = f"TLS refused the connection from {format_address(address)}: {exc!r}"
        conn.deliver((lport, Error("ETLS", None, message)))
        io._close(conn)
        return
    tls.start()


def take_input(io: TLSHost) -> list[tuple[int, int]]:
    """The round's extra read events: each stream whose TLS layer holds input and that may
    read (the round checks its interest as for any event)."""
    conns, io.tls_input = io.tls_input, []
    events = []
    for conn in conns:
        tls = conn.tls
        assert isinstance(tls, TLSSocket)
        tls.queued = False
        if not conn.closed and conn.mask & READ:
            events.append((conn.fd, READ))
    return events


def _describe(exc: ssl.SSLError) -> str:
    """OpenSSL's error in words, with the verification's reason when there is one."""
    verify = getattr(exc, "verify_message", None)
    reason = getattr(exc, "reason", None) or exc.__class__.__name__
    if verify:
        return f"{reason}: {verify}"
    text = exc.args[1] if len(exc.args) > 1 and isinstance(exc.args[1], str) else str(exc)
    return f"{reason} ({text})" if reason not in text else text
