"""The UDP and process-port examples, as users run them (scripts) and in-process."""

from __future__ import annotations

import glob
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import pytest

import ioserver

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def load_example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def children() -> set[int]:
    """This process's children, zombies included (Linux's /proc/PID/task/*/children)."""
    found: set[int] = set()
    for name in glob.glob(f"/proc/{os.getpid()}/task/*/children"):
        try:
            with open(name) as listing:
                found.update(int(pid) for pid in listing.read().split())
        except OSError:
            pass  # that thread ended meanwhile (its children are the process's own)
    return found


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextmanager
def running(*argv: str) -> Iterator[subprocess.Popen[str]]:
    """Run a server until it prints its first line (it is listening), then stop it with
    SIGINT as a user's Ctrl-C, and check that it exits cleanly."""
    process = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT
    )
    try:
        assert process.stdout is not None and process.stderr is not None
        first = process.stdout.readline()
        assert first, f"{argv} printed nothing; stderr: {process.stderr.read()[-2000:]}"
        yield process
        process.send_signal(signal.SIGINT)
        assert process.wait(15) == 0, process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        for pipe in (process.stdout, process.stderr):
            if pipe is not None:
                pipe.close()


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_udp_echo_answers_a_plain_udp_client_as_nc_u_would(backend: str) -> None:
    number = free_udp_port()
    script = str(EXAMPLES / "udp_echo.py")
    with (
        running(sys.executable, script, "--port", str(number), "--backend", backend) as server,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client,
    ):
        assert server.stdout is not None
        client.settimeout(10)
        client.connect(("127.0.0.1", number))
        for line in (b"hello udp\n", b"", b"x" * 60000):
            client.send(line)
            assert client.recv(65536) == line


def test_udp_echo_under_the_ioserver_command() -> None:
    number = free_udp_port()
    command = [sys.executable, "-m", "ioserver", "run", "examples/udp_echo.py", "--port"]
    with running(*command, str(number)), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.settimeout(10)
        client.sendto(b"via ioserver run", ("127.0.0.1", number))
        data, address = client.recvfrom(100)
        assert (data, address) == (b"via ioserver run", ("127.0.0.1", number))


@pytest.mark.parametrize("program", ["python", "bc"])
def test_port_program_answers_each_expression_and_reports_the_exit(program: str) -> None:
    if program == "bc" and not shutil.which("bc"):
        pytest.skip("bc is not installed: apt-get install bc")
    script = str(EXAMPLES / "port_program.py")
    result = subprocess.run(
        [sys.executable, script, "--program", program, "1+2", "6*7", "(2+3)*4"],
        capture_output=True,
        text=True,
        timeout=30,
        env=ENV,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[1:4] == ["1+2 = 3", "6*7 = 42", "(2+3)*4 = 20"]
    assert lines[4].endswith("exited with status 0")


@pytest.mark.anyio
async def test_port_program_in_process_leaves_no_process_behind(
    ios: ioserver.IOServer, capsys: pytest.CaptureFixture[str]
) -> None:
    example = load_example("port_program")
    before = children()
    status = await example.calculate(
        ios, example.calculator("python"), ["2*21", "nonsense(", "7-8"]
    )
    assert status == 0
    output = capsys.readouterr().out.splitlines()
    assert output[0] == "2*21 = 42"
    assert output[1].startswith("nonsense( = error:")
    assert output[2] == "7-8 = -1"
    assert children() == before  # the program was reaped once its ExitStatus arrived
