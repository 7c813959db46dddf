"""Server processes for the benchmark scripts (bench/echo.py, bench/idle_memory.py).

Not a script. The benchmarks run as ``python bench/NAME.py``, which puts bench/ on sys.path, so
they import this module as ``_servers``.

``running(server, port, stderr)`` starts a server as a subprocess in its own session (with the
repository root on PYTHONPATH for ioserver servers, so they import the package from the checkout),
waits until it accepts a TCP connection on 127.0.0.1:PORT, and always stops it on the way out:
SIGTERM to its process group, SIGKILL after STOP_TIMEOUT_S. A server that exits first or does not
accept within START_TIMEOUT_S raises RunFailed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent

START_TIMEOUT_S = 20.0  # a server must accept a connection within this
STOP_TIMEOUT_S = 5.0  # after SIGTERM, before SIGKILL


@dataclasses.dataclass(frozen=True)
class Server:
    """A server to benchmark: argv gets ``--port PORT`` appended, then ``extra``.

    ``is_ioserver``: run it with the repository root on PYTHONPATH; ``skip_reason``: why it
    cannot run here (None if it can); ``env``: environment variables set for it."""

    name: str
    argv: tuple[str, ...]
    extra: tuple[str, ...] = ()
    is_ioserver: bool = False
    skip_reason: str | None = None
    env: tuple[tuple[str, str], ...] = ()

    def command(self, port: int) -> list[str]:
        return [*self.argv, "--port", str(port), *self.extra]


class RunFailed(Exception):
    """A server could not be measured (it failed to start, died, or the measurement failed).

    ``summary`` is one line for the table; ``details`` (e.g. the server's stderr tail) go with it
    in the per-run report."""

    def __init__(self, summary: str, details: str = "") -> None:
        super().__init__(summary)
        self.summary = summary
        self.details = details

    def __str__(self) -> str:
        return f"{self.summary}\n{self.details}" if self.details else self.summary


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def tail(f: IO[str], limit: int = 2000) -> str:
    f.flush()
    f.seek(0)
    text = f.read().strip()
    if not text:
        return "(no stderr output)"
    return text if len(text) <= limit else "..." + text[-limit:]


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the server's process group, then SIGKILL it if it lingers."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            continue
        # The leader is gone; make sure nothing it started outlives it.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        return


@contextlib.contextmanager
def running(server: Server, port: int, stderr: IO[str]) -> Iterator[subprocess.Popen[bytes]]:
    """Run the server in its own session until it accepts a connection; always stop it."""
    env = dict(os.environ)
    env.update(server.env)
    if server.is_ioserver:  # let examples/echo.py import the package from the checkout
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.Popen(
        server.command(port),
        cwd=REPO_ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=stderr,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                raise RunFailed(
                    f"exited with status {proc.returncode} before listening",
                    f"server stderr:\n{tail(stderr)}",
                )
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            if time.monotonic() > deadline:
                raise RunFailed(
                    f"not accepting connections on port {port} after {START_TIMEOUT_S:.0f} s",
                    f"server stderr:\n{tail(stderr)}",
                )
            time.sleep(0.05)
        yield proc
    finally:
        stop(proc)
