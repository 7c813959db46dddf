"""Allocation failures on the paths that hand input over: a ``MemoryError`` (or, where
the native core's glue cannot report one, an allocation that fails under it) while a
message is built - nothing lost, nothing delivered twice, every charge counted once, and
the I/O thread goes on.  Each test failed before its fix (the residual defects the
previous stop of issue 14 left: tests/test_residual_faults.py)."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

import ioserver
import ports
from ioserver import _zmq
from ports import Closed, Data

pytestmark = pytest.mark.anyio


async def _until(condition: Any, seconds: float = 10) -> None:
    """Wait (checkpointing) until ``condition()``: the I/O thread's state, seen from the
    loop."""
    with anyio.fail_after(seconds):
        while not condition():
            await anyio.lowlevel.checkpoint()


# -- a ZeroMQ message that fails to build -----------------------------------------------------
@pytest.mark.every_core
async def test_a_zmq_message_that_fails_to_build_leaves_no_charge_shifted(
    monkeypatch: pytest.MonkeyPatch, core: str, io_backend: str | None
) -> None:
    """Two messages read from a ZeroMQ ``PULL`` socket in one go, the second failing to
    build (a ``MemoryError`` where its ``Data`` gets its frames): the first arrives, the
    port closes as an internal error, and the memory in use comes back to 0 on both
    cores (ZeroMQ ports are served by the Python I/O half, hosted on the native core).
    Before, the failing message's size was appended to the port's sizes (charged) before
    it was built, and the first message's size was added to the budget's delivered total
    only at the end of the read: the budget counted the first taken but never delivered
    (``memory_in_use`` went below 0, and the failing message's size stayed queued)."""
    original = _zmq._SET_DATA

    def fails_on_lost(message: object, frames: object) -> None:
        if frames == [b"lost"]:
            raise MemoryError
        original(message, frames)

    monkeypatch.setattr(_zmq, "_SET_DATA", fails_on_lost)
    async with (
        ioserver.open(core=core, io_backend=io_backend, memory_limit=1 << 20) as ios,
        await ports.open_zmq(ios, "PULL", bind="inproc://oom-faults", active=False) as pull,
        await ports.open_zmq(ios, "PUSH", connect="inproc://oom-faults") as push,
    ):
        await push.send(b"one")
        await push.send(b"lost")
        # Both in the PULL socket's pipe (inproc: sent is there), then read in one go.
        await _until(lambda: push.statistics().bytes_sent == 7)
        pull.setopts(active=True)
        with anyio.fail_after(5):
            assert await pull.receive() == Data([b"one"])
            closed = await pull.receive()
        assert closed == Closed("internal error: MemoryError()", "EIO"), closed
        await _until(lambda: ios.statistics().memory_in_use == 0)
