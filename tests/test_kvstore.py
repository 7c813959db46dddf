"""examples/kvstore.py: a Redis-protocol store, driven over real sockets and by redis-cli."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.abc
import pytest
from test_examples import load_example

import ioserver
from ioserver._framing import encode_resp

kvstore = load_example("kvstore")


def command(*arguments: bytes | str) -> bytes:
    return encode_resp([a.encode() if isinstance(a, str) else a for a in arguments])


@asynccontextmanager
async def serving(ios: ioserver.IOServer) -> AsyncIterator[tuple[str, int]]:
    async with anyio.create_task_group() as task_group:
        address = await task_group.start(kvstore.serve, ios, "127.0.0.1", 0)
        yield address[0], address[1]
        task_group.cancel_scope.cancel()


async def receive_exactly(stream: anyio.abc.ByteReceiveStream, size: int) -> bytes:
    data = b""
    with anyio.fail_after(10):
        while len(data) < size:
            data += await stream.receive()
    return data


async def exchange(address: tuple[str, int], request: bytes, expected: bytes) -> None:
    async with await anyio.connect_tcp(*address) as client:
        await client.send(request)
        assert await receive_exactly(client, len(expected)) == expected


CONVERSATION: list[tuple[tuple[Any, ...], bytes]] = [
    (("PING",), b"+PONG\r\n"),
    (("ping", "hello"), b"$5\r\nhello\r\n"),
    (("ECHO", b"\x00\r\n"), b"$3\r\n\x00\r\n\r\n"),
    (("GET", "missing"), b"$-1\r\n"),
    (("SET", "k", "v"), b"+OK\r\n"),
    (("GET", "k"), b"$1\r\nv\r\n"),
    (("SET", "k", "w", "NX"), b"$-1\r\n"),
    (("SET", "new", "w", "XX"), b"$-1\r\n"),
    (("SET", "k", "w", "XX"), b"+OK\r\n"),
    (("SET", "k", "w", "NX", "XX"), b"-ERR syntax error\r\n"),
    (("SET", "k", "w", "EX", "ten"), b"-ERR value is not an integer or out of range\r\n"),
    (("SET", "k", "w", "EX", "0"), b"-ERR invalid expire time in 'set' command\r\n"),
    (("EXISTS", "k", "k", "missing"), b":2\r\n"),
    (("INCR", "counter"), b":1\r\n"),
    (("INCR", "counter"), b":2\r\n"),
    (("INCR", "k"), b"-ERR value is not an integer or out of range\r\n"),
    (("SET", "big", "9223372036854775807"), b"+OK\r\n"),
    (("INCR", "big"), b"-ERR increment or decrement would overflow\r\n"),
    (("MSET", "a", "1", "b", "2"), b"+OK\r\n"),
    (("MSET", "a", "1", "b"), b"-ERR wrong number of arguments for 'mset' command\r\n"),
    (("MGET", "a", "missing", "b"), b"*3\r\n$1\r\n1\r\n$-1\r\n$1\r\n2\r\n"),
    (("DBSIZE",), b":5\r\n"),
    (("DEL", "a", "b", "missing"), b":2\r\n"),
    (("GET",), b"-ERR wrong number of arguments for 'get' command\r\n"),
    (("get", "a", "b"), b"-ERR wrong number of arguments for 'get' command\r\n"),
    (("NOPE", "x"), b"-ERR unknown command 'NOPE', with args beginning with: 'x'\r\n"),
    (("COMMAND", "DOCS"), b"*0\r\n"),
    (("COMMAND", "COUNT"), b":%d\r\n" % len(kvstore.COMMANDS)),
    (("COMMAND", "INFO", "get", "nope"), encode_resp([kvstore.command_info(b"get"), None])),
    (("FLUSHDB",), b"+OK\r\n"),
    (("DBSIZE",), b":0\r\n"),
]


@pytest.mark.anyio
async def test_a_pipelined_conversation_is_answered_in_order_with_redis_replies(
    ios: ioserver.IOServer,
) -> None:
    request = b"".join(command(*arguments) for arguments, _ in CONVERSATION)
    expected = b"".join(reply for _, reply in CONVERSATION)
    async with serving(ios) as address:
        await exchange(address, request, expected)


@pytest.mark.anyio
async def test_a_pipeline_in_tiny_pieces_gets_every_reply(ios: ioserver.IOServer) -> None:
    request = b"".join(
        command("SET", f"key{i}", str(i)) + command("GET", f"key{i}") for i in range(200)
    )
    expected = b"".join(b"+OK\r\n" + encode_resp(str(i).encode()) for i in range(200))
    async with serving(ios) as address, await anyio.connect_tcp(*address) as client:
        for start in range(0, len(request), 7):
            await client.send(request[start : start + 7])
        assert await receive_exactly(client, len(expected)) == expected


@pytest.mark.anyio
async def test_inline_commands(ios: ioserver.IOServer) -> None:
    async with serving(ios) as address:
        await exchange(address, b"PING\r\nSET x 5\nINCR x\r\n", b"+PONG\r\n+OK\r\n:6\r\n")


@pytest.mark.anyio
async def test_keys_expire_on_access_and_by_the_sweep(ios: ioserver.IOServer) -> None:
    async with serving(ios) as address, await anyio.connect_tcp(*address) as client:
        await client.send(
            command("SET", "short", "1", "PX", "20")
            + command("SET", "unread", "1", "PX", "20")
            + command("SET", "kept", "1", "EX", "100")
        )
        assert await receive_exactly(client, 15) == b"+OK\r\n" * 3
        with anyio.fail_after(5):
            while True:  # a deadline is time: poll until it has passed
                await client.send(command("GET", "short"))
                if await receive_exactly(client, 5) == b"$-1\r\n":
                    break
                await anyio.sleep(0.01)
            while True:  # "unread" is never read: the sweep must remove it
                await client.send(command("DBSIZE"))
                if await receive_exactly(client, 4) == b":1\r\n":
                    break
                await anyio.sleep(0.02)
        await client.send(command("GET", "kept"))
        assert await receive_exactly(client, 7) == b"$1\r\n1\r\n"


@pytest.mark.anyio
async def test_malformed_resp_gets_an_error_and_closes_that_connection_alone(
    ios: ioserver.IOServer,
) -> None:
    async with serving(ios) as address, await anyio.connect_tcp(*address) as bystander:
        await bystander.send(command("SET", "k", "v"))
        assert await receive_exactly(bystander, 5) == b"+OK\r\n"
        async with await anyio.connect_tcp(*address) as client:
            await client.send(command("PING") + b"*1\r\n$x\r\n" + command("PING"))
            expected = b"+PONG\r\n-ERR Protocol error: invalid bulk length\r\n"
            assert await receive_exactly(client, len(expected)) == expected
            with anyio.fail_after(5), pytest.raises(anyio.EndOfStream):
                await client.receive()  # closed after the error reply
        await bystander.send(command("GET", "k"))
        assert await receive_exactly(bystander, 7) == b"$1\r\nv\r\n"


@pytest.mark.anyio
async def test_quit_answers_then_closes(ios: ioserver.IOServer) -> None:
    async with serving(ios) as address, await anyio.connect_tcp(*address) as client:
        await client.send(command("QUIT") + command("PING"))
        assert await receive_exactly(client, 5) == b"+OK\r\n"
        with anyio.fail_after(5), pytest.raises(anyio.EndOfStream):
            await client.receive()


def redis_cli() -> str:
    path = shutil.which("redis-cli")
    if path is None:
        pytest.skip("redis-cli is not installed: apt-get install redis-tools")
    return path


@pytest.mark.anyio
async def test_redis_cli_talks_to_it(ios: ioserver.IOServer) -> None:
    cli = redis_cli()
    async with serving(ios) as (host, number):
        base = [cli, "-h", host, "-p", str(number)]

        async def run(*arguments: str) -> str:
            with anyio.fail_after(20):
                result = await anyio.run_process([*base, *arguments], stderr=subprocess.STDOUT)
            return result.stdout.decode()

        assert await run("PING") == "PONG\n"
        assert await run("SET", "greeting", "hello world", "EX", "60") == "OK\n"
        assert await run("GET", "greeting") == "hello world\n"
        assert await run("INCR", "n") == "1\n"
        assert await run("MGET", "greeting", "n", "none") == "hello world\n1\n\n"
        assert "unknown command 'BOGUS'" in await run("BOGUS")
        # Interactive mode asks COMMAND DOCS first; commands go through stdin.
        with anyio.fail_after(20):
            result = await anyio.run_process(base, input=b"get n\nincr n\n")
        assert result.stdout.decode().split() == ["1", "2"]


@pytest.mark.anyio
async def test_a_command_over_the_packet_size_is_refused_at_its_header(
    ios: ioserver.IOServer,
) -> None:
    # A bulk string that claims 2 MiB (the default packet size is 1 MiB) is refused when
    # its header arrives, before its bytes are sent, and only that connection ends.
    async with serving(ios) as address, await anyio.connect_tcp(*address) as bystander:
        async with await anyio.connect_tcp(*address) as client:
            await client.send(b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$%d\r\n" % (2 << 20))
            reply = b""
            with anyio.fail_after(5):
                try:
                    while True:
                        reply += await client.receive()
                except anyio.EndOfStream:
                    pass
            assert reply.startswith(b"-ERR Protocol error: ")
            assert str(kvstore.PACKET_SIZE).encode() in reply
        await bystander.send(command("PING"))
        assert await receive_exactly(bystander, 7) == b"+PONG\r\n"
