"""Type stub of ``ioserver._native``, the native I/O core built from ``native/`` (issue 14)."""

from typing import Any

__version__: str

class _Framer:
    """A native framer with the Python framers' face (private: the differential tests).

    ``packet`` is a mode as :func:`ioserver._framing.make_framer` takes it.  ``feed``
    returns bytes per packet (a msgpack object's wire bytes, undecoded), a ``list[bytes]``
    per RESP command, and for ``"resp"`` a protocol error as the last message.

    Raises:
        OptionError: an unknown mode, a wrong ``packet_size`` or ``delimiter``.
    """

    def __init__(
        self, packet: str | int, packet_size: int = ..., delimiter: bytes = b"\n"
    ) -> None: ...
    def feed(self, data: bytes) -> list[Any]: ...
    def feed_charged(self, data: bytes, overhead: int) -> tuple[list[Any], list[int]]: ...
    def frame(self, payload: bytes) -> bytes: ...
    def wants(self) -> int | None: ...
    @property
    def buffered(self) -> int: ...
    @property
    def decodes_objects(self) -> bool: ...
