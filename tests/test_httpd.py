"""examples/httpd.py: real HTTP/1.1 over sockets, with h11 as the client, and curl."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import h11
import pytest
from test_examples import free_port, load_example, running

import ioserver

httpd = load_example("httpd")

INDEX = b"<!doctype html><title>hello</title>\n" * 30
BUDGET = 64 * 1024


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A site: index.html, a JSON file, a directory with an index, a file over the
    budget, a symlink out of the root and an empty file; a secret outside it."""
    site = tmp_path / "site"
    (site / "sub").mkdir(parents=True)
    (site / "index.html").write_bytes(INDEX)
    (site / "data.json").write_bytes(b'{"a": 1}\n')
    (site / "sub" / "index.html").write_bytes(b"sub index\n")
    (site / "empty.txt").write_bytes(b"")
    (site / "big.bin").write_bytes(b"\0" * (BUDGET + 1))
    (tmp_path / "secret.txt").write_bytes(b"secret\n")
    (site / "escape.txt").symlink_to(tmp_path / "secret.txt")
    (site / "inside.txt").symlink_to(site / "data.json")
    return site


@asynccontextmanager
async def serving(ios: ioserver.IOServer, root: Path, **options: Any) -> AsyncIterator[Any]:
    options.setdefault("request_memory", BUDGET)
    async with anyio.create_task_group() as task_group:
        address = await task_group.start(
            lambda task_status: httpd.serve(
                ios, "127.0.0.1", 0, root=root, task_status=task_status, **options
            )
        )
        yield address[:2]
        task_group.cancel_scope.cancel()


class Client:
    """An HTTP/1.1 client: h11 over an anyio TCP stream."""

    def __init__(self, stream: anyio.abc.SocketStream) -> None:
        self.stream = stream
        self.connection = h11.Connection(h11.CLIENT)

    async def send_request(
        self, method: str, target: bytes | str, body: bytes = b"", headers: Any = ()
    ) -> None:
        all_headers = [("host", "test"), *headers]
        if body:
            all_headers.append(("content-length", str(len(body))))
        data = self.connection.send(h11.Request(method=method, target=target, headers=all_headers))
        assert data is not None
        if body:
            data += self.connection.send(h11.Data(data=body)) or b""
        data += self.connection.send(h11.EndOfMessage()) or b""
        await self.stream.send(data)

    async def next_event(self) -> Any:
        while True:
            event = self.connection.next_event()
            if event is not h11.NEED_DATA:
                return event
            try:
                data = await self.stream.receive()
            except anyio.EndOfStream:
                data = b""
            self.connection.receive_data(data)

    async def read_response(self) -> tuple[h11.Response, bytes]:
        with anyio.fail_after(10):
            response = await self.next_event()
            assert isinstance(response, h11.Response), response
            body = b""
            while True:
                event = await self.next_event()
                if isinstance(event, h11.EndOfMessage):
                    break
                body += event.data
        if self.connection.our_state is h11.DONE and self.connection.their_state is h11.DONE:
            self.connection.start_next_cycle()
        return response, body

    async def request(self, method: str, target: bytes | str, **options: Any) -> tuple[Any, bytes]:
        await self.send_request(method, target, **options)
        return await self.read_response()


@asynccontextmanager
async def client(address: tuple[str, int]) -> AsyncIterator[Client]:
    async with await anyio.connect_tcp(*address) as stream:
        yield Client(stream)


def header(response: h11.Response, name: bytes) -> bytes | None:
    return dict(response.headers).get(name)


@pytest.mark.anyio
async def test_get_and_head_with_length_and_type_on_one_kept_alive_connection(
    ios: ioserver.IOServer, root: Path
) -> None:
    async with serving(ios, root) as address, client(address) as http:
        response, body = await http.request("GET", "/index.html")
        assert response.status_code == 200
        assert body == INDEX
        assert header(response, b"content-length") == b"%d" % len(INDEX)
        assert header(response, b"content-type") == b"text/html; charset=utf-8"
        assert header(response, b"date") is not None
        response, body = await http.request("HEAD", "/data.json")
        assert response.status_code == 200
        assert body == b""
        assert header(response, b"content-length") == b"9"
        assert header(response, b"content-type") == b"application/json"
        for target, expected in [("/", INDEX), ("/sub/", b"sub index\n"), ("/empty.txt", b"")]:
            response, body = await http.request("GET", target)
            assert (response.status_code, body) == (200, expected)
        response, body = await http.request("GET", "/inside.txt?x=1")  # a symlink inside
        assert (response.status_code, body) == (200, b'{"a": 1}\n')


@pytest.mark.anyio
async def test_pipelined_requests_are_answered_in_order(ios: ioserver.IOServer, root: Path) -> None:
    targets = ["/index.html", "/nope", "/data.json", "/sub/index.html", "/big.bin", "/data.json"]
    expected = [(200, INDEX), (404, None), (200, b'{"a": 1}\n'), (200, b"sub index\n"),
                (500, None), (200, b'{"a": 1}\n')]  # fmt: skip
    async with serving(ios, root) as address, client(address) as http:
        raw = b"".join(
            b"GET %b HTTP/1.1\r\nHost: test\r\n\r\n" % target.encode() for target in targets
        )
        await http.stream.send(raw)  # all of them in one write
        leftover = b""
        for target, (status, body) in zip(targets, expected, strict=True):
            # h11's client sends no pipeline: one client state machine per response, fed
            # what the previous one left over.
            reader = Client(http.stream)
            reader.connection.send(
                h11.Request(method="GET", target=target, headers=[("host", "t")])
            )
            reader.connection.send(h11.EndOfMessage())
            if leftover:
                reader.connection.receive_data(leftover)
            response, received = await reader.read_response()
            leftover = reader.connection.trailing_data[0]
            assert response.status_code == status
            if body is not None:
                assert received == body


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("target", "status"),
    [
        (b"/../secret.txt", 404),
        (b"/sub/../../secret.txt", 404),
        (b"/%2e%2e/secret.txt", 404),
        (b"/%2E%2E/%2e%2e/etc/passwd", 404),
        (b"/sub/..%2f..%2fsecret.txt", 404),
        (b"/index.html%00.txt", 404),
        (b"/escape.txt", 403),
        (b"http://test/etc/passwd", 400),
        (b"/nope.html", 404),
        (b"/index.html/x", 404),
    ],
)
async def test_no_way_out_of_the_root(
    ios: ioserver.IOServer, root: Path, target: bytes, status: int
) -> None:
    async with serving(ios, root) as address, client(address) as http:
        response, body = await http.request("GET", target)
        assert response.status_code == status
        assert b"secret" not in body
        # The connection is still good.
        response, body = await http.request("GET", "/data.json")
        assert response.status_code == 200


@pytest.mark.anyio
async def test_other_methods_get_405_with_allow(ios: ioserver.IOServer, root: Path) -> None:
    async with serving(ios, root) as address, client(address) as http:
        response, _ = await http.request("POST", "/index.html", body=b"hello")
        assert response.status_code == 405
        assert header(response, b"allow") == b"GET, HEAD"
        response, _ = await http.request("DELETE", "/index.html")
        assert response.status_code == 405
        response, body = await http.request("GET", "/index.html")
        assert (response.status_code, body) == (200, INDEX)


@pytest.mark.anyio
async def test_a_body_over_the_budget_gets_413_and_the_connection_closed(
    ios: ioserver.IOServer, root: Path
) -> None:
    async with serving(ios, root) as address, client(address) as http:
        await http.send_request("POST", "/", body=b"x" * (BUDGET + 1))
        response, _ = await http.read_response()
        assert response.status_code == 413
        assert header(response, b"connection") == b"close"
        with anyio.fail_after(10), pytest.raises(anyio.EndOfStream):
            while True:  # the server closes after its answer
                await http.stream.receive()


@pytest.mark.anyio
async def test_a_chunked_body_growing_over_the_budget_gets_413(
    ios: ioserver.IOServer, root: Path
) -> None:
    async with serving(ios, root) as address, client(address) as http:
        request = h11.Request(
            method="POST", target="/", headers=[("host", "t"), ("transfer-encoding", "chunked")]
        )
        await http.stream.send(http.connection.send(request) or b"")
        chunk = http.connection.send(h11.Data(data=b"y" * 8192)) or b""
        for _ in range(BUDGET // 8192 + 1):
            await http.stream.send(chunk)
        with anyio.fail_after(10):
            response = await http.next_event()
        assert isinstance(response, h11.Response)
        assert response.status_code == 413


@pytest.mark.anyio
async def test_a_request_over_the_budget_gets_500_and_the_next_one_succeeds(
    ios: ioserver.IOServer, root: Path
) -> None:
    async with serving(ios, root) as address, client(address) as http, client(address) as other:
        response, _ = await http.request("GET", "/big.bin")
        assert response.status_code == 500
        response, body = await http.request("GET", "/index.html")
        assert (response.status_code, body) == (200, INDEX)
        # HEAD applies the same budget as GET would.
        response, _ = await http.request("HEAD", "/big.bin")
        assert response.status_code == 500
        response, body = await other.request("GET", "/data.json")
        assert response.status_code == 200


@pytest.mark.anyio
async def test_a_larger_budget_serves_the_large_file(ios: ioserver.IOServer, root: Path) -> None:
    async with serving(ios, root, request_memory=4 * BUDGET) as address, client(address) as http:
        response, body = await http.request("GET", "/big.bin")
        assert (response.status_code, len(body)) == (200, BUDGET + 1)


@pytest.mark.anyio
async def test_the_shared_pool_used_up_gives_503(ios: ioserver.IOServer, root: Path) -> None:
    async with serving(ios, root, handler_memory=400) as address, client(address) as http:
        response, _ = await http.request("GET", "/index.html")
        assert response.status_code == 503
        assert header(response, b"retry-after") == b"1"
        response, body = await http.request("GET", "/data.json")
        assert (response.status_code, body) == (200, b'{"a": 1}\n')


@pytest.mark.anyio
async def test_garbage_gets_400_and_the_connection_closed(
    ios: ioserver.IOServer, root: Path
) -> None:
    async with serving(ios, root) as address, client(address) as http:
        await http.stream.send(b"NOT HTTP AT ALL\r\n\r\n")
        data = b""
        with anyio.fail_after(10):
            try:
                while True:
                    data += await http.stream.receive()
            except anyio.EndOfStream:
                pass
        assert data.startswith(b"HTTP/1.1 400 ")


@pytest.mark.anyio
async def test_http_1_0_without_keep_alive_is_closed_after_the_response(
    ios: ioserver.IOServer, root: Path
) -> None:
    async with serving(ios, root) as address, client(address) as http:
        await http.stream.send(b"GET /data.json HTTP/1.0\r\n\r\n")
        data = b""
        with anyio.fail_after(10):
            try:
                while True:
                    data += await http.stream.receive()
            except anyio.EndOfStream:
                pass
        assert data.startswith(b"HTTP/1.1 200 ")
        assert data.endswith(b'\r\n\r\n{"a": 1}\n')


def test_request_budget_and_pool_accounting() -> None:
    pool = httpd.MemoryPool(100)
    first = httpd.RequestBudget(60, pool)
    second = httpd.RequestBudget(60, pool)
    first.charge(50, "file")
    with pytest.raises(httpd.BudgetExceeded) as caught:
        first.charge(11, "response")
    assert (caught.value.scope, caught.value.what, caught.value.used) == ("request", "response", 50)
    with pytest.raises(httpd.BudgetExceeded) as caught:
        second.charge(51, "body")
    assert caught.value.scope == "server"
    assert (first.used, second.used, pool.used) == (50, 0, 50)  # nothing charged on failure
    second.charge(50, "body")
    assert pool.used == pool.peak == 100
    first.release()
    first.release()
    assert (first.used, first.peak, pool.used) == (0, 50, 50)
    with pytest.raises(ValueError):
        httpd.RequestBudget(0)


def curl() -> str:
    path = shutil.which("curl")
    if path is None:
        pytest.skip("curl is not installed: apt-get install curl")
    return path


def test_curl_against_the_command(root: Path) -> None:
    """The example as users run it (a subprocess), queried by curl."""
    curl_path = curl()
    port = free_port()
    command = [sys.executable, str(httpd.__file__), "--port", str(port), "--root", str(root)]
    with running(*command, "--request-memory", "64k", "--memory-limit", "4M"):
        url = f"http://127.0.0.1:{port}"

        def fetch(*arguments: str) -> str:
            done = subprocess.run(
                [curl_path, "-s", "--path-as-is", *arguments],
                capture_output=True,
                timeout=20,
                check=False,
            )
            assert done.returncode == 0, done.stderr
            return done.stdout.decode()

        assert fetch(f"{url}/index.html") == INDEX.decode()
        status = ["-o", "/dev/null", "-w", "%{http_code}\n"]
        assert fetch(*status, f"{url}/../secret.txt") == "404\n"
        assert fetch(*status, f"{url}/escape.txt") == "403\n"
        assert fetch(*status, "-I", f"{url}/data.json") == "200\n"
        # Keep-alive: curl reuses one connection for two URLs, and says so.
        done = subprocess.run(
            [curl_path, "-sv", f"{url}/data.json", f"{url}/big.bin", f"{url}/data.json"],
            capture_output=True,
            timeout=20,
            check=False,
        )
        assert done.stdout.decode() == '{"a": 1}\n500 Internal Server Error\n{"a": 1}\n'
        assert b"Re-using existing connection" in done.stderr
    assert os.path.exists(root)
