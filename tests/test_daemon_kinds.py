"""What the daemon's protocol carries, through a real ``ioserver serve``: TCP ports, with
every packet mode (``"resp"`` included), and a typed refusal of the kinds a daemon was
not started to allow.

Issue 12, item 16: ``open_udp``/``listen_unix`` hung, ``open_zmq`` raised
``AttributeError``, ``open_process`` started the program in the *client*; and the
unconfirmed item: a ``packet="resp"`` port through the daemon was refused by the client
("DATA must carry bytes") because three places decided by mode name which messages are
charged their wire size.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import anyio
import pytest
import zmq
from test_daemon import HEARTBEAT, Daemon, RawClient

import client
import ports
from ioserver import _protocol as P

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One daemon for the module (each test opens its own session)."""
    path = tmp_path_factory.mktemp("kinds") / "control"
    process = Daemon("--endpoint", f"ipc://{path}", "--heartbeat", str(HEARTBEAT))
    try:
        yield f"ipc://{path}"
    finally:
        status = process.stop()
    assert status == 0, process.log
    # A refused request is a FAULT or a NotSupportedError, never an error in the log.
    assert "Traceback" not in process.log, process.log
    assert "error while serving" not in process.log, process.log


def test_the_daemon_refuses_unix_addresses_it_was_not_allowed_with_a_typed_fault(
    endpoint: str,
) -> None:
    """A raw client's AF_UNIX CONNECT or LISTEN to a daemon without ``--allow-unix``:
    FAULT "forbidden", echoing its rid; an unknown family is "malformed"; the daemon keeps
    serving (the module's fixture checks the log).  (Every kind through a daemon that
    allows them: tests/test_remote_kinds.py.)"""
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    raw = RawClient(context, endpoint)
    try:
        unix = int(socket.AF_UNIX)
        raw.send(
            [
                [P.HELLO, P.VERSION],
                [P.CONNECT, 5, 1, unix, "/tmp/x", {}, -1, False],
                [P.LISTEN, 6, 2, unix, "/tmp/x", {}, -1, False],
                [P.CONNECT, 7, 3, 99, ["x", 0], {}, -1, False],
                [P.OPEN_PROCESS, 8, 4, ["true"], "inherit", 1.0, {}, -1, False],
                [P.STATUS, 9],
            ]
        )
        faults = raw.faults(4)
        assert [(f[1], f[2]) for f in faults] == [
            (5, "forbidden"),
            (6, "forbidden"),
            (7, "malformed"),
            (8, "forbidden"),
        ]
        assert "--allow-unix" in str(faults[0][3]) and "--allow-process" in str(faults[3][3])
    finally:
        raw.sock.close()
        context.term()


REDIS_CLI = (
    b"*3\r\n$3\r\nSET\r\n$3\r\nkey\r\n$5\r\nvalue\r\n"  # as redis-cli sends a command
    b"*2\r\n$3\r\nGET\r\n$3\r\nkey\r\n"
    b"PING\r\n"  # an inline command, as typed into telnet
)


async def test_a_resp_port_through_the_daemon_receives_commands_and_answers(
    endpoint: str, no_leaks: None
) -> None:
    async with (
        client.connect(endpoint) as ios,
        await ports.listen_tcp(ios, "127.0.0.1", 0, packet="resp") as listener,
        await anyio.connect_tcp(*listener.local_address) as peer,
    ):
        with anyio.fail_after(10):
            accepted = await listener.receive()
            assert isinstance(accepted, ports.Accepted)
            port = accepted.port
            await peer.send(REDIS_CLI[:7])  # a command split across reads
            await peer.send(REDIS_CLI[7:])
            received = [await port.receive() for _ in range(3)]
            assert received == [
                ports.Data([b"SET", b"key", b"value"]),
                ports.Data([b"GET", b"key"]),
                ports.Data([b"PING"]),
            ]
            await port.send("OK")
            await port.send(b"$5\r\nvalue\r\n")  # bytes go out as they are: encoded
            await port.send("PONG")
            answer = b""
            while len(answer) < len(b"+OK\r\n$5\r\nvalue\r\n+PONG\r\n"):
                answer += await peer.receive()
            assert answer == b"+OK\r\n$5\r\nvalue\r\n+PONG\r\n"
        # Each decoded command was charged its wire size, and credited back when taken.
        statistics = port.statistics()
        assert statistics.bytes_received == len(REDIS_CLI)
        assert ios.statistics().memory_in_use == 0
        await port.aclose()


def test_every_framer_says_whether_it_decodes_objects() -> None:
    """The one definition the port, the daemon and the client read."""
    from ioserver._framing import make_framer

    modes = {"raw": False, 1: False, 2: False, 4: False, "line": False}
    modes |= {"msgpack": True, "resp": True}
    for mode, decodes in modes.items():
        assert make_framer(mode).decodes_objects is decodes, mode
