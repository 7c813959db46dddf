"""The daemon and its client: real daemon processes, real ZeroMQ endpoints, real sockets.

Every daemon here is an ``ioserver serve`` subprocess; it is stopped with SIGTERM at the
end of its test and must exit 0 having removed its ipc socket.
"""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import anyio
import msgpack
import pytest
import zmq
import zmq.auth
from anyio.streams.buffered import BufferedByteReceiveStream
from conftest import until

import client
import ioserver
import ports
from ioserver import _protocol as P

ROOT = Path(__file__).resolve().parent.parent


def load_example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        f"example_{name}", ROOT / "examples" / f"{name}.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


HEARTBEAT = 0.2  # seconds: a peer silent for 0.6 s is lost

chat = load_example("chat")


class Daemon:
    """An ``ioserver serve`` process; its log lines are collected by a reader thread."""

    def __init__(self, *args: str, ready: str = "serving", count: int = 1) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "ioserver", "serve", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,  # one stream: the log and the apps' lines
            text=True,
            env=env,
            cwd=ROOT,
        )
        self.lines: list[str] = []
        self.changed = threading.Condition()
        self.reader = threading.Thread(target=self._read, name="daemon-log", daemon=True)
        self.reader.start()
        self.wait_for(ready, count)

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with self.changed:
                self.lines.append(line)
                self.changed.notify_all()
        with self.changed:
            self.lines.append("<exited>")
            self.changed.notify_all()

    def wait_for(self, text: str, count: int = 1, timeout: float = 20) -> None:
        with self.changed:
            ok = self.changed.wait_for(
                lambda: (
                    sum(text in line for line in self.lines) >= count or "<exited>" in self.lines
                ),
                timeout,
            )
            assert ok and sum(text in line for line in self.lines) >= count, "".join(self.lines)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            status = self.process.wait(20)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
            self.reader.join(5)
            assert self.process.stdout is not None
            self.process.stdout.close()
        return status

    @property
    def log(self) -> str:
        with self.changed:
            return "".join(self.lines)


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[tuple[Daemon, str]]:
    path = tmp_path / "run" / "control"
    endpoint = f"ipc://{path}"
    process = Daemon("--endpoint", endpoint, "--heartbeat", str(HEARTBEAT))
    try:
        yield process, endpoint
    finally:
        status = process.stop()
    assert status == 0, process.log
    assert not path.exists(), "the daemon left its ipc socket behind"


pytestmark = pytest.mark.anyio


async def test_the_chat_example_runs_unchanged_through_a_daemon(
    daemon: tuple[Daemon, str], no_leaks: None
) -> None:
    _, endpoint = daemon
    async with client.connect(endpoint) as ios, anyio.create_task_group() as server:
        host, number = await server.start(chat.serve, ios, "127.0.0.1", 0)
        readers = []
        streams = []
        for _ in range(3):
            stream = await anyio.connect_tcp(host, number)
            reader = BufferedByteReceiveStream(stream)
            assert (await reader.receive_until(b"\n", 1024)).startswith(b"* welcome")
            streams.append(stream)
            readers.append(reader)
        with anyio.fail_after(10):
            # The two first members hear the later ones join before anyone talks.
            assert b"joined" in await readers[0].receive_until(b"\n", 1024)
            assert b"joined" in await readers[0].receive_until(b"\n", 1024)
            assert b"joined" in await readers[1].receive_until(b"\n", 1024)
            await streams[0].send(b"hello through the daemon\n")
            for reader in readers[1:]:
                assert (await reader.receive_until(b"\n", 1024)).endswith(
                    b": hello through the daemon"
                )
        for stream in streams:
            await stream.aclose()
        server.cancel_scope.cancel()


async def test_bulk_traffic_through_a_daemon_keeps_every_byte_and_the_flow_control(
    daemon: tuple[Daemon, str], no_leaks: None
) -> None:
    """4 MiB each way through a port in a daemon whose owner reads slowly at first: the
    daemon pauses reading (PAUSED/RESUME), sends wait on a busy port (WRITTEN)."""
    _, endpoint = daemon
    payload = bytes(range(256)) * 4096 * 4  # 4 MiB
    async with (
        client.connect(endpoint) as ios,
        await ports.listen_tcp(ios, "127.0.0.1", 0) as listener,
        await anyio.connect_tcp(*listener.local_address) as peer,
    ):
        accepted = await listener.receive()
        assert isinstance(accepted, ports.Accepted)
        port = accepted.port

        async def peer_sends() -> None:
            await peer.send(payload)
            await peer.send_eof()

        received = bytearray()
        echoed = bytearray()

        async def peer_receives() -> None:
            while len(echoed) < len(payload):
                echoed.extend(await peer.receive())

        with anyio.fail_after(30):
            async with anyio.create_task_group() as task_group:
                task_group.start_soon(peer_sends)
                task_group.start_soon(peer_receives)
                async for message in port:
                    if isinstance(message, ports.Data):
                        received.extend(message.data)
                        await port.send(message.data)
        assert received == payload
        assert echoed == payload
        assert port.statistics().pauses > 0  # the daemon paused for this owner
        await port.aclose()


async def test_a_declined_resume_through_a_daemon_pauses_again(
    daemon: tuple[Daemon, str], no_leaks: None
) -> None:
    """The daemon's half of tests/test_flow.py's declined resume: the owner grants one
    more packet (ACTIVE) and then takes the last one delivered, so its RESUME reaches the
    daemon after the grant delivered a held packet, and the daemon finds the port no
    longer drained (a client's messages run in order; the client's I/O thread is held
    while both are queued, so the take comes before line 1 can).  The daemon used to
    decline and say nothing, and the port stayed paused for good; it now answers with a
    PAUSED of a new generation, which the owner's next take answers."""
    _, endpoint = daemon
    lines = [b"line %d\n" % index for index in range(10)]
    more = [b"more %d\n" % index for index in range(3)]
    async with (
        client.connect(endpoint) as ios,
        await ports.listen_tcp(
            ios,
            "127.0.0.1",
            0,
            packet="line",
            active=False,
            high_msgq_watermark=4,  # one packet delivered and not taken passes high
            low_msgq_watermark=0,
        ) as listener,
        await anyio.connect_tcp(*listener.local_address) as peer,
    ):
        accepted = await listener.receive()
        assert isinstance(accepted, ports.Accepted)
        async with accepted.port as port:
            await peer.send(b"".join(lines))  # one write: the daemon's one read holds 9
            port.setopts(active="once")
            with anyio.fail_after(10):
                # PAUSED came, and line 0 is in the port (not still on its way to it).
                await until(
                    lambda: port.statistics().pauses > 0 and port.statistics().messages_buffered > 0
                )
            io = ios._local._io  # type: ignore[attr-defined]  # the client's I/O thread
            # It counts the pause before it takes the generation: let it finish PAUSED.
            handled = threading.Event()
            io.submit(lambda _target, _argument: handled.set(), None, None)
            assert await anyio.to_thread.run_sync(handled.wait, 10)
            # Held while the owner grants and takes, so ACTIVE and RESUME leave together
            # (line 1 cannot come back before the take).
            gate = threading.Event()
            io.submit(lambda _target, _argument: gate.wait(10), None, None)
            try:
                port.setopts(active="once")  # ACTIVE: the daemon delivers line 1...
                assert await port.receive() == ports.Data(lines[0])  # ...then sees RESUME
            finally:
                gate.set()
            await peer.send(b"".join(more))
            await peer.send_eof()
            received: list[object] = []
            with anyio.move_on_after(5):
                while not isinstance(message := await port.receive(), ports.Closed):
                    received.append(message)
                received.append(message)
            expected = [ports.Data(line) for line in lines[1:] + more] + [ports.Closed("eof")]
            assert received == expected, "the port stayed paused after its held packets"


async def test_a_killed_daemon_breaks_the_clients_ports(tmp_path: Path, no_leaks: None) -> None:
    endpoint = f"ipc://{tmp_path}/control"
    process = Daemon("--endpoint", endpoint, "--heartbeat", str(HEARTBEAT))
    try:
        async with client.connect(endpoint) as ios:
            listener = await ports.listen_tcp(ios, "127.0.0.1", 0)
            async with await anyio.connect_tcp(*listener.local_address) as peer:
                accepted = await listener.receive()
                assert isinstance(accepted, ports.Accepted)
                port = accepted.port
                await peer.send(b"before")
                assert await port.receive() == ports.Data(b"before")
                process.process.kill()  # kill -9, mid-stream
                with anyio.fail_after(5):
                    final = await port.receive()
                assert final == ports.Closed("ioserver daemon lost", "ECONNABORTED")
                with pytest.raises(anyio.BrokenResourceError):
                    await port.send(b"after")
                with pytest.raises(ports.BrokenPortError, match="lost"):
                    await ports.connect_tcp(ios, "127.0.0.1", 1)
            await port.aclose()
            await listener.aclose()
    finally:
        process.stop()


CLIENT_SCRIPT = """
import sys, anyio, client, ports
async def main():
    async with client.connect(sys.argv[1]) as ios:
        port = await ports.connect_tcp(ios, "127.0.0.1", int(sys.argv[2]))
        await port.send(b"ready\\n")
        await anyio.sleep_forever()
anyio.run(main)
"""


def test_a_killed_clients_ports_are_closed_by_the_daemon(
    daemon: tuple[Daemon, str],
) -> None:
    process, endpoint = daemon
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(10)
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        program = subprocess.Popen(
            [sys.executable, "-c", CLIENT_SCRIPT, endpoint, str(server.getsockname()[1])],
            env=env,
        )
        try:
            peer, _ = server.accept()
            with peer:
                peer.settimeout(10)
                assert peer.recv(6) == b"ready\n"
                program.kill()  # kill -9: no BYE
                program.wait()
                # The daemon notices the silence within 3 heartbeats and closes the port.
                assert peer.recv(1) == b""
        finally:
            if program.poll() is None:
                program.kill()
                program.wait()
    process.wait_for("lost (silent for")


class RawClient:
    """A bare DEALER socket speaking (or breaking) the protocol by hand."""

    def __init__(self, context: zmq.Context[zmq.Socket[bytes]], endpoint: str) -> None:
        self.sock = context.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)

    def send(self, messages: list[object]) -> None:
        self.sock.send(P.pack(messages))

    def faults(self, count: int) -> list[list[object]]:
        found: list[list[object]] = []
        while len(found) < count:
            assert self.sock.poll(10_000), f"no answer; got {found}"
            for message in P.unpack(self.sock.recv()):
                if message[0] == P.FAULT:
                    found.append(message)
        return found


async def test_malformed_control_messages_get_typed_errors_and_others_keep_working(
    daemon: tuple[Daemon, str], no_leaks: None
) -> None:
    _, endpoint = daemon
    async with (
        client.connect(endpoint) as ios,
        await ports.listen_tcp(ios, "127.0.0.1", 0) as listener,
        await anyio.connect_tcp(*listener.local_address) as peer,
    ):
        accepted = await listener.receive()
        assert isinstance(accepted, ports.Accepted)
        good = accepted.port
        context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        raw = RawClient(context, endpoint)
        try:
            raw.sock.send(os.urandom(64))
            raw.sock.send(msgpack.packb([7, []]))
            raw.send([[P.STATUS, 1]])  # before HELLO
            assert [f[2] for f in raw.faults(3)] == ["malformed", "version", "no-session"]
            raw.send(
                [
                    [P.HELLO, P.VERSION],
                    [99],
                    "not a list",
                    [P.SEND, 1, b"someone else's port"],  # the good client's listener is 1
                    [P.SEND, "one", b"x"],
                    [P.CONNECT, 5, 1, 2, ["127.0.0.1", "http"], {}, -1, False],
                    [P.CONNECT, 6, 1, 2, ["127.0.0.1", 9], {"packet": "nonsense"}, -1, False],
                    [P.CONNECT, 7, 1, 2, ["127.0.0.1", 9], {"speed": 11}, -1, False],
                    [P.RESUME, -3, 0, 0, 0],
                ]
            )
            faults = raw.faults(8)
            kinds = [(f[1], f[2]) for f in faults]
            assert kinds == [
                (None, "unknown-opcode"),
                (None, "malformed"),
                (None, "unknown-port"),
                (None, "unknown-port"),
                (5, "malformed"),
                (6, "bad-option"),
                (7, "bad-option"),
                (None, "unknown-port"),
            ]
            assert "speed" in str(faults[6][3])
        finally:
            raw.sock.close()
            context.term()
        # The daemon still serves the well-behaved client, port and bytes intact.
        with anyio.fail_after(10):
            await peer.send(b"still here")
            assert await good.receive() == ports.Data(b"still here")
            await good.send(b"and working")
            assert await peer.receive() == b"and working"
            status = await ios.status()
        assert status["faults"] >= 11
        await good.aclose()


async def test_connect_without_a_daemon_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(client.DaemonUnavailable, match="does not exist"):
        async with client.connect(f"ipc://{tmp_path}/nobody"):
            pass
    with pytest.raises(client.DaemonUnavailable, match="no ioserver daemon answered"):
        async with client.connect(f"tcp://127.0.0.1:{free_port()}", timeout=0.3):
            pass
    with pytest.raises(ioserver.OptionError, match="endpoint"):
        async with client.connect("http://example.com"):
            pass


async def test_curve_lets_allowed_keys_in_and_nobody_else(tmp_path: Path, no_leaks: None) -> None:
    keys = tmp_path / "keys"
    allowed = tmp_path / "allowed"
    keys.mkdir()
    allowed.mkdir()
    server_public, server_secret = zmq.auth.create_certificates(str(keys), "server")
    client_public, client_secret = zmq.auth.create_certificates(str(keys), "client")
    _, intruder_secret = zmq.auth.create_certificates(str(keys), "intruder")
    os.replace(client_public, allowed / "client.key")
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    process = Daemon(
        "--endpoint",
        endpoint,
        "--curve-secret-key",
        server_secret,
        "--curve-allowed-keys",
        str(allowed),
        "--heartbeat",
        str(HEARTBEAT),
    )
    try:
        async with (
            client.connect(
                endpoint, curve_server_key=server_public, curve_certificate=client_secret
            ) as ios,
            await ports.listen_tcp(ios, "127.0.0.1", 0) as listener,
        ):
            assert listener.local_address[1] > 0
        with pytest.raises(client.DaemonUnavailable):
            async with client.connect(
                endpoint,
                curve_server_key=server_public,
                curve_certificate=intruder_secret,
                timeout=0.5,
            ):
                pass
        with pytest.raises(client.DaemonUnavailable):  # no CURVE at all
            async with client.connect(endpoint, timeout=0.5):
                pass
    finally:
        assert process.stop() == 0, process.log


def test_the_ipc_directory_is_private_and_unsafe_endpoints_are_refused(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "fresh"
    process = Daemon("--endpoint", f"ipc://{directory}/control")
    try:
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
        assert stat.S_IMODE((directory / "control").stat().st_mode) == 0o600
        # A second daemon on the same path is refused: the first one answers there.
        second = subprocess.run(
            [sys.executable, "-m", "ioserver", "serve", "--endpoint", f"ipc://{directory}/control"],
            capture_output=True,
            text=True,
            timeout=30,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        assert second.returncode == 1
        assert "already serves" in second.stderr
    finally:
        assert process.stop() == 0, process.log
    for endpoint, complaint in (
        (f"tcp://0.0.0.0:{free_port()}", "all interfaces"),
        (f"tcp://127.0.0.1:{free_port()}", "needs CURVE"),
        ("udp://127.0.0.1:9", "ipc://PATH or tcp://"),
    ):
        refused = subprocess.run(
            [sys.executable, "-m", "ioserver", "serve", "--endpoint", endpoint],
            capture_output=True,
            text=True,
            timeout=30,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        assert refused.returncode == 1, refused.stderr
        assert complaint in refused.stderr


def test_a_supervisor_whose_workers_keep_dying_gives_up(tmp_path: Path) -> None:
    """Workers that die at every start (an app that fails as it loads) are restarted
    ``--max-restarts`` times within ``--restart-period``, then the supervisor stops the
    others and exits 1 - as an OTP supervisor past its restart intensity - for systemd's
    ``Restart=`` to act on.  Before, it restarted them for ever (one a second), and an
    orphaned supervisor went on doing so unseen."""
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('this app cannot load')\n")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "ioserver",
            "serve",
            "--endpoint",
            f"ipc://{tmp_path}/control",
            "--workers",
            "2",
            "--max-restarts",
            "2",
            "--restart-period",
            "60",
            "--app",
            str(broken),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        cwd=ROOT,
    )
    assert result.returncode == 1, result.stderr
    assert "giving up" in result.stderr, result.stderr
    # Two restarts, then the third death ends it.
    assert result.stderr.count("; restarting") == 2, result.stderr
    assert result.stderr.count(" died with status ") == 3, result.stderr
    assert not (tmp_path / "control").exists()


def test_restart_limits_are_checked(tmp_path: Path) -> None:
    for option, value in (("--max-restarts", "-1"), ("--restart-period", "0")):
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "ioserver",
                "serve",
                "--endpoint",
                f"ipc://{tmp_path}/control",
                option,
                value,
            ],
            capture_output=True,
            text=True,
            timeout=30,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            cwd=ROOT,
        )
        assert result.returncode == 1, result.stderr
        assert result.stderr.startswith("ioserver: --max-restarts"), result.stderr


def test_workers_share_the_listening_port_and_status_reports_both(tmp_path: Path) -> None:
    endpoint = f"ipc://{tmp_path}/control"
    number = free_port()
    process = Daemon(
        "--endpoint",
        endpoint,
        "--workers",
        "2",
        "--app",
        f"examples/echo.py --port {number}",
        ready="echo listening on",
        count=2,  # both workers' apps are listening
    )
    try:
        for index in range(40):
            with socket.create_connection(("127.0.0.1", number), timeout=10) as connection:
                connection.sendall(b"ping %d" % index)
                assert connection.recv(100) == b"ping %d" % index
        result = subprocess.run(
            [sys.executable, "-m", "ioserver", "status", endpoint, "--json"],
            capture_output=True,
            text=True,
            timeout=30,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        assert result.returncode == 0, result.stderr
        status = json.loads(result.stdout)
        workers = status["workers"]
        assert sorted(worker["worker"] for worker in workers) == [0, 1]
        # SO_REUSEPORT spread the 40 connections over both workers.
        assert all(worker["bytes_in"] > 0 for worker in workers), workers
        assert sum(worker["bytes_in"] for worker in workers) == sum(
            len(b"ping %d" % index) for index in range(40)
        )
        human = subprocess.run(
            [sys.executable, "-m", "ioserver", "status", endpoint],
            capture_output=True,
            text=True,
            timeout=30,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        assert human.returncode == 0
        assert "worker 0" in human.stdout and "worker 1" in human.stdout
        # A worker that dies is restarted (and logged); the port is served throughout.
        os.kill(workers[0]["pid"], signal.SIGKILL)
        process.wait_for("restarting")
        process.wait_for("echo listening on", count=3)  # the new worker's app listens
        for index in range(10):
            with socket.create_connection(("127.0.0.1", number), timeout=10) as connection:
                connection.sendall(b"again %d" % index)
                assert connection.recv(100) == b"again %d" % index
    finally:
        assert process.stop() == 0, process.log


async def test_leaving_the_client_ends_its_ports_and_closes_them_in_the_daemon(
    daemon: tuple[Daemon, str], no_leaks: None
) -> None:
    _, endpoint = daemon
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(10)
        result: list[object] = []
        async with anyio.create_task_group() as task_group, client.connect(endpoint) as ios:
            port = await ports.connect_tcp(ios, "127.0.0.1", server.getsockname()[1])
            waiting = anyio.Event()

            async def wait_on_port() -> None:
                waiting.set()
                result.append(await port.receive())

            task_group.start_soon(wait_on_port)
            await waiting.wait()
        # The waiting task got the port's final message, as local ports get theirs...
        assert result == [ports.Closed("ioserver closed", "ESHUTDOWN")]
        # ... and the daemon closed the socket: the peer reads end-of-file.
        peer, _ = await anyio.to_thread.run_sync(server.accept)
        with peer:
            peer.settimeout(10)
            assert await anyio.to_thread.run_sync(peer.recv, 1) == b""


async def test_a_remote_ports_linger_crosses_to_the_daemon(
    daemon: tuple[Daemon, str], no_leaks: None
) -> None:
    """``linger=0`` reaches the daemon's port: its close resets the connection (a plain
    close would end it with a FIN, which the peer's poll reports as no error)."""
    import select

    _, endpoint = daemon
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(10)
        async with client.connect(endpoint) as ios:
            port = await ports.connect_tcp(ios, "127.0.0.1", server.getsockname()[1], linger=0)
            peer, _ = await anyio.to_thread.run_sync(server.accept)
            with peer:
                await port.send(b"unread")
                await port.aclose()
                poller = select.poll()
                poller.register(peer, select.POLLERR | select.POLLHUP)
                assert await anyio.to_thread.run_sync(poller.poll, 10_000)
                error = peer.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                assert error == errno.ECONNRESET
