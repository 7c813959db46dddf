"""How a trio task parks on a port (or a select's waiter) and is woken: the hot path of every
message on trio (ioserver._hub, "trio: how a task parks and is woken").

A woken task costs one task step and builds nothing (no abort method, trap message or
outcome of its own); a task cancelled out of its park is left alone by a wake-up that comes
before it resumes, and does not count as waiting any more (busy, set_owner).
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

import anyio
import outcome
import pytest
import trio
import trio.testing

import ioserver
import ports
from ioserver._hub import YIELD_EVERY, TrioParker
from ports import Accepted, Closed, Data

pytestmark = [pytest.mark.anyio, pytest.mark.parametrize("anyio_backend", ["trio"])]

ROUND_TRIPS = 300


async def port_pair(ios: ioserver.IOServer) -> tuple[ports.Listener, ports.Port, ports.Port]:
    """(listener, client port, server port): a TCP connection, both ends ports of ``ios``."""
    listener = await ports.listen_tcp(ios, "127.0.0.1", 0)
    client = await ports.connect_tcp(ios, "127.0.0.1", listener.local_address[1])
    accepted = await listener.receive()
    assert isinstance(accepted, Accepted)
    return listener, client, accepted.port


class _TaskSteps(trio.abc.Instrument):
    def __init__(self) -> None:
        self.steps: Counter[str] = Counter()

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.steps[task.name] += 1


@contextmanager
def counting_calls(functions: tuple[Any, ...], callers: tuple[Any, ...]) -> Iterator[Counter[Any]]:
    """Count the calls of ``functions`` made on this thread meanwhile by (or a few calls
    below) one of ``callers``: what ports' parks and wake-ups cost, not the hub's."""
    codes = {function.__code__: function for function in functions}
    caller_codes = {caller.__code__ for caller in callers}
    counts: Counter[Any] = Counter()

    def profile(frame: FrameType, event: str, arg: object) -> None:
        if event == "call" and frame.f_code in codes:
            outer = frame.f_back
            for _ in range(4):
                if outer is None:
                    break
                if outer.f_code in caller_codes:
                    counts[codes[frame.f_code]] += 1
                    break
                outer = outer.f_back

    previous = sys.getprofile()
    sys.setprofile(profile)
    try:
        yield counts
    finally:
        sys.setprofile(previous)


async def test_a_woken_receiver_costs_one_task_step_and_builds_nothing(
    ios: ioserver.IOServer,
) -> None:
    """An echo actor: each message wakes it once and it runs one task step (plus every
    YIELD_EVERY-th operation's full checkpoint), with no trio trap message, abort method or
    ``outcome.Value`` built for its park or wake-up."""
    listener, client, server = await port_pair(ios)

    async def echo() -> None:
        async for message in server:
            if isinstance(message, Data):
                await server.send(message.data)

    instrument = _TaskSteps()
    async with listener, client, server, anyio.create_task_group() as task_group:
        task_group.start_soon(echo, name="echo-actor")
        await client.send(b"warm-up")
        assert isinstance(await client.receive(), Data)
        trio.lowlevel.add_instrument(instrument)
        try:
            with counting_calls(
                (outcome.Value.__init__, trio.lowlevel.wait_task_rescheduled),
                (ports.Port._deliver, ports.Port._receive, TrioParker.park, TrioParker.wake),
            ) as calls:
                for index in range(ROUND_TRIPS):
                    payload = b"%d" % index
                    await client.send(payload)
                    got = b""
                    while len(got) < len(payload):
                        message = await client.receive()
                        assert isinstance(message, Data)
                        got += message.data
                    assert got == payload
        finally:
            trio.lowlevel.remove_instrument(instrument)
        task_group.cancel_scope.cancel()
    steps = instrument.steps["echo-actor"]
    # One step a message, and one more for every YIELD_EVERY-th operation (its receive and
    # its send are two): an extra checkpoint in either would double it.
    assert ROUND_TRIPS <= steps <= ROUND_TRIPS * (1 + 2 / YIELD_EVERY) + 2, steps
    # Two parks and two wake-ups a round trip (the echo's, the client's): none built an
    # outcome or went through wait_task_rescheduled (their own frames; the hub's and the
    # full checkpoints' are trio's).
    assert not calls, calls


async def test_a_wake_up_after_the_cancellation_leaves_the_task_alone(
    ios: ioserver.IOServer,
) -> None:
    """The receiver's scope is cancelled, then (same task step, before the receiver resumes)
    the port is closed, which wakes whoever waits on it: the cancelled receiver is not
    rescheduled a second time (trio forbids it) and raises Cancelled, having taken
    nothing."""
    listener, client, server = await port_pair(ios)
    outcomes: list[str] = []
    async with listener, client, server, anyio.create_task_group() as task_group:
        scope = trio.CancelScope()

        async def receiver() -> None:
            with scope:
                try:
                    await server.receive()
                except trio.Cancelled:
                    outcomes.append("cancelled")
                    raise
            outcomes.append("left the scope")

        task_group.start_soon(receiver)
        await trio.testing.wait_all_tasks_blocked()
        scope.cancel()  # the abort reschedules the receiver with its Cancelled ...
        server.close_nowait()  # ... and this wake-up must not reschedule it again
        await trio.testing.wait_all_tasks_blocked()
    assert outcomes == ["cancelled", "left the scope"]


async def test_a_cancelled_select_is_left_alone_by_a_later_wake_up(
    ios: ioserver.IOServer,
) -> None:
    """The same for a select's waiter (the Parker's park): cancelled, then one of its
    sources closed in the same step."""
    listener, client, server = await port_pair(ios)
    mailbox = ports.Mailbox()
    outcomes: list[str] = []
    async with listener, client, server, anyio.create_task_group() as task_group:
        scope = trio.CancelScope()

        async def selector() -> None:
            with scope:
                try:
                    await ports.select(server, mailbox)
                except trio.Cancelled:
                    outcomes.append("cancelled")
                    raise

        task_group.start_soon(selector)
        await trio.testing.wait_all_tasks_blocked()
        scope.cancel()
        mailbox.send_nowait("wake")
        server.close_nowait()
        await trio.testing.wait_all_tasks_blocked()
    assert outcomes == ["cancelled"]
    assert mailbox.receive_nowait() == "wake"  # the cancelled select took nothing


async def test_a_receiver_cancelled_out_of_its_park_no_longer_holds_the_port(
    ios: ioserver.IOServer,
) -> None:
    """Right after the cancellation (before the cancelled receiver has resumed) another
    task may receive on the port, or give it an owner: the port is not busy."""
    listener, client, server = await port_pair(ios)
    async with listener, client, server, anyio.create_task_group() as task_group:
        scope = trio.CancelScope()
        cancelled = trio.Event()

        async def receiver() -> None:
            with scope:
                try:
                    await server.receive()
                except trio.Cancelled:
                    cancelled.set()
                    raise

        task_group.start_soon(receiver)
        await trio.testing.wait_all_tasks_blocked()
        scope.cancel()
        # Same task step: the receiver has not resumed yet.  It no longer waits here.
        assert server.statistics().messages_buffered == 0
        mailbox = ports.Mailbox()
        server.set_owner(mailbox)
        server.set_owner(None)
        task_group.start_soon(client.send, b"after")
        message = await server.receive()  # no BusyPortError
        assert cancelled.is_set()
        assert message == Data(b"after")
        client.close_nowait()
        rest = [m async for m in server]
        assert isinstance(rest[-1], Closed)
