"""Selector backends for the I/O thread: epoll on Linux, the ``selectors`` module elsewhere.

Both keep registrations persistent (an fd is registered once and its interest modified only
when it changes) and report events as ``(fd, mask)`` with the epoll bit values, so the I/O
thread has one code path.  ``mask`` is 0 for "not interested": the fd is then taken out of
the selector, because epoll reports hang-ups and errors even when nothing was asked for, and
a level-triggered hang-up on a port nobody reads would spin the thread.
"""

from __future__ import annotations

import select
import selectors

__all__ = ["ERROR", "READ", "WRITE", "Poller", "make_poller"]

READ = 0x001  # EPOLLIN
WRITE = 0x004  # EPOLLOUT
ERROR = 0x008 | 0x010  # EPOLLERR | EPOLLHUP: reported as both readable and writable


class Poller:
    """The interface both backends implement."""

    name = "abstract"
    #: True when the wake-up fd is edge-triggered and never needs draining.
    wakeup_is_edge_triggered = False

    def register(self, fd: int, mask: int) -> None:
        raise NotImplementedError

    def modify(self, fd: int, mask: int) -> None:
        raise NotImplementedError

    def unregister(self, fd: int) -> None:
        raise NotImplementedError

    def register_wakeup(self, fd: int) -> None:
        raise NotImplementedError

    def poll(self, timeout: float) -> list[tuple[int, int]]:
        """Wait for events; ``timeout`` in seconds, negative blocks until one arrives."""
        raise NotImplementedError

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
        self.poll = self._epoll.poll  # type: ignore[method-assign]
        self.register = self._epoll.register  # type: ignore[method-assign,assignment]
        self.modify = self._epoll.modify  # type: ignore[method-assign,assignment]
        self.unregister = self._epoll.unregister  # type: ignore[method-assign]

    def register_wakeup(self, fd: int) -> None:
        self._epoll.register(fd, select.EPOLLIN | select.EPOLLET)

    def close(self) -> None:
        self._epoll.close()


class SelectorsPoller(Poller):
    """Any ``selectors.DefaultSelector`` (kqueue, poll, select), with masks translated."""

    name = "selectors"

    def __init__(self) -> None:
        self._selector = selectors.DefaultSelector()
        self.name = f"selectors ({type(self._selector).__name__})"

    @staticmethod
    def _events(mask: int) -> int:
        return (selectors.EVENT_READ if mask & READ else 0) | (
            selectors.EVENT_WRITE if mask & WRITE else 0
        )

    def register(self, fd: int, mask: int) -> None:
        self._selector.register(fd, self._events(mask))

    def modify(self, fd: int, mask: int) -> None:
        self._selector.modify(fd, self._events(mask))

    def unregister(self, fd: int) -> None:
        self._selector.unregister(fd)

    def register_wakeup(self, fd: int) -> None:
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


def make_poller(backend: str | None = None) -> Poller:
    """The best poller here, or the one named: ``"epoll"`` or ``"selectors"``."""
    if backend is None:
        backend = "epoll" if hasattr(select, "epoll") else "selectors"
    if backend == "epoll":
        return EpollPoller()
    if backend == "selectors":
        return SelectorsPoller()
    from ._exceptions import OptionError

    raise OptionError(f"poller must be 'epoll' or 'selectors', not {backend!r}")
