"""A byte-stream face for a raw stream port: :class:`PortStream`.

A :class:`~ports.Port` is a channel of *messages* (:class:`~ioserver.Data`, then one
:class:`~ioserver.Closed`).  Code written against anyio's or trio's byte streams wants
*bytes*: ``receive(max_bytes)`` / ``receive_some(max_bytes)`` returning ``bytes``, the end
of the stream as :exc:`anyio.EndOfStream` or ``b""``, ``send_all``,
``wait_send_all_might_not_block``.  :class:`PortStream` is that face, built only on the
port's public API (``receive``/``receive_nowait``, ``send``/``send_nowait``, ``send_eof``,
``aclose``, ``busy``, ``packet``), so it works on any raw stream port: TCP, Unix sockets,
a program's stdin/stdout, and a daemon's TCP ports.
"""

from __future__ import annotations

import operator
import socket
from collections.abc import Callable
from typing import Any

import anyio
import anyio.abc
import trio
import trio.abc
from anyio.abc import SocketAttribute

from ioserver._exceptions import (
    BrokenPortError,
    BusyPortError,
    ClosedPortError,
    EndOfPort,
    OptionError,
    WouldBlock,
)
from ioserver._messages import Closed, Data, Error

from ._port import Port, tls_attributes

__all__ = ["DEFAULT_RECEIVE_SIZE", "SEND_CHUNK_SIZE", "PortStream"]

#: ``receive_some()`` without ``max_bytes`` returns at most this many bytes (as anyio's
#: default for ``receive``); the port's own reads are at most 64 KiB anyway.
DEFAULT_RECEIVE_SIZE = 65536

#: ``send_all`` hands data to the port in pieces of at most this many bytes, so that a
#: large send waits on the port's flow control (its high watermark) between pieces
#: instead of queueing everything at once.
SEND_CHUNK_SIZE = 65536

_checkpoint = anyio.lowlevel.checkpoint


class PortStream(anyio.abc.ByteStream, trio.abc.HalfCloseableStream):
    """A raw stream port as an anyio :class:`~anyio.abc.ByteStream` and a trio
    :class:`~trio.abc.HalfCloseableStream` at once.

    Wrap a port whose messages are bytes - ``packet="raw"`` (the default) on a TCP port
    (:func:`~ports.connect_tcp`, an accepted connection), a Unix socket port or a process
    port - and hand the stream to code written for either library: anyio's
    :class:`~anyio.streams.buffered.BufferedByteReceiveStream`,
    :class:`~anyio.streams.text.TextStream` and
    :class:`~anyio.streams.tls.TLSStream`, trio's :class:`~trio.SSLStream`, an ``h11``
    loop.  It passes trio's conformance suite
    :func:`trio.testing.check_half_closeable_stream`.  From then on use the stream, not the
    port, to receive and send (the port's options, statistics and addresses still apply).

    Receiving: ``receive_some(max_bytes)`` (trio) and ``receive(max_bytes)`` (anyio) return
    the next bytes, at most ``max_bytes``; what a larger :class:`~ioserver.Data` had left
    is returned by the next call first.  The port's active mode and flow control apply
    unchanged: an active port keeps reading ahead up to its ``high_msgq_watermark``, a
    passive one reads one message per call, as ``gen_tcp:recv``.
    :class:`~ioserver.Passive`, :class:`~ioserver.ExitStatus` and non-final
    :class:`~ioserver.Error` messages are skipped (read ``port.exit_status`` for a
    program's).  Each call is a checkpoint taken *before* anything is taken, so a call that
    raises ``Cancelled`` took no byte.

    Sending: ``send_all(data)`` / ``send(data)`` queue ``data`` on the port in pieces of
    :data:`SEND_CHUNK_SIZE` bytes, each waiting while the port is *busy* (its queued output
    above ``high_watermark``, until it drains below ``low_watermark``) - Erlang's busy
    port, so a slow peer slows only its own sender.  It returns once the last piece is
    queued, not written.  ``wait_send_all_might_not_block()`` waits while the port is busy.

    Cancellation (trio's contract for :meth:`trio.abc.SendStream.send_all`): a
    ``send_all`` that raises ``Cancelled`` before it queued its first piece had no effect;
    one cancelled part-way may have queued some of the data and there is no way to know
    how much, so the stream is then *broken*: every later send raises
    :exc:`~ports.BrokenPortError` (receiving and closing still work).

    Errors (each class is both anyio's and trio's, under :exc:`ioserver.IOServerError`):

    * the end of the stream (the peer closed or half-closed: ``Closed("eof")``):
      ``receive`` raises :exc:`~ports.EndOfPort` (an :exc:`anyio.EndOfStream`) and
      ``receive_some`` returns ``b""``, on every call from then on;
    * the connection broke (``Closed`` with an ``errno_name`` such as ``"ECONNRESET"``):
      :exc:`~ports.BrokenPortError` (:exc:`anyio.BrokenResourceError` and
      :exc:`trio.BrokenResourceError`), its ``errno_name`` set, on every later receive;
    * this side closed the stream or the port: :exc:`~ports.ClosedPortError`; a send after
      :meth:`send_eof` raises it too;
    * two tasks receiving at once, or sending (``send_all``, ``send``,
      ``wait_send_all_might_not_block``, ``send_eof``) at once:
      :exc:`~ports.BusyPortError` (anyio's and trio's ``BusyResourceError``);
    * a port with ``send_timeout`` that stays busy that long:
      :exc:`~ports.SendTimeoutError`, as the port's own ``send``.

    Typed attributes (:meth:`extra`): :class:`anyio.abc.SocketAttribute`'s
    ``local_address``, ``remote_address``, ``local_port``, ``remote_port`` and ``family``
    where the port has them (a process port has none); ``raw_socket`` is never offered:
    the I/O thread owns the socket.  Over a TLS port (``tls=``), anyio's
    :class:`~anyio.streams.tls.TLSAttribute` values too (``peer_certificate``,
    ``cipher``, ``alpn_protocol``, ``tls_version``...; not ``ssl_object``), and
    :meth:`send_eof` raises :exc:`NotImplementedError`, as anyio's ``TLSStream``.

    Args:
        port: an open :class:`~ports.Port` with ``packet="raw"`` whose messages stay in
            the port (no owner mailbox).

    Raises:
        OptionError: ``port`` is not a stream port (a listener, a UDP or ZeroMQ port...),
            has a packet mode other than ``"raw"`` (its messages are packets, not a byte
            stream), or sends its messages to an owner mailbox.
    """

    def __init__(self, port: Port) -> None:
        if not isinstance(port, Port):
            raise OptionError(
                f"PortStream needs a stream port (TCP, Unix socket or process), not "
                f"{type(port).__name__}: only those carry a byte stream"
            )
        if port._framer is not None:  # packet="raw" runs no framer
            raise OptionError(
                f"PortStream needs a port with packet='raw'; this one has "
                f"packet={port.packet!r}, so its messages are packets, not a byte stream"
            )
        if port.owner is not None:
            raise OptionError(
                "PortStream needs a port whose messages stay in the port; this one sends "
                "them to an owner mailbox (call port.set_owner(None) first)"
            )
        self._port = port
        # The rest of the last Data message taken, from _offset on.
        self._pending = b""
        self._offset = 0
        self._eof = False  # Closed("eof") was received: receive_some returns b"" from now
        self._receive_error: BaseException | None = None  # the broken connection's error
        self._last_error: Error | None = None  # the Error message before the final Closed
        self._receiving = False
        self._sending = False
        self._send_broken = False  # a send_all was interrupted part-way

    @property
    def port(self) -> Port:
        """The port this stream reads and writes."""
        return self._port

    # -- receiving ----------------------------------------------------------------------
    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Wait for bytes and return between 1 and ``max_bytes`` of them (trio's name).

        Args:
            max_bytes: the most bytes to return (a positive int), or ``None`` for
                :data:`DEFAULT_RECEIVE_SIZE`.

        Returns:
            The next bytes of the stream, or ``b""`` at its end (the peer closed or
            half-closed), on this and every later call.

        Raises:
            TypeError: ``max_bytes`` is not an int.
            ValueError: ``max_bytes`` is below 1.
            BrokenPortError: the connection broke (``errno_name`` says how).
            ClosedPortError: this side closed the stream or the port.
            BusyPortError: another task is receiving from this stream.
        """
        if max_bytes is None:
            max_bytes = DEFAULT_RECEIVE_SIZE
        else:
            max_bytes = operator.index(max_bytes)
            if max_bytes < 1:
                raise ValueError(f"max_bytes must be at least 1, not {max_bytes}")
        if self._receiving:
            raise BusyPortError("receiving")
        self._receiving = True
        try:
            # The checkpoint comes before anything is taken: a receive that raises
            # Cancelled took nothing (trio's rule).
            await _checkpoint()
            data = self._pending
            offset = self._offset
            if offset >= len(data):
                data = await self._next_data()
                offset = 0
            # From here nothing is awaited: what is taken is returned.
            end = offset + max_bytes
            if offset == 0 and end >= len(data):
                self._pending = b""
                self._offset = 0
                return data
            chunk = data[offset:end]
            if end >= len(data):
                self._pending = b""
                self._offset = 0
            else:
                self._pending = data
                self._offset = end
            return chunk
        finally:
            self._receiving = False

    async def _next_data(self) -> bytes:
        """The next Data's bytes from the port, or ``b""`` at the end of the stream."""
        port = self._port
        while True:
            if port.closed:
                raise ClosedPortError("this port is closed")
            if self._receive_error is not None:
                raise self._receive_error
            if self._eof:
                return b""
            try:
                message = port.receive_nowait()
            except WouldBlock:
                message = await port.receive()  # takes nothing if cancelled
            except EndOfPort:
                self._eof = True
                return b""
            if message.__class__ is Data:
                data: bytes = message.data
                if data:
                    return data
            elif isinstance(message, Closed):
                self._on_closed(message)
            elif isinstance(message, Error):
                self._last_error = message
            # Passive, ExitStatus: not part of the byte stream.

    def _on_closed(self, message: Closed) -> None:
        if message.errno_name is None:
            if message.reason == "closed":
                self._receive_error = ClosedPortError("this port was closed")
            else:
                self._eof = True
            return
        detail = f": {self._last_error.message}" if self._last_error is not None else ""
        self._receive_error = BrokenPortError(
            f"the connection is broken ({message.errno_name}){detail}",
            errno_name=message.errno_name,
        )

    async def receive(self, max_bytes: int = DEFAULT_RECEIVE_SIZE) -> bytes:
        """Wait for bytes and return between 1 and ``max_bytes`` of them (anyio's name).

        As :meth:`receive_some`, except at the end of the stream.

        Raises:
            EndOfPort: the stream ended (an :exc:`anyio.EndOfStream`), on this and every
                later call.
            BrokenPortError, ClosedPortError, BusyPortError, TypeError, ValueError: as
                :meth:`receive_some`.
        """
        data = await self.receive_some(max_bytes)
        if not data:
            raise EndOfPort("the peer closed its side of the stream")
        return data

    def __aiter__(self) -> PortStream:
        return self

    async def __anext__(self) -> bytes:
        """``async for chunk in stream``: the chunks of :meth:`receive_some` until the end."""
        data = await self.receive_some()
        if not data:
            raise StopAsyncIteration
        return data

    # -- sending ------------------------------------------------------------------------
    def _start_sending(self) -> None:
        if self._sending:
            raise BusyPortError("sending")
        self._sending = True

    def _check_send_broken(self) -> None:
        if self._send_broken:
            if self._port.closed:
                raise ClosedPortError("this port is closed")
            raise BrokenPortError(
                "a send_all was interrupted part-way, so an unknown part of its data was "
                "sent: the stream is broken"
            )

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Send ``data`` (trio's name): queue it on the port, waiting while it is busy.

        Returns once every byte is queued for the I/O thread (not yet written).  A send
        cancelled before its first piece was queued had no effect; one cancelled
        part-way leaves the stream broken (see the class).

        Raises:
            ClosedPortError: this side closed the stream or the port, or called
                :meth:`send_eof`.
            BrokenPortError: the connection broke, or an earlier send was interrupted
                part-way.
            BusyPortError: another task is sending on this stream.
            SendTimeoutError: the port's ``send_timeout`` passed while it was busy.
            TypeError: ``data`` is not bytes-like.
        """
        self._start_sending()
        try:
            await _checkpoint()
            self._check_send_broken()
            port = self._port
            view = memoryview(data)
            if view.ndim != 1 or view.itemsize != 1:
                view = view.cast("B")
            size = view.nbytes
            if size == 0:
                # Nothing to queue, but a closed or broken port still says so.
                try:
                    port.send_nowait(b"")
                except WouldBlock:
                    pass
                return
            if size <= SEND_CHUNK_SIZE:
                await port.send(data)
                return
            await port.send(view[:SEND_CHUNK_SIZE])
            try:
                for start in range(SEND_CHUNK_SIZE, size, SEND_CHUNK_SIZE):
                    await port.send(view[start : start + SEND_CHUNK_SIZE])
            except BaseException:
                self._send_broken = True
                raise
        finally:
            self._sending = False

    async def send(self, item: bytes) -> None:
        """Send ``item`` (anyio's name): as :meth:`send_all`."""
        await self.send_all(item)

    async def wait_send_all_might_not_block(self) -> None:
        """Wait until the port is not busy: its queued output is at or below the high
        watermark (after a wait, below the low watermark), so a ``send_all`` of up to
        :data:`SEND_CHUNK_SIZE` bytes would queue without waiting.

        Raises:
            ClosedPortError, BrokenPortError, BusyPortError, SendTimeoutError: as
                :meth:`send_all`.
        """
        self._start_sending()
        try:
            await _checkpoint()
            self._check_send_broken()
            # A port's send of nothing waits while the port is busy and queues nothing;
            # it raises at once if the port is closed, broken or half-closed.
            await self._port.send(b"")
        finally:
            self._sending = False

    async def send_eof(self) -> None:
        """Half-close: the peer reads the end of the stream after what was sent.

        Receiving goes on until the peer closes its side.  Idempotent.  A checkpoint,
        taken before the end-of-file is queued: a call that raises ``Cancelled`` did not
        half-close.

        Raises:
            ClosedPortError: this side closed the stream or the port.
            BusyPortError: another task is sending on this stream.
            NotImplementedError: the port is a TLS connection (see :meth:`ports.Port.send_eof`).
        """
        self._start_sending()
        try:
            await _checkpoint()
            self._port._send_eof_nowait()  # nothing awaited once it is queued
        finally:
            self._sending = False

    # -- closing ------------------------------------------------------------------------
    async def aclose(self) -> None:
        """Close the stream and its port (see :meth:`ports.Port.aclose`).

        Idempotent, a checkpoint, and it closes even when cancelled.  Tasks waiting on the
        stream get :exc:`~ports.ClosedPortError`.
        """
        self._pending = b""
        self._offset = 0
        await self._port.aclose()

    # -- attributes ---------------------------------------------------------------------
    @property
    def extra_attributes(self) -> dict[Any, Callable[[], Any]]:
        """anyio typed attributes: :class:`~anyio.abc.SocketAttribute` values the port has."""
        port = self._port
        local, remote = port.local_address, port.remote_address
        attributes: dict[Any, Callable[[], Any]] = {}
        if local is not None:
            attributes[SocketAttribute.local_address] = lambda: local
        if remote is not None:
            attributes[SocketAttribute.remote_address] = lambda: remote
        address = local if local is not None else remote
        if isinstance(address, tuple) and len(address) in (2, 4):
            family = socket.AF_INET if len(address) == 2 else socket.AF_INET6
            attributes[SocketAttribute.family] = lambda: family
            if isinstance(local, tuple):
                attributes[SocketAttribute.local_port] = lambda: local[1]
            if isinstance(remote, tuple):
                attributes[SocketAttribute.remote_port] = lambda: remote[1]
        elif isinstance(address, (str, bytes)):
            attributes[SocketAttribute.family] = lambda: socket.AF_UNIX
        attributes.update(tls_attributes(port._conn))
        return attributes

    def __repr__(self) -> str:
        return f"<PortStream over {self._port!r}>"
