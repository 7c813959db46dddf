"""A Mailbox's owner cells (``ports._mailbox``, ``ioserver._flow.OwnerCell``, the native
``OwnerCell``): what a task parked on a mailbox relies on when the memory budget pauses
the ports it owns, and what a long-lived mailbox must not keep alive.

Found by a review of the cells' first version: a port handed to a mailbox whose task had
parked before the mailbox had a cell in that port's I/O half (Erlang's
``controlling_process`` to a worker already in ``receive``) was never seen waiting on the
native core and starved while the budget stayed paused; and a mailbox kept every I/O
server it had owned a port of reachable, for good."""

from __future__ import annotations

import socket
from typing import Any

import anyio
import pytest
from conftest import until

import ioserver
import ports
from ports import Accepted, Closed, Data

pytestmark = [pytest.mark.anyio, pytest.mark.every_core]

LIMIT = 1 << 20
UNBOUND = {
    "high_msgq_watermark": 64 << 20,
    "low_msgq_watermark": 32 << 20,
    "high_msgq_messages": 1 << 24,
}


async def _accept(listener: ports.Listener) -> ports.Port:
    accepted = await listener.receive()
    assert isinstance(accepted, Accepted)
    return accepted.port


async def _send_and_end(number: int, payload: bytes) -> None:
    async with await anyio.connect_tcp("127.0.0.1", number) as stream:
        await stream.send(payload)
        await stream.send_eof()
        with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
            await stream.receive()


async def _fill(ios: ioserver.IOServer, listener: ports.Listener, peers: Any) -> list[ports.Port]:
    """Eight peers whose owners never read fill the budget until it pauses a read."""
    number = listener.local_address[1]
    hogs = []
    for index in range(8):
        peers.start_soon(_send_and_end, number, bytes([65 + index]) * (512 << 10))
        hogs.append(await _accept(listener))
    await until(lambda: ios.statistics().global_pauses >= 1)
    return hogs


@pytest.mark.parametrize("paused_first", [True, False])
async def test_a_port_given_to_a_mailbox_whose_task_parked_before_it_had_a_cell(
    no_leaks: None, core: str, io_backend: str | None, paused_first: bool
) -> None:
    """The acceptor pattern (gen_tcp:controlling_process to a worker already in receive):
    a task parks on a fresh mailbox - no port owned yet, so no cell to mark - and then a
    port is handed to it.  The port is paused by the budget (before the hand-over, or at
    its first read after it).  The task waits for that port: it must get its input
    through the reserve, as a task waiting on the port itself would."""
    each = 256 << 10
    async with ioserver.open(memory_limit=LIMIT, core=core, io_backend=io_backend) as ios:
        listener = await ports.listen_tcp(ios, "127.0.0.1", 0, **UNBOUND)
        number = listener.local_address[1]
        mailbox = ports.Mailbox()
        try:
            async with listener, anyio.create_task_group() as peers:
                hogs = await _fill(ios, listener, peers)
                received = 0

                async def worker() -> None:
                    nonlocal received
                    while True:
                        _source, message = await mailbox.receive()
                        if isinstance(message, Closed):
                            return
                        assert isinstance(message, Data)
                        received += len(message.data)

                async with anyio.create_task_group() as work:
                    work.start_soon(worker)
                    await until(lambda: bool(mailbox._waiters))  # parked, no cell
                    if paused_first:
                        peers.start_soon(_send_and_end, number, b"w" * each)
                        port = await _accept(listener)
                        await until(lambda: port.statistics().pauses >= 1)
                        port.set_owner(mailbox)
                    else:
                        # Owned at once, before its peer sends: paused at its first read.
                        peer_sock = socket.create_connection(listener.local_address)
                        port = await _accept(listener)
                        port.set_owner(mailbox)
                        # (A deadline: a port that starved would block this send for good.)
                        peer_sock.settimeout(10)
                        await anyio.to_thread.run_sync(peer_sock.sendall, b"w" * each)
                        peer_sock.shutdown(socket.SHUT_WR)
                    try:
                        with anyio.move_on_after(5):
                            await until(lambda: received == each)
                    finally:
                        state = (
                            received,
                            port.statistics().pauses,
                            getattr(next(iter(mailbox._cells.values()))[1], "waiting", "n/a")
                            if mailbox._cells
                            else None,
                            ios.statistics().memory_in_use,
                        )
                        work.cancel_scope.cancel()
                        if not paused_first:
                            peer_sock.close()
                    assert received == each, f"(received, pauses, cell.waiting, in use)={state}"
                await port.aclose()
                for hog in hogs:
                    await hog.aclose()
        finally:
            mailbox.close()


async def test_a_port_of_a_second_server_given_to_a_mailbox_a_task_waits_on(
    no_leaks: None, core: str, io_backend: str | None
) -> None:
    """The same through a second I/O server: the mailbox owns an idle port of server A
    (a cell there, marked by the park), then a port of server B - paused by B's budget -
    is handed to it while the task waits.  B's cell is made unmarked."""
    each = 256 << 10
    async with (
        ioserver.open(memory_limit=LIMIT, core=core, io_backend=io_backend) as ios_a,
        ioserver.open(memory_limit=LIMIT, core=core, io_backend=io_backend) as ios,
    ):
        listener_a = await ports.listen_tcp(ios_a, "127.0.0.1", 0)
        listener = await ports.listen_tcp(ios, "127.0.0.1", 0, **UNBOUND)
        number = listener.local_address[1]
        mailbox = ports.Mailbox()
        idle = socket.create_connection(listener_a.local_address)
        try:
            async with listener_a, listener, anyio.create_task_group() as peers:
                (await _accept(listener_a)).set_owner(mailbox)
                hogs = await _fill(ios, listener, peers)
                received = 0

                async def worker() -> None:
                    nonlocal received
                    while True:
                        _source, message = await mailbox.receive()
                        if isinstance(message, Closed):
                            return
                        received += len(message.data)

                async with anyio.create_task_group() as work:
                    work.start_soon(worker)
                    await until(lambda: bool(mailbox._waiters))
                    peers.start_soon(_send_and_end, number, b"w" * each)
                    port = await _accept(listener)
                    await until(lambda: port.statistics().pauses >= 1)
                    port.set_owner(mailbox)
                    with anyio.move_on_after(5):
                        await until(lambda: received == each)
                    work.cancel_scope.cancel()
                    assert received == each, (received, port.statistics().pauses)
                await port.aclose()
                for hog in hogs:
                    await hog.aclose()
        finally:
            mailbox.close()
            idle.close()


@pytest.mark.parametrize("how", ["timeout", "select_other", "close", "two_then_one"])
async def test_the_mark_is_cleared_whenever_the_last_waiter_leaves(
    no_leaks: None, core: str, how: str
) -> None:
    """The native cell's waiting mark (the I/O thread reads it without the GIL) is set
    while a task waits on the mailbox and cleared whenever the last waiter leaves.  (The
    Python core's budget reads the mailbox's waiters themselves: it has no mark.)"""
    if core == "python":
        pytest.skip("the Python core's OwnerCell has no waiting mark")
    async with ioserver.open(memory_limit=LIMIT, core=core) as ios:
        listener = await ports.listen_tcp(ios, "127.0.0.1", 0)
        mailbox, other = ports.Mailbox(), ports.Mailbox()
        peer = socket.create_connection(listener.local_address)
        try:
            async with listener:
                (await _accept(listener)).set_owner(mailbox)
            assert mailbox._cells is not None
            cells = [cell for _, cell in mailbox._cells.values()]
            assert cells
            if how == "timeout":
                with pytest.raises(TimeoutError):
                    await mailbox.receive(timeout=0.05)
            elif how == "select_other":
                async with anyio.create_task_group() as tasks:
                    tasks.start_soon(ports.select, mailbox, other)
                    await until(lambda: bool(mailbox._waiters))
                    assert all(cell.waiting for cell in cells)
                    other.send_nowait("x")
            elif how == "close":

                async def receiver() -> None:
                    with pytest.raises(ports.ClosedPortError):
                        await mailbox.receive()

                async with anyio.create_task_group() as tasks:
                    tasks.start_soon(receiver)
                    await until(lambda: bool(mailbox._waiters))
                    mailbox.close()
            else:
                async with anyio.create_task_group() as tasks:
                    tasks.start_soon(mailbox.receive)
                    tasks.start_soon(mailbox.receive, lambda m: m == "b")
                    await until(lambda: len(mailbox._waiters) == 2)
                    mailbox.send_nowait("a")  # one takes it, the other parks again
                    await until(lambda: len(mailbox._waiters) == 1)
                    assert all(cell.waiting for cell in cells)
                    mailbox.send_nowait("b")
            assert not mailbox._waiters
            assert not any(cell.waiting for cell in cells)
        finally:
            mailbox.close()
            peer.close()


async def test_a_long_lived_mailbox_keeps_no_stopped_server(no_leaks: None, core: str) -> None:
    """An actor's mailbox outlives the I/O servers its ports came from: it holds each
    server's I/O thread weakly, and a cell of a stopped server is dropped when the
    mailbox needs a new one (before, ``Mailbox._cells`` held ``(io, cell)`` for good:
    about 220 KiB a server, and one more cell for every park to visit)."""
    import gc
    import weakref

    mailbox = ports.Mailbox()
    refs = []
    try:
        for _ in range(3):
            async with ioserver.open(memory_limit=LIMIT, core=core) as ios:
                listener = await ports.listen_tcp(ios, "127.0.0.1", 0)
                peer = socket.create_connection(listener.local_address)
                async with listener:
                    port = await _accept(listener)
                port.set_owner(mailbox)
                assert mailbox._cells is not None
                # One cell a live half: the stopped servers' are gone.
                assert len(mailbox._cells) == 1, mailbox._cells
                port.set_owner(None)
                await port.aclose()
                peer.close()
                refs.append(weakref.ref(ios._io))
            del ios, port, listener
        gc.collect()
        # The mailbox holds no I/O thread strongly (a weak reference each).
        assert mailbox._cells is not None
        assert not [
            entry for entry in mailbox._cells.values() if not isinstance(entry[0], weakref.ref)
        ]
        # And nothing else keeps a closed server alive, on either core (before, on the
        # native one, its Core and Inbox did: tests/test_server_freed.py).
        assert [ref() for ref in refs] == [None, None, None]
    finally:
        mailbox.close()
