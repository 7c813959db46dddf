"""UDP ports against real sockets on loopback (IPv4 and IPv6), on asyncio and trio."""

from __future__ import annotations

import socket
from typing import Any

import anyio
import pytest
from conftest import until

import ioserver
import ports
from ioserver._udp import ERROR_CHARGE
from ports import Datagram, Error, Passive

pytestmark = pytest.mark.anyio


def has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


async def receive_datagram(port: ports.UDPPort) -> Datagram:
    with anyio.fail_after(5):
        message = await port.receive()
    assert isinstance(message, Datagram), message
    return message


async def test_a_port_receives_each_datagram_with_its_address_and_answers_it(
    ios: ioserver.IOServer,
) -> None:
    async with (
        await ports.open_udp(ios, ("127.0.0.1", 0)) as server,
        await anyio.create_udp_socket(local_host="127.0.0.1") as client,
    ):
        client_address = client.extra(anyio.abc.SocketAttribute.local_address)
        await client.sendto(b"ping", *server.local_address)
        received = await receive_datagram(server)
        assert received == Datagram(b"ping", client_address)
        await server.send(received)  # a received Datagram goes back where it came from
        await server.send((b"two", client_address))
        await server.send_to(b"three", client_address)
        with anyio.fail_after(5):
            assert await client.receive() == (b"ping", server.local_address)
            assert (await client.receive())[0] == b"two"
            assert (await client.receive())[0] == b"three"
        assert server.statistics().bytes_received == 4
        # The I/O thread counts a datagram after sendto returns, so the peer may read the
        # last one first: the counter has no event of its own to wait on.
        with anyio.fail_after(5):
            while server.statistics().bytes_sent < 12:  # noqa: ASYNC110
                await anyio.sleep(0.001)
        assert server.statistics().bytes_sent == 12


async def test_a_connected_port_sends_bytes_and_keeps_datagram_boundaries(
    ios: ioserver.IOServer,
) -> None:
    async with (
        await ports.open_udp(ios) as server,
        await ports.open_udp(ios, connect=server.local_address) as client,
    ):
        assert client.remote_address == server.local_address
        for payload in (b"a", b"", b"b" * 1000):
            await client.send(payload)
        for payload in (b"a", b"", b"b" * 1000):
            message = await receive_datagram(server)
            assert message.data == payload
            assert message.address == client.local_address


async def test_ipv6(ios: ioserver.IOServer) -> None:
    if not has_ipv6_loopback():
        pytest.skip("no IPv6 loopback (::1) on this machine")
    async with (
        await ports.open_udp(ios, ("::1", 0)) as server,
        await ports.open_udp(ios, ("::1", 0)) as client,
    ):
        assert server.local_address[0] == "::1"
        await client.send_to(b"over v6", server.local_address[:2])
        message = await receive_datagram(server)
        assert message.data == b"over v6"
        assert message.address[:2] == client.local_address[:2]
        with pytest.raises(ValueError, match="numeric IPv6"):
            await client.send_to(b"x", ("127.0.0.1", 9))


async def test_icmp_port_unreachable_is_an_error_message_and_the_port_lives_on(
    ios: ioserver.IOServer,
) -> None:
    # A port nobody listens on: bind one, note it, close it.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        dead = probe.getsockname()
    async with await ports.open_udp(ios, connect=dead) as client:
        await client.send(b"anyone?")
        with anyio.fail_after(5):
            message = await client.receive()
        assert isinstance(message, Error), message
        assert message.errno_name == "ECONNREFUSED"
        assert not client.closed
        # Still usable: a live peer at that address now gets what we send.
        async with await ports.open_udp(ios, dead) as revived:
            await client.send(b"hello again")
            assert (await receive_datagram(revived)).data == b"hello again"


async def test_an_oversized_datagram_is_an_error_and_the_next_one_arrives(
    ios: ioserver.IOServer,
) -> None:
    async with (
        await ports.open_udp(ios, max_datagram=100) as server,
        await ports.open_udp(ios) as client,
    ):
        await client.send_to(b"x" * 1000, server.local_address)
        await client.send_to(b"small", server.local_address)
        with anyio.fail_after(5):
            message = await server.receive()
        assert isinstance(message, Error), message
        assert message.errno_name == "EMSGSIZE"
        assert "1000 bytes" in message.message and "max_datagram=100" in message.message
        assert (await receive_datagram(server)).data == b"small"
        assert server.statistics().packets_too_large == 1


async def test_passive_and_counted_active_modes_count_datagrams(ios: ioserver.IOServer) -> None:
    async with (
        await ports.open_udp(ios, active=False) as server,
        await ports.open_udp(ios) as client,
    ):
        for index in range(5):
            await client.send_to(b"%d" % index, server.local_address)
        # Passive: each receive lets exactly one datagram through, in order.
        assert (await receive_datagram(server)).data == b"0"
        assert (await receive_datagram(server)).data == b"1"
        assert server.statistics().messages_buffered == 0
        server.setopts(active=2)
        assert (await receive_datagram(server)).data == b"2"
        assert (await receive_datagram(server)).data == b"3"
        with anyio.fail_after(5):
            assert isinstance(await server.receive(), Passive)
        assert server.active is False
        assert (await receive_datagram(server)).data == b"4"


async def test_an_owner_that_does_not_read_pauses_the_port_and_resumes_when_drained(
    ios: ioserver.IOServer,
) -> None:
    async with (
        await ports.open_udp(ios, high_msgq_messages=8, read_packets=4, recbuf=1 << 20) as server,
        await ports.open_udp(ios, connect=server.local_address) as client,
    ):
        for index in range(40):
            await client.send(b"%02d" % index)
        # Wait until the I/O thread has paused: it delivers at most the watermark plus
        # one batch, and the rest waits in the kernel's buffer.
        await until(lambda: server.statistics().pauses > 0, 5)  # the I/O thread's state
        assert server.statistics().messages_buffered <= 8 + 4
        received = [(await receive_datagram(server)).data for _ in range(40)]
        assert received == [b"%02d" % index for index in range(40)]
        assert server.statistics().bytes_buffered_in == 0


async def test_a_burst_arrives_whole_and_in_order_through_a_small_send_window(
    ios: ioserver.IOServer,
) -> None:
    async with (
        await ports.open_udp(ios, recbuf=1 << 21) as server,
        await ports.open_udp(
            ios, connect=server.local_address, high_watermark=1, low_watermark=0
        ) as client,
    ):
        count = 300
        async with anyio.create_task_group() as task_group:

            async def sender() -> None:
                for index in range(count):
                    await client.send(b"%04d" % index + b"." * 200)

            task_group.start_soon(sender)
            received = [(await receive_datagram(server)).data[:4] for _ in range(count)]
        assert received == [b"%04d" % index for index in range(count)]
        assert client.statistics().bytes_buffered_out == 0


async def test_datagrams_can_go_to_an_owner_mailbox(ios: ioserver.IOServer) -> None:
    async with (
        await ports.open_udp(ios) as server,
        await ports.open_udp(ios, connect=server.local_address) as client,
    ):
        mailbox = ports.Mailbox()
        server.set_owner(mailbox)
        await client.send(b"to the mailbox")
        with anyio.fail_after(5):
            source, message = await mailbox.receive()
        assert source is server
        assert isinstance(message, Datagram) and message.data == b"to the mailbox"
        assert server.statistics().bytes_buffered_in == 0
        mailbox.close()


@pytest.mark.parametrize(
    ("message", "error", "match"),
    [
        (b"no address", ValueError, "not connected"),
        ((b"x", ("localhost", 9)), ValueError, "not a numeric IPv4"),
        ((b"x", ("127.0.0.1", 0)), ValueError, "1..65535"),
        ((b"x", "127.0.0.1:9"), ValueError, "tuple"),
        ((b"x" * 65508, ("127.0.0.1", 9)), ValueError, "65507"),
        (("text", ("127.0.0.1", 9)), TypeError, "bytes-like"),
        ((b"x", ("127.0.0.1", 9), 1), TypeError, "3 items"),
    ],
)
async def test_bad_sends_raise_at_once(
    ios: ioserver.IOServer, message: Any, error: type[Exception], match: str
) -> None:
    async with await ports.open_udp(ios) as port:
        with pytest.raises(error, match=match):
            await port.send(message)
        with pytest.raises(error, match=match):
            port.send_nowait(message)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"read_packets": 0}, "read_packets"),
        ({"max_datagram": 1 << 25}, "max_datagram"),
        ({"broadcast": 1}, "broadcast"),
        ({"packet": 4}, "unknown option"),
        ({"active": "twice"}, "active"),
        ({"low_watermark": 10, "high_watermark": 5}, "low_watermark"),
    ],
)
async def test_wrong_options(ios: ioserver.IOServer, options: dict[str, Any], match: str) -> None:
    with pytest.raises(ports.OptionError, match=match):
        await ports.open_udp(ios, **options)


async def test_binding_an_address_in_use_is_a_connect_error(ios: ioserver.IOServer) -> None:
    async with await ports.open_udp(ios) as first:
        with pytest.raises(ports.ConnectError, match="EADDRINUSE") as caught:
            await ports.open_udp(ios, first.local_address)
        assert caught.value.errno_name == "EADDRINUSE"


async def test_closing_wakes_a_receiver_and_later_sends_fail(ios: ioserver.IOServer) -> None:
    port = await ports.open_udp(ios)
    async with anyio.create_task_group() as task_group:

        async def receiver() -> None:
            with pytest.raises(ports.ClosedPortError):
                await port.receive()

        task_group.start_soon(receiver)
        await anyio.wait_all_tasks_blocked()
        await port.aclose()
    with pytest.raises(ports.ClosedPortError):
        await port.send_to(b"x", ("127.0.0.1", 9))


@pytest.mark.python_core
async def test_the_server_stopping_ends_the_port_with_closed(no_leaks: None) -> None:
    async with ioserver.open(poller="selectors") as ios:
        port = await ports.open_udp(ios)
        peer = await ports.open_udp(ios, connect=port.local_address)
        await peer.send(b"via selectors")
        assert (await receive_datagram(port)).data == b"via selectors"
    messages = [message async for message in port]
    assert messages == [ports.Closed("ioserver closed", "ESHUTDOWN")]
    with pytest.raises(ports.BrokenPortError):
        await port.send_to(b"x", ("127.0.0.1", 9))


async def test_the_budget_lets_a_waiting_owner_read_while_another_port_fills_it(
    no_leaks: None,
) -> None:
    """A port nobody reads fills the memory budget; a datagram for another port whose
    owner waits must still be delivered (the budget's reserve), and no read may take the
    input charged past the limit (issue 12, item 15).  The peer is a plain socket, so that
    only input is charged."""
    limit = 256 * 1024  # the smallest: ordinary reads stop at 192 KiB, the reserve is 64
    async with ioserver.open(memory_limit=limit) as ios:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            async with (
                await ports.open_udp(
                    ios, max_datagram=2048, recbuf=1 << 20, high_msgq_watermark=1 << 20
                ) as hog,
                await ports.open_udp(ios, max_datagram=2048) as waiting,
            ):
                for index in range(300):  # 300 KiB for a port nobody reads
                    client.sendto(b"%04d" % index + b"h" * 1020, hog.local_address)
                with anyio.fail_after(5):
                    while hog.statistics().pauses == 0:  # paused by the I/O thread
                        client.sendto(b"h" * 1024, hog.local_address)
                        await anyio.lowlevel.checkpoint()
                for word in (b"one", b"two", b"three"):
                    client.sendto(word, waiting.local_address)
                    assert (await receive_datagram(waiting)).data == word
                assert ios.statistics().peak_memory <= limit


@pytest.mark.every_core
async def test_a_flood_of_oversized_datagrams_pauses_an_unread_port_and_is_charged(
    no_leaks: None, core: str
) -> None:
    """Each datagram too large for ``max_datagram`` is an ``Error`` message: a peer that
    floods a port whose owner does not read must pause it at its watermark, as datagrams
    do, and what the errors were charged must come back to 0 (issue 14).  Before, an
    ``Error`` counted in neither half's window: the handler read on and buffered one
    per datagram, without bound."""
    limit = 1 << 20
    count = 120
    async with ioserver.open(core=core, memory_limit=limit) as ios:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            async with await ports.open_udp(
                ios, max_datagram=64, high_msgq_messages=16, read_packets=4, recbuf=1 << 20
            ) as port:
                for _ in range(count):
                    client.sendto(b"x" * 100, port.local_address)
                statistics = port.statistics
                # The I/O thread's state: paused, or (the bug) every datagram read.
                await until(
                    lambda: statistics().pauses > 0 or statistics().packets_too_large == count
                )
                assert statistics().pauses > 0
                assert statistics().messages_buffered <= 16 + 4
                assert ios.statistics().memory_in_use <= limit
                # Draining lets the rest through: nothing the kernel kept is lost.
                for _ in range(count):
                    with anyio.fail_after(5):
                        message = await port.receive()
                    assert isinstance(message, Error) and message.errno_name == "EMSGSIZE"
                client.sendto(b"fits", port.local_address)
                assert (await receive_datagram(port)).data == b"fits"
                assert statistics().packets_too_large == count
                assert statistics().bytes_buffered_in == 0
                assert ios.statistics().memory_in_use == 0
            await until(lambda: ios.statistics().memory_in_use == 0)


@pytest.mark.every_core
async def test_icmp_errors_for_a_port_nobody_reads_stay_bounded(no_leaks: None, core: str) -> None:
    """Each datagram a connected port sends to a dead peer comes back as an ICMP error,
    an ``Error("ECONNREFUSED")`` message.  Its owner does not read: past the watermark
    the errors must stop piling up in the port (a socket error is reported even to a
    port that does not read: it is taken and counted, not buffered)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        dead = probe.getsockname()
    async with (
        ioserver.open(core=core, memory_limit=1 << 20) as ios,
        await ports.open_udp(ios, connect=dead, high_msgq_messages=4) as port,
    ):
        handler = port._handler
        for index in range(30):  # under the kernel's ICMP burst (50)
            await port.send(b"anyone?")
            # Sent, or refused for the ICMP error of an earlier one (a paused port's
            # error waits on the socket until its next send or read takes it).
            await until(lambda: handler.datagrams_out + handler.errors > index)  # noqa: B023
        assert handler.errors > 5
        # Every Error the I/O thread delivered is in the port (the hub delivered them).
        await until(lambda: port.statistics().messages_buffered == handler.delivered_messages)
        assert port.statistics().messages_buffered <= 4 + 1
        taken = []
        while True:
            try:
                taken.append(port.receive_nowait())
            except ports.WouldBlock:
                break
        assert taken and all(
            isinstance(message, Error) and message.errno_name == "ECONNREFUSED" for message in taken
        )
        # Drained, the port reads again (a late ICMP error may come): what is buffered is
        # what is charged, no more and no less.
        await until(
            lambda: (
                port.statistics().bytes_buffered_in
                == ERROR_CHARGE * port.statistics().messages_buffered
            )
        )
        await port.aclose()
        await until(lambda: ios.statistics().memory_in_use == 0)


@pytest.mark.every_core
async def test_error_messages_in_an_owner_mailbox_stay_charged_until_taken(
    no_leaks: None, core: str
) -> None:
    """An ``Error`` handed to an owner mailbox counts against its port until a receive
    takes it out, as a datagram does; the mailbox's close releases what is left."""
    count = 60
    async with ioserver.open(core=core, memory_limit=1 << 20) as ios:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            async with await ports.open_udp(
                ios, max_datagram=64, high_msgq_messages=8, read_packets=4, recbuf=1 << 20
            ) as port:
                mailbox = ports.Mailbox()
                port.set_owner(mailbox)
                for _ in range(count):
                    client.sendto(b"x" * 100, port.local_address)
                await until(lambda: port.statistics().pauses > 0)
                assert port.statistics().bytes_buffered_in <= (8 + 4) * ERROR_CHARGE
                for _ in range(10):
                    with anyio.fail_after(5):
                        source, message = await mailbox.receive()
                    assert source is port and isinstance(message, Error)
                mailbox.close()  # the rest are dropped: taken, and the port closed with it
                await until(lambda: ios.statistics().memory_in_use == 0)
