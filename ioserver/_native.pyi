"""Types of the native I/O core's extension module (native/src/py.rs)."""

from typing import Any

__version__: str

class WindowCounters:
    consumed_bytes: int
    consumed_messages: int
    queued_bytes: int
    send_blocked: bool
    def __init__(self, *args: Any, **kwargs: Any) -> None: ...

class Conn:
    closed: bool
    bytes_in: int
    bytes_out: int
    out_bytes: int
    delivered_bytes: int
    delivered_messages: int
    pause_generation: int
    pauses: int
    peak_buffered: int
    global_paused: bool
    held_bytes: int
    packets_too_large: int
    def drained(self) -> bool: ...

class Inbox:
    wakeup: Inbox
    wakes_sent: int
    wakes_skipped: int
    spurious_wakes: int
    asleep: bool
    def fileno(self) -> int: ...
    def drain(self) -> bool: ...
    def prepare_to_sleep(self) -> bool: ...
    def woke(self) -> None: ...
    def take(self) -> list[tuple[Any, Any]]: ...
    def stage(self, item: Any) -> None: ...
    def close(self) -> None: ...

class Core:
    polls: int
    events: int
    commands_run: int
    bytes_in: int
    bytes_out: int
    delivered_bytes: int
    bytes_discarded: int
    ports_open: int
    internal_errors: int
    wakes_sent: int
    wakes_skipped: int
    failure: str | None
    def __init__(self, table_size: int) -> None: ...
    def start(self) -> None: ...
    def close_commands(self) -> None: ...
    def join(self) -> None: ...
    def is_alive(self) -> bool: ...
    def new_inbox(self, stop_target: Any) -> Inbox: ...
    def send(self, conn: Conn, data: bytes) -> None: ...
    def close(self, conn: Conn | None, argument: Any) -> None: ...
    def send_eof(self, conn: Conn | None, argument: Any) -> None: ...
    def set_active(self, conn: Conn | None, mode: tuple[int, bool]) -> None: ...
    def read_once(self, conn: Conn | None, argument: Any) -> None: ...
    def resume(self, conn: Conn | None, generation: int) -> None: ...
    def want(self, conn: Any, argument: Any) -> None: ...
    def stop(self, target: Any, argument: Any) -> None: ...
    def fail_for_test(self) -> None: ...
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
        options: dict[str, Any],
        active: tuple[int, bool],
    ) -> None: ...
    def listen(
        self,
        request: Any,
        listener: Any,
        make_port: Any,
        inbox: Inbox,
        fd: int,
        options: dict[str, Any],
        active: tuple[int, bool],
    ) -> None: ...
