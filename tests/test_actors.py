"""Actors: links, monitors, exit signals, registration, owned ports, supervisors."""

from __future__ import annotations

from typing import Any

import anyio
import anyio.abc
import pytest

import ioserver
import ports
from ports import (
    Accepted,
    Actor,
    ChildSpec,
    Closed,
    Data,
    Down,
    Exit,
    ExitReason,
    Restart,
    RestartIntensityError,
    Supervisor,
)

pytestmark = pytest.mark.anyio


class Boom(Exception):
    """A crash, on purpose."""


async def idle(actor: Actor) -> None:
    """Wait forever (until killed)."""
    await actor.receive(match=lambda message: False)


async def crash_on_request(actor: Actor) -> None:
    """Wait for "crash" (raise Boom) or "stop" (return)."""
    message = await actor.receive(match=lambda m: m in ("crash", "stop"))
    if message == "crash":
        raise Boom("asked to")


async def report_exits(actor: Actor, inbox: ports.Mailbox) -> None:
    """Forward every message to ``inbox`` (spawn it with ``trap_exits=True``)."""
    while True:
        inbox.send_nowait(await actor.receive())


async def tcp_pair(
    ios: ioserver.IOServer,
) -> tuple[ports.Listener, ports.Port, anyio.abc.SocketStream]:
    listener = await ports.listen_tcp(ios, "127.0.0.1", 0)
    peer = await anyio.connect_tcp("127.0.0.1", listener.local_address[1])
    accepted = await listener.receive()
    assert isinstance(accepted, Accepted)
    return listener, accepted.port, peer


async def assert_peer_sees_the_end(peer: anyio.abc.SocketStream) -> None:
    with anyio.fail_after(10), pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
        while True:
            await peer.receive()


# -- spawning and messages ------------------------------------------------------------------
async def test_an_actor_receives_its_messages_and_knows_itself(no_leaks: None) -> None:
    inbox = ports.Mailbox()

    async def echo(actor: Actor, prefix: str) -> None:
        assert ports.current_actor() is actor
        assert ports.current_system() is actor.system
        while (message := await actor.receive()) != "stop":
            inbox.send_nowait(prefix + message)

    async with ports.open_actor_system() as system:
        actor = system.spawn(echo, "got ")
        assert actor.alive and actor.reason is None
        actor.send_nowait("one")
        await actor.send("two")
        ports.send(actor, "stop")
        assert await actor.wait() is ExitReason.NORMAL
    assert [inbox.receive_nowait() for _ in range(2)] == ["got one", "got two"]
    assert not actor.alive and actor.reason is ExitReason.NORMAL
    assert actor.mailbox.closed
    actor.send_nowait("to the dead")  # dropped, as in Erlang: no error
    assert ports.current_actor() is None
    with pytest.raises(ports.ClosedPortError, match="ended"):
        system.spawn(idle)


async def test_leaving_the_block_waits_for_the_actors(no_leaks: None) -> None:
    done = []

    async def worker(actor: Actor) -> None:
        await actor.receive()
        done.append(True)

    async with ports.open_actor_system() as system:
        actor = system.spawn(worker)
        system.send_after(0.01, actor, "go")
    assert done == [True]
    assert not system.actors


async def test_shutdown_from_the_body_cancels_the_rest_of_it_on_both_backends(
    ios: ioserver.IOServer,
) -> None:
    # Operations that complete without waiting follow the shutdown: on asyncio they do
    # not suspend, so without care the body ran on through them there (not on trio).
    listener, port, peer = await tcp_pair(ios)
    mailbox = ports.Mailbox()
    for index in range(64):
        mailbox.send_nowait(index)
    after_shutdown: list[str] = []
    async with ports.open_actor_system() as system:
        worker = system.spawn(idle)
        await anyio.lowlevel.checkpoint()  # the worker runs
        system.shutdown()
        for _ in range(40):
            await ports.select(mailbox)
            after_shutdown.append("select")
            await port.send(b"x")
            after_shutdown.append("send")
        after_shutdown.append("end of body")  # pragma: no cover - must not run
    assert after_shutdown == []
    assert len(mailbox) == 64  # the cancelled select took nothing
    assert worker.reason is ExitReason.SHUTDOWN
    await port.aclose()
    await listener.aclose()
    await peer.aclose()


async def test_shutdown_from_an_actor_cancels_the_waiting_body(no_leaks: None) -> None:
    async def stopper(actor: Actor) -> None:
        actor.system.shutdown()

    body: list[str] = []
    async with ports.open_actor_system() as system:
        worker = system.spawn(idle)
        system.spawn(stopper)
        try:
            await anyio.sleep_forever()
        finally:
            body.append("cancelled")
    assert body == ["cancelled"]  # the block ended without an error, the body cancelled
    assert worker.reason is ExitReason.SHUTDOWN


async def test_an_actor_crash_does_not_end_the_system(no_leaks: None) -> None:
    async with ports.open_actor_system() as system:
        crasher = system.spawn(crash_on_request)
        bystander = system.spawn(crash_on_request)
        crasher.send_nowait("crash")
        reason = await crasher.wait()
        assert isinstance(reason, Boom)
        assert bystander.alive
        bystander.send_nowait("stop")


# -- links and exit signals -------------------------------------------------------------------
async def test_a_normal_exit_kills_no_linked_actor(no_leaks: None) -> None:
    inbox = ports.Mailbox()
    async with ports.open_actor_system() as system:
        leaving = system.spawn(crash_on_request)
        bystander = system.spawn(idle)
        trapper = system.spawn(report_exits, inbox, trap_exits=True)
        leaving.link(bystander)
        leaving.link(trapper)
        assert leaving.links == {bystander, trapper}
        leaving.send_nowait("stop")
        assert await inbox.receive(timeout=10) == Exit(leaving, ExitReason.NORMAL)
        assert bystander.alive and trapper.alive
        assert not bystander.links
        system.shutdown()


async def test_a_crash_kills_linked_actors_along_the_chain_with_the_same_reason(
    no_leaks: None,
) -> None:
    inbox = ports.Mailbox()
    async with ports.open_actor_system() as system:
        first = system.spawn(crash_on_request)
        middle = system.spawn(idle)
        last = system.spawn(report_exits, inbox, trap_exits=True)
        first.link(middle)
        middle.link(last)
        first.send_nowait("crash")
        message = await inbox.receive(timeout=10)
        assert isinstance(message, Exit)
        assert message.actor is middle
        assert isinstance(message.reason, Boom)  # propagated as it was
        assert first.reason is message.reason
        assert await middle.wait() is first.reason
        assert last.alive  # it traps exits: a message, not its death
        system.shutdown()


async def test_kill_cannot_be_trapped_and_links_see_killed(no_leaks: None) -> None:
    inbox = ports.Mailbox()
    async with ports.open_actor_system() as system:
        victim = system.spawn(
            report_exits, ports.Mailbox(), trap_exits=True
        )  # traps exits, in vain
        watcher = system.spawn(report_exits, inbox, trap_exits=True)
        victim.link(watcher)
        await anyio.wait_all_tasks_blocked()
        victim.kill()
        assert await victim.wait() is ExitReason.KILLED
        assert await inbox.receive(timeout=10) == Exit(victim, ExitReason.KILLED)
        system.shutdown()


async def test_an_exit_signal_is_a_message_when_trapped_and_normal_is_ignored_otherwise(
    no_leaks: None,
) -> None:
    inbox = ports.Mailbox()
    async with ports.open_actor_system() as system:
        trapper = system.spawn(report_exits, inbox, trap_exits=True)
        plain = system.spawn(idle)
        trapper.exit("custom reason")  # type: ignore[arg-type]
        assert await inbox.receive(timeout=10) == Exit(None, "custom reason")  # type: ignore[arg-type]
        plain.exit(ExitReason.NORMAL)
        await anyio.wait_all_tasks_blocked()
        assert plain.alive  # a normal exit signal does not end an actor
        plain.exit(ExitReason.SHUTDOWN)
        assert await plain.wait() is ExitReason.SHUTDOWN
        system.shutdown()


async def test_an_actor_killed_before_it_ever_ran_still_ends(no_leaks: None) -> None:
    started = []

    async def never(actor: Actor) -> None:
        await anyio.lowlevel.checkpoint()  # cancelled here: killed before it began
        started.append(actor)

    async with ports.open_actor_system() as system:
        actor = system.spawn(never)
        actor.kill()
        assert await actor.wait() is ExitReason.KILLED
    assert started == []


async def test_linking_to_an_ended_actor_sends_noproc(no_leaks: None) -> None:
    inbox = ports.Mailbox()
    async with ports.open_actor_system() as system:
        gone = system.spawn(crash_on_request)
        gone.send_nowait("stop")
        await gone.wait()
        trapper = system.spawn(report_exits, inbox, trap_exits=True)
        trapper.link(gone)
        assert await inbox.receive(timeout=10) == Exit(gone, ExitReason.NOPROC)
        plain = system.spawn(idle)
        gone.link(plain)  # either side: the living one gets the signal
        assert await plain.wait() is ExitReason.NOPROC
        system.shutdown()


async def test_unlink_stops_propagation(no_leaks: None) -> None:
    async with ports.open_actor_system() as system:
        crasher = system.spawn(crash_on_request)
        other = system.spawn(idle)
        crasher.link(other)
        other.unlink(crasher)
        crasher.send_nowait("crash")
        await crasher.wait()
        await anyio.wait_all_tasks_blocked()
        assert other.alive
        system.shutdown()


# -- monitors -------------------------------------------------------------------------------
async def test_a_monitor_gets_down_with_the_reason_and_never_kills(no_leaks: None) -> None:
    inbox = ports.Mailbox()
    async with ports.open_actor_system() as system:
        watcher = system.spawn(report_exits, inbox)  # monitors need no trapping
        normal = system.spawn(crash_on_request)
        crashing = system.spawn(crash_on_request)
        normal_ref = watcher.monitor(normal)
        crash_ref = watcher.monitor(crashing)
        normal.send_nowait("stop")
        assert await inbox.receive(timeout=10) == Down(normal_ref, normal, ExitReason.NORMAL)
        crashing.send_nowait("crash")
        down = await inbox.receive(timeout=10)
        assert isinstance(down, Down) and down.ref is crash_ref and down.actor is crashing
        assert isinstance(down.reason, Boom)
        assert watcher.alive
        # Monitoring an actor that has ended already: Down with NOPROC at once.
        late_ref = watcher.monitor(normal)
        assert await inbox.receive(timeout=10) == Down(late_ref, normal, ExitReason.NOPROC)
        system.shutdown()


async def test_demonitor_stops_a_monitor_and_can_flush_its_down(no_leaks: None) -> None:
    async with ports.open_actor_system() as system:
        watcher = system.spawn(idle)
        target = system.spawn(crash_on_request)
        ref = watcher.monitor(target)
        assert watcher.demonitor(ref) is True
        target.send_nowait("stop")
        await target.wait()
        assert len(watcher.mailbox) == 0  # no Down came
        other = system.spawn(crash_on_request)
        ref = watcher.monitor(other)
        other.send_nowait("stop")
        await other.wait()
        assert len(watcher.mailbox) == 1
        assert watcher.demonitor(ref, flush=True) is False  # its Down was sent...
        assert len(watcher.mailbox) == 0  # ... and is gone
        system.shutdown()


# -- registration ---------------------------------------------------------------------------
async def test_registered_names_reach_the_actor_and_are_freed_when_it_ends(
    no_leaks: None,
) -> None:
    inbox = ports.Mailbox()

    async def relay(actor: Actor) -> None:
        inbox.send_nowait(await actor.receive())

    async with ports.open_actor_system() as system:
        named = system.spawn(relay, name="relay")
        assert ports.whereis("relay") is named and named.name == "relay"
        with pytest.raises(ports.RegistrationError, match="taken"):
            system.spawn(idle, name="relay")
        other = system.spawn(idle)
        with pytest.raises(ports.RegistrationError, match="taken"):
            ports.register("relay", other)
        ports.register("other", other)
        with pytest.raises(ports.RegistrationError, match="already"):
            ports.register("second name", other)
        assert system.registered() == {"relay": named, "other": other}
        ports.send("relay", "hello by name")
        assert await inbox.receive(timeout=10) == "hello by name"
        await named.wait()
        assert ports.whereis("relay") is None  # freed at its end
        with pytest.raises(ports.RegistrationError, match="ended"):
            ports.register("relay", named)
        with pytest.raises(ports.RegistrationError, match="no actor"):
            ports.send("relay", "to nobody")
        ports.unregister("other")
        assert other.name is None
        with pytest.raises(ports.RegistrationError, match="no actor"):
            ports.unregister("other")
        with pytest.raises(TypeError):
            system.register(42, other)  # type: ignore[arg-type]
        system.shutdown()


# -- owned ports ----------------------------------------------------------------------------
ENDINGS = ["return", "crash", "kill", "linked crash", "system cancelled"]


@pytest.mark.parametrize("in_mailbox", [True, False], ids=["owned", "held"])
@pytest.mark.parametrize("ending", ENDINGS)
async def test_an_actors_ports_close_when_it_ends_whatever_the_ending(
    ios: ioserver.IOServer, ending: str, in_mailbox: bool
) -> None:
    listener, port, peer = await tcp_pair(ios)
    async with listener, peer:

        async def owner(actor: Actor) -> None:
            message = await actor.receive(match=lambda m: m in ("return", "crash"))
            if message == "crash":
                raise Boom("crash")

        async with ports.open_actor_system() as system:
            actor = system.spawn(owner)
            partner = system.spawn(crash_on_request)
            actor.link(partner)
            assert actor.own(port, mailbox=in_mailbox) is port
            assert port.owner is (actor.mailbox if in_mailbox else None)
            await peer.send(b"ping")
            if ending in ("return", "crash"):
                actor.send_nowait(ending)
            elif ending == "kill":
                actor.kill()
            elif ending == "linked crash":
                partner.send_nowait("crash")
            else:
                await anyio.wait_all_tasks_blocked()
                system.shutdown()
            await assert_peer_sees_the_end(peer)
            assert port.closed
            reason = await actor.wait()
            expected = {
                "return": ExitReason.NORMAL,
                "kill": ExitReason.KILLED,
                "system cancelled": ExitReason.SHUTDOWN,
            }
            if ending in expected:
                assert reason is expected[ending]
            else:
                assert isinstance(reason, Boom)
            system.shutdown()


async def test_cancelling_the_system_stops_every_actor_and_closes_every_port(
    ios: ioserver.IOServer,
) -> None:
    listener = await ports.listen_tcp(ios, "127.0.0.1", 0)
    async with listener:
        peers = []
        actors: list[Actor] = []

        async def busy(actor: Actor, port: ports.Port) -> None:
            actor.own(port)
            while True:  # a loop that waits on its mailbox and on a timer
                await ports.select(actor.mailbox, ports.Deadline(0.001))

        with anyio.CancelScope() as scope:
            async with ports.open_actor_system() as system:
                for index in range(10):
                    peers.append(await anyio.connect_tcp("127.0.0.1", listener.local_address[1]))
                    accepted = await listener.receive()
                    assert isinstance(accepted, Accepted)
                    if index % 2:
                        actors.append(system.spawn(busy, accepted.port))
                    else:
                        actor = system.spawn(idle)
                        actor.own(accepted.port, mailbox=False)
                        actors.append(actor)
                system.send_after(3600, actors[0], "pending timer")
                await anyio.wait_all_tasks_blocked()
                scope.cancel()  # the enclosing scope, as a caller would
        assert all(actor.reason is ExitReason.SHUTDOWN for actor in actors)
        assert system.timers_pending == 0
        for peer in peers:
            async with peer:
                await assert_peer_sees_the_end(peer)


async def test_give_moves_the_queued_messages_of_a_port_under_a_flood(
    ios: ioserver.IOServer,
) -> None:
    listener, port, peer = await tcp_pair(ios)
    payload = bytes(range(256)) * 4096  # 1 MiB
    result: dict[str, Any] = {}

    async def new_owner(actor: Actor) -> None:
        data = b""
        while True:
            message = await actor.receive()
            if message == "noise":
                continue
            source, event = message
            assert source is port
            if isinstance(event, Closed):
                break
            data += event.data
        result["second"] = data

    async def first_owner(actor: Actor, successor: Actor) -> None:
        actor.own(port)
        source, event = await actor.receive()
        assert source is port and isinstance(event, Data)
        data = event.data
        # Wait until more of the flood sits in this mailbox, then hand the port over.
        with anyio.fail_after(10):
            while len(actor.mailbox) < 3:
                await anyio.lowlevel.checkpoint()  # the hub delivers while we yield
        actor.send_nowait("kept")  # a message of another kind stays with this actor
        result["queued at transfer"] = len(actor.mailbox)
        actor.give(port, successor)
        assert port.owner is successor.mailbox
        assert await actor.receive() == "kept"
        result["first"] = data

    async with listener, ports.open_actor_system() as system, anyio.create_task_group() as flood:

        async def send_all() -> None:
            async with peer:
                for offset in range(0, len(payload), 4096):
                    await peer.send(payload[offset : offset + 4096])

        flood.start_soon(send_all)
        successor = system.spawn(new_owner)
        successor.send_nowait("noise")
        first = system.spawn(first_owner, successor)
        assert await first.wait() is ExitReason.NORMAL  # the port did not close with it
        assert await successor.wait() is ExitReason.NORMAL
    assert result["queued at transfer"] > 1
    assert result["first"] + result["second"] == payload  # none lost, none duplicated
    assert port.closed  # it closed with its new owner


async def test_give_refuses_a_port_it_does_not_own_and_an_ended_receiver(
    ios: ioserver.IOServer,
) -> None:
    listener, port, peer = await tcp_pair(ios)
    async with listener, peer, port, ports.open_actor_system() as system:
        first = system.spawn(idle)
        second = system.spawn(idle)
        with pytest.raises(ValueError, match="does not own"):
            first.give(port, second)
        first.own(port)
        gone = system.spawn(crash_on_request)
        gone.send_nowait("stop")
        await gone.wait()
        with pytest.raises(ports.ClosedPortError, match="ended"):
            first.give(port, gone)
        with pytest.raises(ports.ClosedPortError, match="ended"):
            gone.own(port)
        closed = ports.Mailbox()
        closed.close()
        with pytest.raises(ports.ClosedPortError, match="closed"):
            port.set_owner(closed)
        assert port.owner is first.mailbox  # unchanged by the refusals
        first.give(port, second.mailbox)
        second.kill()
        await second.wait()
        assert port.closed
        system.shutdown()


async def test_a_long_lived_owner_of_many_short_lived_ports_keeps_no_garbage(
    ios: ioserver.IOServer,
) -> None:
    listener = await ports.listen_tcp(ios, "127.0.0.1", 0)
    async with listener, ports.open_actor_system() as system:
        owner = system.spawn(idle)
        for _ in range(100):
            async with await anyio.connect_tcp("127.0.0.1", listener.local_address[1]):
                accepted = await listener.receive()
                assert isinstance(accepted, Accepted)
                owner.own(accepted.port)
                await accepted.port.aclose()
        assert len(owner.mailbox._ports) < 64
        system.shutdown()


# -- supervisors ----------------------------------------------------------------------------
async def reporting_child(actor: Actor, inbox: ports.Mailbox, child_id: str) -> None:
    """Report ("started", id, actor), then crash on "crash", return on "stop"."""
    inbox.send_nowait(("started", child_id, actor))
    await crash_on_request(actor)


async def started(inbox: ports.Mailbox, child_id: str) -> Actor:
    message = await inbox.receive(match=lambda m: m[:2] == ("started", child_id), timeout=10)
    actor: Actor = message[2]
    return actor


def specs(inbox: ports.Mailbox, *ids: str, **options: Any) -> list[ChildSpec]:
    return [ChildSpec(child_id, reporting_child, (inbox, child_id), **options) for child_id in ids]


async def test_one_for_one_restarts_the_crashed_child_alone(no_leaks: None) -> None:
    inbox = ports.Mailbox()
    supervisor = Supervisor(specs(inbox, "a", "b"), intensity=5)
    async with ports.open_actor_system() as system:
        system.spawn(supervisor, name="top")
        a, b = await started(inbox, "a"), await started(inbox, "b")
        a.send_nowait("crash")
        new_a = await started(inbox, "a")
        assert new_a is not a and isinstance(a.reason, Boom)
        assert b.alive
        assert supervisor.which_children() == [("a", new_a), ("b", b)]
        assert supervisor.child("a") is new_a and supervisor.restarts == 1
        system.shutdown()
    assert not new_a.alive and not b.alive  # nothing outlives the system


async def test_too_many_restarts_make_the_supervisor_fail_naming_the_child(
    ios: ioserver.IOServer,
) -> None:
    inbox = ports.Mailbox()
    listener, port, peer = await tcp_pair(ios)
    async with listener, peer, ports.open_actor_system() as system:
        supervisor = Supervisor(specs(inbox, "steady", "flaky"), intensity=2, period=60)
        top = system.spawn(supervisor)
        top.own(port, mailbox=False)
        steady = await started(inbox, "steady")
        for _ in range(3):
            (await started(inbox, "flaky")).send_nowait("crash")
        reason = await top.wait()
        assert isinstance(reason, RestartIntensityError)
        assert reason.child == "flaky" and reason.restarts == 3 and reason.intensity == 2
        assert "'flaky'" in str(reason) and "3 restarts" in str(reason)
        assert isinstance(reason.__cause__, Boom)
        assert steady.reason is ExitReason.SHUTDOWN  # terminated before giving up
        await assert_peer_sees_the_end(peer)  # the supervisor's own port closed with it


async def test_restarts_older_than_the_period_are_forgotten(no_leaks: None) -> None:
    inbox = ports.Mailbox()
    async with ports.open_actor_system() as system:
        supervisor = Supervisor(specs(inbox, "flaky"), intensity=1, period=0.05)
        top = system.spawn(supervisor)
        for _ in range(3):
            child = await started(inbox, "flaky")
            await anyio.sleep(0.06)  # let the previous restart leave the window
            child.send_nowait("crash")
        await started(inbox, "flaky")
        assert top.alive and supervisor.restarts == 3
        system.shutdown()


async def test_one_for_all_restarts_every_sibling(no_leaks: None) -> None:
    inbox = ports.Mailbox()
    async with ports.open_actor_system() as system:
        system.spawn(Supervisor(specs(inbox, "a", "b", "c"), strategy="one_for_all", intensity=3))
        first = [await started(inbox, child_id) for child_id in "abc"]
        first[1].send_nowait("crash")
        second = [await started(inbox, child_id) for child_id in "abc"]  # in start order
        assert not set(first) & set(second)
        assert isinstance(first[1].reason, Boom)
        assert first[0].reason is first[2].reason is ExitReason.SHUTDOWN
        assert all(actor.alive for actor in second)
        system.shutdown()


async def test_one_for_all_handles_siblings_that_crash_together_and_drops_temporaries(
    no_leaks: None,
) -> None:
    inbox = ports.Mailbox()
    children = [*specs(inbox, "a", "b"), *specs(inbox, "temporary", restart="temporary")]
    supervisor = Supervisor(children, strategy="one_for_all", intensity=1)
    async with ports.open_actor_system() as system:
        top = system.spawn(supervisor)
        a, b, temporary = [await started(inbox, child_id) for child_id in ("a", "b", "temporary")]
        a.send_nowait("crash")
        b.send_nowait("crash")  # both Exits reach the supervisor: one restart, not two
        new_a, new_b = await started(inbox, "a"), await started(inbox, "b")
        assert temporary.reason is ExitReason.SHUTDOWN  # terminated, and not restarted
        assert [child_id for child_id, _ in supervisor.which_children()] == ["a", "b"]
        await anyio.wait_all_tasks_blocked()
        assert top.alive and supervisor.restarts == 1
        assert new_a.alive and new_b.alive
        system.shutdown()


async def test_restart_types_permanent_transient_temporary(no_leaks: None) -> None:
    inbox = ports.Mailbox()
    children = [
        *specs(inbox, "permanent"),
        *specs(inbox, "transient", restart=Restart.TRANSIENT),
        *specs(inbox, "temporary", restart="temporary"),
    ]
    supervisor = Supervisor(children, intensity=10)
    async with ports.open_actor_system() as system:
        system.spawn(supervisor)
        permanent = await started(inbox, "permanent")
        transient = await started(inbox, "transient")
        temporary = await started(inbox, "temporary")
        permanent.send_nowait("stop")  # even a normal end is restarted
        await started(inbox, "permanent")
        transient.send_nowait("crash")  # a crash is restarted...
        transient = await started(inbox, "transient")
        transient.send_nowait("stop")  # ...a normal end is not
        temporary.send_nowait("crash")  # never restarted, and forgotten
        await temporary.wait()
        await transient.wait()
        await anyio.wait_all_tasks_blocked()
        assert [child_id for child_id, _ in supervisor.which_children()] == [
            "permanent",
            "transient",
        ]
        assert supervisor.child("transient") is None
        assert supervisor.restarts == 2
        system.shutdown()


async def test_auto_shutdown_ends_the_supervisor_with_its_significant_children(
    no_leaks: None,
) -> None:
    inbox = ports.Mailbox()
    children = [
        *specs(inbox, "helper"),
        *specs(inbox, "main", restart=Restart.TRANSIENT, significant=True),
    ]
    async with ports.open_actor_system() as system:
        top = system.spawn(Supervisor(children, auto_shutdown="any_significant"))
        helper = await started(inbox, "helper")
        (await started(inbox, "main")).send_nowait("stop")
        assert await top.wait() is ExitReason.NORMAL
        assert helper.reason is ExitReason.SHUTDOWN


async def test_shutdown_lets_a_trapping_child_clean_up_then_kills_a_stubborn_one(
    no_leaks: None,
) -> None:
    inbox = ports.Mailbox()

    async def tidy(actor: Actor) -> None:
        actor.trap_exits = True
        message = await actor.receive()
        inbox.send_nowait(("tidy got", message.reason))

    async def stubborn(actor: Actor) -> None:
        actor.trap_exits = True
        while True:
            await actor.receive()  # ignores its exit signal

    children = [ChildSpec("tidy", tidy), ChildSpec("stubborn", stubborn, shutdown=0.05)]
    async with ports.open_actor_system() as system:
        supervisor = Supervisor(children)
        top = system.spawn(supervisor)
        await anyio.wait_all_tasks_blocked()
        tidy_actor, stubborn_actor = (actor for _, actor in supervisor.which_children())
        assert tidy_actor is not None and stubborn_actor is not None
        top.exit(ExitReason.SHUTDOWN)  # as a parent supervisor would
        assert await top.wait() is ExitReason.NORMAL
        assert stubborn_actor.reason is ExitReason.KILLED  # killed after 0.05 s
        assert inbox.receive_nowait() == ("tidy got", ExitReason.SHUTDOWN)
        assert tidy_actor.reason is ExitReason.NORMAL


async def test_a_supervisor_that_gives_up_is_restarted_by_its_own_supervisor(
    no_leaks: None,
) -> None:
    inbox = ports.Mailbox()
    inner = Supervisor(specs(inbox, "worker"), intensity=0)
    outer = Supervisor([ChildSpec("inner", inner)], intensity=5)
    async with ports.open_actor_system() as system:
        system.spawn(outer)
        worker = await started(inbox, "worker")
        first_inner = outer.child("inner")
        worker.send_nowait("crash")  # intensity 0: the inner supervisor gives up at once
        await started(inbox, "worker")  # a new inner supervisor started a new worker
        assert first_inner is not None
        assert isinstance(first_inner.reason, RestartIntensityError)
        assert outer.restarts == 1 and outer.child("inner") is not first_inner
        system.shutdown()


def test_supervisor_options_are_checked() -> None:
    child = ChildSpec("a", idle)
    with pytest.raises(ports.OptionError, match="strategy"):
        Supervisor([child], strategy="one_for_some")
    with pytest.raises(ports.OptionError, match="intensity"):
        Supervisor([child], intensity=-1)
    with pytest.raises(ports.OptionError, match="period"):
        Supervisor([child], period=0)
    with pytest.raises(ports.OptionError, match="two children"):
        Supervisor([child, child])
    with pytest.raises(ports.OptionError, match="permanent child cannot be significant"):
        Supervisor([ChildSpec("a", idle, significant=True)])
    with pytest.raises(ports.OptionError, match="needs a significant child"):
        Supervisor([child], auto_shutdown="all_significant")
    with pytest.raises(ports.OptionError, match="restart"):
        Supervisor([ChildSpec("a", idle, restart="sometimes")])
    with pytest.raises(ports.OptionError, match="shutdown"):
        Supervisor([ChildSpec("a", idle, shutdown=-1)])
    with pytest.raises(TypeError, match="ChildSpec"):
        Supervisor([("a", idle)])  # type: ignore[list-item]


async def test_an_exit_signal_from_outside_stops_a_supervisor_with_an_ended_child(
    no_leaks: None,
) -> None:
    """Regression: the signal's sender (None, outside any actor) must not be taken for the
    transient child that already ended for good (whose actor is also None)."""
    inbox = ports.Mailbox()
    children = [
        *specs(inbox, "helper"),
        *specs(inbox, "done", restart=Restart.TRANSIENT),
    ]
    async with ports.open_actor_system() as system:
        top = system.spawn(Supervisor(children))
        helper = await started(inbox, "helper")
        done = await started(inbox, "done")
        done.send_nowait("stop")
        assert await done.wait() is ExitReason.NORMAL
        top.exit(ExitReason.SHUTDOWN)
        with anyio.fail_after(10):
            await top.wait()  # it stops (it used to run on, taking the signal for "done")
        assert not top.alive
        assert helper.reason is ExitReason.SHUTDOWN
