"""Active modes under framing and cancellation: exact counts, nothing lost or reordered.

Erlang's ``{active, once}`` lets one *packet* through and ``{active, N}`` N packets,
whatever the packet mode; ``gen_tcp:recv`` on a passive socket returns one packet.  Here
a peer writes a burst of packets in one write (so one read decodes many) followed by its
end of file, and the tests check, after a full round of the I/O thread, that each grant
delivered exactly what it allowed, in order, with the final ``Closed`` after the last
packet - then do the same with receives cancelled at every point they can be.

Real sockets on loopback, both backends (tests/conftest.py), every packet mode that can
decode several packets from one read.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import msgpack
import pytest

import client
import ioserver
import ports
from ioserver._framing import MSGPACK_MAX_DEPTH, encode_resp
from ports import Accepted, Closed, Data, Error, Passive

pytestmark = pytest.mark.anyio

#: Packet modes in which one read can hold several packets.
MODES: list[Any] = [1, 2, 4, "line", "resp", "msgpack"]


def encode(packet: Any, index: int) -> tuple[bytes, Any]:
    """The wire bytes of packet number ``index`` in mode ``packet``, and what the owner
    receives for it."""
    if packet in (1, 2, 4):
        body = b"packet %d" % index
        return len(body).to_bytes(packet, "big") + body, body
    if packet == "line":
        line = b"line %d\n" % index
        return line, line
    if packet == "resp":
        command = [b"SET", b"key%d" % index, b"v" * (index % 5)]
        return encode_resp(command), command
    assert packet == "msgpack"
    value = {"n": index, "tag": "x" * (index % 3)}
    return msgpack.packb(value), value


def burst(packet: Any, start: int, count: int) -> tuple[bytes, list[Any]]:
    pieces = [encode(packet, index) for index in range(start, start + count)]
    return b"".join(wire for wire, _ in pieces), [payload for _, payload in pieces]


async def pair(
    ios: ioserver.IOServer, **options: Any
) -> tuple[ports.Listener, ports.Port, anyio.abc.SocketStream]:
    listener = await ports.listen_tcp(ios, "127.0.0.1", 0, **options)
    client = await anyio.connect_tcp("127.0.0.1", listener.local_address[1])
    accepted = await listener.receive()
    assert isinstance(accepted, Accepted)
    return listener, accepted.port, client


async def io_round_trip(ios: ioserver.IOServer) -> None:
    """Return once the I/O thread has been through full rounds after this point (a byte
    echoed over a second connection): whatever it would deliver by itself is delivered."""
    listener = await ports.listen_tcp(ios, "127.0.0.1", 0)
    async with listener, await anyio.connect_tcp("127.0.0.1", listener.local_address[1]) as probe:
        accepted = await listener.receive()
        assert isinstance(accepted, Accepted)
        await probe.send(b"?")
        assert await accepted.port.receive() == Data(b"?")
        await accepted.port.aclose()


async def assert_nothing_more(ios: ioserver.IOServer, port: ports.Port) -> None:
    await io_round_trip(ios)
    with pytest.raises(ports.WouldBlock):
        port.receive_nowait()


async def assert_memory_released(ios: ioserver.IOServer) -> None:
    await io_round_trip(ios)  # the I/O thread has run the closes
    assert ios.statistics().memory_in_use == 0


@pytest.mark.parametrize("packet", MODES)
async def test_active_once_lets_one_packet_through_per_grant(
    ios: ioserver.IOServer, packet: Any
) -> None:
    wire, payloads = burst(packet, 0, 10)
    listener, port, client = await pair(ios, packet=packet, active="once")
    async with listener, client, port:
        await client.send(wire)  # one write: one read decodes them all
        await client.send_eof()
        for index, expected in enumerate(payloads):
            if index:
                port.setopts(active="once")
            assert await port.receive() == Data(expected)
            assert port.active is False
            await assert_nothing_more(ios, port)
            if index < len(payloads) - 1:
                # The rest waits in the I/O thread, charged to the budget.
                assert port.statistics().bytes_buffered_in > 0
        # The peer's end of file was read only now, after the last packet.
        port.setopts(active="once")
        assert await port.receive() == Closed("eof")
    await assert_memory_released(ios)


@pytest.mark.parametrize("packet", MODES)
async def test_active_n_counts_packets_and_passive_comes_when_it_reaches_zero(
    ios: ioserver.IOServer, packet: Any
) -> None:
    wire, payloads = burst(packet, 0, 10)
    listener, port, client = await pair(ios, packet=packet, active=3)
    async with listener, client, port:
        await client.send(wire)
        await client.send_eof()
        received: list[Any] = []
        for grant in (None, 3):
            if grant is not None:
                port.setopts(active=grant)
            for _ in range(3):
                message = await port.receive()
                assert isinstance(message, Data)
                received.append(message.data)
            assert await port.receive() == Passive()
            assert port.active is False
            await assert_nothing_more(ios, port)
        # 4 packets left and a count of 5: the four, then the end of file, no Passive.
        port.setopts(active=5)
        for _ in range(4):
            message = await port.receive()
            assert isinstance(message, Data)
            received.append(message.data)
        assert await port.receive() == Closed("eof")
        assert received == payloads
    await assert_memory_released(ios)


@pytest.mark.parametrize("packet", MODES)
async def test_a_passive_receive_takes_one_packet(ios: ioserver.IOServer, packet: Any) -> None:
    wire, payloads = burst(packet, 0, 10)
    listener, port, client = await pair(ios, packet=packet, active=False)
    async with listener, client, port:
        await client.send(wire)
        await client.send_eof()
        for expected in payloads:
            assert await port.receive() == Data(expected)
            await assert_nothing_more(ios, port)
        assert await port.receive() == Closed("eof")
    await assert_memory_released(ios)


@pytest.mark.parametrize("packet", MODES)
async def test_switching_to_active_true_delivers_the_held_packets_first(
    ios: ioserver.IOServer, packet: Any
) -> None:
    first, payloads = burst(packet, 0, 6)
    second, more = burst(packet, 6, 4)
    listener, port, client = await pair(ios, packet=packet, active="once")
    async with listener, client, port:
        await client.send(first)
        assert await port.receive() == Data(payloads[0])
        await assert_nothing_more(ios, port)
        await client.send(second)  # behind the five held ones, in the kernel
        await client.send_eof()
        port.setopts(active=True)
        received = []
        async for message in port:
            received.append(message)
        assert received == [Data(p) for p in payloads[1:] + more] + [Closed("eof")]


CANCELLED_WAYS = ("already_cancelled", "zero_timeout", "cancelled_while_parked", "plain")


async def receive_one_way(
    port: ports.Port, way: str, into: list[Any], task_group: anyio.abc.TaskGroup
) -> None:
    """Receive on ``port`` in one of the ways of CANCELLED_WAYS; what a receive returns
    (even one inside a cancelled scope, which asyncio may let complete) goes to ``into``."""
    if way == "already_cancelled":
        with anyio.CancelScope() as scope:
            scope.cancel()
            into.append(await port.receive())
    elif way == "zero_timeout":
        with anyio.move_on_after(0):
            into.append(await port.receive())
    elif way == "cancelled_while_parked":
        scope = anyio.CancelScope()

        async def receiver() -> None:
            with scope:
                into.append(await port.receive())

        task_group.start_soon(receiver)
        await anyio.wait_all_tasks_blocked()  # parked in receive, or done
        scope.cancel()
        await anyio.wait_all_tasks_blocked()
    else:
        into.append(await port.receive())


@pytest.mark.parametrize("packet", ["line", 4, "msgpack"])
@pytest.mark.parametrize("active", [False, "once"])
async def test_receives_cancelled_at_every_point_lose_and_duplicate_nothing(
    ios: ioserver.IOServer, packet: Any, active: Any
) -> None:
    wire, payloads = burst(packet, 0, 40)
    listener, port, client = await pair(ios, packet=packet, active=active)
    async with listener, client, port, anyio.create_task_group() as task_group:
        await client.send(wire)
        await client.send_eof()
        received: list[Any] = []
        attempt = 0
        with anyio.fail_after(20):
            while not received or received[-1].__class__ is not Closed:
                if active == "once" and port.active is False:
                    port.setopts(active="once")
                await receive_one_way(
                    port, CANCELLED_WAYS[attempt % len(CANCELLED_WAYS)], received, task_group
                )
                attempt += 1
        assert received == [Data(p) for p in payloads] + [Closed("eof")]
        assert attempt > len(received)  # some receives were cancelled


async def test_active_n_grants_interleaved_with_bursts_and_cancelled_receives(
    ios: ioserver.IOServer,
) -> None:
    """A peer writes bursts of 1 to 7 packets while the owner grants counts of 1 to 4, and
    some of its receives are cancelled.  Every packet arrives once, in order, and never
    more than were granted.  For the first half the owner grants only on Passive: then
    Passive comes exactly when its count reaches 0.  In the second half it also grants
    early, adding to the running count; a Passive already on its way then still arrives
    (it says the count reached 0 before the grant, as in Erlang), so only the bound holds."""
    rng = random.Random(12)
    total = 300
    listener, port, client = await pair(ios, packet=4, active=2)

    async def peer() -> None:
        index = 0
        while index < total:
            count = min(rng.randint(1, 7), total - index)
            wire, _ = burst(4, index, count)
            await client.send(wire)
            index += count
            await anyio.lowlevel.checkpoint()
        await client.send_eof()

    expected = [b"packet %d" % index for index in range(total)]
    async with listener, client, port, anyio.create_task_group() as task_group:
        task_group.start_soon(peer)
        count = 2  # granted and not yet received, as the owner tallies it
        received: list[Any] = []
        passives = early = 0
        with anyio.fail_after(20):
            while True:
                got: list[Any] = []
                way = rng.choice(("plain", "plain", "already_cancelled", "zero_timeout"))
                await receive_one_way(port, way, got, task_group)
                if not got:
                    continue
                message = got[0]
                if isinstance(message, Data):
                    assert count > 0, "a packet beyond the granted count"
                    count -= 1
                    received.append(message.data)
                    if count and len(received) > total // 2 and rng.random() < 0.2:
                        extra = rng.randint(1, 4)
                        port.setopts(active=extra)
                        count += extra
                        early += 1
                elif isinstance(message, Passive):
                    if not early:
                        assert count == 0, "Passive before the count ran out"
                    passives += 1
                    grant = rng.randint(1, 4)
                    port.setopts(active=grant)
                    count += grant
                else:
                    assert message == Closed("eof")
                    break
        assert received == expected
        assert passives > 10 and early > 5


ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def daemon_endpoint(tmp_path: Path) -> Iterator[str]:
    """An ``ioserver serve`` subprocess; its control endpoint."""
    endpoint = f"ipc://{tmp_path}/run/control"
    process = subprocess.Popen(
        [sys.executable, "-m", "ioserver", "serve", "--endpoint", endpoint],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        cwd=ROOT,
    )
    assert process.stdout is not None
    log = []
    try:
        for line in process.stdout:  # the daemon logs "serving" once it listens
            log.append(line)
            if "serving" in line:
                break
        else:
            pytest.fail("the daemon did not start: " + "".join(log))
        yield endpoint
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            assert process.wait(20) == 0, "".join(log) + process.stdout.read()
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
            process.stdout.close()


async def test_active_modes_count_packets_through_a_daemon(
    daemon_endpoint: str, no_leaks: None
) -> None:
    """The daemon's ports run the same I/O thread code: a burst of lines, then once, N
    and passive grants, each exact, and the end of file after the last line."""
    wire, payloads = burst("line", 0, 10)
    async with (
        client.connect(daemon_endpoint) as ios,
        await ports.listen_tcp(ios, "127.0.0.1", 0, packet="line", active="once") as listener,
        await anyio.connect_tcp(*listener.local_address) as peer,
    ):
        accepted = await listener.receive()
        assert isinstance(accepted, Accepted)
        async with accepted.port as port:
            await peer.send(wire)
            await peer.send_eof()
            assert await port.receive() == Data(payloads[0])
            # The daemon has nothing more to deliver: a passive receive gets the next one
            # (had the burst been delivered whole, it would be buffered here already).
            port.setopts(active=3)
            for expected in payloads[1:4]:
                assert await port.receive() == Data(expected)
            assert await port.receive() == Passive()
            assert port.statistics().messages_buffered == 0
            port.setopts(active=False)
            for expected in payloads[4:]:
                assert await port.receive() == Data(expected)
                assert port.statistics().messages_buffered == 0
            assert await port.receive() == Closed("eof")


@pytest.mark.parametrize("depth", [1024, 1023, 1022, MSGPACK_MAX_DEPTH + 1])
async def test_a_deep_msgpack_object_through_a_daemon_ends_its_port_alone(
    daemon_endpoint: str, no_leaks: None, depth: int
) -> None:
    """A peer's msgpack object nested near the decoder's own limit (1024 levels) used to
    reach the daemon's frame to its client three levels deeper still: at 1024 the daemon
    could not pack the frame and closed its control endpoint (every client lost it); at
    1022-1023 the client could not unpack it and dropped the whole frame, other ports'
    data with it.  Now the framer refuses it (EPROTO) on its port alone, and a raw port of
    the same client gets every byte."""
    deep = b"\x91" * (depth - 1) + b"\x90"
    payload = bytes(range(256)) * 64
    async with (
        client.connect(daemon_endpoint) as ios,
        await ports.listen_tcp(ios, "127.0.0.1", 0, packet="msgpack") as framed_listener,
        await ports.listen_tcp(ios, "127.0.0.1", 0) as raw_listener,
        await anyio.connect_tcp(*framed_listener.local_address) as framed_peer,
        await anyio.connect_tcp(*raw_listener.local_address) as raw_peer,
    ):
        framed = await framed_listener.receive()
        raw = await raw_listener.receive()
        assert isinstance(framed, Accepted) and isinstance(raw, Accepted)
        async with framed.port, raw.port:
            await raw_peer.send(payload[: len(payload) // 2])
            await framed_peer.send(deep)
            await raw_peer.send(payload[len(payload) // 2 :])
            await raw_peer.send_eof()
            with anyio.fail_after(10):
                error = await framed.port.receive()
                assert isinstance(error, Error) and error.errno_name == "EPROTO", error
                closed = await framed.port.receive()
                assert isinstance(closed, Closed) and closed.errno_name == "EPROTO", closed
                received = bytearray()
                async for message in raw.port:
                    if isinstance(message, Data):
                        received += message.data
                    else:
                        assert message == Closed("eof")
            assert received == payload
            # The control endpoint still serves this client: a new port opens.
            async with await ports.listen_tcp(ios, "127.0.0.1", 0):
                pass


@pytest.mark.every_core
@pytest.mark.parametrize("active", [True, "once", False, 2])
async def test_an_unterminated_last_line_is_delivered_before_the_eof(
    ios: ioserver.IOServer, active: Any
) -> None:
    """``packet="line"``: a peer that sends ``b"a\\nb"`` and closes.  Its last line has no
    delimiter; it is delivered, as Erlang's ``{packet, line}`` does, before the final
    ``Closed("eof")`` - on both cores and whatever the active mode (issue 14).  Before,
    the framer kept ``b"b"`` and the port ended without it: lost without a word."""
    listener, port, peer = await pair(ios, packet="line", active=active)
    async with listener, port:
        await peer.send(b"a\nb")
        await peer.aclose()
        messages: list[Any] = []
        with anyio.fail_after(10):
            while not messages or not isinstance(messages[-1], Closed):
                message = await port.receive()
                if isinstance(message, Passive):
                    port.setopts(active=1)
                    continue
                messages.append(message)
        assert messages == [Data(b"a\n"), Data(b"b"), Closed("eof")]
        assert port.statistics().bytes_buffered_in == 0
    await assert_memory_released(ios)


@pytest.mark.every_core
async def test_a_peer_that_closes_after_whole_lines_gets_no_empty_line(
    ios: ioserver.IOServer,
) -> None:
    """The unterminated rest is delivered only when there is one: a stream that ends
    with its delimiter ends with ``Closed`` right after its last line."""
    listener, port, peer = await pair(ios, packet="line")
    async with listener, port:
        await peer.send(b"a\nb\n")
        await peer.aclose()
        with anyio.fail_after(10):
            messages = [message async for message in port]
        assert messages == [Data(b"a\n"), Data(b"b\n"), Closed("eof")]
    await assert_memory_released(ios)
