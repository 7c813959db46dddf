"""The memory budget keeps making progress: unfinished packets cannot stop every port.

The budget charges the bytes a framer holds for a packet still arriving.  Peers that each
send most of a large packet and stop used to hold the budget with those bytes for good:
no port could read again - not theirs (their completion needed budget), and not a port
whose owner waits (no room even in the reserve) - and only the I/O half could free them.
Now, when a waiting port cannot read and the unfinished bytes alone leave no room for a
read, the port holding the most of them fails (``Error("ENOBUFS")``, ``Closed``) and the
others read again.  A budget full of delivered input or queued output is backpressure,
not a deadlock: no port fails for it.

On every core and backend, asyncio and trio, with real sockets; synchronised on the
server's counters and on messages, never on sleeps.
"""

from __future__ import annotations

import socket
import struct
from typing import Any

import anyio
import anyio.abc
import msgpack
import pytest
from conftest import until

import ioserver
import ports
from ports import Accepted, Closed, Data, Error

pytestmark = [pytest.mark.anyio, pytest.mark.every_core]

LIMIT = 1 << 20  # bytes: memory_limit
#: What each attacker's packet announces: far under one message's cap (LIMIT less a read).
ANNOUNCED = 400 << 10
#: What each attacker sends of it, then stops: 980 KiB together, unfinished, so that less
#: than a read (64 KiB) is left of the budget.  The first holds the most.
SENT = [260 << 10, 250 << 10, 240 << 10, 230 << 10]
#: Per-port watermarks far above the budget, so that only the budget binds.
UNBOUND = {
    "high_msgq_watermark": 64 << 20,
    "low_msgq_watermark": 32 << 20,
    "high_msgq_messages": 1 << 24,
}


def _open(core: str, io_backend: str | None) -> Any:
    if io_backend == "io_uring":
        from conftest import io_uring_refusal

        refusal = io_uring_refusal()
        if refusal is not None:
            pytest.skip(refusal)
    return ioserver.open(memory_limit=LIMIT, core=core, io_backend=io_backend)


async def _accept(listener: ports.Listener) -> ports.Port:
    accepted = await listener.receive()
    assert isinstance(accepted, Accepted)
    return accepted.port


def _head(mode: str, size: int) -> bytes:
    """The start of a packet of ``size`` bytes of payload in ``mode``."""
    if mode == "4":
        return struct.pack(">I", size)
    return b"\xc6" + struct.pack(">I", size)  # msgpack bin 32


def _frame(mode: str, payload: bytes) -> bytes:
    return _head(mode, len(payload)) + payload


class _Reader:
    """Reads whole packets of ``mode`` (the peer's side of an echo)."""

    def __init__(self, stream: anyio.abc.ByteStream, mode: str) -> None:
        self.stream = stream
        self.mode = mode
        self.buffer = bytearray()
        self.unpacker = msgpack.Unpacker()

    async def packet(self) -> bytes:
        while True:
            if self.mode == "msgpack":
                try:
                    return bytes(self.unpacker.unpack())
                except msgpack.OutOfData:
                    pass
            elif len(self.buffer) >= 4:
                size = struct.unpack(">I", bytes(self.buffer[:4]))[0]
                if len(self.buffer) >= 4 + size:
                    payload = bytes(self.buffer[4 : 4 + size])
                    del self.buffer[: 4 + size]
                    return payload
            data = await self.stream.receive()
            if self.mode == "msgpack":
                self.unpacker.feed(data)
            else:
                self.buffer += data


async def _serve(port: ports.Port, seen: list[Any], echo: bool = False) -> None:
    """A port's owner as a server has one: it waits in ``receive`` (so the port may read
    into the reserve), keeps what comes, and echoes packets if asked."""
    async with port:
        while True:
            message = await port.receive()
            seen.append(message)
            if isinstance(message, Closed):
                return
            if echo and isinstance(message, Data):
                await port.send(message.data)


@pytest.mark.parametrize("mode", ["4", "msgpack"])
async def test_unfinished_packets_cannot_stop_a_waiting_port(
    no_leaks: None, core: str, io_backend: str | None, mode: str
) -> None:
    """Four peers each send most of a 400 KiB packet (``packet=4``, or a msgpack object)
    and stop: 980 KiB unfinished under a 1 MiB ``memory_limit``, each packet far under one
    message's cap.  A legitimate port of the same server, its owner waiting, then gets 20
    packets echoed, every byte, in order.  The peer that held the most gets
    ``Error("ENOBUFS")`` and ``Closed("ENOBUFS")``; the others keep what they sent.
    Before, no port of the server ever read again: the echo never came."""
    packet = 4 if mode == "4" else "msgpack"
    async with _open(core, io_backend) as ios:
        listener = await ports.listen_tcp(
            ios, "127.0.0.1", 0, packet=packet, packet_size=1 << 20, **UNBOUND
        )
        number = listener.local_address[1]
        seen: list[list[Any]] = [[] for _ in SENT]
        async with listener, anyio.create_task_group() as owners:
            attackers = []
            try:
                for index, size in enumerate(SENT):
                    attacker = await anyio.connect_tcp("127.0.0.1", number)
                    attackers.append(attacker)
                    port = await _accept(listener)
                    owners.start_soon(_serve, port, seen[index])
                    await attacker.send(_head(mode, ANNOUNCED) + b"a" * size)
                    if index < len(SENT) - 1:
                        await until(
                            lambda port=port, size=size: port.statistics().bytes_received >= size
                        )
                legit = await anyio.connect_tcp("127.0.0.1", number)
                async with legit:
                    port = await _accept(listener)
                    echoed: list[Any] = []
                    owners.start_soon(_serve, port, echoed, True)
                    payloads = [bytes([65 + index]) * (index * 997 + 1) for index in range(20)]
                    reader = _Reader(legit, mode)
                    with anyio.fail_after(10):
                        for payload in payloads:
                            await legit.send(_frame(mode, payload))
                            assert await reader.packet() == payload
                    assert [message.data for message in echoed] == payloads
                statistics = ios.statistics()
                assert statistics.budget_failed_ports == 1, statistics
                assert statistics.peak_memory <= LIMIT, statistics
                # The peer that held the most: told why, then closed.
                await until(lambda: len(seen[0]) == 2)
                error, closed = seen[0]
                assert isinstance(error, Error) and error.errno_name == "ENOBUFS", error
                assert "memory_limit" in error.message, error
                assert closed == Closed("ENOBUFS", "ENOBUFS")
                # The others lost nothing: their packets are simply not whole yet.
                assert seen[1:] == [[], [], []]
            finally:
                # (Before the cancel: an await in a cancelled scope would raise Cancelled,
                # which would hide the test's failure.)
                for attacker in attackers:
                    await attacker.aclose()
                owners.cancel_scope.cancel()


async def _send_quietly(peer: anyio.abc.ByteStream, data: bytes) -> None:
    """Send ``data``; the server may fail the port (and reset the connection) meanwhile."""
    try:
        await peer.send(data)
    except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
        pass


@pytest.mark.parametrize("mode", ["4", "msgpack"])
async def test_two_large_uploads_that_stall_each_other_let_one_finish(
    no_leaks: None, core: str, io_backend: str | None, mode: str
) -> None:
    """Two legitimate 700 KiB uploads interleave under a 1 MiB budget, both owners waiting:
    once half of each has arrived, neither can finish before the other has (half of each
    and the rest of one pass the budget), so neither ever would.  One of them (the one
    holding more) fails with ``ENOBUFS``; the other arrives whole."""
    size = 700 << 10
    packet = 4 if mode == "4" else "msgpack"
    async with _open(core, io_backend) as ios:
        listener = await ports.listen_tcp(
            ios, "127.0.0.1", 0, packet=packet, packet_size=1 << 20, **UNBOUND
        )
        number = listener.local_address[1]
        seen: list[list[Any]] = [[], []]
        async with listener, anyio.create_task_group() as owners:
            peers = [await anyio.connect_tcp("127.0.0.1", number) for _ in range(2)]
            try:
                for index in range(2):
                    owners.start_soon(_serve, await _accept(listener), seen[index])
                wires = [_frame(mode, bytes([66 + index]) * size) for index in range(2)]
                half = len(wires[0]) // 2
                async with anyio.create_task_group() as senders:
                    for index, peer in enumerate(peers):
                        await peer.send(wires[index][:half])
                    for index, peer in enumerate(peers):
                        # (The rest in tasks: one of them is never read, and waits.)
                        senders.start_soon(_send_quietly, peer, wires[index][half:])
                    with anyio.fail_after(10):
                        await until(lambda: sum(len(s) for s in seen) == 3)
                    senders.cancel_scope.cancel()
                failed = [s for s in seen if len(s) == 2]
                whole = [s for s in seen if len(s) == 1]
                assert len(failed) == 1 and len(whole) == 1, seen
                assert isinstance(failed[0][0], Error) and failed[0][0].errno_name == "ENOBUFS"
                assert failed[0][1] == Closed("ENOBUFS", "ENOBUFS")
                assert isinstance(whole[0][0], Data) and len(whole[0][0].data) == size
                statistics = ios.statistics()
                assert statistics.budget_failed_ports == 1, statistics
                assert statistics.peak_memory <= LIMIT, statistics
            finally:
                for peer in peers:
                    await peer.aclose()
                owners.cancel_scope.cancel()


async def test_a_budget_full_of_delivered_input_and_output_fails_no_port(
    no_leaks: None, core: str, io_backend: str | None
) -> None:
    """Slow owners and slow peers are backpressure, not a deadlock.  Hogs' owners do not
    take what was delivered to them (three quarters of the budget), an owner queues
    output to a peer that does not read (the rest, and more), and a port holds an
    unfinished packet: a waiting port then cannot read, even into the reserve, for many
    rounds - and no port is failed.  Once the owners take and the peer reads, everything
    arrives, the unfinished packet included."""
    each, chunk = 256 << 10, 8 << 10
    async with _open(core, io_backend) as ios:
        listener = await ports.listen_tcp(
            ios,
            "127.0.0.1",
            0,
            packet=4,
            packet_size=1 << 20,
            sndbuf=4096,
            high_watermark=8 << 20,
            **UNBOUND,
        )
        number = listener.local_address[1]
        async with listener, anyio.create_task_group() as tasks:
            peers: list[anyio.abc.SocketStream] = []
            sink: socket.socket | None = None
            try:
                # A port with an unfinished packet (its owner waits: read at once).
                partial_peer = await anyio.connect_tcp("127.0.0.1", number)
                peers.append(partial_peer)
                partial: list[Any] = []
                partial_port = await _accept(listener)
                tasks.start_soon(_serve, partial_port, partial)
                body = b"p" * (100 << 10)
                await partial_peer.send(_head("4", len(body)) + body[:50_000])
                await until(lambda: partial_port.statistics().bytes_received >= 50_000)
                # Hogs: whole packets their owners do not take, until the budget pauses them.
                hogs = []
                for index in range(4):
                    peer = await anyio.connect_tcp("127.0.0.1", number)
                    peers.append(peer)
                    hogs.append(await _accept(listener))
                    wire = _frame("4", bytes([65 + index]) * (chunk - 4)) * (each // chunk)
                    tasks.start_soon(peer.send, wire)
                await until(lambda: ios.statistics().global_pauses >= 1)
                # Output queued to a peer that does not read.
                sink = socket.socket()
                sink.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                sink.connect(listener.local_address)
                writer = await _accept(listener)
                writer.send_nowait(b"o" * (600 << 10))
                # A waiting port that cannot read, even into the reserve.
                legit_peer = await anyio.connect_tcp("127.0.0.1", number)
                peers.append(legit_peer)
                legit: list[Any] = []
                legit_port = await _accept(listener)
                tasks.start_soon(_serve, legit_port, legit)
                await legit_peer.send(_frame("4", b"small"))
                await until(lambda: legit_port.statistics().pauses >= 1)
                assert legit == []
                # Many budget rechecks later (rounds counted, not slept), nobody failed.
                polls = ios.statistics().polls
                await until(lambda: ios.statistics().polls >= polls + 40)
                statistics = ios.statistics()
                assert statistics.budget_failed_ports == 0, statistics
                assert legit == [] and partial == []
                # The owners take, the peer reads: everything arrives.
                received = 0
                sink.setblocking(False)

                async def drain_sink() -> None:
                    nonlocal received
                    assert sink is not None
                    while received < (600 << 10) + 4:
                        await anyio.wait_readable(sink)
                        received += len(sink.recv(1 << 20))

                tasks.start_soon(drain_sink)
                with anyio.fail_after(20):
                    for index, hog in enumerate(hogs):
                        for _ in range(each // chunk):
                            message = await hog.receive()
                            assert message == Data(bytes([65 + index]) * (chunk - 4))
                    await until(lambda: legit == [Data(b"small")])
                    await partial_peer.send(body[50_000:])
                    await until(lambda: partial == [Data(body)])
                    await until(lambda: received == (600 << 10) + 4)
                assert ios.statistics().budget_failed_ports == 0
            finally:
                for peer in peers:
                    await peer.aclose()
                if sink is not None:
                    sink.close()
                tasks.cancel_scope.cancel()


async def test_a_mailbox_parking_again_leaves_its_reserve_waiter_in_place(
    no_leaks: None, core: str, io_backend: str | None
) -> None:
    """A port its mailbox owns waits for the reserve (its owner waits; no room even
    there: output queued to a peer that does not read holds the budget).  Each time a
    task parks on the mailbox again it tells the I/O thread (``cmd_want_owner``), which
    must leave that reserve waiter where it is - it is let in first once a read fits.
    Before, each park let it try again at once: it paused again, behind the waiters that
    came after it (here: one pause more per park, 20 parks, 20 pauses)."""
    async with _open(core, io_backend) as ios:
        listener = await ports.listen_tcp(
            ios, "127.0.0.1", 0, sndbuf=4096, high_watermark=8 << 20, **UNBOUND
        )
        async with listener:
            with socket.socket() as sink:
                sink.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                sink.connect(listener.local_address)
                writer = await _accept(listener)
                with socket.create_connection(listener.local_address) as peer:
                    port = await _accept(listener)
                    async with writer, port:
                        mailbox = ports.Mailbox()
                        port.set_owner(mailbox)
                        # Output over the whole budget: no read fits, not even the reserve's.
                        writer.send_nowait(b"o" * (LIMIT + (256 << 10)))
                        send, receive = ports.open_memory_channel(1)
                        async with anyio.create_task_group() as tasks:

                            async def park() -> None:
                                await ports.select(mailbox, receive)

                            tasks.start_soon(park)
                            await until(lambda: bool(mailbox._waiters))
                            peer.sendall(b"x")
                            await until(lambda: port.statistics().pauses >= 1)
                            await send.send(None)  # (ends the park)
                            pauses = port.statistics().pauses
                            for _ in range(20):
                                await until(lambda: not mailbox._waiters)
                                tasks.start_soon(park)
                                await until(lambda: bool(mailbox._waiters))
                                # The park's cmd_want_owner, and a round after it, have run.
                                polls = ios.statistics().polls
                                await until(lambda p=polls: ios.statistics().polls >= p + 3)
                                await send.send(None)
                            assert port.statistics().pauses == pauses
                            # The peer reads: the waiter's read fits, and it comes.
                            sink.setblocking(False)
                            received = 0
                            with anyio.fail_after(20):
                                while received < LIMIT + (256 << 10):
                                    await anyio.wait_readable(sink)
                                    received += len(sink.recv(1 << 20))
                                assert await mailbox.receive() == (port, Data(b"x"))
