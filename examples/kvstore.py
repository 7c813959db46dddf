"""An in-memory key-value store that speaks Redis's protocol (RESP2): redis-cli just works.

Run it:  python examples/kvstore.py --port 6380     (or: ioserver run examples/kvstore.py)
Try it:  redis-cli -p 6380 set greeting hello EX 60
         redis-cli -p 6380 get greeting
         printf 'PING\\r\\n' | nc -q1 127.0.0.1 6380        (inline commands work too)
Load it: redis-benchmark -p 6380 -t set,get,incr,lpush,lpop,mset -n 100000 -c 50 -P 16

Commands: PING, ECHO, GET, SET (EX, PX, NX, XX, KEEPTTL), DEL, EXISTS, INCR, DECR, INCRBY,
DECRBY, MGET, MSET, EXPIRE, PEXPIRE, EXPIREAT, PEXPIREAT (NX, XX, GT, LT), TTL, PTTL,
PERSIST, KEYS and SCAN (cursor, MATCH, COUNT, TYPE; Redis's glob patterns), TYPE, LPUSH,
RPUSH, LPOP, RPOP (with a count), LLEN, LRANGE, DBSIZE, FLUSHDB, FLUSHALL, INFO (server,
clients, stats, keyspace), SELECT 0, QUIT, COMMAND (plain, COUNT, INFO, DOCS - enough for
clients to connect) and CONFIG GET (what redis-benchmark asks).  Replies and errors are
Redis 7.0's own, byte for byte: ``-ERR unknown command ...``, ``-ERR wrong number of
arguments for 'get' command``, ``-WRONGTYPE Operation against a key holding the wrong kind
of value``.

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
  also swept every 100 ms, so they do not pile up unread (Redis too expires lazily and in
  a periodic cycle).
- SCAN's cursor is a key's creation number, never reused: a full iteration returns every
  key present throughout it, as Redis guarantees, however keys come and go meanwhile.
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
import bisect
import collections
import functools
import heapq
import itertools
import logging
import os
import re
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
WRONG_TYPE = CommandError("WRONGTYPE Operation against a key holding the wrong kind of value")

Value = bytes | collections.deque[bytes]


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
    """The keyspace: values (``bytes`` for strings, a :class:`collections.deque` of
    ``bytes`` for lists) and deadlines (``time.monotonic()`` seconds).

    A key with a deadline in the past does not exist: every lookup checks it first
    (lazy expiry), and :meth:`sweep` removes the ones nobody looks up - as Redis, which
    expires on access and in a periodic cycle.  Every key also gets a sequence number
    when it is created, never reused: ``SCAN``'s cursor is one, so a full iteration
    returns every key present throughout it at least once, however keys come and go
    meanwhile (Redis's guarantee), and never the same key twice unless it was deleted
    and created again.
    """

    def __init__(self) -> None:
        self.values: dict[bytes, Value] = {}
        self.deadlines: dict[bytes, float] = {}
        self._heap: list[tuple[float, bytes]] = []  # (deadline, key); stale entries too
        # SCAN's order: the keys by creation, with their sequence numbers (ascending);
        # deleted keys stay in these lists until a compaction drops them.
        self._sequence = 0
        self._sequence_of: dict[bytes, int] = {}
        self._order_keys: list[bytes] = []
        self._order_numbers: list[int] = []
        # INFO's figures.
        self.started = time.monotonic()
        self.expired_keys = 0
        self.connections_received = 0
        self.connected_clients = 0
        self.commands_processed = 0

    def get(self, key: bytes) -> Value | None:
        value = self.values.get(key)
        deadlines = self.deadlines
        if value is not None and deadlines and deadlines.get(key, INFINITY) <= time.monotonic():
            self.delete(key)
            self.expired_keys += 1
            return None
        return value

    def get_string(self, key: bytes) -> bytes | None:
        """The string at ``key``, ``None`` if absent; ``WRONGTYPE`` if another type."""
        value = self.get(key)
        if value is not None and value.__class__ is not bytes:
            raise WRONG_TYPE
        return value  # type: ignore[return-value]

    def get_list(self, key: bytes) -> collections.deque[bytes] | None:
        """The list at ``key``, ``None`` if absent; ``WRONGTYPE`` if another type."""
        value = self.get(key)
        if value is not None and value.__class__ is not collections.deque:
            raise WRONG_TYPE
        return value  # type: ignore[return-value]

    def set(self, key: bytes, value: Value, deadline: float | None, keep_ttl: bool = False) -> None:
        values = self.values
        if key not in values:
            self._created(key)
        values[key] = value
        if deadline is not None:
            self.expire(key, deadline)
        elif not keep_ttl and self.deadlines:
            self.deadlines.pop(key, None)

    def expire(self, key: bytes, deadline: float) -> None:
        """Give the existing ``key`` a deadline (``time.monotonic()`` seconds)."""
        self.deadlines[key] = deadline
        heapq.heappush(self._heap, (deadline, key))

    def delete(self, key: bytes) -> bool:
        self.deadlines.pop(key, None)
        if self.values.pop(key, None) is None:
            return False
        del self._sequence_of[key]
        if len(self._order_keys) > 1024 and len(self._order_keys) > 2 * len(self.values):
            self._compact()
        return True

    def flush(self) -> None:
        self.values.clear()
        self.deadlines.clear()
        self._heap.clear()
        self._sequence_of.clear()
        self._order_keys.clear()
        self._order_numbers.clear()

    def sweep(self) -> int:
        """Remove every key whose deadline has passed; return how many."""
        now = time.monotonic()
        heap, removed = self._heap, 0
        while heap and heap[0][0] <= now:
            deadline, key = heapq.heappop(heap)
            if self.deadlines.get(key) == deadline:  # not a stale entry (TTL changed)
                self.delete(key)
                removed += 1
        self.expired_keys += removed
        return removed

    def live_keys(self) -> list[bytes]:
        """Every key not expired (the expired ones are removed on the way)."""
        self.sweep()
        return list(self.values)

    def scan(self, cursor: int, count: int) -> tuple[int, list[bytes]]:
        """About ``count`` keys created at or after ``cursor`` (a sequence number; 0
        starts), and the cursor to go on from (0: the iteration is complete)."""
        numbers, keys, sequence_of = self._order_numbers, self._order_keys, self._sequence_of
        index = bisect.bisect_left(numbers, cursor)
        found: list[bytes] = []
        end = min(index + count, len(keys))
        while index < end:
            key = keys[index]
            if sequence_of.get(key) == numbers[index] and self.get(key) is not None:
                found.append(key)
            index += 1
        if index >= len(keys):
            return 0, found
        return numbers[index], found

    def _created(self, key: bytes) -> None:
        self._sequence += 1
        self._sequence_of[key] = self._sequence
        self._order_keys.append(key)
        self._order_numbers.append(self._sequence)

    def _compact(self) -> None:
        """Drop deleted keys from the scan order (numbers kept: cursors stay valid)."""
        sequence_of = self._sequence_of
        kept = [
            (key, number)
            for key, number in zip(self._order_keys, self._order_numbers, strict=True)
            if sequence_of.get(key) == number
        ]
        self._order_keys = [key for key, _ in kept]
        self._order_numbers = [number for _, number in kept]

    def __len__(self) -> int:
        self.sweep()
        return len(self.values)


# -- the commands: each takes (store, arguments) and returns its encoded reply ------------


def command_ping(store: Store, arguments: list[bytes]) -> bytes:
    return b"+PONG\r\n" if len(arguments) == 1 else encode_resp(arguments[1])


def command_echo(store: Store, arguments: list[bytes]) -> bytes:
    return encode_resp(arguments[1])


def command_get(store: Store, arguments: list[bytes]) -> bytes:
    value = store.get_string(arguments[1])
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


def increment(store: Store, key: bytes, by: int) -> bytes:
    """INCR, DECR, INCRBY and DECRBY: add ``by`` to the integer at ``key`` (0 if absent),
    keeping its time to live, as Redis."""
    value = store.get_string(key)
    number = 0 if value is None else integer_argument(value)
    if (by < 0 and number < INT64_MIN - by) or (by > 0 and number > INT64_MAX - by):
        raise CommandError("ERR increment or decrement would overflow")
    number += by
    store.set(key, b"%d" % number, None, keep_ttl=True)
    return b":%d\r\n" % number


def command_incr(store: Store, arguments: list[bytes]) -> bytes:
    return increment(store, arguments[1], 1)


def command_decr(store: Store, arguments: list[bytes]) -> bytes:
    return increment(store, arguments[1], -1)


def command_incrby(store: Store, arguments: list[bytes]) -> bytes:
    return increment(store, arguments[1], integer_argument(arguments[2]))


def command_decrby(store: Store, arguments: list[bytes]) -> bytes:
    by = integer_argument(arguments[2])
    if by == INT64_MIN:
        raise CommandError("ERR decrement would overflow")
    return increment(store, arguments[1], -by)


def command_mget(store: Store, arguments: list[bytes]) -> bytes:
    values = [store.get(key) for key in arguments[1:]]
    return encode_resp([value if value.__class__ is bytes else None for value in values])


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


# -- time to live -------------------------------------------------------------------


def _name(arguments: list[bytes]) -> str:
    return arguments[0].decode(errors="replace").lower()


def _expire(store: Store, arguments: list[bytes], unit: int, absolute: bool) -> bytes:
    """EXPIRE, PEXPIRE, EXPIREAT, PEXPIREAT: ``unit`` is 1000 (seconds) or 1
    (milliseconds); NX, XX, GT and LT as Redis 7 (a key without a time to live counts as
    an infinite one for GT and LT)."""
    key = arguments[1]
    amount = integer_argument(arguments[2])
    flags = {flag.upper() for flag in arguments[3:]}
    for flag in flags:
        if flag not in (b"NX", b"XX", b"GT", b"LT"):
            raise CommandError(f"ERR Unsupported option {flag.decode(errors='replace')}")
    if b"NX" in flags and len(flags) > 1:
        raise CommandError("ERR NX and XX, GT or LT options at the same time are not compatible")
    if b"GT" in flags and b"LT" in flags:
        raise CommandError("ERR GT and LT options at the same time are not compatible")
    milliseconds = amount * unit
    now_ms = time.time() * 1000 if absolute else 0
    if not INT64_MIN <= milliseconds <= INT64_MAX or (
        not absolute and milliseconds > INT64_MAX - int(time.time() * 1000)
    ):
        raise CommandError(f"ERR invalid expire time in '{_name(arguments)}' command")
    if store.get(key) is None:
        return b":0\r\n"
    deadline = time.monotonic() + (milliseconds - now_ms) / 1000
    current = store.deadlines.get(key)
    if (
        (b"NX" in flags and current is not None)
        or (b"XX" in flags and current is None)
        or (b"GT" in flags and (current is None or deadline <= current))
        or (b"LT" in flags and current is not None and deadline >= current)
    ):
        return b":0\r\n"
    if deadline <= time.monotonic():
        store.delete(key)  # a time in the past deletes the key (Redis: "expired")
        store.expired_keys += 1
    else:
        store.expire(key, deadline)
    return b":1\r\n"


def command_expire(store: Store, arguments: list[bytes]) -> bytes:
    return _expire(store, arguments, 1000, absolute=False)


def command_pexpire(store: Store, arguments: list[bytes]) -> bytes:
    return _expire(store, arguments, 1, absolute=False)


def command_expireat(store: Store, arguments: list[bytes]) -> bytes:
    return _expire(store, arguments, 1000, absolute=True)


def command_pexpireat(store: Store, arguments: list[bytes]) -> bytes:
    return _expire(store, arguments, 1, absolute=True)


def _ttl(store: Store, key: bytes, milliseconds: bool) -> bytes:
    """TTL and PTTL: -2 for no key, -1 for no time to live; TTL rounds to the nearest
    second, as Redis."""
    if store.get(key) is None:
        return b":-2\r\n"
    deadline = store.deadlines.get(key)
    if deadline is None:
        return b":-1\r\n"
    left = max(0, int((deadline - time.monotonic()) * 1000))
    return b":%d\r\n" % (left if milliseconds else (left + 500) // 1000)


def command_ttl(store: Store, arguments: list[bytes]) -> bytes:
    return _ttl(store, arguments[1], milliseconds=False)


def command_pttl(store: Store, arguments: list[bytes]) -> bytes:
    return _ttl(store, arguments[1], milliseconds=True)


def command_persist(store: Store, arguments: list[bytes]) -> bytes:
    key = arguments[1]
    if store.get(key) is None or store.deadlines.pop(key, None) is None:
        return b":0\r\n"
    return b":1\r\n"  # the stale heap entry is skipped by the sweep


# -- the keyspace ---------------------------------------------------------------------


class GlobPattern:
    """A compiled Redis glob: :meth:`fullmatch` says whether a whole key matches.

    The pattern is cut at its ``*`` into segments of fixed width (each a regular
    expression of single-byte items, no quantifier); the first must match at the start,
    the last at the end, and each other is found at its leftmost place after the one
    before - so a match costs at most the key's length times the pattern's, whatever the
    pattern (a regular expression ``.*a.*a.*b`` backtracks exponentially on ``aaa...a``,
    and would stall every connection of the store; Redis bounded the same in 7.0.9).
    """

    __slots__ = ("_first", "_last", "_middle", "_whole")

    def __init__(self, segments: list[list[bytes]]) -> None:
        compiled = [(re.compile(b"".join(items), re.DOTALL), len(items)) for items in segments]
        self._whole = compiled[0][0] if len(compiled) == 1 else None
        self._first = compiled[0]
        self._last = compiled[-1]
        self._middle = [regex for regex, width in compiled[1:-1] if width]

    def fullmatch(self, key: bytes) -> bool:
        if self._whole is not None:  # no star
            return self._whole.fullmatch(key) is not None
        (first, first_width), (last, last_width) = self._first, self._last
        start, end = first_width, len(key) - last_width
        if end < start or not first.match(key) or not last.fullmatch(key, end):
            return False
        for segment in self._middle:
            found = segment.search(key, start, end)
            if found is None:
                return False
            start = found.end()
        return True


@functools.lru_cache(maxsize=256)
def glob_pattern(pattern: bytes) -> GlobPattern:
    """Redis's glob (``stringmatchlen``): ``*``, ``?``, ``[abc]``, ``[^abc]``, ``[a-z]`` (a
    reversed range is swapped) and ``\\x`` for a literal ``x``, matching the whole key."""
    segments: list[list[bytes]] = [[]]
    index, length = 0, len(pattern)
    while index < length:
        char = pattern[index : index + 1]
        if char == b"*":
            segments.append([])
        elif char == b"?":
            segments[-1].append(b".")
        elif char == b"\\" and index + 1 < length:
            index += 1
            segments[-1].append(re.escape(pattern[index : index + 1]))
        elif char == b"[":
            index += 1
            negate = pattern[index : index + 1] == b"^"
            if negate:
                index += 1
            members: list[bytes] = []
            while index < length and pattern[index : index + 1] != b"]":
                char = pattern[index : index + 1]
                if char == b"\\" and index + 1 < length:
                    index += 1
                    members.append(re.escape(pattern[index : index + 1]))
                elif pattern[index + 1 : index + 2] == b"-" and index + 2 < length:
                    low, high = pattern[index], pattern[index + 2]
                    low, high = min(low, high), max(low, high)
                    members.append(b"%b-%b" % (re.escape(bytes([low])), re.escape(bytes([high]))))
                    index += 2
                else:
                    members.append(re.escape(char))
                index += 1
            if not members:
                segments[-1].append(b"[^\\s\\S]" if not negate else b".")  # [] matches nothing
            else:
                segments[-1].append(b"[%b%b]" % (b"^" if negate else b"", b"".join(members)))
        else:
            segments[-1].append(re.escape(char))
        index += 1
    return GlobPattern(segments)


def command_keys(store: Store, arguments: list[bytes]) -> bytes:
    keys = store.live_keys()
    if arguments[1] != b"*":
        match = glob_pattern(arguments[1]).fullmatch
        keys = [key for key in keys if match(key)]
    return encode_resp(keys)


def command_type(store: Store, arguments: list[bytes]) -> bytes:
    value = store.get(arguments[1])
    if value is None:
        return b"+none\r\n"
    return b"+string\r\n" if value.__class__ is bytes else b"+list\r\n"


def command_scan(store: Store, arguments: list[bytes]) -> bytes:
    """SCAN cursor [MATCH pattern] [COUNT count] [TYPE type], as Redis: COUNT (10 by
    default) is how many keys to look at, MATCH and TYPE filter what they hold."""
    text = arguments[1]
    if not text.isdigit() or len(text) > 20 or int(text) > (1 << 64) - 1:
        raise CommandError("ERR invalid cursor")
    cursor = int(text)
    count, match, kind = 10, None, None
    index = 2
    while index < len(arguments):
        option = arguments[index].upper()
        if index + 1 >= len(arguments):
            raise SYNTAX_ERROR
        value = arguments[index + 1]
        if option == b"COUNT":
            count = integer_argument(value)
            if count < 1:
                raise SYNTAX_ERROR
        elif option == b"MATCH":
            match = None if value == b"*" else glob_pattern(value).fullmatch
        elif option == b"TYPE":
            kind = value.lower()
        else:
            raise SYNTAX_ERROR
        index += 2
    cursor, keys = store.scan(cursor, count)
    if match is not None:
        keys = [key for key in keys if match(key)]
    if kind is not None:
        keys = [key for key in keys if command_type(store, [b"", key])[1:-2] == kind]
    return encode_resp([b"%d" % cursor, keys])


def command_server_info(store: Store, arguments: list[bytes]) -> bytes:
    """INFO [section ...]: the sections redis-cli users look at first, in Redis's
    ``field:value`` lines (``server``, ``clients``, ``stats``, ``keyspace``)."""
    wanted = {section.lower() for section in arguments[1:]} or {b"default"}
    every = bool(wanted & {b"all", b"everything", b"default"})
    uptime = int(time.monotonic() - store.started)
    size = len(store)
    sections = {
        b"server": [
            b"redis_version:7.0.0",
            b"redis_mode:standalone",
            b"ioserver_example:kvstore",
            b"process_id:%d" % os.getpid(),
            b"uptime_in_seconds:%d" % uptime,
            b"uptime_in_days:%d" % (uptime // 86400),
        ],
        b"clients": [b"connected_clients:%d" % store.connected_clients],
        b"stats": [
            b"total_connections_received:%d" % store.connections_received,
            b"total_commands_processed:%d" % store.commands_processed,
            b"expired_keys:%d" % store.expired_keys,
        ],
        b"keyspace": [b"db0:keys=%d,expires=%d,avg_ttl=0" % (size, len(store.deadlines))]
        if size
        else [],
    }
    parts = [
        b"# %b\r\n%b" % (name.capitalize(), b"".join(line + b"\r\n" for line in lines))
        for name, lines in sections.items()
        if every or name in wanted
    ]
    return encode_resp(b"\r\n".join(parts))


# -- lists ----------------------------------------------------------------------------


def _push(store: Store, arguments: list[bytes], left: bool) -> bytes:
    key = arguments[1]
    values = store.get_list(key)
    if values is None:
        values = collections.deque()
        store.set(key, values, None)
    if left:
        values.extendleft(arguments[2:])
    else:
        values.extend(arguments[2:])
    return b":%d\r\n" % len(values)


def command_lpush(store: Store, arguments: list[bytes]) -> bytes:
    return _push(store, arguments, left=True)


def command_rpush(store: Store, arguments: list[bytes]) -> bytes:
    return _push(store, arguments, left=False)


def _pop(store: Store, arguments: list[bytes], left: bool) -> bytes:
    """LPOP and RPOP: one element (bulk), or with a count an array; nil if no key."""
    if len(arguments) > 3:
        raise CommandError(f"ERR wrong number of arguments for '{_name(arguments)}' command")
    count = None
    if len(arguments) == 3:
        count = integer_argument(arguments[2])
        if count < 0:
            raise CommandError("ERR value is out of range, must be positive")
    key = arguments[1]
    values = store.get_list(key)
    if values is None:
        return NULL if count is None else b"*-1\r\n"
    pop = values.popleft if left else values.pop
    taken = [pop() for _ in range(min(1 if count is None else count, len(values)))]
    if not values:
        store.delete(key)  # an empty list does not exist, as in Redis
    return encode_resp(taken[0] if count is None else taken)


def command_lpop(store: Store, arguments: list[bytes]) -> bytes:
    return _pop(store, arguments, left=True)


def command_rpop(store: Store, arguments: list[bytes]) -> bytes:
    return _pop(store, arguments, left=False)


def command_llen(store: Store, arguments: list[bytes]) -> bytes:
    values = store.get_list(arguments[1])
    return b":%d\r\n" % (0 if values is None else len(values))


def command_lrange(store: Store, arguments: list[bytes]) -> bytes:
    start, stop = integer_argument(arguments[2]), integer_argument(arguments[3])
    values = store.get_list(arguments[1])
    if values is None:
        return b"*0\r\n"
    length = len(values)
    start = max(0, start + length if start < 0 else start)
    stop = min(length - 1, stop + length if stop < 0 else stop)
    if start > stop:
        return b"*0\r\n"
    return encode_resp(list(itertools.islice(values, start, stop + 1)))


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
    b"decr": (command_decr, 2, ("write", "denyoom", "fast"), 1, 1, 1),
    b"incrby": (command_incrby, 3, ("write", "denyoom", "fast"), 1, 1, 1),
    b"decrby": (command_decrby, 3, ("write", "denyoom", "fast"), 1, 1, 1),
    b"mget": (command_mget, -2, ("readonly", "fast"), 1, -1, 1),
    b"mset": (command_mset, -3, ("write", "denyoom"), 1, -1, 2),
    b"dbsize": (command_dbsize, 1, ("readonly", "fast"), 0, 0, 0),
    b"flushdb": (command_flushdb, -1, ("write",), 0, 0, 0),
    b"flushall": (command_flushdb, -1, ("write",), 0, 0, 0),
    b"expire": (command_expire, -3, ("write", "fast"), 1, 1, 1),
    b"pexpire": (command_pexpire, -3, ("write", "fast"), 1, 1, 1),
    b"expireat": (command_expireat, -3, ("write", "fast"), 1, 1, 1),
    b"pexpireat": (command_pexpireat, -3, ("write", "fast"), 1, 1, 1),
    b"ttl": (command_ttl, 2, ("readonly", "fast"), 1, 1, 1),
    b"pttl": (command_pttl, 2, ("readonly", "fast"), 1, 1, 1),
    b"persist": (command_persist, 2, ("write", "fast"), 1, 1, 1),
    b"keys": (command_keys, 2, ("readonly",), 0, 0, 0),
    b"scan": (command_scan, -2, ("readonly",), 0, 0, 0),
    b"type": (command_type, 2, ("readonly", "fast"), 1, 1, 1),
    b"info": (command_server_info, -1, ("loading", "stale"), 0, 0, 0),
    b"lpush": (command_lpush, -3, ("write", "denyoom", "fast"), 1, 1, 1),
    b"rpush": (command_rpush, -3, ("write", "denyoom", "fast"), 1, 1, 1),
    b"lpop": (command_lpop, -2, ("write", "fast"), 1, 1, 1),
    b"rpop": (command_rpop, -2, ("write", "fast"), 1, 1, 1),
    b"llen": (command_llen, 2, ("readonly", "fast"), 1, 1, 1),
    b"lrange": (command_lrange, 4, ("readonly",), 1, 1, 1),
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
    store.commands_processed += 1
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
    store.connections_received += 1
    store.connected_clients += 1
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
        finally:
            store.connected_clients -= 1


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
