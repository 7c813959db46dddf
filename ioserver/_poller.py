"""Selector backends for the I/O thread: epoll, poll, select, and the ``selectors`` module.

Every backend keeps registrations persistent (an fd is registered once and its interest
modified only when it changes) and reports events as ``(fd, mask)`` with the epoll bit
values, so the I/O thread has one code path.  ``mask`` is 0 for "not interested": the fd is
then taken out of the selector, because epoll and poll report hang-ups and errors even when
nothing was asked for, and a level-triggered hang-up on a port nobody reads would spin the
thread.

The limits of each backend (see :data:`POLLERS`):

- ``epoll`` (Linux): no limit on descriptor numbers; O(ready) per round.
- ``poll`` (POSIX): no limit on descriptor numbers; O(registered) per round.
- ``select`` (everywhere): descriptors below ``FD_SETSIZE`` (1024) only; O(highest fd)
  per round.  A port whose descriptor is at or above it is refused with
  :exc:`~ioserver.PollerLimitError` when it opens (see :meth:`Poller.check`): Python's
  ``select.select`` would fail for every port at once.
- ``selectors``: the standard library's ``DefaultSelector`` (epoll on Linux, kqueue on the
  BSDs and macOS, else poll or select), the portable choice, with that selector's limits.
"""

from __future__ import annotations

import select
import selectors
import sys
from collections.abc import Callable

from ._exceptions import OptionError, PollerLimitError

__all__ = ["ERROR", "POLLERS", "READ", "WRITE", "Poller", "default_poller", "make_poller"]

READ = 0x001  # EPOLLIN, POLLIN
WRITE = 0x004  # EPOLLOUT, POLLOUT
ERROR = 0x008 | 0x010  # EPOLLERR | EPOLLHUP: reported as both readable and writable

#: ``FD_SETSIZE`` of the C library's ``select``: glibc's and the BSDs' 1024, the value
#: CPython's ``select.select`` checks descriptors against (it raises ``ValueError`` at or
#: above it).
FD_SETSIZE = 1024


class Poller:
    """The interface every backend implements."""

    name = "abstract"
    #: True when the wake-up fd is edge-triggered and never needs draining.
    wakeup_is_edge_triggered = False
    #: Descriptors at or above this cannot be watched (None: no limit).
    fd_limit: int | None = None

    def check(self, fd: int) -> None:
        """Raise :exc:`~ioserver.PollerLimitError` if this backend cannot watch ``fd``.

        The I/O thread calls it before a port's descriptor enters its table, so that the
        one port is refused and no later ``poll`` fails for every port.
        """
        limit = self.fd_limit
        if limit is not None and fd >= limit:
            raise PollerLimitError(self.name, fd, limit)

    # The calls of every round: a backend defines them as methods, or binds its kernel
    # object's own at once (no Python frame between the I/O thread and the syscall).
    #: Watch ``fd`` for ``mask`` (``READ``/``WRITE`` bits).
    register: Callable[[int, int], None]
    #: Watch ``fd`` for ``mask`` instead.
    modify: Callable[[int, int], None]
    #: Stop watching ``fd``.
    unregister: Callable[[int], None]
    #: Wait for events: ``(fd, mask)`` pairs; ``timeout`` in seconds, negative blocks
    #: until one arrives.
    poll: Callable[[float], list[tuple[int, int]]]

    def register_wakeup(self, fd: int) -> None:
        raise NotImplementedError

    def fileno(self) -> int:
        """The poller's own fd, for a host to watch (epoll's only)."""
        raise NotImplementedError(f"the {self.name} poller has no fd of its own")

    def close(self) -> None:
        raise NotImplementedError


class EpollPoller(Poller):
    """Level-triggered epoll; the wake-up eventfd alone is edge-triggered.

    An eventfd signals every write to an edge-triggered waiter, so the I/O thread never has
    to read it back: that saves one syscall per wake-up.
    """

    name = "epoll"
    wakeup_is_edge_triggered = True

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self.poll = self._epoll.poll
        self.register = self._epoll.register
        self.modify = self._epoll.modify
        self.unregister = self._epoll.unregister

    def register_wakeup(self, fd: int) -> None:
        self._epoll.register(fd, select.EPOLLIN | select.EPOLLET)

    def fileno(self) -> int:
        """The epoll fd: readable while one of its descriptors is ready (a host's poller
        watches it: see ``IOThread.poller_fd``)."""
        return self._epoll.fileno()

    def close(self) -> None:
        self._epoll.close()


class PollPoller(Poller):
    """``poll(2)``: the kernel walks every registered descriptor each round.

    ``POLLIN``/``POLLOUT``/``POLLERR``/``POLLHUP`` have epoll's bit values, so masks pass
    through untranslated; ``POLLNVAL`` (a descriptor closed while registered, which the
    I/O thread never does) is reported as an error.
    """

    name = "poll"

    def __init__(self) -> None:
        self._poll = select.poll()
        self.register = self._poll.register
        self.modify = self._poll.modify
        self.unregister = self._poll.unregister

    def register_wakeup(self, fd: int) -> None:
        self._poll.register(fd, select.POLLIN)

    def poll(self, timeout: float) -> list[tuple[int, int]]:
        # poll(2) counts milliseconds; CPython rounds a fraction up, as epoll's timeout.
        events = self._poll.poll(None if timeout < 0 else timeout * 1000.0)
        if any(mask & select.POLLNVAL for _, mask in events):
            return [(fd, mask | ERROR if mask & select.POLLNVAL else mask) for fd, mask in events]
        return events

    def close(self) -> None:
        pass  # poll(2) holds no descriptor to release


class SelectPoller(Poller):
    """``select(2)``: descriptors below ``FD_SETSIZE`` only (see :meth:`Poller.check`).

    A hang-up or an error makes a descriptor readable (and a failed one writable), so
    errors reach the I/O thread as reads and writes that fail, as with the others.
    """

    name = "select"
    fd_limit = FD_SETSIZE

    def __init__(self) -> None:
        self._readers: set[int] = set()
        self._writers: set[int] = set()

    def register(self, fd: int, mask: int) -> None:
        self.check(fd)  # select.select would raise ValueError: every port would fail
        if mask & READ:
            self._readers.add(fd)
        if mask & WRITE:
            self._writers.add(fd)

    def modify(self, fd: int, mask: int) -> None:
        self.unregister(fd)
        self.register(fd, mask)

    def unregister(self, fd: int) -> None:
        self._readers.discard(fd)
        self._writers.discard(fd)

    def register_wakeup(self, fd: int) -> None:
        self.register(fd, READ)

    def poll(self, timeout: float) -> list[tuple[int, int]]:
        readable, writable, _ = select.select(
            self._readers, self._writers, (), None if timeout < 0 else timeout
        )
        if not writable:
            return [(fd, READ) for fd in readable]
        events = dict.fromkeys(readable, READ)
        for fd in writable:
            events[fd] = events.get(fd, 0) | WRITE
        return list(events.items())

    def close(self) -> None:
        self._readers.clear()
        self._writers.clear()


class SelectorsPoller(Poller):
    """Any ``selectors.DefaultSelector`` (epoll, kqueue, devpoll, poll, select), with masks
    translated."""

    name = "selectors"

    def __init__(self) -> None:
        self._selector = selectors.DefaultSelector()
        self.name = f"selectors ({type(self._selector).__name__})"
        if isinstance(self._selector, selectors.SelectSelector):
            self.fd_limit = FD_SETSIZE

    @staticmethod
    def _events(mask: int) -> int:
        return (selectors.EVENT_READ if mask & READ else 0) | (
            selectors.EVENT_WRITE if mask & WRITE else 0
        )

    def register(self, fd: int, mask: int) -> None:
        self.check(fd)
        self._selector.register(fd, self._events(mask))

    def modify(self, fd: int, mask: int) -> None:
        self._selector.modify(fd, self._events(mask))

    def unregister(self, fd: int) -> None:
        self._selector.unregister(fd)

    def register_wakeup(self, fd: int) -> None:
        self.check(fd)
        self._selector.register(fd, selectors.EVENT_READ)

    def poll(self, timeout: float) -> list[tuple[int, int]]:
        ready = self._selector.select(None if timeout < 0 else timeout)
        return [
            (
                key.fd,
                (READ if events & selectors.EVENT_READ else 0)
                | (WRITE if events & selectors.EVENT_WRITE else 0),
            )
            for key, events in ready
        ]

    def close(self) -> None:
        self._selector.close()


#: The backends by name, in order of preference; those this platform lacks are left out.
POLLERS: dict[str, type[Poller]] = {
    name: cls
    for name, cls, present in (
        ("epoll", EpollPoller, hasattr(select, "epoll")),
        ("poll", PollPoller, hasattr(select, "poll") and sys.platform != "darwin"),
        ("select", SelectPoller, True),
        ("selectors", SelectorsPoller, True),
    )
    if present
}


def default_poller() -> str:
    """The backend used when none is named: epoll on Linux, else the ``selectors``
    module's best (kqueue on the BSDs and macOS)."""
    return "epoll" if "epoll" in POLLERS else "selectors"


def make_poller(backend: str | None = None) -> Poller:
    """The poller named ``backend`` (one of :data:`POLLERS`), or :func:`default_poller`'s.

    Raises:
        OptionError: ``backend`` names no poller this platform has.
    """
    if backend is None:
        backend = default_poller()
    cls = POLLERS.get(backend) if isinstance(backend, str) else None
    if cls is None:
        names = ", ".join(repr(name) for name in POLLERS)
        raise OptionError(f"poller must be one of {names} here, not {backend!r}")
    return cls()
