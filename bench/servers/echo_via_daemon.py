"""examples/echo.py with its sockets in an ioserver daemon: the actor runs here, in the
client process; the TCP sockets live in a daemon subprocess reached over ZeroMQ ipc://.

    python bench/servers/echo_via_daemon.py --port 7001 [--backend trio]

Started by bench/echo.py as the "ioserver-daemon" server.  It starts
``ioserver serve`` on a private ipc:// endpoint, waits for it, and runs echo.py's
``main`` against ``client.connect(endpoint)``.  SIGTERM/SIGINT (bench/_servers.py sends
it to the whole process group) stops both.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anyio

ROOT = Path(__file__).resolve().parents[2]


def load_echo() -> object:
    spec = importlib.util.spec_from_file_location("echo_example", ROOT / "examples" / "echo.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--backend", choices=("asyncio", "trio"), default="asyncio")
    options = parser.parse_args()
    directory = tempfile.mkdtemp(prefix="ioserver-bench-")
    path = os.path.join(directory, "control")
    endpoint = f"ipc://{path}"
    daemon = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ioserver",
            "serve",
            "--endpoint",
            endpoint,
            "--log-level",
            "WARNING",
        ]
    )
    try:
        deadline = time.monotonic() + 20
        while not os.path.exists(path):
            if daemon.poll() is not None or time.monotonic() > deadline:
                print("the daemon did not start", file=sys.stderr)
                return 1
            time.sleep(0.02)
        echo = load_echo()
        import client

        async def run() -> None:
            async with client.connect(endpoint) as ios:
                with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    async with anyio.create_task_group() as task_group:
                        task_group.start_soon(echo.main, ios, ["--port", str(options.port)])  # type: ignore[attr-defined]
                        async for _ in signals:
                            task_group.cancel_scope.cancel()

        anyio.run(run, backend=options.backend)
    finally:
        if daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
        daemon.wait(10)
        if not os.listdir(directory):
            os.rmdir(directory)
    return 0


if __name__ == "__main__":
    sys.exit(main())
