"""packet="msgpack" against a hostile peer: the framing bound is firm.

An unfinished msgpack object used to be handed to a streaming decoder, which preallocated
every array its headers announced (up to ``packet_size`` elements per level) and reported
almost none of it as buffered (``Unpacker.tell()`` moves inside unfinished containers).
Now object boundaries are found before decoding: the port holds, and is charged, the
unfinished object's bytes and nothing more.  Framer-level tests measure with tracemalloc;
port-level tests go through a real socket and read the port's and the server's counters.
"""

from __future__ import annotations

import errno
import socket
import tracemalloc
from typing import Any

import anyio
import anyio.abc
import msgpack
import pytest
from conftest import until
from hypothesis import given, settings
from hypothesis import strategies as st

import ioserver
import ports
from ioserver._framing import (
    MSGPACK_MAX_DEPTH,
    MSGPACK_MAX_ITEMS,
    FrameError,
    PacketTooLarge,
    make_framer,
)
from ports import Accepted, Closed, Data, Error

PACKET_SIZE = 64 * 1024
#: An array16 header announcing 2,000 elements: fits packet_size, preallocated 16 KB per
#: level by a streaming decoder; 488 levels of it stay under MSGPACK_MAX_ITEMS (976,001
#: items).  (20,000 a level, 160 KB, is refused by the item cap at the 53rd level.)
ARRAY_2000 = b"\xdc\x07\xd0"


def _peak_while(action: Any) -> int:
    """Bytes allocated at the peak (above the start) while ``action()`` runs."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        action()
        return tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()


# -- the framer --------------------------------------------------------------------------------
def test_never_finished_nested_arrays_hold_only_their_bytes() -> None:
    framer = make_framer("msgpack", packet_size=PACKET_SIZE)
    levels = MSGPACK_MAX_DEPTH - 24  # deep, but allowed

    def attack() -> None:
        for _ in range(levels // 100):
            assert framer.feed(ARRAY_2000 * 100) == []

    peak = _peak_while(attack)
    # Held: the bytes (3 per level), charged as buffered.  A decoder preallocating each
    # level's 2,000 slots would hold 8 x 2,000 x 400 = 6.4 MB here.
    assert framer.buffered == 3 * (levels // 100) * 100
    assert peak < 1024 * 1024, f"{peak} bytes allocated for {framer.buffered} bytes held"
    # 20,000 a level: the 53rd header brings the items past MSGPACK_MAX_ITEMS.
    with pytest.raises(PacketTooLarge, match="1060001 items exceeds MSGPACK_MAX_ITEMS"):
        make_framer("msgpack", packet_size=PACKET_SIZE).feed(b"\xdc\x4e\x20" * 100)


def test_nesting_deeper_than_the_limit_is_a_frame_error() -> None:
    framer = make_framer("msgpack", packet_size=PACKET_SIZE)
    framer.feed(b"\x91" * MSGPACK_MAX_DEPTH)  # at the limit: still waiting
    assert framer.buffered == MSGPACK_MAX_DEPTH
    with pytest.raises(FrameError, match=f"nested deeper than {MSGPACK_MAX_DEPTH}"):
        framer.feed(b"\x91")
    assert framer.buffered == 0  # a failed framer holds nothing
    # In one read (found by the C decoder's skip): the same error.
    with pytest.raises(FrameError, match="nested deeper"):
        make_framer("msgpack").feed(b"\x91" * (MSGPACK_MAX_DEPTH + 1) + b"\x00")
    # And exactly at the limit, whole: decoded.
    deep = make_framer("msgpack").feed(b"\x91" * MSGPACK_MAX_DEPTH + b"\x00")
    assert len(deep) == 1


@pytest.mark.parametrize(
    ("header", "announced"),
    [
        (b"\xdb\x00\x01\x00\x00", 5 + 65536),  # str32 of 64 KiB
        (b"\xc6\x00\x10\x00\x00", 5 + 1048576),  # bin32 of 1 MiB
        (b"\xc9\x00\x01\x00\x00\x01", 6 + 65536),  # ext32
        (b"\xdd\x00\x01\x00\x00", 5 + 65536),  # array32: 65,536 items of one byte at least
        (b"\xdf\x00\x00\x80\x00", 5 + 65536),  # map32: 32,768 pairs = 65,536 items
        (b"\x92\xdc\xff\xfe", 4 + 65534),  # an inner count that cannot fit
    ],
)
def test_a_header_announcing_more_than_packet_size_is_refused_at_once(
    header: bytes, announced: int
) -> None:
    framer = make_framer("msgpack", packet_size=PACKET_SIZE)
    with pytest.raises(PacketTooLarge) as caught:
        framer.feed(header)
    assert caught.value.limit == PACKET_SIZE
    assert caught.value.size == announced
    assert framer.buffered == 0


def test_an_object_whose_bytes_pass_packet_size_is_refused() -> None:
    # Each element fits, the count fits (one byte each), but the elements are two bytes.
    framer = make_framer("msgpack", packet_size=1000)
    framer.feed(b"\xdc\x01\xf4")  # array16 of 500
    framer.feed(b"\xcc\x01" * 400)
    assert framer.buffered == 803
    with pytest.raises(PacketTooLarge, match="exceeds packet_size=1000"):
        framer.feed(b"\xcc\x01" * 100)
    # Whole in one read: the same refusal.
    with pytest.raises(PacketTooLarge):
        make_framer("msgpack", packet_size=1000).feed(msgpack.packb([256] * 500))


def test_many_small_objects_in_one_large_read_are_not_too_large() -> None:
    framer = make_framer("msgpack", packet_size=100)
    objects = [[index, "x" * 50] for index in range(1000)]
    assert framer.feed(b"".join(msgpack.packb(o) for o in objects)) == objects


def test_an_unhashable_map_key_is_a_frame_error() -> None:
    with pytest.raises(FrameError, match="malformed msgpack"):
        make_framer("msgpack").feed(b"\x81\x91\x00\x00")  # {[0]: 0}


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=40)
    | st.binary(max_size=300)  # bin8 and bin16
    | st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=20)),
    lambda children: (
        st.lists(children, max_size=20)  # fixarray and array16
        | st.dictionaries(st.text(max_size=5), children, max_size=18)  # fixmap and map16
    ),
    max_leaves=40,
)


# The scanner alone (no I/O core): CI's second pass leaves it out (tests/conftest.py).
@pytest.mark.core_independent
@settings(max_examples=100, deadline=None)
@given(
    values=st.lists(msgpack_values, max_size=12),
    cuts=st.lists(st.integers(0, 100_000), max_size=40),
)
def test_the_scanner_splits_any_chunking_exactly_like_msgpack_unpacker(
    values: list[Any], cuts: list[int]
) -> None:
    encoded = [msgpack.packb(value, use_bin_type=True) for value in values]
    stream = b"".join(encoded)
    reference = msgpack.Unpacker(raw=False, strict_map_key=False)
    reference.feed(stream)
    expected = list(reference)
    ends = []  # where each object ends in the stream
    for data in encoded:
        ends.append((ends[-1] if ends else 0) + len(data))
    framer = make_framer("msgpack")
    got: list[Any] = []
    start = 0
    for cut in [*sorted({c % (len(stream) + 1) for c in cuts}), len(stream)]:
        got.extend(framer.feed(stream[start:cut]))
        start = cut
        whole = [end for end in ends if end <= cut]
        assert len(got) == len(whole)  # every object complete so far, no other
        # What is held is exactly the bytes of the unfinished object.
        assert framer.buffered == cut - (whole[-1] if whole else 0)
    assert got == expected
    assert framer.buffered == 0


# -- through a port ---------------------------------------------------------------------------


async def _pair(
    ios: ioserver.IOServer,
) -> tuple[ports.Listener, ports.Port, anyio.abc.SocketStream]:
    listener = await ports.listen_tcp(
        ios, "127.0.0.1", 0, packet="msgpack", packet_size=PACKET_SIZE
    )
    client = await anyio.connect_tcp("127.0.0.1", listener.local_address[1])
    accepted = await listener.receive()
    assert isinstance(accepted, Accepted)
    return listener, accepted.port, client


async def _until_charged(ios: ioserver.IOServer, port: ports.Port, size: int) -> None:
    """Wait until the I/O thread has read ``size`` bytes and charged them (or 5 s passed:
    the asserts after this say what is wrong).  Nothing is delivered, so there is no
    message to wait for, only the counters."""
    with anyio.move_on_after(5):
        while (  # noqa: ASYNC110
            port.statistics().bytes_received < size or ios.statistics().memory_in_use < size
        ):
            await anyio.sleep(0.001)


@pytest.mark.anyio
async def test_the_attack_through_a_port_is_charged_and_bounded(no_leaks: None) -> None:
    levels = MSGPACK_MAX_DEPTH - 24
    attack = ARRAY_2000 * levels
    tracemalloc.start()
    try:
        async with ioserver.open(memory_limit=32 * 1024 * 1024) as ios:
            listener, port, client = await _pair(ios)
            async with listener, port, client:
                base = tracemalloc.get_traced_memory()[0]
                tracemalloc.reset_peak()
                await client.send(attack)
                await _until_charged(ios, port, len(attack))
                peak = tracemalloc.get_traced_memory()[1] - base
                statistics = port.statistics()
                # Charged: the bytes held for the unfinished object, all of them.
                assert statistics.bytes_buffered_in == len(attack)
                assert ios.statistics().memory_in_use >= len(attack)
                # 7.8 MB with a decoder preallocating 2,000 slots per level.
                assert peak < 4 * 1024 * 1024, f"{peak} bytes allocated"
                # Finish it (2,000 elements per level would not fit: only the depth
                # limit is left to pass): the port is closed with a frame error.
                await client.send(b"\x91" * 25)
                with anyio.fail_after(10):
                    error = await port.receive()
                    assert isinstance(error, Error)
                    assert error.errno_name == "EPROTO"
                    assert "nested deeper" in error.message
                    assert await port.receive() == Closed("EPROTO", "EPROTO")
                assert ios.statistics().memory_in_use == 0
    finally:
        tracemalloc.stop()


@pytest.mark.anyio
async def test_an_object_larger_than_packet_size_closes_the_port(ios: ioserver.IOServer) -> None:
    listener, port, client = await _pair(ios)
    async with listener, port, client:
        await client.send(msgpack.packb(["fits", 1]))
        assert await port.receive() == Data(["fits", 1])
        await client.send(b"\xc6\x00\x10\x00\x00" + b"x" * 1000)  # bin32 claiming 1 MiB
        with anyio.fail_after(10):
            error = await port.receive()
        assert isinstance(error, Error)
        assert error.errno_name == "EMSGSIZE"
        assert "exceeds packet_size=65536" in error.message
        assert await port.receive() == Closed("EMSGSIZE", "EMSGSIZE")
        assert port.statistics().packets_too_large == 1


# -- items: MSGPACK_MAX_ITEMS, whatever packet_size ------------------------------------------


def _array32(count: int) -> bytes:
    return b"\xdd" + count.to_bytes(4, "big")


#: 4,096 arrays of 256 nils inside one array: 1 + 4,096 + 2^20 items in 1 MiB, every
#: container small.  The 4,080th inner header brings the count past the cap.
_MANY_SMALL = b"\xdc\x10\x00" + (b"\xdc\x01\x00" + b"\xc0" * 256) * 4096
_MANY_SMALL_COUNT = 1 + 4096 + 256 * 4080


async def _accept_msgpack(listener: ports.Listener) -> ports.Port:
    accepted = await listener.receive()
    assert isinstance(accepted, Accepted), accepted
    return accepted.port


async def _bystander_echoes(
    port: ports.Port, peer: socket.socket, value: object, *, echo: bool = True
) -> None:
    """The bystander's peer sends ``value``; its port gets it and (``echo``) sends it
    back, and the peer reads it."""
    await anyio.to_thread.run_sync(peer.sendall, msgpack.packb(value))
    with anyio.fail_after(10):
        assert await port.receive() == Data(value)
    if not echo:
        return
    await port.send(value)
    reply = msgpack.packb(value)
    peer.settimeout(10)
    got = b""
    while len(got) < len(reply):
        got += await anyio.to_thread.run_sync(peer.recv, 65536)
    assert got == reply


async def _until_released(ios: ioserver.IOServer) -> None:
    """Wait (checkpointing) until the I/O thread has closed the ports and released every
    byte they were charged."""
    await until(lambda: not ios.statistics().memory_in_use, 10)


@pytest.mark.every_core
@pytest.mark.anyio
@pytest.mark.parametrize(
    ("wire", "count"),
    [
        # Announced: the header alone, no element sent (it would wait for 2^20 of them).
        pytest.param(_array32(MSGPACK_MAX_ITEMS), MSGPACK_MAX_ITEMS + 1, id="array32-header"),
        # A map's count is doubled: 2^19 pairs are one item too many.
        pytest.param(
            b"\xdf" + (MSGPACK_MAX_ITEMS // 2).to_bytes(4, "big"),
            MSGPACK_MAX_ITEMS + 1,
            id="map32-header",
        ),
        # Sent whole: no container past the cap, the object is.
        pytest.param(_MANY_SMALL, _MANY_SMALL_COUNT, id="many-small-containers"),
    ],
)
async def test_a_msgpack_object_of_too_many_items_is_refused_before_decoding(
    ios: ioserver.IOServer, wire: bytes, count: int
) -> None:
    """An object of more than ``MSGPACK_MAX_ITEMS`` items within ``packet_size`` (64 MiB)
    is refused by the framer before any of it is decoded, as soon as a header brings the
    count past the cap: ``Error("EMSGSIZE", ...)`` naming the cap, ``Closed``, and the
    port's socket closed.  A bystander port echoes before and after, and no byte stays
    charged.  (Before the cap, the header waited for its 2^20 items, and the many small
    containers were decoded, ~75 MiB of Python objects per MiB of wire.)"""
    listener = await ports.listen_tcp(ios, "127.0.0.1", 0, packet="msgpack")
    async with listener:
        with (
            socket.create_connection(listener.local_address) as bystander_peer,
            socket.create_connection(listener.local_address) as peer,
        ):
            bystander = await _accept_msgpack(listener)
            port = await _accept_msgpack(listener)
            async with bystander, port:
                await _bystander_echoes(bystander, bystander_peer, ["before", 1], echo=False)
                await anyio.to_thread.run_sync(peer.sendall, msgpack.packb("good"))
                with anyio.fail_after(10):
                    assert await port.receive() == Data("good")
                await anyio.to_thread.run_sync(peer.sendall, wire)
                with anyio.fail_after(10):
                    error = await port.receive()
                    text = f"msgpack object of {count} items exceeds MSGPACK_MAX_ITEMS=1048576"
                    assert error == Error("EMSGSIZE", errno.EMSGSIZE, text)
                    assert await port.receive() == Closed("EMSGSIZE", "EMSGSIZE")
                assert port.statistics().packets_too_large == 1
                peer.settimeout(5)
                try:
                    while await anyio.to_thread.run_sync(peer.recv, 65536):
                        pass
                except ConnectionResetError:
                    pass
                # Nothing of it stays charged (checked before the bystander sends: what
                # a native port sent stays counted in memory_in_use, a separate matter).
                await _until_released(ios)
                await _bystander_echoes(bystander, bystander_peer, {"after": [1.5, None]})


@pytest.mark.every_core
@pytest.mark.anyio
async def test_a_msgpack_object_of_exactly_max_items_is_delivered(
    ios: ioserver.IOServer,
) -> None:
    """The object and ``MSGPACK_MAX_ITEMS - 1`` nils, then a map of
    ``MSGPACK_MAX_ITEMS // 2 - 1`` pairs inside an array (a key and a value count one
    each): both exactly at the cap, decoded and delivered; the budget returns to 0."""
    at_cap = [None] * (MSGPACK_MAX_ITEMS - 1)
    pairs = MSGPACK_MAX_ITEMS // 2 - 1
    map_at_cap = [dict.fromkeys(range(pairs))]
    listener = await ports.listen_tcp(ios, "127.0.0.1", 0, packet="msgpack")
    async with listener:
        with socket.create_connection(listener.local_address) as peer:
            port = await _accept_msgpack(listener)
            async with port:
                wire = msgpack.packb(at_cap) + msgpack.packb(map_at_cap)
                # Sent while the port is read: the first object's charge takes the port
                # past its high watermark, so it reads the second only once the first is
                # taken, and the kernel's buffers need not hold all 4 MB of the wire.
                with anyio.fail_after(20):
                    async with anyio.create_task_group() as task_group:
                        task_group.start_soon(anyio.to_thread.run_sync, peer.sendall, wire)
                        assert await port.receive() == Data(at_cap)
                        assert await port.receive() == Data(map_at_cap)
                assert port.statistics().packets_too_large == 0
        await _until_released(ios)
