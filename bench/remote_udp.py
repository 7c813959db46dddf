"""Remote UDP benchmark: datagrams/s through a daemon's UDP ports against in-process ones.

One actor owns two UDP ports on 127.0.0.1: a sender that sends COUNT datagrams of SIZE
bytes to a receiver, at most WINDOW of them in flight (UDP has no flow control between
peers: without a window the sender only measures how fast the kernel drops), and the
receiver, an active port counted with ``async for``.
Measured twice, on the same machine and loop (asyncio):

  in-process  the ports of ``ioserver.open()``: sockets in this process's I/O thread;
  daemon      the ports of ``client.connect()`` to an ``ioserver serve`` subprocess
              started here: sockets in the daemon, every datagram crossing the control
              endpoint twice (SEND_TO out, DATAGRAM back), batched per round.

The rate is datagrams received per second, from the first send to the last datagram
received; a window that stays quiet for half a second counts as lost (printed).

usage:
  python bench/remote_udp.py [--count 100000] [--size 64] [--rounds 3] [--window 256]

Prints one line per run and the ratio daemon / in-process (the best of ``--rounds``).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import anyio  # noqa: E402

import client  # noqa: E402
import ioserver  # noqa: E402
import ports  # noqa: E402


async def blast(ios: ioserver.IOServer, count: int, size: int, window: int) -> tuple[float, int]:
    """Datagrams per second received with at most ``window`` in flight, and how many were
    lost (UDP drops what a receiver does not take in time: a window keeps that rare)."""
    payload = b"x" * size
    async with (
        await ports.open_udp(ios, ("127.0.0.1", 0), recbuf=4 * 1024 * 1024) as receiver,
        await ports.open_udp(ios, connect=receiver.local_address) as sender,
    ):
        received = lost = sent = 0
        room = anyio.Event()

        async def receive() -> None:
            nonlocal received, room
            async for _ in receiver:
                received += 1
                if sent - received - lost < window // 2:
                    room.set()
                if received + lost >= count:
                    return

        start = time.perf_counter()
        async with anyio.create_task_group() as group:
            group.start_soon(receive)
            while sent < count:
                if sent - received - lost >= window:
                    room = anyio.Event()
                    with anyio.move_on_after(0.5):
                        await room.wait()
                    if sent - received - lost >= window:  # quiet: the window was dropped
                        lost += sent - received - lost
                    continue
                await sender.send(payload)
                sent += 1
            with anyio.move_on_after(0.5):
                while received + lost < count:
                    room = anyio.Event()
                    await room.wait()
            lost = count - received
            group.cancel_scope.cancel()
        return received / (time.perf_counter() - start), lost


def start_daemon(endpoint: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    daemon = subprocess.Popen(
        [sys.executable, "-m", "ioserver", "serve", "--endpoint", endpoint],
        env=env,
        stderr=subprocess.PIPE,
    )
    assert daemon.stderr is not None
    for line in daemon.stderr:  # its log: ready when it says it serves
        if b"serving" in line:
            break
    else:
        raise SystemExit(f"the daemon did not start (status {daemon.wait()})")
    return daemon


async def main(arguments: argparse.Namespace) -> None:
    best = {"in-process": 0.0, "daemon": 0.0}
    with tempfile.TemporaryDirectory() as directory:
        endpoint = f"ipc://{directory}/control"
        daemon = start_daemon(endpoint)
        try:
            for run in range(arguments.rounds):
                for where in best:
                    if where == "daemon":
                        async with client.connect(endpoint) as ios:
                            rate, lost = await blast(
                                ios, arguments.count, arguments.size, arguments.window
                            )
                    else:
                        async with ioserver.open() as ios:
                            rate, lost = await blast(
                                ios, arguments.count, arguments.size, arguments.window
                            )
                    best[where] = max(best[where], rate)
                    print(
                        f"run {run + 1} {where:10s} {arguments.count} x {arguments.size} B: "
                        f"{rate:,.0f} datagrams/s, {lost} lost",
                        flush=True,
                    )
        finally:
            daemon.terminate()
            daemon.wait()
    print(
        f"best: in-process {best['in-process']:,.0f}/s, daemon {best['daemon']:,.0f}/s, "
        f"ratio daemon / in-process {best['daemon'] / best['in-process']:.2f}"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=100_000, help="datagrams per run")
    parser.add_argument("--size", type=int, default=64, help="bytes per datagram")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each, interleaved")
    parser.add_argument("--window", type=int, default=256, help="datagrams in flight at most")
    anyio.run(main, parser.parse_args())
