"""``ioserver serve`` as a service (issue 15, section 3): SIGHUP, logging options, the
``--config`` file and ``IOSERVER_*`` variables.  The daemon runs as a real subprocess."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest
import zmq
from prometheus_client.parser import text_string_to_metric_families

from ioserver import _protocol as P
from ioserver._cli import _parse_serve, _parser
from ioserver._config import apply_defaults

# No I/O core of $IOSERVER_CORE's choice (its daemons run on the default core: environment()
# passes them no IOSERVER_* variable): CI's second pass, on the Python core, leaves these
# tests out (tests/conftest.py checks the mark).
pytestmark = pytest.mark.core_independent

ROOT = Path(__file__).resolve().parent.parent


def environment(runtime: Path, **more: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IOSERVER_")}
    return {**env, "PYTHONPATH": str(ROOT), "XDG_RUNTIME_DIR": str(runtime), **more}


def cli(runtime: Path, *args: str, **more: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ioserver", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env=environment(runtime, **more),
        cwd=ROOT,
    )


class Daemon:
    """``ioserver serve ARGS`` with its standard error read line by line."""

    def __init__(self, runtime: Path, *args: str, **more: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "ioserver", "serve", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=environment(runtime, **more),
            cwd=ROOT,
        )
        assert self.process.stderr is not None
        self.stderr: IO[str] = self.process.stderr
        self.lines: list[str] = []
        self.terminated = False

    def wait_for(self, text: str) -> str:
        """The next line of the log that contains ``text`` (EOF fails the test)."""
        for line in self.stderr:
            self.lines.append(line)
            if text in line:
                return line
        raise AssertionError(f"the daemon ended before {text!r}: {''.join(self.lines)}")

    def terminate(self) -> None:
        """SIGTERM, once: a second one during the shutdown would be its default action."""
        if not self.terminated:
            self.terminated = True
            self.process.terminate()

    def stop(self) -> int:
        if self.process.poll() is None:
            self.terminate()
        status = self.process.wait(20)
        self.lines += self.stderr.readlines()
        self.stderr.close()
        assert self.process.stdout is not None
        self.process.stdout.close()
        return status


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    started: list[Daemon] = []
    yield started
    for daemon in started:
        if daemon.process.poll() is None:
            # SIGTERM first: a supervisor stops its workers (SIGKILL would orphan them).
            daemon.terminate()
            try:
                daemon.process.wait(20)
            except subprocess.TimeoutExpired:
                daemon.process.kill()
                daemon.process.wait()
        if not daemon.stderr.closed:
            daemon.stderr.close()
        if daemon.process.stdout is not None and not daemon.process.stdout.closed:
            daemon.process.stdout.close()


def open_session(endpoint: str, context: zmq.Context[zmq.Socket[bytes]]) -> zmq.Socket[bytes]:
    """A client session held open (HELLO answered with WELCOME) on a raw ZeroMQ socket."""
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    sock.send(P.pack([[P.HELLO, P.VERSION]]))
    assert sock.poll(10_000), "no WELCOME"
    (reply,) = P.unpack(sock.recv())
    assert reply[0] == P.WELCOME, reply
    return sock


# -- SIGHUP -------------------------------------------------------------------------------
def test_sighup_reopens_the_log_and_reloads_the_limits_and_the_daemon_lives_on(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    log_file = tmp_path / "daemon.log"
    log_config = tmp_path / "logging.json"
    log_config.write_text(
        json.dumps(
            {
                "version": 1,
                "formatters": {"plain": {"format": "%(levelname)s %(message)s"}},
                "handlers": {
                    "file": {
                        "class": "logging.FileHandler",
                        "filename": str(log_file),
                        "formatter": "plain",
                    },
                    "stderr": {"class": "logging.StreamHandler", "formatter": "plain"},
                },
                "root": {"level": "INFO", "handlers": ["file", "stderr"]},
            }
        )
    )
    config = tmp_path / "ioserver.toml"
    config.write_text(f'max-sessions = 1\nlog-config = "{log_config}"\n')
    daemon = Daemon(tmp_path, "--config", str(config))
    daemons.append(daemon)
    daemon.wait_for("serving")
    endpoint = f"ipc://{tmp_path}/ioserver/control"
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        held = open_session(endpoint, context)
        # The one session allowed is taken: `status` (a second session) is refused.
        refused = cli(tmp_path, "status", "--timeout", "5")
        assert refused.returncode == 1 and "limit" in refused.stderr, refused.stderr
        # logrotate moves the file away; the limit is raised in the file; then SIGHUP.
        log_file.rename(tmp_path / "daemon.log.1")
        config.write_text(f'max-sessions = 2\nlog-config = "{log_config}"\n')
        daemon.process.send_signal(signal.SIGHUP)
        line = daemon.wait_for("configuration reloaded")
        assert "max-sessions 2" in line
        status = cli(tmp_path, "status", "--timeout", "5")
        assert status.returncode == 0, status.stderr
        held.close()
    finally:
        context.term()
    # A configuration that is wrong now: logged, the running one stays.
    config.write_text("max-sesions = 3\n")
    daemon.process.send_signal(signal.SIGHUP)
    line = daemon.wait_for("not reloaded")
    assert "unknown key 'max-sesions'" in line
    assert cli(tmp_path, "status", "--timeout", "5").returncode == 0
    assert daemon.stop() == 0
    # The old file ends with the SIGHUP; the new one, opened by name, goes on from there.
    rotated = (tmp_path / "daemon.log.1").read_text()
    assert "daemon serving" in rotated
    assert rotated.splitlines()[-1].startswith("INFO SIGHUP received")
    reopened = log_file.read_text()
    assert "configuration reloaded" in reopened and "daemon serving" not in reopened
    assert "daemon stopped" in reopened
    assert not (tmp_path / "ioserver" / "control").exists()
    # `ioserver status` sessions (no port) leave nothing in the log at INFO.
    assert not [line for line in daemon.lines if "client " in line], daemon.lines


def test_sighup_before_the_event_loop_does_not_kill_the_daemon(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    # An app that takes a while to load: SIGHUP arrives while the daemon starts.
    slow = tmp_path / "slow.py"
    slow.write_text(
        "import sys\nprint('loading', file=sys.stderr, flush=True)\n"
        "sys.stdin.readline()\n\nasync def main(ios, argv):\n    pass\n"
    )
    # Buffered stderr, as a service has it (PYTHONUNBUFFERED unbuffers it, and a write
    # to an unbuffered stream cannot be re-entered: the bug below did not show then).
    env = environment(tmp_path)
    env.pop("PYTHONUNBUFFERED", None)
    process = subprocess.Popen(
        [sys.executable, "-m", "ioserver", "serve", "--app", str(slow)],
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    )
    try:
        assert process.stderr is not None and process.stdin is not None
        assert process.stderr.readline() == "loading\n"
        process.send_signal(signal.SIGHUP)
        process.stdin.write("go\n")
        process.stdin.flush()
        lines = []
        for line in process.stderr:
            lines.append(line)
            if "serving" in line:
                break
        process.terminate()
        assert process.wait(20) == 0, "".join(lines)
        # Said once the event loop runs, not from the handler (which interrupted the
        # app's own write to stderr: a nested write there killed the daemon).
        assert any("SIGHUP received while starting" in line for line in lines), lines
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stderr.close()
        process.stdin.close()


# -- logging ------------------------------------------------------------------------------
def test_log_format_json_writes_one_object_per_line(tmp_path: Path, daemons: list[Daemon]) -> None:
    daemon = Daemon(tmp_path, "--log-format", "json")
    daemons.append(daemon)
    entry = json.loads(daemon.wait_for("serving"))
    assert entry["level"] == "INFO" and entry["logger"] == "ioserver"
    assert entry["message"].startswith("ioserver daemon serving ipc://")
    assert entry["pid"] == daemon.process.pid
    assert daemon.stop() == 0
    for line in daemon.lines:
        json.loads(line)


@pytest.mark.parametrize(
    ("content", "suffix", "complaint"),
    [
        ('{"version": 1, "root": {"level": "LOUD"}}', ".json", "LOUD"),
        ("version = [", ".toml", "logging.toml"),
        ('{"handlers": {}}', ".json", "version = 1"),
    ],
)
def test_a_bad_log_config_is_one_line_and_status_2(
    tmp_path: Path, content: str, suffix: str, complaint: str
) -> None:
    path = tmp_path / f"logging{suffix}"
    path.write_text(content)
    result = cli(tmp_path, "serve", "--log-config", str(path))
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1].startswith("ioserver serve: error: --log-config ")
    assert complaint in result.stderr


def test_a_toml_log_config_configures_the_daemons_logging(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    path = tmp_path / "logging.toml"
    path.write_text(
        'version = 1\n[formatters.f]\nformat = "TOML %(message)s"\n'
        '[handlers.h]\nclass = "logging.StreamHandler"\nformatter = "f"\n'
        '[root]\nlevel = "INFO"\nhandlers = ["h"]\n'
    )
    daemon = Daemon(tmp_path, "--log-config", str(path))
    daemons.append(daemon)
    assert daemon.wait_for("serving").startswith("TOML ioserver daemon serving")
    assert daemon.stop() == 0


# -- --config and IOSERVER_* ----------------------------------------------------------------
def parse(argv: list[str], environ: dict[str, str]) -> object:
    _, commands = _parser()
    parser = commands["serve"]
    apply_defaults(parser, argv, environ)
    return parser.parse_args(argv)


def test_the_command_line_beats_the_environment_beats_the_file_beats_the_default(
    tmp_path: Path,
) -> None:
    config = tmp_path / "ioserver.toml"
    config.write_text(
        "heartbeat = 2.5\ngrace = 7\nmax-ports = 10\nmax_sessions = 11\n"
        'app = ["a.py", "b.py --port 1"]\nallow-all-interfaces = true\n'
    )
    environ = {"IOSERVER_CONFIG": str(config), "IOSERVER_GRACE": "8", "IOSERVER_MAX_PORTS": "12"}
    options = parse(["--max-ports", "13"], environ)
    assert (
        vars(options).items()
        >= {
            "heartbeat": 2.5,  # the file
            "grace": 8.0,  # the environment over the file
            "max_ports": 13,  # the command line over both
            "max_sessions": 11,
            "allow_all_interfaces": True,
            "max_frame": 1 << 20,  # the default
        }.items()
    )
    assert vars(options)["app"] == ["a.py", "b.py --port 1"]
    # One --app on the command line replaces the file's apps; two are two.
    assert vars(parse(["--app", "c.py"], environ))["app"] == ["c.py"]
    assert vars(parse(["--app", "c.py", "--app", "d.py"], environ))["app"] == ["c.py", "d.py"]
    assert vars(parse([], {"IOSERVER_APP": "x.py\ny.py --port 2"}))["app"] == [
        "x.py",
        "y.py --port 2",
    ]
    assert vars(parse([], {"IOSERVER_UVLOOP": "no"}))["uvloop"] is False
    # --poller as every flag: the file, the variable, the command line.
    config.write_text('poller = "poll"\n')
    assert vars(parse([], {"IOSERVER_CONFIG": str(config)}))["poller"] == "poll"
    assert (
        vars(parse([], {"IOSERVER_CONFIG": str(config), "IOSERVER_POLLER": "select"}))["poller"]
        == "select"
    )
    assert vars(parse(["--poller", "epoll"], {"IOSERVER_POLLER": "select"}))["poller"] == "epoll"
    assert vars(parse([], {}))["poller"] is None  # the platform's best


@pytest.mark.parametrize(
    ("content", "environ", "complaint"),
    [
        ("max-sesions = 3\n", {}, "ioserver.toml: unknown key 'max-sesions'"),
        ('heartbeat = "soon"\n', {}, "ioserver.toml: key 'heartbeat': expected a number"),
        ("max-ports = 1.5\n", {}, "key 'max-ports': expected an integer"),
        ('backend = "curio"\n', {}, "key 'backend': 'curio' is not one of asyncio, trio"),
        ("", {"IOSERVER_POLLER": "kqueue"}, "IOSERVER_POLLER: 'kqueue' is not one of epoll, poll"),
        ("heartbeat = \n", {}, "ioserver.toml: not valid TOML"),
        ("", {"IOSERVER_MAX_FRAME": "big"}, "environment variable IOSERVER_MAX_FRAME: expected"),
        ("", {"IOSERVER_ALLOW_ALL_INTERFACES": "maybe"}, "IOSERVER_ALLOW_ALL_INTERFACES: expe"),
    ],
)
def test_a_wrong_setting_is_named_in_one_line_with_status_2(
    tmp_path: Path, content: str, environ: dict[str, str], complaint: str
) -> None:
    config = tmp_path / "ioserver.toml"
    config.write_text(content)
    result = cli(tmp_path, "serve", "--config", str(config), **environ)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert complaint in result.stderr.splitlines()[-1], result.stderr


def test_the_environment_reaches_the_daemon(tmp_path: Path, daemons: list[Daemon]) -> None:
    endpoint = f"ipc://{tmp_path}/elsewhere/control"
    daemon = Daemon(tmp_path, IOSERVER_ENDPOINT=endpoint, IOSERVER_LOG_FORMAT="json")
    daemons.append(daemon)
    assert endpoint in json.loads(daemon.wait_for("serving"))["message"]
    assert cli(tmp_path, "status", endpoint).returncode == 0
    assert daemon.stop() == 0


def test_the_poller_chosen_in_the_environment_is_in_status_and_metrics(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    endpoint = f"ipc://{tmp_path}/control"
    daemon = Daemon(
        tmp_path,
        "--metrics",
        "127.0.0.1:0",
        "--app",
        "examples/echo.py --port 0",
        IOSERVER_ENDPOINT=endpoint,
        IOSERVER_POLLER="select",
    )
    daemons.append(daemon)
    line = daemon.wait_for("metrics on http://")
    assert daemon.process.stdout is not None
    number = int(daemon.process.stdout.readline().split()[-1].rsplit(":", 1)[-1])
    with socket.create_connection(("127.0.0.1", number), timeout=10) as client:
        client.sendall(b"under select")  # the app's port, served by the select poller
        assert client.recv(100) == b"under select"
    status = cli(tmp_path, "status", endpoint, "--json")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["workers"][0]["poller"] == "select"
    text = cli(tmp_path, "status", endpoint)
    assert "poller select" in text.stdout
    samples = scrape(line)
    assert samples[("ioserver_poller", (("poller", "select"), ("worker", "0")))] == 1
    assert daemon.stop() == 0


def test_a_missing_config_file_is_one_line(tmp_path: Path) -> None:
    result = cli(tmp_path, "serve", "--config", str(tmp_path / "none.toml"))
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1].endswith("none.toml: No such file or directory")


def test_parse_serve_keeps_the_arguments_for_the_workers() -> None:
    _, commands = _parser()
    options = _parse_serve(commands["serve"], ["--max-ports", "3"])
    assert options.arguments == ["--max-ports", "3"]


# -- metrics ------------------------------------------------------------------------------
def scrape(line: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """GET the /metrics URL in the daemon's log ``line``; the samples by name and labels."""
    url = re.search(r"http://\S+/metrics", line)
    assert url is not None, line
    with urllib.request.urlopen(url.group(0), timeout=10) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_metrics_are_scraped_over_http_in_the_prometheus_format(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    daemon = Daemon(tmp_path, "--metrics", "127.0.0.1:0", "--app", "examples/echo.py --port 0")
    daemons.append(daemon)
    line = daemon.wait_for("metrics on http://")
    assert daemon.process.stdout is not None
    assert daemon.process.stdout.readline().startswith("echo listening on")
    samples = scrape(line)
    worker = (("worker", "0"),)
    assert samples[("ioserver_up", worker)] == 1
    assert samples[("ioserver_ports", (("kind", "tcp_listeners"), ("worker", "0")))] == 1
    assert samples[("ioserver_bytes_in_total", worker)] == 0
    assert ("ioserver_memory_in_use_bytes", worker) in samples
    assert ("ioserver_event_queue_depth", worker) in samples
    assert ("ioserver_faults_total", worker) in samples
    wakes = (("direction", "to_io"), ("outcome", "sent"), ("worker", "0"))
    assert samples[("ioserver_wakes_total", wakes)] >= 1
    assert daemon.stop() == 0


def test_metrics_per_worker_from_the_supervisor(tmp_path: Path, daemons: list[Daemon]) -> None:
    daemon = Daemon(tmp_path, "--metrics", "127.0.0.1:0", "--workers", "2")
    daemons.append(daemon)
    line = daemon.wait_for("metrics on http://")
    daemon.wait_for("daemon worker")  # the workers start in either order
    daemon.wait_for("daemon worker")
    samples = scrape(line)
    assert samples[("ioserver_up", (("worker", "0"),))] == 1
    assert samples[("ioserver_up", (("worker", "1"),))] == 1
    assert samples[("ioserver_worker_restarts_total", (("worker", "1"),))] == 0
    assert daemon.stop() == 0
    assert len([entry for entry in daemon.lines if "metrics on http://" in entry]) == 1


@pytest.mark.parametrize(
    ("address", "complaint"),
    [
        ("0.0.0.0:9100", "refusing to serve metrics on 0.0.0.0:9100 (not a loopback address)"),
        ("example.org:9100", "--metrics takes HOST:PORT with a numeric address"),
        ("127.0.0.1:99999", "--metrics: port 99999 is out of range"),
    ],
)
def test_a_metrics_address_is_refused_in_one_line(
    tmp_path: Path, address: str, complaint: str
) -> None:
    result = cli(tmp_path, "serve", "--metrics", address)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"ioserver: {complaint}"), result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr


def test_a_taken_metrics_port_is_a_runtime_error(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        result = cli(tmp_path, "serve", "--metrics", f"127.0.0.1:{taken}")
    assert result.returncode == 1, result.stderr
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith(f"ioserver: cannot serve metrics on 127.0.0.1:{taken}: ")
    )


# -- systemd --------------------------------------------------------------------------------
@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A real AF_UNIX datagram socket standing in for systemd's ``NOTIFY_SOCKET``."""
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(20)
        yield sock, str(path)


def notification(sock: socket.socket) -> dict[str, str]:
    datagram = sock.recv(4096).decode()
    return dict(line.split("=", 1) for line in datagram.split("\n"))


def test_type_notify_readiness_reload_and_stopping(
    tmp_path: Path, daemons: list[Daemon], notify_socket: tuple[socket.socket, str]
) -> None:
    sock, path = notify_socket
    daemon = Daemon(tmp_path, NOTIFY_SOCKET=path)
    daemons.append(daemon)
    ready = notification(sock)
    assert ready["READY"] == "1"
    assert ready["MAINPID"] == str(daemon.process.pid)
    assert ready["STATUS"].startswith("serving ipc://")
    # Ready means ready: the control endpoint answers.
    assert cli(tmp_path, "status").returncode == 0
    daemon.process.send_signal(signal.SIGHUP)
    reloading = notification(sock)
    assert reloading["RELOADING"] == "1" and int(reloading["MONOTONIC_USEC"]) > 0
    assert notification(sock)["READY"] == "1"
    daemon.terminate()
    assert notification(sock)["STOPPING"] == "1"
    assert daemon.stop() == 0


def test_type_notify_in_the_abstract_namespace_with_workers(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    name = f"ioserver-test-{os.getpid()}-{id(tmp_path)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(20)
        daemon = Daemon(tmp_path, "--workers", "2", NOTIFY_SOCKET="@" + name)
        daemons.append(daemon)
        ready = notification(sock)
        assert ready["READY"] == "1" and ready["MAINPID"] == str(daemon.process.pid)
        assert ready["STATUS"].startswith("supervising 2 workers")
        daemon.terminate()
        assert notification(sock)["STOPPING"] == "1"  # the supervisor's, once
        assert daemon.stop() == 0
        sock.setblocking(False)
        with pytest.raises(BlockingIOError):  # the workers did not speak for the service
            sock.recv(4096)


# What systemd does between fork and exec: the passed socket at descriptor 3, and
# LISTEN_PID set to the pid that exec keeps.
ACTIVATE = """\
import os, sys
fd = int(sys.argv[1])
os.dup2(fd, 3)
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS="1", LISTEN_FDNAMES="web")
os.execv(sys.executable, [sys.executable, "-m", "ioserver", *sys.argv[2:]])
"""

UNIX_ECHO = """\
import sys
import ports


async def main(ios, argv):
    async with await ports.listen_unix(ios, argv[0]) as listener:
        print("listening", flush=True)
        async for accepted in listener:
            async with accepted.port as port:
                async for message in port:
                    if isinstance(message, ports.Data):
                        await port.send(message.data)
"""


def activated(
    runtime: Path, listener: socket.socket, *args: str, **more: str
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", ACTIVATE, str(listener.fileno()), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=environment(runtime, **more),
        cwd=ROOT,
        pass_fds=[listener.fileno()],
    )


def stop(process: subprocess.Popen[str]) -> tuple[int, str]:
    process.terminate()  # a supervisor stops its workers
    try:
        _, stderr = process.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        _, stderr = process.communicate()
    return process.returncode, stderr


@pytest.mark.parametrize("workers", ["1", "2"])
def test_socket_activation_an_app_adopts_the_passed_tcp_socket(
    tmp_path: Path, workers: str
) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        # A client that comes before the service: the kernel queues it in the backlog.
        early = socket.create_connection(("127.0.0.1", port), timeout=20)
        process = activated(
            tmp_path,
            listener,
            "serve",
            "--workers",
            workers,
            "--app",
            f"examples/echo.py --port {port}",
        )
    with early:
        try:
            assert process.stdout is not None
            # With two workers, both announce on the one stdout: their writes of the text
            # and of its newline may interleave, so the first line starts with it.
            line = process.stdout.readline()
            assert line.startswith(f"echo listening on 127.0.0.1:{port}"), line
            early.sendall(b"activated\n")
            assert early.recv(100) == b"activated\n"
        finally:
            status, stderr = stop(process)
    assert status == 0, stderr
    assert "socket activation: descriptor 3 (web) listens on" in stderr


def test_socket_activation_a_unix_listener_adopts_the_passed_socket(tmp_path: Path) -> None:
    app = tmp_path / "unix_echo.py"
    app.write_text(UNIX_ECHO)
    path = str(tmp_path / "web.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(path)
        listener.listen()
        process = activated(tmp_path, listener, "run", str(app), path)
    try:
        assert process.stdout is not None
        assert process.stdout.readline() == "listening\n"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.settimeout(20)
            client.connect(path)
            client.sendall(b"unix\n")
            assert client.recv(100) == b"unix\n"
    finally:
        status, stderr = stop(process)
    assert status == 0, stderr
    assert os.path.exists(path)  # systemd's socket file: the app leaves it alone
