"""A round's writes and the flush point, against real sockets on loopback, on the core
under test.

Each port's output goes out with its own ``send``/``sendmsg`` (the Python core) or
``writev``/io_uring (the native core); these tests hold either to every byte, in order,
through partial writes, and to output that leaves while the loop is blocked before its
flush point.  (The Python core's batched writes through Linux AIO were removed in issue 14.)
"""

from __future__ import annotations

import socket
import threading

import anyio
import pytest

import ioserver
import ports
from ports import Accepted, Data


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
async def test_many_connections_get_every_byte_in_order(ios: ioserver.IOServer) -> None:
    """100 clients, 200 requests each in flight together: each client reads exactly its own
    answers, in order."""
    clients, rounds = 100, 200
    async with await ports.listen_tcp(ios, "127.0.0.1", 0) as listener:
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
    # Port by port (issue 14: the Python core's Linux AIO writes are gone; the native core
    # never had them), and the Python core with epoll waited for the loop's flush points.
    statistics = ios.statistics()
    assert not statistics.batched_writes
    assert statistics.write_batches == statistics.batched_write_count == 0
    if statistics.core == "python" and statistics.poller == "epoll":
        assert statistics.flush_waits > 0
    else:
        assert statistics.flush_waits == 0


@pytest.mark.anyio
async def test_a_slow_reader_gets_everything_through_partial_writes(
    ios: ioserver.IOServer,
) -> None:
    """Output far beyond the socket buffers, to a peer that reads late: partial writes
    continue through EPOLLOUT until every byte is there."""
    size = 16 << 20
    async with await ports.listen_tcp(ios, "127.0.0.1", 0) as listener:
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
async def test_output_leaves_while_the_loop_is_blocked(ios: ioserver.IOServer) -> None:
    """The I/O thread waits for the loop's flush point after handing it a batch (the Python
    core with epoll; the native core defers its wake to it), but a loop that never reaches
    it (here: blocked in a synchronous wait right after a send) does not hold its output
    back: the wait is bounded, and the reply reaches the peer while the loop is still
    blocked."""
    async with await ports.listen_tcp(ios, "127.0.0.1", 0) as listener:
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


@pytest.mark.python_core
@pytest.mark.anyio
async def test_the_round_that_stops_the_thread_asks_for_no_flush(ios: ioserver.IOServer) -> None:
    """The last round of the I/O thread (the one that runs the stop) may still hand the loop
    a batch; it must not ask for a flush point it will never wait for.  It did: the hub's
    flush point, scheduled by the drain that also took the stop notice, ran after the hub
    had closed the thread's wake-up fd, and wrote to it (EBADF in a loop callback on
    asyncio; a reused descriptor would have taken the 8 bytes).  Here data and the stop
    reach the thread in one round: a timer holds the thread while the peer sends and the
    stop is queued, and the loop blocks until the thread has ended, so that its drain takes
    the last batch and the stop notice together."""
    io = ios._io
    listener = await ports.listen_tcp(ios, "127.0.0.1", 0)
    client = await anyio.connect_tcp(*listener.local_address)
    accepted = await listener.receive()
    assert isinstance(accepted, Accepted)
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:  # a timer: runs at the top of a round, before its poll
        holding.set()
        release.wait(10)

    io.submit(lambda _target, _argument: io.call_later(0, hold), None, None)
    try:
        assert await anyio.to_thread.run_sync(holding.wait, 10)
        await client.send(b"last")  # readable at the held round's poll
        async with anyio.create_task_group() as task_group:
            task_group.start_soon(ios.aclose)  # queues the stop, then waits for its notice
            await anyio.wait_all_tasks_blocked()
            release.set()
            io.join(10)  # blocking the loop: the last batch and the notice arrive together
            assert not io.is_alive()
    finally:
        release.set()
        await client.aclose()
    assert ios.closed
