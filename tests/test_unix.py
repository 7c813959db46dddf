"""Unix stream sockets: the TCP port machinery on a path, and the socket file's lifecycle."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import anyio
import anyio.abc
import pytest
from conftest import until

import ioserver
import ports
from ports import Accepted, Closed, Data

pytestmark = pytest.mark.anyio


async def accept(listener: ports.Listener) -> ports.Port:
    with anyio.fail_after(5):
        message = await listener.receive()
    assert isinstance(message, Accepted), message
    return message.port


async def receive_exactly(port: ports.Port, size: int) -> bytes:
    data = b""
    with anyio.fail_after(5):
        while len(data) < size:
            message = await port.receive()
            assert isinstance(message, Data), message
            data += message.data
    return data


async def wait_released(listener: ports.Listener) -> None:
    """Wait until the I/O thread has closed the listener's socket and dealt with its file
    (aclose only asks it to)."""
    conn = listener._conn
    assert conn is not None
    sock = getattr(conn, "sock", None)
    with anyio.fail_after(5):
        if sock is None:
            # The native core: its thread marks the listener closed once the socket is
            # closed and its file dealt with.
            await until(lambda: bool(conn.closed))
            return
        # the I/O thread's
        await until(lambda: sock.fileno() == -1 and getattr(sock, "path", None) is None)


def leave_a_stale_socket_file(path: Path) -> None:
    """What a process that died while listening leaves behind: a socket file, no listener."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.close()
    assert path.is_socket()


async def test_a_unix_connection_is_a_framed_byte_stream_with_half_close(
    ios: ioserver.IOServer, tmp_path: Path
) -> None:
    path = tmp_path / "s.sock"
    async with await ports.listen_unix(ios, path, packet=4) as listener:
        assert listener.local_address == path.__fspath__()
        async with await ports.connect_unix(ios, path, packet=4) as client:
            server = await accept(listener)
            assert client.remote_address == str(path)
            await client.send(b"hello")
            await client.send(b"")
            with anyio.fail_after(5):
                assert await server.receive() == Data(b"hello")
                assert await server.receive() == Data(b"")
            await server.send(b"x" * 100_000)
            with anyio.fail_after(5):
                assert await client.receive() == Data(b"x" * 100_000)
            await client.send_eof()
            with anyio.fail_after(5):
                assert await server.receive() == Closed("eof")
            await server.send(b"after eof")  # the other direction still works
            with anyio.fail_after(5):
                assert await client.receive() == Data(b"after eof")
            await server.aclose()
            with anyio.fail_after(5):
                assert await client.receive() == Closed("eof")


async def test_plain_clients_talk_to_a_unix_listener(
    ios: ioserver.IOServer, tmp_path: Path
) -> None:
    path = tmp_path / "plain.sock"
    async with (
        await ports.listen_unix(ios, str(path), packet="line") as listener,
        await anyio.connect_unix(path) as client,
    ):
        server = await accept(listener)
        await client.send(b"one\ntwo\n")
        with anyio.fail_after(5):
            assert await server.receive() == Data(b"one\n")
            assert await server.receive() == Data(b"two\n")
        await server.send(b"three")
        with anyio.fail_after(5):
            assert await client.receive() == b"three\n"
        await server.aclose()


@pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="the abstract namespace is Linux's"
)
async def test_the_abstract_namespace_needs_no_file(ios: ioserver.IOServer) -> None:
    name = f"\0ioserver-test-{os.getpid()}-{id(ios)}"
    async with await ports.listen_unix(ios, name) as listener:
        async with await ports.connect_unix(ios, name) as client:
            server = await accept(listener)
            await client.send(b"abstract")
            assert await receive_exactly(server, 8) == b"abstract"
            await server.aclose()
        with pytest.raises(ports.ConnectError, match="EADDRINUSE"):
            await ports.listen_unix(ios, name)


async def test_a_stale_socket_file_is_replaced(ios: ioserver.IOServer, tmp_path: Path) -> None:
    path = tmp_path / "stale.sock"
    leave_a_stale_socket_file(path)
    with pytest.raises(ports.ConnectError, match="ECONNREFUSED"):
        await ports.connect_unix(ios, path)
    async with (
        await ports.listen_unix(ios, path) as listener,
        await ports.connect_unix(ios, path) as client,
    ):
        server = await accept(listener)
        await client.send(b"fresh")
        assert await receive_exactly(server, 5) == b"fresh"
        await server.aclose()
    await wait_released(listener)
    assert not path.exists()


async def test_a_live_socket_is_in_use_and_keeps_working(
    ios: ioserver.IOServer, tmp_path: Path
) -> None:
    path = tmp_path / "live.sock"
    async with await ports.listen_unix(ios, path) as listener:
        with pytest.raises(ports.ConnectError, match="EADDRINUSE") as caught:
            await ports.listen_unix(ios, path)
        assert caught.value.errno_name == "EADDRINUSE"
        assert path.is_socket()
        async with await ports.connect_unix(ios, path) as client:
            server = await accept(listener)
            await client.send(b"still here")
            assert await receive_exactly(server, 10) == b"still here"
            await server.aclose()


async def test_a_file_that_is_not_a_socket_is_never_removed(
    ios: ioserver.IOServer, tmp_path: Path
) -> None:
    path = tmp_path / "precious.txt"
    path.write_bytes(b"keep me")
    with pytest.raises(ports.ConnectError, match="EADDRINUSE"):
        await ports.listen_unix(ios, path)
    assert path.read_bytes() == b"keep me"


async def test_the_socket_file_goes_when_the_server_stops(no_leaks: None, tmp_path: Path) -> None:
    path = tmp_path / "unclosed.sock"
    async with ioserver.open() as ios:
        listener = await ports.listen_unix(ios, path)
        assert path.is_socket()
    assert not path.exists()
    assert [message async for message in listener] == [Closed("ioserver closed", "ESHUTDOWN")]


async def test_a_replaced_socket_file_is_not_removed_by_the_old_listener(
    ios: ioserver.IOServer, tmp_path: Path
) -> None:
    path = tmp_path / "replaced.sock"
    listener = await ports.listen_unix(ios, path)
    path.unlink()
    path.write_bytes(b"someone else's")
    await listener.aclose()
    await wait_released(listener)
    assert path.read_bytes() == b"someone else's"


async def test_a_unix_peer_that_floods_is_paused_until_the_owner_drains(
    ios: ioserver.IOServer, tmp_path: Path
) -> None:
    path = tmp_path / "flood.sock"
    chunk = b"f" * 65536
    total = 40 * len(chunk)
    async with (
        await ports.listen_unix(
            ios, path, high_msgq_watermark=64 * 1024, low_msgq_watermark=16 * 1024
        ) as listener,
        await anyio.connect_unix(path) as client,
        anyio.create_task_group() as task_group,
    ):
        server = await accept(listener)

        async def flood() -> None:
            for _ in range(total // len(chunk)):
                await client.send(chunk)

        task_group.start_soon(flood)
        await until(lambda: server.statistics().pauses > 0, 10)  # the I/O thread's state
        assert server.statistics().bytes_buffered_in <= 64 * 1024 + 65536
        assert len(await receive_exactly(server, total)) == total
        await server.aclose()


async def test_connecting_to_nothing_and_wrong_arguments(
    ios: ioserver.IOServer, tmp_path: Path
) -> None:
    with pytest.raises(ports.ConnectError, match="ENOENT") as caught:
        await ports.connect_unix(ios, tmp_path / "missing.sock")
    assert caught.value.errno_name == "ENOENT"
    with pytest.raises(ports.ConnectError, match="ENOENT"):
        await ports.listen_unix(ios, tmp_path / "no-such-dir" / "s.sock")
    with pytest.raises(ports.OptionError, match="limit is 107"):
        await ports.connect_unix(ios, "/tmp/" + "x" * 200)
    with pytest.raises(ports.OptionError, match="nodelay"):
        await ports.connect_unix(ios, tmp_path / "s.sock", nodelay=True)
    with pytest.raises(ports.OptionError, match="path"):
        await ports.listen_unix(ios, 42)  # type: ignore[arg-type]
