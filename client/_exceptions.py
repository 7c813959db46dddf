"""The client's exceptions, under :exc:`ioserver.IOServerError`."""

from __future__ import annotations

from ioserver._exceptions import ConnectError, IOServerError
from ioserver._exceptions import UnsafeEndpointError as UnsafeEndpointError

__all__ = ["DaemonUnavailable", "ProtocolError", "UnsafeEndpointError"]


class DaemonUnavailable(ConnectError):
    """No ioserver daemon answered at the endpoint (none is running there, it did not
    answer within the timeout, or it refused this client's CURVE key)."""


class ProtocolError(IOServerError):
    """The daemon refused a message (``kind`` says why: ``"malformed"``, ``"version"``,
    ``"unknown-port"``, ``"bad-option"``, ``"limit"`` - one of the daemon's limits, e.g.
    its sessions or this session's ports...; see :mod:`ioserver._protocol`)."""

    def __init__(self, message: str, *, kind: str) -> None:
        super().__init__(message)
        self.kind = kind
