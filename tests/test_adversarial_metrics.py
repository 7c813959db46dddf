"""The ``--metrics`` HTTP endpoint against clients that do not play fair: connections that
send their request a byte at a time or never finish it (slowloris), requests past any
reasonable size.  Real sockets against a real server: the daemon as a subprocess, or a
:class:`~ioserver._metrics.MetricsServer` in this process with short limits."""

from __future__ import annotations

import os
import re
import select
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from ioserver._metrics import MAX_CONNECTIONS, MAX_REQUEST, MetricsServer

pytestmark = pytest.mark.core_independent

ROOT = Path(__file__).resolve().parent.parent


def threads_of(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        found = re.search(r"^Threads:\s+(\d+)", status.read(), re.MULTILINE)
    assert found is not None
    return int(found.group(1))


def wait_until(condition: object, timeout: float, what: str) -> None:
    """Look at ``condition()`` until it holds, sleeping between looks; fail at the deadline."""
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.02)


def closed_by_peer(sock: socket.socket, timeout: float) -> bool:
    """Whether the server ends ``sock`` (EOF or reset) within ``timeout`` seconds; what it
    says before that is read and dropped."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        readable, _, _ = select.select([sock], [], [], left)
        if not readable:
            return False
        try:
            if sock.recv(65536) == b"":
                return True
        except ConnectionError:
            return True
    return False


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], tuple[str, int]]]:
    """``ioserver serve --metrics 127.0.0.1:0``, serving; its metrics address."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("IOSERVER_")}
    process = subprocess.Popen(
        [sys.executable, "-m", "ioserver", "serve", "--metrics", "127.0.0.1:0"],
        stderr=subprocess.PIPE,
        text=True,
        env={**env, "PYTHONPATH": str(ROOT), "XDG_RUNTIME_DIR": str(tmp_path)},
        cwd=ROOT,
    )
    try:
        assert process.stderr is not None
        address = None
        for line in process.stderr:
            found = re.search(r"metrics on http://([\d.]+):(\d+)/metrics", line)
            if found:
                address = (found.group(1), int(found.group(2)))
            if "serving" in line:
                break
        assert address is not None, "the daemon did not say where its metrics are"
        yield process, address
    finally:
        process.kill()
        process.wait(20)
        assert process.stderr is not None
        process.stderr.close()


def scrape(address: tuple[str, int]) -> bytes:
    with urllib.request.urlopen(f"http://{address[0]}:{address[1]}/metrics", timeout=10) as r:
        assert r.status == 200
        body: bytes = r.read()
    assert b"ioserver_up" in body
    return body


def test_slow_metrics_clients_hold_a_bounded_number_of_threads_and_a_scrape_answers(
    daemon: tuple[subprocess.Popen[str], tuple[str, int]],
) -> None:
    process, address = daemon
    scrape(address)  # the first scrape's threads (ZeroMQ's) are there before the count
    baseline = threads_of(process.pid)
    slow = []
    try:
        for _ in range(MAX_CONNECTIONS * 6):
            sock = socket.create_connection(address)
            sock.sendall(b"G")  # ... and never the rest of the request
            slow.append(sock)
        # Accepted in order: when this scrape is answered, every slow one was accepted.
        scrape(address)
        # The oldest slow connections were cut to make room for the newer ones.
        assert closed_by_peer(slow[0], 10), "the oldest slow connection is still held"
        wait_until(
            lambda: threads_of(process.pid) <= baseline + MAX_CONNECTIONS,
            10,
            f"the daemon's threads back under {baseline} + {MAX_CONNECTIONS} "
            f"(now {threads_of(process.pid)})",
        )
        assert process.poll() is None
    finally:
        for sock in slow:
            sock.close()


@pytest.fixture
def server() -> Iterator[MetricsServer]:
    """A metrics endpoint in this process, with a 0.5 s deadline for a connection."""
    metrics = MetricsServer("127.0.0.1", 0, lambda: {"worker": 0, "bytes_in": 1}, deadline=0.5)
    try:
        yield metrics
    finally:
        metrics.close()


def test_a_connection_that_never_finishes_its_request_is_cut_at_the_deadline(
    server: MetricsServer,
) -> None:
    with socket.create_connection(server.address) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # no end of the headers
        started = time.monotonic()
        assert closed_by_peer(sock, 10)
        assert time.monotonic() - started < 5
    scrape(server.address)


def test_a_request_past_max_request_is_refused_with_431(server: MetricsServer) -> None:
    with socket.create_connection(server.address) as sock:
        line = b"X-Padding: " + b"a" * 1000 + b"\r\n"
        request = b"GET /metrics HTTP/1.1\r\nHost: x\r\n" + line * (MAX_REQUEST // len(line) + 1)
        try:
            sock.sendall(request + b"\r\n")
        except ConnectionError:  # the server may refuse before reading it all
            pass
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    assert reply.startswith(b"HTTP/1.0 431 "), reply[:200]
    scrape(server.address)


def test_a_request_line_past_max_request_is_refused(server: MetricsServer) -> None:
    with socket.create_connection(server.address) as sock:
        try:
            sock.sendall(b"GET /" + b"a" * (MAX_REQUEST + 10) + b" HTTP/1.1\r\n\r\n")
        except ConnectionError:
            pass
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    assert reply.startswith((b"HTTP/1.0 414 ", b"HTTP/1.0 431 ")), reply[:200]
    scrape(server.address)


def test_the_metrics_server_leaves_no_thread_behind() -> None:
    import threading

    before = set(threading.enumerate())
    metrics = MetricsServer("127.0.0.1", 0, lambda: {"worker": 0}, deadline=30)
    try:
        slow = [socket.create_connection(metrics.address) for _ in range(3)]
        for sock in slow:
            sock.sendall(b"G")
        scrape(metrics.address)
    finally:
        metrics.close()
        for sock in slow:
            sock.close()
    # The deadline is 30 s: close() itself ends the connections still served.
    wait_until(lambda: set(threading.enumerate()) <= before, 5, "the server's threads end")


def test_a_scrape_of_a_daemon_out_of_descriptors_says_up_0_not_500(
    daemon: tuple[subprocess.Popen[str], tuple[str, int]],
) -> None:
    import resource

    process, address = daemon
    limits = resource.prlimit(process.pid, resource.RLIMIT_NOFILE)
    # One descriptor left: the scrape's connection takes it, nothing more can be opened.
    room = len(os.listdir(f"/proc/{process.pid}/fd")) + 1
    resource.prlimit(process.pid, resource.RLIMIT_NOFILE, (room, limits[1]))
    try:
        body = scrape(address)  # the first scrape: nothing of it was loaded before
        assert b'ioserver_up{worker=""} 0.0' in body, body
    finally:
        resource.prlimit(process.pid, resource.RLIMIT_NOFILE, limits)
    assert b'ioserver_up{worker="0"} 1.0' in scrape(address)
