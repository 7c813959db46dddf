"""The ``linger`` option: a closed stream port's queued output is written within a bound.

``close`` writes what is queued before it closes the socket (Erlang's ``gen_tcp:close``);
a peer that never reads must not pin the descriptor and the output for ever: after
``linger`` seconds the socket is reset (``SO_LINGER {1, 0}``) and the output dropped.

Real sockets on loopback, both backends; the TCP tests on both cores (``every_core``).
The peers are plain sockets the test drives; a peer "sees the reset" when ``poll``
reports an error or a hang-up on its socket (its receive buffer is full of unread data,
so readability says nothing).
"""

from __future__ import annotations

import dataclasses
import errno
import select
import socket
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest

import ioserver
import ports
from ioserver import IOServerStatistics
from ports import Accepted

pytestmark = pytest.mark.anyio

#: More than the peer's receive buffer and the port's send buffer hold together.
QUEUED = 1 << 20
BOUND = 10.0  # seconds any wait below may take at most (a loaded CI machine)


async def _pair(
    ios: ioserver.IOServer, **options: Any
) -> tuple[ports.Listener, ports.Port, socket.socket]:
    """A listener, the port it accepted, and the peer: a plain socket that reads nothing
    unless the test reads it, its receive buffer small."""
    listener = await ports.listen_tcp(
        ios, "127.0.0.1", 0, sndbuf=4096, high_watermark=4 * QUEUED, **options
    )
    peer = socket.socket()
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    peer.connect(listener.local_address)
    accepted = await listener.receive()
    assert isinstance(accepted, Accepted)
    return listener, accepted.port, peer


def _wait_reset(peer: socket.socket, timeout: float) -> bool:
    """Whether the peer's socket reports an error or a hang-up within ``timeout`` s."""
    poller = select.poll()
    poller.register(peer, select.POLLERR | select.POLLHUP)
    return any(mask & (select.POLLERR | select.POLLHUP) for _, mask in poller.poll(timeout * 1000))


async def _queue_and_close(port: ports.Port) -> None:
    """Queue :data:`QUEUED` bytes the peer will not read, then close the port."""
    port.send_nowait(b"x" * QUEUED)
    await port.aclose()


async def _statistics(ios: ioserver.IOServer) -> IOServerStatistics:
    """The I/O server's statistics once the I/O thread ran a command sent now (a listen):
    what it did in the rounds before (the close's bookkeeping) is over.  ``ports_open``
    does not count that listener."""
    listener = await ports.listen_tcp(ios, "127.0.0.1", 0)
    statistics = ios.statistics()
    await listener.aclose()
    return dataclasses.replace(statistics, ports_open=statistics.ports_open - 1)


@pytest.mark.every_core
async def test_a_peer_that_never_reads_is_reset_after_linger(ios: ioserver.IOServer) -> None:
    listener, port, peer = await _pair(ios, linger=0.2)
    with peer:
        async with listener:
            assert ios.statistics().ports_open == 2
            await _queue_and_close(port)
            assert ios.statistics().memory_in_use > 0  # queued, not written
            assert await anyio.to_thread.run_sync(_wait_reset, peer, BOUND)
            assert peer.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == errno.ECONNRESET
            statistics = await _statistics(ios)
            assert statistics.linger_timeouts == 1
            assert statistics.ports_open == 1  # the listener: the port's socket is gone
            assert statistics.memory_in_use == 0  # the queued output was released


@pytest.mark.every_core
async def test_a_slow_peer_that_reads_within_linger_gets_every_byte(
    ios: ioserver.IOServer,
) -> None:
    listener, port, peer = await _pair(ios, linger=BOUND)
    with peer:
        async with listener:
            await _queue_and_close(port)

            def read_all() -> int:
                received = 0
                while chunk := peer.recv(4096):  # small reads: a slow reader
                    received += len(chunk)
                return received  # ended by the peer's clean end (b""), not a reset

            assert await anyio.to_thread.run_sync(read_all) == QUEUED
            statistics = await _statistics(ios)
            assert statistics.linger_timeouts == 0
            assert statistics.ports_open == 1
            assert statistics.memory_in_use == 0


@pytest.mark.every_core
async def test_linger_none_waits_for_the_peer_as_long_as_it_takes(
    ios: ioserver.IOServer,
) -> None:
    # Two ports closed together: the one with linger=None must outlive the reset of
    # the one with a short linger (the event that measures the interval).
    waiting, port, peer = await _pair(ios, linger=None)
    timed, timed_port, timed_peer = await _pair(ios, linger=0.3)
    with peer, timed_peer:
        async with waiting, timed:
            await _queue_and_close(port)
            await _queue_and_close(timed_port)
            assert await anyio.to_thread.run_sync(_wait_reset, timed_peer, BOUND)
            statistics = await _statistics(ios)
            assert not _wait_reset(peer, 0)  # still connected, its output still queued
            assert statistics.ports_open == 3  # two listeners and the waiting port
            assert statistics.linger_timeouts == 1
            assert statistics.memory_in_use > 0

            def read_all() -> int:
                received = 0
                while chunk := peer.recv(1 << 16):
                    received += len(chunk)
                return received

            assert await anyio.to_thread.run_sync(read_all) == QUEUED  # then it closes
            statistics = await _statistics(ios)
            assert statistics.ports_open == 2
            assert statistics.memory_in_use == 0


@pytest.mark.every_core
async def test_linger_zero_resets_at_once(ios: ioserver.IOServer) -> None:
    listener, port, peer = await _pair(ios, linger=0)
    with peer:
        async with listener:
            await _queue_and_close(port)
            statistics = await _statistics(ios)  # the close ran: no timer involved
            assert _wait_reset(peer, 0)
            assert peer.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == errno.ECONNRESET
            assert statistics.linger_timeouts == 1
            assert statistics.ports_open == 1
            assert statistics.memory_in_use == 0


@pytest.mark.every_core
async def test_linger_applies_to_a_connected_port(ios: ioserver.IOServer) -> None:
    # connect_tcp's ports take the option as accepted ones do.
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    with server:
        port = await ports.connect_tcp(
            ios,
            "127.0.0.1",
            server.getsockname()[1],
            sndbuf=4096,
            linger=0.2,
            high_watermark=4 * QUEUED,
        )
        peer, _ = server.accept()
        with peer:
            peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            await _queue_and_close(port)
            assert await anyio.to_thread.run_sync(_wait_reset, peer, BOUND)
            statistics = await _statistics(ios)
            assert statistics.linger_timeouts == 1
            assert statistics.memory_in_use == 0
            assert statistics.ports_open == 0


@pytest.mark.parametrize(
    # 2**31 and past: beyond SO_LINGER's range (sys.maxsize seconds overflowed the native
    # thread's clock and stopped the whole server before it was refused here).
    "value",
    [-1, -0.5, "1", True, float("nan"), float("inf"), [1], 2**31, sys.maxsize, 1e19],
)
async def test_a_bad_linger_is_an_option_error(ios: ioserver.IOServer, value: object) -> None:
    with pytest.raises(ioserver.OptionError, match="linger"):
        await ports.listen_tcp(ios, "127.0.0.1", 0, linger=value)
    with pytest.raises(ioserver.OptionError, match="linger"):
        await ports.connect_tcp(ios, "127.0.0.1", 1, linger=value)


async def test_linger_bounds_a_unix_socket_port_too(ios: ioserver.IOServer, tmp_path: Path) -> None:
    # A Unix stream's peer that never reads: the port is closed after linger (the peer
    # sees its end hang up; AF_UNIX has no RST) and its output released.
    path = str(tmp_path / "s")
    listener = await ports.listen_unix(ios, path, linger=0.2, high_watermark=4 * QUEUED)
    async with listener:
        peer = socket.socket(socket.AF_UNIX)
        with peer:
            peer.connect(path)
            accepted = await listener.receive()
            assert isinstance(accepted, Accepted)
            await _queue_and_close(accepted.port)
            assert await anyio.to_thread.run_sync(_wait_reset, peer, BOUND)
            statistics = await _statistics(ios)
            assert statistics.linger_timeouts == 1
            assert statistics.ports_open == 1
            assert statistics.memory_in_use == 0
