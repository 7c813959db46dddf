"""The RESP framer (``packet="resp"``) as a sans-I/O object, and over a real port."""

from __future__ import annotations

import tracemalloc
from typing import Any

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ioserver
import ports
from ioserver._framing import (
    FrameError,
    PacketTooLarge,
    RespError,
    RespFramer,
    encode_resp,
    make_framer,
)


def command(*arguments: bytes) -> bytes:
    """A command as clients send it: an array of bulk strings."""
    return encode_resp(list(arguments))


def split_feed(stream: bytes, cuts: list[int], **options: Any) -> list[Any]:
    framer = make_framer("resp", **options)
    messages: list[Any] = []
    start = 0
    for cut in [*sorted(set(cuts)), len(stream)]:
        messages.extend(framer.feed(stream[start:cut]))
        start = cut
    assert framer.buffered == 0
    return messages


commands_strategy = st.lists(st.lists(st.binary(max_size=60), min_size=1, max_size=6), max_size=15)


@settings(max_examples=150, deadline=None)
@given(commands=commands_strategy, cuts=st.lists(st.integers(0, 100_000), max_size=40))
def test_any_split_of_a_pipeline_yields_the_same_commands(
    commands: list[list[bytes]], cuts: list[int]
) -> None:
    stream = b"".join(command(*arguments) for arguments in commands)
    cuts = [cut % (len(stream) + 1) for cut in cuts]
    assert split_feed(stream, cuts) == commands


@settings(max_examples=100, deadline=None)
@given(
    lines=st.lists(
        st.lists(
            st.text("abcXYZ019_:-", min_size=1, max_size=12).map(str.encode), min_size=1, max_size=5
        ),
        max_size=10,
    ),
    cuts=st.lists(st.integers(0, 10_000), max_size=20),
    crlf=st.booleans(),
)
def test_inline_commands_split_on_whitespace_at_any_split(
    lines: list[list[bytes]], cuts: list[int], crlf: bool
) -> None:
    end = b"\r\n" if crlf else b"\n"
    stream = b"".join(b"  ".join(arguments) + end for arguments in lines)
    cuts = [cut % (len(stream) + 1) for cut in cuts]
    assert split_feed(stream, cuts) == lines


def test_one_byte_at_a_time_and_binary_safe_values() -> None:
    value = b"\r\n$3\r\n*1\r\n\x00\xff"
    stream = command(b"SET", b"key", value) + b"PING\r\n" + command(b"GET", b"key")
    framer = RespFramer()
    messages: list[Any] = []
    for index in range(len(stream)):
        messages.extend(framer.feed(stream[index : index + 1]))
    assert messages == [[b"SET", b"key", value], [b"PING"], [b"GET", b"key"]]
    assert framer.buffered == 0


def test_buffered_counts_the_wire_bytes_of_the_incomplete_command() -> None:
    framer = RespFramer()
    stream = command(b"SET", b"key", b"value")
    assert framer.feed(stream[:-3]) == []
    assert framer.buffered == len(stream) - 3
    assert framer.feed(stream[-3:]) == [[b"SET", b"key", b"value"]]
    assert framer.buffered == 0


def test_empty_and_null_arrays_and_empty_lines_are_skipped() -> None:
    framer = RespFramer()
    assert framer.feed(b"*0\r\n*-1\r\n\r\n\n" + command(b"PING")) == [[b"PING"]]


@pytest.mark.parametrize(
    ("stream", "error"),
    [
        (b"*2\r\n$3\r\nGET\r\n:1\r\n", "expected '$', got ':'"),
        (b"*x\r\n", "invalid multibulk length"),
        (b"*2000000\r\n", "invalid multibulk length"),
        (b"*1\r\n$-5\r\n", "invalid bulk length"),
        (b"*1\r\n$+3\r\nGET\r\n", "invalid bulk length"),
        (b"*1\r\n$3\r\nGETX\r\n", "bulk string not ended by CRLF"),
        (b"*1" + b"1" * 40, "invalid multibulk length"),
    ],
)
def test_malformed_input_is_delivered_as_a_frame_error_after_the_good_commands(
    stream: bytes, error: str
) -> None:
    framer = RespFramer()
    messages = framer.feed(command(b"PING") + stream)
    assert messages[0] == [b"PING"]
    assert len(messages) == 2
    assert isinstance(messages[1], FrameError)
    assert not isinstance(messages[1], PacketTooLarge)
    assert str(messages[1]) == error
    # From then on it holds nothing and ignores everything.
    assert framer.buffered == 0
    assert framer.feed(command(b"PING")) == []
    assert framer.buffered == 0


def test_a_bulk_header_claiming_gigabytes_fails_without_allocating() -> None:
    framer = RespFramer(packet_size=1 << 20)
    tracemalloc.start()
    try:
        messages = framer.feed(b"*2\r\n$3\r\nSET\r\n$4000000000\r\n")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 16
    assert len(messages) == 1
    error = messages[0]
    assert isinstance(error, PacketTooLarge)
    assert error.limit == 1 << 20
    assert error.size > 4_000_000_000


def test_a_command_growing_past_packet_size_fails() -> None:
    framer = RespFramer(packet_size=100)
    # Many small arguments: no single header is too large, the sum is.
    stream = b"*50\r\n" + b"$1\r\nx\r\n" * 50
    messages = framer.feed(stream)
    assert len(messages) == 1 and isinstance(messages[0], PacketTooLarge)
    assert framer.buffered == 0


def test_an_array_header_whose_arguments_cannot_fit_fails_at_once() -> None:
    framer = RespFramer(packet_size=1000)
    messages = framer.feed(b"*1000\r\n")
    assert len(messages) == 1 and isinstance(messages[0], PacketTooLarge)


def test_an_endless_inline_line_fails() -> None:
    framer = RespFramer(packet_size=1000)
    assert framer.feed(b"x" * 1000) == []
    messages = framer.feed(b"x")
    assert len(messages) == 1 and isinstance(messages[0], PacketTooLarge)
    assert framer.buffered == 0


@pytest.mark.parametrize(
    ("value", "wire"),
    [
        (b"abc", b"$3\r\nabc\r\n"),
        (bytearray(b""), b"$0\r\n\r\n"),
        ("OK", b"+OK\r\n"),
        (-42, b":-42\r\n"),
        (None, b"$-1\r\n"),
        ([b"a", None, 1, ["x"]], b"*4\r\n$1\r\na\r\n$-1\r\n:1\r\n*1\r\n+x\r\n"),
        ((), b"*0\r\n"),
        (RespError("ERR no"), b"-ERR no\r\n"),
    ],
)
def test_encode_resp(value: Any, wire: bytes) -> None:
    assert encode_resp(value) == wire


@pytest.mark.parametrize(
    ("value", "error"),
    [(True, TypeError), (1.5, TypeError), ("a\r\nb", ValueError), (RespError("x\n"), ValueError)],
)
def test_encode_resp_refuses_what_resp2_cannot_say(value: Any, error: type[Exception]) -> None:
    with pytest.raises(error):
        encode_resp(value)


def test_frame_sends_bytes_as_they_are_and_encodes_other_values() -> None:
    framer = RespFramer()
    assert framer.frame(b"+OK\r\n:1\r\n") == b"+OK\r\n:1\r\n"
    assert framer.frame(bytearray(b"+OK\r\n")) == b"+OK\r\n"
    assert framer.frame("PONG") == b"+PONG\r\n"
    assert framer.frame([b"a"]) == b"*1\r\n$1\r\na\r\n"


@pytest.mark.anyio
async def test_a_port_with_packet_resp_delivers_whole_commands_in_order(
    ios: ioserver.IOServer,
) -> None:
    """Over a real socket: a pipeline in odd-sized pieces arrives as whole commands."""
    stream = b"".join(command(b"SET", b"k%d" % i, b"v" * i) for i in range(100))
    async with await ports.listen_tcp(ios, packet="resp") as listener:
        host, number = listener.local_address[:2]
        async with await anyio.connect_tcp(host, number) as client:
            accepted = await listener.receive()
            assert isinstance(accepted, ports.Accepted)
            async with accepted.port as port:
                for start in range(0, len(stream), 777):
                    await client.send(stream[start : start + 777])
                received = []
                with anyio.fail_after(10):
                    while len(received) < 100:
                        message = await port.receive()
                        assert isinstance(message, ports.Data)
                        received.append(message.data)
                assert received == [[b"SET", b"k%d" % i, b"v" * i] for i in range(100)]
                # The wire bytes were charged and credited back: nothing is left buffered.
                assert port.statistics().bytes_buffered_in == 0
                await port.send([b"done"])
                assert await client.receive() == b"*1\r\n$4\r\ndone\r\n"
