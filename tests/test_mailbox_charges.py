"""Input delivered to a mailbox stays charged to its port until a receive takes it.

A port owned by a :class:`ports.Mailbox` (``set_owner``, ``Actor.own``) delivers its
messages there as ``(port, message)`` tuples.  Before, the port counted a ``Data`` taken
the moment it was appended: an actor whose selective receive never matched a port's
messages, or that never received, let that port read without bound - past its
``high_msgq_watermark`` and past ``memory_limit``.  Now the charge travels with the
mailbox entry and is counted taken when a receive (or select, or the mailbox's close)
takes it: the port's watermarks and the budget hold however the owner receives.
"""

from __future__ import annotations

import socket
import threading
from typing import Any

import anyio
import pytest
import sniffio
from conftest import until

import ioserver
import ports
from ports import Accepted, Closed, Data

pytestmark = [pytest.mark.anyio, pytest.mark.every_core]

HIGH = 64 << 10  # high_msgq_watermark of the watermark tests
READ = 64 << 10  # the I/O thread's read size: a port may pass its watermark by one read
LIMIT = 1 << 20  # memory_limit of the budget tests
UNBOUND = {
    "high_msgq_watermark": 64 << 20,
    "low_msgq_watermark": 32 << 20,
    "high_msgq_messages": 1 << 24,
}


def _pattern(size: int, seed: int = 0) -> bytes:
    """``size`` bytes in which every 4-byte word differs: a lost, doubled or reordered
    chunk shows."""
    return b"".join(((seed << 24) + i).to_bytes(4, "big") for i in range(size // 4))


async def _accept(listener: ports.Listener) -> ports.Port:
    accepted = await listener.receive()
    assert isinstance(accepted, Accepted)
    return accepted.port


def _mailbox_bytes(mailbox: ports.Mailbox, port: object = None) -> int:
    """The bytes of Data queued in ``mailbox`` (of ``port``, if given)."""
    return sum(
        len(message.data)
        for source, message in list(mailbox._messages)
        if isinstance(message, Data) and (port is None or source is port)
    )


class _Peer:
    """A blocking peer in a thread: ``sendall(payload)`` then half-close.  ``finished``
    is set once the whole payload was handed to the kernel - which, with small socket
    buffers, happens only if the server read nearly all of it."""

    def __init__(self, address: tuple[str, int], payload: bytes) -> None:
        self.sock = socket.create_connection(address)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32 << 10)
        self.sock.settimeout(30)  # a test that went wrong ends, it does not hang
        self.payload = payload
        self.finished = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            self.sock.sendall(self.payload)
            self.sock.shutdown(socket.SHUT_WR)
        except BaseException as exc:  # reported by close()
            self.error = exc
        self.finished.set()

    def start(self) -> None:
        self.thread.start()

    async def close(self) -> None:
        self.sock.close()  # (a sendall still blocked ends with an error)
        await anyio.to_thread.run_sync(self.thread.join)


async def _io_round_trip(ios: ioserver.IOServer) -> None:
    """Wait until the I/O thread has gone through a round or more after this point (an
    echo over a second connection)."""
    listener = await ports.listen_tcp(ios, "127.0.0.1", 0)
    async with listener, await anyio.connect_tcp("127.0.0.1", listener.local_address[1]) as probe:
        port = await _accept(listener)
        await probe.send(b"?")
        assert await port.receive() == Data(b"?")
        await port.aclose()


async def _drain(mailbox: ports.Mailbox, port: ports.Port) -> bytes:
    """Take ``port``'s messages out of ``mailbox`` until its Closed; their bytes."""
    chunks = []
    while True:
        _source, message = await mailbox.receive(lambda m: m[0] is port)
        if isinstance(message, Closed):
            return b"".join(chunks)
        assert isinstance(message, Data)
        chunks.append(message.data)


async def _never_matching(mailbox: ports.Mailbox, *, task_status: Any) -> None:
    """An actor whose selective receive never matches (it waits for good)."""
    task_status.started()
    await mailbox.receive(lambda message: False)
    raise AssertionError("a receive whose match accepts nothing returned")


async def test_an_owned_port_whose_messages_never_match_stops_at_its_watermark(
    no_leaks: None, core: str, io_backend: str | None
) -> None:
    """The owner's selective receive never matches the port's messages: the port stops
    reading at its high watermark (delivered and not taken, the mailbox entries included),
    and its peer's send blocks.  Before, it read everything the peer sent into the
    mailbox.  Once the owner receives, every byte arrives exactly once, in order."""
    payload = _pattern(8 << 20)
    options = {"high_msgq_watermark": HIGH, "low_msgq_watermark": HIGH // 2, "recbuf": 32 << 10}
    async with ioserver.open(core=core, io_backend=io_backend) as ios:
        listener = await ports.listen_tcp(ios, "127.0.0.1", 0, **options)  # type: ignore[arg-type]
        mailbox = ports.Mailbox()
        peer = _Peer(listener.local_address, payload)
        try:
            async with listener, anyio.create_task_group() as tasks:
                await tasks.start(_never_matching, mailbox)
                port = await _accept(listener)
                port.set_owner(mailbox)
                peer.start()
                # Past its watermark in the mailbox: the I/O thread paused it as it
                # delivered the message that crossed it (or it never pauses: old code).
                await until(lambda: _mailbox_bytes(mailbox, port) >= HIGH or peer.finished.is_set())
                assert not peer.finished.is_set(), (
                    f"the port read the whole {len(payload)} bytes into a mailbox whose "
                    f"owner took none: {_mailbox_bytes(mailbox)} bytes queued there"
                )
                # Paused: a round (or two) of the I/O thread reads nothing more.
                received = port.statistics().bytes_received
                await _io_round_trip(ios)
                await _io_round_trip(ios)
                stats = port.statistics()
                assert stats.bytes_received == received
                assert not peer.finished.is_set()  # its sendall blocks
                queued = _mailbox_bytes(mailbox, port)
                assert queued == stats.bytes_buffered_in, (queued, stats)
                assert queued <= HIGH + READ, queued
                tasks.cancel_scope.cancel()
            # The owner receives: all of it, once, in order.
            with anyio.fail_after(30):
                data = await _drain(mailbox, port)
            assert data == payload
            assert port.statistics().bytes_buffered_in == 0
            await port.aclose()
        finally:
            mailbox.close()
            await peer.close()
    assert peer.error is None, peer.error


async def test_a_selective_receive_gets_its_port_while_another_port_is_paused_unmatched(
    no_leaks: None, core: str, io_backend: str | None
) -> None:
    """Two ports owned by one mailbox.  Port A floods; the owner waits selectively for
    port B's message, so A's messages stay unmatched until A reaches its watermark and
    pauses (its own backpressure).  B still delivers, and the receive gets it; then A's
    bytes all arrive, once, in order."""
    payload = _pattern(4 << 20, seed=1)
    options = {"high_msgq_watermark": HIGH, "low_msgq_watermark": HIGH // 2, "recbuf": 32 << 10}
    async with ioserver.open(core=core, io_backend=io_backend) as ios:
        listener = await ports.listen_tcp(ios, "127.0.0.1", 0, **options)  # type: ignore[arg-type]
        mailbox = ports.Mailbox()
        flood = _Peer(listener.local_address, payload)
        b_peer = socket.create_connection(listener.local_address)
        try:
            async with listener:
                port_a = await _accept(listener)
                port_b = await _accept(listener)
            port_a.set_owner(mailbox)
            port_b.set_owner(mailbox)
            got: list[Any] = []

            async def wait_for_b(*, task_status: Any) -> None:
                task_status.started()
                got.append(await mailbox.receive(lambda m: m[0] is port_b))

            async with anyio.create_task_group() as tasks:
                await tasks.start(wait_for_b)
                flood.start()
                await until(
                    lambda: _mailbox_bytes(mailbox, port_a) >= HIGH or flood.finished.is_set()
                )
                assert not flood.finished.is_set(), "port A read everything: no backpressure"
                received = port_a.statistics().bytes_received
                await _io_round_trip(ios)
                assert port_a.statistics().bytes_received == received  # A is paused
                assert _mailbox_bytes(mailbox, port_a) <= HIGH + READ
                assert not got
                b_peer.sendall(b"for B")
                await until(lambda: bool(got))
            assert got == [(port_b, Data(b"for B"))]
            assert not flood.finished.is_set()  # A stayed paused meanwhile
            with anyio.fail_after(30):
                assert await _drain(mailbox, port_a) == payload
            await port_a.aclose()
            await port_b.aclose()
        finally:
            mailbox.close()
            b_peer.close()
            await flood.close()
    assert flood.error is None, flood.error


async def test_mailboxes_that_never_take_cannot_pass_the_memory_budget(
    no_leaks: None, core: str, io_backend: str | None
) -> None:
    """Four ports with watermarks far above the budget, each owned by a mailbox whose
    owner's selective receive never matches, are sent 4 MiB through a 1 MiB budget: the
    budget pauses them, the mailboxes hold no more than the limit, and the memory
    charged never passes it.  A fifth port owned by one of those mailboxes, whose message
    that owner waits for, still gets it (the budget's reserve).  Then every byte arrives,
    once, in order."""
    each = 1 << 20
    payloads = [_pattern(each, seed=index) for index in range(4)]
    async with ioserver.open(memory_limit=LIMIT, core=core, io_backend=io_backend) as ios:
        listener = await ports.listen_tcp(ios, "127.0.0.1", 0, **UNBOUND)  # type: ignore[arg-type]
        mailboxes = [ports.Mailbox() for _ in payloads]
        peers = [_Peer(listener.local_address, payload) for payload in payloads]
        late_peer: socket.socket | None = None
        try:
            async with listener:
                hogs = []
                for mailbox in mailboxes:
                    port = await _accept(listener)
                    port.set_owner(mailbox)
                    hogs.append(port)
                got: list[Any] = []
                late: list[ports.Port] = []

                async def wait_for_late(*, task_status: Any) -> None:
                    task_status.started()
                    got.append(await mailboxes[0].receive(lambda m: bool(late) and m[0] is late[0]))

                async with anyio.create_task_group() as tasks:
                    await tasks.start(wait_for_late)
                    for mailbox in mailboxes[1:]:
                        await tasks.start(_never_matching, mailbox)
                    for peer in peers:
                        peer.start()
                    await until(
                        lambda: (
                            (
                                ios.statistics().global_pauses >= 1
                                and sum(_mailbox_bytes(m) for m in mailboxes) >= LIMIT // 2
                            )
                            or all(peer.finished.is_set() for peer in peers)
                        )
                    )
                    await _io_round_trip(ios)
                    queued = sum(_mailbox_bytes(m) for m in mailboxes)
                    stats = ios.statistics()
                    assert queued <= LIMIT, f"{queued} bytes in mailboxes under a {LIMIT} budget"
                    assert stats.peak_memory <= LIMIT, stats
                    assert not all(peer.finished.is_set() for peer in peers)
                    # A port of mailbox 0 whose message its owner waits for gets it.
                    late_peer = socket.create_connection(listener.local_address)
                    late.append(await _accept(listener))
                    late[0].set_owner(mailboxes[0])
                    late_peer.sendall(b"awaited")
                    await until(lambda: bool(got))
                    assert got == [(late[0], Data(b"awaited"))]
                    assert ios.statistics().peak_memory <= LIMIT
                    tasks.cancel_scope.cancel()
                with anyio.fail_after(30):
                    for port, mailbox, payload in zip(hogs, mailboxes, payloads, strict=True):
                        assert await _drain(mailbox, port) == payload
                assert ios.statistics().peak_memory <= LIMIT
                for port in [*hogs, *late]:
                    await port.aclose()
        finally:
            for mailbox in mailboxes:
                mailbox.close()
            for peer in peers:
                await peer.close()
            if late_peer is not None:
                late_peer.close()
    assert [peer.error for peer in peers] == [None] * len(peers)


async def test_a_cancelled_mailbox_receive_takes_nothing(
    no_leaks: None, core: str, io_backend: str | None
) -> None:
    """A receive that raises Cancelled took nothing: its message stays in the mailbox and
    stays charged to its port (and a receive woken and cancelled in the same tick loses
    nothing either).  Then each message is taken once, and its charge with it."""
    async with ioserver.open(core=core, io_backend=io_backend) as ios:
        listener = await ports.listen_tcp(ios, "127.0.0.1", 0, packet="line")
        mailbox = ports.Mailbox()
        peer = socket.create_connection(listener.local_address)
        try:
            async with listener:
                port = await _accept(listener)
            port.set_owner(mailbox)
            peer.sendall(b"one\ntwo\n")
            await until(lambda: len(mailbox) == 2)
            charged = port.statistics().bytes_buffered_in
            assert charged > 0
            with anyio.CancelScope() as scope:
                scope.cancel()
                await mailbox.receive()
            if sniffio.current_async_library() == "trio":
                # (On asyncio an operation that completes without waiting sees a
                # cancellation only every YIELD_EVERY-th time: ioserver._hub.)
                with anyio.CancelScope() as scope:
                    scope.cancel()
                    await ports.select(mailbox)
            assert len(mailbox) == 2
            assert port.statistics().bytes_buffered_in == charged

            # A selective receive woken by a message it does not match, then cancelled:
            # the message stays, charged.
            async def waiter() -> None:
                await mailbox.receive(lambda m: m[1] == Data(b"four\n"))

            async with anyio.create_task_group() as tasks:
                tasks.start_soon(waiter)
                await until(lambda: bool(mailbox._waiters))
                peer.sendall(b"three\n")
                await until(lambda: len(mailbox) == 3)
                tasks.cancel_scope.cancel()
            assert len(mailbox) == 3
            assert port.statistics().bytes_buffered_in > charged
            assert mailbox.receive_nowait()[1] == Data(b"one\n")
            assert (await ports.select(mailbox))[1] == (port, Data(b"two\n"))
            assert port.statistics().bytes_buffered_in > 0
            assert (await mailbox.receive())[1] == Data(b"three\n")
            assert port.statistics().bytes_buffered_in == 0
            await port.aclose()
        finally:
            mailbox.close()
            peer.close()


async def test_a_closed_mailbox_and_a_given_port_keep_the_counts_exact(
    no_leaks: None, core: str, io_backend: str | None
) -> None:
    """Entries moved to another mailbox with ``Actor.give`` stay charged until taken
    there; entries dropped by a mailbox's close are counted taken (the budget frees)."""
    async with ioserver.open(memory_limit=LIMIT, core=core, io_backend=io_backend) as ios:
        listener = await ports.listen_tcp(ios, "127.0.0.1", 0, packet=2)
        peer = socket.create_connection(listener.local_address)
        handed = anyio.Event()
        received: list[Any] = []
        try:

            async def first(actor: ports.Actor) -> None:
                try:
                    async with listener:
                        port = await _accept(listener)
                    actor.own(port)
                    peer.sendall(b"".join(len(w).to_bytes(2, "big") + w for w in (b"a", b"bb")))
                    await until(lambda: len(actor.mailbox) == 2)
                    assert port.statistics().bytes_buffered_in > 0
                    actor.give(port, second_actor)
                    assert len(actor.mailbox) == 0
                    assert port.statistics().bytes_buffered_in > 0  # still not taken
                finally:
                    handed.set()

            async def second(actor: ports.Actor) -> None:
                await handed.wait()
                for _ in range(2):
                    received.append(await actor.receive(timeout=10))
                port = received[0][0]
                assert port.statistics().bytes_buffered_in == 0
                peer.sendall(b"\x00\x03ccc")
                await until(lambda: len(actor.mailbox) == 1)
                assert port.statistics().bytes_buffered_in > 0
                assert ios.statistics().memory_in_use > 0
                actor.mailbox.close()  # drops the entry: counted taken
                assert port.statistics().bytes_buffered_in == 0

            with anyio.fail_after(30):
                async with ports.open_actor_system() as system:
                    second_actor = system.spawn(second)
                    first_actor = system.spawn(first)
            assert first_actor.reason is ports.ExitReason.NORMAL, first_actor.reason
            assert second_actor.reason is ports.ExitReason.NORMAL, second_actor.reason
            assert [message for _port, message in received] == [Data(b"a"), Data(b"bb")]
            await until(lambda: ios.statistics().memory_in_use == 0)
        finally:
            peer.close()


async def test_an_owned_udp_port_stops_at_its_message_watermark(
    no_leaks: None, core: str, io_backend: str | None
) -> None:
    """A UDP port's datagrams in its owner's mailbox count against its
    ``high_msgq_messages``: with an owner that does not receive, it stops reading above
    8 (the kernel keeps the rest); once the owner receives, all arrive, in order."""
    count = 100
    async with ioserver.open(core=core, io_backend=io_backend) as ios:
        server = await ports.open_udp(ios, high_msgq_messages=8)
        client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        mailbox = ports.Mailbox()
        try:
            server.set_owner(mailbox)
            for index in range(count):
                client.sendto(b"%04d" % index, server.local_address)
            await until(lambda: len(mailbox) >= 8)
            await _io_round_trip(ios)
            await _io_round_trip(ios)
            # (It pauses above the watermark: at 9.)
            assert len(mailbox) == 9, f"{len(mailbox)} datagrams in the mailbox, none taken"
            assert server.statistics().bytes_buffered_in == 9 * 4
            received = []
            with anyio.fail_after(15):
                while len(received) < count:
                    _source, message = await mailbox.receive()
                    received.append(message.data)
            assert received == [b"%04d" % index for index in range(count)]
            assert server.statistics().bytes_buffered_in == 0
            await server.aclose()
        finally:
            mailbox.close()
            client.close()


async def test_a_closed_port_s_messages_stay_charged_in_the_mailbox_until_taken(
    no_leaks: None, core: str, io_backend: str | None
) -> None:
    """Closing a port leaves its messages in the owner mailbox, charged; taking them
    releases exactly their charge (the budget is back at zero, not below)."""
    async with ioserver.open(memory_limit=LIMIT, core=core, io_backend=io_backend) as ios:
        listener = await ports.listen_tcp(ios, "127.0.0.1", 0, packet="line")
        mailbox = ports.Mailbox()
        peer = socket.create_connection(listener.local_address)
        try:
            async with listener:
                port = await _accept(listener)
            port.set_owner(mailbox)
            peer.sendall(b"x" * 1000 + b"\n" + b"y" * 2000 + b"\n")
            await until(lambda: len(mailbox) == 2)
            await port.aclose()
            await _io_round_trip(ios)
            assert ios.statistics().memory_in_use >= 3002
            assert mailbox.receive_nowait(lambda m: m[1].data[:1] == b"y")[1].data[:1] == b"y"
            assert mailbox.receive_nowait()[1].data[:1] == b"x"
            await until(lambda: ios.statistics().memory_in_use == 0)
            await _io_round_trip(ios)
            assert ios.statistics().memory_in_use == 0
        finally:
            mailbox.close()
            peer.close()


async def test_a_selective_receive_takes_back_each_message_s_own_charge(
    no_leaks: None, core: str, io_backend: str | None
) -> None:
    """Framed ports charge each packet its length plus ``PACKET_OVERHEAD``, popped in
    delivery order as the mailbox gets it: a selective receive that takes the packets
    of two ports out of order gives back exactly each one's charge."""
    from ioserver._framing import PACKET_OVERHEAD

    async with ioserver.open(core=core, io_backend=io_backend) as ios:
        listener = await ports.listen_tcp(ios, "127.0.0.1", 0, packet="line")
        mailbox = ports.Mailbox()
        peers = [socket.create_connection(listener.local_address) for _ in range(2)]
        try:
            async with listener:
                port_a, port_b = [await _accept(listener) for _ in peers]
            port_a.set_owner(mailbox)
            port_b.set_owner(mailbox)
            lines = {port_a: [b"a" * n + b"\n" for n in (10, 300, 5, 70)]}
            lines[port_b] = [b"b" * n + b"\n" for n in (2000, 1, 40)]
            for peer, port in zip(peers, (port_a, port_b), strict=True):
                peer.sendall(b"".join(lines[port]))
            await until(lambda: len(mailbox) == 7)

            def charged(port: ports.Port) -> int:
                return port.statistics().bytes_buffered_in

            for port in (port_a, port_b):
                assert charged(port) == sum(len(x) + PACKET_OVERHEAD for x in lines[port])
            # Out of order: the longest first, then the rest from the last.
            order = sorted(
                ((port, line) for port in lines for line in lines[port]), key=lambda p: -len(p[1])
            )
            for port, line in order:
                before = charged(port)
                source, message = mailbox.receive_nowait(
                    lambda m, port=port, line=line: m == (port, Data(line))
                )
                assert (source, message) == (port, Data(line))
                assert charged(port) == before - len(line) - PACKET_OVERHEAD
            assert charged(port_a) == charged(port_b) == 0
            await port_a.aclose()
            await port_b.aclose()
        finally:
            mailbox.close()
            for peer in peers:
                peer.close()


async def test_an_owned_zeromq_port_stops_at_its_message_watermark(
    no_leaks: None, core: str, io_backend: str | None
) -> None:
    """A ZeroMQ port's messages (each charged its frames' bytes, from the window's
    sizes) count against its ``high_msgq_messages`` in the owner mailbox too; once the
    owner receives, all arrive, in order."""
    count = 200
    async with ioserver.open(core=core, io_backend=io_backend) as ios:
        mailbox = ports.Mailbox()
        try:
            async with (
                await ports.open_zmq(
                    ios, "PULL", bind="inproc://charged", high_msgq_messages=8
                ) as pull,
                await ports.open_zmq(ios, "PUSH", connect="inproc://charged") as push,
            ):
                pull.set_owner(mailbox)
                for index in range(count):
                    await push.send(b"%04d" % index)
                await until(lambda: len(mailbox) >= 8)
                await _io_round_trip(ios)
                await _io_round_trip(ios)
                assert len(mailbox) <= 9 + 1, f"{len(mailbox)} messages in the mailbox"
                assert pull.statistics().bytes_buffered_in == 4 * len(mailbox)
                received = []
                with anyio.fail_after(15):
                    while len(received) < count:
                        _source, message = await mailbox.receive()
                        received.append(message.data)
                assert received == [[b"%04d" % index] for index in range(count)]
                assert pull.statistics().bytes_buffered_in == 0
        finally:
            mailbox.close()
