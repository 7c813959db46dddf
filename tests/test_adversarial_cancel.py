"""Cancellation at the first await of an operation that acts: trio's rule, that an operation
raising ``Cancelled`` did not happen, for the calls that send, half-close, open or start.

Each test runs the call in a scope cancelled before it starts (on both backends), then
looks at what a peer, the kernel or the process table saw: nothing may have been sent,
connected, bound or started.  (tests/test_adversarial_select.py does the same for the
receives and sends of ports, mailboxes and channels.)
"""

from __future__ import annotations

import glob
import os
import random
import socket
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import pytest
from conftest import until

import ioserver
import ports
from ports import Accepted, Data, rpc

pytestmark = pytest.mark.anyio

PYTHON = sys.executable


async def _in_cancelled_scope(operation: Callable[[], Awaitable[Any]]) -> list[Any]:
    """Run ``operation`` in a scope cancelled before it starts; what it returned, if any."""
    with anyio.CancelScope() as scope:
        scope.cancel()
        return [await operation()]
    return []


# -- RPC --------------------------------------------------------------------------------------


class Count(rpc.Message):
    key: str


class Counted(rpc.Message):
    seen: list[str]


COUNTER: rpc.Interface[Count, Counted] = rpc.Interface(Count, Counted)


async def test_an_rpc_call_cancelled_or_timed_out_before_it_sent_sent_nothing(
    ios: ioserver.IOServer,
) -> None:
    """A call cancelled before it sent its request (a scope cancelled already, or
    ``timeout=0``) raised Cancelled (or TimeoutError), so the server must never run the
    request.  Before, the request was queued before the call's first checkpoint: the
    server ran it, though the caller was told it did not happen."""
    seen: list[str] = []

    async def handle(request: Count) -> Counted:
        seen.append(request.key)
        return Counted(list(seen))

    listener = await ports.listen_tcp(ios, "127.0.0.1", 0, packet=4)
    async with anyio.create_task_group() as task_group:
        address = await task_group.start(rpc.serve_listener, listener, COUNTER, handle)
        async with await rpc.connect(ios, *address, COUNTER) as client:
            assert not await _in_cancelled_scope(lambda: client.call(Count("cancelled")))
            with pytest.raises(TimeoutError):
                await client.call(Count("timed out"), timeout=0)
            # The server reads a connection's requests in order and starts their
            # handlers in order: this one's reply comes after every earlier handler ran.
            with anyio.fail_after(10):
                reply = await client.call(Count("after"))
            assert reply == Counted(["after"])
            assert client.statistics().late_replies_dropped == 0
        task_group.cancel_scope.cancel()
    await listener.aclose()
    assert seen == ["after"]


# -- ports ------------------------------------------------------------------------------------


async def test_a_send_eof_that_raised_cancelled_did_not_half_close(
    ios: ioserver.IOServer,
) -> None:
    """``Port.send_eof`` in a cancelled scope raises Cancelled, so the port must still
    send and the peer must read no end of file.  Before, it queued the end of file, then
    checkpointed: it raised Cancelled with the port half-closed (later sends raised
    ClosedPortError, the peer read EOF)."""
    listener = await ports.listen_tcp(ios, "127.0.0.1", 0)
    async with await anyio.connect_tcp(*listener.local_address) as peer:
        accepted = await listener.receive()
        assert isinstance(accepted, Accepted)
        port = accepted.port
        assert not await _in_cancelled_scope(port.send_eof)
        await port.send(b"after")  # not ClosedPortError: no end of file was sent
        await port.send_eof()
        received = b""
        with anyio.fail_after(10):
            async for chunk in peer:
                received += chunk
        assert received == b"after"
        await port.aclose()
    await listener.aclose()


def _no_other_connection(peer: socket.socket) -> None:
    """Only the connect that returned reached ``peer`` (a non-blocking listening socket)."""
    try:
        extra, _ = peer.accept()
    except BlockingIOError:
        return
    extra.close()
    pytest.fail("a connect that raised Cancelled connected")


@pytest.mark.every_core
async def test_a_connect_cancelled_before_it_started_connected_nothing(
    ios: ioserver.IOServer,
) -> None:
    """``connect_tcp`` (and ``connect_unix``) in a cancelled scope raises Cancelled: the
    peer must see no connection.  Before, the connect was handed to the I/O thread before
    the first checkpoint: the peer accepted a connection that then closed.  (The I/O
    thread runs commands in order: when the connect after it has returned, a connection
    the cancelled one made would be in the listening socket's queue already.)"""
    with socket.socket() as peer:
        peer.bind(("127.0.0.1", 0))
        peer.listen(16)
        peer.setblocking(False)
        host, number = peer.getsockname()
        for _ in range(3):
            assert not await _in_cancelled_scope(lambda: ports.connect_tcp(ios, host, number))
            async with await ports.connect_tcp(ios, host, number) as port:
                connection, _ = peer.accept()
                connection.close()
                _no_other_connection(peer)
                await port.send(b"x")


@pytest.mark.every_core
async def test_a_unix_connect_cancelled_before_it_started_connected_nothing(
    ios: ioserver.IOServer, tmp_path: Any
) -> None:
    path = str(tmp_path / "peer.sock")
    with socket.socket(socket.AF_UNIX) as peer:
        peer.bind(path)
        peer.listen(16)
        peer.setblocking(False)
        assert not await _in_cancelled_scope(lambda: ports.connect_unix(ios, path))
        async with await ports.connect_unix(ios, path):
            connection, _ = peer.accept()
            connection.close()
            _no_other_connection(peer)


async def test_a_zmq_open_that_raised_cancelled_bound_nothing(ios: ioserver.IOServer) -> None:
    """``open_zmq`` in a cancelled scope raises Cancelled: the endpoint must stay free.
    Before, it bound (and started the socket on the I/O thread), then checkpointed: the
    call raised Cancelled and the bound socket was owned by nobody until the server
    stopped - a second bind failed with EADDRINUSE."""
    endpoint = "inproc://cancelled-open"
    assert not await _in_cancelled_scope(lambda: ports.open_zmq(ios, "PULL", bind=endpoint))
    assert not ios._io.zmq_sockets  # type: ignore[attr-defined]
    async with (
        await ports.open_zmq(ios, "PULL", bind=endpoint) as pull,
        await ports.open_zmq(ios, "PUSH", connect=endpoint) as push,
    ):
        await push.send(b"through")
        with anyio.fail_after(10):
            assert await pull.receive() == Data([b"through"])


def _children() -> set[int]:
    """This process's children, zombies included (Linux's /proc/PID/task/*/children)."""
    found: set[int] = set()
    for name in glob.glob(f"/proc/{os.getpid()}/task/*/children"):
        try:
            with open(name) as listing:
                found.update(int(pid) for pid in listing.read().split())
        except OSError:
            pass
    return found


@pytest.mark.every_core
@pytest.mark.parametrize("stderr", ["inherit", "port"])
async def test_an_open_process_that_raised_cancelled_started_no_program(
    ios: ioserver.IOServer, stderr: Any
) -> None:
    """``open_process`` in a cancelled scope raises Cancelled: no program may have run.
    Before, it forked the program before its first checkpoint - and with ``stderr="port"``
    on the Python core that checkpoint came after the port was made: the call raised
    Cancelled and the program ran on, its port owned by nobody, until the server
    stopped.  (The fork is synchronous: a program the call started is a child of this
    process when the call returns.)"""
    if not glob.glob(f"/proc/{os.getpid()}/task/*/children"):  # pragma: no cover
        pytest.skip("the child-process check needs /proc/PID/task/*/children (Linux)")
    before = _children()
    assert not await _in_cancelled_scope(
        lambda: ports.open_process(
            ios, [PYTHON, "-c", "import time; time.sleep(60)"], stderr=stderr, kill_grace=0
        )
    )
    assert _children() - before == set(), "a call that raised Cancelled started a program"
    await until(lambda: not ios.statistics().ports_open)


# -- client.connect -------------------------------------------------------------------------


async def test_a_cancelled_client_connect_leaves_no_session_on_the_given_server(
    ios: ioserver.IOServer,
) -> None:
    """``client.connect(..., server=ios)`` cancelled - before it starts, or while it waits
    for the daemon's WELCOME - must leave nothing on ``ios``.  Before, it made the
    session's ZeroMQ socket and said HELLO before its first checkpoint, and a
    cancellation while it waited closed nothing (only its own timeout did): the socket
    and its handler stayed on the caller's I/O server, talking to the daemon, until that
    server stopped.  (A silent ROUTER socket plays the daemon.)"""
    import zmq

    import client

    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    daemon = context.socket(zmq.ROUTER)
    try:
        number = daemon.bind_to_random_port("tcp://127.0.0.1")
        endpoint = f"tcp://127.0.0.1:{number}"
        io: Any = ios._io

        async def session() -> None:
            async with client.connect(endpoint, server=ios, timeout=60):
                pytest.fail("the silent daemon welcomed nobody")

        assert not await _in_cancelled_scope(session)
        assert not io.zmq_sockets, "a connect that raised Cancelled made a session socket"
        async with anyio.create_task_group() as task_group:
            task_group.start_soon(session)
            await until(lambda: daemon.poll(0))  # its HELLO arrived: it waits for WELCOME
            task_group.cancel_scope.cancel()
        await until(lambda: not io.zmq_sockets)
    finally:
        daemon.close(linger=0)
        context.term()


@pytest.mark.every_core
async def test_udp_opens_cancelled_while_datagrams_arrive_leave_no_input_charged(
    ios: ioserver.IOServer,
) -> None:
    """``open_udp`` cancelled while it waits for the I/O thread: the socket it bound is
    closed, and the datagrams the I/O thread read into it meanwhile are dropped and
    counted taken, so the server's ``memory_in_use`` returns to 0.  (A thread sends
    datagrams to the address all along, so that some arrive between the bind and the
    close.)"""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        address = probe.getsockname()
    stop = anyio.Event()
    sent = [0]

    def spray() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
            while not stop.is_set():
                try:
                    sender.sendto(b"d" * 512, address)
                    sent[0] += 1
                except OSError:
                    pass

    async def open_and_close() -> None:
        try:
            port = await ports.open_udp(ios, bind=address)
        except ioserver.ConnectError as exc:
            # The last round's socket, cancelled before the I/O thread answered: closed
            # when the answer comes, which may be after this round's open.
            assert exc.errno_name == "EADDRINUSE"
            return
        await port.aclose()  # (it closes even when cancelled)

    async with anyio.create_task_group() as task_group:
        task_group.start_soon(anyio.to_thread.run_sync, spray)
        try:
            await until(lambda: sent[0] > 100)
            for _ in range(100):
                async with anyio.create_task_group() as opens:
                    opens.start_soon(open_and_close)
                    await anyio.lowlevel.checkpoint()
                    await anyio.lowlevel.checkpoint()
                    opens.cancel_scope.cancel()
        finally:
            stop.set()
    await until(lambda: not ios.statistics().ports_open)
    await until(lambda: ios.statistics().memory_in_use == 0)


async def test_rpc_calls_cancelled_as_their_replies_arrive_count_them_late(
    ios: ioserver.IOServer,
) -> None:
    """A call cancelled while its reply is on its way, in the same tick as the reply or
    just before it, raises Cancelled: its reply reached nobody, so it must count as a
    late reply (``late_replies_dropped``), not as one handed to its caller
    (``replies``).  Each round's call either returns (its reply counted in ``replies``)
    or raises Cancelled (its reply, once it came, counted late): the two counts must add
    up to the calls, and ``replies`` must be the calls that returned."""
    arrived = anyio.Event()

    async def handle(request: Count) -> Counted:
        arrived.set()
        return Counted([request.key])

    listener = await ports.listen_tcp(ios, "127.0.0.1", 0, packet=4)
    rounds = 200
    async with anyio.create_task_group() as task_group:
        address = await task_group.start(rpc.serve_listener, listener, COUNTER, handle)
        async with await rpc.connect(ios, *address, COUNTER) as client:
            got: list[Counted] = []

            async def call(key: str) -> None:
                got.append(await client.call(Count(key)))

            for index in range(rounds):
                arrived = anyio.Event()
                async with anyio.create_task_group() as calls:
                    calls.start_soon(call, str(index))
                    await arrived.wait()  # the server ran it: its reply is on its way
                    calls.cancel_scope.cancel()
            returned = len(got)
            statistics = client.statistics
            await until(lambda: statistics().replies + statistics().late_replies_dropped == rounds)
            assert statistics().replies == returned
            assert statistics().cancelled == rounds - returned
            assert statistics().in_flight == 0
        task_group.cancel_scope.cancel()
    await listener.aclose()


async def test_a_serve_cancelled_at_its_call_limit_leaves_the_next_request_in_the_port(
    ios: ioserver.IOServer,
) -> None:
    """``serve(..., close=False)`` at ``max_concurrent_calls`` and cancelled: the request
    it had not started stays in the port, for whoever serves the port next.  Before, it
    took the request first and then waited for room: cancelled there, the request was
    gone (its caller's call never got an answer)."""
    started: list[str] = []
    never = anyio.Event()

    async def handle(request: Count) -> Counted:
        started.append(request.key)
        if request.key == "first":
            await never.wait()
        return Counted([request.key])

    listener = await ports.listen_tcp(ios, "127.0.0.1", 0, packet=4)
    async with listener, await rpc.connect(ios, *listener.local_address, COUNTER) as client:
        accepted = await listener.receive()
        assert isinstance(accepted, Accepted)
        port = accepted.port
        serving, served = anyio.CancelScope(), anyio.Event()
        answers: list[Counted] = []

        async def first_server() -> None:
            with serving:
                await rpc.serve(port, COUNTER, handle, max_concurrent_calls=1, close=False)
            served.set()

        async def second_call() -> None:
            answers.append(await client.call(Count("second")))

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(first_server)
            tasks.start_soon(client.call, Count("first"))  # (never answered)
            await until(lambda: started == ["first"])  # the server is at its limit
            received = port.statistics().bytes_received
            tasks.start_soon(second_call)
            await until(lambda: port.statistics().bytes_received > received)
            # The I/O thread read the second request; the loop runs everything it can
            # (the server took the request there, before the fix).
            await anyio.wait_all_tasks_blocked()
            serving.cancel()
            await served.wait()
            # The port's next server answers it.
            tasks.start_soon(rpc.serve, port, COUNTER, handle)
            await until(lambda: bool(answers))
            tasks.cancel_scope.cancel()  # (the first call, the second server)
    assert answers == [Counted(["second"])]
    assert started == ["first", "second"]


@pytest.mark.every_core
async def test_a_listen_cancelled_while_adopting_an_inherited_socket_keeps_it(
    ios: ioserver.IOServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``listen_tcp`` on an address systemd passed a socket for (socket activation) takes
    that socket and has the I/O thread adopt it.  Cancelled while it waits for the
    adoption, it raises Cancelled, so the socket must still be there for the next
    ``listen_tcp`` - open and listening.  Before, the cancelled request closed it: the
    process had lost the socket systemd gave it (for a port it may not bind itself).
    (Real listening sockets stand in for systemd's, put where ``_systemd`` keeps them.)"""
    from ioserver import _systemd

    cancelled = 0
    for _ in range(20):
        inherited = socket.socket()
        inherited.bind(("127.0.0.1", 0))
        inherited.listen(16)
        address = inherited.getsockname()
        monkeypatch.setattr(_systemd, "_table", {_systemd._key(socket.AF_INET, address): inherited})
        got: list[ports.Listener] = []

        async def listen() -> None:
            got.append(await ports.listen_tcp(ios, *address))  # noqa: B023 (awaited here)

        async with anyio.create_task_group() as task_group:
            task_group.start_soon(listen)
            await anyio.lowlevel.checkpoint()  # it waits for the I/O thread's answer
            task_group.cancel_scope.cancel()
        if got:  # answered before the cancellation: it is the listener's now
            await got[0].aclose()
            continue
        cancelled += 1
        again = _systemd.take_listener(socket.AF_INET, address)
        assert again is not None, "a listen_tcp that raised Cancelled lost the passed socket"
        with again:
            assert again.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
            assert again.getsockname() == address
    assert cancelled, "no listen_tcp was cancelled while it waited"


async def test_listener_receives_and_selects_cancelled_at_random_lose_no_connection(
    ios: ioserver.IOServer,
) -> None:
    """Connections arrive while ``Listener.receive`` and ``select`` on the listener are
    cancelled at random points (before they start, while parked, in the tick a
    connection arrives): every connection is received exactly once, by a call that
    returned, and none is lost with a call that raised Cancelled."""
    rng = random.Random(14)
    count = 60
    listener = await ports.listen_tcp(ios, "127.0.0.1", 0)
    received: list[ports.Port] = []
    peers: list[socket.socket] = []
    try:
        async with listener:
            for index in range(count):
                peer = socket.create_connection(listener.local_address)
                peers.append(peer)
                for _ in range(3):
                    with anyio.move_on_after(rng.random() * 2e-4):
                        if index % 2:
                            accepted = await listener.receive()
                        else:
                            _source, accepted = await ports.select(listener)
                        assert isinstance(accepted, Accepted)
                        received.append(accepted.port)
            with anyio.fail_after(10):
                while len(received) < count:
                    accepted = await listener.receive()
                    assert isinstance(accepted, Accepted)
                    received.append(accepted.port)
            assert len({id(port) for port in received}) == count
            assert listener.statistics().messages_buffered == 0
            addresses = {port.remote_address for port in received}
            assert addresses == {peer.getsockname() for peer in peers}
    finally:
        for port in received:
            await port.aclose()
        for peer in peers:
            peer.close()


async def test_a_select_with_timeout_0_takes_a_message_already_there() -> None:
    """``select(..., timeout=0)`` is a poll, as ``Mailbox.receive(timeout=0)`` and Erlang's
    ``after 0``: a message already queued is returned, on both backends; only with none
    does it raise TimeoutError (having taken nothing).  Before, on trio its first
    checkpoint came inside the timeout's scope, already expired: it raised TimeoutError
    with the message there (asyncio returned the message)."""
    mailbox = ports.Mailbox()
    mailbox.send_nowait("there")
    assert await ports.select(mailbox, timeout=0) == (mailbox, "there")
    mailbox.send_nowait("again")
    assert await mailbox.receive(timeout=0) == "again"
    with pytest.raises(TimeoutError):
        await ports.select(mailbox, timeout=0)
    assert len(mailbox) == 0


async def test_remote_connects_cancelled_at_random_leave_no_connection_open(
    tmp_path: Any, no_leaks: None
) -> None:
    """Through a daemon (``client.connect``), connects cancelled at random points - before
    they start, while the daemon connects, in the tick its answer arrives - leave no
    connection open in the daemon: once the ports that returned are closed, the peer
    reads the end of every connection it accepted."""
    from test_daemon import HEARTBEAT, Daemon

    import client

    path = tmp_path / "run" / "control"
    endpoint = f"ipc://{path}"
    daemon = Daemon("--endpoint", endpoint, "--heartbeat", str(HEARTBEAT))
    rng = random.Random(14)
    try:
        with socket.socket() as peer:
            peer.bind(("127.0.0.1", 0))
            peer.listen(256)
            host, number = peer.getsockname()
            async with client.connect(endpoint) as ios:
                opened: list[ports.Port] = []
                for _ in range(60):
                    with anyio.move_on_after(rng.random() * 2e-3):
                        opened.append(await ports.connect_tcp(ios, host, number))
                for port in opened:
                    await port.aclose()
                # Every connection the daemon made ends: one that returned was closed
                # just now, one cancelled by its request.  Each was made, so once the
                # connects made after them have returned it is in the peer's queue.
                last = await ports.connect_tcp(ios, host, number)
                await last.aclose()
                peer.setblocking(False)
                accepted = 0
                while True:
                    try:
                        connection, _ = peer.accept()
                    except BlockingIOError:
                        break
                    with connection:
                        connection.settimeout(10)  # a failure bound only: the end is due
                        assert connection.recv(1) == b"", "a cancelled connect stayed open"
                    accepted += 1
                assert accepted >= len(opened) + 1
    finally:
        assert daemon.stop() == 0, daemon.log
