"""The native drain's postponed hosted batch (``native/src/py.rs``, ``Unbuilt::Postponed``):
when the hosted half's pairs cannot be appended to a take's list (a MemoryError), they and
every event after them wait for the next take, and nothing is delivered twice, out of
order, or lost.

Found by a review of the first version, which carried the very list the take returned:
what was built before the postponed pairs came again in the next take, later batches
overtook the pairs, and a second postponement in one take dropped the first's pairs (and
their charge stayed for good)."""

from __future__ import annotations

import socket
import time
from typing import Any

import anyio
import pytest

import ioserver
import ports
from ports import Accepted, Data, Datagram

pytestmark = pytest.mark.anyio


def _batches(ios: Any) -> int:
    """Batches the I/O thread published to the loop (a wake sent or skipped each)."""
    stats = ios.statistics()
    return stats.wakes_to_loop_sent + stats.wakes_to_loop_skipped


def _until_published(ios: Any, count: int) -> None:
    """Spin, without a checkpoint (the loop must not drain), until ``count`` batches."""
    deadline = time.monotonic() + 5
    while _batches(ios) < count:
        assert time.monotonic() < deadline
        time.sleep(0.001)


async def _accept(listener: ports.Listener) -> ports.Port:
    accepted = await listener.receive()
    assert isinstance(accepted, Accepted), accepted
    return accepted.port


async def test_postponed_hosted_pairs_do_not_duplicate_earlier_pairs() -> None:
    """A take whose batch holds a raw TCP Data and then hosted pairs (a UDP datagram),
    the hosted append failing once (MemoryError): the TCP Data must reach its port once."""
    async with ioserver.open(core="native") as ios:
        listener = await ports.listen_tcp(ios, "127.0.0.1", 0)
        async with listener, await ports.open_udp(ios) as udp:
            with (
                socket.create_connection(listener.local_address) as peer,
                socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender,
            ):
                port = await _accept(listener)
                async with port:
                    inbox = ios._hub.inbox  # type: ignore[attr-defined]
                    errors = ios.statistics().internal_errors
                    inbox._fail_hosted_for_test(1)
                    # The loop blocked (no checkpoint): two batches wait for one take.
                    base = _batches(ios)
                    peer.sendall(b"tcp-1")
                    _until_published(ios, base + 1)
                    sender.sendto(b"udp-1", udp.local_address)
                    _until_published(ios, base + 2)
                    with anyio.fail_after(5):
                        got = await udp.receive()
                        assert isinstance(got, Datagram) and got.data == b"udp-1", got
                        assert await port.receive() == Data(b"tcp-1")
                    peer.sendall(b"tcp-2")
                    with anyio.fail_after(5):
                        second = await port.receive()
                    assert second == Data(b"tcp-2"), second
                    # The fault happened (a postponement counts once an episode).
                    assert ios.statistics().internal_errors == errors + 1


async def test_postponed_hosted_pairs_keep_order_with_later_batches() -> None:
    """Hosted pairs postponed at the first batch of a take, a later batch's native events
    of the same take must not overtake them (nor be delivered twice)."""
    async with ioserver.open(core="native") as ios:
        listener = await ports.listen_tcp(ios, "127.0.0.1", 0)
        async with listener, await ports.open_udp(ios) as udp:
            with (
                socket.create_connection(listener.local_address) as peer,
                socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender,
            ):
                port = await _accept(listener)
                async with port:
                    inbox = ios._hub.inbox  # type: ignore[attr-defined]
                    errors = ios.statistics().internal_errors
                    inbox._fail_hosted_for_test(1)
                    base = _batches(ios)
                    sender.sendto(b"udp-1", udp.local_address)
                    _until_published(ios, base + 1)
                    peer.sendall(b"tcp-1")
                    _until_published(ios, base + 2)
                    # Drain synchronously, as the hub does (no checkpoint meanwhile).
                    pairs: list[tuple[Any, Any]] = []
                    deadline = time.monotonic() + 5
                    while sum(t is port or t is udp for t, _ in pairs) < 2:
                        assert time.monotonic() < deadline, pairs
                        pairs += inbox.take()
                    pairs += inbox.take()  # (nothing more may come)
                    for target, message in pairs:
                        target._deliver(message)
                    mine = [m.data for t, m in pairs if t is port or t is udp]
                    assert mine == [b"udp-1", b"tcp-1"], mine
                    assert ios.statistics().internal_errors == errors + 1  # (it happened)


async def test_two_postponed_hosted_batches_in_one_take_lose_nothing() -> None:
    """Two batches each with hosted pairs wait for one take; both appends fail once
    (MemoryError): every datagram must still arrive, once, in order."""
    async with ioserver.open(core="native") as ios, await ports.open_udp(ios) as udp:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
            inbox = ios._hub.inbox  # type: ignore[attr-defined]
            errors = ios.statistics().internal_errors
            inbox._fail_hosted_for_test(2)
            base = _batches(ios)  # (the loop blocked: two batches, one take)
            sender.sendto(b"udp-1", udp.local_address)
            _until_published(ios, base + 1)
            sender.sendto(b"udp-2", udp.local_address)
            _until_published(ios, base + 2)
            got = []
            with anyio.fail_after(5):
                while len(got) < 2:
                    message = await udp.receive()
                    got.append(message.data)
            assert ios.statistics().internal_errors > errors  # (the faults happened)
            with anyio.move_on_after(2):
                while ios.statistics().memory_in_use:  # noqa: ASYNC110 (a counter: no event)
                    await anyio.sleep(0.01)
            memory = ios.statistics().memory_in_use
            assert (got, memory) == ([b"udp-1", b"udp-2"], 0)
