"""Timers as messages (erlang:send_after/3, cancel_timer/1) and deadlines as select sources."""

from __future__ import annotations

import math

import anyio
import pytest

import ioserver
import ports
from ports import Data, Deadline, Timeout

pytestmark = pytest.mark.anyio


async def test_send_after_delivers_to_a_mailbox_an_actor_and_a_name_in_deadline_order(
    no_leaks: None,
) -> None:
    inbox = ports.Mailbox()

    async def relay(actor: ports.Actor) -> None:
        while True:
            inbox.send_nowait(("relayed", actor.name, await actor.receive()))

    async with ports.open_actor_system() as system:
        worker = system.spawn(relay, name="worker")
        third = ports.send_after(0.03, "worker", "by name")
        second = ports.send_after(0.02, worker, "to the actor")
        first = system.send_after(0.01, inbox, "to the mailbox")
        assert first.active and first.remaining() is not None
        received = [await inbox.receive(timeout=10) for _ in range(3)]
        worker.kill()
    assert received == [
        "to the mailbox",
        ("relayed", "worker", "to the actor"),
        ("relayed", "worker", "by name"),
    ]
    for ref in (first, second, third):
        assert not ref.active
        assert ref.remaining() is None
        assert ports.cancel_timer(ref) is False  # it fired: too late to cancel


async def test_a_cancelled_timer_never_sends_and_cancel_says_so(no_leaks: None) -> None:
    inbox = ports.Mailbox()
    async with ports.open_actor_system() as system:
        cancelled = system.send_after(0.01, inbox, "never")
        system.send_after(0.03, inbox, "later")
        assert ports.cancel_timer(cancelled) is True
        assert ports.cancel_timer(cancelled) is False  # once only
        assert not cancelled.active
        # "later" is due after "never" would have been: only it arrives.
        assert await inbox.receive(timeout=10) == "later"
        assert len(inbox) == 0
        assert system.timers_pending == 0


async def test_an_earlier_timer_wakes_the_service_before_a_later_one(no_leaks: None) -> None:
    inbox = ports.Mailbox()
    async with ports.open_actor_system() as system:
        late = system.send_after(3600, inbox, "in an hour")
        await anyio.wait_all_tasks_blocked()  # the service now sleeps for an hour
        system.send_after(0.01, inbox, "soon")
        assert await inbox.receive(timeout=10) == "soon"
        assert late.active
        assert 3500 < (late.remaining() or 0) <= 3600
        assert late.cancel() is True


async def test_pending_timers_do_not_outlive_their_system(no_leaks: None) -> None:
    inbox = ports.Mailbox()
    with anyio.fail_after(10):  # the block must not wait an hour for the timer
        async with ports.open_actor_system() as system:
            ref = system.send_after(3600, inbox, "after the system")
    assert not ref.active
    assert ref.cancel() is False  # the system cancelled it already
    with pytest.raises(ports.ClosedPortError, match="ended"):
        system.send_after(1, inbox, "too late")
    assert len(inbox) == 0


async def test_cancelling_the_system_cancels_its_timers(no_leaks: None) -> None:
    inbox = ports.Mailbox()
    with anyio.CancelScope() as scope:
        async with ports.open_actor_system() as system:
            ref = system.send_after(3600, inbox, "never")
            scope.cancel()
            await anyio.sleep_forever()
    assert scope.cancelled_caught
    assert not ref.active and ref.cancel() is False


async def test_a_name_is_looked_up_when_the_timer_fires(no_leaks: None) -> None:
    inbox = ports.Mailbox()

    async def relay(actor: ports.Actor) -> None:
        inbox.send_nowait(await actor.receive())

    async with ports.open_actor_system() as system:
        system.send_after(0.01, "nobody", "dropped")  # no such name then: dropped quietly
        system.send_after(0.02, "late", "found")
        system.spawn(relay, name="late")  # registered after the timer started
        assert await inbox.receive(timeout=10) == "found"
        assert len(inbox) == 0


async def test_a_timer_to_an_ended_actor_or_a_closed_mailbox_is_dropped(no_leaks: None) -> None:
    async def quit_at_once(actor: ports.Actor) -> None:
        pass

    closed = ports.Mailbox()
    closed.close()
    probe = ports.Mailbox()
    async with ports.open_actor_system() as system:
        gone = system.spawn(quit_at_once)
        await gone.wait()
        system.send_after(0, gone, "to a dead actor")
        system.send_after(0, closed, "to a closed mailbox")
        system.send_after(0.01, probe, "after them")
        assert await probe.receive(timeout=10) == "after them"


async def test_bad_timer_arguments_are_refused_clearly(no_leaks: None) -> None:
    with pytest.raises(RuntimeError, match="no actor system"):
        ports.send_after(1, ports.Mailbox(), "x")
    async with ports.open_actor_system() as system:
        with pytest.raises(ValueError, match="zero or more"):
            system.send_after(-1, ports.Mailbox(), "x")
        with pytest.raises(ValueError, match="zero or more"):
            system.send_after(math.nan, ports.Mailbox(), "x")
        with pytest.raises(TypeError, match="seconds"):
            system.send_after("1", ports.Mailbox(), "x")  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="destination"):
            system.send_after(1, 42, "x")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="TimerRef"):
        ports.cancel_timer("not a timer")  # type: ignore[arg-type]


async def test_resetting_a_timeout_on_every_message_keeps_the_heap_bounded(
    no_leaks: None,
) -> None:
    inbox = ports.Mailbox()
    async with ports.open_actor_system() as system:
        ref = system.send_after(3600, inbox, "idle")
        for _ in range(10_000):  # an idle timeout reset on each of 10 000 messages
            ref.cancel()
            ref = system.send_after(3600, inbox, "idle")
        assert system.timers_pending == 1
        assert len(system._timers._heap) < 200
        ref.cancel()


async def test_a_deadline_in_select_delivers_one_timeout_then_ends(no_leaks: None) -> None:
    mailbox = ports.Mailbox()
    deadline = Deadline(0.02)
    assert not deadline.expired
    source, message = await ports.select(mailbox, deadline)
    assert source is deadline
    assert message == Timeout(deadline.deadline)
    assert deadline.expired and deadline.remaining() == 0.0
    with pytest.raises(ports.EndOfPort):
        await ports.select(mailbox, deadline)
    # A message that comes first wins; the deadline stays armed for the next select.
    later = Deadline(3600)
    mailbox.send_nowait("first")
    assert await ports.select(mailbox, later) == (mailbox, "first")
    assert 3500 < later.remaining() <= 3600
    past = Deadline.at(anyio.current_time() - 1)
    assert await ports.select(past, mailbox) == (past, Timeout(past.deadline))
    with pytest.raises(ValueError):
        Deadline(-1)
    with pytest.raises(TypeError):
        Deadline.at("now")  # type: ignore[arg-type]


async def test_one_deadline_spans_several_selects_on_a_port(ios: ioserver.IOServer) -> None:
    listener = await ports.listen_tcp(ios, "127.0.0.1", 0)
    async with listener, await anyio.connect_tcp("127.0.0.1", listener.local_address[1]) as peer:
        accepted = await listener.receive()
        assert isinstance(accepted, ports.Accepted)
        async with accepted.port as port:
            deadline = Deadline(0.2)
            received = b""
            await peer.send(b"one")
            while True:
                source, message = await ports.select(port, deadline)
                if source is deadline:
                    break
                assert isinstance(message, Data)
                received += message.data
            assert received == b"one"
            assert isinstance(message, Timeout)
