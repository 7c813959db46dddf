"""A program that ends without closing its I/O server exits cleanly.

``ioserver.open`` stops the I/O thread when its block ends; a program can still end with
the block open (a ``run_until_complete`` that raised out of it, an abandoned context).  The
Python core's thread is a daemon thread, never resumed at finalization; the native core's
thread is stopped at exit (``_native_core.stop_at_exit``) - before that fix a native thread
whose hosted half was busy took the GIL during finalization and the process aborted (half
the runs of this test).  Real subprocesses, a real UDP flood, on every core.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading

import pytest

pytestmark = pytest.mark.every_core

#: Opens a server, a hosted UDP port and a native TCP listener, takes two datagrams of a
#: flood (so the hosted half runs rounds as the interpreter ends), and leaves the server open.
CHILD = r"""
import asyncio, sys
import ioserver, ports

async def main():
    backend = None if sys.argv[2] == "None" else sys.argv[2]
    context = ioserver.open(core=sys.argv[1], io_backend=backend)
    server = await context.__aenter__()  # and never __aexit__: the block stays open
    udp = await ports.open_udp(server, ("127.0.0.1", 0))
    await ports.listen_tcp(server, "127.0.0.1", 0)
    print(udp.local_address[1], flush=True)
    await udp.receive()
    await udp.receive()
    return context

kept = asyncio.new_event_loop().run_until_complete(main())
print("leaving", flush=True)
"""


@pytest.mark.parametrize("run", range(4))
def test_a_program_that_never_closes_its_server_exits_cleanly(
    core: str, io_backend: str | None, run: int
) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, core, str(io_backend)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONFAULTHANDLER": "1"},
        text=True,
    )
    assert child.stdout is not None
    line = child.stdout.readline()
    if not line:
        child.wait(timeout=30)
        raise AssertionError(child.stderr.read() if child.stderr else "no port")
    port = int(line)
    stop = threading.Event()

    def flood() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            while not stop.is_set():
                try:
                    sock.sendto(b"x" * 100, ("127.0.0.1", port))
                except OSError:
                    pass

    flooder = threading.Thread(target=flood)
    flooder.start()
    try:
        out, err = child.communicate(timeout=30)
    finally:
        stop.set()
        flooder.join()
        if child.poll() is None:
            child.kill()
            child.communicate()
    assert child.returncode == 0, err
    assert out == "leaving\n"
    assert "panicked" not in err and "Fatal Python error" not in err, err
