"""The native framers (``native/src/framing.rs``) against the Python ones (``_framing.py``).

The same random streams, cut at the same random points, are fed to both: each read must
complete the same packets (a msgpack object: the same decoded value; a RESP command: the
same arguments), raise the same error (its class and text), leave the same bytes held
(``buffered``, which the memory budget charges) and charge each packet the same, as the
Python I/O thread computes it.  Sends: the same bytes or the same error for a payload.
"""

from __future__ import annotations

import itertools
import tracemalloc
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ioserver import _framing
from ioserver._exceptions import FrameError, OptionError, PacketTooLarge
from ioserver._framing import (
    MSGPACK_CHARGES,
    MSGPACK_MAX_DEPTH,
    MSGPACK_MAX_ITEMS,
    PACKET_OVERHEAD,
    RESP_ARGUMENT_CHARGE,
    make_framer,
)
from ioserver._native import _Framer, _msgpack_charges

# No I/O core of $IOSERVER_CORE's choice (the framers alone): CI's second pass, on the
# Python core, leaves these tests out (tests/conftest.py checks the mark).
pytestmark = pytest.mark.core_independent

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _decode(packet: bytes) -> Any:
    """What the drain does with a msgpack packet: the Python framer's decoding."""
    return msgpack.unpackb(packet, raw=False, strict_map_key=False)


def _decodes(packet: bytes) -> bool:
    try:
        _decode(packet)
    except (ValueError, TypeError):
        return False
    return True


def _same_error(expected: BaseException, got: BaseException) -> None:
    assert type(got) is type(expected), (got, expected)
    assert str(got) == str(expected)
    if isinstance(expected, PacketTooLarge):
        assert isinstance(got, PacketTooLarge)
        assert (got.limit, got.size) == (expected.limit, expected.size)


def _expected_charges(
    python: Any, packet: Any, messages: list[Any], consumed: int, overhead: int
) -> list[int]:
    """The charges ``IOThread._deliver_framed`` gives a read's messages (a raw port has no
    framer there: each read is charged its length, and no overhead)."""
    if not messages:
        return []
    if packet in ("raw", 0):
        return [len(message) for message in messages]
    if not python.decodes_objects:
        return [len(message) + overhead for message in messages]
    share, extra = divmod(consumed, len(messages))
    shares = [share + overhead] * len(messages)
    shares[-1] += extra
    more = python.object_charges(messages) if overhead else None
    if more is not None:
        # What the decoded objects hold beyond that (MSGPACK_CHARGES by kind of item).
        shares = [share + m for share, m in zip(shares, more, strict=True)]
    return shares


def differential(
    packet: Any, packet_size: int, stream: bytes, cuts: list[int], delimiter: bytes = b"\n"
) -> None:
    """Feed ``stream`` cut at ``cuts`` to both framers; assert they agree read by read."""
    python = make_framer(packet, packet_size=packet_size, delimiter=delimiter)
    native = _Framer(packet, packet_size, delimiter)
    assert native.decodes_objects == python.decodes_objects
    points = [0, *sorted(cuts), len(stream)]
    for first, last in itertools.pairwise(points):
        chunk = stream[first:last]
        before = python.buffered
        assert native.buffered == before
        expected_error: FrameError | None = None
        got_error: FrameError | None = None
        expected: list[Any] = []
        got: list[Any] = []
        charges: list[int] = []
        try:
            expected = python.feed(chunk)
        except FrameError as exc:
            expected_error = exc
        try:
            got, charges = native.feed_charged(chunk, PACKET_OVERHEAD)
        except FrameError as exc:
            got_error = exc
        if got_error is not None:
            assert expected_error is not None, (got_error, expected)
            _same_error(expected_error, got_error)
            assert native.buffered == python.buffered == 0
            return  # the I/O thread closes the port
        if expected_error is not None:
            # Only what the decoder finds is left to the Python side: some packet of
            # this read does not decode (the drain reports it as the framer did).
            assert packet == "msgpack", (expected_error, got)
            assert not isinstance(expected_error, PacketTooLarge)
            assert not all(_decodes(item) for item in got), (expected_error, got)
            return
        assert native.buffered == python.buffered
        if packet == "msgpack":
            assert [_decode(item) for item in got] == expected
        elif packet == "resp" and expected and isinstance(expected[-1], FrameError):
            assert got and isinstance(got[-1], FrameError)
            _same_error(expected[-1], got[-1])
            assert got[:-1] == expected[:-1]
        else:
            assert got == expected
        consumed = len(chunk) + before - python.buffered
        assert charges == _expected_charges(python, packet, expected, consumed, PACKET_OVERHEAD)


def _cut_points(data: st.DataObject, stream: bytes) -> list[int]:
    return data.draw(st.lists(st.integers(0, len(stream)), max_size=10))


# -- length prefixes -------------------------------------------------------------------------


@st.composite
def _length_stream(draw: st.DrawFn, header: int) -> bytes:
    def packet(body: bytes) -> bytes:
        return len(body).to_bytes(header, "big") + body

    pieces = st.one_of(
        st.binary(max_size=40).filter(lambda b: len(b) < 1 << (8 * header)).map(packet),
        st.integers(0, (1 << (8 * header)) - 1).map(lambda n: n.to_bytes(header, "big")),
        st.binary(max_size=6),
    )
    return b"".join(draw(st.lists(pieces, max_size=12)))


@pytest.mark.parametrize("header", [1, 2, 4])
@SETTINGS
@given(data=st.data(), packet_size=st.integers(1, 64))
def test_length_prefixes_frame_as_python_s(
    header: int, data: st.DataObject, packet_size: int
) -> None:
    stream = data.draw(_length_stream(header))
    differential(header, packet_size, stream, _cut_points(data, stream))


# -- lines ---------------------------------------------------------------------------------


@SETTINGS
@given(
    data=st.data(),
    delimiter=st.sampled_from([b"\n", b"\0", b"x"]),
    packet_size=st.integers(1, 40),
)
def test_lines_frame_as_python_s(data: st.DataObject, delimiter: bytes, packet_size: int) -> None:
    pieces = st.one_of(st.binary(max_size=20), st.just(delimiter))
    stream = b"".join(data.draw(st.lists(pieces, max_size=15)))
    differential("line", packet_size, stream, _cut_points(data, stream), delimiter)


@SETTINGS
@given(data=st.data())
def test_raw_reads_are_packets_as_python_s(data: st.DataObject) -> None:
    stream = data.draw(st.binary(max_size=100))
    differential("raw", 10, stream, _cut_points(data, stream))


# -- RESP ----------------------------------------------------------------------------------


def _array(arguments: list[bytes]) -> bytes:
    return b"*%d\r\n" % len(arguments) + b"".join(
        b"$%d\r\n%b\r\n" % (len(argument), argument) for argument in arguments
    )


_RESP_FAULTS = [
    b"*0\r\n",
    b"*-1\r\n",
    b"*-0\r\n",
    b"*abc\r\n",
    b"*+1\r\n",
    b"*" + b"1" * 40,
    b"*99999999\r\n",
    b"*1048577\r\n",
    b"*1048576\r\n",
    b"*00000000000000000001\r\n",
    b"*1\r\n$-1\r\n",
    b"*1\r\n$3\r\nabcX\r\n",
    b"*1\r\n$999\r\n",
    b"*2\r\n:1\r\n",
    b"*1\r\n$" + b"9" * 40,
    b"*1\r\n$0000000000000000001\r\nx\r\n",
    b"$3\r\nabc\r\n",
    b"\r\n",
    b" \t\x0b\x0c\r\n",
    b"\xff\xfe\n",
]


@st.composite
def _resp_stream(draw: st.DrawFn) -> bytes:
    arguments = st.lists(st.binary(max_size=10), min_size=1, max_size=4)
    inline = st.lists(
        st.binary(min_size=1, max_size=6).filter(lambda w: b"\n" not in w and b"*" not in w[:1]),
        max_size=4,
    ).map(lambda words: b" \t".join(words))
    pieces = st.one_of(
        arguments.map(_array),
        st.tuples(inline, st.sampled_from([b"\r\n", b"\n"])).map(b"".join),
        st.sampled_from(_RESP_FAULTS),
        st.binary(max_size=8),
    )
    return b"".join(draw(st.lists(pieces, max_size=10)))


@SETTINGS
@given(data=st.data(), packet_size=st.sampled_from([1, 6, 12, 30, 100, 1 << 20]))
def test_resp_commands_frame_as_python_s(data: st.DataObject, packet_size: int) -> None:
    stream = data.draw(_resp_stream())
    differential("resp", packet_size, stream, _cut_points(data, stream))


@pytest.mark.parametrize(
    "stream",
    [
        b"x" * (64 * 1024) + b"\n",  # one byte past the inline cap (the newline counts)
        b"x" * (64 * 1024 - 1) + b"\n",  # exactly at it
        b"y" * (64 * 1024 + 10),  # no newline yet, past it
    ],
)
def test_resp_inline_cap_as_python_s(stream: bytes) -> None:
    differential("resp", 1 << 20, stream, [len(stream) // 2])
    differential("resp", 1 << 20, stream, [])


# -- msgpack -------------------------------------------------------------------------------

_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=False),
    st.text(max_size=40),
    st.binary(max_size=300),
    st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=20)),
)
_VALUES = st.recursive(
    _SCALARS,
    lambda children: st.one_of(
        st.lists(children, max_size=20),
        st.dictionaries(
            st.one_of(st.text(max_size=5), st.integers(-1000, 1000)), children, max_size=5
        ),
    ),
    max_leaves=30,
)
_MSGPACK_FAULTS = [
    b"\xc1",
    b"\x92\x01\xc1",
    b"\xdb\xff\xff\xff\xff",
    b"\xdd\x00\x01\x00\x00",
    b"\xdf\x00\x00\x80\x00",
    b"\xc7\xff\x01",
    b"\xa1\xff",  # a str that is not UTF-8: only the decoder refuses it
    b"\x81\x91\x01\x02",  # a map keyed by a list: unhashable
    b"\xd6\xff\x00\x00\x00\x01",  # a timestamp: decodes
    b"\xc7\x03\xff\x00\x00\x00",  # a timestamp of a wrong length: only the decoder refuses it
    b"\xdd\x00\x10\x00\x00",  # MSGPACK_MAX_ITEMS elements: one item too many
    b"\x92\xdf\x00\x07\xff\xff",  # 2^19 - 1 pairs, in an array with one more item
]


def _nested(depth: int, innermost: bytes) -> bytes:
    return b"\x91" * depth + innermost


_DEEP = st.builds(
    _nested,
    st.sampled_from([1, 2, 510, 511, 512, 513, 600, 1022, 1023, 1024, 1025, 1100]),
    st.sampled_from([b"\x01", b"\x90", b"\x80", b"\x91\xc1", b"\xdc\x00\x00", b""]),
)


@st.composite
def _msgpack_stream(draw: st.DrawFn) -> bytes:
    pieces = st.one_of(
        _VALUES.map(lambda value: msgpack.packb(value, use_bin_type=True)),
        st.sampled_from(_MSGPACK_FAULTS),
        _DEEP,
        st.binary(max_size=6),
    )
    return b"".join(draw(st.lists(pieces, max_size=6)))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    packet_size=st.sampled_from([1, 8, 64, 300, 600, 1100, 2000, 1 << 20, 2 << 20]),
)
def test_msgpack_boundaries_as_python_s(data: st.DataObject, packet_size: int) -> None:
    stream = data.draw(_msgpack_stream())
    differential("msgpack", packet_size, stream, _cut_points(data, stream))


@pytest.mark.parametrize("cut", [None, 1, 2, 3, 4, 100])
@pytest.mark.parametrize(
    "stream",
    [
        # A whole array of 2-byte items, too large: Python names its whole size when it
        # arrives in one read, the count's reach when the header came first.
        b"\xdc\x00\x64" + b"\xcc\x80" * 100,
        # Too deep and too large in one read: which is reported depends on the cut.
        _nested(MSGPACK_MAX_DEPTH + 1, b"\x01") + b"\xc4\xff" + b"x" * 255,
        _nested(MSGPACK_MAX_DEPTH, b"\x90"),  # an empty array at level 513
        _nested(MSGPACK_MAX_DEPTH, b"\x01"),  # exactly at the limit
        b"\x01\x02" + _nested(1030, b"\x01"),
        b"\x92\x01" + b"\xc1",
    ],
)
@pytest.mark.parametrize("packet_size", [150, 600, 1 << 20])
def test_msgpack_errors_depend_on_cuts_as_python_s(
    stream: bytes, cut: int | None, packet_size: int
) -> None:
    differential("msgpack", packet_size, stream, [] if cut is None else [cut])


def test_every_cut_of_a_msgpack_stream_as_python_s() -> None:
    """Split at every byte: one object after another, fed one byte at a time too."""
    values = [[1, {"a": b"x" * 300}], "é" * 40, 2**64 - 1, {"k": [[[]]]}, None, 1.5]
    stream = b"".join(msgpack.packb(value, use_bin_type=True) for value in values)
    for cut in range(len(stream) + 1):
        differential("msgpack", 1 << 20, stream, [cut])
    differential("msgpack", 1 << 20, stream, list(range(len(stream))))


def _array32(count: int) -> bytes:
    return b"\xdd" + count.to_bytes(4, "big")


def _per_object(inner: int) -> bytes:
    """Arrays of ``inner`` nils, as many as pass MSGPACK_MAX_ITEMS in all: each small."""
    outer = MSGPACK_MAX_ITEMS // inner
    inner_array = b"\xdc" + inner.to_bytes(2, "big") + b"\xc0" * inner
    return b"\xdc" + outer.to_bytes(2, "big") + inner_array * outer


_ITEMS = MSGPACK_MAX_ITEMS


@pytest.mark.parametrize(
    "cuts",
    [[], [3], [300_000, 700_000], list(range(65536, 4 << 20, 65536))],
    ids=["whole", "in-header", "two", "reads"],
)
@pytest.mark.parametrize(
    "stream",
    [
        _array32(_ITEMS - 1) + b"\xc0" * (_ITEMS - 1),  # exactly at the cap
        _array32(_ITEMS) + b"\xc0" * _ITEMS,  # one past, announced by the header
        _array32(_ITEMS),  # the header alone
        b"\xdf" + (_ITEMS // 2).to_bytes(4, "big"),  # a map's count is doubled
        b"\x91\xdf" + (_ITEMS // 2 - 1).to_bytes(4, "big") + b"\x01\x02" * (_ITEMS // 2 - 1),
        # The cap reached, then passed by a fixarray's header.
        b"\x92" + _array32(_ITEMS - 3) + b"\xc0" * (_ITEMS - 3) + b"\x91\xc0",
        _per_object(256),  # every container small, the object too large
        _per_object(255),
        # Bytes between the headers: strings, bins, exts are skipped by their lengths.
        b"\xdc\x10\x00" + (b"\xdc\x01\x00" + b"\xa1x\xc4\x00\xd4\x01\x02" * 128) * 4096,
        b"\x01" * 3 + _array32(_ITEMS - 1) + b"\xc0" * (_ITEMS - 1) + b"\x01",  # after others
    ],
    ids=[
        "at-cap",
        "past-header",
        "header-only",
        "map-doubled",
        "map-at-cap",
        "fixarray-past",
        "per-object-256",
        "per-object-255",
        "scalars-between",
        "among-others",
    ],
)
def test_msgpack_item_cap_as_python_s(stream: bytes, cuts: list[int]) -> None:
    """MSGPACK_MAX_ITEMS: the same objects framed, the same PacketTooLarge (its count, at
    the same read), whole in one read (the C skip, then the count) or walked in pieces."""
    differential("msgpack", 64 << 20, stream, [cut for cut in cuts if cut < len(stream)])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_each_msgpack_packet_is_exactly_one_object_to_the_decoder(data: st.DataObject) -> None:
    """The Rust framer's object boundaries are msgpack's own: each packet it cuts from a
    random stream (cut at random reads) is exactly one object to the drain's decoder - it
    decodes and consumes the whole packet, or the decoder refuses it (a ``ValueError``, a
    ``TypeError``: the port fails) - never an unfinished object, never one with bytes
    left over (which the drain now refuses too: ``Inbox``'s ``ReusedDecoder``)."""
    stream = data.draw(_msgpack_stream())
    native = _Framer("msgpack", 1 << 20, b"\n")
    points = [0, *sorted(_cut_points(data, stream)), len(stream)]
    for first, last in itertools.pairwise(points):
        try:
            packets = native.feed(stream[first:last])
        except FrameError:
            return  # the port is closed
        for packet in packets:
            decoder = msgpack.Unpacker(
                raw=False, strict_map_key=False, max_buffer_size=max(len(packet), 1)
            )
            decoder.feed(packet)
            try:
                decoder.unpack()
            except (ValueError, TypeError):
                continue  # refused: the port fails
            assert decoder.tell() == len(packet), packet


def _charge(value: Any, top: bool = True) -> int:
    """A decoded msgpack value's charge (MSGPACK_CHARGES), from the value as ``packb``
    encodes it (the smallest encoding): each item its own object and its slot, the object
    itself its variable part only.  Computed here from the values, apart from the
    framers' wire scanners."""
    charges = MSGPACK_CHARGES
    own = 0
    variable = 0
    if isinstance(value, list):
        own = charges["array"]
        variable = len(value) * charges["array slot"]
        variable += sum(_charge(item, top=False) for item in value)
    elif isinstance(value, dict):
        own = charges["map"]
        variable = 2 * len(value) * charges["map slot"] + (charges["map table"] if value else 0)
        variable += sum(_charge(k, top=False) + _charge(v, top=False) for k, v in value.items())
    elif isinstance(value, bool) or value is None:
        pass
    elif isinstance(value, int):
        own = 0 if 0 <= value <= 255 else charges["int"]  # fixint, uint 8: shared
    elif isinstance(value, float):
        own = charges["float"]
    elif isinstance(value, str):
        wire = len(value.encode())
        if wire > 1:
            own = charges["str"]
            widest = max(map(ord, value))
            width = 4 if widest > 0xFFFF else 2 if widest > 0xFF else 1
            variable = max(0, width * len(value) - wire)
    elif isinstance(value, bytes):
        own = charges["bin"] if len(value) > 1 else 0
    else:  # an ExtType, a Timestamp
        own = charges["ext"]
    return variable if top else own + variable


_WIDE_TEXT = st.text(alphabet=st.sampled_from("a\xe9\u0100\u20ac\U0001f600"), max_size=40)
_CHARGED = st.recursive(
    st.one_of(_SCALARS, _WIDE_TEXT, st.builds(msgpack.Timestamp, st.integers(0, 2**34))),
    lambda children: st.one_of(
        st.lists(children, max_size=20),
        st.dictionaries(st.one_of(_WIDE_TEXT, st.integers(-1000, 1000)), children, max_size=7),
    ),
    max_leaves=30,
)


@SETTINGS
@given(values=st.lists(_CHARGED, min_size=1, max_size=4), data=st.data())
def test_a_msgpack_object_is_charged_for_each_of_its_items_by_kind(
    values: list[Any], data: st.DataObject
) -> None:
    """Each decoded object is charged what its items hold by kind (MSGPACK_CHARGES: each
    item its own object and its slot, a wide str its characters; what decoding builds
    beyond its wire bytes and PACKET_OVERHEAD), by the framer that found its bounds (the
    C skip, or the walk for an object split across reads), the same on both framers and
    as computed from the values.  Before, every item was charged a flat 112 bytes (an
    array of 75k small ints, ~0.6 MB decoded, was charged 8.4 MB)."""
    stream = b"".join(msgpack.packb(value, use_bin_type=True) for value in values)
    python = make_framer("msgpack")
    native = _Framer("msgpack", 64 << 20, b"\n")
    expected = [_charge(value) for value in values]
    got: list[int] = []
    native_got: list[int] = []
    points = [0, *sorted(_cut_points(data, stream)), len(stream)]
    for first, last in itertools.pairwise(points):
        before = python.buffered
        chunk = stream[first:last]
        messages = python.feed(chunk)
        more = python.object_charges(messages)
        assert more is not None and len(more) == len(messages)
        got += more
        objects, charges = native.feed_charged(chunk, PACKET_OVERHEAD)
        assert len(objects) == len(messages)
        if messages:
            consumed = len(chunk) + before - python.buffered
            share, extra = divmod(consumed, len(messages))
            bare = [share + PACKET_OVERHEAD] * len(messages)
            bare[-1] += extra
            native_got += [charge - b for charge, b in zip(charges, bare, strict=True)]
    assert got == expected
    assert native_got == expected


def _decoded_size(packet: bytes) -> int:
    """Bytes of Python objects one msgpack packet decodes to (``tracemalloc``), its str
    map keys already interned (a first decoding is kept alive meanwhile: the interned
    strings' table is the process's, and its growth is shared by every interned str)."""
    kept = msgpack.unpackb(packet, raw=False, strict_map_key=False)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        decoded = msgpack.unpackb(packet, raw=False, strict_map_key=False)
        size = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    del decoded, kept
    return size


@SETTINGS
@given(value=_CHARGED)
def test_a_msgpack_object_is_charged_at_least_what_it_decodes_to(value: Any) -> None:
    """The charge is an upper bound: what ``msgpack.unpackb`` allocates for an object
    (``tracemalloc``) is at most its wire bytes, PACKET_OVERHEAD and its items' charge by
    kind - a wide str's characters, a map's table and a list's slots included."""
    packet = msgpack.packb(value, use_bin_type=True)
    [charge] = _msgpack_charges(packet, 0, len(packet))
    assert _decoded_size(packet) <= len(packet) + PACKET_OVERHEAD + charge


@pytest.mark.parametrize(
    ("value", "flat"),
    [
        ([1] * 75_000, 75_000 * 112),
        ([0.5] * 20_000, 20_000 * 112),
        (["\U0001f600" * 1000] * 10, 10 * 112),
        (["\U0001f600" + "a" * 1000] * 10, 10 * 112),
    ],
    ids=["small-ints", "floats", "astral-strs", "astral-and-ascii-strs"],
)
def test_the_charge_by_kind_is_honest_where_the_flat_one_was_not(value: Any, flat: int) -> None:
    """Charged by kind, an array of 75,000 small ints (~0.6 MB decoded) is charged ~0.6
    MB, not the 8.4 MB the flat 112 bytes an item charged (which would stall it under an
    8 MiB ``memory_limit`` once an unfinished object is charged as it arrives); and a str
    of astral characters (4 bytes each decoded, and as many on the wire) is charged what
    it holds; one astral character among 1,000 ASCII ones makes CPython keep 4 bytes a
    character (~4 KB for 1 KB on the wire): charged that now, where the flat charge
    (11 KB for ten such strs, 41 KB held) was not even an upper bound."""
    packet = msgpack.packb(value, use_bin_type=True)
    [charge] = _msgpack_charges(packet, 0, len(packet))
    held = _decoded_size(packet)
    total = len(packet) + PACKET_OVERHEAD + charge
    assert held <= total <= 2 * held + 4096, (held, total, len(packet) + flat)


def test_a_resp_command_is_charged_for_each_argument() -> None:
    python = make_framer("resp")
    stream = b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$2\r\nvv\r\nPING a bc\r\n"
    messages = python.feed(stream)
    assert messages == [[b"SET", b"k", b"vv"], [b"PING", b"a", b"bc"]]
    more = [3 * RESP_ARGUMENT_CHARGE, 3 * RESP_ARGUMENT_CHARGE]
    assert python.object_charges(messages) == more
    share, extra = divmod(len(stream), 2)
    _, charges = _Framer("resp", 1 << 20, b"\n").feed_charged(stream, PACKET_OVERHEAD)
    assert charges == [share + PACKET_OVERHEAD + more[0], share + extra + PACKET_OVERHEAD + more[1]]


# -- sends ---------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    packet=st.sampled_from([1, 2, 4, "line", "raw"]),
    payload=st.binary(max_size=300),
    packet_size=st.integers(1, 400),
    delimiter=st.sampled_from([b"\n", b"x"]),
)
def test_frame_as_python_s(packet: Any, payload: bytes, packet_size: int, delimiter: bytes) -> None:
    python = make_framer(packet, packet_size=packet_size, delimiter=delimiter)
    native = _Framer(packet, packet_size, delimiter)
    try:
        expected = python.frame(payload)
    except FrameError as exc:
        with pytest.raises(FrameError) as info:
            native.frame(payload)
        _same_error(exc, info.value)
    else:
        assert native.frame(payload) == expected


def test_frame_msgpack_and_resp_checks_as_python_s() -> None:
    packed = msgpack.packb(list(range(100)))
    assert _Framer("msgpack", len(packed)).frame(packed) == packed
    with pytest.raises(PacketTooLarge) as info:
        _Framer("msgpack", len(packed) - 1).frame(packed)
    with pytest.raises(PacketTooLarge) as expected:
        make_framer("msgpack", packet_size=len(packed) - 1).frame(list(range(100)))
    _same_error(expected.value, info.value)
    assert _Framer("resp", 1).frame(b"+OK\r\n" * 10) == b"+OK\r\n" * 10


def test_length_header_limits_as_python_s() -> None:
    """The header's own range caps ``packet_size``: 255 for one byte, 65,535 for two."""
    for header, top in [(1, 255), (2, 65535)]:
        differential(header, 1 << 20, top.to_bytes(header, "big") + b"x" * top, [])
        native = _Framer(header, 1 << 20)
        assert len(native.frame(b"x" * top)) == top + header
        with pytest.raises(PacketTooLarge, match=f"packet_size={top}"):
            native.frame(b"x" * (top + 1))


def test_wants_says_what_the_packet_under_way_needs() -> None:
    framer = _Framer(4, 100)
    assert framer.wants() == 4
    framer.feed(b"\x00\x00")
    assert framer.wants() == 2
    framer.feed(b"\x00\x0a" + b"abc")
    assert framer.wants() == 7
    assert framer.feed(b"x" * 7) == [b"abcxxxxxxx"]
    assert framer.wants() == 4
    resp = _Framer("resp", 100)
    assert resp.wants() is None
    resp.feed(b"*1\r\n$5\r\nab")
    assert resp.wants() == 5  # three bytes and the CRLF
    assert _Framer("line").wants() is None


@pytest.mark.parametrize(
    ("packet", "packet_size", "delimiter"),
    [("bogus", 10, b"\n"), ("line", 10, b"ab"), (3, 10, b"\n"), (2, 0, b"\n")],
)
def test_bad_options_are_option_errors(packet: Any, packet_size: int, delimiter: bytes) -> None:
    with pytest.raises(OptionError):
        _Framer(packet, packet_size, delimiter)


@SETTINGS
@given(values=st.lists(_CHARGED, min_size=1, max_size=8))
def test_the_native_charges_are_the_python_loops(values: list[Any]) -> None:
    """The Python framer's charges (``_object_charges``: the native scanner,
    ``_native._msgpack_charges``, over a read's whole objects) are its Python loop's
    (``_charge``, the fallback) and the decoded values', for bytes and for a view of a
    buffer (what the I/O thread feeds)."""
    packets = [msgpack.packb(value, use_bin_type=True) for value in values]
    stream = b"".join(packets)
    ends = list(itertools.accumulate(len(packet) for packet in packets))
    bounds = list(zip([0, *ends[:-1]], ends, strict=True))
    expected = [_charge(value) for value in values]
    assert [_framing._charge(stream, first, last) for first, last in bounds] == expected
    assert _msgpack_charges(stream, 0, len(stream)) == expected
    with memoryview(bytearray(b"\x01" + stream + b"\x92")) as view:  # (unfinished after)
        assert _msgpack_charges(view, 1, 1 + len(stream)) == expected
        assert _framing._object_charges(view, [(1 + a, 1 + b) for a, b in bounds]) == expected


@pytest.mark.parametrize(
    "stream",
    [
        _array32(_ITEMS - 1) + b"\xc0" * (_ITEMS - 1),  # exactly at the cap
        _array32(_ITEMS) + b"\xc0" * _ITEMS,  # one past
        b"\x91\xdf" + (_ITEMS // 2 - 1).to_bytes(4, "big") + b"\x01\x02" * (_ITEMS // 2 - 1),
        b"\x92" + _array32(_ITEMS - 3) + b"\xc0" * (_ITEMS - 3) + b"\x91\xc0",
        _per_object(256),
        b"\x01" * 3 + _array32(_ITEMS - 1) + b"\xc0" * (_ITEMS - 1) + b"\x01",
    ],
    ids=["at-cap", "past", "map-at-cap", "fixarray-past", "per-object-256", "among-others"],
)
def test_the_native_item_count_refuses_as_the_python_loop(stream: bytes) -> None:
    """Past MSGPACK_MAX_ITEMS, the native scanner raises the Python loop's PacketTooLarge
    (the count at the first header past the cap); below it, the same charges."""
    bounds: list[tuple[int, int]] = []
    skipper = msgpack.Unpacker(max_buffer_size=len(stream))
    skipper.feed(stream)
    start = 0
    while start < len(stream):
        skipper.skip()
        bounds.append((start, skipper.tell()))
        start = skipper.tell()
    try:
        expected: Any = [_framing._charge(stream, first, last) for first, last in bounds]
    except PacketTooLarge as exc:
        expected = exc
    try:
        got: Any = _msgpack_charges(stream, 0, len(stream))
    except PacketTooLarge as exc:
        got = exc
    if isinstance(expected, PacketTooLarge):
        _same_error(expected, got)
    else:
        assert got == expected


def test_the_python_framer_counts_items_without_its_python_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The Python framer counts each object's items for its charge with the native
    scanner, one call a read: its Python loop (``_check_items``) is not run.  Before, it
    ran on every object, and the Python core's framer was 2-3.5 times slower (64 small
    objects a read: 20 us -> 71 us; a 60 KB array of 20k ints: 464 us -> 1545 us)."""
    calls: list[object] = []
    original = _framing._charge

    def counted(*args: Any) -> int:
        calls.append(args)
        return original(*args)

    monkeypatch.setattr(_framing, "_charge", counted)
    monkeypatch.setattr(_framing, "_check_items", counted)
    framer = make_framer("msgpack")
    small = msgpack.packb([1, "abc", {"a": 1}])
    messages = framer.feed(memoryview(bytearray(small * 63 + small[:4])))
    assert len(messages) == 63
    messages += framer.feed(small[4:] + msgpack.packb(list(range(20000))))
    expected = [_charge([1, "abc", {"a": 1}]), _charge(list(range(20000)))]
    assert framer.object_charges(messages[-2:]) == expected
    assert calls == []
