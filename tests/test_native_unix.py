"""Unix stream ports on the native core's own thread (issue 14), against real sockets.

The native I/O thread carries a Unix stream port as it carries a TCP one (its socket is
either: ``native/src/sock.rs``).  The first test proves the port is the native thread's
(a native ``Conn``, counted by the native core, read through io_uring on that backend);
the ``every_core`` ones hold it to the Python core's behaviour: the addresses it exposes,
a peer that resets mid-packet, a flood through ``memory_limit``, a slow reader against
the send watermarks.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import anyio
import pytest
from conftest import until

import ioserver
import ports
from ioserver import _native
from ioserver._native_core import NativeWindow
from ports import Accepted, Closed, Data

pytestmark = pytest.mark.anyio

LIMIT = 1 << 20  # bytes: the memory_limit of the flood test


async def accept(listener: ports.Listener) -> ports.Port:
    with anyio.fail_after(5):
        message = await listener.receive()
    assert isinstance(message, Accepted), message
    return message.port


async def receive_exactly(port: ports.Port, size: int) -> bytes:
    chunks = []
    got = 0
    with anyio.fail_after(10):
        while got < size:
            message = await port.receive()
            assert isinstance(message, Data), message
            chunks.append(message.data)
            got += len(message.data)
    return b"".join(chunks)


async def test_unix_ports_are_carried_by_the_native_thread(no_leaks: None, tmp_path: Path) -> None:
    """A Unix listener, the port it accepts and a connected port are the native thread's
    own (native ``Conn``s and windows, counted in its ``ports_open``), not the hosted
    half's; their bytes are the native thread's (``bytes_in``), and on the io_uring
    backend they go through the ring."""
    path = tmp_path / "native.sock"
    async with ioserver.open(core="native") as ios:
        core = ios._io._core  # type: ignore[attr-defined]
        async with (
            await ports.listen_unix(ios, path, packet=2) as listener,
            await ports.connect_unix(ios, path, packet=2) as client,
        ):
            server = await accept(listener)
            for port in (listener, client, server):
                assert type(port._conn) is _native.Conn
            for port in (client, server):
                assert isinstance(port._window, NativeWindow)
            assert core.ports_open == 3
            assert core.listeners_open == 1
            submissions, native_in = core.uring_submissions, core.bytes_in
            payload = os.urandom(30_000)
            await client.send(payload)
            assert await receive_exactly(server, len(payload)) == payload
            await server.send(b"back")
            assert await receive_exactly(client, 4) == b"back"
            assert core.bytes_in - native_in == len(payload) + 4 + 2 * 2
            if ios._io.io_backend == "io_uring":  # type: ignore[attr-defined]
                assert core.uring_submissions > submissions
            await server.aclose()
        await until(lambda: core.ports_open == 0)
        assert not path.exists()


@pytest.mark.every_core
async def test_unix_addresses_are_the_python_cores(ios: ioserver.IOServer, tmp_path: Path) -> None:
    """Each port exposes the addresses the Python core's sockets give: a listener and the
    ports it accepts the path as the owner gave it (``str`` or ``bytes``), a connected
    port ``""`` (it did not bind) and the path as the kernel reports it (a ``str``); an
    unnamed peer ``""``; a name in the abstract namespace ``bytes``."""
    for given in (str(tmp_path / "str.sock"), os.fsencode(tmp_path / "bytes.sock")):
        async with await ports.listen_unix(ios, given) as listener:
            assert listener.local_address == given
            async with await ports.connect_unix(ios, given) as client:
                server = await accept(listener)
                assert client.local_address == ""
                assert client.remote_address == os.fsdecode(given)
                assert server.local_address == given
                assert server.remote_address == ""
                await server.aclose()
    if sys.platform.startswith("linux"):
        name = f"\0ioserver-native-unix-{os.getpid()}-{id(ios)}"
        async with (
            await ports.listen_unix(ios, name) as listener,
            await ports.connect_unix(ios, name) as client,
        ):
            server = await accept(listener)
            assert client.remote_address == os.fsencode(name)
            assert server.local_address == name
            await server.aclose()


@pytest.mark.every_core
async def test_a_unix_peer_that_resets_mid_packet_closes_only_its_port(
    ios: ioserver.IOServer, tmp_path: Path
) -> None:
    """A peer sends half a 4-byte-header packet, then closes with our bytes unread (a
    Unix socket's reset: the port's next read fails ``ECONNRESET``).  The owner gets the
    ``Closed`` and no partial packet; the port's memory is released, and another port of
    the same listener goes on."""
    path = str(tmp_path / "reset.sock")
    async with await ports.listen_unix(ios, path, packet=4) as listener:
        with socket.socket(socket.AF_UNIX) as rude, socket.socket(socket.AF_UNIX) as fine:
            rude.connect(path)
            victim = await accept(listener)
            fine.connect(path)
            other = await accept(listener)
            await victim.send(b"unread")  # queued in the peer's socket, never read
            await until(lambda: victim.statistics().bytes_sent >= 4 + 6, 5)
            rude.sendall((1000).to_bytes(4, "big") + b"only part")
            rude.close()
            with anyio.fail_after(5):
                message = await victim.receive()
            assert message == Closed("ECONNRESET", "ECONNRESET"), message
            fine.sendall((3).to_bytes(4, "big") + b"yes")
            with anyio.fail_after(5):
                assert await other.receive() == Data(b"yes")
            await other.aclose()
    await until(lambda: ios.statistics().memory_in_use == 0)


@pytest.mark.every_core
async def test_a_flood_of_unix_peers_stays_within_memory_limit(
    no_leaks: None, core: str, tmp_path: Path
) -> None:
    """16 Unix peers send 4 MiB together through a 1 MiB budget while no owner reads: the
    input charged never passes the limit, the reads pause, and once the owners read,
    every byte arrives in order."""
    each = 256 << 10
    path = str(tmp_path / "flood.sock")
    unbound = {"high_msgq_watermark": 64 << 20, "low_msgq_watermark": 32 << 20}

    async def flood(index: int) -> None:
        async with await anyio.connect_unix(path) as stream:
            await stream.send(bytes([65 + index]) * each)
            await stream.send_eof()
            with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                await stream.receive()

    async with ioserver.open(memory_limit=LIMIT, core=core) as ios:
        async with (
            await ports.listen_unix(ios, path, **unbound) as listener,  # type: ignore[arg-type]
            anyio.create_task_group() as peers,
        ):
            owners = []
            for index in range(16):
                peers.start_soon(flood, index)
                owners.append(await accept(listener))
            await until(lambda: ios.statistics().global_pauses >= 1)
            assert ios.statistics().memory_in_use <= LIMIT

            async def drain(port: ports.Port) -> None:
                received = bytearray()
                async with port:
                    while not isinstance(message := await port.receive(), Closed):
                        assert isinstance(message, Data)
                        received += message.data
                    assert message == Closed("eof")
                assert len(received) == each
                assert received == received[:1] * each

            with anyio.fail_after(30):
                async with anyio.create_task_group() as readers:
                    for port in owners:
                        readers.start_soon(drain, port)
        statistics = ios.statistics()
        assert statistics.peak_memory <= LIMIT, statistics
        assert statistics.memory_in_use == 0, statistics


@pytest.mark.every_core
async def test_a_slow_unix_reader_blocks_the_sender_at_the_high_watermark(
    ios: ioserver.IOServer, tmp_path: Path
) -> None:
    """A peer that does not read: the port's sends block once its output queued and not
    written passes ``high_watermark`` (what is queued stays within it and a send), and go
    on when the peer reads it below ``low_watermark``; every byte arrives, in order."""
    high, low, chunk = 64 << 10, 16 << 10, 16 << 10
    path = str(tmp_path / "slow.sock")
    payload = os.urandom(4 << 20)
    async with await ports.listen_unix(
        ios, path, high_watermark=high, low_watermark=low
    ) as listener:
        with socket.socket(socket.AF_UNIX) as peer:
            peer.connect(path)
            port = await accept(listener)
            sent = 0
            blocked = anyio.Event()

            async def send_all() -> None:
                nonlocal sent
                for offset in range(0, len(payload), chunk):
                    if port.busy:
                        blocked.set()
                    await port.send(payload[offset : offset + chunk])
                    sent += chunk
                    queued = port.statistics().bytes_buffered_out
                    assert queued <= high + chunk, queued

            def read_all() -> bytes:
                received = bytearray()
                while len(received) < len(payload):
                    received += peer.recv(1 << 20)
                return bytes(received)

            async with anyio.create_task_group() as group:
                group.start_soon(send_all)
                with anyio.fail_after(10):
                    await blocked.wait()
                assert sent < len(payload)
                with anyio.fail_after(30):
                    received = await anyio.to_thread.run_sync(read_all)
            assert received == payload
            await port.aclose()


@pytest.mark.every_core
async def test_connecting_to_a_unix_listener_with_a_full_backlog_fails_at_once(
    ios: ioserver.IOServer, tmp_path: Path
) -> None:
    """A Unix connect is done at once or fails: ``EAGAIN`` when the listener's backlog is
    full.  The Python core once took it for a connect in progress and waited on a socket
    that never becomes ready (the request hung; then an internal error)."""
    path = str(tmp_path / "full.sock")
    with socket.socket(socket.AF_UNIX) as listening:
        listening.bind(path)
        listening.listen(0)  # one connection waits; the next finds the backlog full
        async with await ports.connect_unix(ios, path):
            with anyio.fail_after(5), pytest.raises(ports.ConnectError) as caught:
                await ports.connect_unix(ios, path)
            assert caught.value.errno_name == "EAGAIN"
    assert ios.statistics().internal_errors == 0


async def test_a_unix_port_that_decodes_objects_is_native_too(
    no_leaks: None, tmp_path: Path
) -> None:
    """msgpack is framed by the native thread on a Unix port as on TCP (the loop's drain
    decodes each object), and works as on the Python core."""
    pytest.importorskip("msgpack")
    path = tmp_path / "objects.sock"
    async with ioserver.open(core="native") as ios:
        async with (
            await ports.listen_unix(ios, path, packet="msgpack") as listener,
            await ports.connect_unix(ios, path, packet="msgpack") as client,
        ):
            server = await accept(listener)
            for port in (listener, client, server):
                assert type(port._conn) is _native.Conn
            await client.send({"hello": [1, 2]})
            with anyio.fail_after(5):
                assert await server.receive() == Data({"hello": [1, 2]})
            await server.aclose()
        await until(lambda: not path.exists())  # the listener's close is the I/O thread's
