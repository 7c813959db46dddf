"""The examples as users run them: in-process (the 200-member chat) and as real commands."""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import anyio
import anyio.abc
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream

import ioserver

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def load_example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


chat = load_example("chat")

MEMBERS = 200
LINES = 3


@pytest.mark.anyio
async def test_chat_with_200_members_delivers_every_line_once_in_order(
    ios: ioserver.IOServer,
) -> None:
    received: dict[int, list[bytes]] = {}
    async with anyio.create_task_group() as server:
        host, number = await server.start(chat.serve, ios, "127.0.0.1", 0)
        streams = []
        readers = []
        names = []
        for _ in range(MEMBERS):
            stream = await anyio.connect_tcp(host, number)
            reader = BufferedByteReceiveStream(stream)
            welcome = await reader.receive_until(b"\n", 1024)
            assert welcome.startswith(b"* welcome, you are ")
            names.append(welcome.rsplit(b" ", 1)[1])
            streams.append(stream)
            readers.append(reader)
        # Everyone has joined: now everyone talks.
        expected_count = (MEMBERS - 1) * LINES

        async def member(index: int) -> None:
            for line in range(LINES):
                await streams[index].send(b"line %d\n" % line)
            lines = received.setdefault(index, [])
            while len(lines) < expected_count:
                text = await readers[index].receive_until(b"\n", 1024)
                if not text.startswith(b"* "):  # skip join/leave notices
                    lines.append(text)

        with anyio.fail_after(60):
            async with anyio.create_task_group() as members:
                for index in range(MEMBERS):
                    members.start_soon(member, index)
        for stream in streams:
            await stream.aclose()
        server.cancel_scope.cancel()

    expected = {name + b": line %d" % line for name in names for line in range(LINES)}
    orders = []
    for index in range(MEMBERS):
        lines = received[index]
        mine = {names[index] + b": line %d" % line for line in range(LINES)}
        assert len(lines) == expected_count
        assert set(lines) == expected - mine  # every other member's line, exactly once
        for name in names:  # each sender's lines in the order it sent them
            theirs = [text for text in lines if text.startswith(name + b": ")]
            assert theirs in ([], [name + b": line %d" % line for line in range(LINES)])
        orders.append(lines)
    # The room has one order: any two members saw the lines of third parties in the same
    # sequence.
    first, second = orders[0], orders[1]
    others = {names[0], names[1]}

    def third_party(lines: list[bytes]) -> list[bytes]:
        return [text for text in lines if text.split(b":")[0] not in others]

    assert third_party(first) == third_party(second)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextmanager
def running(*argv: str) -> Iterator[subprocess.Popen[str]]:
    """Run a command until it prints its first line (it is listening), then stop it
    with SIGINT as a user's Ctrl-C, and check that it exits cleanly."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT
    )
    try:
        assert process.stdout is not None
        first = process.stdout.readline()
        assert first, f"{argv} printed nothing; stderr: {process.stderr.read()[-2000:]}"  # type: ignore[union-attr]
        yield process
        process.send_signal(signal.SIGINT)
        assert process.wait(15) == 0, process.stderr.read()  # type: ignore[union-attr]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        for pipe in (process.stdout, process.stderr):
            if pipe is not None:
                pipe.close()


def connect(number: int) -> socket.socket:
    client = socket.create_connection(("127.0.0.1", number), timeout=10)
    return client


def read_line(client: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = client.recv(1)
        assert chunk, "connection closed"
        data += chunk
    return data


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_echo_example_runs_as_a_script(backend: str) -> None:
    number = free_port()
    script = str(EXAMPLES / "echo.py")
    command = (sys.executable, script, "--port", str(number), "--backend", backend)
    with running(*command), connect(number) as client:
        client.sendall(b"hello echo")
        data = b""
        while len(data) < 10:
            data += client.recv(100)
        assert data == b"hello echo"


@pytest.mark.parametrize("poller", [None, "poll", "select"])
def test_chat_runs_under_the_ioserver_command_and_relays_between_two_clients(
    poller: str | None,
) -> None:
    number = free_port()
    command = [sys.executable, "-m", "ioserver", "run", "examples/chat.py", "--port"]
    if poller is not None:  # `ioserver run --poller NAME`: the app's port under that one
        command[4:4] = ["--poller", poller]
    with running(*command, str(number)), connect(number) as alice, connect(number) as bob:
        assert read_line(alice).startswith(b"* welcome")
        assert read_line(bob).startswith(b"* welcome")
        assert read_line(alice).endswith(b"joined\n")  # bob's arrival
        alice.sendall(b"hi bob\n")
        assert read_line(bob).endswith(b": hi bob\n")
        bob.sendall(b"hi alice\n")
        assert read_line(alice).endswith(b": hi alice\n")


def test_ioserver_command_reports_a_missing_app_clearly() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ioserver", "run", "no/such/app.py"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
    )
    assert result.returncode == 2
    assert "no app file 'no/such/app.py'" in result.stderr


def test_framed_echo_example_with_a_plain_socket_client() -> None:
    number = free_port()
    script = str(EXAMPLES / "framed_echo.py")
    command = (sys.executable, script, "--port", str(number), "--packet", "4")
    with running(*command), connect(number) as client:  # the docstring's client
        client.sendall(struct.pack(">I", 5) + b"hello")
        size = struct.unpack(">I", client.recv(4, socket.MSG_WAITALL))[0]
        assert client.recv(size, socket.MSG_WAITALL) == b"hello"


def test_a_client_that_resets_mid_send_does_not_stop_the_echo_server() -> None:
    number = free_port()
    script = str(EXAMPLES / "echo.py")
    with running(sys.executable, script, "--port", str(number)):
        hog = connect(number)
        hog.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        hog.setblocking(False)
        try:
            for _ in range(2000):  # fill both directions: its actor blocks in send
                hog.send(b"x" * 65536)
        except BlockingIOError:
            pass
        hog.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        hog.close()  # reset
        with connect(number) as client:
            client.sendall(b"still serving")
            assert client.recv(100, socket.MSG_WAITALL) in (b"still serving",)


def test_ioserver_command_reports_a_port_in_use_in_one_line() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        number = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "ioserver", "run", "examples/echo.py", "--port", str(number)],
            capture_output=True,
            text=True,
            timeout=30,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
    assert result.returncode == 1
    assert f"ioserver: cannot listen on 127.0.0.1:{number}" in result.stderr
    assert "EADDRINUSE" in result.stderr
    assert "Traceback" not in result.stderr
