"""The daemon's grace period writes the output its apps queued, on every core.

At SIGTERM the daemon cancels its apps, then waits up to ``--grace`` seconds for the output
still queued on its ports before it stops the I/O thread (``ioserver._daemon``).  The wait
must see every port's queued output - the native thread's own TCP ports as well as the
hosted half's - or a reply an app queued just before the signal is dropped.  A real daemon
subprocess, a real app, a real TCP client that reads only after the signal.
"""

from __future__ import annotations

import re
import signal
import socket
from pathlib import Path

import pytest
from test_daemon import Daemon

from ioserver._status import query_status

pytestmark = pytest.mark.every_core

#: An app that queues output on each accepted connection until the port is busy (what is
#: queued then is above the high watermark: the kernel's buffers are full and the rest waits
#: in the I/O thread), then says how much it queued and waits to be cancelled.  Before the
#: grace period counted the native thread's ports, the native daemon stopped 4 ms after the
#: signal and the client got 3 MB of the 70 MB queued.
APP = """
import ports

async def main(ios, argv):
    # A high watermark of 64 MiB: the output left queued at SIGTERM takes the client a
    # while to read, longer than the daemon takes to stop if it does not wait for it.
    listener = await ports.listen_tcp(
        ios, "127.0.0.1", 0, high_watermark=64 << 20, low_watermark=32 << 20
    )
    print(f"grace app on {listener.local_address[1]} core {ios.statistics().core}", flush=True)
    async for accepted in listener:
        if isinstance(accepted, ports.Accepted):
            port = accepted.port
            total = 0
            while not port.busy:
                port.send_nowait(b"x" * 65536)
                total += 65536
            print(f"queued {total} bytes", flush=True)
"""


def test_the_grace_period_writes_what_an_app_queued_before_sigterm(
    tmp_path: Path, core: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IOSERVER_CORE", core)
    app = tmp_path / "grace_app.py"
    app.write_text(APP)
    endpoint = f"ipc://{tmp_path}/run/control"
    daemon = Daemon(
        "--endpoint",
        endpoint,
        "--grace",
        "10",
        "--app",
        str(app),
        ready="grace app on",
    )
    try:
        found = re.search(r"grace app on (\d+)", daemon.log)
        assert found is not None
        with socket.socket() as client:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            client.settimeout(15)
            client.connect(("127.0.0.1", int(found.group(1))))
            daemon.wait_for("queued ")
            queued = re.search(r"queued (\d+) bytes", daemon.log)
            assert queued is not None
            expected = int(queued.group(1))
            # What waits in the I/O thread (above the high watermark: the app stopped at
            # busy) is what ``ioserver status`` reports queued, whichever thread holds it.
            status = query_status(endpoint, timeout=10)
            assert status["bytes_queued_out"] > 64 << 20, status
            daemon.process.send_signal(signal.SIGTERM)
            received = 0
            while chunk := client.recv(1 << 20):
                assert chunk.count(b"x") == len(chunk)
                received += len(chunk)
        assert "core " + core in daemon.log
        assert received == expected, daemon.log
        daemon.process.wait(20)  # it stops by itself once the output is written
    finally:
        status = daemon.stop()
    assert status == 0, daemon.log
    assert "output dropped" not in daemon.log
