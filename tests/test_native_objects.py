"""TCP ports in the msgpack and resp packet modes on the native core, and on both cores.

The native I/O thread frames them itself (``native/src/framing.rs``: object boundaries,
``packet_size``, nesting depth, resp's commands and errors) and the loop's drain builds the
objects (``Inbox.take``: ``msgpack.unpackb``, a command's ``list[bytes]``).  The tests
marked ``every_core`` hold the Python core (the oracle) and both native I/O backends to the
same messages, errors and memory bound, against real sockets and redis-cli.
"""

from __future__ import annotations

import contextlib
import errno
import shutil
import socket
import struct
import time
import tracemalloc
from typing import Any

import anyio
import msgpack
import pytest
from conftest import until

import ioserver
import ports
from ioserver import _exceptions, _native
from ioserver._framing import (
    MSGPACK_MAX_DEPTH,
    PACKET_OVERHEAD,
    RespError,
    encode_resp,
)
from ports import Accepted, Closed, Data, Error, FrameError, PacketTooLarge

pytestmark = pytest.mark.anyio

LIMIT = 1 << 20  # bytes: the memory_limit of the flood
UNBOUND = {
    "high_msgq_watermark": 64 << 20,
    "low_msgq_watermark": 32 << 20,
    "high_msgq_messages": 1 << 24,
}


async def _accept(listener: ports.Listener) -> ports.Port:
    accepted = await listener.receive()
    assert isinstance(accepted, Accepted), accepted
    return accepted.port


def _peer_ended(peer: socket.socket) -> bool:
    """The port's socket is closed: the peer reads its end (or a reset)."""
    peer.settimeout(5)
    try:
        while peer.recv(65536):
            pass
    except ConnectionResetError:
        pass
    return True


@pytest.mark.parametrize("packet", ["msgpack", "resp"])
async def test_msgpack_and_resp_ports_are_carried_by_the_native_thread(
    no_leaks: None, packet: str
) -> None:
    """A listener, its accepted port and a connected port of these modes are the native
    thread's (``Core.ports_open``, ``Core.bytes_in``), not the hosted Python half's: their
    windows are native, and the hosted half serves no port at all."""
    async with ioserver.open(core="native") as ios:
        io: Any = ios._io
        core = io._core
        listener = await ports.listen_tcp(ios, "127.0.0.1", 0, packet=packet)
        client = await ports.connect_tcp(ios, *listener.local_address, packet=packet)
        async with listener, client:
            server = await _accept(listener)
            async with server:
                assert core.ports_open == 3
                assert io.ports_open == 0  # the hosted half's own count: none of these
                for port in (listener, client, server):
                    assert type(port._conn) is _native.Conn
                assert type(server._window).__name__ == "FramedNativeWindow"  # a packet port
                before = core.bytes_in
                if packet == "msgpack":
                    message: Any = {"a": [1, 2.5, None, b"\x00"], "b": "é"}
                    await client.send(message)
                    assert await server.receive() == Data(message)
                    await server.send(["reply", 1])
                    assert await client.receive() == Data(["reply", 1])
                else:
                    await client.send(b"*2\r\n$4\r\nECHO\r\n$2\r\nhi\r\n")
                    assert await server.receive() == Data([b"ECHO", b"hi"])
                    await server.send("OK")
                    assert await client.receive() == Data([b"+OK"])  # an inline command
                assert core.bytes_in > before


@pytest.mark.every_core
@pytest.mark.parametrize(
    ("wire", "errno_name", "text"),
    [
        pytest.param(
            b"\x91" * (MSGPACK_MAX_DEPTH + 1) + b"\x00",
            "EPROTO",
            f"malformed msgpack data: nested deeper than {MSGPACK_MAX_DEPTH} levels",
            id="deep-nesting",
        ),
        pytest.param(
            b"\x91" * 5000,  # unfinished: refused as it comes, before it ends
            "EPROTO",
            f"malformed msgpack data: nested deeper than {MSGPACK_MAX_DEPTH} levels",
            id="deep-unfinished",
        ),
        pytest.param(
            b"\xdb\xff\xff\xff\xff",  # a str of 4 GiB announced, 5 bytes sent
            "EMSGSIZE",
            "msgpack object of 4294967300 bytes exceeds packet_size=4096",
            id="huge-str",
        ),
        pytest.param(
            b"\xdd\xff\xff\xff\xff",  # an array of 2**32 - 1 items announced
            "EMSGSIZE",
            "msgpack object of 4294967300 bytes exceeds packet_size=4096",
            id="huge-array",
        ),
        pytest.param(
            b"\xdf\x00\x00\x10\x00",  # a map of 4096 pairs: 8192 items, 1 byte each at least
            "EMSGSIZE",
            "msgpack object of 8197 bytes exceeds packet_size=4096",
            id="huge-map",
        ),
    ],
)
async def test_a_msgpack_bomb_is_refused_at_its_header(
    ios: ioserver.IOServer, wire: bytes, errno_name: str, text: str
) -> None:
    """A msgpack bomb - nesting past ``MSGPACK_MAX_DEPTH``, or a header announcing more
    than ``packet_size`` - is refused as soon as the bytes show it, before anything is
    allocated for it: the good object before it is delivered, then ``Error`` (``EPROTO``
    or ``EMSGSIZE``, the Python framer's text) and ``Closed``, and the port's socket is
    closed."""
    listener = await ports.listen_tcp(ios, "127.0.0.1", 0, packet="msgpack", packet_size=4096)
    async with listener:
        with socket.create_connection(listener.local_address) as peer:
            port = await _accept(listener)
            async with port:
                peer.sendall(msgpack.packb([1, "good"]))
                with anyio.fail_after(5):
                    assert await port.receive() == Data([1, "good"])
                peer.sendall(wire)
                with anyio.fail_after(5):
                    error = await port.receive()
                    number = getattr(errno, errno_name)
                    assert error == Error(errno_name, number, text)
                    assert await port.receive() == Closed(errno_name, errno_name)
                assert _peer_ended(peer)
                assert port.statistics().packets_too_large == (errno_name == "EMSGSIZE")
        assert ios.statistics().memory_in_use == 0


@pytest.mark.every_core
@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(b"\xa2\xff\xfe", id="str-not-utf8"),
        pytest.param(b"\x81\x91\x01\x02", id="unhashable-key"),
        pytest.param(b"\xc7\x05\xff" + b"\x00" * 5, id="bad-timestamp"),
        # Larger than the drain's reused decoder takes (16 KiB): decoded by unpackb.
        pytest.param(b"\xdb" + (20000).to_bytes(4, "big") + b"\xff" * 20000, id="big-str"),
    ],
)
async def test_a_msgpack_object_the_decoder_refuses_closes_the_port_with_eproto(
    ios: ioserver.IOServer, bad: bytes
) -> None:
    """An object whose boundaries frame but which the decoder refuses (a ``str`` that is
    not UTF-8, a map keyed by a list, a timestamp of a wrong length) reaches the owner as
    the Python core's framer error: ``Error("EPROTO")`` with msgpack's text, then
    ``Closed("EPROTO")``; the port is closed and what the peer sends after it is not
    delivered.  The next connection's objects decode as before."""
    try:
        msgpack.unpackb(bad, raw=False, strict_map_key=False)
    except (ValueError, TypeError) as exc:
        text = f"malformed msgpack data: {exc}"
    listener = await ports.listen_tcp(ios, "127.0.0.1", 0, packet="msgpack")
    async with listener:
        with socket.create_connection(listener.local_address) as peer:
            port = await _accept(listener)
            async with port:
                peer.sendall(msgpack.packb("before"))
                with anyio.fail_after(5):
                    assert await port.receive() == Data("before")
                peer.sendall(bad + msgpack.packb("after") * 100)
                with anyio.fail_after(5):
                    assert await port.receive() == Error("EPROTO", errno.EPROTO, text)
                    assert await port.receive() == Closed("EPROTO", "EPROTO")
                assert _peer_ended(peer)
                with pytest.raises(ports.EndOfPort):
                    port.receive_nowait()
        with socket.create_connection(listener.local_address) as peer:
            port = await _accept(listener)
            async with port:
                big = {"big": "é" * 30000, "list": list(range(5000))}
                wire = msgpack.packb({"next": [1, 2]}) + msgpack.packb(big)
                peer.sendall(wire + msgpack.packb("one"))
                with anyio.fail_after(5):
                    assert await port.receive() == Data({"next": [1, 2]})
                    assert await port.receive() == Data(big)
                    assert await port.receive() == Data("one")
        await until(lambda: ios.statistics().memory_in_use == 0)


COMMAND = b"*3\r\n$3\r\nSET\r\n$3\r\nkey\r\n$5\r\nvalue\r\n"


@pytest.mark.every_core
async def test_a_resp_command_split_at_every_byte_boundary(ios: ioserver.IOServer) -> None:
    """A command cut at each of its byte boundaries into two reads: the port's framer
    holds exactly the first part (the memory it charges), then delivers the command whole
    once the rest comes; one byte at a time, pipelined commands come whole and in order."""
    listener = await ports.listen_tcp(ios, "127.0.0.1", 0, packet="resp")
    async with listener:
        with socket.create_connection(listener.local_address) as peer:
            peer.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            port = await _accept(listener)
            async with port:
                for cut in range(1, len(COMMAND)):
                    peer.sendall(COMMAND[:cut])
                    # The first part was read and is held (nothing else is in use).
                    await until(lambda cut=cut: ios.statistics().memory_in_use == cut)
                    peer.sendall(COMMAND[cut:])
                    with anyio.fail_after(5):
                        assert await port.receive() == Data([b"SET", b"key", b"value"])
                wire = COMMAND + b"PING\r\n" + b"*1\r\n$4\r\nQUIT\r\n"
                for offset in range(len(wire)):
                    peer.sendall(wire[offset : offset + 1])
                with anyio.fail_after(5):
                    assert await port.receive() == Data([b"SET", b"key", b"value"])
                    assert await port.receive() == Data([b"PING"])
                    assert await port.receive() == Data([b"QUIT"])
        await until(lambda: ios.statistics().memory_in_use == 0)


@pytest.mark.every_core
@pytest.mark.parametrize("active", [True, "once"])
async def test_a_malformed_resp_after_good_commands_comes_after_them(
    ios: ioserver.IOServer, active: object
) -> None:
    """Good commands, then a malformed one, in one read: the good ones are delivered,
    then the ``FrameError`` as the last message (a Redis server answers ``-ERR Protocol
    error`` and closes; only the owner can write that).  With ``{active, once}`` the
    commands and the error are held and delivered one per grant.  Later bytes are
    ignored; the owner's answer reaches the peer."""
    listener = await ports.listen_tcp(ios, "127.0.0.1", 0, packet="resp", active=active)
    async with listener:
        with socket.create_connection(listener.local_address) as peer:
            port = await _accept(listener)
            async with port:
                peer.sendall(b"*1\r\n$4\r\nPING\r\n" + COMMAND + b"*1\r\n$x\r\n" + b"PING\r\n")
                got = []
                with anyio.fail_after(5):
                    for _ in range(3):
                        message = await port.receive()
                        if message == ports.Passive():
                            port.setopts(active="once")
                            message = await port.receive()
                        got.append(message)
                assert got[:2] == [Data([b"PING"]), Data([b"SET", b"key", b"value"])]
                error = got[2]
                assert isinstance(error, Data) and type(error.data) is FrameError
                assert str(error.data) == "invalid bulk length"
                reply = b"-ERR Protocol error: invalid bulk length\r\n"
                await port.send(RespError("ERR Protocol error: invalid bulk length"))
                peer.sendall(COMMAND)  # ignored: the framer failed
                await port.aclose()
                assert peer.recv(100) == reply
                assert _peer_ended(peer)
        # Nothing of the input is charged any more (the native core may hold the written
        # reply until its loop's next batch: cores.rst).
        await until(lambda: ios.statistics().memory_in_use <= len(reply))


@pytest.mark.every_core
async def test_a_resp_command_larger_than_packet_size_is_the_last_message(
    ios: ioserver.IOServer,
) -> None:
    """A ``$`` header claiming more than ``packet_size`` is refused at once: the owner
    gets the ``PacketTooLarge`` as its last message, after the commands before it."""
    listener = await ports.listen_tcp(ios, "127.0.0.1", 0, packet="resp", packet_size=1024)
    async with listener:
        with socket.create_connection(listener.local_address) as peer:
            port = await _accept(listener)
            async with port:
                peer.sendall(b"PING\r\n*2\r\n$3\r\nSET\r\n$999999999\r\n")
                with anyio.fail_after(5):
                    assert await port.receive() == Data([b"PING"])
                    message = await port.receive()
                assert isinstance(message, Data) and type(message.data) is PacketTooLarge
                assert (message.data.limit, message.data.size) == (1024, 1000000026)
        await until(lambda: ios.statistics().memory_in_use == 0)


@pytest.mark.every_core
@pytest.mark.parametrize("packet", ["msgpack", "resp"])
async def test_a_flood_of_objects_stays_within_the_memory_limit(
    no_leaks: None, core: str, io_backend: str | None, packet: str
) -> None:
    """8 peers flood small objects (each charged its share of the wire bytes and
    ``PACKET_OVERHEAD``: about ten times its bytes) through a 1 MiB ``memory_limit``
    while no owner reads: the memory charged never passes the limit, and once the owners
    read, every object arrives."""
    if packet == "msgpack":
        one: bytes = msgpack.packb([1, "x" * 8])
    else:
        one = b"*2\r\n$3\r\nGET\r\n$4\r\nkey1\r\n"
    count = (256 << 10) // len(one)
    charge = len(one) + PACKET_OVERHEAD
    assert count * charge * 8 > 8 * LIMIT  # each peer alone sends more than the limit
    async with ioserver.open(memory_limit=LIMIT, core=core, io_backend=io_backend) as ios:
        listener = await ports.listen_tcp(ios, "127.0.0.1", 0, packet=packet, **UNBOUND)

        async def flood() -> None:
            async with await anyio.connect_tcp(*listener.local_address) as stream:
                await stream.send(one * count)
                await stream.send_eof()
                with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                    await stream.receive()

        owners = []
        async with listener, anyio.create_task_group() as peers:
            for _ in range(8):
                peers.start_soon(flood)
                owners.append(await _accept(listener))
            await until(lambda: ios.statistics().global_pauses >= 1)
            assert ios.statistics().memory_in_use <= LIMIT

            async def drain(port: ports.Port) -> None:
                received = 0
                async with port:
                    while not isinstance(message := await port.receive(), Closed):
                        assert isinstance(message, Data)
                        received += 1
                assert received == count

            with anyio.fail_after(30):
                async with anyio.create_task_group() as readers:
                    for port in owners:
                        readers.start_soon(drain, port)
        statistics = ios.statistics()
        assert statistics.peak_memory <= LIMIT, statistics
        assert statistics.memory_in_use == 0, statistics


def _decoded_size(packet: bytes) -> int:
    """Bytes of Python objects one msgpack packet decodes to (``tracemalloc``)."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        decoded = msgpack.unpackb(packet, raw=False, strict_map_key=False)
        size = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    del decoded
    return size


@pytest.mark.every_core
async def test_a_dense_object_that_could_never_fit_fails_while_it_arrives(
    no_leaks: None, core: str, io_backend: str | None
) -> None:
    """A msgpack object whose items alone pass what the budget can give one message fails
    its port (``EMSGSIZE``) while it arrives, once the items walked so far pass it: a peer
    sends an array of 32,768 empty arrays (32,771 wire bytes, charged ~2.4 MB once whole)
    to a port under a 1 MiB limit, and the port fails before the object is whole, with
    the memory in use never past the limit and back to 0 after.  While it arrives only its
    bytes are charged to the budget (see the next two tests for why)."""
    items = 32768
    wire: bytes = msgpack.packb([[]] * items)
    assert _charge(wire) > 2 * LIMIT
    async with ioserver.open(memory_limit=LIMIT, core=core, io_backend=io_backend) as ios:
        listener = await ports.listen_tcp(
            ios, "127.0.0.1", 0, packet="msgpack", packet_size=1 << 16, **UNBOUND
        )
        async with listener:
            with socket.create_connection(listener.local_address) as peer:
                port = await _accept(listener)
                async with port:
                    peer.sendall(wire)
                    with anyio.fail_after(10):
                        error = await port.receive()
                        assert isinstance(error, Error), error
                        assert error.errno_name == "EMSGSIZE", error
                        assert isinstance(await port.receive(), Closed)
                    assert port.statistics().bytes_received < len(wire)
                    assert ios.statistics().peak_memory <= LIMIT
        await until(lambda: ios.statistics().memory_in_use == 0)


@pytest.mark.every_core
async def test_a_partial_object_s_bytes_leave_with_a_framing_error(
    no_leaks: None, core: str, io_backend: str | None
) -> None:
    """An unfinished msgpack object is charged its bytes while it arrives, and gives them
    back when a malformed byte fails the port mid-object: ``Error`` (``EPROTO``) and
    ``Closed``, and the memory in use comes back to 0."""
    async with ioserver.open(memory_limit=LIMIT, core=core, io_backend=io_backend) as ios:
        listener = await ports.listen_tcp(ios, "127.0.0.1", 0, packet="msgpack")
        async with listener:
            with socket.create_connection(listener.local_address) as peer:
                port = await _accept(listener)
                async with port:
                    partial = b"\xdd" + (2000).to_bytes(4, "big") + b"\x90" * 1000
                    peer.sendall(partial)
                    await until(lambda: port.statistics().bytes_received == len(partial))
                    assert ios.statistics().memory_in_use >= len(partial)
                    peer.sendall(b"\xc1")
                    with anyio.fail_after(5):
                        error = await port.receive()
                        assert isinstance(error, Error) and error.errno_name == "EPROTO", error
                        assert isinstance(await port.receive(), Closed)
        await until(lambda: ios.statistics().memory_in_use == 0)


#: A map of 15 entries, each an int key and an empty map: 31 wire bytes, charged 2,984.
_DENSE_ITEM = b"\x8f" + b"".join(bytes([k, 0x80]) for k in range(15))


@pytest.mark.every_core
async def test_unfinished_dense_objects_do_not_stop_other_ports(
    no_leaks: None, core: str, io_backend: str | None
) -> None:
    """Two peers leave dense msgpack objects unfinished (13 KB of wire bytes between them,
    whose items walked would be charged ~1 MB): another port of the server still reads.
    When unfinished objects were charged their items as they arrived, these held the whole
    budget, which no port could read into again until they completed, which they could
    not: every port of the server stopped reading for good (found by review R5)."""
    head = b"\xdd\x00\x01\x00\x00"  # an array of 65,536 items, never finished
    async with ioserver.open(memory_limit=LIMIT, core=core, io_backend=io_backend) as ios:
        listener = await ports.listen_tcp(
            ios, "127.0.0.1", 0, packet="msgpack", packet_size=1 << 22, **UNBOUND
        )
        async with listener:
            with (
                socket.create_connection(listener.local_address) as first,
                socket.create_connection(listener.local_address) as second,
                socket.create_connection(listener.local_address) as victim,
            ):
                ports_ = [await _accept(listener) for _ in range(3)]
                try:
                    sent = [head + _DENSE_ITEM * 320, head + _DENSE_ITEM * 40]
                    for peer, port, wire in zip((first, second), ports_, sent, strict=False):
                        peer.sendall(wire)
                        await until(
                            lambda port=port, wire=wire: (
                                port.statistics().bytes_received == len(wire)
                            )
                        )
                    message = msgpack.packb([1, "x" * 56])
                    victim.sendall(message)
                    with anyio.fail_after(5):
                        assert await ports_[2].receive() == Data([1, "x" * 56])
                    assert ios.statistics().memory_in_use <= LIMIT
                finally:
                    for port in ports_:
                        await port.aclose()
        await until(lambda: ios.statistics().memory_in_use == 0)


@pytest.mark.every_core
async def test_two_dense_objects_that_fit_one_at_a_time_both_arrive(
    no_leaks: None, core: str, io_backend: str | None
) -> None:
    """Two legitimate dense objects (5,924 wire bytes each, charged 576 KB once whole,
    under a 1 MiB limit) arrive interleaved on two ports whose owners wait: both are
    delivered.  Charged their items as they arrived, the two unfinished objects held the
    budget each other's completion needed, and neither ever came (review R5)."""
    one = b"\xdc\x00\xbf" + _DENSE_ITEM * 191
    assert msgpack.unpackb(one, strict_map_key=False)
    async with ioserver.open(memory_limit=LIMIT, core=core, io_backend=io_backend) as ios:
        listener = await ports.listen_tcp(
            ios, "127.0.0.1", 0, packet="msgpack", packet_size=1 << 22, **UNBOUND
        )
        async with listener:
            with (
                socket.create_connection(listener.local_address) as first,
                socket.create_connection(listener.local_address) as second,
            ):
                pair = [await _accept(listener) for _ in range(2)]
                cut = len(one) * 9 // 10
                try:
                    for peer, port in zip((first, second), pair, strict=False):
                        peer.sendall(one[:cut])
                        await until(lambda port=port: port.statistics().bytes_received == cut)
                    for peer in (first, second):
                        peer.sendall(one[cut:])
                    with anyio.fail_after(5):
                        for port in pair:
                            message = await port.receive()
                            assert isinstance(message, Data), message
                finally:
                    for port in pair:
                        await port.aclose()
        await until(lambda: ios.statistics().memory_in_use == 0)


@pytest.mark.every_core
async def test_objects_of_tiny_items_are_charged_what_they_decode_to(
    no_leaks: None, core: str, io_backend: str | None
) -> None:
    """What the memory budget charges a msgpack object bounds what its decoding keeps:
    4 peers send objects of 1,000 empty arrays (1,003 wire bytes that decode to ~64 KB of
    lists) through a 1 MiB ``memory_limit`` while no owner reads, and the objects the
    ports hold never decode to more than the limit.  Before, an object was charged its
    wire bytes and ``PACKET_OVERHEAD`` only (1,163 bytes): all 256 were let in, ~16 MB of
    lists under a 1 MiB limit.  Once the owners read, every object arrives."""
    one: bytes = msgpack.packb([[]] * 1000)
    decoded = _decoded_size(one)
    assert decoded > 40 * len(one)
    count, peers = 64, 4
    assert count * peers * decoded > 8 * LIMIT
    async with ioserver.open(memory_limit=LIMIT, core=core, io_backend=io_backend) as ios:
        listener = await ports.listen_tcp(ios, "127.0.0.1", 0, packet="msgpack", **UNBOUND)

        async def flood() -> None:
            async with await anyio.connect_tcp(*listener.local_address) as stream:
                await stream.send(one * count)
                await stream.send_eof()
                with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                    await stream.receive()

        owners: list[ports.Port] = []

        def held() -> int:
            return sum(port.statistics().messages_buffered for port in owners)

        async with listener, anyio.create_task_group() as senders:
            for _ in range(peers):
                senders.start_soon(flood)
                owners.append(await _accept(listener))
            # The budget stops the reads, or (before) every object was let in.
            await until(lambda: ios.statistics().global_pauses >= 1 or held() >= count * peers)
            assert held() * decoded <= LIMIT, (held(), decoded)
            assert ios.statistics().memory_in_use <= LIMIT

            async def drain(port: ports.Port) -> None:
                received = 0
                async with port:
                    while not isinstance(message := await port.receive(), Closed):
                        assert isinstance(message, Data)
                        assert message.data == [[]] * 1000
                        received += 1
                assert received == count

            with anyio.fail_after(30):
                async with anyio.create_task_group() as readers:
                    for port in owners:
                        readers.start_soon(drain, port)
        statistics = ios.statistics()
        assert statistics.peak_memory <= LIMIT, statistics
        assert statistics.memory_in_use == 0, statistics


CAP = LIMIT - 65536  # bytes: the most one message may be charged (memory_limit less a read)


def _charge(packet: bytes) -> int:
    """What a port of this process charges the msgpack object ``packet``."""
    [more] = _native._msgpack_charges(packet, 0, len(packet))
    return len(packet) + PACKET_OVERHEAD + more


@pytest.mark.every_core
@pytest.mark.parametrize("packet", ["msgpack", 4])
async def test_a_message_that_can_never_fit_the_budget_fails_its_port(
    no_leaks: None, core: str, io_backend: str | None, packet: Any
) -> None:
    """A message charged more than the budget can ever grant it (``memory_limit`` less a
    read: a port reads only while a whole read fits) fails its port with ``EMSGSIZE``, as
    an over-``packet_size`` packet does, instead of a port waiting for it for ever: a
    msgpack array of 20,000 ints (20 KB on the wire, charged 1.14 MB by kind of item)
    and a 4-byte-length packet of 1.5 MB (``packet_size`` 4 MiB), under a 1 MiB limit.
    Another port of the same listener loses nothing.  Before, the msgpack object was
    delivered, 2.2 MB charged under the 1 MiB limit (and, charged as it arrived, would
    have waited for ever), and the length packet's port waited for ever."""
    if packet == "msgpack":
        wire: bytes = msgpack.packb([-1] * 20_000)
        assert _charge(wire) > CAP
    else:
        wire = struct.pack(">I", 1_500_000) + b"x" * 1_500_000
    async with ioserver.open(memory_limit=LIMIT, core=core, io_backend=io_backend) as ios:
        listener = await ports.listen_tcp(
            ios, "127.0.0.1", 0, packet=packet, packet_size=4 << 20, **UNBOUND
        )
        small = msgpack.packb([1, "two"]) if packet == "msgpack" else b"\0\0\0\2ab"
        async with listener:
            with (
                socket.create_connection(listener.local_address) as peer,
                socket.create_connection(listener.local_address) as other,
            ):
                port = await _accept(listener)
                bystander = await _accept(listener)
                async with port, bystander:
                    other.sendall(small)
                    before = await bystander.receive()
                    assert isinstance(before, Data), before

                    async def send() -> None:
                        try:
                            await anyio.to_thread.run_sync(peer.sendall, wire)
                        except OSError:
                            pass  # (the port closed before all was sent)

                    async with anyio.create_task_group() as tasks:
                        tasks.start_soon(send)
                        try:
                            with anyio.fail_after(10):
                                error = await port.receive()
                                assert isinstance(error, Error), error
                                assert error.errno_name == "EMSGSIZE", error
                                assert f"exceeds memory_limit less a read={CAP}" in error.message
                                closed = await port.receive()
                                assert isinstance(closed, Closed), closed
                                assert closed.reason == "EMSGSIZE"
                        finally:
                            # The send may be blocked (its thread cannot be cancelled): a
                            # failure above must not leave the task group waiting on it.
                            with contextlib.suppress(OSError):
                                peer.shutdown(socket.SHUT_RDWR)
                    other.sendall(small)
                    with anyio.fail_after(5):
                        after = await bystander.receive()
                    assert isinstance(after, Data) and after.data == before.data
                    assert port.statistics().packets_too_large == 1
        statistics = ios.statistics()
        assert statistics.peak_memory <= LIMIT, statistics
    assert ios.statistics().memory_in_use == 0


@pytest.mark.every_core
async def test_a_message_just_under_what_the_budget_can_grant_is_delivered_whole(
    no_leaks: None, core: str, io_backend: str | None
) -> None:
    """A msgpack object charged just under ``memory_limit`` less a read (an array of
    17,000 ints, 17 KB on the wire, charged 969 KB) is delivered whole to an owner that
    waits for it, and the memory charged stays within the limit."""
    wire: bytes = msgpack.packb([-1] * 17_000)
    assert CAP - 20_000 < _charge(wire) <= CAP
    async with ioserver.open(memory_limit=LIMIT, core=core, io_backend=io_backend) as ios:
        listener = await ports.listen_tcp(ios, "127.0.0.1", 0, packet="msgpack", **UNBOUND)
        async with listener:
            with socket.create_connection(listener.local_address) as peer:
                port = await _accept(listener)
                async with port:
                    peer.sendall(wire)
                    with anyio.fail_after(10):
                        message = await port.receive()
                    assert isinstance(message, Data), message
                    assert message.data == [-1] * 17_000
        statistics = ios.statistics()
        assert statistics.peak_memory <= LIMIT, statistics
        assert statistics.memory_in_use == 0, statistics


@pytest.mark.every_core
async def test_redis_cli_against_a_resp_port(ios: ioserver.IOServer) -> None:
    """redis-cli, a real client, against a resp listener: pipelined commands (``-r``),
    a value of 200 kB (read over many reads), and the replies as it prints them."""
    cli = shutil.which("redis-cli")
    if cli is None:
        pytest.skip("redis-cli is not installed: apt-get install redis-tools")
    listener = await ports.listen_tcp(ios, "127.0.0.1", 0, packet="resp")
    store: dict[bytes, bytes] = {}

    async def serve(port: ports.Port) -> None:
        async with port:
            async for message in port:
                if not isinstance(message, Data):
                    continue
                command = message.data
                name = command[0].upper()
                if name == b"SET":
                    store[command[1]] = command[2]
                    await port.send("OK")
                elif name == b"GET":
                    await port.send(encode_resp(store.get(command[1])))  # bytes go as they are
                elif name == b"PING":
                    await port.send("PONG")
                else:  # COMMAND DOCS and the like, which redis-cli asks first
                    await port.send([])

    async def serving() -> None:
        while True:
            tasks.start_soon(serve, await _accept(listener))

    number = str(listener.local_address[1])
    value = b"v" * 200_000
    async with listener, anyio.create_task_group() as tasks:
        tasks.start_soon(serving)
        with anyio.fail_after(20):
            done = await anyio.run_process([cli, "-p", number, "-r", "50", "PING"])
            assert done.stdout.split() == [b"PONG"] * 50
            done = await anyio.run_process([cli, "-p", number, "-x", "SET", "big"], input=value)
            assert done.stdout.strip() == b"OK"
            done = await anyio.run_process([cli, "-p", number, "GET", "big"])
            assert done.stdout.strip() == value
        tasks.cancel_scope.cancel()
    assert store[b"big"] == value


class _UnprintableError(Exception):
    """A decode error whose report itself fails (its ``repr`` raises)."""

    def __repr__(self) -> str:
        raise RuntimeError("no repr either")


# The two errors are reported as unraisable (sys.unraisablehook), as the I/O thread's own
# internal errors are: expected here.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_a_decode_error_whose_report_fails_still_closes_the_port_for_its_owner(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The drain builds the owner's last messages before it marks the port failed (every
    later event of it dropped): when building them fails too, the owner still gets
    ``Closed("internal error", "EIO")``.  Before, the port was marked first, the second
    error lost the messages, and the owner's receive waited for good (found by a review).
    A timestamp extension whose decoding raises such an error stands for any double fault
    (a MemoryError while the messages are built)."""

    def fails(self: object, *args: object, **kwargs: object) -> None:
        raise _UnprintableError("bad timestamp")

    monkeypatch.setattr(msgpack.ext.Timestamp, "__init__", fails)
    async with ioserver.open(core="native") as ios:
        listener = await ports.listen_tcp(ios, "127.0.0.1", 0, packet="msgpack")
        async with listener:
            with socket.create_connection(listener.local_address) as peer:
                port = await _accept(listener)
                async with port:
                    timestamp = b"\xd6\xff\x00\x00\x00\x01"
                    peer.sendall(msgpack.packb([1]) + timestamp + msgpack.packb([2]))
                    with anyio.fail_after(5):
                        assert await port.receive() == Data([1])
                        assert await port.receive() == Closed("internal error", "EIO")
        await until(lambda: ios.statistics().memory_in_use == 0)


class _OneByteMore(msgpack.Unpacker):  # type: ignore[misc]
    """A decoder that disagrees with the framer: it sees one byte more after each packet
    (the next object's first, as if the framer had cut an object short)."""

    def feed(self, next_bytes: bytes) -> None:
        super().feed(bytes(next_bytes) + b"\x05")


async def test_a_decoder_that_disagrees_with_the_framer_fails_the_port_and_carries_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The drain's reused msgpack decoder must consume exactly the packet the Rust framer
    cut: where they disagree (a decoder that sees a byte more stands for any disagreement),
    the port fails with ``Error("EPROTO", "... disagree ...")`` then ``Closed("EPROTO")``,
    and nothing of one packet begins the next.  Before, the extra byte stayed in the
    reused decoder and the next packet decoded as it: the owner got ``5`` for ``2``, a
    corrupt message, and went on."""
    monkeypatch.setattr(msgpack, "Unpacker", _OneByteMore)
    async with ioserver.open(core="native") as ios:
        listener = await ports.listen_tcp(ios, "127.0.0.1", 0, packet="msgpack")
        async with listener:
            with socket.create_connection(listener.local_address) as peer:
                port = await _accept(listener)
                async with port:
                    peer.sendall(msgpack.packb(1))
                    with anyio.fail_after(5):
                        first = await port.receive()
                    assert isinstance(first, Error), first
                    assert first.errno_name == "EPROTO"
                    ends = "disagree (1 bytes framed, the decoder's object ends before them)"
                    assert ends in first.message, first
                    peer.sendall(msgpack.packb(2))
                    with anyio.fail_after(5):
                        assert await port.receive() == Closed("EPROTO", "EPROTO")
                    assert _peer_ended(peer)
        await until(lambda: ios.statistics().memory_in_use == 0)


async def test_a_keyboard_interrupt_in_a_decode_propagates_and_loses_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A ``KeyboardInterrupt`` that lands in a msgpack decode (here in the timestamp
    extension's Python constructor, where a SIGINT's handler may run) propagates out of
    the drain (``Inbox.take``), as trio and anyio require of a ``BaseException`` that is
    not an ``Exception``; the next take returns the pairs built before it, the
    interrupted object decoded again and the rest, in order, each once.  Before, it was
    swallowed: the port was closed as an internal error, its later messages dropped.

    The test drains the inbox itself, synchronously (no checkpoint, so the hub cannot
    run meanwhile), and hands the pairs to their targets as the hub does."""
    original = msgpack.ext.Timestamp.__init__
    interrupts = [KeyboardInterrupt()]

    def interrupted(self: object, *args: Any, **kwargs: Any) -> None:
        if interrupts:
            raise interrupts.pop()
        original(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(msgpack.ext.Timestamp, "__init__", interrupted)
    async with ioserver.open(core="native") as ios:
        listener = await ports.listen_tcp(ios, "127.0.0.1", 0, packet="msgpack")
        async with listener:
            with socket.create_connection(listener.local_address) as peer:
                port = await _accept(listener)
                async with port:
                    inbox = ios._hub.inbox  # type: ignore[attr-defined]
                    timestamp = b"\xd6\xff\x00\x00\x00\x01"
                    peer.sendall(msgpack.packb([1]) + timestamp + msgpack.packb([2]))
                    pairs: list[tuple[Any, Any]] = []
                    raised = 0
                    deadline = time.monotonic() + 5  # (no checkpoint: fail_after cannot)
                    while sum(target is port for target, _ in pairs) < 3:
                        assert time.monotonic() < deadline, pairs
                        try:
                            pairs += inbox.take()
                        except KeyboardInterrupt:
                            raised += 1
                    assert raised == 1
                    ours = [message for target, message in pairs if target is port]
                    assert ours == [Data([1]), Data(msgpack.Timestamp(1)), Data([2])]
                    for target, message in pairs:
                        target._deliver(message)
                    for message in ours:
                        assert await port.receive() == message
        await until(lambda: ios.statistics().memory_in_use == 0)


@pytest.mark.every_core
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_a_decode_error_whose_report_fails_leaves_the_io_thread_serving(
    monkeypatch: pytest.MonkeyPatch, core: str, io_backend: str | None
) -> None:
    """A decode error whose report fails too (a timestamp extension raising an error whose
    ``repr`` raises) closes that port, ``Closed("internal error", "EIO")``, and the I/O
    thread serves on: another port echoes.  Before, on the Python core, the second fault
    escaped ``IOThread._internal_error`` and ended the I/O thread (every port lost)."""

    def fails(self: object, *args: object, **kwargs: object) -> None:
        raise _UnprintableError("bad timestamp")

    monkeypatch.setattr(msgpack.ext.Timestamp, "__init__", fails)
    async with ioserver.open(core=core, io_backend=io_backend) as ios:
        listener = await ports.listen_tcp(ios, "127.0.0.1", 0, packet="msgpack")
        async with listener:
            with socket.create_connection(listener.local_address) as peer:
                port = await _accept(listener)
                async with port:
                    timestamp = b"\xd6\xff\x00\x00\x00\x01"
                    peer.sendall(msgpack.packb([1]) + timestamp)
                    with anyio.fail_after(5):
                        while (message := await port.receive()) == Data([1]):
                            pass
                    assert message == Closed("internal error", "EIO")
            with socket.create_connection(listener.local_address) as peer:
                port = await _accept(listener)
                async with port:
                    peer.sendall(msgpack.packb([2]))
                    with anyio.fail_after(5):
                        assert await port.receive() == Data([2])
                    await port.send([3])
                    peer.settimeout(5)
                    assert peer.recv(16) == msgpack.packb([3])


# The MemoryError is reported as unraisable, as the drain's internal errors are.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("packet", ["msgpack", 4])
async def test_a_packet_whose_message_fails_to_build_keeps_the_budget_exact(
    packet: Any,
) -> None:
    """A packet whose ``Data`` message fails to build (a ``MemoryError``, injected by a
    test hook; a decoded object's or a framed port's bytes) fails its port - the owner
    gets ``Closed("internal error: ...", "EIO")``, not a silent gap - and its charge is
    counted taken: the memory in use comes back to 0.  Before, its charge had been
    appended to the port's sizes before the message was built: the message was lost, the
    port went on, the next packet taken popped the lost one's charge (a shift), and the
    difference stayed charged for good."""

    def frame(value: Any) -> bytes:
        if packet == "msgpack":
            return bytes(msgpack.packb(value))
        body = repr(value).encode()
        return len(body).to_bytes(4, "big") + body

    def message(value: Any) -> Data:
        return Data(value if packet == "msgpack" else repr(value).encode())

    async with ioserver.open(core="native", memory_limit=1 << 20) as ios:
        listener = await ports.listen_tcp(ios, "127.0.0.1", 0, packet=packet)
        async with listener:
            with socket.create_connection(listener.local_address) as peer:
                port = await _accept(listener)
                async with port:
                    peer.sendall(frame([1]))
                    with anyio.fail_after(5):
                        assert await port.receive() == message([1])
                    ios._hub.inbox._fail_packets_for_test(1)  # type: ignore[attr-defined]
                    peer.sendall(frame([2]))
                    # (A later packet, of another size: after a shift it would be
                    # credited the lost one's charge.)
                    later = [3, "x" * 100]
                    peer.sendall(frame(later))
                    with anyio.fail_after(5):
                        closed = await port.receive()
                        while closed == message(later):
                            closed = await port.receive()
                    assert isinstance(closed, Closed), closed
                    assert (closed.reason, closed.errno_name) == (
                        "internal error: MemoryError()",
                        "EIO",
                    )
        await until(lambda: ios.statistics().memory_in_use == 0)


async def test_a_refused_object_closes_its_own_port_even_once_its_slot_is_reused() -> None:
    """The drain closes a port whose object the decoder refused at the slot its packet
    came from (``DecodeFailed``, O(1)): if that port closed meanwhile and a new
    connection took its slot, the new one is left alone.  The test holds the loop (no
    checkpoint) while the I/O thread reads peer A's bad object and reset, closes A's
    port, and accepts peer B into the same slot; then the drain refuses A's object, and
    B's port echoes."""
    async with ioserver.open(core="native") as ios:
        core = ios._io._core  # type: ignore[attr-defined]
        listener = await ports.listen_tcp(ios, "127.0.0.1", 0, packet="msgpack")
        async with listener:
            first = socket.create_connection(listener.local_address)
            port = await _accept(listener)

            def until_now(condition: Any) -> None:  # (no checkpoint: the hub must not drain)
                deadline = time.monotonic() + 5
                while not condition():
                    assert time.monotonic() < deadline
                    time.sleep(0.001)

            first.sendall(b"\xa1\xff")  # a str that is not UTF-8: only the decoder refuses it
            first.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            first.close()  # a reset
            until_now(lambda: core.ports_open == 1)  # A's port closed, its slot free
            second = socket.create_connection(listener.local_address)
            until_now(lambda: core.ports_open == 2)  # B's accepted
            with second:
                with anyio.fail_after(5):
                    other = await _accept(listener)
                    while not isinstance(ended := await port.receive(), Closed):
                        assert isinstance(ended, Error), ended
                # (The slot was reused: the new port's Conn is in the old one's.)
                assert repr(other._conn).split()[-1] == repr(port._conn).split()[-1]
                async with port, other:
                    second.sendall(msgpack.packb("still here"))
                    with anyio.fail_after(5):
                        assert await other.receive() == Data("still here")
                    await other.send("and answering")
                    second.settimeout(5)
                    assert second.recv(64) == msgpack.packb("and answering")
        await until(lambda: ios.statistics().ports_open == 0)


@pytest.mark.python_core
@pytest.mark.parametrize("packet", ["msgpack", 4])
async def test_on_the_python_core_a_packet_whose_message_fails_keeps_the_budget_exact(
    monkeypatch: pytest.MonkeyPatch, packet: Any
) -> None:
    """The Python core's twin of the native test above: a read of two packets whose
    second ``Data`` fails to build (a ``MemoryError``, injected where the I/O thread sets
    a message's data) closes the port as an internal error, and the memory in use comes
    back to 0.  Before, the read's charges went to the port's sizes before its messages
    were built: the first message was delivered without being counted delivered, and
    its owner's take left the budget's count off by its charge."""
    from ioserver import _iothread

    original = _iothread._SET_DATA
    calls: list[object] = []

    def fails_second(message: object, payload: object) -> None:
        calls.append(payload)
        if len(calls) == 2:
            raise MemoryError
        original(message, payload)

    def frame(value: Any) -> bytes:
        if packet == "msgpack":
            return bytes(msgpack.packb(value))
        body = repr(value).encode()
        return len(body).to_bytes(4, "big") + body

    async with ioserver.open(core="python", memory_limit=1 << 20) as ios:
        listener = await ports.listen_tcp(ios, "127.0.0.1", 0, packet=packet)
        async with listener:
            with socket.create_connection(listener.local_address) as peer:
                port = await _accept(listener)
                async with port:
                    monkeypatch.setattr(_iothread, "_SET_DATA", fails_second)
                    peer.sendall(frame([1]) + frame([2, "x" * 100]))
                    with anyio.fail_after(5):
                        while not isinstance(message := await port.receive(), Closed):
                            pass
                    assert message.reason == "internal error: MemoryError()", message
        await until(lambda: ios.statistics().memory_in_use == 0)


async def test_a_keyboard_interrupt_failing_a_port_loses_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A ``KeyboardInterrupt`` that lands while the drain builds the messages of a port
    whose object the decoder refused (in ``errno_name``, a Python call where a SIGINT's
    handler may run) propagates out of ``Inbox.take``; the next take builds the event
    again: the owner gets ``Error("EPROTO")`` then ``Closed("EPROTO")`` once, and the
    packet's charge is taken once.  Before, the interrupt was reported as unraisable
    (swallowed) and the owner got ``Closed("internal error")`` instead."""
    original = _exceptions.errno_name
    interrupts = [KeyboardInterrupt()]

    def interrupted(number: int | None) -> str:
        if number == errno.EPROTO and interrupts:
            raise interrupts.pop()
        return original(number)

    monkeypatch.setattr(_exceptions, "errno_name", interrupted)  # read by a new inbox
    bad = b"\xa1\xff"  # a str that is not UTF-8
    try:
        msgpack.unpackb(bad, raw=False)
    except ValueError as exc:
        text = f"malformed msgpack data: {exc}"
    async with ioserver.open(core="native") as ios:
        listener = await ports.listen_tcp(ios, "127.0.0.1", 0, packet="msgpack")
        async with listener:
            with socket.create_connection(listener.local_address) as peer:
                port = await _accept(listener)
                async with port:
                    inbox = ios._hub.inbox  # type: ignore[attr-defined]
                    peer.sendall(msgpack.packb([1]) + bad + msgpack.packb([2]))
                    pairs: list[tuple[Any, Any]] = []
                    raised = 0
                    deadline = time.monotonic() + 5  # (no checkpoint: fail_after cannot)
                    while sum(target is port for target, _ in pairs) < 3:
                        assert time.monotonic() < deadline, pairs
                        try:
                            pairs += inbox.take()
                        except KeyboardInterrupt:
                            raised += 1
                    assert raised == 1
                    ours = [message for target, message in pairs if target is port]
                    closed = Closed("EPROTO", "EPROTO")
                    assert ours == [Data([1]), Error("EPROTO", errno.EPROTO, text), closed]
                    for target, message in pairs:
                        target._deliver(message)
                    for message in ours:
                        assert await port.receive() == message
                    assert _peer_ended(peer)
        await until(lambda: ios.statistics().memory_in_use == 0)
