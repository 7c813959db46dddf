"""Adversarial peers against the native I/O core, on both of its backends (epoll and
io_uring), with real sockets: bytes are hashed or numbered so that a byte lost,
duplicated or reordered shows, and one port's fault must not stall another.
"""

from __future__ import annotations

import hashlib
import os
import socket
import struct
import threading
from collections.abc import AsyncIterator

import anyio
import anyio.lowlevel
import pytest
from conftest import io_uring_refusal, until
from test_native_core import accept, receive_exactly

import ioserver
import ports
from ports import Closed, Data

# Each test names its cores (native with each backend; the Python core where both must
# agree): the second CI pass, on the Python core, need not run them again.
pytestmark = [pytest.mark.anyio, pytest.mark.core_independent]

#: Offsets the seeds of the randomised tests (IOSERVER_PROBE_SEED, for repeated runs).
SEED = int(os.environ.get("IOSERVER_PROBE_SEED", "0"))


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(params=["epoll", "io_uring"])
def backend(request: pytest.FixtureRequest) -> str:
    if request.param == "io_uring" and (refusal := io_uring_refusal()) is not None:
        pytest.skip(refusal)
    return str(request.param)


@pytest.fixture
async def nios(no_leaks: None, backend: str) -> AsyncIterator[ioserver.IOServer]:
    async with ioserver.open(core="native", io_backend=backend) as server:
        assert server.statistics().io_backend == backend
        yield server


@pytest.fixture(params=["native-epoll", "native-io_uring", "python"])
def core_backend(request: pytest.FixtureRequest) -> tuple[str, str | None]:
    """For the tests both cores must pass: (core, io_backend)."""
    core, _, backend = str(request.param).partition("-")
    if backend == "io_uring" and (refusal := io_uring_refusal()) is not None:
        pytest.skip(refusal)
    return core, backend or None


@pytest.fixture
async def any_ios(
    no_leaks: None, core_backend: tuple[str, str | None]
) -> AsyncIterator[ioserver.IOServer]:
    core, backend = core_backend
    async with ioserver.open(core=core, io_backend=backend) as server:
        yield server


def reset(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def read_all(sock: socket.socket, chunk: int = 4096) -> tuple[int, bytes]:
    """Read to EOF in small reads: (bytes read, sha256)."""
    digest = hashlib.sha256()
    total = 0
    while True:
        data = sock.recv(chunk)
        if not data:
            return total, digest.digest()
        digest.update(data)
        total += len(data)


def pattern(seed: int, size: int) -> bytes:
    return hashlib.sha256(seed.to_bytes(8, "big")).digest() * (size // 32) + b"\0" * (size % 32)


# -- a large payload to a slow reader, then close ------------------------------------------


async def test_a_large_send_then_close_reaches_a_slow_reader_exactly_once(
    nios: ioserver.IOServer,
) -> None:
    size = 6 * 1024 * 1024 + 123
    payload = os.urandom(size)
    listener = await ports.listen_tcp(nios, "127.0.0.1", 0, sndbuf=16384, linger=30)
    peer = socket.socket()
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
    try:
        peer.connect(listener.local_address)
        port = await accept(listener)
        # In pieces of odd sizes, gathered by the thread, then close at once.
        got: list[tuple[int, bytes]] = []

        async def reader() -> None:
            got.append(await anyio.to_thread.run_sync(read_all, peer, 1000))

        async with anyio.create_task_group() as group:
            group.start_soon(reader)
            offset = 0
            step = 1
            while offset < size:
                piece = payload[offset : offset + step]
                await port.send(piece)
                offset += len(piece)
                step = step * 3 + 7 if step < 300_000 else 1
            await port.aclose()
        total, digest = got[0]
        assert total == size
        assert digest == hashlib.sha256(payload).digest()
        await until(lambda: nios.statistics().ports_open == 1)
    finally:
        peer.close()
        await listener.aclose()


# -- many small sends interleaved with large ones ---------------------------------------------


def parse_records(sock: socket.socket, count: int) -> list[int]:
    """Records ``>II`` (length, seq) + payload(seq); returns the seqs, checking payloads."""
    buf = bytearray()
    seqs = []
    while len(seqs) < count:
        data = sock.recv(65536)
        assert data, f"EOF after {len(seqs)} records"
        buf += data
        while len(buf) >= 8:
            length, seq = struct.unpack_from(">II", buf)
            if len(buf) < 8 + length:
                break
            body = bytes(buf[8 : 8 + length])
            assert body == pattern(seq, length), f"record {seq} corrupted"
            seqs.append(seq)
            del buf[: 8 + length]
    return seqs


async def test_small_sends_interleaved_with_large_ones_keep_their_order(
    nios: ioserver.IOServer,
) -> None:
    count = 3000
    listener = await ports.listen_tcp(nios, "127.0.0.1", 0, sndbuf=32768)
    peer = socket.socket()
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    try:
        peer.connect(listener.local_address)
        port = await accept(listener)
        async with anyio.create_task_group() as group:
            result: list[list[int]] = []

            async def reader() -> None:
                result.append(await anyio.to_thread.run_sync(parse_records, peer, count))

            group.start_soon(reader)
            for seq in range(count):
                length = 200_000 + seq if seq % 97 == 0 else seq % 13
                await port.send(struct.pack(">II", length, seq) + pattern(seq, length))
        assert result[0] == list(range(count))
        await port.aclose()
    finally:
        peer.close()
        await listener.aclose()


# -- a peer that resets while output is queued both ways ---------------------------------------


async def test_a_reset_with_output_queued_both_ways_ends_one_port_only(
    nios: ioserver.IOServer,
) -> None:
    listener = await ports.listen_tcp(
        nios, "127.0.0.1", 0, sndbuf=16384, high_watermark=4 << 20, packet=4
    )
    bystander_peer = socket.create_connection(listener.local_address)
    peer = socket.socket()
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    try:
        bystander = await accept(listener)
        peer.connect(listener.local_address)
        port = await accept(listener)
        # The port queues output the peer never reads; the peer sends whole packets then
        # a partial one, never read by the owner until the reset.
        for _ in range(16):
            port.send_nowait(b"o" * 65536)
        frames = b"".join(struct.pack(">I", 1000) + pattern(i, 1000) for i in range(50))
        peer.sendall(frames + struct.pack(">I", 100_000) + b"partial")
        await until(lambda: port.statistics().bytes_received >= len(frames))
        reset(peer)
        got = []
        while True:
            message = await port.receive()
            if isinstance(message, Closed):
                assert message == Closed("ECONNRESET", "ECONNRESET"), message
                break
            assert isinstance(message, Data), message
            got.append(message.data)
        assert got == [pattern(i, 1000) for i in range(50)]
        with pytest.raises(ports.EndOfPort):
            await port.receive()
        # The other port still works both ways.
        bystander_peer.sendall(struct.pack(">I", 3) + b"abc")
        assert await bystander.receive() == Data(b"abc")
        await bystander.send(b"xyz")
        assert bystander_peer.recv(7) == struct.pack(">I", 3) + b"xyz"
        await port.aclose()
        await bystander.aclose()
        await until(lambda: nios.statistics().ports_open == 1)
    finally:
        bystander_peer.close()
        if peer.fileno() != -1:
            peer.close()
        await listener.aclose()


# -- half-close while the peer streams to us ----------------------------------------------


async def test_send_eof_while_the_peer_streams_loses_nothing_either_way(
    nios: ioserver.IOServer,
) -> None:
    size_in, size_out = 3 * 1024 * 1024, 2 * 1024 * 1024 + 17
    inbound, outbound = os.urandom(size_in), os.urandom(size_out)
    listener = await ports.listen_tcp(nios, "127.0.0.1", 0, sndbuf=16384, high_watermark=4 << 20)
    peer = socket.create_connection(listener.local_address)
    try:
        port = await accept(listener)
        sender = threading.Thread(target=peer.sendall, args=(inbound,))
        sender.start()
        try:
            for offset in range(0, size_out, 100_000):
                port.send_nowait(outbound[offset : offset + 100_000])
            await port.send_eof()
            got_out = await anyio.to_thread.run_sync(read_all, peer, 65536)
            assert got_out == (size_out, hashlib.sha256(outbound).digest())
            data = await receive_exactly(port, size_in)
            assert hashlib.sha256(data).digest() == hashlib.sha256(inbound).digest()
        finally:
            await anyio.to_thread.run_sync(sender.join)
        peer.shutdown(socket.SHUT_WR)
        assert await port.receive() == Closed("eof")
        await port.aclose()
        await until(lambda: nios.statistics().ports_open == 1)
    finally:
        peer.close()
        await listener.aclose()


# -- connect/close churn while another port streams ----------------------------------------


async def test_connect_close_churn_does_not_disturb_a_streaming_port(
    nios: ioserver.IOServer,
) -> None:
    size = 8 * 1024 * 1024
    payload = os.urandom(size)
    listener = await ports.listen_tcp(nios, "127.0.0.1", 0)
    peer = socket.create_connection(listener.local_address)
    try:
        port = await accept(listener)
        churned = 0

        async def churn() -> None:
            nonlocal churned
            for index in range(600):
                client = await ports.connect_tcp(nios, *listener.local_address)
                server = await accept(listener)
                if index % 3 == 0:
                    await client.send(b"ping%d" % index)
                    assert await server.receive() == Data(b"ping%d" % index)
                if index % 2:
                    await server.aclose()
                    await client.aclose()
                else:
                    await client.aclose()
                    assert isinstance(await server.receive(), Closed)
                    await server.aclose()
                churned += 1

        async def stream() -> None:
            for offset in range(0, size, 65536):
                await port.send(payload[offset : offset + 65536])
            await port.send_eof()

        async with anyio.create_task_group() as group:
            group.start_soon(churn)
            group.start_soon(stream)
            total, digest = await anyio.to_thread.run_sync(read_all, peer, 65536)
        assert churned == 600
        assert total == size and digest == hashlib.sha256(payload).digest()
        await port.aclose()
    finally:
        peer.close()
        await listener.aclose()


# -- a waiting owner under memory_limit while others never read -----------------------------


@pytest.mark.parametrize("packet", [4, "line", "msgpack"])
async def test_a_waiting_owner_gets_its_data_while_others_fill_the_budget(
    no_leaks: None, backend: str, packet: object
) -> None:
    limit = 2 * 1024 * 1024
    async with ioserver.open(core="native", io_backend=backend, memory_limit=limit) as nios:
        listener = await ports.listen_tcp(
            nios, "127.0.0.1", 0, packet=packet, high_msgq_watermark=64 << 20
        )
        floods = [socket.create_connection(listener.local_address) for _ in range(6)]
        waiting_peer = socket.create_connection(listener.local_address)
        stop = threading.Event()
        try:
            idle = [await accept(listener) for _ in floods]
            waiting = await accept(listener)

            def frame(body: bytes) -> bytes:
                if packet == "msgpack":
                    import msgpack

                    return msgpack.packb(body)
                return struct.pack(">I", len(body)) + body if packet == 4 else body + b"\n"

            def flood(sock: socket.socket) -> None:
                body = frame(b"f" * 4000)
                try:
                    while not stop.is_set():
                        sock.sendall(body * 16)
                except OSError:
                    pass

            threads = [threading.Thread(target=flood, args=(s,)) for s in floods]
            for t in threads:
                t.start()
            try:
                await until(lambda: nios.statistics().global_pauses > 0, 20)
                for i in range(200):
                    body = b"w%06d" % i + b"." * (i * 37 % 3000)
                    waiting_peer.sendall(frame(body))
                    with anyio.fail_after(10):
                        expected = body + b"\n" if packet == "line" else body
                        assert await waiting.receive() == Data(expected)
                statistics = nios.statistics()
                assert statistics.peak_memory <= limit, statistics
            finally:
                stop.set()
                for s in floods:
                    s.shutdown(socket.SHUT_RDWR)
                for t in threads:
                    await anyio.to_thread.run_sync(t.join)
            for p in idle:
                await p.aclose()
            await waiting.aclose()
        finally:
            for s in floods:
                s.close()
            waiting_peer.close()
            await listener.aclose()


# -- close while the peer is blocked writing to us ------------------------------------------


async def test_close_with_output_queued_while_the_peer_floods_us(
    nios: ioserver.IOServer,
) -> None:
    """The owner queues 4 MiB and closes without reading what the peer sends (8 MiB, the
    peer blocked writing until the thread drops it): the peer gets our bytes exactly."""
    size_out, size_in = 4 * 1024 * 1024, 8 * 1024 * 1024
    outbound = os.urandom(size_out)
    listener = await ports.listen_tcp(
        nios, "127.0.0.1", 0, sndbuf=16384, high_watermark=8 << 20, active=False
    )
    peer = socket.create_connection(listener.local_address)
    sender_error: list[BaseException] = []

    def flood() -> None:
        try:
            peer.sendall(b"i" * size_in)
        except OSError as exc:
            sender_error.append(exc)

    sender = threading.Thread(target=flood)
    try:
        port = await accept(listener)
        sender.start()
        for offset in range(0, size_out, 65536):
            port.send_nowait(outbound[offset : offset + 65536])
        await port.aclose()
        got = await anyio.to_thread.run_sync(read_all, peer, 65536)
        assert got == (size_out, hashlib.sha256(outbound).digest())
        await anyio.to_thread.run_sync(sender.join)
        await until(lambda: nios.statistics().ports_open == 1)
    finally:
        if sender.is_alive():
            peer.shutdown(socket.SHUT_RDWR)
            await anyio.to_thread.run_sync(sender.join)
        peer.close()
        await listener.aclose()


# -- a paused port whose peer half-closes ---------------------------------------------------


@pytest.mark.parametrize("packet", ["raw", "line", 4])
async def test_active_once_after_a_burst_and_fin_delivers_all_in_order(
    nios: ioserver.IOServer, packet: object
) -> None:
    count = 5000
    listener = await ports.listen_tcp(nios, "127.0.0.1", 0, packet=packet, active="once")
    peer = socket.create_connection(listener.local_address)
    try:
        port = await accept(listener)
        if packet == "line":
            wire = b"".join(b"%d\n" % i for i in range(count))
        elif packet == 4:
            wire = b"".join(struct.pack(">I", len(b"%d" % i)) + b"%d" % i for i in range(count))
        else:
            wire = b"".join(b"%d," % i for i in range(count))
        await anyio.to_thread.run_sync(peer.sendall, wire)
        peer.shutdown(socket.SHUT_WR)
        got = bytearray()
        with anyio.fail_after(20):
            while True:
                message = await port.receive()
                if isinstance(message, Closed):
                    assert message == Closed("eof")
                    break
                if isinstance(message, Data):
                    if packet == 4:
                        got += struct.pack(">I", len(message.data))
                    got += message.data
                    port.setopts(active="once")
        assert bytes(got) == wire
        await port.aclose()
    finally:
        peer.close()
        await listener.aclose()


# -- many framed echoes under a small budget, with shifting active modes ---------------------


@pytest.mark.parametrize("limit", [None, 4 * 1024 * 1024])
async def test_framed_echoes_under_a_small_budget_keep_every_packet_in_order(
    no_leaks: None, backend: str, limit: int | None
) -> None:
    import random

    count, frames = 24, 400
    async with ioserver.open(core="native", io_backend=backend, memory_limit=limit) as nios:
        listener = await ports.listen_tcp(
            nios,
            "127.0.0.1",
            0,
            packet=4,
            high_msgq_watermark=32 * 1024,
            low_msgq_watermark=8 * 1024,
            high_watermark=64 * 1024,
            low_watermark=16 * 1024,
        )

        async def echo(port: ports.Port, seed: int) -> None:
            rng = random.Random(seed + SEED)
            async with port:
                while True:
                    mode = rng.choice(["once", 3, True, False])
                    port.setopts(active=mode)
                    if mode is False:
                        message = await port.receive()  # a passive read
                    else:
                        message = await port.receive()
                    if isinstance(message, Closed):
                        assert message == Closed("eof"), (seed, message, nios.statistics())
                        return
                    if isinstance(message, ports.Passive):
                        continue
                    assert isinstance(message, Data), (seed, message)
                    await port.send(message.data)

        async def peer(index: int) -> None:
            rng = random.Random(index + SEED)
            bodies = [
                struct.pack(">II", index, seq) + pattern(seq, rng.choice([0, 1, 50, 3000, 70000]))
                for seq in range(frames)
            ]
            wire = b"".join(struct.pack(">I", len(b)) + b for b in bodies)
            async with await anyio.connect_tcp(*listener.local_address) as stream:

                async def send() -> None:
                    offset = 0
                    while offset < len(wire):
                        step = rng.choice([1, 7, 1000, 65536, 300_000])
                        await stream.send(wire[offset : offset + step])
                        offset += step
                    await stream.send_eof()

                got = bytearray()
                async with anyio.create_task_group() as group:
                    group.start_soon(send)
                    while len(got) < len(wire):
                        got += await stream.receive()
                assert bytes(got) == wire, index

        async with listener, anyio.create_task_group() as servers:
            with anyio.fail_after(60):
                async with anyio.create_task_group() as peers:
                    for index in range(count):
                        peers.start_soon(peer, index)
                    for index in range(count):
                        servers.start_soon(echo, await accept(listener), index)
        if limit is not None:
            statistics = nios.statistics()
            assert statistics.peak_memory <= limit + 64 * 1024 * count, statistics


# -- a listener closed with accepted connections its owner never took -----------------------


async def test_a_listener_closed_with_untaken_accepts_leaves_nothing_open(
    nios: ioserver.IOServer,
) -> None:
    listener = await ports.listen_tcp(nios, "127.0.0.1", 0, packet="line")
    peers = [socket.create_connection(listener.local_address) for _ in range(40)]
    try:
        for index, peer in enumerate(peers):
            peer.sendall(b"hello %d\n" % index)
        await until(lambda: nios.statistics().ports_open == 41)
        await listener.aclose()
        await until(lambda: nios.statistics().ports_open == 0)
        for peer in peers:
            peer.settimeout(10)
            try:
                assert peer.recv(100) == b""
            except ConnectionResetError:
                pass
    finally:
        for peer in peers:
            peer.close()


# -- a port paused by its watermark whose peer sends its end ----------------------------------


@pytest.mark.parametrize("packet", ["raw", "line", 4])
async def test_a_paused_port_whose_peer_ends_gets_everything_then_eof(
    nios: ioserver.IOServer, packet: object
) -> None:
    count = 20_000
    listener = await ports.listen_tcp(
        nios,
        "127.0.0.1",
        0,
        packet=packet,
        high_msgq_watermark=16 * 1024,
        low_msgq_watermark=4 * 1024,
        recbuf=8192,
    )
    peer = socket.create_connection(listener.local_address)
    try:
        port = await accept(listener)
        if packet == "line":
            wire = b"".join(b"%d\n" % i for i in range(count))
        elif packet == 4:
            wire = b"".join(struct.pack(">I", len(b"%d" % i)) + b"%d" % i for i in range(count))
        else:
            wire = b"".join(b"%d," % i for i in range(count))
        sender = threading.Thread(target=lambda: (peer.sendall(wire), peer.shutdown(1)))
        sender.start()
        try:
            await until(lambda: port.statistics().pauses > 0)
            got = bytearray()
            with anyio.fail_after(20):
                while True:
                    message = await port.receive()
                    if isinstance(message, Closed):
                        assert message == Closed("eof")
                        break
                    assert isinstance(message, Data), message
                    if packet == 4:
                        got += struct.pack(">I", len(message.data))
                    got += message.data
                    if len(got) % 7 == 0:
                        await anyio.lowlevel.checkpoint()
        finally:
            await anyio.to_thread.run_sync(sender.join)
        assert bytes(got) == wire
        assert port.statistics().pauses > 1
        await port.aclose()
    finally:
        peer.close()
        await listener.aclose()


# -- packets already read and held past the active credit, then a write fails ----------------


@pytest.mark.parametrize(
    "reply",
    [
        pytest.param(
            True,
            marks=pytest.mark.xfail(
                strict=True,
                reason="core.rs IoThread::broken -> close_stream drops the held packets "
                "(s.rare) when a write fails (after_write's error arm): packets already "
                "read are lost, where a reset seen by a read delivers them first (the "
                "Python core does the same)",
            ),
        ),
        False,  # the control: no reply sent, the held packets arrive, then the end
    ],
)
@pytest.mark.parametrize("packet", ["line", 4])
async def test_packets_held_past_the_credit_survive_a_reset(
    nios: ioserver.IOServer, packet: object, reply: bool
) -> None:
    """The peer sends three whole packets in one segment and resets.  The port, active
    once, delivers the first and holds the other two (read, counted in bytes_received);
    with ``reply`` its owner then sends a reply, whose write fails on the reset.  The two
    packets the I/O thread already holds are the peer's, read before the reset: they must
    still reach the owner, before ``Closed("ECONNRESET")`` - as they do when the owner
    does not send (the read that finds the reset comes after them), and as a reset
    mid-packet delivers the whole packets before it."""
    listener = await ports.listen_tcp(nios, "127.0.0.1", 0, packet=packet, active="once")
    peer = socket.create_connection(listener.local_address)
    try:
        port = await accept(listener)
        bodies = (
            [b"first\n", b"second\n", b"third\n"] if packet == "line" else [b"1", b"22", b"333"]
        )
        wire = b"".join(b if packet == "line" else struct.pack(">I", len(b)) + b for b in bodies)
        peer.sendall(wire)
        assert await port.receive() == Data(bodies[0])
        await until(lambda: port.statistics().bytes_received == len(wire))
        reset(peer)
        if reply:
            await port.send(b"reply\n" if packet == "line" else b"reply")
            # The write finds the reset: the thread closes the stream.
            await until(lambda: nios.statistics().ports_open == 1)
        got = []
        with anyio.fail_after(5):
            while True:
                message = await port.receive()
                got.append(message)
                if isinstance(message, Closed):
                    break
        assert got == [Data(bodies[1]), Data(bodies[2]), Closed("ECONNRESET", "ECONNRESET")]
        await port.aclose()
    finally:
        if peer.fileno() != -1:
            peer.close()
        await listener.aclose()


# -- close while a naive peer writes everything before it reads -----------------------------


def write_then_read(sock: socket.socket, size: int) -> tuple[int, bytes] | str:
    """A naive peer: send ``size`` bytes, then read to the end (or the error's name)."""
    try:
        sock.sendall((b"i" * 99 + b"\n") * (size // 100))
        return read_all(sock, 65536)
    except OSError as exc:
        return type(exc).__name__


@pytest.mark.parametrize(
    "paused_by",
    [
        "passive",
        "watermark",
        "held",
    ],
)
async def test_a_closing_port_drains_a_peer_that_writes_before_it_reads(
    any_ios: ioserver.IOServer, paused_by: str
) -> None:
    """The owner queues 2 MiB and closes, not having read what its peer sends; the peer
    writes 8 MiB before it reads anything.  The closing port reads and drops what
    arrives (``close_linger``: "so that a peer blocked writing to us can drain what we
    flush to it"), so the peer gets every byte before ``linger`` (5 s) runs out."""
    size_out, size_in = 2 * 1024 * 1024, 8 * 1024 * 1024
    outbound = os.urandom(size_out)
    options: dict[str, object] = {
        "passive": {"active": False},
        "watermark": {"high_msgq_watermark": 64 * 1024, "low_msgq_watermark": 16 * 1024},
        # Active once, framed: the first read's packets past the first are held.
        "held": {"active": "once", "packet": "line"},
    }[paused_by]
    listener = await ports.listen_tcp(
        any_ios, "127.0.0.1", 0, sndbuf=16384, high_watermark=8 << 20, linger=5, **options
    )
    peer = socket.create_connection(listener.local_address)
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    try:
        port = await accept(listener)
        async with anyio.create_task_group() as group:
            result: list[object] = []

            async def naive() -> None:
                result.append(await anyio.to_thread.run_sync(write_then_read, peer, size_in))

            group.start_soon(naive)
            if paused_by == "watermark":
                await until(lambda: port.statistics().pauses > 0)
            if paused_by == "held":
                await until(lambda: port.statistics().bytes_received > 0)
            chunks = [outbound[offset : offset + 65536] for offset in range(0, size_out, 65536)]
            for chunk in chunks:
                port.send_nowait(chunk)
            await port.aclose()
        # (A line port's send ends what it sends with its delimiter, if it does not.)
        lines = [chunk if chunk.endswith(b"\n") else chunk + b"\n" for chunk in chunks]
        wire = b"".join(lines) if paused_by == "held" else outbound
        assert result == [(len(wire), hashlib.sha256(wire).digest())]
        assert any_ios.statistics().linger_timeouts == 0
    finally:
        peer.close()
        await listener.aclose()


async def test_a_closing_port_drains_its_peer_while_other_ports_fill_the_budget(
    no_leaks: None, core_backend: tuple[str, str | None]
) -> None:
    """As above, with the memory budget held above half by other ports whose owners do
    not read: what the closing port reads is dropped, never charged, so the budget has no
    reason to stop it - yet if it does, the naive peer never gets to read and the close
    ends in ``linger``'s reset."""
    limit = 1024 * 1024
    size_out, size_in = 2 * 1024 * 1024, 8 * 1024 * 1024
    outbound = os.urandom(size_out)
    core, backend = core_backend
    async with ioserver.open(core=core, io_backend=backend, memory_limit=limit) as nios:
        listener = await ports.listen_tcp(
            nios,
            "127.0.0.1",
            0,
            sndbuf=16384,
            high_watermark=8 << 20,
            linger=5,
            high_msgq_watermark=16 << 20,
        )
        floods = [socket.create_connection(listener.local_address) for _ in range(3)]
        stop = threading.Event()

        def flood(sock: socket.socket) -> None:
            try:
                while not stop.is_set():
                    sock.sendall(b"f" * 65536)
            except OSError:
                pass

        threads = [threading.Thread(target=flood, args=(s,)) for s in floods]
        peer = socket.socket()
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
        try:
            idle = [await accept(listener) for _ in floods]
            for t in threads:
                t.start()
            assert not any(p.closed for p in idle)
            await until(lambda: nios.statistics().global_pauses > 0)
            await until(lambda: nios.statistics().memory_in_use > limit // 2)
            peer.connect(listener.local_address)
            port = await accept(listener)
            async with anyio.create_task_group() as group:
                result: list[object] = []

                async def naive() -> None:
                    result.append(await anyio.to_thread.run_sync(write_then_read, peer, size_in))

                group.start_soon(naive)
                for offset in range(0, size_out, 65536):
                    port.send_nowait(outbound[offset : offset + 65536])
                await port.aclose()
            assert result == [(size_out, hashlib.sha256(outbound).digest())]
            assert nios.statistics().linger_timeouts == 0
        finally:
            stop.set()
            for s in floods:
                s.shutdown(socket.SHUT_RDWR)
            for t in threads:
                await anyio.to_thread.run_sync(t.join)
            for s in floods:
                s.close()
            peer.close()
            await listener.aclose()


async def test_reset_churn_with_queued_output_does_not_disturb_a_streaming_port(
    nios: ioserver.IOServer,
) -> None:
    """Peers that connect, get output queued to them and reset at once, 400 times, while
    another port streams 8 MiB each way: the stream's bytes arrive exactly, each churned
    port ends with one Closed, and nothing stays open."""
    size = 8 * 1024 * 1024
    payload = os.urandom(size)
    inbound = os.urandom(size)
    listener = await ports.listen_tcp(nios, "127.0.0.1", 0, sndbuf=16384, high_watermark=1 << 20)
    peer = socket.create_connection(listener.local_address)
    try:
        port = await accept(listener)
        ends: list[object] = []

        async def churn() -> None:
            for index in range(400):
                raw = socket.create_connection(listener.local_address)
                server = await accept(listener)
                server.send_nowait(b"x" * (200_000 + index))
                raw.sendall(b"y" * (index * 100))
                reset(raw)
                while True:
                    message = await server.receive()
                    if isinstance(message, Closed):
                        ends.append(message)
                        break
                    assert isinstance(message, Data)
                await server.aclose()

        async def stream_out() -> None:
            for offset in range(0, size, 65536):
                await port.send(payload[offset : offset + 65536])
            await port.send_eof()

        sender = threading.Thread(target=lambda: (peer.sendall(inbound), peer.shutdown(1)))
        sender.start()
        try:
            async with anyio.create_task_group() as group:
                group.start_soon(churn)
                group.start_soon(stream_out)
                got_in = await receive_exactly(port, size)
                total, digest = await anyio.to_thread.run_sync(read_all, peer, 65536)
        finally:
            await anyio.to_thread.run_sync(sender.join)
        assert total == size and digest == hashlib.sha256(payload).digest()
        assert got_in == inbound
        assert await port.receive() == Closed("eof")
        assert len(ends) == 400
        assert all(isinstance(end, Closed) for end in ends)
        await port.aclose()
        await until(lambda: nios.statistics().ports_open == 1)
    finally:
        peer.close()
        await listener.aclose()


async def test_a_burst_past_iov_max_in_one_tick_keeps_its_order(
    nios: ioserver.IOServer,
) -> None:
    """5000 sends queued in one tick of the loop (past IOV_MAX buffers a gather), small
    ones between large ones, to a slow reader: every record arrives once, in order."""
    count = 5000
    listener = await ports.listen_tcp(nios, "127.0.0.1", 0, sndbuf=16384, high_watermark=256 << 20)
    peer = socket.socket()
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
    try:
        peer.connect(listener.local_address)
        port = await accept(listener)
        for seq in range(count):
            length = 100_000 if seq % 499 == 0 else seq % 5
            port.send_nowait(struct.pack(">II", length, seq) + pattern(seq, length))
        assert await anyio.to_thread.run_sync(parse_records, peer, count) == list(range(count))
        await port.aclose()
    finally:
        peer.close()
        await listener.aclose()


@pytest.mark.parametrize(
    "write",
    [
        False,
        pytest.param(
            True,
            marks=pytest.mark.xfail(
                strict=True,
                reason="after_write's error arm (core.rs) -> IoThread::broken closes the "
                "stream at once: the peer's bytes already in the socket's receive queue "
                "(acknowledged by TCP) are never read, where the read that finds the reset "
                "delivers them first",
            ),
        ),
    ],
)
async def test_a_passive_ports_unread_input_survives_a_failed_write(
    nios: ioserver.IOServer, write: bool
) -> None:
    """A passive port's peer sends 1000 bytes and resets.  Without a write, the owner's
    next receive gets the 1000 bytes, then ``Closed("ECONNRESET")``; with a reply sent
    first, whose write finds the reset, the bytes must not be lost either."""
    listener = await ports.listen_tcp(nios, "127.0.0.1", 0, active=False)
    peer = socket.create_connection(listener.local_address)
    try:
        port = await accept(listener)
        peer.sendall(b"z" * 1000)
        reset(peer)  # (loopback: the bytes and the reset are in our socket when it returns)
        if write:
            await port.send(b"reply")
            await until(lambda: nios.statistics().ports_open == 1)
        got = []
        with anyio.fail_after(5):
            while True:
                message = await port.receive()
                got.append(message)
                if isinstance(message, Closed):
                    break
        assert got == [Data(b"z" * 1000), Closed("ECONNRESET", "ECONNRESET")]
        await port.aclose()
    finally:
        if peer.fileno() != -1:
            peer.close()
        await listener.aclose()


@pytest.mark.parametrize(
    "unread",
    [
        False,
        pytest.param(
            True,
            marks=pytest.mark.xfail(
                strict=True,
                reason="core.rs close_linger (and finish_write's close_pending arm) call "
                "close_stream as soon as the thread's queue is empty: close() of a socket "
                "with unread input makes Linux send a reset and drop the output still in "
                "the kernel's send buffer, so a prompt peer loses the tail",
            ),
        ),
    ],
)
async def test_a_close_after_the_queue_is_written_keeps_the_kernels_unsent_bytes(
    nios: ioserver.IOServer, unread: bool
) -> None:
    """The owner's 2 MiB are all handed to the kernel (``bytes_queued`` 0) but not yet
    sent - the peer reads slowly - when it closes.  The peer must still get every byte,
    then the end; also when the peer had sent bytes the passive owner never read (Linux
    answers a close() with unread input by a reset, which drops the unsent output)."""
    size = 2 * 1024 * 1024
    outbound = os.urandom(size)
    listener = await ports.listen_tcp(nios, "127.0.0.1", 0, active=False, high_watermark=8 << 20)
    peer = socket.socket()
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    try:
        peer.connect(listener.local_address)
        port = await accept(listener)
        if unread:
            peer.sendall(b"a request the owner never reads")
        for offset in range(0, size, 65536):
            port.send_nowait(outbound[offset : offset + 65536])
        await until(lambda: port.statistics().bytes_sent == size)
        await port.aclose()
        await until(lambda: nios.statistics().ports_open == 1)
        result = await anyio.to_thread.run_sync(read_all, peer, 4096)
        assert result == (size, hashlib.sha256(outbound).digest())
    finally:
        peer.close()
        await listener.aclose()
