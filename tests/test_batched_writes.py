"""Batched writes (Linux AIO) and the flush point, against real sockets on loopback.

The writer itself is tested on socket pairs; the I/O server's behaviour is tested with
batching on and off (``IOSERVER_BATCHED_WRITES=0``), since both paths ship: the second is
what every platform without Linux AIO runs.
"""

from __future__ import annotations

import errno
import socket
import sys
import threading
from collections.abc import AsyncIterator, Iterator

import anyio
import pytest

import ioserver
import ports
from ioserver._aio import BATCH_CAPACITY, BatchWriter, open_batch_writer
from ports import Accepted, Data

pytestmark = pytest.mark.python_core


@pytest.fixture
def writer() -> Iterator[BatchWriter]:
    opened = open_batch_writer()
    if opened is None:
        pytest.skip("Linux AIO (io_setup) is not available here: batched writes are off")
    yield opened
    opened.close()


def socket_pairs(count: int) -> list[tuple[socket.socket, socket.socket]]:
    pairs = [socket.socketpair() for _ in range(count)]
    for ours, _ in pairs:
        ours.setblocking(False)
    return pairs


def close_all(pairs: list[tuple[socket.socket, socket.socket]]) -> None:
    for ours, theirs in pairs:
        ours.close()
        theirs.close()


# -- the writer ---------------------------------------------------------------------------


def test_one_submit_writes_every_socket_in_order(writer: BatchWriter) -> None:
    pairs = socket_pairs(300)  # more than one batch: the caller submits when full
    try:
        payloads = [f"response {index}\n".encode() * (index % 7 + 1) for index in range(300)]
        results: list[int | None] = []
        for (ours, _), payload in zip(pairs, payloads, strict=True):
            writer.add(ours.fileno(), payload)
            if writer.full:
                results += writer.submit()
        results += writer.submit()
        assert results == [len(payload) for payload in payloads]
        assert writer.batches == -(-300 // BATCH_CAPACITY) and writer.writes == 300
        for (_, theirs), payload in zip(pairs, payloads, strict=True):
            assert theirs.recv(65536) == payload
    finally:
        close_all(pairs)


def test_a_full_socket_gives_a_partial_write_then_eagain(writer: BatchWriter) -> None:
    (pair,) = socket_pairs(1)
    ours, _ = pair
    try:
        big = b"x" * (8 << 20)  # far more than the socket buffers hold
        writer.add(ours.fileno(), big)
        (first,) = writer.submit()
        assert first is not None and 0 < first < len(big)
        writer.add(ours.fileno(), big[first:])
        assert writer.submit() == [-errno.EAGAIN]
    finally:
        close_all([pair])


def test_errors_are_per_socket(writer: BatchWriter) -> None:
    pairs = socket_pairs(3)
    try:
        pairs[1][1].close()  # the middle peer is gone: EPIPE for it alone
        for ours, _ in pairs:
            writer.add(ours.fileno(), b"hello")
        results = writer.submit()
        assert results[0] == 5 and results[2] == 5
        assert results[1] in (-errno.EPIPE, -errno.ECONNRESET)
        assert pairs[0][1].recv(10) == b"hello" and pairs[2][1].recv(10) == b"hello"
    finally:
        close_all(pairs)


def test_a_bad_descriptor_is_refused_before_anything_is_written(writer: BatchWriter) -> None:
    with socket.socket() as closed:
        bad_fd = closed.fileno()
    writer.add(bad_fd, b"data")
    assert writer.submit() == [None]  # not taken: the caller writes it (and sees EBADF)


def test_the_writer_keeps_no_buffer_once_its_writes_completed(writer: BatchWriter) -> None:
    """Issue 12, item 8: a slot used to keep its last buffer alive until reused."""
    pairs = socket_pairs(BATCH_CAPACITY)
    try:
        payloads = [bytes([index % 256]) * 4096 for index in range(BATCH_CAPACITY)]
        references = [sys.getrefcount(payload) for payload in payloads]
        for (ours, _), payload in zip(pairs, payloads, strict=True):
            writer.add(ours.fileno(), payload)
        del payload
        assert writer.submit() == [4096] * BATCH_CAPACITY
        assert [sys.getrefcount(payload) for payload in payloads] == references
    finally:
        close_all(pairs)


def test_completions_posted_after_io_submit_are_waited_for(writer: BatchWriter) -> None:
    """Where socket AIO completes asynchronously (gVisor), the zero-timeout collection
    finds nothing at first: the writer then waits for the completions (for real here: they
    are posted, and the blocking io_getevents collects them)."""
    pairs = socket_pairs(3)
    collections = 0
    real_getevents = writer._getevents

    def not_yet(count: int) -> int:
        nonlocal collections
        collections += 1
        writer._getevents = real_getevents
        return 0

    writer._getevents = not_yet
    try:
        for index, (ours, _) in enumerate(pairs):
            writer.add(ours.fileno(), b"write %d" % index)
        assert writer.submit() == [7, 7, 7]
        assert collections == 1 and writer.failure is None
        for index, (_, theirs) in enumerate(pairs):
            assert theirs.recv(100) == b"write %d" % index
    finally:
        close_all(pairs)


def test_an_empty_submit_and_a_second_close_do_nothing(writer: BatchWriter) -> None:
    assert writer.submit() == []
    writer.close()
    writer.close()


# -- the I/O server, batched and port by port ----------------------------------------------


@pytest.fixture(params=["batched", "port-by-port"])
async def any_ios(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, no_leaks: None
) -> AsyncIterator[ioserver.IOServer]:
    if request.param == "port-by-port":
        monkeypatch.setenv("IOSERVER_BATCHED_WRITES", "0")
    elif _batching_unavailable():
        pytest.skip("Linux AIO (io_setup) is not available here: batched writes are off")
    async with ioserver.open() as server:
        assert server.statistics().batched_writes == (request.param == "batched")
        yield server


def _batching_unavailable() -> bool:
    probe = open_batch_writer()
    if probe is None:
        return True
    probe.close()
    return False


async def _serve_uppercase(listener: ports.Listener, count: int) -> None:
    async with anyio.create_task_group() as task_group:
        for _ in range(count):
            accepted = await listener.receive()
            assert isinstance(accepted, Accepted)
            task_group.start_soon(_uppercase, accepted.port)


async def _uppercase(port: ports.Port) -> None:
    async with port:
        async for message in port:
            if isinstance(message, Data):
                await port.send(message.data.upper())


@pytest.mark.anyio
async def test_many_connections_get_every_byte_in_order(any_ios: ioserver.IOServer) -> None:
    """100 clients, 200 requests each in flight together: the writes of a round go out in
    batches, and each client reads exactly its own answers, in order."""
    clients, rounds = 100, 200
    async with await ports.listen_tcp(any_ios, "127.0.0.1", 0) as listener:
        address = listener.local_address

        async def client(index: int) -> None:
            async with await anyio.connect_tcp(*address) as stream:
                expected = b""
                for step in range(rounds):
                    line = f"client {index} line {step};".encode()
                    await stream.send(line)
                    expected += line.upper()
                    if step % 50 == 49:
                        received = b""
                        while len(received) < len(expected):
                            received += await stream.receive()
                        assert received == expected
                        expected = b""

        async with anyio.create_task_group() as task_group:
            task_group.start_soon(_serve_uppercase, listener, clients)
            async with anyio.create_task_group() as client_group:
                for index in range(clients):
                    client_group.start_soon(client, index)
    statistics = any_ios.statistics()
    assert statistics.batched_writes == (any_ios._io._writer is not None)
    if statistics.batched_writes:
        # It did batch: more writes than io_submit calls, and it waited for flush points.
        assert statistics.batched_write_count > statistics.write_batches > 0
        assert statistics.flush_waits > 0
    else:
        assert statistics.write_batches == statistics.flush_waits == 0


@pytest.mark.anyio
async def test_a_slow_reader_gets_everything_through_partial_writes(
    any_ios: ioserver.IOServer,
) -> None:
    """Output far beyond the socket buffers, to a peer that reads late: partial batched
    writes continue through EPOLLOUT until every byte is there."""
    size = 16 << 20
    async with await ports.listen_tcp(any_ios, "127.0.0.1", 0) as listener:
        with socket.create_connection(listener.local_address) as peer:
            accepted = await listener.receive()
            assert isinstance(accepted, Accepted)
            async with accepted.port as port:
                received = bytearray()

                def read_all() -> None:
                    while len(received) < size:
                        chunk = peer.recv(1 << 20)
                        assert chunk
                        received.extend(chunk)

                async with anyio.create_task_group() as task_group:
                    task_group.start_soon(anyio.to_thread.run_sync, read_all)
                    # The port turns busy above its high watermark: each send then waits
                    # for the peer, so the output goes out in many partial writes.
                    for offset in range(0, size, 1 << 20):
                        await port.send(bytes([offset >> 20]) * (1 << 20))
    assert len(received) == size
    assert all(received[index << 20] == index for index in range(16))


@pytest.mark.anyio
async def test_output_leaves_while_the_loop_is_blocked(any_ios: ioserver.IOServer) -> None:
    """The I/O thread waits for the loop's flush after handing it a batch, but a loop that
    never reaches its flush point (here: blocked in a synchronous wait right after a send)
    does not hold its output back: the wait is bounded, and the reply reaches the peer
    while the loop is still blocked."""
    async with await ports.listen_tcp(any_ios, "127.0.0.1", 0) as listener:
        with socket.create_connection(listener.local_address) as peer:
            accepted = await listener.receive()
            assert isinstance(accepted, Accepted)
            async with accepted.port as port:
                replied = threading.Event()
                reply = bytearray()

                def read_reply() -> None:
                    while len(reply) < 4:
                        chunk = peer.recv(16)
                        if not chunk:
                            return
                        reply.extend(chunk)
                    replied.set()

                reader = threading.Thread(target=read_reply)
                reader.start()
                try:
                    peer.sendall(b"ping")  # the I/O thread delivers it, then awaits a flush
                    message = await port.receive()
                    assert message == Data(b"ping")
                    await port.send(b"pong")
                    # Block the loop itself: no checkpoint, so no flush point can run.
                    assert replied.wait(10), "the reply waited for the blocked loop"
                finally:
                    peer.shutdown(socket.SHUT_RDWR)
                    reader.join()
                assert bytes(reply) == b"pong"
