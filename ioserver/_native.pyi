"""Type stub of ``ioserver._native``, the native I/O core built from ``native/`` (issue 14)."""

import socket
from collections.abc import Callable, Mapping
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

def _msgpack_charges(data: bytes | bytearray | memoryview, start: int, stop: int) -> list[int]:
    """The charge of each whole msgpack object of ``data[start:stop]`` (back to back, up
    to the first unfinished one): what it holds decoded beyond its wire bytes and
    ``PACKET_OVERHEAD``, by kind of item (``ioserver._framing.MSGPACK_CHARGES``; private:
    the Python framer's charge).

    Raises:
        PacketTooLarge: an object holds more than ``MSGPACK_MAX_ITEMS`` items.
        ValueError: ``start``, ``stop`` outside ``data``.
    """

class _FlowModel:
    """Ports' receive flow control and a memory budget, native (private: the
    differential tests).  Ports are named by the index :meth:`add_port` returns."""

    def __init__(
        self, memory_limit: int | None, port_buffer_limit: int | None, read_size: int
    ) -> None: ...
    def add_port(
        self,
        high_bytes: int,
        low_bytes: int,
        high_messages: int,
        active: tuple[int, bool],
        packet_overhead: int,
    ) -> int: ...
    def add_framed_port(
        self,
        high_bytes: int,
        low_bytes: int,
        high_messages: int,
        active: tuple[int, bool],
        packet_overhead: int,
        packet: str | int,
        packet_size: int,
        delimiter: bytes = b"\n",
    ) -> int: ...
    def framed_read(
        self, port: int, data: bytes
    ) -> tuple[list[int], bool, BaseException | str | None]: ...
    def set_active_framed(
        self, port: int, mode: tuple[int, bool]
    ) -> tuple[bool, list[int], bool]: ...
    def read_once_framed(self, port: int) -> tuple[bool, list[int], bool]: ...
    def framing_bytes(self) -> int: ...
    def framer_holds(self, port: int) -> tuple[int, int]: ...
    def held(self, port: int) -> tuple[int, int]: ...
    def deliver(self, port: int, charges: list[int]) -> tuple[bool, bool, bool]: ...
    def pause(self, port: int) -> bool: ...
    def recheck(self, port: int) -> bool: ...
    def may_resume(self, port: int, generation: int) -> bool: ...
    def took(self, port: int, charge: int) -> int | None: ...
    def set_waiting(self, port: int, waiting: bool) -> bool: ...
    def set_active(self, port: int, mode: tuple[int, bool]) -> bool: ...
    def read_once(self, port: int) -> bool: ...
    def admit(self, port: int, count: int) -> int: ...
    def begin_round(self) -> tuple[int, list[int]]: ...
    def admit_read(self, port: int) -> tuple[int, bool] | None: ...
    def want(self, port: int) -> bool: ...
    def queued(self, bytes: int) -> None: ...
    def wrote(self, bytes: int) -> None: ...
    def in_use(self) -> int: ...
    def state(
        self, port: int
    ) -> tuple[int, bool, bool, int, tuple[int, int], tuple[int, int], int, bool]: ...
    def stats(self) -> tuple[int, int, int]: ...

class WindowCounters:
    consumed_bytes: int
    consumed_messages: int
    queued_bytes: int
    send_blocked: bool
    resume_generation: int
    framer: Any
    packet_overhead: int
    sizes: Any
    on_pause: Any
    on_gone: Any
    def __init__(self, *args: Any, **kwargs: Any) -> None: ...
    def took(self, charge: int) -> int | None: ...
    def task_waits(self) -> bool: ...
    def charge(self, data: Any) -> int: ...
    def resume_due(self, flow: Any) -> int | None: ...

class OwnerCell:
    """A mailbox's cell in the native I/O half (``flow::OwnerCell``)."""

    @property
    def waiting(self) -> bool: ...
    @property
    def paused(self) -> int: ...
    def park(self) -> bool: ...
    def unpark(self) -> None: ...

class Conn:
    closed: bool
    bytes_in: int
    bytes_out: int
    out_bytes: int
    delivered_bytes: int
    delivered_messages: int
    pause_generation: int
    pauses: int
    msgq_paused: bool
    peak_buffered: int
    global_paused: bool
    held_bytes: int
    packets_too_large: int
    peer_address: tuple[Any, ...] | None
    def drained(self) -> bool: ...

class Inbox:
    wakeup: Inbox
    wakes_sent: int
    wakes_skipped: int
    spurious_wakes: int
    asleep: bool
    postponed: bool
    def fileno(self) -> int: ...
    def drain(self) -> bool: ...
    def prepare_to_sleep(self) -> bool: ...
    def woke(self) -> None: ...
    def take(self) -> list[tuple[Any, Any]]: ...
    @property
    def stage(self) -> Callable[[tuple[Any, Any]], None]:
        """The hosted half's ``deliver`` for this loop: call it on the I/O thread only."""
    def close(self) -> None: ...

class Hold:
    """A stop of the native I/O thread (``Core._hold_for_test``; tests only)."""

    def wait(self) -> bool: ...
    def release(self) -> None: ...

class Core:
    polls: int
    events: int
    commands_run: int
    bytes_in: int
    bytes_out: int
    delivered_bytes: int
    bytes_discarded: int
    bytes_held: int
    pending_output: int
    peak_memory: int
    global_pauses: int
    reserve_reads: int
    budget_failed_ports: int
    linger_timeouts: int
    listeners_open: int
    unix_listeners_open: int
    unix_streams: int
    tcp_streams: int
    tcp_listeners_open: int
    busy_streams: int
    msgq_paused_streams: int
    budget_paused_streams: int
    ports_open: int
    internal_errors: int
    wakes_sent: int
    wakes_skipped: int
    failure: str | None
    backend: str
    uring_enters: int
    uring_submissions: int
    io_uring_failure: str | None
    def __init__(
        self,
        table_size: int,
        backend: str | None = None,
        memory_limit: int | None = None,
        port_buffer_limit: int | None = None,
    ) -> None: ...
    def memory_in_use(self) -> int: ...
    def own_memory_in_use(self) -> int: ...
    def set_external_in_use(self, bytes: int) -> None: ...
    thread_id: int
    def host(
        self,
        run_round: Callable[[], float | None],
        stop_hosted: Callable[[], None],
        poller_fd: int,
        send_hosted: Callable[[Any, bytes], None],
    ) -> None: ...
    def start(self) -> None: ...
    def close_commands(self) -> None: ...
    def join(self) -> None: ...
    def is_alive(self) -> bool: ...
    def new_inbox(self, stop_target: Any) -> Inbox: ...
    def send(self, conn: Any, data: bytes) -> None: ...
    def send_within(self, conn: Conn, data: bytes, high_watermark: int) -> bool: ...
    def close(self, conn: Conn | None, argument: Any) -> None: ...
    def send_eof(self, conn: Conn | None, argument: Any) -> None: ...
    def set_active(self, conn: Conn | None, mode: tuple[int, bool]) -> None: ...
    def read_once(self, conn: Conn | None, argument: Any) -> None: ...
    def resume(self, conn: Conn | None, generation: int) -> None: ...
    def want(self, conn: Conn | None, argument: Any) -> None: ...
    def owner(self, conn: Conn | None, cell: OwnerCell | None) -> None: ...
    def want_owner(self, cell: OwnerCell, argument: Any) -> None: ...
    def stop(self, target: Any, argument: Any) -> None: ...
    def abort(self, conn: Conn, reason: str) -> None: ...
    def _fail_for_test(self) -> None:
        """A test hook (private): make the native thread panic."""
    def _hold_for_test(self) -> Hold:
        """A test hook (private): stop the native thread until the hold is released."""
    @staticmethod
    def defer_wakes() -> None: ...
    @staticmethod
    def flush_wakes() -> None: ...
    def connect(
        self,
        request: Any,
        port: Any,
        window: WindowCounters,
        inbox: Inbox,
        host: str,
        port_number: int,
        flowinfo: int,
        scope_id: int,
        options: Mapping[str, Any],
        active: tuple[int, bool],
    ) -> None: ...
    def listen(
        self,
        request: Any,
        listener: Any,
        make_port: Any,
        inbox: Inbox,
        sock: socket.socket,
        options: Mapping[str, Any],
        active: tuple[int, bool],
    ) -> None: ...
    def connect_unix(
        self,
        request: Any,
        port: Any,
        window: WindowCounters,
        inbox: Inbox,
        path: bytes,
        given: str | bytes,
        options: Mapping[str, Any],
        active: tuple[int, bool],
    ) -> None: ...
    def adopt_stream(
        self,
        request: Any,
        port: Any,
        window: WindowCounters,
        inbox: Inbox,
        sock: socket.socket,
        given: object,
        options: Mapping[str, Any],
        active: tuple[int, bool],
    ) -> None: ...
    def listen_unix(
        self,
        request: Any,
        listener: Any,
        make_port: Any,
        inbox: Inbox,
        sock: socket.socket,
        path: str | bytes,
        file: tuple[bytes, tuple[int, int]] | None,
        options: Mapping[str, Any],
        active: tuple[int, bool],
    ) -> None: ...
