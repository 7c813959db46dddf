"""A soak of the daemon under hostile and unlucky peers: nothing lost, nothing duplicated,
nobody in, memory under the bound.

    python bench/soak.py                      # 60 s
    python bench/soak.py --seconds 600 --backend trio

One ``ioserver serve`` subprocess runs ``examples/echo.py`` as its app, with a memory
limit.  For ``--seconds``, at the same time:

* **checked echo clients** (threads, plain sockets) send messages of random sizes (1 byte to
  64 KiB) with a sequence pattern and check that each comes back exactly once, byte for
  byte; some of them reset their connection mid-message (``SO_LINGER`` 0) now and then
  and reconnect;
* **a remote writer**: this process opens ports *in the daemon* with ``client.connect``,
  connects them to a local sink and sends numbered chunks in bursts, closing and
  reopening the port now and then; the sink checks each stream is exactly what was sent
  (the daemon's batched writes, issue 12 item 1);
* **hostile peers**: a ZeroMQ client with a session floods the control endpoint with
  refused frames and STATUS requests (item 2, item 5), another sends frames without the
  session's token (item 7), and TCP peers send to the echo app without ever reading
  (the memory bound, item 6 and the budget);
* **a monitor** asks the daemon's status every half second and reads its RSS from /proc.

It prints what was verified and exits 1 on any lost, duplicated or corrupted byte, a
``memory_in_use`` above the limit, an internal error of the daemon, or an echo round trip
that waited more than ``--stall`` seconds (the I/O thread starved).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import zmq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import client  # noqa: E402
import ports  # noqa: E402
from ioserver import _protocol as P  # noqa: E402
from ioserver._daemon import query_status  # noqa: E402


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def pattern(seed: int, size: int) -> bytes:
    """``size`` bytes that depend on ``seed`` (a sequence number): a duplicated or lost
    message shows as a mismatch."""
    unit = struct.pack(">Q", seed)
    return (unit * (size // 8 + 1))[:size]


class Report:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.errors: list[str] = []
        self.counts: dict[str, int] = {}
        self.worst_round_trip = 0.0

    def count(self, name: str, n: int = 1) -> None:
        with self.lock:
            self.counts[name] = self.counts.get(name, 0) + n

    def fail(self, text: str) -> None:
        with self.lock:
            if len(self.errors) < 50:
                self.errors.append(text)


def checked_echo(port: int, stop: threading.Event, report: Report, seed: int) -> None:
    """Send, read back, compare; now and then reset mid-message and reconnect."""
    rng = random.Random(seed)
    sequence = 0
    while not stop.is_set():
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        except OSError as exc:
            report.fail(f"echo client {seed}: connect failed: {exc}")
            return
        with sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for _ in range(rng.randrange(50, 500)):
                if stop.is_set():
                    return
                sequence += 1
                size = rng.choice((1, 7, 64, 1000, 4096, 65536, rng.randrange(1, 65536)))
                message = pattern(seed << 32 | sequence, size)
                if rng.random() < 0.01:  # a reset mid-message
                    sock.sendall(message[: size // 2])
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    report.count("resets")
                    break
                started = time.monotonic()
                sock.sendall(message)
                received = bytearray()
                try:
                    while len(received) < size:
                        chunk = sock.recv(size - len(received))
                        if not chunk:
                            report.fail(f"echo client {seed}: EOF after {len(received)}/{size}")
                            return
                        received += chunk
                except TimeoutError:
                    report.fail(f"echo client {seed}: no echo within 30 s (stalled)")
                    return
                elapsed = time.monotonic() - started
                with report.lock:
                    report.worst_round_trip = max(report.worst_round_trip, elapsed)
                if received != message:
                    report.fail(f"echo client {seed}: message {sequence} came back different")
                    return
                report.count("echo_messages")
                report.count("echo_bytes", size)


def never_reads(port: int, stop: threading.Event, report: Report) -> None:
    """Send to the echo app as fast as it takes, never read: its echo piles up."""
    chunk = b"x" * 65536
    with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        while not stop.is_set():
            try:
                sock.send(chunk)
                report.count("hostile_bytes_unread", len(chunk))
            except TimeoutError:
                continue  # backpressure: what we want
            except OSError:
                return


def sink(listener: socket.socket, stop: threading.Event, report: Report) -> None:
    """Accept the daemon's connections; each stream must be its sender's exact sequence."""

    def check(conn: socket.socket) -> None:
        with conn:
            conn.settimeout(30)
            header = b""
            while len(header) < 8:
                part = conn.recv(8 - len(header))
                if not part:
                    return
                header += part
            (stream,) = struct.unpack(">Q", header)
            expected = 0
            buffer = bytearray()
            while True:
                try:
                    data = conn.recv(262144)
                except TimeoutError:
                    report.fail(f"sink: stream {stream} stalled")
                    return
                if not data:
                    break
                buffer += data
                whole = len(buffer) // 8 * 8
                for offset in range(0, whole, 8):
                    (value,) = struct.unpack_from(">Q", buffer, offset)
                    if value != expected:
                        report.fail(f"sink: stream {stream} got {value}, expected {expected}")
                        return
                    expected += 1
                del buffer[:whole]
            if buffer:
                report.fail(f"sink: stream {stream} ended mid-number")
            report.count("remote_streams_checked")
            report.count("remote_numbers", expected)

    listener.settimeout(0.2)
    threads = []
    while not stop.is_set():
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            continue
        thread = threading.Thread(target=check, args=(conn,), daemon=True)
        thread.start()
        threads.append(thread)
    for thread in threads:
        thread.join(35)


async def remote_writer(endpoint: str, sink_port: int, seconds: float, report: Report) -> None:
    """Ports in the daemon, fed numbered chunks in bursts; closed and reopened now and then."""
    rng = random.Random(7)
    deadline = anyio.current_time() + seconds
    stream = 0
    async with client.connect(endpoint) as ios:
        while anyio.current_time() < deadline:
            stream += 1
            port = await ports.connect_tcp(ios, "127.0.0.1", sink_port)
            async with port:
                await port.send(struct.pack(">Q", stream))
                number = 0
                for _ in range(rng.randrange(5, 50)):
                    burst = rng.randrange(1, 2000)
                    await port.send(b"".join(struct.pack(">Q", number + i) for i in range(burst)))
                    number += burst
                report.count("remote_numbers_sent", number)
                await port.send_eof()
                # Wait for the sink's EOF: everything was written before the close.
                with anyio.fail_after(30):
                    async for message in port:
                        if isinstance(message, ports.Closed):
                            break


def control_flood(endpoint: str, stop: threading.Event, report: Report) -> None:
    """A client with a session that sends refused frames and STATUS requests without end,
    and another that sends frames without a token."""
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        sock = context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(endpoint)
        sock.send(P.pack([[P.HELLO, P.VERSION]]))
        if not sock.poll(10_000):
            report.fail("control flood: no WELCOME")
            return
        token = P.unpack(sock.recv())[0][1]["token"]
        thief = context.socket(zmq.DEALER)
        thief.setsockopt(zmq.LINGER, 0)
        thief.connect(endpoint)
        refused = P.pack([[99]] * 16 + [[P.STATUS, 1]] * 8, token)
        tokenless = P.pack([[P.SEND, 1, b"stolen"]])
        while not stop.is_set():
            with contextlib.suppress(zmq.Again):
                sock.send(refused, zmq.NOBLOCK)
                report.count("hostile_frames")
                thief.send(tokenless, zmq.NOBLOCK)
            while sock.poll(0):
                sock.recv()
            while thief.poll(0):
                thief.recv()
            time.sleep(0.0005)
    finally:
        context.destroy(linger=0)


def monitor(
    endpoint: str, pid: int, limit: int, stop: threading.Event, report: Report
) -> dict[str, int]:
    peaks = {"memory_in_use": 0, "rss": 0}
    while not stop.wait(0.5):
        try:
            status = query_status(endpoint, timeout=10)
        except Exception as exc:
            report.fail(f"monitor: the daemon did not answer STATUS: {exc}")
            continue
        used = int(status.get("memory_in_use", 0))
        peaks["memory_in_use"] = max(peaks["memory_in_use"], used)
        if used > limit:
            report.fail(f"monitor: memory_in_use {used} > memory_limit {limit}")
        if status.get("internal_errors"):
            report.fail(f"monitor: internal errors {status['internal_errors']}")
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    peaks["rss"] = max(peaks["rss"], int(line.split()[1]) * 1024)
    return peaks


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--backend", choices=("asyncio", "trio"), default="asyncio")
    parser.add_argument("--clients", type=int, default=8, help="checked echo clients")
    parser.add_argument("--hostile", type=int, default=4, help="peers that never read")
    parser.add_argument("--memory-limit", type=int, default=32 << 20, help="bytes")
    parser.add_argument("--stall", type=float, default=5.0, help="worst round trip, seconds")
    options = parser.parse_args()

    directory = tempfile.mkdtemp(prefix="ioserver-soak-")
    endpoint = f"ipc://{directory}/control"
    echo_port = free_port()
    daemon = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ioserver",
            "serve",
            "--endpoint",
            endpoint,
            "--backend",
            options.backend,
            "--memory-limit",
            str(options.memory_limit),
            "--log-level",
            "ERROR",
            "--app",
            f"{ROOT / 'examples' / 'echo.py'} --port {echo_port}",
        ],
        cwd=ROOT,
    )
    report = Report()
    stop = threading.Event()
    try:
        deadline = time.monotonic() + 20
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", echo_port)):
                break
            if daemon.poll() is not None or time.monotonic() > deadline:
                print("the daemon did not start", file=sys.stderr)
                return 1
            time.sleep(0.05)
        listener = socket.create_server(("127.0.0.1", 0), backlog=128)
        sink_port = listener.getsockname()[1]
        workers: list[tuple[Callable[..., Any], tuple[Any, ...]]] = [
            (checked_echo, (echo_port, stop, report, seed)) for seed in range(options.clients)
        ]
        workers += [(never_reads, (echo_port, stop, report))] * options.hostile
        workers += [(sink, (listener, stop, report)), (control_flood, (endpoint, stop, report))]
        threads = [threading.Thread(target=f, args=a, daemon=True) for f, a in workers]
        for thread in threads:
            thread.start()
        peaks: dict[str, int] = {}
        watcher = threading.Thread(
            target=lambda: peaks.update(
                monitor(endpoint, daemon.pid, options.memory_limit, stop, report)
            ),
            daemon=True,
        )
        watcher.start()
        anyio.run(remote_writer, endpoint, sink_port, options.seconds, report)
        stop.set()
        for thread in [*threads, watcher]:
            thread.join(40)
        listener.close()
    finally:
        stop.set()
        daemon.send_signal(signal.SIGTERM)
        try:
            status = daemon.wait(15)
        except subprocess.TimeoutExpired:
            daemon.kill()
            status = daemon.wait()
        with contextlib.suppress(OSError):
            os.rmdir(directory)
    if report.worst_round_trip > options.stall:
        report.fail(f"an echo round trip took {report.worst_round_trip:.1f} s (stalled)")
    if status != 0:
        report.fail(f"the daemon exited with {status}")
    counts = report.counts
    if counts.get("remote_numbers", 0) != counts.get("remote_numbers_sent", 0):
        report.fail(
            f"remote streams: {counts.get('remote_numbers_sent', 0)} numbers sent, "
            f"{counts.get('remote_numbers', 0)} checked"
        )
    print(
        f"{options.seconds:.0f} s on {options.backend}: "
        + "  ".join(f"{name}={value}" for name, value in sorted(counts.items()))
    )
    print(
        f"worst echo round trip {report.worst_round_trip * 1000:.0f} ms; "
        f"peak memory_in_use {peaks.get('memory_in_use', 0)} of {options.memory_limit}; "
        f"peak daemon RSS {peaks.get('rss', 0) >> 20} MiB"
    )
    for error in report.errors:
        print("FAIL", error)
    print("soak: " + ("FAILED" if report.errors else "passed"))
    return 1 if report.errors else 0


if __name__ == "__main__":
    sys.exit(main())
