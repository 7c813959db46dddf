"""examples/httpd.py under attack: slow heads, idle connections, request smuggling.

Real sockets against the server in this process (both backends), and curl against the
command.  Each test waits for the server's own end of file, never for a sleep; the
timeouts are made short here so that the tests are quick.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import anyio
import anyio.abc
import pytest
from test_examples import free_port, running
from test_httpd import INDEX, client, curl, serving

import ioserver

SHORT = 0.3  # seconds: the timeout under test
LONG = 30.0  # seconds: a timeout that must not matter


@pytest.fixture
def root(tmp_path: Path) -> Path:
    site = tmp_path / "site"
    site.mkdir()
    (site / "index.html").write_bytes(INDEX)
    (site / "data.json").write_bytes(b'{"a": 1}\n')
    return site


async def read_to_eof(stream: anyio.abc.SocketStream, seconds: float = 10) -> bytes:
    """Everything the server sends until it closes its side (fails after ``seconds``)."""
    data = b""
    with anyio.fail_after(seconds):
        try:
            while True:
                data += await stream.receive()
        except (anyio.EndOfStream, anyio.BrokenResourceError):
            pass
    return data


@pytest.mark.anyio
async def test_a_head_trickled_byte_by_byte_gets_408_and_is_closed_at_the_head_timeout(
    ios: ioserver.IOServer, root: Path
) -> None:
    # Slowloris: a header line every 50 ms, never the blank line.  Each byte arriving must
    # not move the deadline: it runs from the head's first byte.
    options = {"head_timeout": SHORT, "idle_timeout": LONG}
    async with serving(ios, root, **options) as address, client(address) as http:
        started = anyio.current_time()
        await http.stream.send(b"GET /index.html HTTP/1.1\r\nHost: t\r\n")

        async def trickle() -> None:
            try:
                for number in range(1000):
                    await anyio.sleep(0.05)  # the attack's pace, not a synchronisation
                    await http.stream.send(b"X-%d: y\r\n" % number)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                pass  # closed by the server

        async with anyio.create_task_group() as task_group:
            task_group.start_soon(trickle)
            data = await read_to_eof(http.stream)
            task_group.cancel_scope.cancel()
        elapsed = anyio.current_time() - started
        assert data.startswith(b"HTTP/1.1 408 "), data
        assert b"\r\nconnection: close\r\n" in data
        assert SHORT <= elapsed < LONG


@pytest.mark.anyio
@pytest.mark.parametrize("body", [b"", b"x" * 10], ids=["no-body", "part-of-it"])
async def test_a_body_that_never_comes_gets_408_and_is_closed_at_the_body_timeout(
    ios: ioserver.IOServer, root: Path, body: bytes
) -> None:
    # A head announcing 1000 bytes of body, then nothing (or a part, then trickled):
    # the connection used to stay open as long as the client liked.
    options = {"head_timeout": LONG, "idle_timeout": LONG, "body_timeout": SHORT}
    async with serving(ios, root, **options) as address, client(address) as http:
        # (Before the send: the server's clock starts when the head arrives, which may be
        # before a clock started after the send; see the idle timeout's test.)
        started = anyio.current_time()
        await http.stream.send(
            b"GET /index.html HTTP/1.1\r\nHost: t\r\nContent-Length: 1000\r\n\r\n" + body
        )

        async def trickle() -> None:
            try:
                for _ in range(1000):
                    await anyio.sleep(0.05)  # the attack's pace, not a synchronisation
                    await http.stream.send(b"y")
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                pass  # closed by the server

        async with anyio.create_task_group() as task_group:
            if body:
                task_group.start_soon(trickle)
            data = await read_to_eof(http.stream)
            task_group.cancel_scope.cancel()
        assert data.startswith(b"HTTP/1.1 408 "), data
        assert b"\r\nconnection: close\r\n" in data
        assert SHORT <= anyio.current_time() - started < LONG


@pytest.mark.anyio
async def test_a_connection_that_sends_nothing_is_closed_at_the_head_timeout(
    ios: ioserver.IOServer, root: Path
) -> None:
    options = {"head_timeout": SHORT, "idle_timeout": LONG}
    async with serving(ios, root, **options) as address:
        started = anyio.current_time()  # before the connect (see the idle timeout's test)
        async with client(address) as http:
            assert await read_to_eof(http.stream) == b""  # nothing came: nothing to answer
            assert anyio.current_time() - started >= SHORT


@pytest.mark.anyio
async def test_an_idle_kept_alive_connection_is_closed_at_the_idle_timeout(
    ios: ioserver.IOServer, root: Path
) -> None:
    options = {"head_timeout": LONG, "idle_timeout": SHORT}
    async with serving(ios, root, **options) as address, client(address) as http:
        # The server's idle clock starts once it has sent the response, which the client
        # reads later (under load, tens of milliseconds later: a clock started then read
        # 0.297 s against the 0.3 s timeout).  The request's sending comes before the
        # server's clock whatever the load, so measured from there the close can never
        # be early.  A close at once (no idle timeout at all) still fails.
        requested = anyio.current_time()
        response, body = await http.request("GET", "/data.json")
        assert (response.status_code, body) == (200, b'{"a": 1}\n')
        assert await read_to_eof(http.stream) == b""
        assert SHORT <= anyio.current_time() - requested < LONG


@pytest.mark.anyio
async def test_each_request_restarts_the_idle_timeout(ios: ioserver.IOServer, root: Path) -> None:
    # Twelve requests 50 ms apart keep one connection for 0.6 s: longer than the idle
    # timeout (0.5 s), never idle for long (a stall of 0.45 s would still pass).
    options = {"head_timeout": LONG, "idle_timeout": 0.5}
    async with serving(ios, root, **options) as address, client(address) as http:
        started = anyio.current_time()
        for _ in range(12):
            response, body = await http.request("GET", "/data.json")
            assert (response.status_code, body) == (200, b'{"a": 1}\n')
            await anyio.sleep(0.05)  # the client's pace, well below the idle timeout
        assert anyio.current_time() - started > 0.5


@pytest.mark.anyio
@pytest.mark.parametrize(
    "headers",
    [
        b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
        b"Transfer-Encoding: chunked\r\nContent-Length: 40\r\n",
    ],
    ids=["length-then-chunked", "chunked-then-length"],
)
async def test_content_length_with_transfer_encoding_gets_400_and_nothing_behind_it_is_served(
    ios: ioserver.IOServer, root: Path, headers: bytes
) -> None:
    # A proxy that reads Content-Length sees one request; a server that reads
    # Transfer-Encoding sees two - the second smuggled past the proxy.
    smuggled = b"GET /data.json HTTP/1.1\r\nHost: t\r\n\r\n"
    attack = b"POST /index.html HTTP/1.1\r\nHost: t\r\n" + headers + b"\r\n0\r\n\r\n" + smuggled
    options = {"head_timeout": LONG, "idle_timeout": LONG}
    async with serving(ios, root, **options) as address:
        async with client(address) as http:
            await http.stream.send(attack)
            data = await read_to_eof(http.stream)
            assert data.startswith(b"HTTP/1.1 400 "), data
            assert b"\r\nconnection: close\r\n" in data
            assert data.count(b"HTTP/1.1 ") == 1  # one answer, then closed
            assert b'{"a": 1}' not in data
        # The server goes on serving everyone else.
        async with client(address) as http:
            response, body = await http.request("GET", "/data.json")
            assert (response.status_code, body) == (200, b'{"a": 1}\n')


def test_the_command_takes_its_timeouts_and_curl_sees_them(root: Path) -> None:
    curl_path = curl()
    port = free_port()
    command = [sys.executable, "examples/httpd.py", "--port", str(port), "--root", str(root)]
    with running(*command, "--head-timeout", "0.5", "--idle-timeout", "0.5"):
        url = f"http://127.0.0.1:{port}"
        done = subprocess.run(
            [curl_path, "-s", f"{url}/data.json", f"{url}/index.html"],
            capture_output=True,
            timeout=20,
            check=False,
        )
        assert (done.returncode, done.stdout) == (0, b'{"a": 1}\n' + INDEX)
        status = ["-s", "-o", "/dev/null", "-w", "%{http_code}"]
        smuggling = ["-H", "Transfer-Encoding: chunked", "-H", "Content-Length: 3", "-d", "abc"]
        done = subprocess.run(
            [curl_path, *status, *smuggling, f"{url}/index.html"],
            capture_output=True,
            timeout=20,
            check=False,
        )
        assert done.stdout == b"400", done
        # A raw socket that sends half a head is closed after the head timeout.
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            raw.sendall(b"GET / HTTP/1.1\r\n")
            data = b""
            while chunk := raw.recv(4096):
                data += chunk
        assert data.startswith(b"HTTP/1.1 408 ")
