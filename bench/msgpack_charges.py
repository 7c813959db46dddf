"""What ``msgpack.unpackb`` allocates per kind of item: the measurements behind
``ioserver._framing.MSGPACK_CHARGES`` (and the native framer's ``msgpack::CHARGE_*``).

Each kind is decoded N times as the items of one array; ``tracemalloc``'s traced memory
after ``msgpack.unpackb(wire, raw=False, strict_map_key=False)`` (the decoded object kept
alive) less before, less the same for an array of N nils, over N, is what one item of that
kind holds beyond its slot.  Maps are measured over their table's growth steps.  Run:
``python bench/msgpack_charges.py`` (the table in docs/reference/limits.rst is its output on
CPython 3.11.7 x86-64, msgpack 1.1).
"""

from __future__ import annotations

import gc
import sys
import tracemalloc
from typing import Any

import msgpack

N = 4096


def held(wire: bytes) -> int:
    """Bytes ``tracemalloc`` traces for the decoded ``wire``, kept alive."""
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        decoded = msgpack.unpackb(wire, raw=False, strict_map_key=False)
        size = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    del decoded
    return size


def own(values: list[Any]) -> float:
    """What one of ``values`` holds as an array's item, beyond its slot."""
    wire = msgpack.packb(values, use_bin_type=True)
    return (held(wire) - held(msgpack.packb([None] * len(values)))) / len(values)


def main() -> None:
    print(sys.version.split()[0], "msgpack", ".".join(map(str, msgpack.version)))
    print("an array's slot:", (held(msgpack.packb([None] * N)) - held(b"\x90")) / N)
    for name, value in [
        ("nil", None), ("true", True), ("fixint 5", 5), ("uint 8", 200),
        ("negative fixint", -6), ("int 16", 60000), ("int 32", -(2**31)),
        ("int 64", -(2**63)), ("uint 64", 2**64 - 1), ("float", 1.5),
        ("bin 8", b"x" * 8), ("bin 1000", b"x" * 1000),
        ("ext 1", msgpack.ExtType(5, b"x")), ("ext 16", msgpack.ExtType(5, b"x" * 16)),
        ("timestamp 32", msgpack.Timestamp(1, 0)), ("timestamp 96", msgpack.Timestamp(2**40, 5)),
        ("empty array", []), ("array of 5", [None] * 5), ("empty map", {}),
    ]:  # fmt: skip
        print(f"{name:18} {own([value] * N):8.1f}")
    for label, character in [("ascii", "a"), ("latin-1", "\xe9"), ("ucs-2", "\u20ac"),
                             ("astral", "\U0001f600")]:  # fmt: skip
        for length in (1, 2, 8, 100, 1000):
            text = character * length
            wire = len(text.encode())
            print(f"str {label:8} {length:5} characters, {wire:5} wire bytes: "
                  f"{own([text] * N):8.1f}")  # fmt: skip
    for length in (10, 1000):
        text = "\U0001f600" + "a" * length
        print(
            f"str astral + {length} ASCII ({len(text.encode())} wire bytes): {own([text] * 64):.1f}"
        )
    worst = 0.0
    for entries in [*range(1, 12), 85, 86, 171, 342, 683, 1366, 2731, 5462, 10923, 21846, 43691]:
        count = max(1, min(N, 200_000 // (entries + 1)))
        table = {i + 1000: None for i in range(entries)}
        per = (own([table] * count) - 64 - 32 * entries) / entries  # less the int keys
        worst = max(worst, per if entries > 5 else 0)
        print(f"map of {entries:6} int keys: its table {per:6.1f} an entry")
    print("the most a map's table takes an entry past 5 entries:", worst)
    for entries in (100, 10_000):
        count = max(1, 100_000 // entries)
        maps = [{f"k{j}_{i}": None for i in range(entries)} for j in range(count)]
        per = (held(msgpack.packb(maps)) - held(msgpack.packb([None] * count))) / count
        print(
            f"map of {entries} unique str keys: {(per - 64) / entries:.1f} an entry, "
            "its key's str and interning included"
        )


if __name__ == "__main__":
    main()
