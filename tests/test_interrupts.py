"""Interruptions at the edges of the loop half: a KeyboardInterrupt in a drain or just before
a task parks, a cancellation that meets the I/O thread's answer, and what they must not
leave behind (a hung exit, a port marked busy for good, an open socket nobody owns).

Found by a review of issue 14's trio parking; each test fails on the tree before its fix.
The interrupts are raised where a signal handler would raise them, from a trace function
at a given line of the loop half's code (deterministic, unlike a real SIGINT's timing).
"""

from __future__ import annotations

import inspect
import os
import random
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import anyio
import pytest
import trio
import trustme
from conftest import until

import ioserver
import ports
from ioserver._control import io_status
from ports import Accepted, Data

pytestmark = pytest.mark.anyio

REPO = Path(__file__).resolve().parents[1]


async def _accept(listener: ports.Listener) -> ports.Port:
    message = await listener.receive()
    assert isinstance(message, Accepted), message
    return message.port


class _RecordingMailbox(ports.Mailbox):
    """A mailbox that notes, as each message is put in it, whether trio would raise a
    KeyboardInterrupt there (``currently_ki_protected``)."""

    protected: list[bool]

    def send_nowait(self, item: Any) -> None:
        self.protected.append(trio.lowlevel.currently_ki_protected())
        super().send_nowait(item)

    def _put_charged(self, entry: Any, charge: int) -> None:
        # (How a port puts its Data in: charged until received.)
        self.protected.append(trio.lowlevel.currently_ki_protected())
        super()._put_charged(entry, charge)


@pytest.mark.every_core
@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_a_drain_is_protected_from_keyboard_interrupt_on_trio(
    ios: ioserver.IOServer,
) -> None:
    """The hub's drain runs KeyboardInterrupt-protected, as trio's own I/O manager does:
    trio's SIGINT handler then raises the interrupt in the main task, not inside the task
    that delivers every port's messages.  Before, a Ctrl-C that landed in a drain ended the
    hub's task, and the program hung at the exit of ``ioserver.open`` waiting for a stop
    notice that task would have delivered (1 run in 8 under load)."""
    mailbox = _RecordingMailbox()
    mailbox.protected = []
    listener = await ports.listen_tcp(ios, "127.0.0.1", 0)
    async with listener:
        client = await ports.connect_tcp(ios, *listener.local_address)
        server = await _accept(listener)
        async with client, server:
            server.set_owner(mailbox)
            await client.send(b"ping")
            with anyio.fail_after(10):
                _, message = await mailbox.receive()
            mailbox.close()
    assert message == Data(b"ping")
    assert mailbox.protected and all(mailbox.protected), mailbox.protected


_INTERRUPTED_DRAIN = textwrap.dedent(
    """
    import inspect, sys, threading, os
    import anyio
    import ioserver, ports
    from ioserver import _hub

    if os.environ["IOSERVER_CORE"] == "native":
        from ioserver._native_core import _NativeDrain as drain_class
    else:
        drain_class = _hub.Hub
    code = drain_class._drain.__code__
    lines, first = inspect.getsourcelines(drain_class._drain)
    target = next(first + i for i, line in enumerate(lines) if "target._deliver(message)" in line)
    armed = [False]

    def local(frame, event, arg):
        if event == "line" and frame.f_lineno == target and armed[0]:
            armed[0] = False
            raise KeyboardInterrupt  # as a signal handler would, here
        return local

    def tracer(frame, event, arg):
        return local if frame.f_code is code else None

    async def main():
        async with ioserver.open() as ios:
            listener = await ports.listen_tcp(ios, "127.0.0.1", 0)
            client = await ports.connect_tcp(ios, *listener.local_address)
            accepted = await listener.receive()
            sys.settrace(tracer)
            armed[0] = True
            await client.send(b"x")
            await accepted.port.receive()
            await anyio.sleep(10)  # the interrupt comes first

    try:
        anyio.run(main, backend=sys.argv[1])
    except BaseException as exc:
        found = [exc]
        while found:
            exc = found.pop()
            if isinstance(exc, KeyboardInterrupt):
                print("interrupted", flush=True)
                break
            found.extend(getattr(exc, "exceptions", ()))
    """
)


@pytest.mark.every_core
@pytest.mark.parametrize("anyio_backend", ["trio", "asyncio"])
def test_an_interrupt_in_a_drain_does_not_hang_the_exit(
    anyio_backend: str, core: str, tmp_path: Path
) -> None:
    """A KeyboardInterrupt raised inside a drain (on trio, by something other than trio's
    handler, which the protection above covers) must still let ``ioserver.open`` stop
    the I/O thread and the program end with the interrupt.  Before, on trio the hub's task
    ended and ``Hub.stop`` waited for good for the stop notice it would have delivered
    (the trio cases fail there); on
    asyncio, when events had come in during the drain, the inbox was left neither asleep
    nor rescheduled, so no wake-up came for them.  A real subprocess: a hang is what it
    tests."""
    script = tmp_path / "interrupted_drain.py"
    script.write_text(_INTERRUPTED_DRAIN)
    env = dict(os.environ, IOSERVER_CORE=core, PYTHONPATH=str(REPO))
    try:
        done = subprocess.run(
            [sys.executable, str(script), anyio_backend],
            capture_output=True,
            text=True,
            timeout=30,
            env=env,
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("the program hung after a KeyboardInterrupt in a drain")
    assert "interrupted" in done.stdout, done.stdout + done.stderr


@pytest.mark.every_core
@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_an_interrupt_just_before_a_receive_parks_leaves_the_port_free(
    ios: ioserver.IOServer,
) -> None:
    """A KeyboardInterrupt between the moment ``receive`` names its task as the port's
    receiver and the park (where it reads ``global_paused``, a point where CPython runs
    signal handlers) must not leave the task named: the same task's next ``receive``
    takes the message.  Before, it raised ``BusyPortError`` for good, and a delivery could
    reschedule the task out of whatever it awaited next."""
    code = ports.Port._receive.__code__
    lines, first = inspect.getsourcelines(ports.Port._receive)
    target = next(first + i for i, line in enumerate(lines) if "global_paused" in line)
    armed = [True]

    def local(frame: Any, event: str, arg: Any) -> Any:
        if event == "line" and frame.f_lineno == target and armed[0]:
            armed[0] = False
            raise KeyboardInterrupt
        return local

    def tracer(frame: Any, event: str, arg: Any) -> Any:
        return local if frame.f_code is code else None

    listener = await ports.listen_tcp(ios, "127.0.0.1", 0)
    async with listener:
        client = await ports.connect_tcp(ios, *listener.local_address)
        server = await _accept(listener)
        async with client, server:
            sys.settrace(tracer)
            try:
                with pytest.raises(KeyboardInterrupt):
                    await server.receive()
            finally:
                sys.settrace(None)
            assert not armed[0]
            assert trio.lowlevel.current_task().custom_sleep_data is None
            await client.send(b"after")
            with anyio.fail_after(10):
                assert await server.receive() == Data(b"after")


@pytest.mark.every_core
async def test_cancelled_connects_leave_no_socket_open(ios: ioserver.IOServer) -> None:
    """Connects cancelled at random deadlines, some in the very batch that also brings the
    I/O thread's answer (before the task resumes): once every connect that returned is
    closed, the I/O thread holds no socket.  Before, about a third of the cancelled ones
    left their socket open for good, owned by nobody.  (The peer is a plain listening
    socket, so that the I/O thread's count is the connects' alone.)"""
    rng = random.Random(9)
    with socket.socket() as peer:
        peer.bind(("127.0.0.1", 0))
        peer.listen(1024)
        opened: list[ports.Port] = []
        for _ in range(200):
            with anyio.move_on_after(rng.random() * 3e-4):
                opened.append(await ports.connect_tcp(ios, *peer.getsockname()))
        for port in opened:
            await port.aclose()
        with anyio.fail_after(10):
            while ios.statistics().ports_open:  # noqa: ASYNC110 - no event for it
                await anyio.sleep(0.01)


def test_busy_port_error_says_what_is_busy() -> None:
    """Its message is its own, not anyio's wording wrapped around it (it read "Another
    task is already another task is already receiving on this port this resource")."""
    error = ioserver.BusyPortError("receiving")
    assert str(error) == "another task is already receiving on this port"
    assert isinstance(error, anyio.BusyResourceError)
    assert isinstance(error, trio.BusyResourceError)


@pytest.mark.every_core
async def test_status_answers_while_a_tls_port_is_open(ios: ioserver.IOServer) -> None:
    """``ioserver status`` counts a TLS stream by its socket's family too (a TLS port's
    socket object is the TLS layer's, which had no ``family``: every status, and the
    metrics endpoint, failed while one was open)."""
    ca = trustme.CA()
    server_context = ioserver_tls_server(ca)
    client_context = ioserver_tls_client(ca)
    listener = await ports.listen_tcp(ios, "127.0.0.1", 0, tls=server_context)
    async with listener:
        client = await ports.connect_tcp(
            ios, *listener.local_address, tls=client_context, server_hostname="localhost"
        )
        server = await _accept(listener)
        async with client, server:
            found: list[Any] = []

            def status(target: object, argument: object) -> None:
                try:
                    found.append(io_status(ios._io, time.monotonic(), {}))  # type: ignore[arg-type]
                except Exception as exc:
                    found.append(exc)

            ios._io.submit(status, None, None)  # type: ignore[attr-defined]
            await until(lambda: bool(found), 5)
    assert isinstance(found[0], dict), found[0]


def ioserver_tls_server(ca: trustme.CA) -> Any:
    import ssl

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(context)
    return context


def ioserver_tls_client(ca: trustme.CA) -> Any:
    import ssl

    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context
