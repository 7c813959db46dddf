"""The I/O thread's selector backends: each one chosen by name, and select's ``FD_SETSIZE``
refusing the one port beyond it (with real descriptors above 1024), not the thread.

The echo, chat-like and framing tests marked ``every_poller`` (tests/conftest.py) run
under each backend too."""

from __future__ import annotations

import os
import resource
import socket
from collections.abc import Iterator
from contextlib import AsyncExitStack, contextmanager
from pathlib import Path

import anyio
import pytest

import ioserver
import ports
from ioserver._poller import FD_SETSIZE, POLLERS
from ports import Accepted, Data, Error

pytestmark = [pytest.mark.anyio, pytest.mark.python_core]


@contextmanager
def low_descriptors_taken(above: int = FD_SETSIZE) -> Iterator[list[int]]:
    """Hold every free descriptor below ``above`` (opened on /dev/null), so that the next
    one the process opens is ``above`` or more; release them on exit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < above + 64:
        pytest.skip(f"the hard open-file limit ({hard}) is too low for descriptors ≥ {above}")
    if soft != resource.RLIM_INFINITY and soft < above + 64:
        resource.setrlimit(resource.RLIMIT_NOFILE, (above + 64, hard))
    held = []
    try:
        while True:
            fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            if fd >= above:
                os.close(fd)
                break
            held.append(fd)
        yield held
    finally:
        for fd in held:
            os.close(fd)


@pytest.mark.parametrize("name", list(POLLERS))
async def test_each_poller_is_chosen_by_name_and_named_in_statistics(
    no_leaks: None, name: str
) -> None:
    async with ioserver.open(poller=name) as ios:
        in_use = ios.statistics().poller
        assert in_use == name or (name == "selectors" and in_use.startswith("selectors ("))
        assert name in repr(ios)


async def test_an_unknown_poller_names_the_ones_there_are(no_leaks: None) -> None:
    with pytest.raises(ports.OptionError, match=r"'epoll', 'poll', 'select'.*not 'kqueue'"):
        async with ioserver.open(poller="kqueue"):
            pass


async def echo_once(port: ports.Port, peer: anyio.abc.SocketStream, text: bytes) -> None:
    await peer.send(text)
    assert await port.receive() == Data(text)
    await port.send(text)
    assert await peer.receive() == text


async def test_select_refuses_the_port_beyond_fd_setsize_and_serves_the_others(
    no_leaks: None, tmp_path: Path
) -> None:
    async with ioserver.open(poller="select") as ios, AsyncExitStack() as stack:
        listener = await ports.listen_tcp(ios, "127.0.0.1", 0)
        address = listener.local_address
        peer = await anyio.connect_tcp(*address)
        accepted = await listener.receive()
        assert isinstance(accepted, Accepted)
        port = accepted.port
        late_client = socket.socket()  # below 1024: the peer of a connection accepted above
        stack.callback(late_client.close)
        async with listener, peer, port:
            with low_descriptors_taken():
                # Each kind the I/O thread would open at fd >= 1024 is refused, typed,
                # naming the poller and the limit.
                with pytest.raises(ioserver.PollerLimitError) as caught:
                    await ports.connect_tcp(ios, *address)
                assert caught.value.poller == "select"
                assert caught.value.fd >= FD_SETSIZE
                assert caught.value.limit == FD_SETSIZE
                assert "select poller cannot watch fd" in str(caught.value)
                assert "FD_SETSIZE (1024)" in str(caught.value)
                with pytest.raises(ioserver.PollerLimitError, match="select"):
                    await ports.listen_tcp(ios, "127.0.0.1", 0)
                with pytest.raises(ioserver.PollerLimitError, match="select"):
                    await ports.open_udp(ios, bind=("127.0.0.1", 0))
                with pytest.raises(ioserver.PollerLimitError, match="select"):
                    await ports.listen_unix(ios, f"{tmp_path}/refused.sock")
                with pytest.raises(ioserver.PollerLimitError, match="select"):
                    await ports.open_zmq(ios, "PULL", bind="inproc://refused")
                with pytest.raises(ioserver.PollerLimitError, match="select"):
                    await ports.open_process(ios, ["true"])  # not started (no zombie)
                # A connection accepted at fd >= 1024: refused, the listener told.
                late_client.connect(address)
                error = await listener.receive()
                assert isinstance(error, Error)
                assert error.errno_name == "EMFILE"
                assert "FD_SETSIZE (1024)" in error.message
                assert late_client.recv(1) == b""  # closed, not left hanging
                # Meanwhile the port already open is served as before.
                await echo_once(port, peer, b"still here")
            # Descriptors free again: the same listener accepts, the thread never failed.
            again = await anyio.connect_tcp(*address)
            async with again:
                accepted = await listener.receive()
                assert isinstance(accepted, Accepted)
                async with accepted.port:
                    await echo_once(accepted.port, again, b"and again")
            assert ios.statistics().internal_errors == 0


@pytest.mark.parametrize("name", ["epoll", "poll"])
async def test_epoll_and_poll_serve_descriptors_beyond_fd_setsize(
    no_leaks: None, name: str
) -> None:
    if name not in POLLERS:
        pytest.skip(f"no {name} here")
    async with ioserver.open(poller=name) as ios:
        with low_descriptors_taken():
            listener = await ports.listen_tcp(ios, "127.0.0.1", 0)
            async with listener, await anyio.connect_tcp(*listener.local_address) as peer:
                accepted = await listener.receive()
                assert isinstance(accepted, Accepted)
                async with accepted.port:
                    await echo_once(accepted.port, peer, b"high fds")


async def test_select_cannot_start_when_its_own_wakeup_fd_is_beyond_fd_setsize(
    no_leaks: None,
) -> None:
    with (
        low_descriptors_taken(),
        pytest.raises(ioserver.PollerLimitError, match="select poller cannot watch"),
    ):
        async with ioserver.open(poller="select"):
            pass
