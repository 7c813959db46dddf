"""The command line as users meet it: the examples and ``ioserver`` run as subprocesses,
their exit statuses and what they print on standard error (issue 15, section 2)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

import client

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
BACKENDS = ["asyncio", "trio"]


def command(*args: str, timeout: float = 30, **kwargs: object) -> subprocess.CompletedProcess[str]:
    """Run ``python ARGS...`` in the repository, as a user would."""
    return subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(ROOT), **kwargs.pop("env", {})},  # type: ignore[dict-item]
        cwd=ROOT,
        **kwargs,  # type: ignore[call-overload]
    )


def ioserver_command(*args: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return command("-m", "ioserver", *args, **kwargs)


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A TCP port on 127.0.0.1 that a listener holds."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


@pytest.fixture
def runtime(tmp_path: Path) -> Path:
    """A private runtime directory: the default endpoint is ``<it>/ioserver/control``."""
    return tmp_path


def no_traceback(result: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in result.stderr, result.stderr
    assert "Exception Group" not in result.stderr, result.stderr


# -- failures exit non-zero with one line -----------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_echo_on_a_taken_port_says_so_in_one_line_and_exits_1(
    backend: str, taken_port: int
) -> None:
    result = command(str(EXAMPLES / "echo.py"), "--port", str(taken_port), "--backend", backend)
    assert result.returncode == 1, result.stderr
    assert result.stderr == (
        f"ioserver: cannot listen on 127.0.0.1:{taken_port}: Address already in use (EADDRINUSE)\n"
    )


@pytest.mark.parametrize(
    "example", ["chat", "framed_echo", "httpd", "kvstore", "supervised", "file_service"]
)
def test_every_tcp_example_exits_1_on_a_taken_port(example: str, taken_port: int) -> None:
    result = command(str(EXAMPLES / f"{example}.py"), "--port", str(taken_port))
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"ioserver: cannot listen on 127.0.0.1:{taken_port}: Address already in use (EADDRINUSE)"
    ]


def test_udp_echo_exits_1_on_a_taken_port() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as holder:
        holder.bind(("127.0.0.1", 0))
        result = command(str(EXAMPLES / "udp_echo.py"), "--port", str(holder.getsockname()[1]))
    assert result.returncode == 1, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "EADDRINUSE" in result.stderr


def test_file_service_client_on_a_closed_port_says_so_in_one_line_and_exits_1() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]  # bound, never listening: connections are refused
        result = command(str(EXAMPLES / "file_service.py"), "client", "--port", str(closed), "list")
    assert result.returncode == 1, result.stderr
    assert result.stderr == (
        f"ioserver: cannot connect to 127.0.0.1:{closed}: Connection refused (ECONNREFUSED)\n"
    )


# -- an app's own help and usage errors --------------------------------------------------
@pytest.mark.parametrize(
    "argv",
    [
        pytest.param([str(EXAMPLES / "echo.py"), "--help"], id="python-file"),
        pytest.param(["-m", "ioserver", "run", "examples/echo.py", "--", "--help"], id="run--"),
        pytest.param(["-m", "ioserver", "run", "examples/echo.py", "--help"], id="run"),
    ],
)
def test_an_apps_help_is_the_apps_own(argv: list[str]) -> None:
    result = command(*argv)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: echo "), result.stdout
    assert "--port PORT" in result.stdout
    assert result.stderr == ""


def test_run_help_before_the_app_is_runs_own() -> None:
    result = ioserver_command("run", "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: ioserver run "), result.stdout


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("how", ["python-file", "ioserver-run"])
def test_an_apps_usage_error_is_argparses_two_lines_and_status_2(backend: str, how: str) -> None:
    if how == "python-file":
        result = command(str(EXAMPLES / "echo.py"), "--prot", "7001", "--backend", backend)
    else:
        result = ioserver_command("run", "--backend", backend, "examples/echo.py", "--prot", "1")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert lines[0].startswith("usage: echo "), result.stderr
    assert lines[-1].startswith("echo: error: unrecognized arguments: --prot"), result.stderr
    assert len(lines) == 2, result.stderr


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_apps_usage_error_in_the_daemon_stops_it_with_status_2(
    backend: str, runtime: Path
) -> None:
    result = ioserver_command(
        "serve",
        "--backend",
        backend,
        "--app",
        "examples/chat.py --bogus",
        env={"XDG_RUNTIME_DIR": str(runtime)},
    )
    assert result.returncode == 2, result.stderr
    no_traceback(result)
    assert "chat: error: unrecognized arguments: --bogus" in result.stderr
    assert not (runtime / "ioserver" / "control").exists()


def test_serve_with_an_apps_option_prints_serves_usage_and_a_hint() -> None:
    result = ioserver_command("serve", "--port", "7000")
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("usage: ioserver serve "), result.stderr
    assert "ioserver serve: error: unrecognized arguments: --port 7000" in result.stderr
    assert "--app 'examples/echo.py --port 7000'" in result.stderr


@pytest.mark.parametrize("args", [["run", "missing.py"], ["serve", "--workers", "0"]])
def test_ioservers_own_usage_errors_exit_2_without_traceback(args: list[str]) -> None:
    result = ioserver_command(*args)
    assert result.returncode == 2, result.stderr
    no_traceback(result)


# -- a stale socket: the daemon died ------------------------------------------------------
@pytest.fixture
def stale_endpoint(runtime: Path) -> str:
    """The default endpoint with a socket file that nothing listens on (a dead daemon's)."""
    directory = runtime / "ioserver"
    directory.mkdir(mode=0o700)
    path = directory / "control"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(str(path))
        dead.listen()
    return f"ipc://{path}"


def test_status_on_a_stale_socket_says_so_at_once(stale_endpoint: str, runtime: Path) -> None:
    started = time.monotonic()
    result = ioserver_command("status", env={"XDG_RUNTIME_DIR": str(runtime)})
    assert time.monotonic() - started < 4  # not after the 5 s timeout
    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith("ioserver: stale socket, no daemon: "), result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr


@pytest.mark.anyio
async def test_connect_to_a_stale_socket_fails_at_once(stale_endpoint: str, no_leaks: None) -> None:
    with anyio.fail_after(1):  # the timeout is 5 s: this must not wait for it
        with pytest.raises(client.DaemonUnavailable, match=r"^stale socket, no daemon: "):
            async with client.connect(stale_endpoint, timeout=5):
                pass


def test_serve_replaces_a_stale_socket(stale_endpoint: str, runtime: Path) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "ioserver", "serve"],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT), "XDG_RUNTIME_DIR": str(runtime)},
        cwd=ROOT,
    )
    try:
        assert process.stderr is not None
        for line in process.stderr:
            if "serving" in line:
                break
        status = ioserver_command("status", env={"XDG_RUNTIME_DIR": str(runtime)})
        assert status.returncode == 0, status.stderr
    finally:
        process.terminate()
        assert process.wait(20) == 0
        assert process.stderr is not None
        process.stderr.close()


# -- an ipc:// endpoint the daemon cannot make ---------------------------------------------
def test_serve_where_the_sockets_directory_cannot_be_made_says_so_in_one_line(
    runtime: Path,
) -> None:
    # /proc takes no new directory, not even root's (as a directory under another user's
    # would refuse this user's).
    endpoint = "ipc:///proc/ioserver-test/control"
    result = ioserver_command(
        "serve", "--endpoint", endpoint, env={"XDG_RUNTIME_DIR": str(runtime)}
    )
    assert result.returncode == 1, result.stderr
    no_traceback(result)
    assert result.stderr.startswith(
        "ioserver: cannot make the control socket's directory /proc/ioserver-test: "
    ), result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr


def test_serve_on_a_socket_path_too_long_says_so_and_makes_no_directory(
    runtime: Path,
) -> None:
    directory = runtime / ("d" * 120)
    result = ioserver_command(
        "serve",
        "--endpoint",
        f"ipc://{directory}/control",
        env={"XDG_RUNTIME_DIR": str(runtime)},
    )
    assert result.returncode == 1, result.stderr
    no_traceback(result)
    assert result.stderr.startswith("ioserver: the socket path of ipc://"), result.stderr
    assert "is longer than the 107 bytes a Unix socket's path can have" in result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert not directory.exists()


# -- a CURVE key the daemon cannot use -----------------------------------------------------
@pytest.fixture
def curve_keys(tmp_path: Path) -> Path:
    """``server.key`` (public), ``server.key_secret``, an ``allowed`` directory, and a file
    that is no certificate."""
    import zmq.auth

    (tmp_path / "allowed").mkdir()
    zmq.auth.create_certificates(str(tmp_path), "server")
    (tmp_path / "garbage").write_text("not a certificate\n")
    return tmp_path


@pytest.mark.parametrize(
    ("key", "complaint"),
    [
        ("missing", "cannot read the CURVE secret key {path}: "),
        ("server.key", "{path} holds no secret key"),
        ("garbage", "cannot read the CURVE secret key {path}: "),
    ],
)
def test_serve_with_a_curve_key_it_cannot_use_exits_1_in_one_line(
    curve_keys: Path, runtime: Path, key: str, complaint: str
) -> None:
    path = curve_keys / key
    result = ioserver_command(
        "serve",
        "--endpoint",
        "tcp://127.0.0.1:0",
        "--curve-secret-key",
        str(path),
        "--curve-allowed-keys",
        str(curve_keys / "allowed"),
        env={"XDG_RUNTIME_DIR": str(runtime)},
        timeout=20,  # before: the daemon hung in its ZeroMQ context's term()
    )
    assert result.returncode == 1, result.stderr
    no_traceback(result)
    assert result.stderr.startswith("ioserver: " + complaint.format(path=path)), result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr


@pytest.mark.parametrize("which", ["--curve-server-key", "--curve-certificate"])
def test_status_with_a_curve_key_file_it_cannot_read_exits_1_in_one_line(
    curve_keys: Path, runtime: Path, which: str
) -> None:
    keys = {
        "--curve-server-key": str(curve_keys / "server.key"),
        "--curve-certificate": str(curve_keys / "server.key_secret"),
    }
    keys[which] = str(curve_keys / "missing")
    result = ioserver_command(
        "status",
        "tcp://127.0.0.1:1",
        *(word for pair in keys.items() for word in pair),
        "--timeout",
        "1",
        env={"XDG_RUNTIME_DIR": str(runtime)},
    )
    assert result.returncode == 1, result.stderr
    no_traceback(result)
    assert result.stderr.startswith(
        f"ioserver: cannot read the CURVE certificate {curve_keys / 'missing'}: "
    ), result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr
