"""What every source of messages shares: the hooks :func:`ports.select` waits on.

A *source* (a port, a listener, a mailbox, a memory channel's receive end) keeps its
undelivered messages in its own buffer.  ``select`` first polls each source's buffer
(:meth:`Source._select_poll`); only if all are empty does it *arm* each source with one
waiter (:meth:`Source._select_arm`) and park.  A source that gets a message wakes every
armed waiter; the woken select disarms all of them and polls again, so it consumes exactly
one message, and a message it does not take stays where it was.
"""

from __future__ import annotations

import enum
from typing import Any, Final

__all__ = ["EMPTY", "Empty", "Source", "Waiter"]


class Empty(enum.Enum):
    """The type of :data:`EMPTY` (an enum of one member, so that ``is EMPTY`` narrows)."""

    EMPTY = "EMPTY"

    def __repr__(self) -> str:
        return "EMPTY"


#: What :meth:`Source._select_poll` returns when nothing is buffered.
EMPTY: Final = Empty.EMPTY


class Waiter:
    """One parked task (a select, or a receiver of a multi-receiver source)."""

    __slots__ = ("_waiter",)

    def __init__(self) -> None:
        self._waiter: Any = None


class Source:
    """Base of everything :func:`ports.select` can wait on."""

    __slots__ = ()

    def _select_poll(self) -> object:
        """Take and return one message, or return :data:`EMPTY`.

        Raises the source's end-of-stream or closed exception once it can never deliver
        another message.
        """
        raise NotImplementedError

    def _select_arm(self, waiter: Waiter) -> None:
        """Wake ``waiter`` (through the parker) when a message arrives."""
        raise NotImplementedError

    def _select_disarm(self, waiter: Waiter) -> None:
        """Forget ``waiter`` (it was woken, or the select ended)."""
        raise NotImplementedError
