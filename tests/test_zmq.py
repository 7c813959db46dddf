"""ZeroMQ sockets as ports: complete, ordered traffic, multipart messages, the
edge-triggered ZMQ_FD trap, and typed errors."""

from __future__ import annotations

import anyio
import pytest
import zmq
from conftest import until

import ioserver
import ports

pytestmark = pytest.mark.anyio

N = 100_000


async def test_push_pull_100k_messages_arrive_complete_and_in_order(
    ios: ioserver.IOServer,
) -> None:
    async with (
        await ports.open_zmq(ios, "PULL", bind="tcp://127.0.0.1:*") as pull,
        await ports.open_zmq(ios, "PUSH", connect=pull.local_address) as push,
    ):

        async def produce() -> None:
            for i in range(N):
                await push.send(i.to_bytes(4, "big"))

        with anyio.fail_after(40):
            async with anyio.create_task_group() as task_group:
                task_group.start_soon(produce)
                for i in range(N):
                    message = await pull.receive()
                    assert message == ports.Data([i.to_bytes(4, "big")])
        statistics = pull.statistics()
        assert statistics.bytes_received == 4 * N
        assert statistics.bytes_buffered_in == 0


async def test_dealer_router_round_trips_100k_multipart_messages(
    ios: ioserver.IOServer,
) -> None:
    async with (
        # A ROUTER drops what a full peer cannot take (ZeroMQ's rule) unless it is
        # mandatory: then the I/O thread holds the message until the peer drains.
        await ports.open_zmq(
            ios, "ROUTER", bind="tcp://127.0.0.1:*", router_mandatory=True
        ) as router,
        await ports.open_zmq(
            ios, "DEALER", connect=router.local_address, identity=b"worker-1"
        ) as dealer,
    ):

        async def echo_back() -> None:
            for i in range(N):
                message = await router.receive()
                assert isinstance(message, ports.Data)
                identity, *body = message.data
                assert identity == b"worker-1"
                assert body == [b"call", str(i).encode()]
                await router.send([identity, b"reply", str(i).encode()])

        async def call() -> None:
            for i in range(N):
                await dealer.send([b"call", str(i).encode()])

        with anyio.fail_after(50):
            async with anyio.create_task_group() as task_group:
                task_group.start_soon(echo_back)
                task_group.start_soon(call)
                for i in range(N):
                    message = await dealer.receive()
                    assert message == ports.Data([b"reply", str(i).encode()])


async def test_a_burst_sent_while_the_owner_is_busy_is_not_lost(
    ios: ioserver.IOServer,
) -> None:
    """The edge-trigger trap: the burst arrives while the port is passive, the I/O thread
    looks at ZMQ_EVENTS and does not read; ZMQ_FD then stays quiet.  Making the port active
    again must still deliver every message."""
    async with (
        await ports.open_zmq(ios, "PULL", bind="inproc://burst", active="once") as pull,
        await ports.open_zmq(ios, "PUSH", connect="inproc://burst") as push,
        await ports.open_zmq(ios, "PULL", bind="inproc://done") as done_pull,
        await ports.open_zmq(ios, "PUSH", connect="inproc://done") as done_push,
    ):
        await push.send(b"first")
        assert await pull.receive() == ports.Data([b"first"])
        assert pull.active is False  # "once" used up: the owner is "busy"
        for i in range(500):
            await push.send(str(i).encode())
        # The I/O thread flushes the burst's socket before the marker's (one round, in
        # order), and inproc hands each message to the peer's pipe as it is sent.
        await done_push.send(b"burst sent")
        assert await done_pull.receive() == ports.Data([b"burst sent"])
        pull.setopts(active=True)
        with anyio.fail_after(10):
            for i in range(500):
                assert await pull.receive() == ports.Data([str(i).encode()])


async def test_a_passive_zmq_port_reads_one_message_per_receive(
    ios: ioserver.IOServer,
) -> None:
    async with (
        await ports.open_zmq(ios, "PAIR", bind="inproc://pair", active=False) as left,
        await ports.open_zmq(ios, "PAIR", connect="inproc://pair") as right,
    ):
        for i in range(10):
            await right.send([b"part-a", str(i).encode(), b""])
        with anyio.fail_after(10):
            for i in range(10):
                assert await left.receive() == ports.Data([b"part-a", str(i).encode(), b""])
                assert left.statistics().messages_buffered == 0


async def test_pub_sub_delivers_only_the_subscribed_topics(ios: ioserver.IOServer) -> None:
    async with (
        await ports.open_zmq(ios, "PUB", bind="inproc://news") as pub,
        await ports.open_zmq(
            ios, "SUB", connect="inproc://news", subscribe=[b"sports", b"end"]
        ) as sub,
    ):
        # A subscription reaches the publisher asynchronously: publish until one arrives.
        with anyio.fail_after(10):
            while True:
                await pub.send([b"sports", b"warm-up"])
                with anyio.move_on_after(0.05):
                    await sub.receive()
                    break
        await pub.send([b"weather", b"rain"])
        await pub.send([b"sports", b"goal"])
        await pub.send([b"end"])
        received = []
        with anyio.fail_after(10):
            while True:
                message = await sub.receive()
                assert isinstance(message, ports.Data)
                if message.data == [b"end"]:
                    break
                received.append(message.data)
        assert [b"weather", b"rain"] not in received
        assert received[-1] == [b"sports", b"goal"]


async def test_an_unroutable_message_is_an_error_message_not_a_crash(
    ios: ioserver.IOServer,
) -> None:
    async with await ports.open_zmq(
        ios, "ROUTER", bind="inproc://mandatory", router_mandatory=True
    ) as router:
        await router.send([b"nobody", b"hello"])
        with anyio.fail_after(10):
            message = await router.receive()
        assert isinstance(message, ports.Error)
        assert message.errno_name == "EHOSTUNREACH"
        # The port still works.
        async with await ports.open_zmq(
            ios, "DEALER", connect="inproc://mandatory", identity=b"someone"
        ) as dealer:
            await dealer.send(b"ping")
            with anyio.fail_after(10):
                assert await router.receive() == ports.Data([b"someone", b"ping"])


async def test_wrong_socket_types_options_and_endpoints_are_typed_errors(
    ios: ioserver.IOServer,
) -> None:
    with pytest.raises(ports.OptionError, match="unknown ZeroMQ socket type"):
        await ports.open_zmq(ios, "STREAMER")
    with pytest.raises(ports.OptionError, match="unknown option"):
        await ports.open_zmq(ios, "PUSH", hwm=3)  # type: ignore[call-arg]
    with pytest.raises(ports.OptionError, match="subscribe applies to SUB"):
        await ports.open_zmq(ios, "PUSH", subscribe=b"x")
    with pytest.raises(ports.ConnectError) as info:
        await ports.open_zmq(ios, "PUSH", bind="nonsense://here")
    assert info.value.errno_name == "EPROTONOSUPPORT"
    async with await ports.open_zmq(ios, "PULL", bind="tcp://127.0.0.1:*") as taken:
        with pytest.raises(ports.ConnectError) as info:
            await ports.open_zmq(ios, "PULL", bind=taken.local_address)
        assert info.value.errno_name == "EADDRINUSE"
    async with await ports.open_zmq(ios, "PUSH", connect="inproc://nobody-yet") as push:
        with pytest.raises(TypeError, match="ZeroMQ"):
            await push.send("text")


async def test_closing_the_server_ends_zmq_ports_with_closed(no_leaks: None) -> None:
    async with ioserver.open() as ios:
        pull = await ports.open_zmq(ios, "PULL", bind="inproc://end")
        receiving = anyio.Event()
        result: list[object] = []

        async def wait_for_end() -> None:
            receiving.set()
            result.append(await pull.receive())

        async with anyio.create_task_group() as task_group:
            task_group.start_soon(wait_for_end)
            await receiving.wait()
            await ios.aclose()
    assert result == [ports.Closed("ioserver closed", "ESHUTDOWN")]


def _send_all(endpoint: str, socket_type: int, count: int, size: int) -> None:
    """A plain ZeroMQ peer (its own context, in a worker thread): send ``count`` messages
    of ``size`` bytes, each numbered, blocking while ZeroMQ's high-water mark holds."""
    context = zmq.Context()
    try:
        peer = context.socket(socket_type)
        peer.setsockopt(zmq.SNDTIMEO, 20_000)
        peer.setsockopt(zmq.LINGER, 5_000)
        peer.connect(endpoint)
        for index in range(count):
            peer.send(index.to_bytes(4, "big") + b"p" * (size - 4))
        peer.close()
    finally:
        context.term()


@pytest.mark.every_core
@pytest.mark.parametrize(("kind", "peer_kind"), [("PULL", zmq.PUSH), ("ROUTER", zmq.DEALER)])
async def test_a_zmq_flood_to_a_slow_owner_stays_within_the_memory_budget(
    no_leaks: None, core: str, kind: str, peer_kind: int
) -> None:
    """A ZeroMQ port's messages are charged to ``memory_limit`` (issue 14): a flood to a
    port whose owner is slow must pause it when the budget is used up - with watermarks
    far above the budget, so that only the budget can stop it - and every message still
    arrives, in order.  Before, its handler never asked the budget: it read the whole
    flood into the port, far past the limit."""
    limit = 256 * 1024
    size = 4096
    count = 400  # 1.6 MiB: six times the budget
    async with (
        ioserver.open(core=core, memory_limit=limit) as ios,
        await ports.open_zmq(
            ios,
            kind,
            bind="tcp://127.0.0.1:*",
            high_msgq_watermark=64 << 20,
            low_msgq_watermark=32 << 20,
            high_msgq_messages=1 << 20,
        ) as port,
        anyio.create_task_group() as task_group,
    ):
        task_group.start_soon(
            anyio.to_thread.run_sync, _send_all, port.local_address, peer_kind, count, size
        )
        # The I/O thread's state: paused by the budget, or (the bug) past the limit.
        await until(lambda: port.statistics().pauses > 0 or ios.statistics().memory_in_use > limit)
        assert ios.statistics().memory_in_use <= limit + size
        for index in range(count):
            with anyio.fail_after(10):
                message = await port.receive()
            assert isinstance(message, ports.Data), message
            assert message.data[-1][:4] == index.to_bytes(4, "big")
            assert ios.statistics().memory_in_use <= limit + size
        assert ios.statistics().peak_memory <= limit + size
        assert port.statistics().bytes_buffered_in == 0
        await until(lambda: ios.statistics().memory_in_use == 0)
