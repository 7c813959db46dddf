"""examples/supervised.py: a crashed connection handler is restarted on its connection,
the other connections never notice, and a handler that keeps crashing loses its client."""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import anyio
import anyio.abc
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream

import ioserver

ROOT = Path(__file__).resolve().parent.parent


def load_example() -> ModuleType:
    path = ROOT / "examples" / "supervised.py"
    spec = importlib.util.spec_from_file_location("example_supervised", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


supervised = load_example()


class Client:
    def __init__(self, stream: anyio.abc.SocketStream) -> None:
        self.stream = stream
        self.reader = BufferedByteReceiveStream(stream)

    async def line(self) -> bytes:
        with anyio.fail_after(10):
            return await self.reader.receive_until(b"\n", 1024)

    async def ask(self, line: bytes) -> bytes:
        await self.stream.send(line + b"\n")
        return await self.line()


async def connect(address: tuple[str, int]) -> Client:
    client = Client(await anyio.connect_tcp(*address))
    assert await client.line() == b"* handler ready"
    return client


@pytest.mark.anyio
async def test_a_crashed_handler_is_restarted_and_the_others_are_unaffected(
    ios: ioserver.IOServer,
) -> None:
    async with anyio.create_task_group() as server:
        address = await server.start(supervised.serve, ios, "127.0.0.1", 0)
        alice, bob = await connect(address), await connect(address)
        assert await alice.ask(b"hello") == b"HELLO"
        assert await bob.ask(b"hi") == b"HI"
        # Alice's handler crashes: a new one greets her on the same connection.
        assert await alice.ask(b"crash") == b"* handler ready"
        assert await alice.ask(b"still here") == b"STILL HERE"
        assert await bob.ask(b"unaffected") == b"UNAFFECTED"  # bob saw nothing
        # Past MAX_RESTARTS crashes within PERIOD, alice's supervisor gives up: her
        # connection closes; bob's goes on.
        for _ in range(supervised.MAX_RESTARTS - 1):
            assert await alice.ask(b"crash") == b"* handler ready"
        await alice.stream.send(b"crash\n")
        with anyio.fail_after(10), pytest.raises(anyio.IncompleteRead):
            await alice.line()
        assert await bob.ask(b"still served") == b"STILL SERVED"
        carol = await connect(address)  # new clients are still accepted
        assert await carol.ask(b"new") == b"NEW"
        for client in (alice, bob, carol):
            await client.stream.aclose()
        server.cancel_scope.cancel()


@pytest.mark.anyio
async def test_a_client_that_leaves_ends_its_supervisor_and_port(ios: ioserver.IOServer) -> None:
    async with anyio.create_task_group() as server:
        address = await server.start(supervised.serve, ios, "127.0.0.1", 0)
        client = await connect(address)
        assert await client.ask(b"bye") == b"BYE"
        await client.stream.send_eof()  # the handler returns: its supervisor shuts down
        with anyio.fail_after(10), pytest.raises(anyio.EndOfStream):
            await client.stream.receive()  # the server closed its side: the port closed
        await client.stream.aclose()
        server.cancel_scope.cancel()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def read_line(client: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = client.recv(1)
        assert chunk, "connection closed"
        data += chunk
    return data


def test_the_example_runs_under_the_ioserver_command_as_users_run_it() -> None:
    number = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "ioserver", "run", "examples/supervised.py", "--port", str(number)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert process.stdout is not None and process.stderr is not None
        first = process.stdout.readline()
        assert "supervised line service on 127.0.0.1" in first, process.stderr.read()[-2000:]
        with socket.create_connection(("127.0.0.1", number), timeout=10) as client:
            assert read_line(client) == b"* handler ready\n"
            client.sendall(b"crash\n")
            assert read_line(client) == b"* handler ready\n"
            client.sendall(b"ok\n")
            assert read_line(client) == b"OK\n"
        process.send_signal(signal.SIGINT)
        assert process.wait(15) == 0
        assert "Crash: asked to crash" in process.stderr.read()  # the crash was logged
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        for pipe in (process.stdout, process.stderr):
            if pipe is not None:
                pipe.close()
