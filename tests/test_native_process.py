"""A program's stdio on the native core's own thread (issue 14), with real programs.

The native I/O thread carries a process port's stream (our end of the socket pair that is
the program's stdin and stdout) as any Unix stream; the program's watcher (its exit, its
signals) stays in the hosted half, and the port puts ``ExitStatus`` before the stream's
``Closed`` (``ports.ProcessPort._order_end``), as the watcher does on the Python core.
The first test proves the stream is the native thread's; the ``every_core`` ones hold it
to the Python core's order of the last messages when the stream ends first, when the
program ends first, and when the program breaks the packet mode.
"""

from __future__ import annotations

import os
import socket
import sys
from typing import Any

import anyio
import pytest
from conftest import until
from test_subprocess import no_zombies

import ioserver
import ports
from ioserver import _native
from ioserver._native_core import NativeWindow
from ports import Closed, Data, Error, ExitStatus

pytestmark = pytest.mark.anyio

__all__ = ["no_zombies"]  # (the fixture, used by name)

PYTHON = sys.executable


async def messages_until_closed(port: ports.Port) -> list[Any]:
    with anyio.fail_after(10):
        return [message async for message in port]


async def test_a_programs_stdio_is_carried_by_the_native_thread(
    no_zombies: None, no_leaks: None
) -> None:
    """The port's stream is a native ``Conn`` with a native window, counted by the native
    core; its bytes are the native thread's; the exit status still comes, before the
    end."""
    async with ioserver.open(core="native") as ios:
        core = ios._io._core  # type: ignore[attr-defined]
        port = await ports.open_process(ios, ["cat"], packet=4)
        assert type(port._conn) is _native.Conn
        assert isinstance(port._window, NativeWindow)
        assert core.ports_open == 1
        native_in = core.bytes_in
        payload = os.urandom(100_000)
        await port.send(payload)
        with anyio.fail_after(10):
            assert await port.receive() == Data(payload)
        assert core.bytes_in - native_in == 4 + len(payload)
        await port.send_eof()
        assert await messages_until_closed(port) == [ExitStatus(0), Closed("eof")]
        assert port.exit_status == 0


@pytest.mark.every_core
async def test_the_exit_status_comes_before_the_end_whichever_happens_first(
    no_zombies: None, no_leaks: None, core: str
) -> None:
    """The program closes its stdout long before it exits: its ``Closed`` waits for the
    exit.  A program that exits while a child of its keeps the stdout open: the exit
    status waits for the end of the output.  Either way ``ExitStatus`` then ``Closed``."""
    async with ioserver.open(core=core) as ios:
        closes_first = await ports.open_process(
            ios,
            [PYTHON, "-c", "import os, time; os.close(1); time.sleep(0.3)"],
        )
        assert await messages_until_closed(closes_first) == [ExitStatus(0), Closed("eof")]
        # The child writes after its parent exited, then closes the stdout they share.
        exits_first = await ports.open_process(
            ios,
            [
                PYTHON,
                "-c",
                "import subprocess, sys; subprocess.Popen([sys.executable, '-c', "
                "'import time; time.sleep(0.3); print(\"late\", flush=True)'])",
            ],
            packet="line",
        )
        assert await messages_until_closed(exits_first) == [
            Data(b"late\n"),
            ExitStatus(0),
            Closed("eof"),
        ]


@pytest.mark.every_core
async def test_a_program_that_breaks_the_packet_mode_is_terminated(
    no_zombies: None, no_leaks: None, core: str
) -> None:
    """A program whose output announces a packet larger than ``packet_size`` (a hostile
    or broken peer): the owner gets the ``Error`` and the program is terminated (its
    stream failed), then ``ExitStatus`` (SIGTERM's) before the final ``Closed``."""
    script = (
        "import sys, time\n"
        "sys.stdout.buffer.write((1 << 30).to_bytes(4, 'big') + b'part'); sys.stdout.flush()\n"
        "time.sleep(60)\n"
    )
    async with ioserver.open(core=core) as ios:
        port = await ports.open_process(
            ios, [PYTHON, "-c", script], packet=4, packet_size=1024, kill_grace=5
        )
        messages = await messages_until_closed(port)
        assert [type(message) for message in messages] == [Error, ExitStatus, Closed]
        assert messages[0].errno_name == "EMSGSIZE"
        assert messages[1] == ExitStatus(-15)
        assert messages[2].errno_name == "EMSGSIZE"


@pytest.mark.every_core
async def test_a_program_flooding_stdout_stays_within_memory_limit(
    no_zombies: None, no_leaks: None, core: str
) -> None:
    """Four programs write 2 MiB each through a 512 KiB budget while nobody reads: the
    input charged never passes the limit; once their owners read, every byte arrives,
    then each exit status and end."""
    limit, each = 512 << 10, 2 << 20
    flood = f"import sys\nsys.stdout.buffer.write(b'z' * {each})\n"
    unbound = {"high_msgq_watermark": 64 << 20, "low_msgq_watermark": 32 << 20}
    async with ioserver.open(memory_limit=limit, core=core) as ios:
        programs = [
            await ports.open_process(ios, [PYTHON, "-c", flood], **unbound)  # type: ignore[arg-type]
            for _ in range(4)
        ]
        await until(lambda: ios.statistics().global_pauses > 0, 10)
        assert ios.statistics().memory_in_use <= limit

        async def drain(port: ports.Port) -> None:
            received = 0
            messages = await messages_until_closed(port)
            for message in messages[:-2]:
                assert isinstance(message, Data)
                received += len(message.data)
            assert received == each
            assert messages[-2:] == [ExitStatus(0), Closed("eof")]

        async with anyio.create_task_group() as readers:
            for port in programs:
                readers.start_soon(drain, port)
        statistics = ios.statistics()
        assert statistics.peak_memory <= limit, statistics


async def test_adopt_stream_takes_only_a_connected_unix_stream_socket(no_leaks: None) -> None:
    """``Core.adopt_stream`` detaches a ``socket.socket`` only once it checked it is a
    connected Unix stream socket: an int, a TCP socket, a listening or an unconnected one
    is refused, and the caller keeps what it passed, still open."""
    async with ioserver.open(core="native") as ios:
        core = ios._io._core  # type: ignore[attr-defined]
        inbox = ios._hub.inbox  # type: ignore[attr-defined]
        window = NativeWindow()
        read_end, write_end = os.pipe()
        try:
            with pytest.raises(TypeError):
                core.adopt_stream(None, None, window, inbox, read_end, "x", {}, (-1, False))
            with socket.socket() as tcp, socket.socket(socket.AF_UNIX) as unconnected:
                with pytest.raises(ValueError, match="family"):
                    core.adopt_stream(None, None, window, inbox, tcp, "x", {}, (-1, False))
                with pytest.raises(OSError):
                    core.adopt_stream(None, None, window, inbox, unconnected, "x", {}, (-1, False))
                unconnected.bind("")  # (autobind: an abstract name)
                unconnected.listen()
                with pytest.raises(ValueError, match="listening"):
                    core.adopt_stream(None, None, window, inbox, unconnected, "x", {}, (-1, False))
                assert tcp.fileno() >= 0
                assert unconnected.fileno() >= 0
        finally:
            os.close(write_end)
            os.close(read_end)  # still ours: an adopted fd would be EBADF here
