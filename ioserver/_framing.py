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
``"resp"``     Redis commands (RESP2 arrays of bulk strings, or inline
               commands): each command is one message, a ``list[bytes]``;
               ``frame`` sends bytes already encoded (see :func:`encode_resp`)
=============  ==============================================================

``packet_size`` caps one message (bytes, header excluded).  A peer that exceeds it -
including a length header that claims more - makes ``feed`` raise
:exc:`PacketTooLarge` naming the limit and the size, and nothing is allocated for the
claimed size: a framer never holds more than ``packet_size`` plus one header of input.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import msgpack

from ._exceptions import FrameError, OptionError, PacketTooLarge

_msgpack_charges: Callable[[bytes | bytearray | memoryview, int, int], list[int]] | None
try:  # The native crate's msgpack scanner (built with the package): see _object_charges.
    from ._native import _msgpack_charges as _native_charges

    _msgpack_charges = _native_charges
except ImportError:  # pragma: no cover - a build without the extension module
    _msgpack_charges = None

__all__ = [
    "FrameError",
    "Framer",
    "LengthPrefixFramer",
    "LineFramer",
    "MsgpackFramer",
    "PacketMode",
    "PacketTooLarge",
    "RawFramer",
    "RespError",
    "RespFramer",
    "encode_resp",
    "make_framer",
    "port_framer",
]

PacketMode = Literal["raw", "line", "msgpack", "resp", 0, 1, 2, 4]
"""A packet mode, as Erlang's ``{packet, ...}`` (see ``ports.PortOptions``)."""

#: The default cap on one message: 64 MiB.
DEFAULT_PACKET_SIZE = 64 * 1024 * 1024


#: Bytes charged for each packet a framer delivers, on top of its size on the wire: what
#: a small queued message costs in Python objects (the Data, the bytes or decoded object,
#: the (port, message) tuple, a queue slot; 139 bytes measured on CPython 3.11, x86-64).
#: Without it, 64 KiB of one-byte lines became 32,768 messages charged 2 bytes each, and
#: a few hundred MiB stayed live under an 8 MiB ``memory_limit``.
PACKET_OVERHEAD = 160

#: What a decoded msgpack object holds beyond its wire bytes and :data:`PACKET_OVERHEAD`,
#: charged by kind of item for a port of this process (wire bytes alone said nothing of
#: what decoding builds: one byte, an empty array, decodes to a 56-byte list and its slot).
#: Each is an upper bound of what ``msgpack.unpackb(packet, raw=False,
#: strict_map_key=False)`` allocates, measured with ``tracemalloc`` on CPython 3.11 x86-64
#: (``bench/msgpack_charges.py``; the table and the method are in
#: docs/reference/limits.rst).  Each item is charged its own object - ``"int"`` (not a
#: shared small int: a negative fixint, int 8..64, uint 16..64), ``"float"``, ``"str"``
#: and ``"bin"`` (2 bytes or more: shorter ones are shared), ``"ext"`` (an ``ExtType`` or
#: a ``Timestamp``), ``"array"``, ``"map"``; nil, booleans, fixints 0..127 and uint 8 are
#: shared, 0 - and its slot in its container (``"array slot"``; ``"map slot"`` a key or a
#: value: its share of the dict's table; ``"map table"`` more for a map of one entry or
#: more, the rest of its first table).  A str whose characters take more bytes decoded
#: than encoded is charged that too: CPython keeps 2 bytes a character if one is past
#: U+00FF, 4 if one is past U+FFFF (found from its widest byte and its count of
#: characters).  The object itself is charged
#: its variable part only (a wide str's characters, a container's items, a map's table):
#: its own object is in :data:`PACKET_OVERHEAD`.  No item is charged more than
#: :data:`PACKET_OVERHEAD` a wire byte of its header (a map's in a map: 64 + 32 + 64), so
#: no prefix of a read of ``n`` bytes is charged more than ``n * (1 + PACKET_OVERHEAD)``:
#: the bound the budget's shortened reads rely on.  The native framer's
#: ``msgpack::CHARGE_*`` are the same.
MSGPACK_CHARGES: Mapping[str, int] = {
    "int": 48,
    "float": 32,
    "str": 80,
    "bin": 48,
    "ext": 112,
    "array": 64,
    "map": 64,
    "array slot": 8,
    "map slot": 64,
    "map table": 32,
}

#: Bytes charged for each argument of a RESP command, on top of its wire bytes and
#: :data:`PACKET_OVERHEAD`, for a port of this process: a ``bytes`` object (33 bytes and
#: its length) and its list slot (8), less the six wire bytes an argument takes at least,
#: with the allocator's rounding (35 bytes measured with ``tracemalloc``).
RESP_ARGUMENT_CHARGE = 48


class Framer:
    """The interface every framer implements (see the module docstring)."""

    __slots__ = ()

    #: The packet mode's name, as given to :func:`make_framer`.
    mode: PacketMode = "raw"

    #: True when :meth:`feed` returns decoded objects (``"msgpack"``, ``"resp"``), not
    #: ``bytes``: such a message is charged to the budgets its share of the wire bytes it
    #: was decoded from (the I/O thread records it in the port's ``_sizes``), since its
    #: ``len()`` says nothing about its size.  The one definition that the local port,
    #: the daemon and the client read.
    decodes_objects = False

    def feed(self, data: bytes | bytearray | memoryview) -> list[object]:
        """Take received bytes; return the messages they completed, in order.

        Raises:
            PacketTooLarge: a message exceeds ``packet_size``.
            FrameError: the bytes cannot be decoded in this mode.
        """
        raise NotImplementedError

    def frame(self, message: object) -> bytes:
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

    def finish(self) -> list[object]:
        """The peer's end of file: the message its unfinished bytes still make, if this
        mode delivers one (``"line"``: the last line, without a delimiter, as Erlang's
        ``{packet, line}``), the framer then empty; else ``[]``, and the unfinished bytes
        (a length-prefixed packet cut short, half an object) stay held until the port
        closes - no mode can make a message of them."""
        return []

    @property
    def pending_charge(self) -> int:
        """What the incomplete message is charged beyond its :attr:`buffered` bytes, for a
        port of this process, in bytes: a msgpack object the charge of its items walked so
        far (:data:`MSGPACK_CHARGES`, each as it arrives); 0 for the other modes.  Once
        the message is whole, its charge (:meth:`object_charges`) replaces this."""
        return 0

    def object_charges(self, messages: list[object]) -> list[int] | None:
        """What each of ``messages`` (the last :meth:`feed`'s, in order) holds in Python
        objects beyond its wire bytes and :data:`PACKET_OVERHEAD`, in bytes: a msgpack
        object its items by kind (:data:`MSGPACK_CHARGES`), a RESP command
        :data:`RESP_ARGUMENT_CHARGE` for each argument; None for bytes payloads (nothing
        more).  A port of this process charges it to the memory budget."""
        return None


class RawFramer(Framer):
    """No framing: each read is one message of bytes."""

    __slots__ = ()
    mode = "raw"

    def feed(self, data: bytes | bytearray | memoryview) -> list[object]:
        return [bytes(data)] if data else []

    def frame(self, message: object) -> bytes:
        return _as_bytes(message)


class LengthPrefixFramer(Framer):
    """A big-endian length header of 1, 2 or 4 bytes before each message."""

    __slots__ = ("_buffer", "_header", "_limit", "_wanted", "mode")

    def __init__(self, header: int, packet_size: int = DEFAULT_PACKET_SIZE) -> None:
        if header not in (1, 2, 4):
            raise OptionError(f"packet must be 1, 2 or 4 header bytes, not {header!r}")
        self.mode = 1 if header == 1 else 2 if header == 2 else 4
        self._header = header
        self._limit = min(packet_size, (1 << (8 * header)) - 1)
        self._buffer = bytearray()
        self._wanted = -1  # the body length being collected, -1 while reading a header

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def feed(self, data: bytes | bytearray | memoryview) -> list[object]:
        buffer = self._buffer
        buffer += data
        messages: list[object] = []
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

    def frame(self, message: object) -> bytes:
        data = _as_bytes(message)
        if len(data) > self._limit:
            raise PacketTooLarge(self._limit, len(data))
        return len(data).to_bytes(self._header, "big") + data


class LineFramer(Framer):
    """Messages end with ``delimiter``, which is kept at the end of each message.

    ``frame`` sends the message as it is, adding the delimiter if it does not end with
    one.  A line longer than ``packet_size`` (delimiter included) is an error.  At the
    peer's end of file the last line, if it has no delimiter, is delivered as it is
    (:meth:`finish`).
    """

    __slots__ = ("_buffer", "_delimiter", "_limit", "_scanned")

    mode = "line"

    def __init__(self, delimiter: object = b"\n", packet_size: int = DEFAULT_PACKET_SIZE):
        if not isinstance(delimiter, bytes) or len(delimiter) != 1:
            raise OptionError(f"line delimiter must be one byte, not {delimiter!r}")
        self._delimiter = delimiter
        self._limit = packet_size
        self._buffer = bytearray()
        self._scanned = 0  # bytes of the buffer known to hold no delimiter

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def feed(self, data: bytes | bytearray | memoryview) -> list[object]:
        buffer = self._buffer
        buffer += data
        messages: list[object] = []
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

    def finish(self) -> list[object]:
        """The last line, unterminated (see :meth:`Framer.finish`): the peer closed."""
        buffer = self._buffer
        if not buffer:
            return []
        line = bytes(buffer)
        del buffer[:]
        self._scanned = 0
        return [line]

    def frame(self, message: object) -> bytes:
        data = _as_bytes(message)
        if not data.endswith(self._delimiter):
            data += self._delimiter
        if len(data) > self._limit:
            raise PacketTooLarge(self._limit, len(data), "line")
        return data


#: The deepest nesting of arrays and maps in one msgpack object.  Half the C decoder's own
#: limit (its stack holds 1024 levels), so that an accepted object can still be decoded
#: and re-encoded *inside an envelope*: the daemon carries each object to its client three
#: levels deep in a frame, and an object at the decoder's limit made the daemon's frame
#: unpackable (its control endpoint closed, or the client dropped a frame of other
#: ports' data).
MSGPACK_MAX_DEPTH = 512

#: The most items one msgpack object may hold, whatever ``packet_size``: the object itself
#: counts one, and each element of an array, each key and each value of a map one more.
#: Decoding builds up to ~80 bytes of Python objects per item (an ext: 80, an empty dict in
#: a list: 72, an empty list: 64), at up to ~1 us per item (an ext, built by a Python call;
#: ~0.2 us for the others), so this bounds one object at ~80 MiB and about a second of
#: decoding at worst; ``packet_size`` alone (each item takes one byte at least: 64 Mi
#: items at the default) allowed ~4.5 GiB and a minute.  The same
#: cap as Redis's on a command's arguments (:data:`RESP_MAX_ARGUMENTS`).
MSGPACK_MAX_ITEMS = 1024 * 1024

# The msgpack wire format, by an object's first byte (https://github.com/msgpack/msgpack/
# blob/master/spec.md).  _MSGPACK_SIZE: the whole item's size when the first byte gives it
# (fixints, nil, booleans, floats, ints, fixext, fixstr); 0 otherwise.
_MSGPACK_SIZE = bytearray(256)
for _byte in (*range(0x00, 0x80), 0xC0, 0xC2, 0xC3, *range(0xE0, 0x100)):
    _MSGPACK_SIZE[_byte] = 1
for _byte in range(0xA0, 0xC0):  # fixstr: the length is in the byte
    _MSGPACK_SIZE[_byte] = 1 + (_byte & 0x1F)
for _byte, _size in {
    0xCA: 5, 0xCB: 9,  # float 32, 64
    0xCC: 2, 0xCD: 3, 0xCE: 5, 0xCF: 9,  # uint 8..64
    0xD0: 2, 0xD1: 3, 0xD2: 5, 0xD3: 9,  # int 8..64
    0xD4: 3, 0xD5: 4, 0xD6: 6, 0xD7: 10, 0xD8: 18,  # fixext 1..16 (type byte + data)
}.items():  # fmt: skip
    _MSGPACK_SIZE[_byte] = _size
#: Items with a length field: first byte -> (bytes of the length, header bytes after it).
_MSGPACK_SIZED = {
    0xC4: (1, 0), 0xC5: (2, 0), 0xC6: (4, 0),  # bin 8, 16, 32
    0xC7: (1, 1), 0xC8: (2, 1), 0xC9: (4, 1),  # ext 8, 16, 32 (then a type byte)
    0xD9: (1, 0), 0xDA: (2, 0), 0xDB: (4, 0),  # str 8, 16, 32
}  # fmt: skip
#: Containers with a count field: first byte -> (bytes of the count, items per count).
_MSGPACK_CONTAINERS = {0xDC: (2, 1), 0xDD: (4, 1), 0xDE: (2, 2), 0xDF: (4, 2)}
#: The charge of a scalar item whose first byte says it all (:data:`MSGPACK_CHARGES`);
#: -1 for a str or a bin, whose charge depends on their bytes (:func:`_scalar_charge`).
_MSGPACK_OWN = [0] * 256
for _byte in (*range(0xE0, 0x100), *range(0xCD, 0xD4)):
    _MSGPACK_OWN[_byte] = MSGPACK_CHARGES["int"]
for _byte in (0xCA, 0xCB):
    _MSGPACK_OWN[_byte] = MSGPACK_CHARGES["float"]
for _byte in (*range(0xC7, 0xCA), *range(0xD4, 0xD9)):
    _MSGPACK_OWN[_byte] = MSGPACK_CHARGES["ext"]
for _byte in (*range(0xA0, 0xC0), 0xC4, 0xC5, 0xC6, 0xD9, 0xDA, 0xDB):
    _MSGPACK_OWN[_byte] = -1
_CHARGE_STR = MSGPACK_CHARGES["str"]
_CHARGE_BIN = MSGPACK_CHARGES["bin"]
_CHARGE_ARRAY = MSGPACK_CHARGES["array"]
_CHARGE_MAP = MSGPACK_CHARGES["map"]
_ARRAY_SLOT = MSGPACK_CHARGES["array slot"]
_MAP_SLOT = MSGPACK_CHARGES["map slot"]
_MAP_TABLE = MSGPACK_CHARGES["map table"]
_CONTINUATION = bytes(range(0x80, 0xC0))  # the bytes that continue a UTF-8 character
# CPython keeps a str 1, 2 or 4 bytes a character, by its widest: a UTF-8 lead byte from
# 0xc4 is one past U+00FF, from 0xf0 one past U+FFFF (searched at C speed: a peer's str
# may be as long as packet_size).
_PAST_LATIN1 = re.compile(rb"[\xc4-\xff]").search
_PAST_BMP = re.compile(rb"[\xf0-\xff]").search
_BIN = (0xC4, 0xC5, 0xC6)


def _scalar_charge(byte: int, body: bytes | bytearray | memoryview) -> tuple[int, int]:
    """A str's or bin's charge, ``(own object, variable part)``: see
    :data:`MSGPACK_CHARGES`.  ``body`` is its data."""
    if len(body) <= 1:
        return 0, 0  # shared: "", one ASCII character, b"", one byte
    if byte in _BIN:
        return _CHARGE_BIN, 0
    data = body if isinstance(body, (bytes, bytearray)) else bytes(body)
    if data.isascii() or not _PAST_LATIN1(data):
        return _CHARGE_STR, 0  # at most one byte a character
    characters = len(data.translate(None, _CONTINUATION))
    return _CHARGE_STR, max(0, (4 if _PAST_BMP(data) else 2) * characters - len(data))


_WHAT = "msgpack object"


class MsgpackFramer(Framer):
    """A stream of msgpack objects: each decoded object is one message.

    **Object boundaries are found before anything is decoded**, so only whole objects of
    at most ``packet_size`` bytes reach the decoder (``msgpack.unpackb``: strings as
    ``str``, ``bytes`` as ``bytes``, with its length caps - ``max_array_len``,
    ``max_map_len``, ``max_str_len``... - set to the object's own wire size).  A decoder
    fed an unfinished object would preallocate every array and map its headers announce,
    whether or not their elements ever come; here nothing is built for them.

    The boundaries: new bytes are first skipped through by msgpack's C decoder in skip
    mode (it builds no object), which finds the whole objects in them at C speed; the
    unfinished object at the end, if any, is copied and walked by a small scanner over
    the wire format that keeps its place between reads - the items each open array or
    map still needs (one int per level, at most :data:`MSGPACK_MAX_DEPTH` levels), and
    strings, bins and exts skipped by their length fields.  So what a port holds for an
    unfinished object is its bytes, exactly :attr:`buffered` (charged to the memory budget
    and ``port_buffer_limit``), and no byte is walked twice by the same scanner.

    Refused, as the other framings refuse: an object larger than ``packet_size`` bytes
    raises :exc:`PacketTooLarge` as soon as a header announces it (a length, or a count of
    items that cannot fit, each item taking one byte at least) or its bytes reach it; an
    object of more than :data:`MSGPACK_MAX_ITEMS` items (itself, each array element, each
    map key and each map value) raises :exc:`PacketTooLarge` (``"... items exceeds
    MSGPACK_MAX_ITEMS=..."``) as soon as the count is known to pass the cap - a container
    header adds every item it announces, so one announcing too many is refused at the
    header, before its items arrive; nesting deeper than :data:`MSGPACK_MAX_DEPTH` levels,
    the byte ``0xc1`` (never used) and an object the decoder refuses (an unhashable map
    key...) raise :exc:`FrameError`.
    A failed framer holds nothing.
    """

    __slots__ = (
        "_buffer",
        "_charge",
        "_items",
        "_limit",
        "_object_charges",
        "_scanned",
        "_slots",
        "_stack",
    )

    mode = "msgpack"
    decodes_objects = True

    def __init__(self, packet_size: int = DEFAULT_PACKET_SIZE) -> None:
        self._limit = packet_size
        self._buffer = bytearray()  # the unfinished object's bytes (and, in feed, the read)
        self._scanned = 0  # bytes of it walked: the next item's header starts there
        self._stack: list[int] = []  # items each open array or map still needs, innermost last
        self._items = 1  # items of the walked object counted so far (while _scanned)
        self._slots: list[int] = []  # the slot charge of each open container's items
        self._charge = 0  # the charge of the walked object's items walked so far
        self._object_charges: list[int] = []  # charge of each object the last feed returned

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def _fail(self, error: FrameError) -> FrameError:
        del self._buffer[:]
        self._scanned = 0
        self._stack.clear()
        self._slots.clear()
        return error

    def feed(self, data: bytes | bytearray | memoryview) -> list[object]:
        self._object_charges = []
        try:
            if self._buffer:
                return self._feed_held(data)
            return self._feed_fresh(data)
        except FrameError as exc:
            raise self._fail(exc) from exc.__cause__

    @property
    def pending_charge(self) -> int:
        return self._charge if self._buffer else 0

    def object_charges(self, messages: list[object]) -> list[int] | None:
        return self._object_charges

    def _feed_fresh(self, data: bytes | bytearray | memoryview) -> list[object]:
        """``feed`` when nothing is held (the usual case): find the whole objects in the
        read itself, and copy only an unfinished one at its end."""
        end = len(data)
        if not end:
            return []
        bounds: list[tuple[int, int]] = []
        start = self._skip_whole_objects(data, 0, end, bounds)
        if start < end:
            self._buffer += data[start:]
            stop = self._walk(0, end - start)
            if stop >= 0:  # (the C decoder saw it unfinished: this cannot happen)
                raise FrameError("malformed msgpack data: scanners disagree")
            if end - start > self._limit:
                raise PacketTooLarge(self._limit, end - start, _WHAT)
        return self._decode(data, start, bounds) if bounds else []

    def _feed_held(self, data: bytes | bytearray | memoryview) -> list[object]:
        """``feed`` when an unfinished object is held: walk on from where it stopped."""
        buffer = self._buffer
        buffer += data
        end = len(buffer)
        limit = self._limit
        bounds: list[tuple[int, int]] = []
        start = self._walk(0, end)
        walked_charge: int | None = None
        if start >= 0:
            walked_charge = self._charge  # the walked object's charge
            bounds.append((0, start))
            if start < end:
                with memoryview(buffer) as view:
                    start = self._skip_whole_objects(view, start, end, bounds)
                if start < end:
                    stop = self._walk(start, end)
                    if stop >= 0:
                        raise FrameError("malformed msgpack data: scanners disagree")
        else:
            start = 0
        if end - start > limit:
            raise PacketTooLarge(limit, end - start, _WHAT)
        if not bounds:
            return []
        with memoryview(buffer) as view:
            messages = self._decode(view, start, bounds, walked_charge)
        del buffer[:start]
        return messages

    def _skip_whole_objects(
        self,
        data: bytes | bytearray | memoryview,
        start: int,
        end: int,
        bounds: list[tuple[int, int]],
    ) -> int:
        """Find the whole objects of ``data[start:end]`` with msgpack's C decoder in skip
        mode (it builds nothing; its copy of the bytes is dropped on return); append their
        bounds; return where the unfinished rest begins (``end`` if none)."""
        skipper = msgpack.Unpacker(max_buffer_size=end - start, read_size=end - start)
        skipper.feed(data[start:end] if start or end != len(data) else data)
        base = start
        while start < end:  # (a read that ends with an object raises no OutOfData)
            try:
                skipper.skip()
            except msgpack.OutOfData:
                break
            except msgpack.StackError:
                raise _too_deep() from None
            except ValueError as exc:  # msgpack.FormatError: the byte 0xc1
                raise FrameError(f"malformed msgpack data: {exc}") from exc
            stop = base + skipper.tell()
            bounds.append((start, stop))
            start = stop
        return start

    def _walk(self, start: int, end: int) -> int:
        """Walk the held object that begins at ``start``, from where the last walk
        stopped; return its end, or -1 if it is unfinished (its place kept for the next
        read).

        Raises:
            PacketTooLarge: a header announces more than ``packet_size`` bytes, or brings
                the object's items past :data:`MSGPACK_MAX_ITEMS`.
            FrameError: nesting deeper than :data:`MSGPACK_MAX_DEPTH`, or the byte 0xc1.
        """
        buffer = self._buffer
        stack = self._stack
        slots = self._slots
        sizes = _MSGPACK_SIZE
        owns = _MSGPACK_OWN
        limit = self._limit
        items = self._items if self._scanned else 1
        charge = self._charge if self._scanned else 0
        position = start + self._scanned
        while position < end:
            byte = buffer[position]
            size = sizes[byte]
            # Each item is charged as it arrives (a container at its header): its slot, its
            # own object (the object itself: its variable part only).
            top = position == start
            if slots:
                charge += slots[-1]
            if size:  # a scalar (or fixstr) whose size its first byte gives
                if position + size > end:
                    if slots:
                        charge -= slots[-1]
                    break
                own = owns[byte]
                if own < 0:  # a fixstr
                    own, variable = _scalar_charge(byte, buffer[position + 1 : position + size])
                    charge += variable
                if not top:
                    charge += own
                position += size
            elif 0x80 <= byte <= 0x9F:  # fixmap, fixarray
                count = byte & 0x0F if byte >= 0x90 else (byte & 0x0F) * 2
                position += 1
                if byte < 0x90 and count:
                    charge += _MAP_TABLE
                if not top:
                    charge += _CHARGE_ARRAY if byte >= 0x90 else _CHARGE_MAP
                if count:
                    items += count
                    if items > MSGPACK_MAX_ITEMS:
                        raise _too_many_items(items)
                    if len(stack) >= MSGPACK_MAX_DEPTH:
                        raise _too_deep()
                    stack.append(count)
                    slots.append(_ARRAY_SLOT if byte >= 0x90 else _MAP_SLOT)
                    continue
            elif byte in _MSGPACK_SIZED:
                width, extra = _MSGPACK_SIZED[byte]
                if position + 1 + width > end:
                    if slots:
                        charge -= slots[-1]
                    break
                length = int.from_bytes(buffer[position + 1 : position + 1 + width], "big")
                size = 1 + width + extra + length
                if position + size - start > limit:
                    raise PacketTooLarge(limit, position + size - start, _WHAT)
                if position + size > end:
                    if slots:
                        charge -= slots[-1]
                    break
                own = owns[byte]
                if own < 0 and byte in _BIN:  # a bin: its length alone says (no copy)
                    own = _CHARGE_BIN if length > 1 else 0
                elif own < 0:  # a str
                    body = buffer[position + 1 + width : position + size]
                    own, variable = _scalar_charge(byte, body)
                    charge += variable
                if not top:
                    charge += own
                position += size
            elif byte in _MSGPACK_CONTAINERS:
                width, per = _MSGPACK_CONTAINERS[byte]
                if position + 1 + width > end:
                    if slots:
                        charge -= slots[-1]
                    break
                count = int.from_bytes(buffer[position + 1 : position + 1 + width], "big") * per
                position += 1 + width
                if per == 2 and count:
                    charge += _MAP_TABLE
                if not top:
                    charge += _CHARGE_MAP if per == 2 else _CHARGE_ARRAY
                if count:
                    # Each item takes one byte at least: refuse a count that cannot fit.
                    if position + count - start > limit:
                        raise PacketTooLarge(limit, position + count - start, _WHAT)
                    items += count
                    if items > MSGPACK_MAX_ITEMS:
                        raise _too_many_items(items)
                    if len(stack) >= MSGPACK_MAX_DEPTH:
                        raise _too_deep()
                    stack.append(count)
                    slots.append(_MAP_SLOT if per == 2 else _ARRAY_SLOT)
                    continue
            else:  # 0xc1, never used
                raise FrameError(f"malformed msgpack data: byte 0x{byte:02x}")
            # An item ended: count it in its container, closing the containers it fills.
            while stack:
                stack[-1] -= 1
                if stack[-1]:
                    break
                stack.pop()
                slots.pop()
            else:
                self._scanned = 0
                self._items = items
                self._charge = charge  # (its charge, for _decode)
                return position  # the top-level object ended
        self._scanned = position - start
        self._items = items
        self._charge = charge
        return -1

    def _decode(
        self,
        data: bytes | bytearray | memoryview,
        stop: int,
        bounds: list[tuple[int, int]],
        walked_charge: int | None = None,
    ) -> list[object]:
        """Decode the whole objects ``bounds`` (``data[0:stop]``, back to back); with
        ``walked_charge``, the first of them was finished by the walk, which charged it
        (that much)."""
        limit = self._limit
        size = 0
        for first, last in bounds:
            if last - first > size:
                size = last - first
        if size > limit:
            raise PacketTooLarge(limit, size, _WHAT)
        if size > MSGPACK_MAX_DEPTH:  # an object of depth d has d bytes at least
            for first, last in bounds:
                if last - first > MSGPACK_MAX_DEPTH:
                    _check_depth(bytes(data[first:last]))
        # Each object's charge (the walk charged the first ``walked``); an object past
        # MSGPACK_MAX_ITEMS is refused by the count (it has that many bytes).
        walked = 0 if walked_charge is None else 1
        counts = [] if walked_charge is None else [walked_charge]
        if len(bounds) > walked:
            counts += _object_charges(data, bounds[walked:])
        try:
            if len(bounds) == 1:
                # unpackb's length caps default to the size of what it is given.  (No
                # local holds a slice: a view of the held buffer must not outlive a fault.)
                objects = [
                    msgpack.unpackb(
                        data if stop == len(data) else data[:stop],
                        raw=False,
                        strict_map_key=False,
                    )
                ]
                self._object_charges = counts
                return objects
            # Whole objects only, so no container is preallocated for items that are not
            # there: one decoder for the run of them, its caps the largest one's size.
            unpacker = msgpack.Unpacker(
                raw=False,
                strict_map_key=False,
                max_buffer_size=stop,
                read_size=stop,
                max_str_len=size,
                max_bin_len=size,
                max_array_len=size,
                max_map_len=size,
                max_ext_len=size,
            )
            unpacker.feed(data[:stop])
            objects = list(unpacker)
            decoded = unpacker.tell()
        except (ValueError, TypeError) as exc:  # msgpack's errors are ValueErrors
            raise FrameError(f"malformed msgpack data: {exc}") from exc
        if len(objects) != len(bounds) or decoded != stop:
            # The scanners' boundaries are msgpack's own; were they ever not, the objects
            # would be cut wrong (and an unfinished last one dropped by the iteration).
            raise FrameError(
                "malformed msgpack data: the framer's object boundaries and the decoder's "
                f"disagree ({len(bounds)} objects in {stop} bytes framed, {len(objects)} "
                f"in {decoded} decoded)"
            )
        self._object_charges = counts
        return objects

    def frame(self, message: object) -> bytes:
        try:
            data: bytes = msgpack.packb(message, use_bin_type=True)
        except (TypeError, ValueError, OverflowError) as exc:
            raise TypeError(f"cannot pack {type(message).__name__} as msgpack: {exc}") from exc
        if len(data) > self._limit:
            raise PacketTooLarge(self._limit, len(data), _WHAT)
        return data


def _too_many_items(items: int) -> PacketTooLarge:
    return PacketTooLarge(MSGPACK_MAX_ITEMS, items, _WHAT, "items", "MSGPACK_MAX_ITEMS")


def _object_charges(
    data: bytes | bytearray | memoryview, bounds: list[tuple[int, int]]
) -> list[int]:
    """The charge of each whole object ``bounds`` of ``data`` (back to back, found by the
    skip-mode scan; :data:`MSGPACK_CHARGES`), refused past :data:`MSGPACK_MAX_ITEMS` as
    :func:`_check_items` refuses: by the native crate's scanner when the extension module
    is built (``ioserver._native._msgpack_charges``: the same sum at C speed, one call a
    read), else by the Python loop :func:`_charge` - which made the framer 2-3.5 times
    slower once every object was counted for its charge.

    Should the native scanner find other objects than ``bounds`` (not expected: it is the
    C skip's rule), the Python loop counts ``bounds`` as given, and the decoder's own
    check (:meth:`MsgpackFramer._decode`) refuses the read with the disagreement.

    Raises:
        PacketTooLarge: an object holds too many items.
    """
    if _msgpack_charges is not None:
        charges: list[int] = _msgpack_charges(data, bounds[0][0], bounds[-1][1])
        if len(charges) == len(bounds):
            return charges
    return [_charge(data, first, last) for first, last in bounds]


def _charge(data: bytes | bytearray | memoryview, start: int, end: int) -> int:
    """The charge of the whole object ``data[start:end]`` (:data:`MSGPACK_CHARGES`: each
    container charged its items' slots at its header); refused past
    :data:`MSGPACK_MAX_ITEMS` as :func:`_check_items` refuses it.

    Raises:
        PacketTooLarge: it holds too many items.
    """
    sizes = _MSGPACK_SIZE
    owns = _MSGPACK_OWN
    items = 1
    charge = 0
    position = start
    while position < end:
        byte = data[position]
        size = sizes[byte]
        top = position == start
        if size or byte in _MSGPACK_SIZED:
            first = position + 1
            if not size:
                width, extra = _MSGPACK_SIZED[byte]
                length = int.from_bytes(data[first : first + width], "big")
                first += width + extra
                size = first - position + length
            own = owns[byte]
            if own < 0:
                own, variable = _scalar_charge(byte, data[first : position + size])
                charge += variable
            if not top:
                charge += own
            position += size
            continue
        if 0x80 <= byte <= 0x9F:  # fixmap, fixarray
            is_map = byte < 0x90
            count = (byte & 0x0F) * 2 if is_map else byte & 0x0F
            position += 1
        else:  # a container with a count field (the skip refused 0xc1)
            width, per = _MSGPACK_CONTAINERS[byte]
            is_map = per == 2
            count = int.from_bytes(data[position + 1 : position + 1 + width], "big") * per
            position += 1 + width
        charge += count * (_MAP_SLOT if is_map else _ARRAY_SLOT)
        if is_map and count:
            charge += _MAP_TABLE
        if not top:
            charge += _CHARGE_MAP if is_map else _CHARGE_ARRAY
        items += count
        if items > MSGPACK_MAX_ITEMS:
            _check_items(data, start, end)  # (raises, with the count where it passes)
    return charge


def _check_items(data: bytes | bytearray | memoryview, start: int, end: int) -> int:
    """The items of the whole object ``data[start:end]`` (found by the skip-mode scan);
    refuse it if it holds more than :data:`MSGPACK_MAX_ITEMS`.

    Its item headers are read in order, the count 1 plus the items each container header
    announces, and it is refused at the first header that passes the cap, with the count
    there (what the walk says of the same bytes).  It stops at the cap: at most that many
    steps (strings, bins and exts are skipped by their length fields).

    Raises:
        PacketTooLarge: it holds too many items.
    """
    sizes = _MSGPACK_SIZE
    items = 1
    position = start
    while position < end:
        byte = data[position]
        size = sizes[byte]
        if size:
            position += size
            continue
        if 0x80 <= byte <= 0x9F:  # fixmap, fixarray
            items += byte & 0x0F if byte >= 0x90 else (byte & 0x0F) * 2
            position += 1
        elif byte in _MSGPACK_SIZED:
            width, extra = _MSGPACK_SIZED[byte]
            length = int.from_bytes(data[position + 1 : position + 1 + width], "big")
            position += 1 + width + extra + length
            continue
        else:  # a container with a count field (the skip refused 0xc1)
            width, per = _MSGPACK_CONTAINERS[byte]
            items += int.from_bytes(data[position + 1 : position + 1 + width], "big") * per
            position += 1 + width
        if items > MSGPACK_MAX_ITEMS:
            raise _too_many_items(items)
    return items


def _too_deep() -> FrameError:
    return FrameError(f"malformed msgpack data: nested deeper than {MSGPACK_MAX_DEPTH} levels")


#: Arrays of one item, nested so that an object inside them deeper than
#: MSGPACK_MAX_DEPTH passes the C decoder's stack (1024 levels).
_DEPTH_PAD = b"\x91" * (1024 - MSGPACK_MAX_DEPTH)


def _check_depth(data: bytes | bytearray | memoryview) -> None:
    """Refuse a whole object nested deeper than :data:`MSGPACK_MAX_DEPTH` levels.

    The skip-mode scan that found it stops only at the decoder's own 1024 levels, so the
    object is skipped once more inside :data:`_DEPTH_PAD`: at C speed, building nothing.

    Raises:
        FrameError: it is nested too deep.
    """
    unpacker = msgpack.Unpacker(max_buffer_size=len(_DEPTH_PAD) + len(data))
    unpacker.feed(_DEPTH_PAD)
    unpacker.feed(data)
    try:
        unpacker.skip()
    except msgpack.exceptions.StackError:
        raise _too_deep() from None


#: Redis's caps, which RespFramer applies too: arguments in one command, bytes of one
#: inline command, and bytes of a ``*``/``$`` header line without its CRLF.
RESP_MAX_ARGUMENTS = 1024 * 1024
RESP_MAX_INLINE = 64 * 1024
RESP_MAX_HEADER = 32


@dataclass(frozen=True, slots=True)
class RespError:
    """An error reply for :func:`encode_resp`: ``-message\\r\\n``.

    ``message`` starts with the error's kind by convention (``"ERR unknown command 'x'"``,
    ``"WRONGTYPE ..."``) and holds no CR or LF.
    """

    message: str


def encode_resp(value: Any) -> bytes:
    """Encode one RESP2 reply, as a Redis server writes it.

    ==========================  ================================================
    ``bytes``-like              a bulk string ``$<length>\\r\\n<bytes>\\r\\n``
    ``str``                     a simple string ``+<text>\\r\\n`` (e.g. ``"OK"``)
    ``int``                     an integer ``:<n>\\r\\n``
    ``None``                    the null bulk string ``$-1\\r\\n``
    ``list`` or ``tuple``       an array of the encoded items ``*<n>\\r\\n...``
    :class:`RespError`          an error ``-<message>\\r\\n``
    ==========================  ================================================

    Raises:
        TypeError: a value of another type (``bool`` included: RESP2 has none).
        ValueError: a simple string or error message holding CR or LF.
    """
    cls = value.__class__
    if cls is bytes:
        return b"$%d\r\n%b\r\n" % (len(value), value)
    if cls is str:
        if "\r" in value or "\n" in value:
            raise ValueError(f"a RESP simple string holds no CR or LF: {value!r}")
        return b"+%b\r\n" % value.encode()
    if cls is int:
        return b":%d\r\n" % value
    if value is None:
        return b"$-1\r\n"
    if cls is list or cls is tuple:
        return b"*%d\r\n" % len(value) + b"".join([encode_resp(item) for item in value])
    if cls is RespError:
        message = value.message
        if "\r" in message or "\n" in message:
            raise ValueError(f"a RESP error message holds no CR or LF: {message!r}")
        return b"-%b\r\n" % message.encode()
    if isinstance(value, (bytearray, memoryview)):
        return encode_resp(bytes(value))
    raise TypeError(f"RESP2 has no encoding for {cls.__name__}")


def _resp_int(segment: bytes | bytearray) -> int | None:
    """A header's integer, as Redis's ``string2ll``: ASCII digits, an optional ``-``."""
    digits = segment[1:] if segment[:1] == b"-" else segment
    if not digits.isdigit() or len(digits) > 19:
        return None
    return int(segment)


class RespFramer(Framer):
    """Redis commands in, RESP2 out: the framing of a Redis server (``packet="resp"``).

    ``feed`` parses the commands a client sends, each one message: a ``list[bytes]`` of
    the command name and its arguments.  Both of Redis's request forms are read:

    - an array of bulk strings, ``*<n>\\r\\n`` then ``n`` times ``$<length>\\r\\n<bytes>\\r\\n``
      (what every client library and ``redis-cli`` send); an empty or null array
      (``*0``, ``*-1``) is skipped, as Redis does;
    - an inline command: one line (CRLF or LF) split on whitespace, for ``nc``/``telnet``
      (no quoting); an empty line is skipped.

    The parse resumes where the last read stopped, so a command split across reads costs
    no re-scan.  ``packet_size`` caps one command's wire size (headers included); a
    ``$`` header that claims more fails at once, before anything is allocated for it.
    Redis's own caps apply too: at most 1,048,576 arguments, 64 KiB per inline command.

    **Protocol errors are delivered, not raised.**  A Redis server answers a malformed
    request with ``-ERR Protocol error: ...`` and then closes the connection; only the
    port's owner can write that answer, so instead of raising (which makes the I/O
    thread close the port at once, as the other framers do) ``feed`` returns the
    commands that came before the fault, then the :exc:`FrameError` itself
    (:exc:`PacketTooLarge` for a size cap) as the last message.  From then on the framer
    holds nothing and ignores every later byte; the owner sends its error reply and
    closes the port.

    ``frame(message)`` sends ``bytes`` as they are - replies already encoded, so that a
    batch of pipelined replies joined together goes out in one send - and encodes any
    other value with :func:`encode_resp` (``"OK"`` → ``+OK``, an ``int``, ``None``, a
    list, a :class:`RespError`).  Outgoing bytes are not capped by ``packet_size``: the
    port's watermarks and ``port_buffer_limit`` bound them.
    """

    __slots__ = ("_arguments", "_buffer", "_bulk", "_count", "_failed", "_held", "_limit")

    mode = "resp"
    decodes_objects = True

    def __init__(self, packet_size: int = DEFAULT_PACKET_SIZE) -> None:
        self._limit = packet_size
        self._buffer = bytearray()
        self._failed = False
        self._reset()

    def _reset(self) -> None:
        self._arguments: list[bytes] = []
        self._count = -1  # arguments of the array being read; -1 between commands
        self._bulk = -1  # length of the bulk string being read; -1 while reading its header
        self._held = 0  # wire bytes of the current command already parsed (and consumed)

    @property
    def buffered(self) -> int:
        return self._held + len(self._buffer)

    def object_charges(self, messages: list[object]) -> list[int] | None:
        charge = RESP_ARGUMENT_CHARGE
        return [len(m) * charge if m.__class__ is list else 0 for m in messages]

    def _fail(self, error: FrameError) -> FrameError:
        self._failed = True
        del self._buffer[:]
        self._reset()
        return error

    def feed(self, data: bytes | bytearray | memoryview) -> list[object]:
        if self._failed:
            return []
        buffer = self._buffer
        buffer += data
        commands: list[object] = []
        limit = self._limit
        find = buffer.find
        end = len(buffer)
        position = 0
        # The parse state lives in locals on the hot path; it is saved on every way out.
        arguments = self._arguments
        count = self._count
        bulk = self._bulk
        held = self._held
        try:
            while position < end:
                if count < 0:
                    # Between commands: an array header, or an inline command.
                    if buffer[position] != 42:  # not b"*": an inline command
                        newline = find(b"\n", position)
                        cap = min(limit, RESP_MAX_INLINE)
                        size = (end if newline < 0 else newline + 1) - position
                        if size > cap:
                            commands.append(self._fail(PacketTooLarge(cap, size, "inline command")))
                            return commands
                        if newline < 0:
                            break
                        words = buffer[position:newline].split()
                        position = newline + 1
                        if words:
                            commands.append([bytes(word) for word in words])
                        continue
                    newline = find(b"\r\n", position)
                    if newline < 0:
                        if end - position > RESP_MAX_HEADER:
                            commands.append(self._fail(FrameError("invalid multibulk length")))
                            return commands
                        break
                    digits = buffer[position + 1 : newline]
                    if digits.isdigit() and len(digits) < 8:
                        count = int(digits)
                    else:
                        claimed = _resp_int(digits)
                        if claimed is None or claimed > RESP_MAX_ARGUMENTS:
                            commands.append(self._fail(FrameError("invalid multibulk length")))
                            return commands
                        count = claimed
                    held = newline + 2 - position
                    position = newline + 2
                    if count <= 0:
                        count = -1
                        continue  # *0 and *-1: nothing to run, as Redis
                    if count > RESP_MAX_ARGUMENTS:
                        commands.append(self._fail(FrameError("invalid multibulk length")))
                        return commands
                    # Each argument takes at least 6 bytes ("$0\r\n\r\n").
                    if held + 6 * count > limit:
                        error = PacketTooLarge(limit, held + 6 * count, "command")
                        commands.append(self._fail(error))
                        return commands
                    arguments = []
                    bulk = -1
                # Inside an array: its bulk strings.
                while len(arguments) < count:
                    if bulk < 0:
                        if position >= end:
                            break
                        if buffer[position] != 36:  # b"$"
                            got = chr(buffer[position])
                            commands.append(self._fail(FrameError(f"expected '$', got '{got}'")))
                            return commands
                        newline = find(b"\r\n", position)
                        if newline < 0:
                            if end - position > RESP_MAX_HEADER:
                                commands.append(self._fail(FrameError("invalid bulk length")))
                                return commands
                            break
                        digits = buffer[position + 1 : newline]
                        if digits.isdigit() and len(digits) < 19:
                            bulk = int(digits)
                        else:
                            commands.append(self._fail(FrameError("invalid bulk length")))
                            return commands
                        held += newline + 2 - position
                        if held + bulk + 2 > limit:
                            error = PacketTooLarge(limit, held + bulk + 2, "command")
                            commands.append(self._fail(error))
                            return commands
                        position = newline + 2
                    after = position + bulk
                    if end - after < 2:
                        break
                    if buffer[after] != 13 or buffer[after + 1] != 10:
                        commands.append(self._fail(FrameError("bulk string not ended by CRLF")))
                        return commands
                    arguments.append(bytes(buffer[position:after]))
                    held += bulk + 2
                    position = after + 2
                    bulk = -1
                if len(arguments) < count:
                    break
                commands.append(arguments)
                arguments = []
                count = -1
                held = 0
            if position:
                del buffer[:position]
                position = 0
            return commands
        finally:
            if not self._failed:
                self._arguments = arguments
                self._count = count
                self._bulk = bulk
                self._held = held

    def frame(self, message: object) -> bytes:
        if message.__class__ is bytes:
            return bytes(message)
        if isinstance(message, (bytearray, memoryview)):
            return bytes(message)
        return encode_resp(message)


def _as_bytes(message: object) -> bytes:
    if isinstance(message, bytes):
        return message
    if isinstance(message, (bytearray, memoryview)):
        return bytes(message)
    raise TypeError(f"this packet mode sends bytes-like data, not {type(message).__name__}")


def make_framer(
    packet: object = "raw", *, packet_size: object = DEFAULT_PACKET_SIZE, delimiter: object = b"\n"
) -> Framer:
    """The framer for a packet mode: ``"raw"``, ``1``, ``2``, ``4``, ``"line"``, ``"msgpack"``,
    ``"resp"``.

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
    if packet == "resp":
        return RespFramer(packet_size)
    raise OptionError(f"packet must be 'raw', 1, 2, 4, 'line', 'msgpack' or 'resp', not {packet!r}")


def port_framer(options: Mapping[str, object]) -> Framer | None:
    """The framer the I/O thread runs for a stream port with these options (as
    :func:`~._options.port_options` validated them), or ``None`` for ``packet="raw"``:
    then each read is delivered as it comes, without a framer (the hot path), and a
    message is charged its ``len()``.  The local port and the daemon's remote port state
    both make theirs here."""
    packet = options.get("packet", "raw")
    if packet in ("raw", 0):
        return None
    return make_framer(packet, packet_size=options["packet_size"], delimiter=options["delimiter"])
