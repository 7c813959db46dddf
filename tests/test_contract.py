"""The contract between a port's two halves (ioserver._contract, ioserver._flow).

The I/O thread may touch a port's loop half through its window only: a loop half made of
nothing but a :class:`~ioserver._flow.Window` is enough for it to connect, deliver,
frame, pause on the watermarks, resume on the handshake, and tell a waiting sender that
the output drained.  These tests drive a real I/O thread, with a real TCP peer, from
such a bare loop half (no event loop at all: the test thread plays the loop).
"""

from __future__ import annotations

import socket
import threading
from collections import deque
from typing import Any

import pytest

import ports
from client._remote import RemoteConn
from ioserver._conn import Conn
from ioserver._contract import ConnectRequest, LoopHalf, PortIO
from ioserver._flow import ReceiveFlow, Window
from ioserver._framing import port_framer
from ioserver._iothread import IOThread
from ioserver._messages import WRITABLE, Data
from ioserver._options import port_options
from ioserver._poller import READ
from ioserver._session import RemotePortState

# No I/O core of $IOSERVER_CORE's choice (the request contract alone): CI's second pass, on the
# Python core, leaves these tests out (tests/conftest.py checks the mark).
pytestmark = pytest.mark.core_independent

TIMEOUT = 10.0


class BareLoopHalf:
    """A loop half with nothing but the window (LoopHalf), and an inbox."""

    __slots__ = ("_window",)

    def __init__(self, window: Window) -> None:
        self._window = window


class Inbox:
    """The loop's inbox, as the I/O thread sees it: ``deliver(pair)``; waits by event."""

    def __init__(self) -> None:
        self.items: deque[tuple[Any, Any]] = deque()
        self.changed = threading.Condition()

    def deliver(self, pair: tuple[Any, Any]) -> None:
        with self.changed:
            self.items.append(pair)
            self.changed.notify_all()

    def wait_for(self, predicate: Any) -> None:
        with self.changed:
            assert self.changed.wait_for(lambda: predicate(self.items), TIMEOUT)


def _on_io_thread(io: IOThread, function: Any) -> Any:
    """Run ``function()`` on the I/O thread, between two of its rounds; return its result."""
    done = threading.Event()
    result: list[Any] = []

    def command(_target: Any, _argument: Any) -> None:
        result.append(function())
        done.set()

    io.submit(command, None, None)
    assert done.wait(TIMEOUT)
    return result[0]


@pytest.fixture
def io_thread() -> Any:
    io = IOThread()
    io.start()
    yield io
    io.submit(io.cmd_stop, None, None)
    io.join(TIMEOUT)
    assert not io.is_alive()


def _connect(io: IOThread, options: dict[str, Any]) -> tuple[Conn, BareLoopHalf, Inbox, Any]:
    credit, settings = port_options(options, "a test port")
    window = Window(port_framer(settings))
    half = BareLoopHalf(window)
    inbox = Inbox()
    server = socket.create_server(("127.0.0.1", 0))
    request = object()
    io.submit(
        io.cmd_connect,
        request,
        ConnectRequest(half, inbox.deliver, socket.AF_INET, server.getsockname(), settings, credit),
    )
    inbox.wait_for(lambda items: any(target is request for target, _ in items))
    (_, answer), *_ = [item for item in inbox.items if item[0] is request]
    inbox.items.clear()
    assert isinstance(answer, tuple), answer
    peer, _ = server.accept()
    server.close()
    return answer[0], half, inbox, peer


def test_a_loop_half_with_only_a_window_receives_pauses_and_resumes(io_thread: IOThread) -> None:
    # packet=4: the I/O thread frames; watermarks of 3 messages (resume at 1).
    conn, half, inbox, peer = _connect(io_thread, {"packet": 4, "high_msgq_messages": 3})
    window = half._window
    packets = b"".join(len(b"x").to_bytes(4, "big") + b"x" for _ in range(4))
    with peer:
        peer.sendall(packets)
        # Four delivered (above the high watermark of 3): reading paused for this port.
        inbox.wait_for(lambda items: len(items) >= 4)
        assert _on_io_thread(io_thread, lambda: conn.msgq_paused and not conn.mask & READ)
        assert all(target is half and message.__class__ is Data for target, message in inbox.items)
        peer.sendall(packets)  # not read while paused
        # The owner takes every message delivered: the loop half's side of the handshake.
        generation = None
        for _ in range(4):
            window.consumed_messages += 1
            window.consumed_bytes += window.charge(b"x")
            if conn.pause_generation != window.resume_generation:
                generation = window.resume_due(conn) or generation
        assert generation == conn.pause_generation == 1
        # A resume of an older pause is ignored; this one's resumes reading.
        io_thread.submit(io_thread.cmd_resume, conn, 0)
        assert _on_io_thread(io_thread, lambda: conn.msgq_paused)
        io_thread.submit(io_thread.cmd_resume, conn, generation)
        inbox.wait_for(lambda items: len(items) >= 8)
        assert [message.data for _, message in inbox.items] == [b"x"] * 8


def test_a_waiting_sender_hears_that_the_output_drained_through_the_window(
    io_thread: IOThread,
) -> None:
    conn, half, inbox, peer = _connect(io_thread, {"low_watermark": 0, "high_watermark": 0})
    window = half._window
    with peer:
        # The loop half queued 5 bytes and waits ("send_blocked"): the I/O thread says
        # WRITABLE once they are written.
        window.queued_bytes += 5
        window.send_blocked = True
        io_thread.submit(io_thread.send_command, conn, b"hello")
        inbox.wait_for(lambda items: (half, WRITABLE) in items)
        assert peer.recv(5) == b"hello"


def test_every_half_declares_the_contract() -> None:
    # Each loop half has a window (LoopHalf), each I/O half the counters (PortIO): the
    # types mypy checks, seen at run time on real objects.
    options = port_options({}, "a test port")[1]
    state = RemotePortState.__new__(RemotePortState)
    RemotePortState.__init__(state, None, 1, options)  # type: ignore[arg-type]
    halves: list[object] = [state, BareLoopHalf(Window())]
    assert all(isinstance(half, LoopHalf) for half in halves)
    assert isinstance(state._window, Window) and state._window.on_gone is not None
    remote = RemoteConn(1, state, lambda pair: None, options)
    assert isinstance(remote, ReceiveFlow) and isinstance(remote, PortIO)
    assert remote.window is state._window
    assert issubclass(Conn, ReceiveFlow)
    assert "_window" in ports.Port.__slots__ or hasattr(ports.Port, "_window")


def test_validated_options_carry_exactly_their_typeddicts_keys() -> None:
    # What the I/O half reads of a port's options is a TypedDict per kind (ioserver._options),
    # and the open requests carry them.
    import typing

    from ioserver import _options as O
    from ioserver._contract import (
        ListenRequest,
        ProcessRequest,
        TunRequest,
        UDPRequest,
        ZmqRequest,
    )

    assert set(O.port_options({}, "a TCP port")[1]) == O.StreamOptions.__required_keys__
    assert set(O.unix_options({}, "a Unix port")[1]) == O.StreamOptions.__required_keys__
    assert set(O.udp_options({})[1]) == O.UDPSettings.__required_keys__
    assert set(O.tun_options({})[1]) == O.TunSettings.__required_keys__
    _, flow, settings = O.zmq_options({})
    assert set(flow) == O.FlowSettings.__required_keys__
    assert set(settings) == O.ZmqSettings.__required_keys__
    for user, validated in (
        (O.PortOptions, O.StreamOptions),
        (O.UDPOptions, O.UDPSettings),
        (O.TunOptions, O.TunSettings),
        (O.ZmqOptions, O.ZmqSettings),
    ):
        assert O.FlowOptions.__optional_keys__ <= user.__optional_keys__, user
        assert O.Watermarks.__required_keys__ <= validated.__required_keys__, validated
    hints = {
        request: typing.get_type_hints(request)["options"]
        for request in (
            ConnectRequest,
            ListenRequest,
            UDPRequest,
            TunRequest,
            ProcessRequest,
            ZmqRequest,
        )
    }
    assert hints == {
        ConnectRequest: O.StreamOptions,
        ListenRequest: O.ListenOptions,
        UDPRequest: O.UDPSettings,
        TunRequest: O.TunSettings,
        ProcessRequest: O.StreamOptions,
        ZmqRequest: O.ZmqSettings,
    }


def test_what_crosses_to_a_daemon_is_msgpack_data() -> None:
    # A socket address and a port's options go to the daemon as protocol values (Wire):
    # tuples as arrays, scalars as they are; anything else is a bug here, refused before
    # it is packed (not sent for the daemon to refuse).
    from client._remote import _wire_options
    from ioserver import _options as O
    from ioserver import _protocol as P

    assert P.wire_address(("::1", 80, 0, 2)) == ["::1", 80, 0, 2]
    assert P.wire_address(("127.0.0.1", 9)) == ["127.0.0.1", 9]
    assert P.wire_address("/run/x.sock") == "/run/x.sock"
    assert P.wire_address(b"\0abstract") == b"\0abstract"
    assert P.wire_address(None) is None
    with pytest.raises(TypeError):
        P.wire_address(object())
    settings = O.unix_options({"active": 3, "packet": 4}, "a Unix port")[1]
    wire = _wire_options(settings)
    assert "nodelay" not in wire and "keepalive" not in wire and "active" not in wire
    assert wire["packet"] == 4 and wire["recbuf"] is None
    listen: O.ListenOptions = {**settings, "active": (3, False)}
    assert "active" not in _wire_options(listen)
    bad = {**settings, "recbuf": (1, 2)}  # not a validated value
    with pytest.raises(TypeError):
        _wire_options(bad)
