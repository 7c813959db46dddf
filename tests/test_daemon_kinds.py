"""What the daemon's protocol carries, through a real ``ioserver serve``: TCP ports, with
every packet mode (``"resp"`` included), and a clear error at once for the other kinds.

Issue 12, item 16: ``open_udp``/``listen_unix`` hung, ``open_zmq`` raised
``AttributeError``, ``open_process`` started the program in the *client*; and the
unconfirmed item: a ``packet="resp"`` port through the daemon was refused by the client
("DATA must carry bytes") because three places decided by mode name which messages are
charged their wire size.
"""

from __future__ import annotations

import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
import zmq
from test_daemon import HEARTBEAT, Daemon, RawClient

import client
import ioserver
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


async def test_port_kinds_the_protocol_does_not_carry_are_refused_at_once(
    endpoint: str, tmp_path: Path, no_leaks: None
) -> None:
    marker = tmp_path / "started"
    calls = {
        "ports.open_udp": lambda ios: ports.open_udp(ios),
        "ports.connect_unix": lambda ios: ports.connect_unix(ios, str(tmp_path / "u")),
        "ports.listen_unix": lambda ios: ports.listen_unix(ios, str(tmp_path / "u")),
        "ports.open_zmq": lambda ios: ports.open_zmq(ios, "PAIR", bind="inproc://x"),
        "ports.open_tun": lambda ios: ports.open_tun(ios, "iotun0"),
        "ports.open_process": lambda ios: ports.open_process(
            ios, [sys.executable, "-c", f"open({str(marker)!r}, 'w').close()"]
        ),
    }
    async with client.connect(endpoint) as ios:
        for name, call in calls.items():
            with anyio.fail_after(5):  # at once: never a hang
                with pytest.raises(ioserver.NotSupportedError) as caught:
                    await call(ios)
            text = str(caught.value)
            assert name in text and "ports.connect_tcp" in text, text
            assert isinstance(caught.value, ports.OptionError)
        # The TCP kinds still work on the same session, and nothing was left half open.
        async with await ports.listen_tcp(ios, "127.0.0.1", 0) as listener:
            assert listener.local_address[1] > 0
        status = await ios.status()
        assert status["client_ports"] == 0
    assert not marker.exists(), "open_process started the program in the client"


def test_the_daemon_refuses_other_address_families_with_a_typed_fault(endpoint: str) -> None:
    """A misbehaving client's AF_UNIX CONNECT or LISTEN: FAULT "unsupported", echoing its
    rid, and the daemon keeps serving (the module's fixture checks the log)."""
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    raw = RawClient(context, endpoint)
    try:
        unix = int(socket.AF_UNIX)
        raw.send(
            [
                [P.HELLO, P.VERSION],
                [P.CONNECT, 5, 1, unix, ["/tmp/x", 0], {}, -1, False],
                [P.LISTEN, 6, 2, unix, ["/tmp/x", 0], {}, -1, False],
                [P.CONNECT, 7, 3, 99, ["x", 0], {}, -1, False],
                [P.STATUS, 8],
            ]
        )
        faults = raw.faults(3)
        assert [(f[1], f[2]) for f in faults] == [
            (5, "unsupported"),
            (6, "unsupported"),
            (7, "malformed"),
        ]
        assert "TCP" in str(faults[0][3]) and "AF_UNIX" in str(faults[0][3])
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
