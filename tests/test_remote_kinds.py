"""Every port kind, in-process and through a real daemon (issue 16, section 2).

The same behavioural test runs for each kind twice: on a local :func:`ioserver.open`
server and on a :func:`client.connect` session of an ``ioserver serve`` subprocess started
with ``--allow-process --allow-unix --allow-tun`` (both backends, through the anyio
fixture).  Then what only a daemon has: kill -9 of the daemon and of a client process with
a port of every kind open (the other side sees a typed ``Closed``, nothing hangs, no
program is left running), and the kinds a daemon refuses unless it was started to allow
them.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import msgpack
import pytest
import zmq
from conftest import until
from test_daemon import HEARTBEAT, ROOT, Daemon, RawClient

import client
import ioserver
import ports
from ioserver import _protocol as P
from ports import Closed, Data, Datagram, Error, ExitStatus

pytestmark = pytest.mark.anyio

KINDS = ["udp", "unix", "process", "zmq", "tun"]
ALLOW = ("--allow-process", "--allow-unix", "--allow-tun")
LOST = Closed("ioserver daemon lost", "ECONNABORTED")


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One daemon, allowed every kind, for the module (each test opens its own session)."""
    path = tmp_path_factory.mktemp("remote-kinds") / "control"
    process = Daemon("--endpoint", f"ipc://{path}", "--heartbeat", str(HEARTBEAT), *ALLOW)
    try:
        yield f"ipc://{path}"
    finally:
        status = process.stop()
    assert status == 0, process.log
    assert "Traceback" not in process.log, process.log
    assert "error while serving" not in process.log, process.log


@asynccontextmanager
async def server(where: str, endpoint: str) -> AsyncIterator[ioserver.IOServer]:
    if where == "local":
        async with ioserver.open() as ios:
            yield ios
    else:
        async with client.connect(endpoint) as ios:
            yield ios


def _gone(pid: int) -> bool:
    """The program no longer runs (no process, or a zombie its new parent will reap)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):
        # (The read fails with ESRCH when the process is reaped between open and read.)
        return True


async def _wait_gone(pid: int, timeout: float = 10) -> None:
    with anyio.fail_after(timeout):
        while not _gone(pid):  # noqa: ASYNC110 - another process's exit has no event here
            await anyio.sleep(0.02)


# -- the behaviour of each kind --------------------------------------------------------
async def _udp(ios: ioserver.IOServer, tmp_path: Path) -> None:
    async with (
        await ports.open_udp(ios, ("127.0.0.1", 0)) as a,
        await ports.open_udp(ios, ("localhost", 0), active=False) as b,
    ):
        assert a.local_address[0] == "127.0.0.1" and b.local_address[0] == "127.0.0.1"
        await a.send_to(b"ping", b.local_address)
        # b is passive: each receive lets one datagram through (gen_udp:recv).
        assert await b.receive() == Datagram(b"ping", a.local_address)
        await b.send((b"pong", a.local_address))
        assert await a.receive() == Datagram(b"pong", b.local_address)
        # A connected port: send(data) goes to its peer; a name resolved where it sends.
        async with await ports.open_udp(ios, connect=("localhost", a.local_address[1])) as c:
            await c.send(b"hello")
            message = await a.receive()
            assert message == Datagram(b"hello", c.local_address)
        for size in (1, 1000, 65507):
            await a.send_to(b"x" * size, b.local_address)
            received = await b.receive()
            assert isinstance(received, Datagram) and len(received.data) == size
        with pytest.raises(ValueError, match="numeric"):
            await a.send_to(b"x", ("localhost", 9))


async def _unix(ios: ioserver.IOServer, tmp_path: Path) -> None:
    path = str(tmp_path / f"u-{uuid.uuid4().hex[:8]}")
    async with (
        await ports.listen_unix(ios, path, packet="line") as listener,
        await ports.connect_unix(ios, path, packet="line", active="once") as port,
    ):
        accepted = await listener.receive()
        assert isinstance(accepted, ports.Accepted)
        async with accepted.port as peer:
            await port.send(b"one\n")
            assert await peer.receive() == Data(b"one\n")
            await peer.send(b"two\nthree\n")
            assert await port.receive() == Data(b"two\n")
            port.setopts(active="once")
            assert await port.receive() == Data(b"three\n")
            await port.send_eof()
            assert await peer.receive() == Closed("eof", None)


async def _process(ios: ioserver.IOServer, tmp_path: Path) -> None:
    async with await ports.open_process(ios, ["cat"], packet="line", kill_grace=1) as port:
        assert port.pid > 0
        await port.send(b"abc\n")
        assert await port.receive() == Data(b"abc\n")
        await port.send_eof()
        assert await port.receive() == ExitStatus(0)
        assert isinstance(await port.receive(), Closed)
        assert port.exit_status == 0
    script = "import sys, time; print('up', flush=True); time.sleep(60)"
    async with await ports.open_process(ios, [sys.executable, "-c", script], packet="line") as port:
        assert await port.receive() == Data(b"up\n")
        port.send_signal(signal.SIGTERM)
        assert await port.receive() == ExitStatus(-signal.SIGTERM)
    with pytest.raises(ports.ConnectError) as caught:
        await ports.open_process(ios, [str(tmp_path / "no-such-program")])
    assert caught.value.errno_name == "ENOENT"


async def _zmq(ios: ioserver.IOServer, tmp_path: Path) -> None:
    async with await ports.open_zmq(ios, "PULL", bind="tcp://127.0.0.1:*") as pull:
        assert pull.local_address.startswith("tcp://127.0.0.1:")
        async with await ports.open_zmq(ios, "PUSH", connect=pull.local_address) as push:
            await push.send([b"frame", b"two"])
            await push.send(b"single")
            assert await pull.receive() == Data([b"frame", b"two"])
            assert await pull.receive() == Data([b"single"])
        with pytest.raises(ports.ConnectError) as caught:
            await ports.open_zmq(ios, "PAIR", bind=pull.local_address)
        assert caught.value.errno_name == "EADDRINUSE"


async def _tun(ios: ioserver.IOServer, tmp_path: Path) -> None:
    name = f"iork{uuid.uuid4().hex[:8]}"
    try:
        port = await ports.open_tun(ios, name)
    except ports.ConnectError as exc:
        pytest.skip(f"this machine refuses TUN tests: {exc} (needs CAP_NET_ADMIN)")
    async with port:
        assert port.device == name and port.mode == "tun"
        assert port.statistics().bytes_received == 0


BEHAVIOUR: dict[str, Callable[[ioserver.IOServer, Path], Awaitable[None]]] = {
    "udp": _udp,
    "unix": _unix,
    "process": _process,
    "zmq": _zmq,
    "tun": _tun,
}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("where", ["local", "daemon"])
async def test_each_kind_behaves_the_same_in_process_and_through_a_daemon(
    where: str, kind: str, endpoint: str, tmp_path: Path, no_leaks: None
) -> None:
    async with server(where, endpoint) as ios:
        with anyio.fail_after(20):
            await BEHAVIOUR[kind](ios, tmp_path)
        if where == "daemon":
            assert isinstance(ios, client.RemoteIOServer)
            status = await ios.status()
            assert status["client_ports"] == 0, status  # every id was released
            # What the daemon held for this client was released as it left: ZeroMQ took
            # the last frames, and the sends were written or dropped.
            with anyio.fail_after(5):
                while status["memory_in_use"] != 0:
                    await anyio.sleep(0.02)
                    status = await ios.status()
        assert ios.statistics().memory_in_use == 0


async def test_flow_control_crosses_the_wire_for_datagrams(endpoint: str, no_leaks: None) -> None:
    """A UDP port whose owner does not read pauses at its watermark in the daemon (the
    kernel drops the rest, as in-process), and resumes when the owner reads."""
    async with (
        client.connect(endpoint) as ios,
        await ports.open_udp(ios, high_msgq_watermark=4096, low_msgq_watermark=1024) as slow,
        await ports.open_udp(ios) as fast,
    ):
        for _ in range(64):
            await fast.send_to(b"y" * 1000, slow.local_address)
        with anyio.fail_after(10):
            first = await slow.receive()
            assert isinstance(first, Datagram)
            while slow.statistics().pauses == 0:  # noqa: ASYNC110 - a counter, no event
                await anyio.sleep(0.02)
            taken = 1
            with anyio.move_on_after(1):
                while True:
                    await slow.receive()
                    taken += 1
        # More than one read's worth (read_packets, 16) came: the port resumed.
        assert 16 < taken <= 64
        assert ios.statistics().memory_in_use == 0


async def test_error_messages_are_charged_across_the_wire(endpoint: str, no_leaks: None) -> None:
    """A flood of oversized datagrams (each an ``Error("EMSGSIZE")``) to a UDP port whose
    owner does not read pauses it in the daemon, and what the errors were charged comes
    back to 0 on both sides once taken (issue 14: they were charged nowhere)."""
    count = 60
    async with (
        client.connect(endpoint) as ios,
        await ports.open_udp(ios, max_datagram=64, high_msgq_messages=8, read_packets=4) as port,
        await ports.open_udp(ios) as peer,
    ):
        for _ in range(count):
            await peer.send_to(b"z" * 100, port.local_address)
        await until(lambda: port.statistics().pauses > 0)
        assert port.statistics().messages_buffered <= 8 + 4
        for _ in range(count):
            with anyio.fail_after(10):
                message = await port.receive()
            assert isinstance(message, Error) and message.errno_name == "EMSGSIZE"
        await peer.send_to(b"fits", port.local_address)
        with anyio.fail_after(10):
            assert (await port.receive()).data == b"fits"  # type: ignore[union-attr]
        assert port.statistics().bytes_buffered_in == 0
        await until(lambda: ios.statistics().memory_in_use == 0)


async def test_a_line_ports_unterminated_last_line_crosses_the_wire(
    endpoint: str, no_leaks: None
) -> None:
    """``packet="line"`` through a daemon: the last line without its delimiter comes
    before ``Closed("eof")``, as in-process (issue 14)."""
    async with (
        client.connect(endpoint) as ios,
        await ports.listen_tcp(ios, "127.0.0.1", 0, packet="line") as listener,
        await anyio.connect_tcp(*listener.local_address) as peer,
    ):
        accepted = await listener.receive()
        assert isinstance(accepted, ports.Accepted)
        async with accepted.port as port:
            await peer.send(b"a\nb")
            await peer.send_eof()
            with anyio.fail_after(10):
                messages = [message async for message in port]
            assert messages == [Data(b"a\n"), Data(b"b"), Closed("eof")]
        await until(lambda: ios.statistics().memory_in_use == 0)


# -- what only a daemon has -------------------------------------------------------------
async def _open_every_kind(ios: ioserver.IOServer, tmp_path: Path) -> dict[str, object]:
    listener = await ports.listen_unix(ios, str(tmp_path / "kill.sock"))
    opened: dict[str, object] = {
        "udp": await ports.open_udp(ios),
        "unix": listener,
        "process": await ports.open_process(ios, ["cat"]),
        "zmq": await ports.open_zmq(ios, "PULL", bind="tcp://127.0.0.1:*"),
    }
    try:
        opened["tun"] = await ports.open_tun(ios, f"iork{uuid.uuid4().hex[:8]}")
    except ports.ConnectError:
        pass  # no CAP_NET_ADMIN here: the other kinds still count
    return opened


async def test_a_killed_daemon_ends_the_ports_of_every_kind(tmp_path: Path, no_leaks: None) -> None:
    path = tmp_path / "control"
    process = Daemon("--endpoint", f"ipc://{path}", "--heartbeat", str(HEARTBEAT), *ALLOW)
    try:
        async with client.connect(f"ipc://{path}") as ios:
            opened = await _open_every_kind(ios, tmp_path)
            program = opened["process"]
            assert isinstance(program, ports.ProcessPort)
            process.process.kill()  # kill -9
            with anyio.fail_after(10):
                for name, port in opened.items():
                    assert isinstance(port, ports.Port | ports.UDPPort | ports.Listener)
                    while True:
                        message = await port.receive()
                        if isinstance(message, Closed):
                            break
                    assert message == LOST, name
                # The program lost its stdin and stdout with the daemon: it ended.
                await _wait_gone(program.pid)
            for port in opened.values():
                assert isinstance(port, ports.Port | ports.UDPPort | ports.Listener)
                await port.aclose()
    finally:
        process.stop()


KILLED_CLIENT = """
import sys, anyio, client, ports
async def main():
    async with client.connect(sys.argv[1]) as ios:
        await ports.open_udp(ios)
        await ports.listen_unix(ios, sys.argv[2])
        program = await ports.open_process(ios, ["sleep", "60"], kill_grace=0.5)
        await ports.open_zmq(ios, "PULL", bind="tcp://127.0.0.1:*")
        tun = True
        try:
            await ports.open_tun(ios, sys.argv[3])
        except ports.ConnectError:
            tun = False  # no CAP_NET_ADMIN here
        print(program.pid, tun, flush=True)
        await anyio.sleep_forever()
anyio.run(main)
"""


def test_a_killed_clients_ports_of_every_kind_are_closed_by_the_daemon(
    endpoint: str, tmp_path: Path
) -> None:
    path = str(tmp_path / "client.sock")
    device = f"iork{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    program = subprocess.Popen(
        [sys.executable, "-c", KILLED_CLIENT, endpoint, path, device],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert program.stdout is not None
        pid_text, tun = program.stdout.readline().split()
        pid = int(pid_text)
        assert not _gone(pid)
        assert (tun == "True") == os.path.exists(f"/sys/class/net/{device}")
        with socket.socket(socket.AF_UNIX) as probe:
            probe.connect(path)  # the daemon's listener is there
        program.kill()  # kill -9: no BYE
        program.wait()
        # Lost after 3 silent heartbeats: the program (which ignores its stdin) is
        # terminated, and the listener is closed and its socket file removed.
        deadline = time.monotonic() + 10
        # Polled: another process's exit and a file's removal have no event here.
        while not (_gone(pid) and not os.path.exists(path)) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _gone(pid), "the killed client's program still runs"
        assert not os.path.exists(path), "the killed client's listener is still there"
        # Its TUN device (if this machine let it make one) went with its descriptor.
        deadline = time.monotonic() + 10
        while os.path.exists(f"/sys/class/net/{device}") and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not os.path.exists(f"/sys/class/net/{device}")
    finally:
        if program.poll() is None:
            program.kill()
            program.wait()
        if program.stdout is not None:
            program.stdout.close()


@pytest.fixture(scope="module")
def strict_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A daemon started without any --allow-KIND."""
    path = tmp_path_factory.mktemp("strict") / "control"
    process = Daemon("--endpoint", f"ipc://{path}", "--heartbeat", str(HEARTBEAT))
    try:
        yield f"ipc://{path}"
    finally:
        assert process.stop() == 0, process.log


async def test_a_daemon_refuses_what_it_was_not_started_to_allow(
    strict_endpoint: str, tmp_path: Path, no_leaks: None
) -> None:
    marker = tmp_path / "started"
    calls: dict[str, Callable[[ioserver.IOServer], Awaitable[object]]] = {
        "process": lambda ios: ports.open_process(
            ios, [sys.executable, "-c", f"open({str(marker)!r}, 'w').close()"]
        ),
        "unix": lambda ios: ports.connect_unix(ios, str(tmp_path / "u")),
        "unix ": lambda ios: ports.listen_unix(ios, str(tmp_path / "u")),
        "unix  ": lambda ios: ports.open_zmq(ios, "PAIR", bind=f"ipc://{tmp_path}/z"),
        "tun": lambda ios: ports.open_tun(ios, "iodenied0"),
    }
    async with client.connect(strict_endpoint) as ios:
        for kind, call in calls.items():
            with anyio.fail_after(5), pytest.raises(client.ProtocolError) as caught:
                await call(ios)
            assert caught.value.kind == "forbidden"
            assert f"--allow-{kind.strip()}" in str(caught.value)
        # inproc:// would reach the daemon's own sockets: refused whatever is allowed.
        with pytest.raises(client.ProtocolError) as caught:
            await ports.open_zmq(ios, "PAIR", bind="inproc://zeromq.zap.01")
        assert caught.value.kind == "bad-option"
        # What needs no permission still works on the same session; nothing was left.
        async with await ports.open_udp(ios) as udp:
            assert udp.local_address[1] > 0
        status = await ios.status()
        assert status["client_ports"] == 0
    assert not marker.exists(), "the program was started"
    assert not (tmp_path / "u").exists()


def test_the_daemon_checks_each_new_message_before_use(endpoint: str) -> None:
    """A raw client's malformed or out-of-bounds open requests (through a daemon that
    allows every kind): each a typed FAULT echoing its rid, nothing opened or started, and
    a client of another protocol version refused with a clear text."""
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    raw = RawClient(context, endpoint)
    try:
        raw.sock.send(msgpack.packb([2, [[P.HELLO, 2]]]))  # a version-2 client's frame
        raw.send([[P.HELLO, 2]])  # a version-2 HELLO in a version-3 frame
        faults = raw.faults(2)
        assert [f[2] for f in faults] == ["version", "version"]
        assert "protocol version 2; this side speaks 3" in str(faults[0][3])
        assert "client speaks 2; daemon speaks 3" in str(faults[1][3])
        process = [P.OPEN_PROCESS]
        zmq_open = [P.OPEN_ZMQ]
        raw.send(
            [
                [P.HELLO, P.VERSION],
                [*process, 10, 1, ["true"] * (P.MAX_ARGV + 1), "inherit", 1.0, {}, -1, False],
                [*process, 11, 2, ["a\0b"], "inherit", 1.0, {}, -1, False],
                [*process, 12, 3, ["x" * 4000] * 40, "inherit", 1.0, {}, -1, False],
                [*process, 13, 4, ["true"], "tty", 1.0, {}, -1, False],
                [*process, 14, 5, ["true"], "inherit", 1e9, {}, -1, False],
                [P.CONNECT, 15, 6, int(socket.AF_UNIX), "x" * 200, {}, -1, False],
                [*zmq_open, 16, 7, "STREAM", [], [], None, {}, -1, False],
                [*zmq_open, 17, 8, "PAIR", ["inproc://zeromq.zap.01"], [], None, {}, -1, False],
                [*zmq_open, 18, 9, "PAIR", ["tcp://localhost:0"], [], None, {}, -1, False],
                [*zmq_open, 19, 10, "PAIR", ["tcp://127.0.0.1:0"] * 17, [], None, {}, -1, False],
                [P.OPEN_TUN, 20, 11, "a/b", "tun", {}, -1, False],
                [P.OPEN_UDP, 21, 12, ["127.0.0.1", 70000], None, {}, -1, False],
                [P.SEND_TO, 99, b"x", None],
                [P.SIGNAL, 99, 15],
            ]
        )
        faults = raw.faults(14)
        assert [(f[1], f[2]) for f in faults] == [
            (10, "malformed"),
            (11, "malformed"),
            (12, "malformed"),
            (13, "bad-option"),
            (14, "bad-option"),
            (15, "malformed"),
            (16, "bad-option"),
            (17, "bad-option"),
            (18, "bad-option"),
            (19, "malformed"),
            (20, "bad-option"),
            (21, "malformed"),
            (None, "unknown-port"),
            (None, "unknown-port"),
        ]
    finally:
        raw.sock.close()
        context.term()


async def test_a_programs_signals_are_bounded(endpoint: str, no_leaks: None) -> None:
    """SIGSTOP would freeze the daemon's child beyond its kill_grace: refused (logged as
    a FAULT without a request), the program keeps running and is terminated at close."""
    async with client.connect(endpoint) as ios:
        script = "import sys; print('up', flush=True); sys.stdin.read()"
        port = await ports.open_process(ios, [sys.executable, "-c", script], packet="line")
        with anyio.fail_after(10):
            assert await port.receive() == Data(b"up\n")
            port.send_signal(signal.SIGSTOP)
            port.send_signal(signal.SIGTERM)
            assert await port.receive() == ExitStatus(-signal.SIGTERM)
        await port.aclose()


def test_each_permission_is_a_flag_a_variable_and_a_config_key(tmp_path: Path) -> None:
    """--allow-process/-unix/-tun reach the daemon's configuration the three ways every
    serve option does, and are off by default."""
    from ioserver._cli import _daemon_config, _parser
    from ioserver._config import apply_defaults

    def allowed(argv: list[str], environ: dict[str, str]) -> frozenset[str]:
        _, commands = _parser()
        parser = commands["serve"]
        apply_defaults(parser, argv, environ)
        options = parser.parse_args(argv)
        options.arguments = list(argv)
        return frozenset(_daemon_config(options).allow)

    config = tmp_path / "ioserver.toml"
    config.write_text("allow-tun = true\n")
    assert allowed([], {}) == frozenset()
    assert allowed(["--allow-process"], {}) == {"process"}
    assert allowed([], {"IOSERVER_ALLOW_UNIX": "1"}) == {"unix"}
    assert allowed([], {"IOSERVER_CONFIG": str(config)}) == {"tun"}
    everything = ["--allow-process", "--allow-unix", "--allow-tun"]
    assert allowed(everything, {}) == {"process", "unix", "tun"}


async def test_a_daemon_of_another_protocol_version_is_refused_at_once(
    tmp_path: Path, no_leaks: None
) -> None:
    """A version-2 daemon (a ROUTER answering as one does: a FAULT in its envelope) makes
    client.connect raise ProtocolError "version" at once, not DaemonUnavailable after
    its timeout."""
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    router = context.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    (tmp_path / "run").mkdir(mode=0o700)
    path = tmp_path / "run" / "control"
    router.bind(f"ipc://{path}")
    os.chmod(path, 0o600)

    def answer() -> None:
        assert router.poll(10_000)
        identity, _ = router.recv_multipart()
        fault = [P.FAULT, None, "version", "protocol version 3; this side speaks 2"]
        router.send_multipart([identity, msgpack.packb([2, [fault]])])

    try:
        with anyio.fail_after(5):  # well before connect's own timeout of 30 s
            async with anyio.create_task_group() as group:
                group.start_soon(anyio.to_thread.run_sync, answer)
                with pytest.raises(client.ProtocolError) as caught:
                    async with client.connect(f"ipc://{path}", timeout=30):
                        pass
        assert caught.value.kind == "version"
        assert "another protocol version" in str(caught.value), caught.value
    finally:
        router.close()
        context.term()


async def test_udp_names_are_resolved_by_the_daemon(endpoint: str, no_leaks: None) -> None:
    """The machine that sends resolves: a name given to open_udp goes to the daemon as it
    is, which resolves it off its I/O thread (its status counts it), and a name that does
    not resolve is a ConnectError with its EAI_* name."""
    async with client.connect(endpoint) as ios:
        before = (await ios.status())["names_resolved"]
        assert isinstance(before, int)
        async with await ports.open_udp(ios, ("localhost", 0)) as port:
            assert port.local_address[0] in ("127.0.0.1", "::1")
        after = (await ios.status())["names_resolved"]
        assert isinstance(after, int) and after == before + 1
        with pytest.raises(ports.ConnectError) as caught:
            await ports.open_udp(ios, connect=("no-such-host.invalid", 9))
        assert str(caught.value.errno_name).startswith("EAI_")
