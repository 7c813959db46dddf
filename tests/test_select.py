"""select over ports, mailboxes and memory channels; selective receive; memory channels."""

from __future__ import annotations

import math

import anyio
import pytest
import trio

import ioserver
import ports
from ports import Accepted, Closed, Data

pytestmark = pytest.mark.anyio


async def connected(ios: ioserver.IOServer) -> tuple[ports.Listener, ports.Port, object]:
    listener = await ports.listen_tcp(ios, "127.0.0.1", 0)
    client = await anyio.connect_tcp("127.0.0.1", listener.local_address[1])
    accepted = await listener.receive()
    assert isinstance(accepted, Accepted)
    return listener, accepted.port, client


async def test_select_takes_exactly_one_message_and_leaves_the_rest(
    ios: ioserver.IOServer,
) -> None:
    send, receive = ports.open_memory_channel(10)
    mailbox = ports.Mailbox()
    send.send_nowait("from the channel")
    mailbox.send_nowait("from the mailbox")
    seen = set()
    for _ in range(2):
        source, message = await ports.select(receive, mailbox)
        seen.add((source is receive, message))
    assert seen == {(True, "from the channel"), (False, "from the mailbox")}
    assert receive.statistics().current_buffer_used == 0
    assert len(mailbox) == 0
    await send.aclose()
    await receive.aclose()


async def test_select_waits_on_a_port_and_a_channel_together(ios: ioserver.IOServer) -> None:
    listener, port, client = await connected(ios)
    send, receive = ports.open_memory_channel(10)
    async with listener, port, client, send, receive:  # type: ignore[attr-defined]
        async with anyio.create_task_group() as task_group:

            async def later() -> None:
                await anyio.wait_all_tasks_blocked()
                await client.send(b"from the network")  # type: ignore[attr-defined]

            task_group.start_soon(later)
            source, message = await ports.select(port, receive)
            assert source is port
            assert message == Data(b"from the network")

            async def later_channel() -> None:
                await anyio.wait_all_tasks_blocked()
                await send.send("from the room")

            task_group.start_soon(later_channel)
            source, message = await ports.select(port, receive)
            assert source is receive
            assert message == "from the room"
        # Nothing was consumed from the other source, and no waiter was left armed.
        assert receive.statistics().tasks_waiting_receive == 0
        assert port.statistics().messages_buffered == 0


async def test_select_is_fair_between_busy_sources(ios: ioserver.IOServer) -> None:
    first, first_receive = ports.open_memory_channel(math.inf)
    second, second_receive = ports.open_memory_channel(math.inf)
    for index in range(100):
        first.send_nowait(index)
        second.send_nowait(index)
    counts = {id(first_receive): 0, id(second_receive): 0}
    for _ in range(100):
        source, _message = await ports.select(first_receive, second_receive)
        counts[id(source)] += 1
    assert counts[id(first_receive)] == 50
    assert counts[id(second_receive)] == 50


async def test_select_timeout_raises_timeout_error(ios: ioserver.IOServer) -> None:
    mailbox = ports.Mailbox()
    with pytest.raises(TimeoutError):
        await ports.select(mailbox, timeout=0.01)
    mailbox.send_nowait("kept")
    assert await mailbox.receive() == "kept"


async def test_select_on_an_ended_source_raises_end_of_port(ios: ioserver.IOServer) -> None:
    listener, port, client = await connected(ios)
    async with listener, port:
        await client.aclose()  # type: ignore[attr-defined]
        assert await port.receive() == Closed("eof")
        with pytest.raises(ports.EndOfPort):
            await ports.select(port, ports.Mailbox())


async def test_select_rejects_non_sources(ios: ioserver.IOServer) -> None:
    with pytest.raises(TypeError):
        await ports.select()
    with pytest.raises(TypeError, match="str"):
        await ports.select("not a source")  # type: ignore[arg-type]


async def test_select_cancelled_leaves_no_waiter_behind(ios: ioserver.IOServer) -> None:
    send, receive = ports.open_memory_channel(1)
    with anyio.move_on_after(0.01):
        await ports.select(receive)
    assert receive.statistics().tasks_waiting_receive == 0
    send.send_nowait("after")
    assert await receive.receive() == "after"


async def test_mailbox_selective_receive_keeps_the_others_in_order() -> None:
    mailbox = ports.Mailbox()
    for message in ("a", 1, "b", 2, "c"):
        mailbox.send_nowait(message)
    assert await mailbox.receive(match=lambda m: isinstance(m, int)) == 1
    assert await mailbox.receive(match=lambda m: isinstance(m, int)) == 2
    assert [mailbox.receive_nowait() for _ in range(3)] == ["a", "b", "c"]
    with pytest.raises(ports.WouldBlock):
        mailbox.receive_nowait()


async def test_mailbox_receive_waits_for_a_matching_message() -> None:
    mailbox = ports.Mailbox()
    async with anyio.create_task_group() as task_group:

        async def sender() -> None:
            await anyio.wait_all_tasks_blocked()
            mailbox.send_nowait(("noise", 1))
            await anyio.wait_all_tasks_blocked()
            mailbox.send_nowait(("reply", 42))

        task_group.start_soon(sender)
        assert await mailbox.receive(match=lambda m: m[0] == "reply", timeout=10) == (
            "reply",
            42,
        )
    assert mailbox.receive_nowait() == ("noise", 1)


async def test_mailbox_timeout_and_close() -> None:
    mailbox = ports.Mailbox()
    with pytest.raises(TimeoutError):
        await mailbox.receive(timeout=0.01)
    async with anyio.create_task_group() as task_group:

        async def closer() -> None:
            await anyio.wait_all_tasks_blocked()
            mailbox.close()

        task_group.start_soon(closer)
        with pytest.raises(ports.ClosedPortError):
            await mailbox.receive()
    with pytest.raises(ports.ClosedPortError):
        mailbox.send_nowait("late")


async def test_memory_channel_backpressure_and_end() -> None:
    send, receive = ports.open_memory_channel(1)
    send.send_nowait(1)
    with pytest.raises(ports.WouldBlock):
        send.send_nowait(2)
    async with anyio.create_task_group() as task_group:
        task_group.start_soon(send.send, 2)  # waits for room
        await anyio.wait_all_tasks_blocked()
        assert send.statistics().tasks_waiting_send == 1
        assert await receive.receive() == 1
    assert await receive.receive() == 2
    await send.aclose()
    with pytest.raises(ports.EndOfPort):
        await receive.receive()
    with pytest.raises(anyio.EndOfStream):
        receive.receive_nowait()
    with pytest.raises(trio.EndOfChannel):
        receive.receive_nowait()
    await receive.aclose()


async def test_memory_channel_iterates_and_breaks_senders_when_receiver_closes() -> None:
    send, receive = ports.open_memory_channel(math.inf)
    for index in range(3):
        await send.send(index)
    send.close()
    assert [item async for item in receive] == [0, 1, 2]
    send2, receive2 = ports.open_memory_channel(0)
    receive2.close()
    with pytest.raises(ports.BrokenPortError):
        await send2.send("nobody listens")
    with pytest.raises(ValueError):
        ports.open_memory_channel(-1)


def test_exceptions_share_one_root_and_match_anyio_and_trio() -> None:
    pairs = {
        ports.ClosedPortError: (anyio.ClosedResourceError, trio.ClosedResourceError),
        ports.BrokenPortError: (anyio.BrokenResourceError, trio.BrokenResourceError),
        ports.EndOfPort: (anyio.EndOfStream, trio.EndOfChannel),
        ports.WouldBlock: (anyio.WouldBlock, trio.WouldBlock),
        ports.BusyPortError: (anyio.BusyResourceError, trio.BusyResourceError),
        ports.ConnectError: (OSError,),
        ports.OptionError: (ValueError,),
    }
    for ours, theirs in pairs.items():
        assert issubclass(ours, ioserver.IOServerError)
        for other in theirs:
            assert issubclass(ours, other), (ours, other)
