"""The memory budget, the per-port cap and ``linger`` under load, on both I/O cores.

The native core's flow control is ``native/src/flow.rs`` (the Rust twin of
``ioserver._flow``): these tests drive it with real sockets and many ports, and hold the
Python core to the same bounds (``every_core``).  The bound on the memory charged for
input is firm: no read is made that could take it past ``memory_limit``.
"""

from __future__ import annotations

import errno
import select
import socket
from typing import Any

import anyio
import pytest
from conftest import until

import ioserver
import ports
from ioserver._framing import PACKET_OVERHEAD
from ports import Accepted, Closed, Data, Error

pytestmark = [pytest.mark.anyio, pytest.mark.every_core]

LIMIT = 1 << 20  # bytes: the memory_limit of these tests
#: Per-port watermarks far above the budget, so that only the budget binds.
UNBOUND = {
    "high_msgq_watermark": 64 << 20,
    "low_msgq_watermark": 32 << 20,
    "high_msgq_messages": 1 << 24,
}


def _reserve_reads(ios: ioserver.IOServer) -> int:
    """Reads made into the budget's reserve, ever (the native core has two budgets: its
    thread's and its hosted half's)."""
    io = ios._io
    counters = getattr(io, "budget_counters", None)
    return int(io.budget.reserve_reads if counters is None else counters()[2])


async def _accept(listener: ports.Listener) -> ports.Port:
    accepted = await listener.receive()
    assert isinstance(accepted, Accepted)
    return accepted.port


async def _send_and_end(number: int, payload: bytes) -> None:
    """A peer: send ``payload``, half-close, then wait for the port's end."""
    async with await anyio.connect_tcp("127.0.0.1", number) as stream:
        await stream.send(payload)
        await stream.send_eof()
        with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
            await stream.receive()


async def test_a_flood_of_many_ports_stays_within_the_budget(no_leaks: None, core: str) -> None:
    """32 peers send 6 MiB together through a 1 MiB budget while no owner reads: raw ports
    and ports of 32-byte lines (each charged its bytes and ``PACKET_OVERHEAD``: a read of
    lines is charged about six times its bytes, so the budget shortens it).  The input
    charged never passes the limit; once the owners read, everything arrives."""
    raw_each, line_each, line = 256 << 10, 128 << 10, b"l" * 31 + b"\n"
    async with ioserver.open(memory_limit=LIMIT, core=core) as ios:
        raw = await ports.listen_tcp(ios, "127.0.0.1", 0, **UNBOUND)
        framed = await ports.listen_tcp(ios, "127.0.0.1", 0, packet="line", **UNBOUND)
        owners: list[tuple[ports.Port, int]] = []
        async with raw, framed, anyio.create_task_group() as peers:
            for index in range(16):
                peers.start_soon(
                    _send_and_end, raw.local_address[1], bytes([65 + index]) * raw_each
                )
                owners.append((await _accept(raw), raw_each))
                peers.start_soon(
                    _send_and_end, framed.local_address[1], line * (line_each // len(line))
                )
                owners.append((await _accept(framed), line_each))
            # Nobody reads: the budget fills, and pauses the reads.
            await until(lambda: ios.statistics().global_pauses >= 1)
            assert ios.statistics().memory_in_use <= LIMIT

            async def drain(port: ports.Port, expected: int) -> None:
                received = 0
                async with port:
                    while not isinstance(message := await port.receive(), Closed):
                        assert isinstance(message, Data)
                        received += len(message.data)
                    assert message == Closed("eof")
                assert received == expected

            with anyio.fail_after(30):
                async with anyio.create_task_group() as readers:
                    for port, expected in owners:
                        readers.start_soon(drain, port, expected)
        statistics = ios.statistics()
        assert statistics.peak_memory <= LIMIT, statistics
        assert statistics.global_pauses >= 1
        assert statistics.memory_in_use == 0, statistics


async def test_echoing_owners_pass_the_budget_by_at_most_a_read_each(
    no_leaks: None, core: str
) -> None:
    """20 echoing owners under a 256 KiB budget, their peers sending 64 KiB at a time
    (five times the budget in flight).  An owner frees a message's bytes as it takes it
    and charges them again as it queues the reply; the budget bounds input, so a read may
    come in between (on the native core, which reads while the loop runs): the memory in
    use passes the limit by one read per owner at most, and every echo comes back."""
    limit, count, size, rounds = 256 << 10, 20, 64 << 10, 20
    async with ioserver.open(memory_limit=limit, core=core) as ios:
        listener = await ports.listen_tcp(ios, "127.0.0.1", 0)
        number = listener.local_address[1]

        async def echo(port: ports.Port) -> None:
            async with port:
                async for message in port:
                    if isinstance(message, Data):
                        await port.send(message.data)

        async def client(index: int) -> None:
            body = bytes([65 + index]) * size
            async with await anyio.connect_tcp("127.0.0.1", number) as stream:
                for _ in range(rounds):
                    await stream.send(body)
                    received = b""
                    while len(received) < size:
                        received += await stream.receive()
                    assert received == body

        with anyio.fail_after(30):
            async with listener, anyio.create_task_group() as server:

                async def accept_all() -> None:
                    async for accepted in listener:
                        assert isinstance(accepted, Accepted)
                        server.start_soon(echo, accepted.port)

                server.start_soon(accept_all)
                async with anyio.create_task_group() as clients:
                    for index in range(count):
                        clients.start_soon(client, index)
                server.cancel_scope.cancel()
        statistics = ios.statistics()
        assert statistics.global_pauses >= 1
        assert statistics.peak_memory <= limit + count * (64 << 10), statistics


async def test_a_waiting_owner_reads_through_the_reserve_while_hogs_fill_the_budget(
    no_leaks: None, core: str
) -> None:
    """Eight peers fill the budget and their owners never read.  A port whose peer sends
    after that is paused by the budget too; once its owner waits on it (``cmd_want``:
    the owner parked on a port the budget paused), it reads through the reserve the
    budget keeps for waiting owners - every byte, while the hogs stay paused."""
    each = 512 << 10
    async with ioserver.open(memory_limit=LIMIT, core=core) as ios:
        listener = await ports.listen_tcp(ios, "127.0.0.1", 0, **UNBOUND)
        number = listener.local_address[1]
        async with listener, anyio.create_task_group() as peers:
            hogs = []
            for index in range(8):
                peers.start_soon(_send_and_end, number, bytes([65 + index]) * each)
                hogs.append(await _accept(listener))
            await until(lambda: ios.statistics().global_pauses >= 1)
            peers.start_soon(_send_and_end, number, b"w" * each)
            waiter = await _accept(listener)
            # Its first read finds the budget short and its owner not waiting: paused.
            await until(lambda: waiter.statistics().pauses >= 1)
            assert waiter.statistics().bytes_received == 0
            reserve_before = _reserve_reads(ios)
            received = 0
            with anyio.fail_after(10):
                while not isinstance(message := await waiter.receive(), Closed):
                    assert isinstance(message, Data)
                    received += len(message.data)
            assert received == each
            assert _reserve_reads(ios) > reserve_before
            assert ios.statistics().peak_memory <= LIMIT
            # The hogs are still paused: nothing of theirs was taken, so the budget is
            # still above one half.
            assert sum(hog.statistics().bytes_received for hog in hogs) < LIMIT
            await waiter.aclose()
            for hog in hogs:
                await hog.aclose()


async def test_port_buffer_limit_closes_only_the_port_that_passes_it(
    no_leaks: None, core: str
) -> None:
    """A peer that never ends its line passes ``port_buffer_limit``: its port gets
    ``Error("ENOBUFS")`` and ``Closed("ENOBUFS")``, and what its framer held leaves the
    budget; the other port of the same listener goes on."""
    cap = 64 << 10
    async with ioserver.open(port_buffer_limit=cap, core=core) as ios:
        listener = await ports.listen_tcp(ios, "127.0.0.1", 0, packet="line")
        number = listener.local_address[1]
        async with listener:
            bad_peer = await anyio.connect_tcp("127.0.0.1", number)
            bad = await _accept(listener)
            good_peer = await anyio.connect_tcp("127.0.0.1", number)
            good = await _accept(listener)
            async with bad_peer, good_peer, bad, good:
                with anyio.fail_after(10):
                    await bad_peer.send(b"x" * (4 * cap))
                    error = await bad.receive()
                    assert isinstance(error, Error)
                    assert error.errno_name == "ENOBUFS"
                    assert f"port_buffer_limit={cap}" in error.message
                    assert await bad.receive() == Closed("ENOBUFS", "ENOBUFS")
                    await good_peer.send(b"still here\n")
                    assert await good.receive() == Data(b"still here\n")
                await until(lambda: ios.statistics().memory_in_use == 0)


def _reset_seen(peer: socket.socket, timeout: float) -> bool:
    poller = select.poll()
    poller.register(peer, select.POLLERR | select.POLLHUP)
    return any(mask & (select.POLLERR | select.POLLHUP) for _, mask in poller.poll(timeout * 1000))


async def test_many_closed_ports_whose_peers_never_read_are_reset_after_linger(
    no_leaks: None, core: str
) -> None:
    """20 ports close with 1 MiB queued each to peers that never read: within ``linger``
    each is reset (the peer sees ``ECONNRESET``), its socket and its output freed."""
    count, queued = 20, 1 << 20
    async with ioserver.open(core=core) as ios:
        listener = await ports.listen_tcp(
            ios, "127.0.0.1", 0, sndbuf=4096, high_watermark=4 * queued, linger=0.3
        )
        async with listener:
            peers = []
            for _ in range(count):
                peer = socket.socket()
                peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                peer.connect(listener.local_address)
                peers.append(peer)
                port = await _accept(listener)
                port.send_nowait(b"q" * queued)
                await port.aclose()
            try:
                for peer in peers:
                    assert await anyio.to_thread.run_sync(_reset_seen, peer, 10.0)
                    assert peer.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == errno.ECONNRESET
                await until(lambda: ios.statistics().ports_open == 1)  # the listener
                # One more command's answer: the native thread hands the dropped buffers
                # back to the loop with its next event (until then they are in use).
                async with await ports.listen_tcp(ios, "127.0.0.1", 0):
                    statistics = ios.statistics()
                assert statistics.linger_timeouts == count
                assert statistics.memory_in_use == 0, statistics
            finally:
                for peer in peers:
                    peer.close()


async def test_memory_in_use_counts_a_partial_packet_held_packets_and_queued_output(
    no_leaks: None, core: str
) -> None:
    """What the memory in use counts, as the Python core counts it: the bytes a framer
    holds (a line not yet ended), packets held past the active credit and delivered input
    (each packet its bytes and ``PACKET_OVERHEAD``), until the owner takes them."""
    async with ioserver.open(core=core) as ios:
        listener = await ports.listen_tcp(ios, "127.0.0.1", 0, packet="line", active="once")
        async with (
            listener,
            await anyio.connect_tcp("127.0.0.1", listener.local_address[1]) as peer,
        ):
            port = await _accept(listener)
            async with port:
                await peer.send(b"p" * 10000)  # no newline yet: the framer holds it
                await until(lambda: ios.statistics().memory_in_use >= 10000)
                assert ios.statistics().memory_in_use == 10000
                # The line ends, and two more come: one delivered (the credit), two held.
                await peer.send(b"\nab\ncd\n")
                assert await port.receive() == Data(b"p" * 10000 + b"\n")
                charge = PACKET_OVERHEAD + 3  # a held line of two bytes and its newline
                await until(lambda: port.statistics().bytes_buffered_in == 2 * charge)
                assert ios.statistics().memory_in_use == 2 * charge
                port.setopts(active=True)
                assert await port.receive() == Data(b"ab\n")
                assert await port.receive() == Data(b"cd\n")
                await until(lambda: ios.statistics().memory_in_use == 0)


async def _send_unix_and_end(path: str, payload: bytes) -> None:
    """A Unix-socket peer: send ``payload``, half-close, then wait for the port's end."""
    async with await anyio.connect_unix(path) as stream:
        await stream.send(payload)
        await stream.send_eof()
        with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
            await stream.receive()


async def test_the_native_cores_two_halves_share_one_memory_limit(
    no_leaks: None, tmp_path: Any
) -> None:
    """On the native core, TCP ports are its thread's and Unix ports its hosted Python
    half's, each half with a budget of its own: 8 TCP and 8 Unix peers send 4 MiB together
    through one 1 MiB ``memory_limit`` while no owner reads.  The input charged to both
    halves together never passes the limit (each budget counts what the other charges);
    once the owners read, everything arrives."""
    each = 256 << 10
    async with ioserver.open(memory_limit=LIMIT, core="native") as ios:
        tcp = await ports.listen_tcp(ios, "127.0.0.1", 0, **UNBOUND)
        path = str(tmp_path / "flood.sock")
        unix = await ports.listen_unix(ios, path, **UNBOUND)
        owners: list[ports.Port] = []
        async with tcp, unix, anyio.create_task_group() as peers:
            for index in range(8):
                peers.start_soon(_send_and_end, tcp.local_address[1], bytes([65 + index]) * each)
                owners.append(await _accept(tcp))
                peers.start_soon(_send_unix_and_end, path, bytes([97 + index]) * each)
                owners.append(await _accept(unix))
            await until(lambda: ios.statistics().global_pauses >= 2)
            assert ios.statistics().memory_in_use <= LIMIT

            async def drain(port: ports.Port) -> None:
                received = 0
                async with port:
                    while not isinstance(message := await port.receive(), Closed):
                        assert isinstance(message, Data)
                        received += len(message.data)
                assert received == each

            with anyio.fail_after(30):
                async with anyio.create_task_group() as readers:
                    for port in owners:
                        readers.start_soon(drain, port)
        statistics = ios.statistics()
        assert statistics.peak_memory <= LIMIT, statistics
        assert statistics.memory_in_use == 0, statistics


# -- a task waiting on a Mailbox: the reserve, and what a park costs ------------------------
class _CountingPorts(set):  # type: ignore[type-arg]
    """A mailbox's set of held ports that counts the ports any walk of it visits."""

    visits = 0

    def __iter__(self) -> Any:
        for port in super().__iter__():
            self.visits += 1
            yield port


async def _mailbox_wait(how: str, mailbox: ports.Mailbox, port: ports.Port) -> Any:
    """Wait on ``mailbox`` for a message of ``port`` (``how``: a plain receive, a selective
    receive, or a select over the mailbox), and return the message."""
    if how == "receive":
        source, message = await mailbox.receive()
    elif how == "match":
        source, message = await mailbox.receive(
            lambda item: isinstance(item, tuple) and item[0] is port
        )
    else:
        _, (source, message) = await ports.select(mailbox)
    assert source is port
    return message


@pytest.mark.parametrize("how", ["receive", "match", "select"])
async def test_a_park_on_a_mailbox_visits_none_of_the_ports_it_owns(
    no_leaks: None, core: str, how: str
) -> None:
    """An actor owning many ports pays O(1) to park on its mailbox, not a visit to each
    port (it used to ask every port it owns whether the budget paused it: 10,000 getter
    calls a park for 10,000 ports).  A mailbox owning 200 ports under a memory budget
    parks 20 times; no park walks its ports - counted, not timed."""
    count, parks = 200, 20
    async with ioserver.open(memory_limit=LIMIT, core=core) as ios:
        listener = await ports.listen_tcp(ios, "127.0.0.1", 0)
        mailbox = ports.Mailbox()
        peers: list[socket.socket] = []
        owned: list[ports.Port] = []
        try:
            async with listener:
                for _ in range(count):
                    peers.append(socket.create_connection(listener.local_address))
                    port = await _accept(listener)
                    port.set_owner(mailbox)
                    owned.append(port)
            walked = _CountingPorts(mailbox._ports)
            mailbox._ports = walked
            target = owned[count // 2]

            async def sender() -> None:
                for index in range(parks):
                    await until(lambda: bool(mailbox._waiters))  # the receiver parked
                    if how == "match":
                        mailbox.send_nowait(("not this one", index))  # it parks again
                        await anyio.lowlevel.checkpoint()
                    mailbox.send_nowait((target, index))

            with anyio.fail_after(10):
                async with anyio.create_task_group() as tasks:
                    tasks.start_soon(sender)
                    for index in range(parks):
                        assert await _mailbox_wait(how, mailbox, target) == index
            assert walked.visits == 0
            # (What the old park did, for scale: every owned port, every park.)
            assert len(walked) == count
            # The mailbox's cell is marked while a task waits, and cleared as it leaves -
            # here cancelled (a stale mark would let a port read into the reserve for
            # nobody; on the Python core the I/O thread reads the waiters themselves).
            assert mailbox._cells is not None and len(mailbox._cells) == 1
            ((_, cell),) = mailbox._cells.values()
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(_mailbox_wait, how, mailbox, target)
                await until(lambda: bool(mailbox._waiters))
                assert getattr(cell, "waiting", True)
                tasks.cancel_scope.cancel()
            assert not mailbox._waiters and not getattr(cell, "waiting", False)
        finally:
            mailbox.close()
            for peer in peers:
                peer.close()


@pytest.mark.parametrize("how", ["receive", "match", "select", "given"])
async def test_a_task_waiting_on_the_mailbox_reads_its_port_through_the_reserve(
    no_leaks: None, core: str, how: str
) -> None:
    """Eight peers fill the budget and their owners never read.  A port owned by a mailbox
    (with 50 idle ports of its own) whose peer sends after that is paused by the budget,
    its owner busy.  Once a task waits on the mailbox - a receive, a selective receive
    past a message it does not want, a select over the mailbox; or the port is handed,
    paused, from another mailbox to this one while a task waits on it (``given``) - the
    port reads through the reserve, every byte, while the hogs stay paused."""
    each = 512 << 10
    async with ioserver.open(memory_limit=LIMIT, core=core) as ios:
        listener = await ports.listen_tcp(ios, "127.0.0.1", 0, **UNBOUND)
        number = listener.local_address[1]
        mailbox, other = ports.Mailbox(), ports.Mailbox()
        idle: list[socket.socket] = []
        try:
            async with listener, anyio.create_task_group() as peers:
                for _ in range(50):  # ports the mailbox owns that have nothing to say
                    idle.append(socket.create_connection(listener.local_address))
                    (await _accept(listener)).set_owner(mailbox)
                hogs = []
                for index in range(8):
                    peers.start_soon(_send_and_end, number, bytes([65 + index]) * each)
                    hogs.append(await _accept(listener))
                await until(lambda: ios.statistics().global_pauses >= 1)
                peers.start_soon(_send_and_end, number, b"w" * each)
                waiter = await _accept(listener)
                waiter.set_owner(other if how == "given" else mailbox)
                # Its first read finds the budget short and its owner not waiting: paused.
                await until(lambda: waiter.statistics().pauses >= 1)
                assert waiter.statistics().bytes_received == 0
                reserve_before = _reserve_reads(ios)
                if how == "match":
                    mailbox.send_nowait("not a port's message")
                received = 0
                with anyio.fail_after(10):
                    async with anyio.create_task_group() as handover:
                        if how == "given":

                            async def give() -> None:
                                await until(lambda: bool(mailbox._waiters))
                                waiter.set_owner(mailbox)

                            handover.start_soon(give)
                        while not isinstance(
                            message := await _mailbox_wait(
                                "receive" if how == "given" else how, mailbox, waiter
                            ),
                            Closed,
                        ):
                            assert isinstance(message, Data)
                            received += len(message.data)
                assert received == each
                assert _reserve_reads(ios) > reserve_before
                assert ios.statistics().peak_memory <= LIMIT
                # The hogs are still paused: nothing of theirs was taken, so the budget is
                # still above one half.
                assert sum(hog.statistics().bytes_received for hog in hogs) < LIMIT
                if how == "match":
                    assert mailbox.receive_nowait() == "not a port's message"
                await waiter.aclose()
                for hog in hogs:
                    await hog.aclose()
        finally:
            mailbox.close()
            other.close()
            for peer in idle:
                peer.close()
