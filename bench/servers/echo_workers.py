"""examples/echo.py served by ``ioserver serve --workers N``: N share-nothing worker
processes, each with its own I/O thread, sharing the TCP port through SO_REUSEPORT.

    python bench/servers/echo_workers.py --port 7001 --workers 2

Started by bench/echo.py as "ioserver-workers1" and "ioserver-workers2".  It replaces
itself with the ``ioserver serve`` supervisor (same process group, so bench/_servers.py's
SIGTERM stops the supervisor and its workers).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=2)
    options = parser.parse_args()
    directory = tempfile.mkdtemp(prefix="ioserver-bench-")
    argv = [sys.executable, "-m", "ioserver", "serve", "--log-level", "WARNING"]
    argv += ["--endpoint", f"ipc://{directory}/control", "--workers", str(options.workers)]
    argv += ["--app", f"{ROOT / 'examples' / 'echo.py'} --port {options.port}"]
    os.execv(sys.executable, argv)


if __name__ == "__main__":
    main()
