"""select and receive under cancellation: an operation that raises Cancelled did not happen.

Trio's rule, which the docs promise for every receive here: a receive (or a select) that
raises ``Cancelled`` took nothing, and a send that raises ``Cancelled`` sent nothing.  Each
test counts messages: what the cancelled operations returned plus what is still queued must
be exactly what was sent, whatever the backend and however the cancellation lands.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import anyio
import pytest

import ioserver
import ports
from ports import Accepted, Data

pytestmark = pytest.mark.anyio

ROUNDS = 200


async def _in_cancelled_scope(operation: Callable[[], Awaitable[Any]]) -> list[Any]:
    """Run ``operation`` in a scope cancelled before it starts; what it returned, if any."""
    with anyio.CancelScope() as scope:
        scope.cancel()
        return [await operation()]
    return []


async def test_select_in_a_cancelled_scope_keeps_the_message() -> None:
    mailbox = ports.Mailbox()
    mailbox.send_nowait("only")
    for _ in range(ROUNDS):
        got = await _in_cancelled_scope(lambda: ports.select(mailbox))
        # Returned (the operation happened) or still queued (it did not): never neither.
        assert [message for _source, message in got] + list(mailbox._messages) == ["only"]
        for _source, message in got:
            mailbox.send_nowait(message)


async def test_mailbox_receive_in_a_cancelled_scope_keeps_the_message() -> None:
    mailbox = ports.Mailbox()
    mailbox.send_nowait("only")
    for _ in range(ROUNDS):
        got = await _in_cancelled_scope(mailbox.receive)
        got += await _in_cancelled_scope(lambda: mailbox.receive(match=lambda m: True))
        assert got + list(mailbox._messages) == ["only"]
        for message in got:
            mailbox.send_nowait(message)


async def test_channel_receive_in_a_cancelled_scope_keeps_the_item() -> None:
    send, receive = ports.open_memory_channel(1)
    for _ in range(ROUNDS):
        send.send_nowait("only")
        got = await _in_cancelled_scope(receive.receive)
        got += [m for _s, m in await _in_cancelled_scope(lambda: ports.select(receive))]
        left = [receive.receive_nowait()] if receive.statistics().current_buffer_used else []
        assert got + left == ["only"]


async def test_sends_that_raise_cancelled_sent_nothing() -> None:
    mailbox = ports.Mailbox()
    send, receive = ports.open_memory_channel(ROUNDS * 2)
    for index in range(ROUNDS):
        raised_mailbox = not await _in_cancelled_scope(partial(mailbox.send, index))
        raised_channel = not await _in_cancelled_scope(partial(send.send, index))
        assert len(mailbox) == (0 if raised_mailbox else 1)
        assert receive.statistics().current_buffer_used == (0 if raised_channel else 1)
        if len(mailbox):
            mailbox.receive_nowait()
        if not raised_channel:
            receive.receive_nowait()


async def test_a_due_deadline_selected_in_a_cancelled_scope_still_delivers() -> None:
    deadline = ports.Deadline.at(anyio.current_time())  # already due
    for _ in range(ROUNDS):
        if await _in_cancelled_scope(lambda: ports.select(deadline)):
            return  # delivered its Timeout: the operation happened
    # Never returned: the Timeout must still be there for the next select.
    source, message = await ports.select(deadline)
    assert source is deadline and isinstance(message, ports.Timeout)


async def test_port_receive_in_a_cancelled_scope_keeps_the_message(
    ios: ioserver.IOServer,
) -> None:
    listener = await ports.listen_tcp(ios, "127.0.0.1", 0)
    async with await anyio.connect_tcp("127.0.0.1", listener.local_address[1]) as client:
        accepted = await listener.receive()
        assert isinstance(accepted, Accepted)
        port = accepted.port
        await client.send(b"only")
        with anyio.fail_after(5):
            # The I/O thread delivers it to the port's buffer; nothing here takes it.
            while not port.statistics().messages_buffered:  # noqa: ASYNC110
                await anyio.sleep(0.001)
        received: list[Any] = []
        for _ in range(ROUNDS):
            received += await _in_cancelled_scope(port.receive)
            received += [m for _s, m in await _in_cancelled_scope(lambda: ports.select(port))]
            assert len(received) + port.statistics().messages_buffered == 1
            if received:
                break
        if not received:
            received.append(await port.receive())
        assert received == [Data(b"only")]
        await port.aclose()
    await listener.aclose()


async def _woken_and_cancelled_in_one_tick(
    wait: Callable[[], Awaitable[Any]], send: Callable[[], None]
) -> list[Any]:
    """Park a task in ``wait``; then, with no checkpoint between, ``send`` and cancel it."""
    got: list[Any] = []
    parked = anyio.Event()

    async def waiter(scope: anyio.CancelScope) -> None:
        with scope:
            parked.set()
            got.append(await wait())

    scope = anyio.CancelScope()
    async with anyio.create_task_group() as group:
        group.start_soon(waiter, scope)
        await parked.wait()
        # The waiter set the event just before it parked, and it cannot run again until
        # this task checkpoints: yield until it is parked for sure (it is then waiting in
        # the hub's park, the only place it can wait).
        for _ in range(10):
            await anyio.lowlevel.checkpoint()
        send()  # wakes the parked waiter...
        scope.cancel()  # ...and cancels it, in the same tick
    return got


async def test_parked_select_woken_and_cancelled_in_one_tick_loses_nothing() -> None:
    for _ in range(ROUNDS):
        mailbox = ports.Mailbox()
        _send, receive = ports.open_memory_channel(1)
        got = await _woken_and_cancelled_in_one_tick(
            partial(ports.select, mailbox, receive), partial(mailbox.send_nowait, "sent")
        )
        assert [message for _source, message in got] + list(mailbox._messages) == ["sent"]


async def test_parked_receives_woken_and_cancelled_in_one_tick_lose_nothing() -> None:
    for _ in range(ROUNDS):
        mailbox = ports.Mailbox()
        got = await _woken_and_cancelled_in_one_tick(
            mailbox.receive, partial(mailbox.send_nowait, "sent")
        )
        assert got + list(mailbox._messages) == ["sent"]
        send, receive = ports.open_memory_channel(1)
        got = await _woken_and_cancelled_in_one_tick(
            receive.receive, partial(send.send_nowait, "sent")
        )
        left = [receive.receive_nowait()] if receive.statistics().current_buffer_used else []
        assert got + left == ["sent"]


async def test_port_sends_that_raise_cancelled_queued_nothing(ios: ioserver.IOServer) -> None:
    listener = await ports.listen_tcp(ios, "127.0.0.1", 0)
    async with await anyio.connect_tcp("127.0.0.1", listener.local_address[1]) as client:
        accepted = await listener.receive()
        assert isinstance(accepted, Accepted)
        port = accepted.port
        sent = 0
        for _ in range(ROUNDS):
            sent += len(await _in_cancelled_scope(lambda: port.send(b"x")))
        await port.aclose()
        received = b""
        with anyio.fail_after(5):
            async for chunk in client:
                received += chunk
        assert received == b"x" * sent
    await listener.aclose()
