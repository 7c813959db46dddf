"""examples/kvstore.py: a Redis-protocol store, driven over real sockets and by redis-cli."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
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


WRONG_TYPE = b"-WRONGTYPE Operation against a key holding the wrong kind of value\r\n"

# Redis 7.0's own replies, compared byte for byte with redis-server 7.0.15 when written.
KEYSPACE_CONVERSATION: list[tuple[tuple[Any, ...], bytes]] = [
    (("MSET", "hello", "1", "hallo", "1", "hxllo", "1", "hllo", "1", "h*llo", "1"), b"+OK\r\n"),
    (("KEYS", "h[ae]llo"), None),  # order: see the test
    (("KEYS", "nomatch*"), b"*0\r\n"),
    (("KEYS", "h\\*llo"), b"*1\r\n$5\r\nh*llo\r\n"),
    (("KEYS", "h[b-a]llo"), b"*1\r\n$5\r\nhallo\r\n"),  # a reversed range is swapped
    (("KEYS", "hl?o"), b"*1\r\n$4\r\nhllo\r\n"),
    (("KEYS", "hl?"), b"*0\r\n"),
    (("KEYS",), b"-ERR wrong number of arguments for 'keys' command\r\n"),
    (("TTL", "hello"), b":-1\r\n"),
    (("TTL", "missing"), b":-2\r\n"),
    (("PTTL", "missing"), b":-2\r\n"),
    (("EXPIRE", "hello", "100"), b":1\r\n"),
    (("TTL", "hello"), b":100\r\n"),
    (("EXPIRE", "hello", "200", "NX"), b":0\r\n"),
    (("EXPIRE", "hello", "200", "XX"), b":1\r\n"),
    (("EXPIRE", "hello", "50", "GT"), b":0\r\n"),
    (("EXPIRE", "hello", "50", "LT"), b":1\r\n"),
    (("TTL", "hello"), b":50\r\n"),
    (("EXPIRE", "hallo", "50", "GT"), b":0\r\n"),  # no TTL counts as infinite
    (("EXPIRE", "hallo", "50", "XX"), b":0\r\n"),
    (("EXPIRE", "missing", "50"), b":0\r\n"),
    (
        ("EXPIRE", "hello", "1", "NX", "XX"),
        b"-ERR NX and XX, GT or LT options at the same time are not compatible\r\n",
    ),
    (
        ("EXPIRE", "hello", "1", "GT", "LT"),
        b"-ERR GT and LT options at the same time are not compatible\r\n",
    ),
    (("EXPIRE", "hello", "1", "FOO"), b"-ERR Unsupported option FOO\r\n"),
    (("EXPIRE", "hello", "ten"), b"-ERR value is not an integer or out of range\r\n"),
    (("EXPIRE", "hello", "99999999999999999"), b"-ERR invalid expire time in 'expire' command\r\n"),
    (("PERSIST", "hello"), b":1\r\n"),
    (("PERSIST", "hello"), b":0\r\n"),
    (("TTL", "hello"), b":-1\r\n"),
    (("PEXPIRE", "hello", "100000"), b":1\r\n"),
    (("EXPIRE", "hllo", "-1"), b":1\r\n"),  # a time in the past deletes the key
    (("EXISTS", "hllo"), b":0\r\n"),
    (("EXPIREAT", "hxllo", "1"), b":1\r\n"),
    (("TYPE", "hxllo"), b"+none\r\n"),
    (("INCRBY", "n", "5"), b":5\r\n"),
    (("DECRBY", "n", "3"), b":2\r\n"),
    (("DECR", "n"), b":1\r\n"),
    (("INCRBY", "n", "x"), b"-ERR value is not an integer or out of range\r\n"),
    (("DECRBY", "n", "-9223372036854775808"), b"-ERR decrement would overflow\r\n"),
    (("SET", "m", "-9223372036854775800"), b"+OK\r\n"),
    (("DECRBY", "m", "100"), b"-ERR increment or decrement would overflow\r\n"),
    (("TYPE", "n"), b"+string\r\n"),
    (("TYPE", "missing"), b"+none\r\n"),
    (("LPUSH", "l", "a", "b", "c"), b":3\r\n"),
    (("RPUSH", "l", "z"), b":4\r\n"),
    (("TYPE", "l"), b"+list\r\n"),
    (("LLEN", "l"), b":4\r\n"),
    (("LRANGE", "l", "0", "-1"), b"*4\r\n$1\r\nc\r\n$1\r\nb\r\n$1\r\na\r\n$1\r\nz\r\n"),
    (("LRANGE", "l", "-2", "100"), b"*2\r\n$1\r\na\r\n$1\r\nz\r\n"),
    (("GET", "l"), WRONG_TYPE),
    (("INCR", "l"), WRONG_TYPE),
    (
        ("LPUSH", "n", "x"),
        b"-WRONGTYPE Operation against a key holding the wrong kind of value\r\n",
    ),
    (("MGET", "l", "n"), b"*2\r\n$-1\r\n$1\r\n1\r\n"),
    (("LPOP", "l"), b"$1\r\nc\r\n"),
    (("RPOP", "l"), b"$1\r\nz\r\n"),
    (("LPOP", "l", "5"), b"*2\r\n$1\r\nb\r\n$1\r\na\r\n"),
    (("EXISTS", "l"), b":0\r\n"),  # an emptied list is gone
    (("LPOP", "l"), b"$-1\r\n"),
    (("LPOP", "l", "2"), b"*-1\r\n"),
    (("LPOP", "n", "-1"), b"-ERR value is out of range, must be positive\r\n"),
    (("SCAN", "x"), b"-ERR invalid cursor\r\n"),
    (("SCAN", "0", "COUNT", "0"), b"-ERR syntax error\r\n"),
    (("SCAN", "0", "COUNT"), b"-ERR syntax error\r\n"),
    (("DBSIZE",), b":5\r\n"),
    (("FLUSHALL", "ASYNC"), b"+OK\r\n"),
    (("DBSIZE",), b":0\r\n"),
    (("SCAN", "0"), b"*2\r\n$1\r\n0\r\n*0\r\n"),
]


@pytest.mark.anyio
async def test_keyspace_ttl_counter_and_list_commands_answer_as_redis(
    ios: ioserver.IOServer,
) -> None:
    async with serving(ios) as address, await anyio.connect_tcp(*address) as client:
        for arguments, expected in KEYSPACE_CONVERSATION:
            await client.send(command(*arguments))
            if expected is None:  # KEYS: Redis's order is its hash table's
                expected = b"*2\r\n$5\r\nhello\r\n$5\r\nhallo\r\n"
                reply = await receive_exactly(client, len(expected))
                assert sorted(reply.split(b"\r\n")) == sorted(expected.split(b"\r\n"))
                continue
            reply = await receive_exactly(client, len(expected))
            assert reply == expected, arguments


@pytest.mark.anyio
async def test_expire_and_pexpire_take_effect_on_access_and_by_the_sweep(
    ios: ioserver.IOServer,
) -> None:
    store = kvstore.Store()
    async with anyio.create_task_group() as task_group:
        address = await task_group.start(
            lambda task_status: kvstore.serve(
                ios, "127.0.0.1", 0, store=store, task_status=task_status
            )
        )
        async with await anyio.connect_tcp(*address[:2]) as client:
            await client.send(command("MSET", "read", "1", "unread", "1", "kept", "1"))
            await client.send(command("PEXPIRE", "read", "20") + command("PEXPIRE", "unread", "20"))
            assert await receive_exactly(client, 13) == b"+OK\r\n:1\r\n:1\r\n"
            with anyio.fail_after(5):
                while True:  # a deadline is time: poll until it has passed
                    await client.send(command("PTTL", "read"))
                    reply = b""
                    while not reply.endswith(b"\r\n"):  # one integer reply
                        reply += await client.receive()
                    if reply == b":-2\r\n":
                        break
                    assert 0 <= int(reply[1:-2]) <= 20
                    await anyio.sleep(0.01)
                while len(store.values) != 1:  # noqa: ASYNC110 - "unread": the sweep's
                    await anyio.sleep(0.02)
            assert list(store.values) == [b"kept"]
            assert store.expired_keys == 2
            await client.send(command("INFO", "stats"))
            expected = kvstore.command_server_info(store, [b"INFO", b"stats"])
            reply = await receive_exactly(client, len(expected))
            assert b"expired_keys:2\r\n" in reply
        task_group.cancel_scope.cancel()


def test_scan_returns_every_key_present_throughout_while_keys_come_and_go() -> None:
    store = kvstore.Store()
    for number in range(3000):
        store.set(b"key:%d" % number, b"v", None)
    seen: list[bytes] = []
    cursor, rounds, created = 0, 0, 0
    while True:
        reply = kvstore.command_scan(store, [b"SCAN", b"%d" % cursor, b"COUNT", b"100"])
        # *2 $cursor *n keys: parse it back
        parts = reply.split(b"\r\n")
        cursor = int(parts[2])
        seen += [part for part in parts[5::2] if part]
        rounds += 1
        # Meanwhile: delete old keys (some returned, some not yet), add new ones and
        # delete those of the round before - so the scan order is compacted midway.
        for number in range(rounds * 100, rounds * 100 + 60):
            store.delete(b"key:%d" % number)
        for number in range(created - 30, created):
            store.delete(b"new:%d" % number)
        for _ in range(30):
            store.set(b"new:%d" % created, b"v", None)
            created += 1
        if cursor == 0:
            break
    present_throughout = {b"key:%d" % number for number in range(3000)} - {
        b"key:%d" % number
        for rounds_done in range(1, rounds + 1)
        for number in range(rounds_done * 100, rounds_done * 100 + 60)
    }
    assert len(store._order_keys) < 3000 + created  # compacted
    assert present_throughout <= set(seen)
    assert len(seen) == len(set(seen))  # no key returned twice
    # MATCH and TYPE filter what COUNT looked at; COUNT is how many to look at.
    store.flush()
    store.set(b"a:1", b"v", None)
    store.set(b"b:1", b"v", None)
    kvstore.command_lpush(store, [b"LPUSH", b"a:list", b"x"])
    reply = kvstore.command_scan(store, [b"SCAN", b"0", b"MATCH", b"a:*", b"TYPE", b"list"])
    assert reply == b"*2\r\n$1\r\n0\r\n*1\r\n$6\r\na:list\r\n"


def test_glob_patterns_follow_redis() -> None:
    cases = [
        (b"h?llo", b"hello", True), (b"h?llo", b"hllo", False), (b"h*llo", b"hllo", True),
        (b"h*llo", b"heeeello", True), (b"h[ae]llo", b"hallo", True),
        (b"h[ae]llo", b"hillo", False), (b"h[^e]llo", b"hallo", True),
        (b"h[^e]llo", b"hello", False), (b"h[a-b]llo", b"hbllo", True),
        (b"h\\*llo", b"h*llo", True), (b"h\\*llo", b"hello", False),
        (b"*", b"any\nthing", True), (b"a.c", b"abc", False), (b"[\\]]", b"]", True),
        (b"*a*b*", b"xaxbx", True), (b"*a*b*", b"xbxax", False), (b"a*", b"a", True),
        (b"*a", b"ba", True), (b"a*a", b"a", False), (b"a*a", b"aa", True), (b"**", b"", True),
        (b"h*l?o*", b"hello", True), (b"*[0-9]", b"key7", True), (b"*[0-9]", b"key", False),
    ]  # fmt: skip
    for pattern, key, matches in cases:
        assert bool(kvstore.glob_pattern(pattern).fullmatch(key)) == matches, (pattern, key)


def test_a_pattern_with_many_stars_takes_linear_time_not_exponential() -> None:
    # As a regular expression, .*a.*a...b backtracks over every split of the key: this
    # KEYS took longer than any test timeout and stalled every connection meanwhile.
    store = kvstore.Store()
    store.set(b"a" * 5000, b"v", None)
    started = time.monotonic()
    reply = kvstore.command_keys(store, [b"KEYS", b"*a" * 30 + b"*b"])
    assert reply == b"*0\r\n"
    assert time.monotonic() - started < 1.0


@pytest.mark.anyio
async def test_redis_cli_scan_keys_ttl_type_info(ios: ioserver.IOServer) -> None:
    cli = redis_cli()
    async with serving(ios) as (host, number):
        base = [cli, "-h", host, "-p", str(number)]

        async def run(*arguments: str) -> str:
            with anyio.fail_after(20):
                result = await anyio.run_process([*base, *arguments], stderr=subprocess.STDOUT)
            return result.stdout.decode()

        keys = [f"user:{index}" for index in range(250)]
        assert await run("MSET", *(part for key in keys for part in (key, "1"))) == "OK\n"
        assert await run("SET", "other", "1") == "OK\n"
        # redis-cli --scan drives SCAN's cursor to the end (COUNT 10 a call).
        assert sorted((await run("--scan", "--pattern", "user:*")).split()) == sorted(keys)
        assert sorted((await run("KEYS", "user:1?")).split()) == [f"user:1{d}" for d in range(10)]
        assert await run("EXPIRE", "other", "100") == "1\n"
        assert await run("TTL", "other") == "100\n"
        assert await run("TYPE", "other") == "string\n"
        assert await run("DBSIZE") == "251\n"
        info = await run("INFO")
        assert "# Keyspace\r\ndb0:keys=251,expires=1,avg_ttl=0" in info.replace(
            "\n", "\r\n"
        ).replace("\r\r", "\r")
        assert "redis_version:" in info
        assert await run("FLUSHALL") == "OK\n"
        assert await run("DBSIZE") == "0\n"


def redis_benchmark() -> str:
    path = shutil.which("redis-benchmark")
    if path is None:
        pytest.skip("redis-benchmark is not installed: apt-get install redis-tools")
    return path


@pytest.mark.anyio
async def test_redis_benchmark_runs_its_tests_against_it(ios: ioserver.IOServer) -> None:
    """A smoke run of the tool users point at a Redis server: every test completes, and
    the store holds what the commands made."""
    tool = redis_benchmark()
    tests = ["SET", "GET", "INCR", "LPUSH", "LPOP", "MSET"]
    store = kvstore.Store()
    async with anyio.create_task_group() as task_group:
        host, number = (
            await task_group.start(
                lambda task_status: kvstore.serve(
                    ios, "127.0.0.1", 0, store=store, task_status=task_status
                )
            )
        )[:2]
        with anyio.fail_after(60):
            result = await anyio.run_process(
                [tool, "-h", host, "-p", str(number), "-c", "10", "-n", "2000", "-q",
                 "-t", ",".join(tests).lower()],
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        task_group.cancel_scope.cancel()
    output = result.stdout.decode().replace("\r", "\n")
    for test in tests:
        assert re.search(rf"^{test}( \(10 keys\))?: [\d.]+ requests per second", output, re.M), (
            output
        )
    assert "ERR" not in output
    assert store.values[b"counter:__rand_int__"] == b"2000"  # INCR, 2000 times
    assert b"mylist" not in store.values  # as many LPOPs as LPUSHes: the list is gone
