"""Run a Python server script with tracemalloc on, for bench/idle_memory.py's split.

usage: python bench/servers/traced.py OUTFILE SCRIPT [ARGS...]

Starts ``tracemalloc`` (one frame per trace), then runs SCRIPT as ``__main__`` with ARGS.
A daemon thread writes the bytes tracemalloc traces now (``get_traced_memory()[0]``: every
live allocation of Python's allocators, objects and their buffers) to OUTFILE every 0.2 s,
replacing it atomically, so the benchmark reads the Python part of the server's memory at
any time.  What tracemalloc does not see is the rest: the native core's Rust allocations,
the interpreter's own C structures, allocator overhead and fragmentation.  Tracing costs
memory of its own (about 40 bytes per traced block), so RSS is measured in a separate run
without it.
"""

from __future__ import annotations

import os
import runpy
import sys
import threading
import time
import tracemalloc

REPORT_EVERY_S = 0.2


def report(path: str) -> None:
    temporary = f"{path}.tmp"
    while True:
        current, _peak = tracemalloc.get_traced_memory()
        with open(temporary, "w") as f:
            f.write(f"{current}\n")
        os.replace(temporary, path)
        time.sleep(REPORT_EVERY_S)


def main() -> None:
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    path, script = sys.argv[1], sys.argv[2]
    sys.argv = sys.argv[2:]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    tracemalloc.start(1)
    threading.Thread(target=report, args=(path,), name="traced-report", daemon=True).start()
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
