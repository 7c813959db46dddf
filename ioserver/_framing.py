"""Packet framing: small sans-I/O objects that turn a byte stream into messages and back.

A framer knows nothing of sockets or threads.  ``feed(data)`` takes whatever one read
returned and gives back the whole messages it completed (possibly none, possibly many);
``frame(message)`` gives the bytes to write for one message.  The I/O thread runs them,
so actors receive whole messages and the hop between threads carries fewer objects.

The modes are Erlang's ``{packet, ...}`` option of ``inet:setopts/2``:

=============  ==============================================================
``"raw"``      no framing: each read is one message (Erlang's ``raw``/``0``)
``1, 2, 4``    a big-endian length header of that many bytes before each
               message, added by ``frame`` and stripped by ``feed``
``"line"``     messages end with a delimiter (``b"\\n"`` by default), which
               is *kept* at the end of each message, as Erlang's ``line``
``"msgpack"``  a stream of msgpack objects; each decoded object is one
               message, and ``frame`` packs one object
=============  ==============================================================

``packet_size`` caps one message (bytes, header excluded).  A peer that exceeds it -
including a length header that claims more - makes ``feed`` raise
:exc:`PacketTooLarge` naming the limit and the size, and nothing is allocated for the
claimed size: a framer never holds more than ``packet_size`` plus one header of input.
"""

from __future__ import annotations

from typing import Any

import msgpack

from ._exceptions import IOServerError, OptionError

__all__ = [
    "FrameError",
    "Framer",
    "LengthPrefixFramer",
    "LineFramer",
    "MsgpackFramer",
    "PacketTooLarge",
    "RawFramer",
    "make_framer",
]

#: The default cap on one message: 64 MiB.
DEFAULT_PACKET_SIZE = 64 * 1024 * 1024


class FrameError(IOServerError, ValueError):
    """The peer sent bytes that do not frame as the port's packet mode says.

    Delivered to the port's owner in the :class:`~ioserver.Closed` message that ends the
    port (the I/O thread raises it only inside the framer).
    """


class PacketTooLarge(FrameError):
    """A message is larger than the port's ``packet_size``.

    ``limit`` is the cap and ``size`` the size the peer announced (a length header) or
    reached (a line or msgpack object still growing), both in bytes.
    """

    def __init__(self, limit: int, size: int, what: str = "packet") -> None:
        super().__init__(f"{what} of {size} bytes exceeds packet_size={limit}")
        self.limit = limit
        self.size = size


class Framer:
    """The interface every framer implements (see the module docstring)."""

    __slots__ = ()

    #: The packet mode's name, as given to :func:`make_framer`.
    mode: Any = None

    def feed(self, data: bytes | bytearray | memoryview) -> list[Any]:
        """Take received bytes; return the messages they completed, in order.

        Raises:
            PacketTooLarge: a message exceeds ``packet_size``.
            FrameError: the bytes cannot be decoded in this mode.
        """
        raise NotImplementedError

    def frame(self, message: Any) -> bytes:
        """The bytes to send for one ``message``.

        Raises:
            PacketTooLarge: the message exceeds ``packet_size`` or the header's range.
            TypeError: the message is not of the mode's type (bytes, or msgpack-able).
        """
        raise NotImplementedError

    @property
    def buffered(self) -> int:
        """Bytes received and held for an incomplete message."""
        return 0


class RawFramer(Framer):
    """No framing: each read is one message of bytes."""

    __slots__ = ()
    mode = "raw"

    def feed(self, data: bytes | bytearray | memoryview) -> list[Any]:
        return [bytes(data)] if data else []

    def frame(self, message: Any) -> bytes:
        return _as_bytes(message)


class LengthPrefixFramer(Framer):
    """A big-endian length header of 1, 2 or 4 bytes before each message."""

    __slots__ = ("_buffer", "_header", "_limit", "_wanted", "mode")

    def __init__(self, header: int, packet_size: int = DEFAULT_PACKET_SIZE) -> None:
        if header not in (1, 2, 4):
            raise OptionError(f"packet must be 1, 2 or 4 header bytes, not {header!r}")
        self.mode = header
        self._header = header
        self._limit = min(packet_size, (1 << (8 * header)) - 1)
        self._buffer = bytearray()
        self._wanted = -1  # the body length being collected, -1 while reading a header

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def feed(self, data: bytes | bytearray | memoryview) -> list[Any]:
        buffer = self._buffer
        buffer += data
        messages: list[Any] = []
        header = self._header
        start = 0
        end = len(buffer)
        while True:
            wanted = self._wanted
            if wanted < 0:
                if end - start < header:
                    break
                wanted = int.from_bytes(buffer[start : start + header], "big")
                if wanted > self._limit:
                    del buffer[:]
                    raise PacketTooLarge(self._limit, wanted)
                start += header
                self._wanted = wanted
            if end - start < wanted:
                break
            messages.append(bytes(buffer[start : start + wanted]))
            start += wanted
            self._wanted = -1
        if start:
            del buffer[:start]
        return messages

    def frame(self, message: Any) -> bytes:
        data = _as_bytes(message)
        if len(data) > self._limit:
            raise PacketTooLarge(self._limit, len(data))
        return len(data).to_bytes(self._header, "big") + data


class LineFramer(Framer):
    """Messages end with ``delimiter``, which is kept at the end of each message.

    ``frame`` sends the message as it is, adding the delimiter if it does not end with
    one.  A line longer than ``packet_size`` (delimiter included) is an error.
    """

    __slots__ = ("_buffer", "_delimiter", "_limit", "_scanned")

    mode = "line"

    def __init__(self, delimiter: bytes = b"\n", packet_size: int = DEFAULT_PACKET_SIZE):
        if not isinstance(delimiter, bytes) or len(delimiter) != 1:
            raise OptionError(f"line delimiter must be one byte, not {delimiter!r}")
        self._delimiter = delimiter
        self._limit = packet_size
        self._buffer = bytearray()
        self._scanned = 0  # bytes of the buffer known to hold no delimiter

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def feed(self, data: bytes | bytearray | memoryview) -> list[Any]:
        buffer = self._buffer
        buffer += data
        messages: list[Any] = []
        start = 0
        delimiter = self._delimiter
        find = buffer.find
        position = find(delimiter, self._scanned)
        while position >= 0:
            end = position + 1
            if end - start > self._limit:
                del buffer[:]
                self._scanned = 0
                raise PacketTooLarge(self._limit, end - start, "line")
            messages.append(bytes(buffer[start:end]))
            start = end
            position = find(delimiter, start)
        if start:
            del buffer[:start]
        self._scanned = len(buffer)
        if len(buffer) > self._limit:
            size = len(buffer)
            del buffer[:]
            self._scanned = 0
            raise PacketTooLarge(self._limit, size, "line")
        return messages

    def frame(self, message: Any) -> bytes:
        data = _as_bytes(message)
        if not data.endswith(self._delimiter):
            data += self._delimiter
        if len(data) > self._limit:
            raise PacketTooLarge(self._limit, len(data), "line")
        return data


class MsgpackFramer(Framer):
    """A stream of msgpack objects: each decoded object is one message.

    Decoding uses one streaming ``msgpack.Unpacker`` per port, with ``packet_size`` as its
    buffer cap, strings as ``str`` and ``bytes`` as ``bytes`` (``raw=False``).
    """

    __slots__ = ("_fed", "_limit", "_unpacker")

    mode = "msgpack"

    def __init__(self, packet_size: int = DEFAULT_PACKET_SIZE) -> None:
        self._limit = packet_size
        self._fed = 0
        self._unpacker = msgpack.Unpacker(
            raw=False, max_buffer_size=packet_size, strict_map_key=False
        )

    @property
    def buffered(self) -> int:
        return self._fed - int(self._unpacker.tell())

    def feed(self, data: bytes | bytearray | memoryview) -> list[Any]:
        try:
            self._unpacker.feed(data)
            self._fed += len(data)
        except msgpack.BufferFull:
            raise PacketTooLarge(self._limit, self._limit + len(data), "msgpack object") from None
        try:
            return list(self._unpacker)
        except (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, ValueError) as exc:
            raise FrameError(f"malformed msgpack data: {exc}") from exc

    def frame(self, message: Any) -> bytes:
        try:
            data: bytes = msgpack.packb(message, use_bin_type=True)
        except (TypeError, ValueError, OverflowError) as exc:
            raise TypeError(f"cannot pack {type(message).__name__} as msgpack: {exc}") from exc
        if len(data) > self._limit:
            raise PacketTooLarge(self._limit, len(data), "msgpack object")
        return data


def _as_bytes(message: Any) -> bytes:
    if isinstance(message, bytes):
        return message
    if isinstance(message, (bytearray, memoryview)):
        return bytes(message)
    raise TypeError(f"this packet mode sends bytes-like data, not {type(message).__name__}")


def make_framer(
    packet: Any = "raw", *, packet_size: int = DEFAULT_PACKET_SIZE, delimiter: bytes = b"\n"
) -> Framer:
    """The framer for a packet mode: ``"raw"``, ``1``, ``2``, ``4``, ``"line"``, ``"msgpack"``.

    Args:
        packet: the mode, as Erlang's ``{packet, ...}`` (``0`` is accepted for ``"raw"``).
        packet_size: the largest message in bytes (header excluded); must be positive.
        delimiter: for ``"line"``: the one-byte end of line.

    Raises:
        OptionError: an unknown mode, or a wrong ``packet_size`` or ``delimiter``.
    """
    if isinstance(packet_size, bool) or not isinstance(packet_size, int) or packet_size <= 0:
        raise OptionError(f"packet_size must be a positive int (bytes), not {packet_size!r}")
    if packet in ("raw", 0):
        return RawFramer()
    if packet in (1, 2, 4) and not isinstance(packet, bool):
        return LengthPrefixFramer(packet, packet_size)
    if packet == "line":
        return LineFramer(delimiter, packet_size)
    if packet == "msgpack":
        return MsgpackFramer(packet_size)
    raise OptionError(f"packet must be 'raw', 1, 2, 4, 'line' or 'msgpack', not {packet!r}")
