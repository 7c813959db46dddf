"""The ``ipc://`` control endpoint under attack from another local user (issue 12, item 4).

Without ``XDG_RUNTIME_DIR`` the default endpoint is ``<tmp>/ioserver-<uid>/control``: a
name any local user can create first.  Each test here plants something there - another
user's directory and socket, a symbolic link, a directory open to all, another user's
socket, a link to a socket elsewhere, a daemon running as another uid - and checks that
``client.connect()``, ``ioserver serve`` and ``ioserver status`` refuse it with an
:exc:`~ioserver.UnsafeEndpointError` that says why, touch nothing of the planter's and
send it nothing.

"Another user" needs root (``os.chown`` to uid 65534); those cases are skipped otherwise.
``TMPDIR`` points into the test's own directory and ``XDG_RUNTIME_DIR`` is unset, for this
process and for the daemons it starts.
"""

from __future__ import annotations

import json
import os
import re
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
import pytest

import client
import ioserver
from ioserver import _ipc
from ioserver import _protocol as P

ROOT = Path(__file__).resolve().parent.parent
OTHER = 65534  # "nobody": the other local user
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make another user's files")


@pytest.fixture
def runtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The default endpoint's directory, ``<TMPDIR>/ioserver-<uid>``, not yet made."""
    base = tmp_path / "tmp"
    base.mkdir(mode=0o755)  # /tmp-like: others may create names here
    monkeypatch.setenv("TMPDIR", str(base))
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", None)  # gettempdir() reads TMPDIR again
    directory = base / f"ioserver-{os.getuid()}"
    assert P.default_endpoint() == f"ipc://{directory}/control"
    return directory


@pytest.fixture
def listeners() -> Iterator[list[socket.socket]]:
    """Planted Unix sockets (listening, never accepting); each must see no connection."""
    planted: list[socket.socket] = []
    yield planted
    for listener in planted:
        try:
            connection, _ = listener.accept()
        except BlockingIOError:
            listener.close()
            continue
        connection.close()
        listener.close()
        pytest.fail("a planted socket was connected to")


def plant_socket(path: Path, listeners: list[socket.socket]) -> None:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen()
    listener.setblocking(False)
    listeners.append(listener)


def foreign_directory(runtime: Path, listeners: list[socket.socket]) -> str:
    runtime.mkdir(mode=0o700)
    plant_socket(runtime / "control", listeners)
    os.chown(runtime / "control", OTHER, OTHER)
    os.chown(runtime, OTHER, OTHER)
    return f"belongs to uid {OTHER}"


def symbolic_link(runtime: Path, listeners: list[socket.socket]) -> str:
    target = runtime.parent / "target"
    target.mkdir()
    os.chmod(target, 0o755)
    plant_socket(target / "control", listeners)
    runtime.symlink_to(target)
    return "is a symbolic link"


def open_directory(runtime: Path, listeners: list[socket.socket]) -> str:
    runtime.mkdir()
    os.chmod(runtime, 0o777)
    plant_socket(runtime / "control", listeners)
    return "open to other users (mode 777)"


def foreign_socket(runtime: Path, listeners: list[socket.socket]) -> str:
    runtime.mkdir(mode=0o700)
    plant_socket(runtime / "control", listeners)
    os.chown(runtime / "control", OTHER, OTHER)
    return f"belongs to uid {OTHER}"


def linked_socket(runtime: Path, listeners: list[socket.socket]) -> str:
    runtime.mkdir(mode=0o700)
    elsewhere = runtime.parent / "elsewhere"
    elsewhere.mkdir()
    plant_socket(elsewhere / "control", listeners)
    (runtime / "control").symlink_to(elsewhere / "control")
    return "is a symbolic link"


PLANTS = [
    pytest.param(foreign_directory, id="foreign-directory", marks=as_root),
    pytest.param(symbolic_link, id="symbolic-link"),
    pytest.param(open_directory, id="open-directory"),
    pytest.param(foreign_socket, id="foreign-socket", marks=as_root),
    pytest.param(linked_socket, id="linked-socket"),
]
Plant = Callable[[Path, list[socket.socket]], str]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ioserver", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        cwd=ROOT,
    )


@pytest.mark.anyio
@pytest.mark.parametrize("plant", PLANTS)
async def test_the_client_refuses_a_planted_endpoint(
    no_leaks: None, plant: Plant, runtime: Path, listeners: list[socket.socket]
) -> None:
    complaint = plant(runtime, listeners)
    with anyio.fail_after(5):
        with pytest.raises(client.UnsafeEndpointError, match=re.escape(complaint)) as caught:
            async with client.connect(timeout=1):
                pass
    assert isinstance(caught.value, ioserver.ConnectError)
    assert caught.value.errno_name == "EPERM"


@pytest.mark.parametrize("plant", PLANTS)
def test_serve_and_status_refuse_a_planted_endpoint_and_touch_nothing(
    plant: Plant, runtime: Path, listeners: list[socket.socket]
) -> None:
    complaint = plant(runtime, listeners)
    modes = {
        path: os.lstat(path).st_mode
        for path in runtime.parent.rglob("*")  # the planter's files, links not followed
    }
    served = run_cli("serve")
    assert served.returncode == 1, served.stderr
    assert complaint in served.stderr and "Traceback" not in served.stderr, served.stderr
    status = run_cli("status", "--timeout", "1")
    assert status.returncode == 1, status.stderr
    assert complaint in status.stderr and "Traceback" not in status.stderr, status.stderr
    assert {path: os.lstat(path).st_mode for path in runtime.parent.rglob("*")} == modes


def test_serve_makes_a_private_directory_on_a_clean_default_path(runtime: Path) -> None:
    """The checks let the daemon's own directory through (and ``status`` reach it)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "ioserver", "serve", "--heartbeat", "0.2"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        cwd=ROOT,
    )
    try:
        assert process.stderr is not None
        for line in process.stderr:  # the daemon's log: wait for it to serve
            if "serving" in line:
                break
        assert stat.S_IMODE(os.lstat(runtime).st_mode) == 0o700
        assert stat.S_IMODE(os.lstat(runtime / "control").st_mode) == 0o600
        status = run_cli("status", "--json")
        assert status.returncode == 0, status.stderr
    finally:
        process.terminate()
        assert process.wait(20) == 0
        assert process.stderr is not None
        process.stderr.close()
    assert not (runtime / "control").exists()


# -- a daemon of another user, behind files that look right ---------------------------
IMPOSTOR = """
import json, os, sys
import zmq
from ioserver import _protocol as P

# Everything imported as root; from here on, the other user.
os.setgroups([])
os.setresgid(OTHER, OTHER, OTHER)
os.setresuid(OTHER, OTHER, OTHER)
context = zmq.Context()
sock = context.socket(zmq.ROUTER)
sock.setsockopt(zmq.LINGER, 0)
sock.bind(f"ipc://{sys.argv[1]}/control")
print("ready", flush=True)
received = []
poller = zmq.Poller()
poller.register(sock, zmq.POLLIN)
poller.register(sys.stdin.fileno(), zmq.POLLIN)
while True:
    events = dict(poller.poll(20_000))
    if not events or sys.stdin.fileno() in events:  # stdin closed: stop
        break
    identity, frame = sock.recv_multipart()
    messages = P.unpack(frame)
    received.append([message[0] for message in messages])
    if messages[0][0] == P.HELLO:
        info = {"version": P.VERSION, "heartbeat": 1.0, "pid": os.getpid(), "worker": None}
        sock.send_multipart([identity, P.pack([[P.WELCOME, info]])])
sock.close()
context.term()
print(json.dumps(received), flush=True)
""".replace("OTHER", str(OTHER))


class Impostor:
    """A daemon lookalike running as uid OTHER, whose socket is then moved into our
    private directory (0700, the socket 0600): only its peer credentials tell it apart."""

    def __init__(self, runtime: Path, staging: Path) -> None:
        # It binds in a directory of its own that it can reach; a rename keeps the
        # listening socket working at the new path.
        os.chown(staging, OTHER, OTHER)
        runtime.mkdir(mode=0o700)
        self.runtime = runtime
        self.process = subprocess.Popen(
            [sys.executable, "-c", IMPOSTOR, str(staging)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            cwd=ROOT,
        )
        assert self.process.stdout is not None
        if self.process.stdout.readline() != "ready\n":
            self.stop()
            pytest.fail("the impostor did not start")
        os.rename(staging / "control", runtime / "control")
        os.chown(runtime / "control", os.geteuid(), os.getegid())
        os.chmod(runtime / "control", 0o600)

    def stop(self) -> list[list[int]]:
        """Stop it; the opcodes of each frame it received."""
        if self.process.returncode is not None:
            return []
        output, _ = self.process.communicate(timeout=20)  # closes its stdin: it stops
        assert self.process.returncode == 0
        return list(json.loads(output)) if output.strip() else []


@pytest.fixture
def impostor(runtime: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Impostor]:
    # The system's temporary directory, where pytest keeps its own (tmp_path is 0700).
    system_tmp = tmp_path_factory.getbasetemp().parent.parent
    if not os.stat(system_tmp).st_mode & stat.S_IXOTH:
        pytest.skip(f"{system_tmp} is closed to other users")
    staging = Path(tempfile.mkdtemp(prefix="ioserver-impostor-", dir=system_tmp))
    process = Impostor(runtime, staging)
    try:
        yield process
    finally:
        process.stop()
        os.rmdir(staging)


@as_root
@pytest.mark.anyio
async def test_the_client_refuses_a_daemon_of_another_user_by_its_credentials(
    impostor: Impostor, no_leaks: None
) -> None:
    assert _ipc.client_check(str(impostor.runtime / "control"))  # the files look right
    with anyio.fail_after(5):
        with pytest.raises(client.UnsafeEndpointError, match=f"runs as uid {OTHER}"):
            async with client.connect(timeout=3):
                pytest.fail("the session opened")
    # The impostor got the greeting and nothing more: no command, not even BYE.
    assert impostor.stop() == [[P.HELLO]]


@as_root
def test_status_refuses_a_daemon_of_another_user(impostor: Impostor) -> None:
    status = run_cli("status", "--timeout", "3")
    assert status.returncode == 1, status.stderr
    assert f"runs as uid {OTHER}" in status.stderr, status.stderr
    assert "Traceback" not in status.stderr, status.stderr


def test_peer_uid_reads_libzmqs_peer_address() -> None:
    """libzmq appends ``:uid:gid:pid`` to an ipc peer's address (SO_PEERCRED)."""

    class Frame:
        def __init__(self, address: str) -> None:
            self.address = address

        def get(self, name: str) -> str:
            assert name == "Peer-Address"
            return self.address

    assert _ipc.peer_uid(Frame("localhost:1000:100:4242")) == 1000
    assert _ipc.peer_uid(Frame("/run/x:y:0:0:77")) == 0
    assert _ipc.peer_uid(Frame(":501:20:")) == 501  # BSD's LOCAL_PEERCRED: no pid
    assert _ipc.peer_uid(Frame("127.0.0.1")) is None
    assert _ipc.peer_uid(Frame("::1")) is None
