"""Adversarial tests of the I/O thread's round: what one client or one syscall may do to it.

Each test attacks one promise of the round (see ioserver._iothread): a write's result is
applied to the buffer it wrote, whatever a handler does afterwards in the same round; one
handler cannot keep the thread in its flush; a written buffer is released when the write
completes.  They run against real daemons (``ioserver serve`` subprocesses), real ZeroMQ
sockets and real TCP peers.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
import zmq
from test_daemon import Daemon

import ioserver
import ports
from ioserver import _protocol as P
from ioserver._conn import Conn, Handler
from ioserver._control import MESSAGE_BUDGET, RECEIVE_BATCH, ControlEndpoint
from ioserver._iothread import IOThread


def _on_io_thread(io: IOThread, function: Callable[[], None]) -> None:
    """Run ``function`` as a command of the I/O thread (it runs in one round, whole)."""
    io.submit(lambda _target, _argument: function(), None, None)


async def _tcp_pair(
    ios: ioserver.IOServer, server: socket.socket
) -> tuple[ports.Port, socket.socket]:
    """A port connected to ``server`` (a listening socket), and the peer's socket."""
    port = await ports.connect_tcp(ios, *server.getsockname())
    peer, _ = await anyio.to_thread.run_sync(server.accept)
    return port, peer


def _hello(
    context: zmq.Context[zmq.Socket[bytes]], endpoint: str
) -> tuple[zmq.Socket[bytes], bytes]:
    """A bare DEALER with a session (HELLO answered by WELCOME), and the session's token,
    which every later frame carries."""
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    # Frames queue here while the daemon is stopped (its RCVHWM is small): never block.
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.connect(endpoint)
    sock.send(P.pack([[P.HELLO, P.VERSION]]))
    assert sock.poll(10_000), "no WELCOME"
    welcome = P.unpack(sock.recv())[0]
    assert welcome[0] == P.WELCOME
    return sock, welcome[1]["token"]


async def _echo_one(listener: ports.Listener) -> None:
    """Echo every byte of the listener's first connection until it ends."""
    accepted = await listener.receive()
    assert isinstance(accepted, ports.Accepted)
    async with accepted.port as port:
        async for message in port:
            if isinstance(message, ports.Data):
                await port.send(message.data)


def _wait_for(sock: zmq.Socket[bytes], opcode: int) -> list[object]:
    while True:
        assert sock.poll(10_000), f"no message {opcode} from the daemon"
        for message in P.unpack(sock.recv()):
            if message[0] == opcode:
                return list(message)


def _read_until_eof(peer: socket.socket) -> bytes:
    peer.settimeout(10)
    received = bytearray()
    while chunk := peer.recv(65536):
        received.extend(chunk)
    return bytes(received)


def test_a_write_is_applied_once_whatever_the_control_endpoint_does_next(
    tmp_path: Path,
) -> None:
    """Issue 12, item 1, against a real daemon.  Frames queued while the daemon is stopped
    are handled in a few rounds when it resumes: SEND "ONCE" is written in a round, and -
    in the control endpoint's flush of that same round, when the frames fall so -
    SEND "TWICE" and CLOSE reach the same port.  The peer must read each byte exactly
    once, then end-of-file.  Where the frames fall depends on how fast ZeroMQ hands them
    over, so ten trials place the second frame at different distances (the old tree sent
    "ONCE" twice in two of them in most runs; the in-process test below forces the exact
    order)."""
    endpoint = f"ipc://{tmp_path}/control"
    daemon = Daemon("--endpoint", endpoint, "--heartbeat", "5")
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    context.setsockopt(zmq.LINGER, 0)
    try:
        with socket.create_server(("127.0.0.1", 0)) as server:
            server.settimeout(10)
            sock, token = _hello(context, endpoint)
            family, address = int(socket.AF_INET), list(server.getsockname())
            distances = [RECEIVE_BATCH * n // 4 for n in range(4, 24, 2)]
            for pid, heartbeats in enumerate(distances, 1):
                sock.send(P.pack([[P.CONNECT, pid, pid, family, address, {}, 0, False]], token))
                assert _wait_for(sock, P.OK)[1] == pid
                peer, _ = server.accept()
                with peer:
                    os.kill(daemon.process.pid, signal.SIGSTOP)
                    try:
                        sock.send(
                            P.pack([[99], [P.SEND, pid, b"ONCE "]], token)
                        )  # a FAULT, a write
                        for _ in range(heartbeats):
                            sock.send(P.pack([[P.HEARTBEAT]], token))
                        sock.send(P.pack([[P.SEND, pid, b"TWICE"], [P.CLOSE, pid]], token))
                    finally:
                        os.kill(daemon.process.pid, signal.SIGCONT)
                    assert _read_until_eof(peer) == b"ONCE TWICE", f"trial {pid}"
            sock.send(P.pack([[P.STATUS, 99]], token))
            status = _wait_for(sock, P.STATUS_REPLY)[2]
            assert isinstance(status, dict) and status["internal_errors"] == 0
    finally:
        context.destroy()
        assert daemon.stop() == 0, daemon.log


class _CloseInFlush(Handler):
    """A handler whose flush - in the round in which "ONCE " was written to ``conn`` -
    queues more output on that port and closes it, as the control endpoint does when a
    frame it reads in its flush holds SEND and CLOSE."""

    def __init__(self, io: IOThread, conn: Conn) -> None:
        self.io = io
        self.conn = conn
        self.flushes = 0

    def flush(self) -> None:
        self.flushes += 1
        self.io.cmd_send(self.conn, b"TWICE")
        self.io.cmd_close(self.conn, None)


@pytest.mark.python_core
@pytest.mark.anyio
async def test_a_handler_closing_a_port_after_its_write_sends_each_byte_once(
    ios: ioserver.IOServer,
) -> None:
    """Issue 12, item 1, in-process and in the exact order: one command queues "ONCE " on
    a port and marks a handler dirty, so the round writes "ONCE ", then the handler's flush
    queues "TWICE" and closes the port."""
    io = ios._io
    with socket.create_server(("127.0.0.1", 0)) as server:
        port, peer = await _tcp_pair(ios, server)
        with peer:
            conn = port._conn
            assert conn is not None
            handler = _CloseInFlush(io, conn)

            def the_round() -> None:
                io.cmd_send(conn, b"ONCE ")  # first in the round's dirty list
                io.mark_dirty(handler)

            _on_io_thread(io, the_round)
            received = await anyio.to_thread.run_sync(_read_until_eof, peer)
        assert received == b"ONCE TWICE"
        assert handler.flushes == 1
        assert ios.statistics().internal_errors == 0
        await port.aclose()


@pytest.mark.anyio
async def test_a_flood_of_refused_frames_does_not_stop_an_echo_port(
    ios: ioserver.IOServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 12, item 2.  A daemon's control endpoint in this I/O server, and a client that
    floods it with frames it refuses (each refusal is a FAULT reply, which marks the
    endpoint dirty from inside its own flush).  An echo port served by the same I/O thread
    answers while the flood is being handled, and the flood takes many rounds.

    The flood goes on (from a thread of its own) until the echo has answered: a flood of a
    fixed size was sometimes handled whole before the loop, starved of the GIL by the busy
    I/O thread, even sent its ping, and then the test proved nothing (and failed)."""
    caplog.set_level("ERROR", logger="ioserver")  # one warning per refusal otherwise
    io = ios._io
    most = 1_000_000  # frames at most (the echo answers long before: about 2,000 in CI)
    router = io.zmq_context().socket(zmq.ROUTER)
    router.setsockopt(zmq.RCVHWM, 0)
    router.setsockopt(zmq.SNDHWM, 0)  # every FAULT reply kept for the count below
    endpoint = f"ipc://{tmp_path}/control"
    router.bind(endpoint)
    io.zmq_sockets.add(router)
    control = ControlEndpoint(io, router, heartbeat=5.0, info={}, status=dict)
    io.submit(lambda target, _: target.start(), control, None)
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    context.setsockopt(zmq.LINGER, 0)
    try:
        flood, token = await anyio.to_thread.run_sync(_hello, context, endpoint)
        flood.setsockopt(zmq.SNDHWM, 0)
        flood.setsockopt(zmq.RCVHWM, 0)
        frame = P.pack([[99]], token)  # an unknown opcode: refused, FAULT
        echoed = threading.Event()
        sent = 0

        def flooding() -> None:  # the flood socket's only user until it is joined
            nonlocal sent
            while not echoed.is_set() and sent < most:
                flood.send(frame)
                sent += 1

        flooder = threading.Thread(target=flooding, name="flood")
        async with (
            await ports.listen_tcp(ios, "127.0.0.1", 0) as listener,
            anyio.create_task_group() as task_group,
            await anyio.connect_tcp(*listener.local_address) as peer,
        ):
            task_group.start_soon(_echo_one, listener)
            flooder.start()
            try:
                # The flood is being handled (the endpoint refused its first frame) and is
                # ahead of it by two rounds' reads at least: the ping waits behind those.
                with anyio.fail_after(10):
                    while (  # noqa: ASYNC110 (counters: no event tells of them)
                        not control.faults or sent < control.faults + 2 * RECEIVE_BATCH
                    ):
                        await anyio.sleep(0.001)
                rounds_before = io.polls
                refused_before = control.faults
                with anyio.fail_after(10):
                    await peer.send(b"ping")
                    assert await peer.receive() == b"ping"
            finally:
                echoed.set()
                await anyio.to_thread.run_sync(flooder.join)
            task_group.cancel_scope.cancel()
        total = sent
        faults = 0
        while faults < total:
            faults += sum(m[0] == P.FAULT for m in await _receive_frame(flood))
        rounds = io.polls - rounds_before
    finally:
        context.destroy()
    assert total < most, "the echo waited for the whole flood"
    # At most a few receive batches per round: the endpoint's read (RECEIVE_BATCH
    # frames), its run by call_soon, its flush.
    assert rounds >= (total - refused_before) // (3 * RECEIVE_BATCH), (rounds, refused_before)
    assert faults == total


@pytest.mark.anyio
async def test_frames_of_many_valid_messages_are_run_a_budget_per_round(
    ios: ioserver.IOServer, tmp_path: Path
) -> None:
    """Issue 12, item 2, as a review found it still open: the round's budget counted
    frames, but one frame holds up to 65,536 messages, so a client sending frames of
    valid, cheap messages (HEARTBEAT) kept the I/O thread for 50-150 ms a frame, and
    other clients declared the daemon lost.  Now the endpoint runs MESSAGE_BUDGET messages
    a round and keeps the rest of a frame for the next round: an echo port on the same
    I/O thread answers while the flood runs, and the flood takes a round per budget."""
    io = ios._io
    per_frame = P.MAX_MESSAGES
    frames = 6
    total = per_frame * frames + 1
    router = io.zmq_context().socket(zmq.ROUTER)
    router.setsockopt(zmq.RCVHWM, 0)
    endpoint = f"ipc://{tmp_path}/control"
    router.bind(endpoint)
    io.zmq_sockets.add(router)
    control = ControlEndpoint(io, router, heartbeat=30.0, info={}, status=dict)
    io.submit(lambda target, _: target.start(), control, None)
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    context.setsockopt(zmq.LINGER, 0)

    def handled() -> int:
        return sum(session.messages_in for session in list(control.sessions.values()))

    try:
        flood, token = await anyio.to_thread.run_sync(_hello, context, endpoint)
        async with (
            await ports.listen_tcp(ios, "127.0.0.1", 0) as listener,
            anyio.create_task_group() as task_group,
            await anyio.connect_tcp(*listener.local_address) as peer,
        ):
            task_group.start_soon(_echo_one, listener)
            # A STATUS first and last: its replies say when the flood started and
            # when all of it ran (a client's messages run in order).
            first = P.pack([[P.STATUS, 1]] + [[P.HEARTBEAT]] * (per_frame - 1), token)
            frame = P.pack([[P.HEARTBEAT]] * per_frame, token)
            last = P.pack([[P.STATUS, 2]], token)
            rounds_before = io.polls
            flood.send(first)
            for _ in range(frames - 1):
                flood.send(frame)
            flood.send(last)
            assert (await _wait_reply(flood))[1] == 1  # the flood has started
            with anyio.fail_after(10):
                await peer.send(b"ping")
                assert await peer.receive() == b"ping"
            handled_at_echo = handled()
            assert (await _wait_reply(flood))[1] == 2  # all of it ran
            rounds = io.polls - rounds_before
            task_group.cancel_scope.cancel()
    finally:
        context.destroy()
    # The bound itself: no round ran more than MESSAGE_BUDGET of them.  (Whether the echo
    # also finished before the flood depends on when the GIL lets this loop run, under a
    # loaded CI: the round count is the deterministic form of "other sockets are served".)
    assert MESSAGE_BUDGET <= 4096  # a few milliseconds of work at most
    assert rounds >= total // MESSAGE_BUDGET, (rounds, total // MESSAGE_BUDGET, handled_at_echo)
    assert ios.statistics().internal_errors == 0


async def _wait_reply(sock: zmq.Socket[bytes]) -> list[Any]:
    """The next STATUS reply from the daemon (other messages skipped)."""
    return await anyio.to_thread.run_sync(_wait_for, sock, P.STATUS_REPLY)


async def _receive_frame(sock: zmq.Socket[bytes]) -> list[Any]:
    def receive() -> list[Any]:
        assert sock.poll(10_000), "the daemon stopped answering"
        return P.unpack(sock.recv())

    return await anyio.to_thread.run_sync(receive)


async def _until_io_ran(io: IOThread) -> None:
    """Return once the I/O thread has finished what it was doing (a command's round trip)."""
    done = threading.Event()
    _on_io_thread(io, done.set)
    assert await anyio.to_thread.run_sync(done.wait, 10)


@pytest.mark.python_core
@pytest.mark.anyio
async def test_writes_hold_no_buffer_once_written(ios: ioserver.IOServer) -> None:
    """Issue 12, item 8.  Eight ports send 1 MiB each in one round; once the peers have it
    all and the ports are closed, nothing in the I/O server holds those buffers: each
    payload's reference count is back to what it was before the send."""
    io = ios._io
    size = 1 << 20
    payloads = [os.urandom(size) for _ in range(8)]
    references = [sys.getrefcount(payload) for payload in payloads]
    with socket.create_server(("127.0.0.1", 0)) as server:
        pairs = [await _tcp_pair(ios, server) for _ in payloads]
        gate = threading.Event()
        _on_io_thread(io, gate.wait)  # hold the I/O thread: the sends below are one round
        try:
            for index, (port, _) in enumerate(pairs):
                await port.send(payloads[index])
        finally:
            gate.set()

        def read(peer: socket.socket) -> int:
            peer.settimeout(10)
            got = 0
            while got < size:
                chunk = peer.recv(1 << 20)
                assert chunk
                got += len(chunk)
            return got

        for port, peer in pairs:
            with peer:
                assert await anyio.to_thread.run_sync(read, peer) == size
            await port.aclose()
    await _until_io_ran(io)
    assert [sys.getrefcount(payload) for payload in payloads] == references
