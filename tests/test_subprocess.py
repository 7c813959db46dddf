"""Process ports with real programs: output, exit status, termination, flow control, reaping."""

from __future__ import annotations

import glob
import os
import shutil
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from conftest import until

import ioserver
import ports
from ports import Closed, Data, ExitStatus

pytestmark = pytest.mark.anyio

PYTHON = sys.executable
# A line-based calculator: answers each line with its value; exits 0 at end of input.
CALCULATOR = (
    "import sys\nfor line in sys.stdin:\n    print(eval(line, {'__builtins__': {}}), flush=True)\n"
)
# Ignores SIGTERM, says it is ready, then waits forever (only SIGKILL ends it).
STUBBORN = (
    "import signal, sys, time\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "print('ready', flush=True)\n"
    "while True:\n"
    "    time.sleep(1)\n"
)


def children() -> set[int]:
    """This process's children, zombies included (Linux's /proc/PID/task/*/children)."""
    found: set[int] = set()
    for name in glob.glob(f"/proc/{os.getpid()}/task/*/children"):
        try:
            with open(name) as listing:
                found.update(int(pid) for pid in listing.read().split())
        except OSError:
            pass  # that thread ended meanwhile (its children are the process's own)
    return found


@pytest.fixture
def no_zombies() -> Iterator[None]:
    """Fail the test if it leaves a child process behind, running or as a zombie."""
    if not glob.glob(f"/proc/{os.getpid()}/task/*/children"):  # pragma: no cover
        pytest.skip("the child-process check needs /proc/PID/task/*/children (Linux)")
    before = children()
    yield
    left = children() - before
    assert not left, f"child processes left behind: {sorted(left)}"


@pytest.fixture
async def pios(no_zombies: None, no_leaks: None) -> AsyncIterator[ioserver.IOServer]:
    """An I/O server whose children must all be reaped, and no fd left, after the test."""
    async with ioserver.open() as server:
        yield server


async def messages_until_closed(port: ports.Port) -> list[Any]:
    with anyio.fail_after(10):
        return [message async for message in port]


async def wait_reaped(pidfd: int, pid: int) -> None:
    """Wait until ``pid`` has exited (its pidfd is readable) and the I/O thread reaped it."""
    with anyio.fail_after(10):
        await anyio.wait_readable(pidfd)
        # a zombie until the I/O thread reaps it
        await until(lambda: not os.path.exists(f"/proc/{pid}"))
    os.close(pidfd)


async def test_a_line_based_program_answers_requests_then_exits_with_its_status(
    pios: ioserver.IOServer,
) -> None:
    port = await ports.open_process(pios, [PYTHON, "-c", CALCULATOR], packet="line")
    async with port:
        assert port.pid > 0 and port.exit_status is None
        for question, answer in ((b"1+2\n", b"3\n"), (b"6*7\n", b"42\n")):
            await port.send(question)
            with anyio.fail_after(10):
                assert await port.receive() == Data(answer)
        await port.send_eof()  # its stdin ends: it exits 0
        assert await messages_until_closed(port) == [ExitStatus(0), Closed("eof")]
        assert port.exit_status == 0


async def test_the_exit_status_follows_all_the_output(pios: ioserver.IOServer) -> None:
    size = 300_000
    script = f"import sys; sys.stdout.write('x' * {size}); sys.stdout.flush(); sys.exit(7)"
    port = await ports.open_process(pios, [PYTHON, "-c", script])
    async with port:
        messages = await messages_until_closed(port)
    assert messages[-2:] == [ExitStatus(7), Closed("eof")]
    assert b"".join(message.data for message in messages[:-2]) == b"x" * size


async def test_a_program_that_exits_at_once(pios: ioserver.IOServer) -> None:
    port = await ports.open_process(pios, ["true"] if shutil.which("true") else [PYTHON, "-c", ""])
    async with port:
        assert await messages_until_closed(port) == [ExitStatus(0), Closed("eof")]
        with pytest.raises(ports.EndOfPort):
            await port.receive()


async def test_terminate_ends_a_program_with_sigterm(pios: ioserver.IOServer) -> None:
    port = await ports.open_process(pios, [PYTHON, "-c", "import time; time.sleep(60)"])
    async with port:
        port.terminate()
        assert await messages_until_closed(port) == [ExitStatus(-15), Closed("eof")]


async def test_a_program_that_ignores_sigterm_gets_sigkill_after_the_grace(
    pios: ioserver.IOServer,
) -> None:
    port = await ports.open_process(pios, [PYTHON, "-c", STUBBORN], kill_grace=0.3, packet="line")
    async with port:
        with anyio.fail_after(10):
            assert await port.receive() == Data(b"ready\n")
        started = time.monotonic()
        port.terminate()
        assert await messages_until_closed(port) == [ExitStatus(-9), Closed("eof")]
        assert time.monotonic() - started >= 0.3


async def test_closing_the_port_kills_and_reaps_even_a_stubborn_program(
    pios: ioserver.IOServer,
) -> None:
    port = await ports.open_process(pios, [PYTHON, "-c", STUBBORN], kill_grace=0.2, packet="line")
    with anyio.fail_after(10):
        assert await port.receive() == Data(b"ready\n")
    pidfd = os.pidfd_open(port.pid)
    await port.aclose()
    await wait_reaped(pidfd, port.pid)


async def test_a_program_flooding_stdout_is_paused_and_memory_stays_bounded(
    pios: ioserver.IOServer,
) -> None:
    # Writes forever, never reads its stdin: only flow control keeps memory bounded.
    flood = "import sys\nchunk = b'y' * 65536\nwhile True:\n    sys.stdout.buffer.write(chunk)\n"
    port = await ports.open_process(
        pios,
        [PYTHON, "-c", flood],
        high_msgq_watermark=128 * 1024,
        low_msgq_watermark=32 * 1024,
        kill_grace=0.5,
    )
    first = await port.receive()  # the owner takes one message, then stops taking
    assert isinstance(first, Data)
    await until(lambda: port.statistics().pauses > 0, 10)  # the I/O thread's state
    statistics = port.statistics()
    assert statistics.bytes_buffered_in <= 128 * 1024 + 65536
    assert pios.statistics().memory_in_use <= 128 * 1024 + 65536
    # Draining resumes the reads: more keeps coming.
    taken = 0
    with anyio.fail_after(10):
        while taken < 1_000_000:
            message = await port.receive()
            assert isinstance(message, Data)
            taken += len(message.data)
    assert port.statistics().pauses >= 1
    pidfd = os.pidfd_open(port.pid)
    await port.aclose()
    await wait_reaped(pidfd, port.pid)


async def test_stderr_as_a_port_merged_or_discarded(pios: ioserver.IOServer) -> None:
    script = "import sys; sys.stderr.write('to stderr\\n'); sys.stderr.flush(); print('to stdout')"
    separate = await ports.open_process(pios, [PYTHON, "-c", script], stderr="port", packet="line")
    async with separate:
        assert separate.stderr is not None
        assert await messages_until_closed(separate) == [
            Data(b"to stdout\n"),
            ExitStatus(0),
            Closed("eof"),
        ]
        errors = await messages_until_closed(separate.stderr)  # raw bytes: maybe split
        assert errors[-1] == Closed("eof")
        assert b"".join(message.data for message in errors[:-1]) == b"to stderr\n"
        with pytest.raises((ports.ClosedPortError, ports.BrokenPortError)):
            await separate.stderr.send(b"one-way")  # its sending side is shut
    merged = await ports.open_process(pios, [PYTHON, "-c", script], stderr="stdout", packet="line")
    async with merged:
        assert merged.stderr is None
        messages = await messages_until_closed(merged)
        assert sorted(messages[:2], key=repr) == [Data(b"to stderr\n"), Data(b"to stdout\n")]
    discarded = await ports.open_process(
        pios, [PYTHON, "-c", script], stderr="devnull", packet="line"
    )
    async with discarded:
        assert (await messages_until_closed(discarded))[0] == Data(b"to stdout\n")


async def test_env_and_cwd(pios: ioserver.IOServer, tmp_path: Path) -> None:
    script = "import os; print(os.getcwd(), os.environ.get('GREETING'), 'HOME' in os.environ)"
    port = await ports.open_process(
        pios, [PYTHON, "-c", script], env={"GREETING": "hello"}, cwd=tmp_path, packet="line"
    )
    async with port:
        messages = await messages_until_closed(port)
    assert messages[0] == Data(f"{tmp_path} hello False\n".encode())


async def test_an_owner_that_ends_takes_its_program_with_it(pios: ioserver.IOServer) -> None:
    echo = "import sys\nfor line in sys.stdin:\n    print(line, end='', flush=True)\n"
    port = await ports.open_process(pios, [PYTHON, "-c", echo], packet="line")
    mailbox = ports.Mailbox()
    port.set_owner(mailbox)
    await port.send(b"first\n")
    with anyio.fail_after(10):
        assert await mailbox.receive() == (port, Data(b"first\n"))
    pidfd = os.pidfd_open(port.pid)
    mailbox.close()  # the owner is gone: its ports close, and the program ends
    with pytest.raises(ports.ClosedPortError):
        await port.send(b"second\n")
    await wait_reaped(pidfd, port.pid)
    assert port.closed


async def test_stopping_the_server_terminates_and_reaps_every_program(
    no_zombies: None, no_leaks: None
) -> None:
    async with ioserver.open() as ios:
        sleeper = await ports.open_process(ios, [PYTHON, "-c", "import time; time.sleep(60)"])
        stubborn = await ports.open_process(
            ios, [PYTHON, "-c", STUBBORN], kill_grace=0.2, packet="line"
        )
        with anyio.fail_after(10):
            assert await stubborn.receive() == Data(b"ready\n")
    assert await messages_until_closed(sleeper) == [
        ExitStatus(-15),
        Closed("ioserver closed", "ESHUTDOWN"),
    ]
    assert await messages_until_closed(stubborn) == [
        ExitStatus(-9),
        Closed("ioserver closed", "ESHUTDOWN"),
    ]


@pytest.mark.parametrize("pidfd", [True, False], ids=["pidfd", "no-pidfd"])
async def test_stopping_the_server_stops_all_programs_in_one_grace_period(
    no_zombies: None, no_leaks: None, monkeypatch: pytest.MonkeyPatch, pidfd: bool
) -> None:
    # Five programs that ignore SIGTERM, kill_grace=1: the stop signals them all at once
    # and waits once, so it takes about one grace period, not five.  The time bound is
    # the behaviour under test (5 x 1 s before the fix).
    if not pidfd:
        monkeypatch.setattr("ports._process.open_pidfd", lambda pid: None)
    async with ioserver.open() as ios:
        programs = [
            await ports.open_process(ios, [PYTHON, "-c", STUBBORN], kill_grace=1, packet="line")
            for _ in range(5)
        ]
        with anyio.fail_after(10):
            for program in programs:
                assert await program.receive() == Data(b"ready\n")  # SIGTERM is ignored
        pids = [program.pid for program in programs]
        started = time.monotonic()
    elapsed = time.monotonic() - started
    assert 0.9 < elapsed < 2.5, f"stopping 5 stubborn programs took {elapsed:.2f} s"
    for program in programs:
        assert await messages_until_closed(program) == [
            ExitStatus(-9),
            Closed("ioserver closed", "ESHUTDOWN"),
        ]
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}")  # killed and reaped: none left running


async def test_without_pidfd_the_exit_is_polled(
    no_zombies: None, no_leaks: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ports._process

    monkeypatch.setattr(ports._process, "open_pidfd", lambda pid: None)
    async with ioserver.open() as ios:
        quick = await ports.open_process(ios, [PYTHON, "-c", "import sys; sys.exit(3)"])
        assert await messages_until_closed(quick) == [ExitStatus(3), Closed("eof")]
        stubborn = await ports.open_process(
            ios, [PYTHON, "-c", STUBBORN], kill_grace=0.2, packet="line"
        )
        with anyio.fail_after(10):
            assert await stubborn.receive() == Data(b"ready\n")
        stubborn.terminate()
        assert await messages_until_closed(stubborn) == [ExitStatus(-9), Closed("eof")]
        # And one left running for the server's stop to end.
        sleeper = await ports.open_process(ios, [PYTHON, "-c", "import time; time.sleep(60)"])
    assert (await messages_until_closed(sleeper))[0] == ExitStatus(-15)


async def test_send_signal_reaches_the_program(pios: ioserver.IOServer) -> None:
    script = (
        # The signal is waited for, not handled: a handler that printed could land while
        # the buffered stdout was still inside 'ready''s write (a reentrant call, exit 1),
        # as it did on CI, where PYTHONUNBUFFERED is not set.
        "import signal, sys\n"
        "signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})\n"
        "print('ready', flush=True)\n"
        "signal.sigwait({signal.SIGUSR1})\n"
        "print('usr1', flush=True)\n"
        "sys.exit(5)\n"
    )
    port = await ports.open_process(pios, [PYTHON, "-c", script], packet="line")
    async with port:
        with anyio.fail_after(10):
            assert await port.receive() == Data(b"ready\n")
        import signal

        port.send_signal(signal.SIGUSR1)
        assert await messages_until_closed(port) == [Data(b"usr1\n"), ExitStatus(5), Closed("eof")]


@pytest.mark.parametrize(
    ("argv", "options", "error", "match"),
    [
        ("ls -l", {}, ports.OptionError, "not a shell command line"),
        ([], {}, ports.OptionError, "non-empty"),
        (["ls", 3], {}, ports.OptionError, r"argv\[1\]"),
        (["ls", "a\0b"], {}, ports.OptionError, "NUL"),
        (["ls"], {"stderr": "pipe"}, ports.OptionError, "stderr"),
        (["ls"], {"kill_grace": -1}, ports.OptionError, "kill_grace"),
        (["ls"], {"env": {"A=B": "c"}}, ports.OptionError, "env"),
        (["ls"], {"nodelay": True}, ports.OptionError, "nodelay"),
        (["ls"], {"packet": 3}, ports.OptionError, "packet"),
        (["/nonexistent/program"], {}, ports.ConnectError, "ENOENT"),
        (["ls"], {"cwd": "/nonexistent/dir"}, ports.ConnectError, "ENOENT"),
    ],
)
async def test_bad_arguments_are_refused_before_anything_runs(
    pios: ioserver.IOServer, argv: Any, options: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        await ports.open_process(pios, argv, **options)


async def test_a_file_that_is_not_executable(pios: ioserver.IOServer, tmp_path: Path) -> None:
    script = tmp_path / "script.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    with pytest.raises(ports.ConnectError, match="EACCES") as caught:
        await ports.open_process(pios, [script])
    assert caught.value.errno_name == "EACCES"


@pytest.mark.python_core
async def test_process_ports_under_the_selectors_poller(no_zombies: None, no_leaks: None) -> None:
    async with ioserver.open(poller="selectors") as ios:
        port = await ports.open_process(ios, [PYTHON, "-c", CALCULATOR], packet="line")
        async with port:
            await port.send(b"2**10\n")
            with anyio.fail_after(10):
                assert await port.receive() == Data(b"1024\n")
            await port.send_eof()
            assert await messages_until_closed(port) == [ExitStatus(0), Closed("eof")]
