"""Batched socket writes through Linux AIO: many sockets' output in one system call.

Why
===

Python's socket methods release the GIL around every system call, because the call might
block.  The I/O thread's sockets never block, so for it each release only buys contention:
the loop's thread takes the GIL during the ``send``, and the I/O thread must wait to get it
back - and while it waits, every GIL release of the loop's thread (each file ``open`` or
``read`` of a handler) has to wake it for nothing.  Measured on a 2-core KVM guest with
``wrk`` against ``examples/httpd.py``, that hand-off inflated the loop's own CPU time per
request by 15-30% (mostly system time: the futex wakes), whatever the switch interval.

``io_submit(2)`` takes many write requests, each on its own file descriptor, in one call.
Sockets have no asynchronous write path, so the kernel performs each write at once, as
``send(fd, buf, len, MSG_DONTWAIT)`` would, and posts its result as a completion event
before ``io_submit`` returns; ``io_getevents`` with a zero timeout then collects them
without blocking (and without releasing the GIL: it is called through ``ctypes.PyDLL``).
A round of the I/O thread therefore writes every port's output with one GIL release,
however many ports it serves.

Where it runs: Linux on x86-64 and AArch64 (the system call numbers are per architecture),
when ``io_setup`` works (a seccomp profile or ``fs.aio-max-nr`` may refuse it).  Elsewhere
:func:`open_batch_writer` returns ``None`` and the I/O thread writes port by port as before.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import sys

__all__ = ["BatchWriter", "open_batch_writer"]

log = logging.getLogger("ioserver")

#: (io_setup, io_destroy, io_submit, io_getevents) per machine.
_SYSCALLS = {
    "x86_64": (206, 207, 209, 208),
    "aarch64": (0, 1, 2, 4),
}
_IOCB_CMD_PWRITE = 1

#: Write requests per ``io_submit``: a round with more dirty ports submits several batches.
BATCH_CAPACITY = 256


class _Iocb(ctypes.Structure):
    """``struct iocb`` of <linux/aio_abi.h> on a little-endian 64-bit machine."""

    _fields_ = [
        ("aio_data", ctypes.c_uint64),
        ("aio_key", ctypes.c_uint32),
        ("aio_rw_flags", ctypes.c_int32),
        ("aio_lio_opcode", ctypes.c_uint16),
        ("aio_reqprio", ctypes.c_int16),
        ("aio_fildes", ctypes.c_uint32),
        # A char pointer, so that assigning a bytes object stores its buffer's address
        # without a copy (and ctypes keeps the object alive until the next assignment).
        ("aio_buf", ctypes.c_char_p),
        ("aio_nbytes", ctypes.c_uint64),
        ("aio_offset", ctypes.c_int64),
        ("aio_reserved2", ctypes.c_uint64),
        ("aio_flags", ctypes.c_uint32),
        ("aio_resfd", ctypes.c_uint32),
    ]


class _IoEvent(ctypes.Structure):
    """``struct io_event``."""

    _fields_ = [
        ("data", ctypes.c_uint64),
        ("obj", ctypes.c_uint64),
        ("res", ctypes.c_int64),
        ("res2", ctypes.c_int64),
    ]


class BatchWriter:
    """An AIO context that writes up to :data:`BATCH_CAPACITY` buffers per system call.

    Used by the I/O thread only.  :meth:`add` queues one write of a whole ``bytes`` object
    to a non-blocking socket; :meth:`submit` performs every queued write and returns their
    results in the order they were added: bytes written (possibly fewer than asked), or a
    negative errno (``-EAGAIN`` when the socket buffer is full, ``-EPIPE``,
    ``-ECONNRESET``...), or ``None`` for a write the kernel did not take (the caller then
    writes that buffer itself; its bytes were not sent).
    """

    __slots__ = (
        "_context",
        "_count",
        "_events",
        "_getevents",
        "_iocbs",
        "_numbers",
        "_pointers",
        "_submit",
        "_syscall",
        "_zero_timeout",
        "batches",
        "writes",
    )

    def __init__(self, numbers: tuple[int, int, int, int]) -> None:
        self._numbers = numbers
        released = ctypes.CDLL(None, use_errno=True)  # releases the GIL: for io_submit
        held = ctypes.PyDLL(None, use_errno=True)  # keeps it: for non-blocking calls
        self._syscall = released.syscall
        self._syscall.restype = ctypes.c_long
        held_syscall = held.syscall
        held_syscall.restype = ctypes.c_long
        context = ctypes.c_ulong(0)
        if self._syscall(ctypes.c_long(numbers[0]), BATCH_CAPACITY, ctypes.byref(context)) != 0:
            error = ctypes.get_errno()
            raise OSError(error, f"io_setup: {os.strerror(error)}")
        self._context = context
        self._iocbs = (_Iocb * BATCH_CAPACITY)()
        for index in range(BATCH_CAPACITY):
            self._iocbs[index].aio_lio_opcode = _IOCB_CMD_PWRITE
            self._iocbs[index].aio_data = index
        self._pointers = (ctypes.POINTER(_Iocb) * BATCH_CAPACITY)(
            *[ctypes.pointer(self._iocbs[index]) for index in range(BATCH_CAPACITY)]
        )
        self._events = (_IoEvent * BATCH_CAPACITY)()
        self._zero_timeout = (ctypes.c_long * 2)(0, 0)
        self._count = 0
        # Bound once: the arguments that never change, as ctypes objects.
        submit_number = ctypes.c_long(numbers[2])
        getevents_number = ctypes.c_long(numbers[3])
        context_value = ctypes.c_ulong(context.value)
        pointers = ctypes.byref(self._pointers)
        events = ctypes.byref(self._events)
        zero_timeout = ctypes.byref(self._zero_timeout)
        syscall = self._syscall

        def submit(count: int) -> int:
            return syscall(submit_number, context_value, ctypes.c_long(count), pointers)  # type: ignore[no-any-return]

        def getevents(count: int) -> int:
            return held_syscall(  # type: ignore[no-any-return]
                getevents_number,
                context_value,
                ctypes.c_long(0),
                ctypes.c_long(count),
                events,
                zero_timeout,
            )

        self._submit = submit
        self._getevents = getevents
        self.batches = 0
        self.writes = 0

    @property
    def full(self) -> bool:
        """True when :meth:`submit` must run before the next :meth:`add`."""
        return self._count >= BATCH_CAPACITY

    def add(self, fd: int, data: bytes) -> None:
        """Queue a write of all of ``data`` (a non-empty ``bytes``) to the socket ``fd``."""
        iocb = self._iocbs[self._count]
        iocb.aio_fildes = fd
        iocb.aio_buf = data
        iocb.aio_nbytes = len(data)
        self._count += 1

    def submit(self) -> list[int | None]:
        """Perform every queued write; their results in order (see the class docstring)."""
        count = self._count
        self._count = 0
        results: list[int | None] = [None] * count
        if not count:
            return results
        submitted = self._submit(count)
        if submitted < 0:
            # Nothing was taken (EAGAIN, EBADF for the first fd...): the caller writes.
            return results
        self.batches += 1
        self.writes += submitted
        events = self._events
        collected = 0
        while collected < submitted:
            got = self._getevents(submitted - collected)
            if got <= 0:
                # Socket writes complete inside io_submit, so this does not happen; if it
                # ever did, waiting is the only safe course (the buffers are in flight).
                got = self._wait_events(submitted - collected)
            for index in range(got):
                event = events[index]
                results[event.data] = event.res
            collected += got
        return results

    def _wait_events(self, count: int) -> int:
        got: int = self._syscall(
            ctypes.c_long(self._numbers[3]),
            ctypes.c_ulong(self._context.value),
            ctypes.c_long(1),
            ctypes.c_long(count),
            ctypes.byref(self._events),
            None,
        )
        if got < 0:
            error = ctypes.get_errno()
            raise OSError(error, f"io_getevents: {os.strerror(error)}")
        return got

    def close(self) -> None:
        """Destroy the AIO context (idempotent)."""
        if self._context.value:
            self._syscall(ctypes.c_long(self._numbers[1]), ctypes.c_ulong(self._context.value))
            self._context.value = 0
        for index in range(BATCH_CAPACITY):
            self._iocbs[index].aio_buf = None


def open_batch_writer() -> BatchWriter | None:
    """A :class:`BatchWriter`, or ``None`` where Linux AIO cannot be used here.

    ``IOSERVER_BATCHED_WRITES=0`` in the environment turns it off (the I/O thread then
    writes port by port, and waits for the loop as it did before: see
    :mod:`ioserver._wakeup`).
    """
    if os.environ.get("IOSERVER_BATCHED_WRITES", "1") == "0":
        return None
    if not sys.platform.startswith("linux") or sys.byteorder != "little":
        return None
    if ctypes.sizeof(ctypes.c_void_p) != 8:
        return None
    numbers = _SYSCALLS.get(platform.machine().lower())
    if numbers is None:
        return None
    try:
        return BatchWriter(numbers)
    except (OSError, AttributeError) as exc:
        log.debug("batched writes unavailable: %s", exc)
        return None
