"""Active modes (Erlang's inet:setopts active true/false/once/N) and owner transfer."""

from __future__ import annotations

import anyio
import anyio.abc
import pytest

import ioserver
import ports
from ports import Accepted, Closed, Data, Passive

pytestmark = pytest.mark.anyio


async def pair(
    ios: ioserver.IOServer, **options: object
) -> tuple[ports.Listener, ports.Port, anyio.abc.SocketStream]:
    listener = await ports.listen_tcp(ios, "127.0.0.1", 0, **options)  # type: ignore[arg-type]
    client = await anyio.connect_tcp("127.0.0.1", listener.local_address[1])
    accepted = await listener.receive()
    assert isinstance(accepted, Accepted)
    return listener, accepted.port, client


async def io_round_trip(ios: ioserver.IOServer) -> None:
    """Wait until the I/O thread has been through at least one full round of its selector
    after this point, by echoing a byte over a second connection.  Bytes written to a
    loopback socket before this call are in the receiver's buffer by then, so a port that
    reads would have read them."""
    listener = await ports.listen_tcp(ios, "127.0.0.1", 0)
    async with listener, await anyio.connect_tcp("127.0.0.1", listener.local_address[1]) as probe:
        accepted = await listener.receive()
        assert isinstance(accepted, Accepted)
        await probe.send(b"?")
        assert await accepted.port.receive() == Data(b"?")
        await accepted.port.aclose()


async def test_active_false_reads_only_when_asked(ios: ioserver.IOServer) -> None:
    listener, port, client = await pair(ios, active=False)
    async with listener, client, port:
        assert port.active is False
        await client.send(b"one")
        await io_round_trip(ios)
        with pytest.raises(ports.WouldBlock):
            port.receive_nowait()
        assert port.statistics().bytes_received == 0
        assert await port.receive() == Data(b"one")  # one read, on demand
        await client.send(b"two")
        assert await port.receive() == Data(b"two")


async def test_active_once_delivers_one_message_then_waits(ios: ioserver.IOServer) -> None:
    listener, port, client = await pair(ios, active="once")
    async with listener, client, port:
        await client.send(b"first")
        assert await port.receive() == Data(b"first")
        assert port.active is False
        await client.send(b"second")
        await io_round_trip(ios)
        with pytest.raises(ports.WouldBlock):
            port.receive_nowait()
        assert port.statistics().bytes_received == 5
        port.setopts(active="once")
        assert await port.receive() == Data(b"second")


async def test_active_n_sends_passive_when_the_count_runs_out(ios: ioserver.IOServer) -> None:
    listener, port, client = await pair(ios, active=2)
    async with listener, client, port:
        for word in (b"a", b"b"):
            await client.send(word)
            assert await port.receive() == Data(word)
        assert await port.receive() == Passive()
        assert port.active is False
        await client.send(b"c")
        await io_round_trip(ios)
        with pytest.raises(ports.WouldBlock):
            port.receive_nowait()
        port.setopts(active=1)
        assert await port.receive() == Data(b"c")
        assert await port.receive() == Passive()


async def test_active_n_adds_to_a_running_count(ios: ioserver.IOServer) -> None:
    listener, port, client = await pair(ios, active=1)
    async with listener, client, port:
        port.setopts(active=2)  # 1 + 2 = 3, as inet:setopts adds counts
        assert port.active == 3
        for word in (b"x", b"y", b"z"):
            await client.send(word)
            assert await port.receive() == Data(word)
        assert await port.receive() == Passive()


async def test_active_zero_or_negative_count_makes_the_port_passive(
    ios: ioserver.IOServer,
) -> None:
    listener, port, client = await pair(ios)
    async with listener, client, port:
        port.setopts(active=0)
        assert await port.receive() == Passive()
        assert port.active is False


async def test_switching_back_to_active_true_delivers_everything(
    ios: ioserver.IOServer,
) -> None:
    listener, port, client = await pair(ios, active=False)
    async with listener, client, port:
        await client.send(b"held back")
        port.setopts(active=True)
        data = b""
        while len(data) < 9:
            message = await port.receive()
            assert isinstance(message, Data)
            data += message.data
        assert data == b"held back"


async def test_closed_is_delivered_even_to_a_passive_port(ios: ioserver.IOServer) -> None:
    listener, port, client = await pair(ios, active=False)
    async with listener, port:
        await client.aclose()
        assert await port.receive() == Closed("eof")


async def test_set_owner_moves_buffered_messages_first_then_later_ones(
    ios: ioserver.IOServer,
) -> None:
    listener, port, client = await pair(ios)
    async with listener, client, port:
        await client.send(b"before")
        await io_round_trip(ios)
        mailbox = ports.Mailbox()
        mailbox.send_nowait("earlier mail")
        port.set_owner(mailbox)
        assert port.owner is mailbox
        await client.send(b"after")
        await client.aclose()
        received = [await mailbox.receive() for _ in range(2)]
        assert received[0] == "earlier mail"
        assert received[1] == (port, Data(b"before"))
        data = b""
        while True:
            source, message = await mailbox.receive()
            assert source is port
            if isinstance(message, Closed):
                break
            data += message.data
        assert data == b"after"
        assert len(mailbox) == 0
        with pytest.raises(ports.ClosedPortError, match="mailbox"):
            await port.receive()


async def test_owner_transfer_under_a_flood_loses_and_duplicates_nothing(
    ios: ioserver.IOServer,
) -> None:
    listener, port, client = await pair(ios)
    payload = bytes(range(256)) * 4096  # 1 MiB
    mailbox = ports.Mailbox()
    async with listener, port, anyio.create_task_group() as task_group:

        async def flood() -> None:
            async with client:
                for offset in range(0, len(payload), 4096):
                    await client.send(payload[offset : offset + 4096])

        task_group.start_soon(flood)
        # The first owner takes some messages itself, then hands the port over mid-flood.
        first = await port.receive()
        assert isinstance(first, Data)
        port.set_owner(mailbox)
        data = first.data
        while True:
            source, message = await mailbox.receive()
            assert source is port
            if isinstance(message, Closed):
                break
            data += message.data
        assert data == payload
