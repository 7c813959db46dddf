"""Faults at precise points of the hand-over from the I/O thread to a loop - a
``MemoryError`` while a message is built or a batch is published, a poisoned lock - and
the status figures read while the thread changes them: nothing lost, nothing delivered
twice, every charge counted taken, every internal error counted, no impossible figure.
Each test failed before its fix (the residual defects of issue 14's previous stop)."""

from __future__ import annotations

import collections
import operator
import socket
import time
from typing import Any

import anyio
import msgpack
import pytest
from conftest import until

import ioserver
import ports
from ioserver import _iothread
from ioserver._control import io_status
from ioserver._hub import _STOP
from ports import Accepted, Closed, Data, Datagram

pytestmark = pytest.mark.anyio


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


# -- a raw read whose Data message fails to build -------------------------------------------
# The MemoryError is reported as unraisable, as the drain's internal errors are.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("io_backend", ["epoll", "io_uring"])
async def test_a_raw_read_whose_message_fails_to_build_fails_its_port_and_is_counted_taken(
    io_backend: str, request: pytest.FixtureRequest
) -> None:
    """A raw port's ``Data`` that fails to build in the native drain (a ``MemoryError``,
    injected by the inbox's test hook) fails the port as a packet's does: its owner gets
    ``Closed("internal error: MemoryError()", "EIO")`` (not a silent gap in its byte
    stream), the peer sees the end, the read's charge is counted taken (the memory in use
    comes back to 0) and ``internal_errors`` counts it.  Before, the message was dropped,
    the port went on with bytes missing from its stream, and the read stayed charged for
    good."""
    if io_backend == "io_uring":
        request.getfixturevalue("needs_io_uring")
    async with ioserver.open(core="native", io_backend=io_backend, memory_limit=1 << 20) as ios:
        listener = await ports.listen_tcp(ios, "127.0.0.1", 0)
        async with listener:
            with socket.create_connection(listener.local_address) as peer:
                port = await _accept(listener)
                async with port:
                    peer.sendall(b"one")
                    with anyio.fail_after(5):
                        assert await port.receive() == Data(b"one")
                    errors = ios.statistics().internal_errors
                    ios._hub.inbox._fail_packets_for_test(1)  # type: ignore[attr-defined]
                    peer.sendall(b"lost" * 100)
                    with anyio.fail_after(5):
                        closed = await port.receive()
                    assert closed == Closed("internal error: MemoryError()", "EIO"), closed
                    assert _peer_ended(peer)
                    assert ios.statistics().internal_errors == errors + 1
        await until(lambda: ios.statistics().memory_in_use == 0)


@pytest.mark.python_core
async def test_on_the_python_core_a_raw_read_whose_message_fails_is_not_left_charged(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The Python core's twin: a raw read whose ``Data`` fails to build on the I/O thread
    (a ``MemoryError`` where it sets the message's data) closes the port as an internal
    error, and the memory in use comes back to 0.  Before, the read was counted delivered
    (charged to the budget) although no message carried it, and stayed charged for good."""
    original = _iothread._SET_DATA

    def fails_on_lost(message: object, payload: object) -> None:
        if isinstance(payload, bytes) and payload.startswith(b"lost"):
            raise MemoryError
        original(message, payload)

    # (Before the open: the I/O thread's round binds it once.)
    monkeypatch.setattr(_iothread, "_SET_DATA", fails_on_lost)
    async with ioserver.open(core="python", memory_limit=1 << 20) as ios:
        listener = await ports.listen_tcp(ios, "127.0.0.1", 0)
        async with listener:
            with socket.create_connection(listener.local_address) as peer:
                port = await _accept(listener)
                async with port:
                    peer.sendall(b"one")
                    with anyio.fail_after(5):
                        assert await port.receive() == Data(b"one")
                    peer.sendall(b"lost" * 100)
                    with anyio.fail_after(5):
                        closed = await port.receive()
                    assert closed == Closed("internal error: MemoryError()", "EIO"), closed
        await until(lambda: ios.statistics().memory_in_use == 0)


# -- internal errors of the native drain are counted -------------------------------------------
class _TimestampFault(RuntimeError):
    """A decode that fails for a reason of its own (not the data's): an internal error."""


@pytest.mark.every_core
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_a_decode_that_fails_internally_counts_as_an_internal_error(
    monkeypatch: pytest.MonkeyPatch, core: str, io_backend: str | None
) -> None:
    """A msgpack object whose decoding raises an error that is not the data's (a timestamp
    extension raising ``RuntimeError``) closes its port as an internal error, and
    ``statistics().internal_errors`` counts it, on both cores.  Before, the native
    drain's ``Inbox.fail`` reported it as unraisable but did not count it (the Python
    core's ``_internal_error`` did)."""

    def fails(self: object, *args: object, **kwargs: object) -> None:
        raise _TimestampFault("bad timestamp")

    monkeypatch.setattr(msgpack.ext.Timestamp, "__init__", fails)
    async with ioserver.open(core=core, io_backend=io_backend) as ios:
        listener = await ports.listen_tcp(ios, "127.0.0.1", 0, packet="msgpack")
        async with listener:
            with socket.create_connection(listener.local_address) as peer:
                port = await _accept(listener)
                async with port:
                    before = ios.statistics().internal_errors
                    timestamp = b"\xd6\xff\x00\x00\x00\x01"
                    peer.sendall(msgpack.packb([1]) + timestamp)
                    with anyio.fail_after(5):
                        # (The Python core decodes the read whole: no Data([1]) there.)
                        while (closed := await port.receive()) == Data([1]):
                            pass
                    assert isinstance(closed, Closed), closed
                    assert closed.reason.startswith("internal error: _TimestampFault"), closed
                    assert ios.statistics().internal_errors == before + 1


# -- a batch whose publication fails partway --------------------------------------------------
class _FailingDeque(collections.deque):  # type: ignore[type-arg]
    """A loop's inbox deque whose first ``extend`` of two items or more fails after the
    first, as CPython's deque fails when it cannot get a new block: it takes the items
    from the iterable one at a time, and the one whose append fails is taken and lost."""

    armed = True

    def extend(self, iterable: Any) -> None:
        items = iter(iterable)
        if self.armed and operator.length_hint(items) >= 2:
            self.armed = False
            self.append(next(items))
            next(items)
            raise MemoryError
        super().extend(items)


@pytest.mark.every_core
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_a_batch_that_fails_partway_to_reach_its_loop_is_delivered_once(
    core: str, io_backend: str | None
) -> None:
    """A ``Datagram`` and the ``Passive`` that follows it (``active=1``) reach the loop as
    one batch of two pairs - on the native core from the hosted half (UDP is served
    there), on the Python core through the inbox's deque - and the batch fails partway (a
    ``MemoryError``: appending the hosted pairs to the drain's list, injected by the
    inbox's test hook; growing the Python inbox's deque after the first pair).  Each
    message still arrives exactly once, in order, and the port goes on.  Before, on the
    native core the pairs after the failing one were dropped (the ``Passive`` never
    came); on the Python core the batch stayed staged whole and was published again (the
    ``Datagram`` twice), and the I/O thread ended."""
    async with (
        ioserver.open(core=core, io_backend=io_backend) as ios,
        await ports.open_udp(ios, active=1) as server,
        await ports.open_udp(ios) as client,
    ):
        inbox = ios._hub.inbox  # type: ignore[attr-defined]
        if core == "native":
            inbox._fail_hosted_for_test(1)
        else:
            failing = _FailingDeque(inbox.items)
            inbox.items = failing
        errors = ios.statistics().internal_errors
        await client.send_to(b"one", server.local_address)
        with anyio.fail_after(5):
            first = await server.receive()
            assert isinstance(first, Datagram) and first.data == b"one", first
            assert isinstance(await server.receive(), ports.Passive)
        # (The fault happened: counted once.)
        assert ios.statistics().internal_errors == errors + 1
        if core == "python":
            assert not failing.armed
        server.setopts(active=1)
        await client.send_to(b"two", server.local_address)
        with anyio.fail_after(5):
            second = await server.receive()
            assert isinstance(second, Datagram) and second.data == b"two", second
            assert isinstance(await server.receive(), ports.Passive)


# -- a poisoned lock of the carried events ------------------------------------------------------
async def test_a_take_interrupted_after_its_lock_was_poisoned_loses_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Once the lock of what an interrupted take carries is poisoned (a panic while it was
    held, made by the inbox's test hook), a ``KeyboardInterrupt`` that lands in a decode
    still loses nothing: it propagates, and the next takes return the pairs built before
    it, the interrupted object and the rest, in order, each once.  Before, a poisoned
    lock was skipped: the pairs and the events left were dropped, and the inbox could
    sleep with nothing to wake it for them.

    The test drains the inbox itself, synchronously (no checkpoint, so the hub cannot run
    meanwhile), and hands the pairs to their targets as the hub does."""
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
                    inbox._poison_carried_for_test()
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
                            # Something is carried: the loop must not sleep on it.
                            assert not inbox.prepare_to_sleep()
                            inbox.woke()
                    assert raised == 1
                    ours = [message for target, message in pairs if target is port]
                    assert ours == [Data([1]), Data(msgpack.Timestamp(1)), Data([2])]
                    for target, message in pairs:
                        target._deliver(message)
                    for message in ours:
                        assert await port.receive() == message
        await until(lambda: ios.statistics().memory_in_use == 0)


# -- the status figures ---------------------------------------------------------------------------
#: Watermarks far above the budget, so that only the budget pauses.
_UNBOUND = {
    "high_msgq_watermark": 64 << 20,
    "low_msgq_watermark": 32 << 20,
    "high_msgq_messages": 1 << 24,
}


async def test_a_closed_port_no_longer_reads_as_paused_by_the_budget() -> None:
    """Two ports paused by the memory budget (their owners take nothing: one flooded
    until the budget was spent, then the other paused at its first read) count 2 in the
    native core's ``budget_paused_streams`` (``ioserver status``'s ``paused_ports``); once
    one is closed (the other still holds the budget spent, so it stays paused) the count
    is 1 at once.  Before, it was a snapshot taken at the top of each round with a
    budget: the round that closed the port had taken it already, so the status showed
    the closed port paused until the next round."""
    async with ioserver.open(core="native", memory_limit=1 << 20) as ios:
        core = ios._io._core  # type: ignore[attr-defined]
        listener = await ports.listen_tcp(ios, "127.0.0.1", 0, **_UNBOUND)
        async with listener:
            with (
                socket.create_connection(listener.local_address) as holder,
                socket.create_connection(listener.local_address) as other,
            ):
                holding = await _accept(listener)
                port = await _accept(listener)
                holder.setblocking(False)
                chunk = b"x" * (64 << 10)

                async def flood(peer: socket.socket, paused: int) -> None:
                    with anyio.fail_after(10):
                        while core.budget_paused_streams < paused:
                            try:
                                peer.send(chunk)
                            except BlockingIOError:
                                pass
                            await anyio.sleep(0.001)  # (the I/O thread's counter: no event)

                await flood(holder, 1)
                other.sendall(b"y")
                await flood(other, 2)
                assert io_status(ios._io, time.monotonic(), {})["paused_ports"] == 2  # type: ignore[arg-type]
                # The close, then a hold, run in one round: the status is read while the
                # thread stands still after the close, before any later round.
                hold = core._hold_for_test()
                try:
                    assert await anyio.to_thread.run_sync(hold.wait)
                    open_before = core.ports_open
                    port.close_nowait()
                    after_close = core._hold_for_test()
                finally:
                    hold.release()  # (a failure above must not leave the thread held)
                try:
                    assert await anyio.to_thread.run_sync(after_close.wait)
                    assert core.ports_open == open_before - 1
                    assert core.budget_paused_streams == 1
                    status = io_status(ios._io, time.monotonic(), {})  # type: ignore[arg-type]
                    assert status["paused_ports"] == 1, status
                finally:
                    after_close.release()
                await holding.aclose()
        await until(lambda: ios.statistics().memory_in_use == 0)


# -- the I/O thread's last publication, as it ends ----------------------------------------------
class _FailingLastDeque(collections.deque):  # type: ignore[type-arg]
    """An inbox's deque whose first ``extend`` carrying the stop notice fails, having
    appended nothing (a ``MemoryError`` while the I/O thread publishes its last batch)."""

    armed = True

    def extend(self, items: Any) -> None:
        items = list(items)
        if self.armed and any(message is _STOP for _, message in items):
            self.armed = False
            raise MemoryError
        super().extend(items)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_a_failed_last_publication_still_tells_the_loop_the_thread_stopped() -> None:
    """The Python I/O thread's last batch - every open port's final ``Closed`` and the
    hub's stop notice - fails to publish once (a ``MemoryError``).  The thread publishes
    it again, so the server still closes (the hub hears the stop), and the fault is
    counted.  Before, that last ``notify`` was
    outside any ``try``: the exception ended the thread with the batch unpublished and
    closing the server hung."""
    with anyio.fail_after(10):
        async with ioserver.open(core="python") as ios:
            await ports.listen_tcp(ios, "127.0.0.1", 0)  # (a port open as it stops)
            inbox = ios._hub.inbox  # type: ignore[attr-defined]
            failing = _FailingLastDeque(inbox.items)
            inbox.items = failing
            io = ios._io  # type: ignore[attr-defined]
    assert not failing.armed  # (the fault happened)
    assert io.internal_errors >= 1
