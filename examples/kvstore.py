"""An in-memory key-value store that speaks Redis's protocol (RESP2): redis-cli just works.

Run it:  python examples/kvstore.py --port 6380     (or: ioserver run examples/kvstore.py)
Try it:  redis-cli -p 6380 set greeting hello EX 60
         redis-cli -p 6380 get greeting
         printf 'PING\\r\\n' | nc -q1 127.0.0.1 6380        (inline commands work too)
Load it: redis-benchmark -p 6380 -t set,get -n 100000 -c 50 -P 16

Commands: PING, ECHO, GET, SET (EX, PX, NX, XX, KEEPTTL), DEL, EXISTS, INCR, MGET, MSET,
DBSIZE, FLUSHDB, SELECT 0, QUIT, COMMAND (plain, COUNT, INFO, DOCS - enough for clients
to connect) and CONFIG GET (what redis-benchmark asks).  Errors are Redis's own words:
``-ERR unknown command ...``, ``-ERR wrong number of arguments for 'get' command``,
``-ERR value is not an integer or out of range``.

How it is built:

- The I/O thread frames the byte stream (``packet="resp"``, see
  :class:`ioserver._framing.RespFramer`): the actor receives each command whole, as a
  ``list[bytes]``.  It never parses RESP.
- One actor per connection.  Pipelining: after a command it takes every command that
  is already buffered (``receive_nowait``) and answers the whole batch in one ``send``,
  in order.
- A malformed request gets ``-ERR Protocol error: ...`` and its connection is closed;
  every other connection goes on.
- Keys with a time to live expire on access (a read never sees an expired key) and are
  also swept every 100 ms, so they do not pile up unread.
- Every actor runs in one event loop, so the store is a plain dict: no lock.  The store
  itself is not bounded (as Redis without ``maxmemory``).

Bounds on what a connection can make the server hold:

- ``--packet-size`` (default 1 MiB; Redis's ``proto-max-bulk-len`` is 512 MB): the
  largest command on the wire.  The framer refuses a longer one as soon as a header
  claims it, before anything is allocated for it: the client gets ``-ERR Protocol
  error: ...`` and its connection is closed.  A command decodes to one ``bytes`` per
  argument, each argument at least 6 bytes on the wire, so at most about 7 x the packet
  size in Python objects.
- ``--memory-limit`` (default 64 MiB): the I/O server's budget for everything buffered,
  input not yet taken and output not yet written, for every connection together.
"""

from __future__ import annotations

import argparse
import heapq
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import anyio
import anyio.abc

import ioserver
import ports
from ioserver._framing import FrameError, RespError, encode_resp

log = logging.getLogger("kvstore")

OK = b"+OK\r\n"
NULL = b"$-1\r\n"
SWEEP_INTERVAL = 0.1  # seconds between sweeps of expired keys
PACKET_SIZE = 1 << 20  # bytes: the largest command (--packet-size)
MEMORY_LIMIT = 64 << 20  # bytes: the I/O server's budget (--memory-limit)
INFINITY = float("inf")
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1


class CommandError(Exception):
    """A command failed: ``reply`` is the error to send (``ERR ...``)."""


NOT_AN_INTEGER = CommandError("ERR value is not an integer or out of range")
SYNTAX_ERROR = CommandError("ERR syntax error")


def error(message: str) -> bytes:
    return encode_resp(RespError(message))


def integer_argument(value: bytes) -> int:
    """An argument as Redis reads a 64-bit integer, or ``NOT_AN_INTEGER``."""
    digits = value[1:] if value[:1] == b"-" else value
    if not digits.isdigit() or (len(digits) > 1 and digits[:1] == b"0"):
        raise NOT_AN_INTEGER
    number = int(value)
    if not INT64_MIN <= number <= INT64_MAX:
        raise NOT_AN_INTEGER
    return number


class Store:
    """The keyspace: values (``bytes``) and deadlines (``time.monotonic()`` seconds).

    A key with a deadline in the past does not exist: every lookup checks it first
    (lazy expiry), and :meth:`sweep` removes the ones nobody looks up.
    """

    def __init__(self) -> None:
        self.values: dict[bytes, bytes] = {}
        self.deadlines: dict[bytes, float] = {}
        self._heap: list[tuple[float, bytes]] = []  # (deadline, key); stale entries too

    def get(self, key: bytes) -> bytes | None:
        value = self.values.get(key)
        deadlines = self.deadlines
        if value is not None and deadlines and deadlines.get(key, INFINITY) <= time.monotonic():
            self.delete(key)
            return None
        return value

    def set(self, key: bytes, value: bytes, deadline: float | None, keep_ttl: bool = False) -> None:
        self.values[key] = value
        if deadline is not None:
            self.deadlines[key] = deadline
            heapq.heappush(self._heap, (deadline, key))
        elif not keep_ttl and self.deadlines:
            self.deadlines.pop(key, None)

    def delete(self, key: bytes) -> bool:
        self.deadlines.pop(key, None)
        return self.values.pop(key, None) is not None

    def flush(self) -> None:
        self.values.clear()
        self.deadlines.clear()
        self._heap.clear()

    def sweep(self) -> int:
        """Remove every key whose deadline has passed; return how many."""
        now = time.monotonic()
        heap, removed = self._heap, 0
        while heap and heap[0][0] <= now:
            deadline, key = heapq.heappop(heap)
            if self.deadlines.get(key) == deadline:  # not a stale entry (TTL changed)
                self.delete(key)
                removed += 1
        return removed

    def __len__(self) -> int:
        self.sweep()
        return len(self.values)


# -- the commands: each takes (store, arguments) and returns its encoded reply ------------


def command_ping(store: Store, arguments: list[bytes]) -> bytes:
    return b"+PONG\r\n" if len(arguments) == 1 else encode_resp(arguments[1])


def command_echo(store: Store, arguments: list[bytes]) -> bytes:
    return encode_resp(arguments[1])


def command_get(store: Store, arguments: list[bytes]) -> bytes:
    value = store.get(arguments[1])
    if value is None:
        return NULL
    return b"$%d\r\n%b\r\n" % (len(value), value)


def command_set(store: Store, arguments: list[bytes]) -> bytes:
    key, value = arguments[1], arguments[2]
    deadline: float | None = None
    condition = b""
    keep_ttl = False
    index = 3
    while index < len(arguments):
        option = arguments[index].upper()
        if option in (b"EX", b"PX") and deadline is None and not keep_ttl:
            if index + 1 >= len(arguments):
                raise SYNTAX_ERROR
            amount = integer_argument(arguments[index + 1])
            if amount <= 0:
                raise CommandError("ERR invalid expire time in 'set' command")
            seconds = amount if option == b"EX" else amount / 1000
            deadline = time.monotonic() + seconds
            index += 2
        elif option in (b"NX", b"XX") and not condition:
            condition = option
            index += 1
        elif option == b"KEEPTTL" and deadline is None:
            keep_ttl = True
            index += 1
        else:
            raise SYNTAX_ERROR
    if condition:
        exists = store.get(key) is not None
        if exists != (condition == b"XX"):
            return NULL
    store.set(key, value, deadline, keep_ttl)
    return OK


def command_del(store: Store, arguments: list[bytes]) -> bytes:
    return b":%d\r\n" % sum(
        store.delete(key) for key in arguments[1:] if store.get(key) is not None
    )


def command_exists(store: Store, arguments: list[bytes]) -> bytes:
    return b":%d\r\n" % sum(store.get(key) is not None for key in arguments[1:])


def command_incr(store: Store, arguments: list[bytes]) -> bytes:
    key = arguments[1]
    value = store.get(key)
    number = 0 if value is None else integer_argument(value)
    if number == INT64_MAX:
        raise CommandError("ERR increment or decrement would overflow")
    number += 1
    store.set(key, b"%d" % number, None, keep_ttl=True)  # INCR keeps the time to live
    return b":%d\r\n" % number


def command_mget(store: Store, arguments: list[bytes]) -> bytes:
    return encode_resp([store.get(key) for key in arguments[1:]])


def command_mset(store: Store, arguments: list[bytes]) -> bytes:
    if len(arguments) % 2 == 0:
        raise CommandError("ERR wrong number of arguments for 'mset' command")
    for index in range(1, len(arguments), 2):
        store.set(arguments[index], arguments[index + 1], None)
    return OK


def command_dbsize(store: Store, arguments: list[bytes]) -> bytes:
    return b":%d\r\n" % len(store)


def command_flushdb(store: Store, arguments: list[bytes]) -> bytes:
    if len(arguments) == 2 and arguments[1].upper() not in (b"ASYNC", b"SYNC"):
        raise SYNTAX_ERROR
    if len(arguments) > 2:
        raise SYNTAX_ERROR
    store.flush()
    return OK


def command_select(store: Store, arguments: list[bytes]) -> bytes:
    if integer_argument(arguments[1]) != 0:
        raise CommandError("ERR DB index is out of range")
    return OK


def command_quit(store: Store, arguments: list[bytes]) -> bytes:
    return OK  # the actor closes the connection after the reply


CONFIG_DEFAULTS = {b"save": b"", b"appendonly": b"no", b"databases": b"1"}


def command_config(store: Store, arguments: list[bytes]) -> bytes:
    if arguments[1].upper() != b"GET" or len(arguments) < 3:
        raise CommandError(
            f"ERR unsupported CONFIG subcommand '{arguments[1].decode(errors='replace')}'"
        )
    pairs: list[bytes] = []
    for name in arguments[2:]:
        if name.lower() in CONFIG_DEFAULTS:
            pairs += [name.lower(), CONFIG_DEFAULTS[name.lower()]]
    return encode_resp(pairs)


def command_command(store: Store, arguments: list[bytes]) -> bytes:
    if len(arguments) == 1:
        return encode_resp([command_info(name) for name in COMMANDS])
    subcommand = arguments[1].upper()
    if subcommand == b"COUNT":
        return b":%d\r\n" % len(COMMANDS)
    if subcommand == b"INFO":
        return encode_resp(
            [
                command_info(name.lower()) if name.lower() in COMMANDS else None
                for name in arguments[2:]
            ]
        )
    if subcommand == b"DOCS":
        return b"*0\r\n"  # no documentation: clients then show no hints
    raise CommandError(f"ERR unknown subcommand '{arguments[1].decode(errors='replace')}'")


Handler = Callable[[Store, list[bytes]], bytes]

#: name -> (handler, arity, flags, first key, last key, key step); the arity as Redis's
#: ``COMMAND`` gives it: N means exactly N arguments with the name, -N at least N.
COMMANDS: dict[bytes, tuple[Handler, int, tuple[str, ...], int, int, int]] = {
    b"ping": (command_ping, -1, ("fast",), 0, 0, 0),
    b"echo": (command_echo, 2, ("fast",), 0, 0, 0),
    b"get": (command_get, 2, ("readonly", "fast"), 1, 1, 1),
    b"set": (command_set, -3, ("write", "denyoom"), 1, 1, 1),
    b"del": (command_del, -2, ("write",), 1, -1, 1),
    b"exists": (command_exists, -2, ("readonly", "fast"), 1, -1, 1),
    b"incr": (command_incr, 2, ("write", "denyoom", "fast"), 1, 1, 1),
    b"mget": (command_mget, -2, ("readonly", "fast"), 1, -1, 1),
    b"mset": (command_mset, -3, ("write", "denyoom"), 1, -1, 2),
    b"dbsize": (command_dbsize, 1, ("readonly", "fast"), 0, 0, 0),
    b"flushdb": (command_flushdb, -1, ("write",), 0, 0, 0),
    b"select": (command_select, 2, ("loading", "stale", "fast"), 0, 0, 0),
    b"quit": (command_quit, -1, ("fast",), 0, 0, 0),
    b"config": (command_config, -2, ("admin",), 0, 0, 0),
    b"command": (command_command, -1, ("loading", "stale"), 0, 0, 0),
}


def command_info(name: bytes) -> list[Any]:
    """``COMMAND INFO``'s entry for one command (the six fields of Redis < 7)."""
    _, arity, flags, first, last, step = COMMANDS[name]
    return [name, arity, list(flags), first, last, step]


def execute(store: Store, arguments: list[bytes]) -> bytes:
    """Run one command; return its encoded reply (an error reply if it failed)."""
    name = arguments[0].lower()
    entry = COMMANDS.get(name)
    if entry is None:
        shown = " ".join(f"'{argument.decode(errors='replace')}'" for argument in arguments[1:])
        return error(
            f"ERR unknown command '{arguments[0].decode(errors='replace')}', "
            f"with args beginning with: {shown}".replace("\r", " ").replace("\n", " ")
        )
    handler, arity = entry[0], entry[1]
    if (arity > 0 and len(arguments) != arity) or (arity < 0 and len(arguments) < -arity):
        return error(f"ERR wrong number of arguments for '{name.decode(errors='replace')}' command")
    try:
        return handler(store, arguments)
    except CommandError as exc:
        return error(str(exc))
    except Exception:  # a bug: this command alone fails
        log.exception("command %r failed", name)
        return error("ERR internal error")


async def serve_connection(port: ports.Port, store: Store) -> None:
    """One client's actor: answer its commands in order, each pipelined batch in one send."""
    async with port:
        try:
            while True:
                message = await port.receive()
                replies: list[bytes] = []
                closing = False
                while True:
                    if message.__class__ is ports.Data:
                        arguments = message.data  # type: ignore[union-attr]
                        if isinstance(arguments, FrameError):
                            replies.append(error(f"ERR Protocol error: {arguments}"))
                            closing = True
                            break
                        replies.append(execute(store, arguments))
                        if arguments[0].lower() == b"quit":
                            closing = True
                            break
                    elif message.__class__ is ports.Closed:
                        closing = True
                        break
                    try:
                        message = port.receive_nowait()
                    except ports.WouldBlock:
                        break
                if replies:
                    await port.send(b"".join(replies))
                if closing:
                    return
        except (ports.BrokenPortError, ports.EndOfPort):
            pass  # the client went away


async def sweep_expired(store: Store) -> None:
    """Remove expired keys nobody reads, every ``SWEEP_INTERVAL`` seconds."""
    while True:
        await anyio.sleep(SWEEP_INTERVAL)
        store.sweep()


async def serve(
    ios: ioserver.IOServer,
    host: str = "127.0.0.1",
    port: int = 6380,
    *,
    store: Store | None = None,
    packet_size: int = PACKET_SIZE,
    task_status: anyio.abc.TaskStatus[Any] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the store on ``host:port``; reports the bound address through ``task_status``.

    ``packet_size`` is the largest command in bytes: a longer one is answered with
    ``-ERR Protocol error`` and its connection closed.
    """
    store = Store() if store is None else store
    async with (
        await ports.listen_tcp(ios, host, port, packet="resp", packet_size=packet_size) as listener,
        anyio.create_task_group() as task_group,
    ):
        task_group.start_soon(sweep_expired, store)
        task_status.started(listener.local_address)
        async for accepted in listener:
            if isinstance(accepted, ports.Accepted):
                task_group.start_soon(serve_connection, accepted.port, store)


def byte_size(text: str) -> int:
    """``"1048576"``, ``"64k"``, ``"1M"``, ``"2G"`` → bytes (powers of 1024)."""
    text = text.strip()
    scale = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}.get(text[-1:].lower(), 1)
    try:
        number = int(text[:-1] if scale != 1 else text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size in bytes: {text!r}") from None
    if number <= 0:
        raise argparse.ArgumentTypeError(f"a size must be positive, not {text!r}")
    return number * scale


async def main(ios: ioserver.IOServer, argv: Sequence[str] = ()) -> None:
    parser = argparse.ArgumentParser(prog="kvstore", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=6380, help="TCP port (default 6380)")
    parser.add_argument(
        "--packet-size",
        type=byte_size,
        default=PACKET_SIZE,
        help="the largest command in bytes (default 1M)",
    )
    parser.add_argument(
        "--memory-limit",
        type=byte_size,
        default=MEMORY_LIMIT,
        help="the I/O server's budget for buffered input and output "
        "(ioserver.open(memory_limit=...); default 64M)",
    )
    options = parser.parse_args(argv)
    # `ioserver run` opened `ios` without a budget: serve from one opened with it.
    async with (
        ioserver.open(memory_limit=options.memory_limit) as bounded,
        anyio.create_task_group() as task_group,
    ):
        address = await task_group.start(
            lambda task_status: serve(
                bounded,
                options.host,
                options.port,
                packet_size=options.packet_size,
                task_status=task_status,
            )
        )
        print(
            f"kvstore on {address[0]}:{address[1]} - try: redis-cli -p {address[1]} ping",
            flush=True,
        )


if __name__ == "__main__":
    import sys

    sys.exit(ioserver.main(["run", __file__, *sys.argv[1:]]))
