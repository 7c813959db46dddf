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

Buffers and failures
====================

A write's buffer is referenced by the writer only while the write is in flight: from
:meth:`BatchWriter.add` until :meth:`BatchWriter.submit` has collected its completion.  The
request blocks hold the buffers' addresses, never the objects, so a completed write keeps
nothing alive (the memory budget does not see these buffers).

Where a kernel completes socket writes asynchronously (gVisor does), ``submit`` waits for
the completions it did not find at once, retrying the wait when a signal interrupts it
(``EINTR``), for at most :data:`WAIT_LIMIT` seconds.  If the completions cannot be collected
(the wait fails, or the limit passes), the outcome of those writes is unknown: ``submit``
reports them as failed with ``-EIO`` (the caller closes those ports: their byte stream can
no longer be trusted), destroys the context - which waits for the writes still in flight,
so their buffers can be released - and records why in :attr:`BatchWriter.failure`.  The
writer is then closed for good, and the I/O thread writes port by port.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import platform
import sys
import time

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
#: Seconds :meth:`BatchWriter.submit` waits, at most, for completions that ``io_submit``
#: did not post at once (never on Linux itself: socket writes complete inside it).  The
#: I/O thread is blocked meanwhile; after it, the writer gives up (see the module docstring).
WAIT_LIMIT = 1.0
#: ``io_submit`` reads a ``bytes`` object's data where CPython keeps it: the address of
#: ``ob_sval``, this many bytes after the object's own (checked by open_batch_writer).
_BYTES_DATA_OFFSET = bytes.__basicsize__ - 1
_WORDS = 8  # 64-bit words per struct iocb


class _Iocb(ctypes.Structure):
    """``struct iocb`` of <linux/aio_abi.h> on a little-endian 64-bit machine."""

    _fields_ = [
        ("aio_data", ctypes.c_uint64),
        ("aio_key", ctypes.c_uint32),
        ("aio_rw_flags", ctypes.c_int32),
        ("aio_lio_opcode", ctypes.c_uint16),
        ("aio_reqprio", ctypes.c_int16),
        ("aio_fildes", ctypes.c_uint32),
        # An address, not a ctypes pointer: a ctypes pointer field keeps its object alive
        # until the slot is reused (the writer keeps the buffers in flight itself).
        ("aio_buf", ctypes.c_uint64),
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
    ``-ECONNRESET``...; ``-EIO`` when the outcome could not be collected, see the module
    docstring), or ``None`` for a write the kernel did not take (the caller then writes
    that buffer itself; its bytes were not sent).  Once ``submit`` returns, the writer
    holds no reference to any buffer it was given.
    """

    __slots__ = (
        "_context",
        "_count",
        "_events",
        "_getevents",
        "_held",
        "_iocbs",
        "_numbers",
        "_pointers",
        "_submit",
        "_syscall",
        "_words",
        "_zero_timeout",
        "batches",
        "failure",
        "interruptions",
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
        # The request blocks as 64-bit words: add() writes three of them per request, as
        # plain integers (no ctypes object per field).
        self._words = memoryview(self._iocbs).cast("B").cast("Q")
        self._pointers = (ctypes.POINTER(_Iocb) * BATCH_CAPACITY)(
            *[ctypes.pointer(self._iocbs[index]) for index in range(BATCH_CAPACITY)]
        )
        self._events = (_IoEvent * BATCH_CAPACITY)()
        self._zero_timeout = (ctypes.c_long * 2)(0, 0)
        self._count = 0
        # The buffers of the writes queued or in flight, in request order: the only
        # references the writer takes, dropped as soon as their completions are collected.
        self._held: list[bytes] = []
        # Bound once: the arguments that never change, as ctypes objects.
        submit_number = ctypes.c_long(numbers[2])
        getevents_number = ctypes.c_long(numbers[3])
        context_value = ctypes.c_ulong(context.value)
        pointers = ctypes.byref(self._pointers)
        events = ctypes.byref(self._events)
        zero_timeout = ctypes.byref(self._zero_timeout)
        syscall = self._syscall

        def submit(count: int) -> int:
            submitted: int = syscall(submit_number, context_value, ctypes.c_long(count), pointers)
            return submitted

        def getevents(count: int) -> int:
            collected: int = held_syscall(
                getevents_number,
                context_value,
                ctypes.c_long(0),
                ctypes.c_long(count),
                events,
                zero_timeout,
            )
            return collected

        self._submit = submit
        # The completions already posted, collected without waiting (up to ``count``; 0
        # when none is).  An attribute, so that a test can stand between the writer and
        # the kernel's completions: the one seam into this class (see
        # tests/test_adversarial_round.py).
        self._getevents = getevents
        self.batches = 0
        self.writes = 0
        #: Times a wait for completions was interrupted by a signal (and retried).
        self.interruptions = 0
        #: Why the writer gave up (see the module docstring); None while it works.
        self.failure: str | None = None

    @property
    def full(self) -> bool:
        """True when :meth:`submit` must run before the next :meth:`add`."""
        return self._count >= BATCH_CAPACITY

    def add(self, fd: int, data: bytes) -> None:
        """Queue a write of all of ``data`` (a non-empty ``bytes``) to the socket ``fd``."""
        base = self._count * _WORDS
        words = self._words
        # struct iocb: aio_lio_opcode (16 bits), aio_reqprio (16), aio_fildes (32); then
        # aio_buf and aio_nbytes.
        words[base + 2] = _IOCB_CMD_PWRITE | fd << 32
        words[base + 3] = id(data) + _BYTES_DATA_OFFSET
        words[base + 4] = len(data)
        self._held.append(data)
        self._count += 1

    def submit(self) -> list[int | None]:
        """Perform every queued write; their results in order (see the class docstring).

        Never raises for a system call's error: a batch whose completions cannot be
        collected reports those writes as ``-EIO`` and closes the writer (:attr:`failure`
        says why).
        """
        count = self._count
        self._count = 0
        results: list[int | None] = [None] * count
        if not count:
            return results
        try:
            if not self._context.value:
                return results  # closed (after a failure): nothing is taken
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
                    # Socket writes complete inside io_submit on Linux, so this only
                    # happens where AIO is asynchronous (gVisor): wait for them, as the
                    # buffers are in flight.
                    try:
                        got = self._wait_events(submitted - collected)
                    except OSError as exc:
                        self._give_up(results, submitted, exc)
                        return results
                for index in range(got):
                    event = events[index]
                    results[event.data] = event.res
                collected += got
            return results
        finally:
            self._held.clear()  # every write taken has completed (or the context is gone)

    def _wait_events(self, count: int) -> int:
        """Block (without the GIL) until completions are posted; how many were collected.

        Raises:
            OSError: ``io_getevents`` failed (other than ``EINTR``, which is retried), or
                nothing completed within :data:`WAIT_LIMIT` seconds (``ETIMEDOUT``).
        """
        deadline = time.monotonic() + WAIT_LIMIT
        timeout = (ctypes.c_long * 2)(0, 0)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise OSError(
                    errno.ETIMEDOUT,
                    f"io_getevents: no completion within {WAIT_LIMIT} s",
                )
            timeout[0] = int(left)
            timeout[1] = int((left - int(left)) * 1e9)
            got: int = self._syscall(
                ctypes.c_long(self._numbers[3]),
                ctypes.c_ulong(self._context.value),
                ctypes.c_long(1),
                ctypes.c_long(count),
                ctypes.byref(self._events),
                ctypes.byref(timeout),
            )
            if got > 0:
                return got
            if got < 0:
                error = ctypes.get_errno()
                if error == errno.EINTR:
                    self.interruptions += 1
                    continue
                raise OSError(error, f"io_getevents: {os.strerror(error)}")

    def _give_up(self, results: list[int | None], submitted: int, exc: OSError) -> None:
        """The completions of a batch cannot be collected: the writes taken and not yet
        collected have an unknown outcome (-EIO); the context is destroyed, which waits
        for any write still in flight, so the buffers can be released."""
        self.failure = f"{exc.strerror or exc} ({errno.errorcode.get(exc.errno or 0, '?')})"
        unknown = -errno.EIO
        for index in range(submitted):
            if results[index] is None:
                results[index] = unknown
        log.error("batched writes failed, writing port by port from now on: %s", self.failure)
        self.close()

    def close(self) -> None:
        """Destroy the AIO context (idempotent)."""
        if self._context.value:
            self._syscall(ctypes.c_long(self._numbers[1]), ctypes.c_ulong(self._context.value))
            self._context.value = 0
        self._count = 0
        self._held.clear()


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
    probe = b"the address of a bytes object's data"
    if ctypes.cast(ctypes.c_char_p(probe), ctypes.c_void_p).value != id(probe) + _BYTES_DATA_OFFSET:
        return None  # not the object layout add() relies on
    try:
        return BatchWriter(numbers)
    except (OSError, AttributeError) as exc:
        log.debug("batched writes unavailable: %s", exc)
        return None
