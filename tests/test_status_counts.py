"""``ioserver status``'s figures (``ioserver._control.io_status``) on both cores: the ports
by kind, and the busy and paused ports, the native thread's included."""

from __future__ import annotations

import os
import time
from typing import Any

import anyio
import pytest
from conftest import until

import ioserver
import ports
from ioserver._control import io_status
from ports import Accepted

pytestmark = pytest.mark.anyio


async def _accept(listener: ports.Listener) -> ports.Port:
    message = await listener.receive()
    assert isinstance(message, Accepted), message
    return message.port


async def _status(ios: ioserver.IOServer) -> dict[str, Any]:
    """``io_status``, run on the I/O thread (as the daemon's control endpoint runs it)."""
    found: list[dict[str, Any]] = []

    def status(target: object, argument: object) -> None:
        found.append(io_status(ios._io, time.monotonic(), {}))  # type: ignore[arg-type]

    ios._io.submit(status, None, None)  # type: ignore[attr-defined]
    await until(lambda: bool(found), 5)
    return found[0]


@pytest.mark.every_core
async def test_status_counts_unix_ports_apart_and_the_busy_and_paused_ports_of_each_core(
    ios: ioserver.IOServer, tmp_path: Any
) -> None:
    """A TCP and a Unix listener, a connection to each (both ends ports), one port busy
    (its peer reads nothing of 8 MiB) and two paused (their owners take nothing of what
    their watermarks allow): the status counts Unix ports as ``unix`` and
    ``unix_listeners``, and the busy and paused ports of the native thread too.  Before,
    Unix ports counted as ``tcp``, and on the native core ``busy_ports`` and
    ``paused_ports`` covered the hosted half's ports only (0 here)."""
    small = {"high_msgq_watermark": 4096, "low_msgq_watermark": 2048}
    tcp_listener = await ports.listen_tcp(ios, "127.0.0.1", 0, **small)
    path = os.path.join(str(tmp_path), "s")
    unix_listener = await ports.listen_unix(ios, path)
    async with tcp_listener, unix_listener:
        tcp_client = await ports.connect_tcp(ios, *tcp_listener.local_address)
        tcp_server = await _accept(tcp_listener)
        unix_client = await ports.connect_unix(ios, path)
        unix_server = await _accept(unix_listener)
        async with tcp_client, tcp_server, unix_client, unix_server:
            # Busy: 8 MiB queued towards a peer (unix_client) that reads nothing.
            await unix_server.send(b"x" * (8 << 20))
            # Paused: 64 KiB towards an owner (tcp_server) that takes nothing.
            await tcp_client.send(b"y" * (64 << 10))
            with anyio.fail_after(10):
                while True:
                    status = await _status(ios)
                    if status["busy_ports"] >= 1 and status["paused_ports"] >= 2:
                        break
                    await anyio.sleep(0.01)  # (the I/O thread's counters: no event)
            kinds = status["ports_by_kind"]
            assert (kinds["tcp"], kinds["tcp_listeners"]) == (2, 1), kinds
            assert (kinds["unix"], kinds["unix_listeners"]) == (2, 1), kinds
            assert status["busy_ports"] == 1, status
            # (unix_client too: its owner takes nothing of the 8 MiB either.)
            assert status["paused_ports"] == 2, status
            await unix_server.aclose()
            await tcp_server.aclose()
    with anyio.fail_after(5):
        while True:
            status = await _status(ios)
            if status["ports_open"] == 0:
                break
            await anyio.sleep(0.01)
    assert (status["busy_ports"], status["paused_ports"]) == (0, 0), status
    assert not any(status["ports_by_kind"].values()), status
