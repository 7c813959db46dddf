"""The native core's I/O backends (``ioserver.open(io_backend=...)``): choosing one, the
proof that io_uring batches a round's syscalls, and adversarial peers on both backends.

The TCP tests of ``test_tcp.py`` and the ``every_core`` tests of ``test_native_core.py``
run on both backends too (``tests/conftest.py``: ``native-epoll``, ``native-io_uring``).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import anyio
import pytest
from test_native_core import accept, receive_exactly

import ioserver
import ports
from ports import Closed, Data

pytestmark = pytest.mark.anyio

REPO = Path(__file__).resolve().parent.parent


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, "the connection ended early"
        data += chunk
    return data


async def counted(ios: ioserver.IOServer) -> ioserver.IOServerStatistics:
    """The statistics once the round that sent a peer its last bytes has counted them: a
    round adds its enters and submissions after the enter returns, so the peer can hold
    the bytes first.  A hold is a command, taken at a later round's start: once the thread
    stops there, every earlier round has counted."""
    hold = ios._io._core._hold_for_test()  # type: ignore[attr-defined]
    assert await anyio.to_thread.run_sync(hold.wait)
    hold.release()
    return ios.statistics()


def reset(sock: socket.socket) -> None:
    """Close ``sock`` with an RST instead of a FIN (SO_LINGER of zero seconds)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


# -- choosing a backend ---------------------------------------------------------------------


async def test_the_backend_is_chosen_by_argument_or_environment(
    no_leaks: None, needs_io_uring: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("IOSERVER_IO_BACKEND", raising=False)
    for name in ("epoll", "io_uring"):
        async with ioserver.open(core="native", io_backend=name) as ios:
            assert ios.statistics().io_backend == name
    # The default: io_uring, where the kernel allows it (it does here).
    async with ioserver.open(core="native") as ios:
        assert ios.statistics().io_backend == "io_uring"
    monkeypatch.setenv("IOSERVER_IO_BACKEND", "epoll")
    async with ioserver.open(core="native") as ios:
        assert ios.statistics().io_backend == "epoll"
    async with ioserver.open(core="native", io_backend="io_uring") as ios:
        assert ios.statistics().io_backend == "io_uring"
    # The Python core has no such choice: it ignores the variable, and says None.
    monkeypatch.setenv("IOSERVER_IO_BACKEND", "io_uring")
    async with ioserver.open(core="python") as ios:
        assert ios.statistics().io_backend is None
        assert ios.statistics().io_uring_enters == 0
    async with ioserver.open(core="python", io_backend="epoll") as ios:
        assert ios.statistics().io_backend is None
    with pytest.raises(ioserver.NotSupportedError, match="native core"):
        async with ioserver.open(core="python", io_backend="io_uring"):
            pass
    monkeypatch.setenv("IOSERVER_IO_BACKEND", "kqueue")
    with pytest.raises(ioserver.OptionError, match=r"'kqueue'.*IOSERVER_IO_BACKEND"):
        async with ioserver.open(core="native"):
            pass
    monkeypatch.delenv("IOSERVER_IO_BACKEND")
    with pytest.raises(ioserver.OptionError, match="'uring'"):
        async with ioserver.open(core="native", io_backend="uring"):
            pass
    with pytest.raises(ioserver.OptionError, match="io_backend="):
        ioserver.run(_nothing, backend="io_uring")


async def _nothing(ios: ioserver.IOServer) -> None:
    return None  # pragma: no cover - run() refuses before it calls this


def test_the_cli_takes_io_backend(needs_io_uring: None, tmp_path: Path) -> None:
    app = tmp_path / "show.py"
    app.write_text(
        textwrap.dedent(
            """
            async def main(ios, argv):
                print(ios.statistics().core, ios.statistics().io_backend)
            """
        )
    )
    for name in ("epoll", "io_uring"):
        command = [sys.executable, "-m", "ioserver", "run", str(app)]
        done = subprocess.run(
            [*command, "--core", "native", "--io-backend", name],
            capture_output=True,
            text=True,
            timeout=30,
            cwd=REPO,
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.split() == ["native", name]
    done = subprocess.run(
        [sys.executable, "-m", "ioserver", "run", str(app), "--io-backend", "kqueue"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO,
    )
    assert done.returncode == 2
    assert "--io-backend" in done.stderr


#: A C program that runs its arguments under a seccomp filter refusing io_uring_setup with
#: EPERM, as a container runtime's default profile does (the syscall's number is the
#: header's, __NR_io_uring_setup).
SECCOMP_HELPER = r"""
#include <errno.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <stddef.h>
#include <stdio.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

int main(int argc, char **argv) {
    struct sock_filter filter[] = {
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_io_uring_setup, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | EPERM),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
    };
    struct sock_fprog program = {sizeof filter / sizeof filter[0], filter};
    if (argc < 2 || prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
        || prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &program) != 0) {
        perror("seccomp");
        return 127;
    }
    execv(argv[1], argv + 1);
    perror("execv");
    return 127;
}
"""

REFUSED_PROBE = """
import anyio, ioserver

async def main():
    async with ioserver.open(core="native") as ios:
        print(ios.statistics().io_backend)
        print(ios._io.io_uring_failure)
    try:
        async with ioserver.open(core="native", io_backend="io_uring"):
            pass
    except ioserver.NotSupportedError as exc:
        print(exc)

anyio.run(main)
"""


def test_a_kernel_that_refuses_io_uring(tmp_path: Path) -> None:
    """Under a seccomp filter that refuses io_uring_setup (EPERM), the default falls back
    to epoll and says why, and an explicit io_uring is a NotSupportedError naming EPERM."""
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None or not sys.platform.startswith("linux"):
        pytest.skip("needs a C compiler and Linux's seccomp")
    source = tmp_path / "refuse_io_uring.c"
    source.write_text(SECCOMP_HELPER)
    helper = tmp_path / "refuse_io_uring"
    subprocess.run([gcc, "-O1", "-o", str(helper), str(source)], check=True, timeout=60)
    environment = {k: v for k, v in os.environ.items() if k != "IOSERVER_IO_BACKEND"}
    done = subprocess.run(
        [str(helper), sys.executable, "-c", REFUSED_PROBE],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO,
        env=environment,
    )
    assert done.returncode == 0, done.stderr
    backend, failure, error = done.stdout.splitlines()
    assert backend == "epoll"
    assert "io_uring refused by the kernel" in failure
    assert "EPERM" in error or "Operation not permitted" in failure
    assert error.startswith("io_backend='io_uring' is refused here: EPERM"), error


# -- batching: one io_uring_enter per round -----------------------------------------------


async def connected_pairs(
    ios: ioserver.IOServer, count: int
) -> tuple[ports.Listener, list[ports.Port], list[socket.socket]]:
    listener = await ports.listen_tcp(ios, "127.0.0.1", 0)
    peers = [socket.create_connection(listener.local_address) for _ in range(count)]
    accepted = [await accept(listener) for _ in range(count)]
    return listener, accepted, peers


async def test_a_round_with_n_ready_ports_takes_one_enter(
    no_leaks: None, needs_io_uring: None
) -> None:
    """N ports that become readable together are read with one io_uring_enter of N
    receives; N ports that send together write with one of N sends.  The I/O thread is
    held (a test hook) while the peers send and the owners queue, so that one round sees
    them all."""
    count = 32
    async with ioserver.open(core="native", io_backend="io_uring") as ios:
        listener, accepted, peers = await connected_pairs(ios, count)
        core = ios._io._core  # type: ignore[attr-defined]
        try:
            # Reads: the peers send while the thread is held.
            before = ios.statistics()
            hold = core._hold_for_test()
            assert await anyio.to_thread.run_sync(hold.wait)
            for index, peer in enumerate(peers):
                peer.sendall(b"%d;" % index)
            hold.release()
            for index, port in enumerate(accepted):
                expected = b"%d;" % index
                assert await receive_exactly(port, len(expected)) == expected
            after = ios.statistics()
            assert after.io_uring_enters - before.io_uring_enters == 1
            assert after.io_uring_submissions - before.io_uring_submissions == count
            # Writes: the owners send while the thread is held.
            before = after
            hold = core._hold_for_test()
            assert await anyio.to_thread.run_sync(hold.wait)
            for index, port in enumerate(accepted):
                await port.send(b"reply %d;" % index)
            hold.release()
            for index, peer in enumerate(peers):
                expected = b"reply %d;" % index
                assert await anyio.to_thread.run_sync(recv_exactly, peer, len(expected))
            after = await counted(ios)
            assert after.io_uring_enters - before.io_uring_enters == 1
            assert after.io_uring_submissions - before.io_uring_submissions == count
        finally:
            for peer in peers:
                peer.close()
            for port in accepted:
                await port.aclose()
            await listener.aclose()


async def test_many_small_writes_are_gathered(no_leaks: None, needs_io_uring: None) -> None:
    """1,000 sends queued in one round go out 64 buffers to a sendmsg, one a round: 16
    submissions in 16 enters, every byte in order."""
    sends, size, gather = 1000, 10, 64
    async with ioserver.open(core="native", io_backend="io_uring") as ios:
        listener, (port,), (peer,) = await connected_pairs(ios, 1)
        try:
            payloads = [os.urandom(size) for _ in range(sends)]
            before = ios.statistics()
            hold = ios._io._core._hold_for_test()  # type: ignore[attr-defined]
            assert await anyio.to_thread.run_sync(hold.wait)
            for payload in payloads:
                await port.send(payload)
            hold.release()
            got = await anyio.to_thread.run_sync(recv_exactly, peer, sends * size)
            assert got == b"".join(payloads)
            after = await counted(ios)
            batches = -(-sends // gather)
            assert after.io_uring_submissions - before.io_uring_submissions == batches
            assert after.io_uring_enters - before.io_uring_enters == batches
        finally:
            peer.close()
            await port.aclose()
            await listener.aclose()


# -- adversarial peers, on both cores and both backends -----------------------------------


@pytest.mark.every_core
async def test_a_reset_mid_frame_is_one_closed_message(ios: ioserver.IOServer) -> None:
    """A peer that resets in the middle of a packet: the whole packets before it arrive,
    the partial one does not, and the port ends with one Closed("ECONNRESET")."""
    listener = await ports.listen_tcp(ios, "127.0.0.1", 0, packet=4)
    async with listener:
        peer = socket.create_connection(listener.local_address)
        port = await accept(listener)
        peer.sendall(struct.pack(">I", 5) + b"whole")
        assert await port.receive() == Data(b"whole")
        peer.sendall(struct.pack(">I", 1000) + b"only part of it")
        reset(peer)
        assert await port.receive() == Closed("ECONNRESET", "ECONNRESET")
        with pytest.raises(ports.EndOfPort):
            await port.receive()
        await port.aclose()


@pytest.mark.every_core
async def test_a_peer_that_never_reads(ios: ioserver.IOServer) -> None:
    """The owner's sends queue up until the high watermark makes one wait; closing with
    output still queued returns at once while the I/O thread keeps trying, and the peer's
    reset ends it: the port is released with nothing left in use."""
    high, low, chunk = 256 * 1024, 64 * 1024, b"x" * 65536
    listener = await ports.listen_tcp(
        ios, "127.0.0.1", 0, high_watermark=high, low_watermark=low, sndbuf=16384
    )
    async with listener:
        peer = socket.socket()
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        peer.connect(listener.local_address)
        port = await accept(listener)

        async def flood() -> None:
            while True:
                await port.send(chunk)

        async with anyio.create_task_group() as group:
            group.start_soon(flood)
            with anyio.fail_after(10):
                while port.statistics().busy_transitions == 0:  # noqa: ASYNC110 - a counter, no event
                    await anyio.sleep(0.005)
            statistics = port.statistics()
            assert low < statistics.bytes_queued <= high + len(chunk)
            group.cancel_scope.cancel()
        assert port.statistics().bytes_queued > 0
        await port.aclose()  # with output queued: returns at once, the I/O thread flushes
        assert ios.statistics().ports_open == 2  # the listener, and the port still flushing
        reset(peer)
        with anyio.fail_after(10):
            while ios.statistics().ports_open > 1:  # noqa: ASYNC110 - a counter, no event
                await anyio.sleep(0.005)
        # The discarded output goes back to the loop with its next batch, or after the
        # I/O thread idled 10 ms (on the native core; the Python core drops it at once):
        # one more connection brings a batch at once.
        other = socket.create_connection(listener.local_address)
        await (await accept(listener)).aclose()
        other.close()
        assert ios.statistics().memory_in_use == 0


@pytest.mark.every_core
async def test_a_flood_of_100_connections_loses_nothing(ios: ioserver.IOServer) -> None:
    """100 peers each send 256 KiB at once to an echo; each gets back exactly its bytes."""
    count, size = 100, 256 * 1024
    listener = await ports.listen_tcp(ios, "127.0.0.1", 0)

    async def echo(port: ports.Port) -> None:
        async with port:
            async for message in port:
                if isinstance(message, Data):
                    await port.send(message.data)

    async def peer(index: int) -> None:
        payload = os.urandom(size)
        async with await anyio.connect_tcp(*listener.local_address) as stream:
            async with anyio.create_task_group() as group:
                group.start_soon(stream.send, payload)
                digest = hashlib.sha256()
                got = 0
                while got < size:
                    data = await stream.receive()
                    digest.update(data)
                    got += len(data)
            assert got == size
            assert digest.digest() == hashlib.sha256(payload).digest(), index

    async with listener, anyio.create_task_group() as servers:
        with anyio.fail_after(30):
            async with anyio.create_task_group() as peers:
                for index in range(count):
                    peers.start_soon(peer, index)
                for _ in range(count):
                    servers.start_soon(echo, await accept(listener))
    if ios.statistics().io_backend == "io_uring":
        statistics = ios.statistics()
        assert statistics.io_uring_submissions > statistics.io_uring_enters > 0
