"""The native I/O core (``ioserver.open(core="native")``) against real sockets.

The tests marked ``every_core`` run on both cores: the Python I/O thread is the oracle the
native one must match.  The others are about choosing a core and what the native one
refuses.  The TCP tests of ``test_tcp.py`` run on both cores too.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import sys
import time
from collections.abc import Callable
from typing import Any

import anyio
import anyio.abc
import pytest
from conftest import until

import ioserver
import ports
from ioserver import _exceptions, _tcp
from ioserver._contract import ConnectRequest
from ioserver._options import port_options
from ports import Accepted, Closed, Data

pytestmark = pytest.mark.anyio

#: Bytes of one read of either I/O thread: what a port may deliver past its watermark.
READ_SIZE = 65536


async def pair(ios: ioserver.IOServer, **options: object) -> tuple[ports.Listener, ports.Port]:
    """A listener and one connection to it, as ``(listener, connected port)``."""
    listener = await ports.listen_tcp(ios, "127.0.0.1", 0, **options)  # type: ignore[arg-type]
    port = await ports.connect_tcp(ios, *listener.local_address)
    return listener, port


async def accept(listener: ports.Listener) -> ports.Port:
    message = await listener.receive()
    assert isinstance(message, Accepted), message
    return message.port


async def receive_exactly(port: ports.Port, size: int) -> bytes:
    chunks = []
    got = 0
    while got < size:
        message = await port.receive()
        assert isinstance(message, Data), message
        chunks.append(message.data)
        got += len(message.data)
    return b"".join(chunks)


@pytest.mark.every_core
async def test_echo_both_ways_and_statistics_name_the_core(
    ios: ioserver.IOServer, core: str
) -> None:
    listener, client = await pair(ios)
    async with listener, client:
        server = await accept(listener)
        for size in (1, 64, 70_000):
            payload = os.urandom(size)
            await client.send(payload)
            await server.send(await receive_exactly(server, size))
            assert await receive_exactly(client, size) == payload
        await server.aclose()
        assert await client.receive() == Closed("eof")
    statistics = ios.statistics()
    assert statistics.core == core
    assert statistics.bytes_received == statistics.bytes_sent == 2 * (1 + 64 + 70_000)


@pytest.mark.every_core
async def test_close_after_flush_writes_every_queued_byte(ios: ioserver.IOServer) -> None:
    """Closing a port whose output is queued writes it all first (Erlang's close after a
    flush), even when the peer reads slowly: close does not wait, the I/O thread does."""
    listener = await ports.listen_tcp(ios, "127.0.0.1", 0, high_watermark=1 << 30)
    async with listener:
        peer = await anyio.connect_tcp(*listener.local_address)
        port = await accept(listener)
        payload = os.urandom(4 << 20)
        for offset in range(0, len(payload), 1 << 16):
            port.send_nowait(payload[offset : offset + (1 << 16)])
        await port.aclose()
        received = bytearray()
        async with peer:
            with anyio.fail_after(10):
                while True:
                    try:
                        received += await peer.receive(1 << 20)
                    except anyio.EndOfStream:
                        break
        assert bytes(received) == payload


@pytest.mark.every_core
async def test_close_after_flush_survives_the_peers_half_close(ios: ioserver.IOServer) -> None:
    """The peer's half-close (its FIN) while a close waits for the output to drain ends
    the peer's sending only: every queued byte is still written, then the port closes (as
    ``_iothread._eof`` does; the native core once dropped the queue there, a silent
    truncation followed by a clean end)."""
    listener = await ports.listen_tcp(ios, "127.0.0.1", 0, high_watermark=1 << 30)
    async with listener:
        peer = await anyio.connect_tcp(*listener.local_address)
        port = await accept(listener)
        payload = os.urandom(4 << 20)  # more than the kernel's buffers take at once
        for offset in range(0, len(payload), 1 << 16):
            port.send_nowait(payload[offset : offset + (1 << 16)])
        await port.aclose()
        received = bytearray()
        async with peer:
            await peer.send_eof()
            with anyio.fail_after(10):
                while True:
                    try:
                        received += await peer.receive(1 << 20)
                    except anyio.EndOfStream:
                        break
        assert len(received) == len(payload)
        assert bytes(received) == payload


@pytest.mark.every_core
async def test_flood_to_an_owner_that_does_not_read_stays_bounded(
    ios: ioserver.IOServer,
) -> None:
    """A peer that floods a port whose owner does not read is paused at the high
    watermark (TCP pushes back on it); what is buffered stays within the watermark plus one
    read, and every byte arrives, in order, once the owner reads."""
    high = 64 * 1024
    listener = await ports.listen_tcp(
        ios, "127.0.0.1", 0, high_msgq_watermark=high, low_msgq_watermark=high // 2
    )
    total = 16 << 20
    payload = os.urandom(total)
    async with listener:
        peer = await anyio.connect_tcp(*listener.local_address)
        port = await accept(listener)

        async def flood() -> None:
            await peer.send(payload)

        async with anyio.create_task_group() as group:
            group.start_soon(flood)
            with anyio.fail_after(10):
                while port.statistics().pauses == 0:  # noqa: ASYNC110 - a counter of the I/O thread, no event
                    await anyio.sleep(0.005)
            # Paused: the peer cannot have sent everything (the kernel holds a few MiB).
            statistics = port.statistics()
            assert statistics.bytes_buffered_in <= high + READ_SIZE
            assert statistics.bytes_received < total
            # The server's memory in use counts what waits for the owner.
            assert ios.statistics().memory_in_use >= statistics.bytes_buffered_in > 0
            with anyio.fail_after(20):
                assert await receive_exactly(port, total) == payload
        assert port.statistics().peak_buffered <= high + READ_SIZE
        assert ios.statistics().memory_in_use == 0  # all taken, nothing queued
        await peer.aclose()
        await port.aclose()


@pytest.mark.every_core
async def test_a_cancelled_send_queued_nothing(ios: ioserver.IOServer, anyio_backend: str) -> None:
    """Trio's rule at send's checkpoint: a send that raised Cancelled sent nothing.  (On
    asyncio a cancellation arrives at the next suspension, which a send that completes at
    once does not make: see ioserver._hub.)"""
    if anyio_backend != "trio":
        pytest.skip("asyncio delivers a cancellation at a suspension only")
    listener, client = await pair(ios)
    async with listener, client:
        server = await accept(listener)
        with anyio.CancelScope() as scope:
            scope.cancel()
            await client.send(b"never")
        await client.send(b"only")
        assert await receive_exactly(server, 4) == b"only"
        await server.aclose()


@pytest.mark.every_core
async def test_a_cancelled_connect_and_listen_leave_nothing_open(
    ios: ioserver.IOServer,
) -> None:
    """Cancelled while the I/O thread opens: what it opened is closed (the leak check)."""
    listener = await ports.listen_tcp(ios, "127.0.0.1", 0)
    async with listener:
        for _ in range(5):
            with anyio.CancelScope() as scope:
                scope.cancel()
                await ports.connect_tcp(ios, *listener.local_address)
            with anyio.move_on_after(0):
                await ports.listen_tcp(ios, "127.0.0.1", 0)
        # The connections the I/O thread made meanwhile reach the listener, and are closed
        # by the side that cancelled: each accepted port ends.
        with anyio.move_on_after(0.5):
            while True:
                port = await accept(listener)
                assert await port.receive() == Closed("eof")
                await port.aclose()


@pytest.mark.every_core
async def test_many_connections_echo_at_once(ios: ioserver.IOServer) -> None:
    count, rounds = 200, 5
    listener = await ports.listen_tcp(ios, "127.0.0.1", 0)

    async def serve(port: ports.Port) -> None:
        async with port:
            async for message in port:
                if isinstance(message, Data):
                    await port.send(message.data)

    async def client(index: int) -> None:
        async with await ports.connect_tcp(ios, *listener.local_address) as port:
            for round_ in range(rounds):
                payload = f"{index}:{round_};".encode()
                await port.send(payload)
                assert await receive_exactly(port, len(payload)) == payload

    async with listener, anyio.create_task_group() as servers:
        with anyio.fail_after(20):
            async with anyio.create_task_group() as clients:
                for index in range(count):
                    clients.start_soon(client, index)
                for _ in range(count):
                    servers.start_soon(serve, await accept(listener))


async def test_sent_bytes_are_held_then_released_not_copied(no_leaks: None) -> None:
    """The native send holds the bytes object itself for the I/O thread (no copy) and
    hands it back to the loop, which drops it in a later drain: its reference count
    returns to what it was."""
    async with ioserver.open(core="native") as ios:
        listener, client = await pair(ios, high_watermark=1 << 30)
        async with listener, client:
            server = await accept(listener)
            payload = os.urandom(1 << 20)
            baseline = sys.getrefcount(payload)
            await client.send(payload)
            assert await receive_exactly(server, len(payload)) == payload
            # One more exchange: the released reference rides back with its events.
            await client.send(b"x")
            await receive_exactly(server, 1)
            await server.send(b"y")
            await receive_exactly(client, 1)
            assert sys.getrefcount(payload) == baseline
            await server.aclose()


async def test_an_empty_send_is_dropped_not_a_stall(no_leaks: None) -> None:
    """``Core.send`` (public: the hub's send command) with an empty ``bytes`` queues
    nothing: a ``writev`` of nothing writes 0 bytes, and such a head once stalled the I/O
    thread in its write loop for good."""
    async with ioserver.open(core="native") as ios:
        listener, client = await pair(ios)
        async with listener, client:
            server = await accept(listener)
            core = ios._io._core  # type: ignore[attr-defined]
            core.send(server._conn, b"")
            # A round trip: the round that reads it ran the send command first.
            await client.send(b"ping")
            assert await receive_exactly(server, 4) == b"ping"
            await server.send(b"after")
            with anyio.fail_after(5):
                assert await receive_exactly(client, 5) == b"after"
            await server.aclose()


async def test_the_one_call_send_and_take_count_exactly(no_leaks: None) -> None:
    """``Port.send``'s native fast path (``Core.send_within``) checks the high watermark,
    counts ``queued_bytes`` and queues the bytes in one call, and queues nothing once the
    port is busy; a receive counts the take in one call (``NativeWindow.took``), which
    says when the I/O thread paused reading since the last resume.  The counters stay
    exact either way: what the owner took is what was delivered, what it queued is what
    was written."""
    high = 4096
    async with ioserver.open(core="native") as ios:
        listener = await ports.listen_tcp(
            ios,
            "127.0.0.1",
            0,
            high_watermark=high,
            low_watermark=0,
            high_msgq_watermark=16,
            low_msgq_watermark=8,
        )
        async with listener:
            with socket.create_connection(listener.local_address) as peer:
                port = await accept(listener)
                core = ios._io._core  # type: ignore[attr-defined]
                conn, window = port._conn, port._window
                sent = 0
                for size in (1, 100, 1000):
                    await port.send(b"s" * size)
                    sent += size
                assert window.queued_bytes == sent
                # Fill the peer's socket until the port is busy: queued and not written
                # above the high watermark.  Then the one call queues nothing.
                chunk = b"f" * 65536
                with anyio.fail_after(10):
                    while True:
                        while not port.busy:
                            port.send_nowait(chunk)
                            sent += len(chunk)
                            await anyio.sleep(0.001)
                        if not core.send_within(conn, b"x", high):
                            break
                        # The I/O thread wrote more between the two (the kernel grew the
                        # socket's buffer): the byte was queued, and counted.  Fill again.
                        sent += 1
                assert window.queued_bytes == sent
                assert core.send_within(conn, b"y" * 10, 1 << 40)
                sent += 10
                assert window.queued_bytes == sent

                def read_all() -> int:
                    got = 0
                    while got < sent:
                        got += len(peer.recv(1 << 20))
                    return got

                assert await anyio.to_thread.run_sync(read_all) == sent
                with anyio.fail_after(5):
                    while conn.bytes_out < sent:  # noqa: ASYNC110 - a counter of the I/O thread, no event
                        await anyio.sleep(0.005)
                assert conn.bytes_out == window.queued_bytes == sent
                # The peer sends more than high_msgq_watermark: reading pauses.
                peer.sendall(b"m" * 120)
                with anyio.fail_after(5):
                    while conn.pauses == 0:  # noqa: ASYNC110 - a counter of the I/O thread, no event
                        await anyio.sleep(0.005)
                assert window.took(0) is None  # paused, and the owner has not taken enough yet
                window.consumed_messages -= 1  # (undo the probe's count)
                received = 0
                while received < 120:
                    message = await port.receive()
                    assert isinstance(message, Data)
                    received += len(message.data)
                assert window.consumed_bytes == conn.delivered_bytes == 120
                assert window.consumed_messages == conn.delivered_messages
                # Resumed: the handshake ran.
                assert window.resume_generation == conn.pause_generation
                await port.aclose()


@pytest.mark.every_core
async def test_an_idle_port_keeps_no_buffer_it_does_not_use(ios: ioserver.IOServer) -> None:
    """An idle connection's port holds no preallocated buffer (issue 14: ioserver's own
    memory per idle connection): its message buffer is an empty list once its messages
    are taken (a deque kept a 64-slot block, 760 bytes), it has no select list and no
    send waiter until a task needs one, and the native window has no ``__dict__``."""
    listener, client = await pair(ios)
    async with listener, client:
        server = await accept(listener)
        await client.send(b"x")
        assert await receive_exactly(server, 1) == b"x"
        assert server._buffer == []
        assert sys.getsizeof(server._buffer) <= sys.getsizeof([])
        assert server._select_waiters == ()
        assert server._send_waiter is None
        assert not hasattr(server._window, "__dict__")
        # What only a busy send reads is one tuple the listener's ports share, the busy
        # count and send_eof's mark live in the send waiter, a pending Passive is a value
        # of _notify: the port is 22 slots, a 208-byte block (27 and 256 before).
        assert server._send_options is client._send_options
        assert sys.getsizeof(server) <= 208
        await server.aclose()


@pytest.mark.every_core
async def test_a_port_owned_by_a_mailbox_has_no_buffer_list(ios: ioserver.IOServer) -> None:
    """A port whose messages go to its owner mailbox never buffers one: it has no list
    for them (the shared empty tuple; issue 14, 56 bytes an idle connection), until a
    message stays in the port - then, and for a task that waits on it, a list."""
    listener, client = await pair(ios)
    async with listener, client:
        server = await accept(listener)
        assert server._buffer == ()
        mailbox = ports.Mailbox()
        server.set_owner(mailbox)
        await client.send(b"x")
        with anyio.fail_after(5):
            assert await mailbox.receive() == (server, Data(b"x"))
        assert server._buffer == ()
        server.set_owner(None)
        await client.send(b"y")
        assert await server.receive() == Data(b"y")  # (a list made for it)
        assert server._buffer == []
        await server.aclose()
        mailbox.close()


@pytest.mark.every_core
async def test_a_port_has_no_dict_and_is_still_every_stream_abc(ios: ioserver.IOServer) -> None:
    """A port, a listener and a UDP port have no ``__dict__`` (issue 14: CPython 3.11 gave
    each port a values array for one, 44 bytes, because anyio's stream ABCs declare no
    ``__slots__``): anyio's ABCs are virtual bases now, so ``isinstance`` answers as
    before, and ``extra`` still gives the typed attributes."""
    import trio.abc
    from anyio.abc import SocketAttribute

    listener, client = await pair(ios)
    async with listener, client:
        server = await accept(listener)
        for port in (server, client, listener):
            assert not hasattr(port, "__dict__")
            with pytest.raises(AttributeError):
                port.anything = 1  # type: ignore[union-attr]
        for abc in (
            anyio.abc.ObjectStream,
            anyio.abc.ObjectReceiveStream,
            anyio.abc.ObjectSendStream,
            anyio.abc.UnreliableObjectStream,
            anyio.abc.AsyncResource,
            trio.abc.Channel,
            trio.abc.ReceiveChannel,
            trio.abc.SendChannel,
            trio.abc.AsyncResource,
        ):
            assert isinstance(server, abc), abc
        for abc in (anyio.abc.ObjectReceiveStream, trio.abc.ReceiveChannel):
            assert isinstance(listener, abc), abc
        assert not isinstance(listener, anyio.abc.ObjectSendStream)
        assert server.extra(SocketAttribute.local_address) == listener.local_address
        assert server.extra(SocketAttribute.remote_address) == client.local_address
        assert listener.extra(SocketAttribute.remote_address, None) is None
        await server.aclose()
    async with await ports.open_udp(ios, ("127.0.0.1", 0)) as udp:
        assert not hasattr(udp, "__dict__")
        for abc in (anyio.abc.ObjectReceiveStream, anyio.abc.ObjectSendStream, trio.abc.Channel):
            assert isinstance(udp, abc), abc
        assert not isinstance(udp, anyio.abc.ObjectStream)  # (as before: not a stream)


async def test_a_raw_ports_native_window_has_no_slot_of_its_own(no_leaks: None) -> None:
    """A raw port's native window keeps ``framer``, ``packet_overhead`` and ``sizes`` as
    class attributes (None, 0, None), not in slots, and is the Rust class itself, not a
    Python subclass (whose instances carry a GC header): the object's header and the
    reference to the Rust counters only (issue 14, memory per idle connection: 24 bytes,
    against 40 as a subclass and 64 with slots); a packet port's window has them in
    slots, with its own ``sizes``."""
    from ioserver._native_core import FramedNativeWindow, NativeWindow

    async with ioserver.open(core="native") as ios:
        listener, client = await pair(ios)
        async with listener, client:
            server = await accept(listener)
            window = server._window
            assert type(window) is NativeWindow
            assert (window.framer, window.packet_overhead, window.sizes) == (None, 0, None)
            assert (window.on_pause, window.on_gone, window.task_waits()) == (None, None, False)
            assert window.charge(b"abc") == 3
            assert sys.getsizeof(window) <= 24
            await server.aclose()
        listener, client = await pair(ios, packet=2)
        async with listener, client:
            server = await accept(listener)
            window = server._window
            assert type(window) is FramedNativeWindow
            assert window.framer is not None and window.packet_overhead > 0
            assert window.sizes is not None
            await client.send(b"\x00\x02ab")  # (the client is raw: the header by hand)
            assert await server.receive() == Data(b"ab")
            assert window.consumed_bytes == 2 + window.packet_overhead
            await server.aclose()


async def test_accepted_ports_share_their_address_objects(no_leaks: None) -> None:
    """The native core builds an accepted connection's local address once per listener
    and the peer host's string once per host: the ports of one listener share them (they
    are immutable), instead of a tuple and a string each."""
    async with ioserver.open(core="native") as ios:
        listener = await ports.listen_tcp(ios, "127.0.0.1", 0)
        async with listener:
            peers = [socket.create_connection(listener.local_address) for _ in range(3)]
            try:
                accepted = [await accept(listener) for _ in peers]
                first = accepted[0]
                for port in accepted:
                    assert port.local_address == listener.local_address
                    assert port.local_address is first.local_address
                    assert port.remote_address[0] is first.remote_address[0]
                assert sorted(port.remote_address for port in accepted) == sorted(
                    peer.getsockname() for peer in peers
                )
                for port in accepted:
                    await port.aclose()
            finally:
                for peer in peers:
                    peer.close()


async def test_an_accepted_port_makes_its_peer_address_when_first_asked(
    no_leaks: None,
) -> None:
    """The native core keeps an accepted TCP connection's peer in its handle (16 bytes)
    and the port makes the address when first asked, then keeps it (issue 14: a tuple and
    an int less per idle connection); it is the same value as the Accepted message's,
    also after the port closed, and a connected port and a listener keep theirs."""
    async with ioserver.open(core="native") as ios:
        listener = await ports.listen_tcp(ios, "127.0.0.1", 0)
        async with listener:
            client = await ports.connect_tcp(ios, *listener.local_address)
            message = await listener.receive()
            assert isinstance(message, Accepted)
            server = message.port
            assert server._remote_address is None  # not made yet
            assert sys.getsizeof(server._conn) <= 40  # (the handle, with the peer in it)
            address = server.remote_address
            assert address == message.address == client.local_address
            assert server.remote_address is address  # made once
            assert client.remote_address == listener.local_address
            assert listener.remote_address is None
            await server.aclose()
            assert server.remote_address == address
            assert "-> ('127.0.0.1'," in repr(server)
            await client.aclose()


def pinned(payloads: list[bytes], baseline: int) -> list[int]:
    """The indexes of the payloads something else still refers to."""
    return [index for index in range(len(payloads)) if sys.getrefcount(payloads[index]) > baseline]


async def test_written_buffers_are_not_pinned_without_a_bound(no_leaks: None) -> None:
    """The native thread holds each sent ``bytes`` until it is written, then hands it back
    to the loop to drop.  What it holds once written is bounded by bytes (about 1 MiB per
    loop), not only by count, even when the loop gets no other event; and it is counted in
    ``memory_in_use`` until the loop drops it."""
    count, size = 40, 1 << 20
    payloads = [os.urandom(size) for _ in range(count)]
    baseline = sys.getrefcount(payloads[0])

    def drain(peer: socket.socket) -> int:
        got = 0
        while got < count * size:
            chunk = peer.recv(1 << 20)
            assert chunk
            got += len(chunk)
        return got

    async with ioserver.open(core="native") as ios:
        listener = await ports.listen_tcp(ios, "127.0.0.1", 0, high_watermark=1 << 30)
        async with listener:
            with socket.create_connection(listener.local_address) as peer:
                port = await accept(listener)
                for index in range(count):
                    port.send_nowait(payloads[index])
                # The peer reads everything; the loop gets no event but the releases.
                assert await anyio.to_thread.run_sync(drain, peer) == count * size
                with anyio.fail_after(5):
                    while ios.statistics().memory_in_use > 0:  # noqa: ASYNC110 - a counter of the I/O thread, no event
                        await anyio.sleep(0.005)
                # Nothing counted: nothing held (a buffer held and not counted stays).
                assert pinned(payloads, baseline) == []
                await port.aclose()


async def test_listen_takes_only_a_listening_socket_object(no_leaks: None) -> None:
    """``Core.listen`` takes the ``socket.socket`` itself and detaches it: an int (any fd
    at all, which it once adopted and closed as its own) or a socket that is not
    listening is refused, and the caller keeps what it passed, still open."""
    async with ioserver.open(core="native") as ios:
        listener, client = await pair(ios)
        async with listener, client:
            core = ios._io._core  # type: ignore[attr-defined]
            inbox = listener._hub.inbox
            read_end, write_end = os.pipe()
            try:
                with pytest.raises(TypeError):
                    core.listen(None, None, None, inbox, read_end, {}, (-1, False))
                with socket.socket() as unbound:
                    with pytest.raises(ValueError, match="listening"):
                        core.listen(None, None, None, inbox, unbound, {}, (-1, False))
                    assert unbound.fileno() >= 0
                with socket.socket(type=socket.SOCK_DGRAM) as datagram:
                    with pytest.raises(ValueError):
                        core.listen(None, None, None, inbox, datagram, {}, (-1, False))
                    assert datagram.fileno() >= 0
            finally:
                os.close(write_end)
                os.close(read_end)  # still ours: an adopted fd would be EBADF here


async def test_native_refuses_what_it_does_not_carry_yet(no_leaks: None) -> None:
    with pytest.raises(ioserver.NotSupportedError, match="native"):
        async with ioserver.open(core="native", poller="poll"):
            pass


async def test_the_core_is_chosen_by_argument_or_environment(
    no_leaks: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ioserver.OptionError, match="'rust'"):
        async with ioserver.open(core="rust"):
            pass
    monkeypatch.setenv("IOSERVER_CORE", "python")
    async with ioserver.open() as ios:
        assert ios.statistics().core == "python"
    async with ioserver.open(core="native") as ios:
        assert ios.statistics().core == "native"
    monkeypatch.setenv("IOSERVER_CORE", "fast")
    with pytest.raises(ioserver.OptionError, match=r"IOSERVER_CORE"):
        async with ioserver.open():
            pass
    monkeypatch.delenv("IOSERVER_CORE")
    # The default is the native core; a poller only the Python core has picks that one.
    async with ioserver.open() as ios:
        assert ios.statistics().core == "native"
    async with ioserver.open(poller="poll") as ios:
        assert ios.statistics().core == "python"
    with pytest.raises(ioserver.NotSupportedError, match="epoll"):
        async with ioserver.open(core="native", poller="poll"):
            pass


@pytest.mark.every_core
async def test_connect_refused_and_reset_name_the_errno(ios: ioserver.IOServer) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        number = probe.getsockname()[1]
    with pytest.raises(ports.ConnectError) as caught:
        await ports.connect_tcp(ios, "127.0.0.1", number)
    assert caught.value.errno_name == "ECONNREFUSED"
    listener = await ports.listen_tcp(ios, "127.0.0.1", 0)
    async with listener:
        with socket.create_connection(listener.local_address) as peer:
            port = await accept(listener)
            await port.send(b"hello")
            assert peer.recv(5) == b"hello"
            peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
        assert await port.receive() == Closed("ECONNRESET", "ECONNRESET")
        await port.aclose()


async def test_a_failure_of_the_native_thread_is_contained(no_leaks: None) -> None:
    """A panic in the native I/O thread does not abort the process: every port ends with
    ``Closed("EIO")`` (sends then raise BrokenPortError), the server refuses new ports with
    ClosedPortError naming the failure, and it still closes cleanly."""
    async with ioserver.open(core="native") as ios:
        listener, client = await pair(ios)
        server = await accept(listener)
        core = ios._io._core  # type: ignore[attr-defined]
        # The hook is private: not on the Core's public surface.
        assert not hasattr(core, "fail_for_test")
        core._fail_for_test()
        assert await client.receive() == Closed("EIO", "EIO")
        assert await server.receive() == Closed("EIO", "EIO")
        with pytest.raises(ports.BrokenPortError):
            await client.send(b"after")
        with pytest.raises(ports.ClosedPortError, match="native I/O thread failed"):
            await ports.connect_tcp(ios, *listener.local_address)
        assert ios.statistics().internal_errors == 1
        await client.aclose()
        await server.aclose()
        await listener.aclose()


@pytest.mark.every_core
async def test_the_end_after_a_short_read_is_still_read(ios: ioserver.IOServer) -> None:
    """A peer's data and its FIN both arrived before the port read (a passive port): the
    read that takes the data is short, and the end has no readiness edge of its own after
    it (the native core's epoll is edge-triggered); the next receive still gets it."""
    listener = await ports.listen_tcp(ios, "127.0.0.1", 0, active=False)
    async with listener:
        with socket.create_connection(listener.local_address) as peer:
            peer.sendall(b"abc")
        port = await accept(listener)
        with anyio.fail_after(5):
            assert await port.receive() == Data(b"abc")
            assert await port.receive() == Closed("eof")
        await port.aclose()


@pytest.mark.every_core
@pytest.mark.parametrize("packet", [1, 2, 4, "line"])
async def test_framed_ports_deliver_whole_packets(ios: ioserver.IOServer, packet: object) -> None:
    """Packets of 1/2/4-byte length headers and lines, cut anywhere by the peer, arrive
    whole and in order; active=N counts packets (the rest are held for the next grant)."""
    listener = await ports.listen_tcp(ios, "127.0.0.1", 0, packet=packet, active=2)
    payloads = [b"a", b"bb" * 50, b"", b"cccc", b"d" * 200]
    if packet == "line":
        payloads = [p + b"\n" for p in payloads]
        wire = b"".join(payloads)
    else:
        size = {1: 1, 2: 2, 4: 4}[packet]  # type: ignore[index]
        wire = b"".join(len(p).to_bytes(size, "big") + p for p in payloads)
    async with listener:
        with socket.create_connection(listener.local_address) as peer:
            port = await accept(listener)
            for offset in range(len(wire)):  # one byte at a time: every cut
                peer.sendall(wire[offset : offset + 1])
            with anyio.fail_after(5):
                got = [await port.receive(), await port.receive()]
                assert await port.receive() == ports.Passive()
                port.setopts(active=True)
                got += [await port.receive() for _ in payloads[2:]]
            assert got == [Data(p) for p in payloads]
            await port.send(b"reply")  # framed by the port on the way out
            expected = b"reply\n" if packet == "line" else b""
            if packet != "line":
                expected = (5).to_bytes({1: 1, 2: 2, 4: 4}[packet], "big") + b"reply"  # type: ignore[index]
            assert peer.recv(64) == expected
        await port.aclose()


@pytest.mark.every_core
async def test_a_packet_too_large_is_an_error_then_the_end(ios: ioserver.IOServer) -> None:
    listener = await ports.listen_tcp(ios, "127.0.0.1", 0, packet=2, packet_size=10)
    async with listener:
        with socket.create_connection(listener.local_address) as peer:
            port = await accept(listener)
            peer.sendall((100).to_bytes(2, "big") + b"x" * 100)
            with anyio.fail_after(5):
                error = await port.receive()
                assert isinstance(error, ports.Error) and error.errno_name == "EMSGSIZE"
                assert await port.receive() == Closed("EMSGSIZE", "EMSGSIZE")
            assert port.statistics().packets_too_large == 1
        await port.aclose()


@pytest.mark.every_core
async def test_the_server_stopping_ends_each_open_port_with_closed(
    no_leaks: None, core: str, io_backend: str | None
) -> None:
    """A TCP port and a listener still open when the server stops each get one final
    ``Closed("ioserver closed", "ESHUTDOWN")`` (the Python core's ``_shutdown``), so an
    owner iterating them ends; a send afterwards raises."""
    if io_backend == "io_uring":
        from ioserver import _native

        try:
            _native.Core(64, "io_uring").close_commands()
        except OSError as exc:
            pytest.skip(f"io_uring is refused here: {exc}")
    async with ioserver.open(core=core, io_backend=io_backend) as ios:
        listener, client = await pair(ios)
        server = await accept(listener)
        await client.send(b"x")
        assert await server.receive() == Data(b"x")
    closed = Closed("ioserver closed", "ESHUTDOWN")
    with anyio.fail_after(5):
        assert [message async for message in server] == [closed]
        assert [message async for message in client] == [closed]
        assert [message async for message in listener] == [closed]
    with pytest.raises(ports.BrokenPortError):
        await server.send(b"y")


async def test_a_conn_means_nothing_to_another_servers_core() -> None:
    """Port ids are unique in the process, not per server: a ``Conn`` handed to another
    server's native ``Core`` names none of its ports.  With ids counted per server, the
    first port of each had the same slot and id, and server B's close of server A's
    ``Conn`` closed B's own port (a private API, but a wrong port is never acceptable)."""
    async with ioserver.open(core="native") as a, ioserver.open(core="native") as b:
        listener_a, client_a = await pair(a)
        listener_b, client_b = await pair(b)
        async with listener_a, listener_b, client_a, client_b:
            server_a = await accept(listener_a)
            server_b = await accept(listener_b)
            b._io._core.close(server_a._conn, None)  # type: ignore[attr-defined]
            # B's thread ran that command before this one (one queue, in order).
            await server_b.send(b"still open")
            assert await receive_exactly(client_b, 10) == b"still open"
            assert not server_b._conn.closed  # type: ignore[union-attr]
            await server_a.send(b"A too")
            assert await receive_exactly(client_a, 5) == b"A too"


@pytest.mark.every_core
async def test_an_idle_server_holds_no_written_buffer(ios: ioserver.IOServer) -> None:
    """A written buffer goes back to its loop to be dropped - with the loop's next batch,
    or, when none comes, once the I/O thread has been idle a moment (``RELEASE_IDLE``):
    the memory in use of a server that sent and then went quiet returns to 0.  The peer is
    a plain socket, so no event of this loop follows the write; before the idle release
    the native core kept the 1,000 bytes pinned (and charged) for good."""
    listener = await ports.listen_tcp(ios, "127.0.0.1", 0)
    async with listener:
        with socket.create_connection(listener.local_address[:2]) as peer:
            port = await accept(listener)
            await port.send(b"y" * 1000)
            received = b""
            while len(received) < 1000:
                received += await anyio.to_thread.run_sync(peer.recv, 4096)
            await port.aclose()
            # A counter, polled: the release is the I/O thread's, no event tells of it.
            with anyio.fail_after(5):
                while ios.statistics().memory_in_use:  # noqa: ASYNC110
                    await anyio.sleep(0.005)


async def _until_closed(ios: ioserver.IOServer) -> None:
    """Wait (checkpointing) until the I/O thread has no port open."""
    await until(lambda: not ios.statistics().ports_open, 5)


async def test_a_connect_or_listen_reply_that_fails_to_build_still_answers_the_owner() -> None:
    """A connect's ``Connected`` or a listen's ``Listening`` that the drain fails to build
    (a ``MemoryError``, injected by a test hook) answers the request with that error - the
    owner's ``connect_tcp``/``listen_tcp`` raises it - and closes the port the I/O thread
    opened.  Before, the error was only reported as unraisable: the request was never
    answered and its owner waited for good, with the port left open."""
    async with ioserver.open(core="native") as ios:
        inbox = ios._hub.inbox  # type: ignore[attr-defined]
        with socket.create_server(("127.0.0.1", 0)) as server:
            inbox._fail_replies_for_test(1)
            with anyio.fail_after(5), pytest.raises(MemoryError):
                await ports.connect_tcp(ios, *server.getsockname())
            peer, _ = server.accept()
            with peer:
                peer.settimeout(5)
                assert peer.recv(1) == b""  # the connection it opened was closed
        inbox._fail_replies_for_test(1)
        with anyio.fail_after(5), pytest.raises(MemoryError):
            await ports.listen_tcp(ios, "127.0.0.1", 0)
        await _until_closed(ios)
        # The next ones are answered as usual.
        async with await ports.listen_tcp(ios, "127.0.0.1", 0) as listener:
            port = await ports.connect_tcp(ios, *listener.local_address)
            async with port, await accept(listener):
                pass
        await _until_closed(ios)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_a_connect_or_listen_reply_whose_build_panics_still_answers_the_owner() -> None:
    """As above, with the panic PyO3 makes where CPython cannot allocate an object (a test
    hook) instead of a ``MemoryError``: the request is answered with a ``RuntimeError``
    naming the panic, the port the I/O thread opened is closed, and the fault is counted.
    Before, a reply whose build panicked was reported and dropped: ``connect_tcp`` and
    ``listen_tcp`` waited for good, the port left open."""
    async with ioserver.open(core="native") as ios:
        inbox = ios._hub.inbox  # type: ignore[attr-defined]
        errors = ios.statistics().internal_errors
        with socket.create_server(("127.0.0.1", 0)) as server:
            inbox._panic_replies_for_test(1)
            with anyio.fail_after(5), pytest.raises(RuntimeError, match="panic"):
                await ports.connect_tcp(ios, *server.getsockname())
            peer, _ = server.accept()
            with peer:
                peer.settimeout(5)
                assert peer.recv(1) == b""  # the connection it opened was closed
        inbox._panic_replies_for_test(1)
        with anyio.fail_after(5), pytest.raises(RuntimeError, match="panic"):
            await ports.listen_tcp(ios, "127.0.0.1", 0)
        await _until_closed(ios)
        assert ios.statistics().internal_errors == errors + 2
        async with await ports.listen_tcp(ios, "127.0.0.1", 0) as listener:
            port = await ports.connect_tcp(ios, *listener.local_address)
            async with port, await accept(listener):
                pass
        await _until_closed(ios)


class _UnprintablePath(str):
    """A Unix socket path (a ``str``) whose ``repr`` raises: a failed connect's error, which
    names the path, cannot be built."""

    def __repr__(self) -> str:
        raise RuntimeError("no repr for this path")


@pytest.mark.every_core
async def test_a_failed_connect_to_an_unprintable_address_still_answers_the_owner(
    core: str, io_backend: str | None, tmp_path: object
) -> None:
    """A connect that fails (no such socket file) to a path whose ``repr`` raises: its
    ``ConnectError`` names the path by its type, and reaches the owner.  Before, building
    the error raised - the native drain only reported it as unraisable, the Python core's
    I/O thread closed the socket as an internal error - and on both cores the owner's
    connect waited for good."""
    async with ioserver.open(core=core, io_backend=io_backend) as ios:
        path = _UnprintablePath(os.path.join(str(tmp_path), "nobody"))
        with anyio.fail_after(5), pytest.raises(ports.ConnectError) as info:
            await ports.connect_unix(ios, path)
        assert info.value.errno_name == "ENOENT"
        assert "<_UnprintablePath whose repr failed>" in str(info.value)
        await _until_closed(ios)


def _take_by_hand(inbox: Any, done: Callable[[list[tuple[Any, Any]]], bool]) -> tuple[list, int]:
    """Drain ``inbox`` synchronously (no checkpoint: the hub cannot run meanwhile) until
    ``done(pairs)``; return the pairs and how many takes raised ``KeyboardInterrupt``."""
    pairs: list[tuple[Any, Any]] = []
    raised = 0
    deadline = time.monotonic() + 5  # (no checkpoint: fail_after cannot)
    while not done(pairs):
        assert time.monotonic() < deadline, pairs
        try:
            pairs += inbox.take()
        except KeyboardInterrupt:
            raised += 1
        time.sleep(0.001)
    return pairs, raised


def _interrupt_once(function: Callable[..., Any], when: Callable[..., bool]) -> Callable[..., Any]:
    """``function``, except that its first call whose arguments satisfy ``when`` raises
    ``KeyboardInterrupt`` (as a SIGINT's handler does when it runs in that call)."""
    armed = [True]

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        if armed and when(*args, **kwargs):
            armed.clear()
            raise KeyboardInterrupt
        return function(*args, **kwargs)

    return interrupted


@pytest.mark.parametrize("where", ["errno_name", "Closed"])
async def test_a_keyboard_interrupt_building_a_closed_loses_nothing(
    monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """A ``KeyboardInterrupt`` that lands while the drain builds a broken connection's
    ``Closed`` (in ``errno_name``, or in the message's dataclass ``__init__``: Python calls
    where a SIGINT's handler may run) propagates out of ``Inbox.take``, and the next take
    builds that event again: the owner gets its ``Closed`` once.  Before, only a packet
    was carried to the next take; any other interrupted event was dropped, and here the
    owner waited for its ``Closed`` for good."""
    if where == "errno_name":
        function = _interrupt_once(_exceptions.errno_name, lambda n: n == errno.ECONNRESET)
        monkeypatch.setattr(_exceptions, "errno_name", function)  # read by a new inbox
    else:
        init = _interrupt_once(Closed.__init__, lambda _, reason, *__: reason == "ECONNRESET")
        monkeypatch.setattr(Closed, "__init__", init)
    async with ioserver.open(core="native") as ios:
        listener = await ports.listen_tcp(ios, "127.0.0.1", 0)
        async with listener:
            peer = socket.create_connection(listener.local_address)
            port = await accept(listener)
            async with port:
                inbox = ios._hub.inbox  # type: ignore[attr-defined]
                peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                peer.close()  # a reset: the port's Closed("ECONNRESET")
                pairs, raised = _take_by_hand(
                    inbox, lambda pairs: any(target is port for target, _ in pairs)
                )
                assert raised == 1
                assert [message for target, message in pairs if target is port] == [
                    Closed("ECONNRESET", "ECONNRESET")
                ]
                for target, message in pairs:
                    target._deliver(message)
                assert await port.receive() == Closed("ECONNRESET", "ECONNRESET")
        await _until_closed(ios)


async def test_a_keyboard_interrupt_in_make_port_accepts_the_connection_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A ``KeyboardInterrupt`` that lands in the listener's ``make_port`` (the Python call
    that makes an accepted connection's port) propagates out of ``Inbox.take``; the next
    take makes the port again and the listener gets one ``Accepted``, of a port that
    works.  Before, the drain closed the new connection and dropped the event: the peer
    was hung up on and the listener never told."""
    async with ioserver.open(core="native") as ios:
        listener = await ports.listen_tcp(ios, "127.0.0.1", 0)
        async with listener:
            init = _interrupt_once(ports.Port.__init__, lambda *_: True)
            monkeypatch.setattr(ports.Port, "__init__", init)
            with socket.create_connection(listener.local_address) as peer:
                inbox = ios._hub.inbox  # type: ignore[attr-defined]
                pairs, raised = _take_by_hand(
                    inbox, lambda pairs: any(target is listener for target, _ in pairs)
                )
                monkeypatch.undo()
                assert raised == 1
                accepted = [message for target, message in pairs if target is listener]
                assert len(accepted) == 1 and isinstance(accepted[0], Accepted), accepted
                for target, message in pairs:
                    target._deliver(message)
                port = await accept(listener)
                async with port:
                    await port.send(b"ping")
                    peer.settimeout(5)
                    assert peer.recv(4) == b"ping"
                    peer.sendall(b"pong")
                    assert await receive_exactly(port, 4) == b"pong"
        await _until_closed(ios)


class _Answer:
    """A connect request's target, as ``ports._port._Request`` without the waiting: the
    answers the test hands it."""

    def __init__(self, hub: object) -> None:
        self.hub = hub
        self.answers: list[object] = []

    def _deliver(self, answer: object) -> None:
        self.answers.append(answer)


async def test_a_keyboard_interrupt_building_a_connect_error_answers_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A ``KeyboardInterrupt`` that lands in ``connect_error`` (the Python call that makes
    a failed connect's ``ConnectError``) propagates out of ``Inbox.take``; the next take
    builds the answer again, and the request gets its error once.  Before, the answer was
    dropped and the owner's connect waited for good.  (The connect is queued by hand, as
    ``ports.connect_tcp`` does, so that this test's drain, not the hub's, takes it.)"""
    function = _interrupt_once(_tcp.connect_error, lambda *_: True)
    monkeypatch.setattr(_tcp, "connect_error", function)  # read by a new inbox
    async with ioserver.open(core="native") as ios:
        with socket.socket() as unused:
            unused.bind(("127.0.0.1", 0))  # bound, not listening: a connect is refused
            address = unused.getsockname()
            credit, settings = port_options({}, "a TCP port")
            request = _Answer(ios._hub)
            spec = ConnectRequest(
                ports.Port(ios, credit, settings, True),
                ios._hub.deliver,
                socket.AF_INET,
                address,
                settings,
                credit,
            )
            ios._io.cmd_connect(request, spec)  # type: ignore[attr-defined]
            pairs, raised = _take_by_hand(
                ios._hub.inbox,  # type: ignore[attr-defined]
                lambda pairs: any(target is request for target, _ in pairs),
            )
        assert raised == 1
        answers = [message for target, message in pairs if target is request]
        assert len(answers) == 1 and isinstance(answers[0], ports.ConnectError), answers
        assert answers[0].errno_name == "ECONNREFUSED"
        await _until_closed(ios)
