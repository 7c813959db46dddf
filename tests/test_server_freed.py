"""An I/O server that was opened and closed is freed: nothing of it outlives the block.

Programs open servers repeatedly (a test suite, a supervisor restarting a child server):
each closed server must leave nothing behind - not its I/O thread object, not its hub, and
on the native core nothing that the Rust side holds (``Core``, ``Inbox``: their Python
references are visible to the garbage collector, ``__traverse__``, and dropped when the
server stops).  Before, on the native core, every closed server stayed alive for good
(about 250 KiB each): the native ``Core`` held its hosted half's bound methods and each
``Inbox`` its hub, references the collector could not see, so the cycles through them were
never collected.
"""

from __future__ import annotations

import gc
import os
import socket
import weakref

import pytest

import ioserver
import ports
from ioserver import _native
from ioserver._hub import Hub
from ioserver._iothread import IOThread

#: Servers opened and closed per test.
SERVERS = 4


def _count(*kinds: type) -> int:
    """The live objects of ``kinds`` the collector tracks."""
    return sum(isinstance(obj, kinds) for obj in gc.get_objects())


async def _use(ios: ioserver.IOServer) -> list[weakref.ref[object]]:
    """Use every half of ``ios`` once - a listener, an accepted and a connected port with
    data both ways (native ports on the native core), a UDP port (its hosted half) - and
    close them; weak references to the objects that must die with the server."""
    listener = await ports.listen_tcp(ios, "127.0.0.1", 0)
    peer = socket.create_connection(listener.local_address)
    async with listener:
        accepted = (await listener.receive()).port
        client = await ports.connect_tcp(ios, "127.0.0.1", listener.local_address[1])
        await (await listener.receive()).port.aclose()
    await accepted.send(b"ping")
    peer.settimeout(5)
    assert peer.recv(16) == b"ping"
    peer.sendall(b"pong")
    message = await accepted.receive()
    assert isinstance(message, ioserver.Data) and message.data == b"pong"
    udp = await ports.open_udp(ios)
    await udp.aclose()
    await client.aclose()
    await accepted.aclose()
    peer.close()
    return [weakref.ref(ios._io), weakref.ref(ios._hub)]


@pytest.mark.anyio
@pytest.mark.every_core
async def test_a_closed_server_is_freed(no_leaks: None, core: str, io_backend: str | None) -> None:
    """Open, use and close a server several times, collect: every I/O thread object and
    every hub is dead, and no native core object (``Core``, ``Inbox``) is left."""
    if io_backend == "io_uring":
        try:
            _native.Core(64, "io_uring").close_commands()
        except OSError as exc:
            pytest.skip(f"io_uring is refused here: {exc}")
    gc.collect()
    before = _count(IOThread, Hub, _native.Core, _native.Inbox)
    refs: list[weakref.ref[object]] = []
    for _ in range(SERVERS):
        async with ioserver.open(core=core, io_backend=io_backend) as ios:
            refs += await _use(ios)
        del ios
    gc.collect()
    alive = [ref() for ref in refs if ref() is not None]
    assert not alive, f"closed servers' objects still alive: {alive}"
    assert _count(IOThread, Hub, _native.Core, _native.Inbox) == before


def test_a_native_core_never_started_is_freed() -> None:
    """A native I/O thread made and discarded without being started (how an
    ``ioserver.open`` that fails before its start ends) is freed too: until it starts,
    the ``Core`` holds the hosted half's ``run_round`` and ``stop_hosted`` (bound methods
    of the ``NativeIOThread``, which holds the ``Core``), which it shows the collector."""
    from ioserver._native_core import NativeIOThread

    fds = set(os.listdir("/proc/self/fd"))
    refs = []
    for _ in range(SERVERS):
        io = NativeIOThread(io_backend="epoll")
        refs.append(weakref.ref(io))
        io.discard()
        del io
    gc.collect()
    assert [ref() for ref in refs] == [None] * SERVERS
    assert set(os.listdir("/proc/self/fd")) <= fds
