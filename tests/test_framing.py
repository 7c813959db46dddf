"""The framers, as sans-I/O objects: unit tests and properties over any split of a stream."""

from __future__ import annotations

import tracemalloc
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ioserver._exceptions import OptionError
from ioserver._framing import (
    FrameError,
    LengthPrefixFramer,
    MsgpackFramer,
    PacketTooLarge,
    make_framer,
)

# No I/O core of $IOSERVER_CORE's choice (the framers alone): CI's second pass, on the
# Python core, leaves these tests out (tests/conftest.py checks the mark).
pytestmark = pytest.mark.core_independent

BYTES_MODES = [1, 2, 4, "line"]


def split_feed(mode: Any, stream: bytes, cuts: list[int], **options: Any) -> list[Any]:
    framer = make_framer(mode, **options)
    messages: list[Any] = []
    start = 0
    for cut in [*sorted(set(cuts)), len(stream)]:
        messages.extend(framer.feed(stream[start:cut]))
        start = cut
    assert framer.buffered == 0
    return messages


def lines_strategy() -> st.SearchStrategy[list[bytes]]:
    return st.lists(
        st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"") + b"\n"), max_size=20
    )


@settings(max_examples=200, deadline=None)
@given(
    mode=st.sampled_from([1, 2, 4]),
    messages=st.lists(st.binary(max_size=300), max_size=20),
    cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=30),
)
def test_length_prefix_any_split_yields_the_same_messages(
    mode: int, messages: list[bytes], cuts: list[int]
) -> None:
    messages = [m[: (1 << (8 * mode)) - 1] for m in messages]
    framer = make_framer(mode)
    stream = b"".join(framer.frame(m) for m in messages)
    cuts = [c % (len(stream) + 1) for c in cuts]
    assert split_feed(mode, stream, cuts) == messages


@settings(max_examples=200, deadline=None)
@given(messages=lines_strategy(), cuts=st.lists(st.integers(0, 10_000), max_size=30))
def test_lines_any_split_yields_the_same_lines_with_their_newline(
    messages: list[bytes], cuts: list[int]
) -> None:
    stream = b"".join(messages)
    cuts = [c % (len(stream) + 1) for c in cuts]
    assert split_feed("line", stream, cuts) == messages


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=5), children, max_size=5)
    ),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(
    values=st.lists(msgpack_values, max_size=10),
    cuts=st.lists(st.integers(0, 10_000), max_size=30),
)
def test_msgpack_any_split_yields_the_same_objects(values: list[Any], cuts: list[int]) -> None:
    framer = make_framer("msgpack")
    stream = b"".join(framer.frame(v) for v in values)
    cuts = [c % (len(stream) + 1) for c in cuts]
    assert split_feed("msgpack", stream, cuts) == values


@pytest.mark.parametrize("mode", [*BYTES_MODES, "msgpack"])
def test_one_byte_at_a_time(mode: Any) -> None:
    framer = make_framer(mode)
    if mode == "msgpack":
        messages: list[Any] = [{"a": [1, 2, b"x"]}, "text", 3.5]
    elif mode == "line":
        messages = [b"first\n", b"\n", b"third line\n"]
    else:
        messages = [b"first", b"", b"third message"]
    stream = b"".join(framer.frame(m) for m in messages)
    assert split_feed(mode, stream, list(range(len(stream)))) == messages


def test_a_header_claiming_4_gib_is_refused_without_allocating() -> None:
    framer = LengthPrefixFramer(4, packet_size=1024 * 1024)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        with pytest.raises(PacketTooLarge) as caught:
            framer.feed(b"\xff\xff\xff\xff" + b"x" * 100)
        grown = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    assert caught.value.limit == 1024 * 1024
    assert caught.value.size == 2**32 - 1
    assert "4294967295 bytes exceeds packet_size=1048576" in str(caught.value)
    assert grown < 64 * 1024


def test_half_a_header_waits_for_the_rest() -> None:
    framer = make_framer(2)
    assert framer.feed(b"\x00") == []
    assert framer.buffered == 1
    assert framer.feed(b"\x03ab") == []
    assert framer.feed(b"c\x00") == [b"abc"]
    assert framer.buffered == 1


def test_a_line_longer_than_packet_size_is_refused() -> None:
    framer = make_framer("line", packet_size=8)
    assert framer.feed(b"short\n") == [b"short\n"]
    with pytest.raises(PacketTooLarge, match="line of 9 bytes"):
        framer.feed(b"123456789")
    with pytest.raises(PacketTooLarge):
        make_framer("line", packet_size=4).feed(b"12345\n")


def test_custom_line_delimiter_is_kept() -> None:
    framer = make_framer("line", delimiter=b"\0")
    assert framer.feed(b"a\0b") == [b"a\0"]
    assert framer.frame(b"c") == b"c\0"


def test_garbage_msgpack_is_a_frame_error() -> None:
    framer = make_framer("msgpack")
    with pytest.raises(FrameError, match="msgpack"):
        framer.feed(b"\xc1" * 4)  # 0xc1 is never used in msgpack


def test_an_oversized_msgpack_object_is_refused() -> None:
    framer = make_framer("msgpack", packet_size=100)
    with pytest.raises(FrameError):
        # A str32 header claiming 4 GiB, then bytes: refused, nothing allocated for it.
        framer.feed(b"\xdb\xff\xff\xff\xff" + b"x" * 200)


def test_frame_adds_the_header_and_checks_types_and_sizes() -> None:
    assert make_framer(2).frame(b"abc") == b"\x00\x03abc"
    assert make_framer(1).frame(bytearray(b"z")) == b"\x01z"
    with pytest.raises(PacketTooLarge):
        make_framer(1).frame(b"x" * 256)
    with pytest.raises(TypeError):
        make_framer(4).frame("text")
    with pytest.raises(TypeError):
        make_framer("msgpack").frame(object())


@pytest.mark.parametrize(
    ("mode", "options"),
    [
        (3, {}),
        ("lines", {}),
        (True, {}),
        ("raw", {"packet_size": 0}),
        ("line", {"delimiter": b"ab"}),
    ],
)
def test_wrong_framing_options(mode: Any, options: dict[str, Any]) -> None:
    with pytest.raises(OptionError):
        make_framer(mode, **options)


def test_msgpack_objects_the_decoder_cuts_otherwise_are_refused() -> None:
    """The Python framer decodes a read's whole objects with one decoder: were its bounds
    (the C skip's, the walk's) ever not the decoder's, the read is refused
    (``FrameError``) rather than delivered cut otherwise.  Before, three objects decoded
    where two were framed were delivered as three messages (and an unfinished last one
    was dropped by the iteration)."""
    framer = MsgpackFramer()
    with pytest.raises(FrameError, match="disagree \\(2 objects in 3 bytes framed, 3 in 3"):
        framer._decode(b"\x01\x02\x03", 3, [(0, 1), (1, 3)])
    with pytest.raises(FrameError, match="disagree \\(2 objects in 3 bytes framed, 1 in"):
        framer._decode(b"\x01\x92\x02", 3, [(0, 1), (1, 3)])
    # (One object: unpackb refuses extra bytes itself.)
    with pytest.raises(FrameError, match="extra data"):
        framer._decode(b"\x01\x02", 2, [(0, 2)])


def test_finish_gives_a_line_ports_unterminated_last_line_once() -> None:
    """The peer's end of file (``Framer.finish``): a line port's rest is its last line;
    the other modes make nothing of a packet cut short and keep holding its bytes."""
    framer = make_framer("line")
    assert framer.feed(b"a\nb") == [b"a\n"]
    assert framer.finish() == [b"b"]
    assert framer.buffered == 0
    assert framer.finish() == []
    assert framer.feed(b"c\n") == [b"c\n"]
    assert framer.finish() == []
    for mode, cut_short in ((4, b"\0\0\0\x05ab"), ("msgpack", b"\x92\x01")):
        framer = make_framer(mode)
        assert framer.feed(cut_short) == []
        held = framer.buffered
        assert held > 0
        assert framer.finish() == []
        assert framer.buffered == held
