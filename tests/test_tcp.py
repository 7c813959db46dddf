"""TCP ports against real sockets on loopback, on asyncio and trio."""

from __future__ import annotations

import socket
import struct

import anyio
import anyio.abc
import pytest
import trio

import ioserver
import ports
from ports import Accepted, Closed, Data

# Every test here runs on both I/O cores (the Python I/O thread and the native one).
pytestmark = [pytest.mark.anyio, pytest.mark.every_core]


async def listen(ios: ioserver.IOServer, **options: object) -> tuple[ports.Listener, int]:
    listener = await ports.listen_tcp(ios, "127.0.0.1", 0, **options)  # type: ignore[arg-type]
    return listener, listener.local_address[1]


async def accept(listener: ports.Listener) -> ports.Port:
    message = await listener.receive()
    assert isinstance(message, Accepted)
    return message.port


async def receive_exactly(port: ports.Port, size: int) -> bytes:
    data = b""
    while len(data) < size:
        message = await port.receive()
        assert isinstance(message, Data), message
        data += message.data
    return data


async def read_exactly(stream: anyio.abc.SocketStream, size: int) -> bytes:
    data = b""
    while len(data) < size:
        data += await stream.receive()
    return data


def reset(stream: anyio.abc.SocketStream) -> None:
    """Close ``stream`` with an RST instead of a FIN (SO_LINGER of zero seconds)."""
    raw = stream.extra(anyio.abc.SocketAttribute.raw_socket)
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


@pytest.mark.every_poller
async def test_accepted_port_echoes_bytes_both_ways(ios: ioserver.IOServer) -> None:
    listener, number = await listen(ios)
    async with listener, await anyio.connect_tcp("127.0.0.1", number) as client:
        port = await accept(listener)
        assert port.remote_address == client.extra(anyio.abc.SocketAttribute.local_address)
        await client.send(b"ping")
        assert await receive_exactly(port, 4) == b"ping"
        await port.send(b"pong")
        await port.send(bytearray(b"!"))
        await port.send(memoryview(b"?"))
        assert await read_exactly(client, 6) == b"pong!?"
        await port.aclose()


@pytest.mark.every_poller
async def test_large_writes_arrive_whole_and_in_order(ios: ioserver.IOServer) -> None:
    listener, number = await listen(ios)
    payload = bytes(range(256)) * 40_000  # 10 MB: far beyond the socket buffers
    async with listener, await anyio.connect_tcp("127.0.0.1", number) as client:
        port = await accept(listener)
        received: list[bytes] = []

        async def reader() -> None:
            received.append(await read_exactly(client, len(payload)))

        async with anyio.create_task_group() as task_group:
            task_group.start_soon(reader)
            for offset in range(0, len(payload), 100_000):
                await port.send(payload[offset : offset + 100_000])  # waits while busy
        assert received == [payload]
        assert port.statistics().busy_transitions > 0  # the peer was slower than us
        await client.send(payload[:300_000])
        assert await receive_exactly(port, 300_000) == payload[:300_000]
        await port.aclose()


@pytest.mark.every_poller
async def test_connect_tcp_reaches_a_plain_server_and_sees_eof(ios: ioserver.IOServer) -> None:
    async with await anyio.create_tcp_listener(local_host="127.0.0.1") as server:
        number = server.extra(anyio.abc.SocketAttribute.local_port)

        async def serve_once(stream: anyio.abc.SocketStream) -> None:
            async with stream:
                await stream.send(b"hello")
                assert await stream.receive() == b"bye"

        async with anyio.create_task_group() as task_group:
            task_group.start_soon(server.serve, serve_once)
            port = await ports.connect_tcp(ios, "127.0.0.1", number)
            async with port:
                assert port.remote_address == ("127.0.0.1", number)
                assert await receive_exactly(port, 5) == b"hello"
                await port.send(b"bye")
                assert await port.receive() == Closed("eof")
                with pytest.raises(ports.EndOfPort):
                    await port.receive()
                # The peer half-closed: our side may still send until we close.
                await port.send(b"after eof")
            task_group.cancel_scope.cancel()


async def test_async_for_ends_after_the_closed_message(ios: ioserver.IOServer) -> None:
    listener, number = await listen(ios)
    async with listener:
        client = await anyio.connect_tcp("127.0.0.1", number)
        port = await accept(listener)
        await client.send(b"abc")
        await client.aclose()
        received = [message async for message in port]
        assert b"".join(m.data for m in received if isinstance(m, Data)) == b"abc"
        assert received[-1] == Closed("eof")
        assert sum(isinstance(m, Closed) for m in received) == 1
        await port.aclose()


@pytest.mark.every_poller
async def test_peer_reset_mid_stream_is_one_closed_message(ios: ioserver.IOServer) -> None:
    listener, number = await listen(ios)
    async with listener:
        client = await anyio.connect_tcp("127.0.0.1", number)
        port = await accept(listener)
        await client.send(b"partial")
        assert await receive_exactly(port, 7) == b"partial"
        reset(client)
        await client.aclose()
        message = await port.receive()
        assert message == Closed("ECONNRESET", "ECONNRESET")
        with pytest.raises(ports.BrokenPortError) as caught:
            await port.send(b"too late")
        assert caught.value.errno_name == "ECONNRESET"
        assert isinstance(caught.value, anyio.BrokenResourceError)
        assert isinstance(caught.value, trio.BrokenResourceError)
        with pytest.raises(ports.EndOfPort):
            await port.receive()
        await port.aclose()


@pytest.mark.every_poller
async def test_peer_half_close_still_gets_our_reply(ios: ioserver.IOServer) -> None:
    listener, number = await listen(ios)
    async with listener, await anyio.connect_tcp("127.0.0.1", number) as client:
        port = await accept(listener)
        await client.send(b"question")
        await client.send_eof()
        assert await receive_exactly(port, 8) == b"question"
        assert await port.receive() == Closed("eof")
        await port.send(b"answer")
        await port.aclose()
        assert await read_exactly(client, 6) == b"answer"
        with pytest.raises(anyio.EndOfStream):
            await client.receive()


async def test_send_eof_half_closes_and_keeps_receiving(ios: ioserver.IOServer) -> None:
    listener, number = await listen(ios)
    async with listener, await anyio.connect_tcp("127.0.0.1", number) as client:
        port = await accept(listener)
        await port.send(b"last words")
        await port.send_eof()
        assert await read_exactly(client, 10) == b"last words"
        with pytest.raises(anyio.EndOfStream):
            await client.receive()
        with pytest.raises(ports.ClosedPortError):
            await port.send(b"more")
        await client.send(b"reply")
        assert await receive_exactly(port, 5) == b"reply"
        await client.aclose()
        assert await port.receive() == Closed("eof")
        await port.aclose()


async def test_peer_that_connects_and_vanishes(ios: ioserver.IOServer) -> None:
    listener, number = await listen(ios)
    async with listener:
        with socket.create_connection(("127.0.0.1", number)):
            pass
        port = await accept(listener)
        assert await port.receive() == Closed("eof")
        await port.aclose()


async def test_peer_that_sends_nothing_leaves_the_port_idle(ios: ioserver.IOServer) -> None:
    listener, number = await listen(ios)
    async with listener, await anyio.connect_tcp("127.0.0.1", number):
        port = await accept(listener)
        with pytest.raises(ports.WouldBlock):
            port.receive_nowait()
        with pytest.raises(TimeoutError):
            await ports.select(port, timeout=0.05)
        await port.aclose()


async def test_closing_the_port_closes_the_connection(ios: ioserver.IOServer) -> None:
    listener, number = await listen(ios)
    async with listener, await anyio.connect_tcp("127.0.0.1", number) as client:
        port = await accept(listener)
        await port.send(b"flushed before close")
        await port.aclose()
        await port.aclose()  # idempotent
        assert await read_exactly(client, 20) == b"flushed before close"
        with pytest.raises(anyio.EndOfStream):
            await client.receive()
        for operation in (port.receive(), port.send(b"x")):
            with pytest.raises(ports.ClosedPortError):
                await operation
        with pytest.raises(anyio.ClosedResourceError):
            port.send_nowait(b"x")
        with pytest.raises(trio.ClosedResourceError):
            port.receive_nowait()


async def test_closing_from_another_task_wakes_the_receiver(ios: ioserver.IOServer) -> None:
    listener, number = await listen(ios)
    async with listener, await anyio.connect_tcp("127.0.0.1", number):
        port = await accept(listener)
        outcome: list[BaseException] = []

        async def receiver() -> None:
            try:
                await port.receive()
            except ports.ClosedPortError as exc:
                outcome.append(exc)

        async with anyio.create_task_group() as task_group:
            task_group.start_soon(receiver)
            await anyio.wait_all_tasks_blocked()
            await port.aclose()
        assert len(outcome) == 1


async def test_two_receivers_on_one_port_is_an_error(ios: ioserver.IOServer) -> None:
    listener, number = await listen(ios)
    async with listener, await anyio.connect_tcp("127.0.0.1", number) as client:
        port = await accept(listener)
        async with anyio.create_task_group() as task_group:
            task_group.start_soon(port.receive)
            await anyio.wait_all_tasks_blocked()
            with pytest.raises(ports.BusyPortError):
                await port.receive()
            await client.send(b"x")
        await port.aclose()


async def test_receive_is_cancellable(ios: ioserver.IOServer) -> None:
    listener, number = await listen(ios)
    async with listener, await anyio.connect_tcp("127.0.0.1", number) as client:
        port = await accept(listener)
        with anyio.move_on_after(0.01):
            await port.receive()
        await client.send(b"still works")
        assert await receive_exactly(port, 11) == b"still works"
        await port.aclose()


async def test_connection_refused_is_a_clear_error(ios: ioserver.IOServer) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        number = probe.getsockname()[1]
    with pytest.raises(ports.ConnectError) as caught:
        await ports.connect_tcp(ios, "127.0.0.1", number)
    assert caught.value.errno_name == "ECONNREFUSED"
    assert f"127.0.0.1:{number}" in str(caught.value)
    assert "ECONNREFUSED" in str(caught.value)
    assert isinstance(caught.value, OSError)


async def test_unknown_host_is_a_clear_error(ios: ioserver.IOServer) -> None:
    with anyio.fail_after(20), pytest.raises(ports.ConnectError) as caught:
        await ports.connect_tcp(ios, "no-such-host.invalid", 80)
    assert "no-such-host.invalid" in str(caught.value)
    assert caught.value.errno_name is not None
    assert caught.value.errno_name.startswith("EAI_")


async def test_address_in_use_is_a_clear_error(ios: ioserver.IOServer) -> None:
    listener, number = await listen(ios)
    async with listener:
        with pytest.raises(ports.ConnectError) as caught:
            await ports.listen_tcp(ios, "127.0.0.1", number, reuseaddr=False)
        assert caught.value.errno_name == "EADDRINUSE"
        assert str(number) in str(caught.value)


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"active": "sometimes"}, "active"),
        ({"active": 40_000}, "active"),
        ({"recbuf": -1}, "recbuf"),
        ({"backlog": 0}, "backlog"),
        ({"nodelai": True}, "unknown option for a TCP listener's ports: nodelai"),
        # Counts past 64 bits: an OverflowError out of the native core before they were
        # refused here (the I/O thread counts in 64 bits).
        ({"high_watermark": 2**64, "low_watermark": 0}, "high_watermark"),
        ({"high_msgq_watermark": 2**64, "low_msgq_watermark": 0}, "high_msgq_watermark"),
        ({"high_msgq_messages": 2**64}, "high_msgq_messages"),
        ({"packet": 4, "packet_size": 2**64}, "packet_size"),
    ],
)
async def test_wrong_options_are_rejected_before_anything_opens(
    ios: ioserver.IOServer, options: dict[str, object], words: str
) -> None:
    with pytest.raises(ports.OptionError, match=words):
        await ports.listen_tcp(ios, "127.0.0.1", 0, **options)  # type: ignore[arg-type]
    assert ios.statistics().ports_open == 0


async def test_wrong_port_number_and_setopts_value(ios: ioserver.IOServer) -> None:
    with pytest.raises(ports.OptionError, match="65535"):
        await ports.connect_tcp(ios, "127.0.0.1", 70_000)
    listener, number = await listen(ios)
    async with listener, await anyio.connect_tcp("127.0.0.1", number):
        port = await accept(listener)
        with pytest.raises(ports.OptionError):
            port.setopts(active="twice")
        with pytest.raises(TypeError):
            await port.send("text is not bytes")  # type: ignore[arg-type]
        await port.aclose()


async def test_closing_the_server_closes_every_port(no_leaks: None) -> None:
    async with ioserver.open() as ios:
        listener, number = await listen(ios)
        client = await anyio.connect_tcp("127.0.0.1", number)
        port = await accept(listener)
    assert ios.closed
    with pytest.raises(anyio.EndOfStream):
        await client.receive()
    await client.aclose()
    with pytest.raises(ports.ClosedPortError):
        await ports.connect_tcp(ios, "127.0.0.1", number)
    del port


async def test_ipv6_loopback(ios: ioserver.IOServer) -> None:
    if not socket.has_ipv6:
        pytest.skip("this machine has no IPv6")
    try:
        listener = await ports.listen_tcp(ios, "::1", 0)
    except ports.ConnectError as exc:
        pytest.skip(f"no IPv6 loopback here: {exc}")
    async with listener:
        port = await ports.connect_tcp(ios, "::1", listener.local_address[1])
        accepted = await accept(listener)
        await port.send(b"v6")
        assert await receive_exactly(accepted, 2) == b"v6"
        await port.aclose()
        await accepted.aclose()


async def test_ports_are_anyio_object_streams_and_trio_channels(ios: ioserver.IOServer) -> None:
    listener, number = await listen(ios)
    async with listener, await anyio.connect_tcp("127.0.0.1", number):
        port = await accept(listener)
        assert isinstance(port, anyio.abc.ObjectStream)
        assert isinstance(port, trio.abc.Channel)
        assert isinstance(listener, anyio.abc.ObjectReceiveStream)
        assert port.extra(anyio.abc.SocketAttribute.remote_address) == port.remote_address
        await port.aclose()
