"""``ioserver serve --metrics HOST:PORT``: the status figures for Prometheus.

An HTTP endpoint (``prometheus_client``'s server, in a thread of its own) answers
``GET /metrics`` in the Prometheus text format (or OpenMetrics, when the scraper asks for
it).  Each scrape asks the daemon for its status over its own control endpoint, as
``ioserver status`` does - so the figures are the ones ``ioserver status`` prints, read on
the I/O thread, never from another thread, and the supervisor of ``--workers`` answers
with every worker's (label ``worker``).  A worker that does not answer has
``ioserver_up 0``; figures are not invented for it.

The endpoint shows how busy the daemon is to anyone who can connect: like the control
endpoint, it binds a loopback address unless ``--metrics-allow-remote`` says otherwise.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable, Iterator
from typing import Any

from ._exceptions import OptionError

__all__ = ["COUNTERS", "GAUGES", "MetricsServer", "StatusCollector", "parse_address"]

log = logging.getLogger("ioserver")

#: Status keys that only grow, as ``ioserver_<name>_total`` counters: (key, help).
COUNTERS = [
    ("bytes_in", "Bytes read from the sockets of the daemon's ports."),
    ("bytes_out", "Bytes written to the sockets of the daemon's ports."),
    ("clients_lost", "Client sessions ended because the client went silent."),
    ("clients_refused", "Client greetings refused at the --max-sessions limit."),
    ("client_queue_holds", "Times a client's ports stopped reading at --session-queue."),
    ("names_resolved", "Host names resolved for clients' connects."),
    ("faults", "Malformed or refused client requests answered with a FAULT."),
    ("faults_unanswered", "Client faults past the per-frame limit, not answered."),
    ("internal_errors", "Errors inside the I/O thread, survived (each is a bug)."),
    ("linger_timeouts", "Closed ports reset, their output unwritten within linger."),
]
#: Status keys that go up and down, as ``ioserver_<name>`` gauges: (key, metric, help).
GAUGES = [
    ("ports_open", "ports_open", "Ports open in the I/O thread, every kind."),
    ("bytes_queued_out", "queued_out_bytes", "Bytes queued for writing on TCP ports."),
    ("memory_in_use", "memory_in_use_bytes", "Bytes charged to the memory budget."),
    ("busy_ports", "busy_ports", "Ports whose queued output is over the low watermark."),
    ("paused_ports", "paused_ports", "Ports that stopped reading (flow control)."),
    ("command_queue_depth", "command_queue_depth", "Commands waiting for the I/O thread."),
    ("event_queue_depth", "event_queue_depth", "Events waiting for the event loops."),
    ("clients", "clients", "Client sessions open."),
    ("client_ports", "client_ports", "Ports open for clients."),
    ("clients_held", "clients_held", "Clients whose ports stopped reading (session queue)."),
    ("client_bytes_queued", "client_queued_bytes", "Bytes queued in the daemon for clients."),
    ("uptime", "uptime_seconds", "Seconds since the daemon started."),
]
#: The wake-up counters: (key, direction, outcome).
WAKES = [
    ("wakes_to_io_sent", "to_io", "sent"),
    ("wakes_to_io_skipped", "to_io", "skipped"),
    ("wakes_to_loops_sent", "to_loops", "sent"),
    ("wakes_to_loops_skipped", "to_loops", "skipped"),
]


def parse_address(text: str, *, allow_remote: bool = False) -> tuple[str, int]:
    """``HOST:PORT``, ``[IPv6]:PORT`` or ``PORT`` (on 127.0.0.1) as ``(host, port)``.

    Raises:
        OptionError: not that form, a host that is not a numeric address (or
            ``localhost``), a port outside 0-65535, or an address that is not loopback
            without ``allow_remote``.
    """
    host, colon, port_text = text.rpartition(":")
    if not colon:
        host, port_text = "127.0.0.1", text
    host = host.strip("[]")
    if host == "localhost":
        host = "127.0.0.1"
    try:
        port = int(port_text)
        address = ipaddress.ip_address(host)
    except ValueError:
        raise OptionError(
            f"--metrics takes HOST:PORT with a numeric address (127.0.0.1:9100), not {text!r}"
        ) from None
    if not 0 <= port <= 65535:
        raise OptionError(f"--metrics: port {port} is out of range")
    if not address.is_loopback and not allow_remote:
        raise OptionError(
            f"refusing to serve metrics on {text} (not a loopback address): anyone who "
            "can connect would see them; pass --metrics-allow-remote if you mean it"
        )
    return host, port


class StatusCollector:
    """A ``prometheus_client`` collector: each ``collect()`` calls ``status()`` (the
    daemon's status: ``{"workers": [...]}`` or one worker's dict) and yields its figures,
    labelled by worker (``"0"`` for a daemon without ``--workers``)."""

    def __init__(self, status: Callable[[], dict[str, Any]]) -> None:
        self.status = status
        # Imported now, not at the first scrape: a daemon out of file descriptors then
        # could not read the module, and answered 500 with a traceback in its log.
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        self._families = CounterMetricFamily, GaugeMetricFamily

    def collect(self) -> Iterator[Any]:
        CounterMetricFamily, GaugeMetricFamily = self._families

        up = GaugeMetricFamily(
            "ioserver_up",
            "1 if the worker answered this scrape's status request.",
            labels=["worker"],
        )
        try:
            status = self.status()
        except Exception as exc:  # the daemon is not answering: say so, invent nothing
            log.warning("metrics: no status from the daemon: %s", exc)
            up.add_metric([""], 0)
            yield up
            return
        workers = status.get("workers", [status])
        counters = {
            key: CounterMetricFamily(f"ioserver_{key}", text, labels=["worker"])
            for key, text in COUNTERS
        }
        gauges = {
            key: GaugeMetricFamily(f"ioserver_{name}", text, labels=["worker"])
            for key, name, text in GAUGES
        }
        kinds = GaugeMetricFamily(
            "ioserver_ports", "Ports open, by kind.", labels=["worker", "kind"]
        )
        wakes = CounterMetricFamily(
            "ioserver_wakes",
            "Wake-ups of the I/O thread (to_io) and of the event loops (to_loops): sent, or "
            "skipped because the other side was awake.",
            labels=["worker", "direction", "outcome"],
        )
        pollers = GaugeMetricFamily(
            "ioserver_poller",
            "1 for the selector backend the worker's I/O thread uses (epoll, poll, select).",
            labels=["worker", "poller"],
        )
        restarts = CounterMetricFamily(
            "ioserver_worker_restarts",
            "Times the supervisor restarted the worker.",
            labels=["worker"],
        )
        for index, worker in enumerate(workers):
            label = str(worker.get("worker") if worker.get("worker") is not None else index)
            up.add_metric([label], 0 if "error" in worker else 1)
            if "restarts" in worker:
                restarts.add_metric([label], worker["restarts"])
            if "error" in worker:
                continue
            for key, family in counters.items():
                if isinstance(worker.get(key), (int, float)):
                    family.add_metric([label], worker[key])
            for key, gauge in gauges.items():
                if isinstance(worker.get(key), (int, float)):
                    gauge.add_metric([label], worker[key])
            if isinstance(worker.get("poller"), str):
                pollers.add_metric([label, worker["poller"]], 1)
            for kind, count in (worker.get("ports_by_kind") or {}).items():
                kinds.add_metric([label, str(kind)], count)
            for key, direction, outcome in WAKES:
                if isinstance(worker.get(key), (int, float)):
                    wakes.add_metric([label, direction, outcome], worker[key])
        yield up
        yield kinds
        yield pollers
        yield wakes
        yield from counters.values()
        yield from gauges.values()
        if "supervisor" in status:
            yield restarts


#: Connections the endpoint serves at once, each in a thread of its own.  A new one past
#: it cuts the oldest that has not finished its request: connections that never finish
#: theirs (slowloris) hold at most this many threads, and a scraper still gets in.
MAX_CONNECTIONS = 16
#: Seconds a connection may take, from its accept to the end of its answer (a scrape asks
#: the daemon with a 2 s timeout); past it, it is cut.
DEADLINE = 10.0
#: Bytes of request line and headers a request may have (a scraper sends a few hundred);
#: past it the answer is 431 (and the connection closed).
MAX_REQUEST = 16 * 1024


class _RequestTooLarge(Exception):
    pass


class _BoundedReader:
    """The handler's ``rfile``, handing out at most ``left`` bytes of lines before it
    raises :class:`_RequestTooLarge` (what a request's line and headers are read with)."""

    def __init__(self, raw: Any, left: int) -> None:
        self.raw = raw
        self.left = left

    def readline(self, limit: int = -1) -> bytes:
        want = self.left + 1 if limit < 0 else min(limit, self.left + 1)
        line: bytes = self.raw.readline(want)
        self.left -= len(line)
        if self.left < 0:
            raise _RequestTooLarge
        return line

    def read(self, size: int = -1) -> bytes:
        data: bytes = self.raw.read(size)
        return data

    def close(self) -> None:
        self.raw.close()


class _DebugLog:
    """A stream whose text goes to the log at DEBUG, a flush at a time."""

    def __init__(self) -> None:
        self.parts: list[str] = []

    def write(self, text: str) -> int:
        self.parts.append(text)
        return len(text)

    def flush(self) -> None:
        if self.parts:
            log.debug("metrics: %s", "".join(self.parts).rstrip())
            self.parts = []


def _handler_class(deadline: float) -> type[Any]:
    from wsgiref.simple_server import WSGIRequestHandler

    class Handler(WSGIRequestHandler):
        timeout = deadline  # each read and write of the connection's socket

        def setup(self) -> None:
            super().setup()
            self.rfile = _BoundedReader(self.rfile, MAX_REQUEST)  # type: ignore[assignment]

        def handle(self) -> None:
            try:
                super().handle()
            except _RequestTooLarge:
                self.requestline = self.request_version = self.command = ""
                self.close_connection = True
                self.send_error(431, f"the request line and headers are over {MAX_REQUEST} bytes")

        def log_message(self, format: str, *args: Any) -> None:
            """The daemon's log is not the scrapers' access log."""

        def get_stderr(self) -> Any:
            """Where wsgiref prints an error serving a request: the log, at DEBUG."""
            return _DebugLog()

    return Handler


def _server_class() -> type[Any]:
    import socket
    import threading
    import time
    from socketserver import ThreadingMixIn
    from wsgiref.simple_server import WSGIServer

    class Server(ThreadingMixIn, WSGIServer):
        """``prometheus_client``'s thread-per-connection server, bounded: at most
        ``max_connections`` at once (a new one cuts the oldest), each cut ``deadline``
        seconds after its accept, and a connection's failure is not a traceback in the
        daemon's log."""

        daemon_threads = True
        block_on_close = False
        max_connections = MAX_CONNECTIONS
        deadline = DEADLINE

        def server_activate(self) -> None:
            self.lock = threading.Lock()
            # The connections being served, with the time each was accepted.
            self.serving: dict[socket.socket, float] = {}
            super().server_activate()

        def process_request(self, request: Any, client_address: Any) -> None:
            with self.lock:
                if len(self.serving) >= self.max_connections:
                    oldest = min(self.serving, key=self.serving.__getitem__)
                    self._cut(oldest)
                self.serving[request] = time.monotonic()
            try:
                super().process_request(request, client_address)
            except BaseException:  # no thread for it: the caller closes it
                with self.lock:
                    self.serving.pop(request, None)
                raise

        def process_request_thread(self, request: Any, client_address: Any) -> None:
            try:
                self.finish_request(request, client_address)
            except Exception:
                self.handle_error(request, client_address)
            finally:
                # Out of the table before it is closed: a cut never meets a closed socket.
                with self.lock:
                    self.serving.pop(request, None)
                self.shutdown_request(request)

        def service_actions(self) -> None:
            # serve_forever's loop, twice a second: cut the connections past the deadline.
            now = time.monotonic()
            with self.lock:
                for request, since in list(self.serving.items()):
                    if now - since > self.deadline:
                        self._cut(request)

        def _cut(self, request: socket.socket) -> None:
            """End a connection: its thread's read or write returns, and it ends (called
            with the lock held; the thread takes it out of the table)."""
            del self.serving[request]
            try:
                request.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

        def handle_error(self, request: Any, client_address: Any) -> None:
            log.debug("metrics: a connection from %s failed", client_address, exc_info=True)

    return Server


class MetricsServer:
    """The HTTP endpoint: ``prometheus_client``'s WSGI app on its own registry (none of
    the process's default collectors), served by a bounded thread-per-connection server
    (:data:`MAX_CONNECTIONS`, ``deadline``, :data:`MAX_REQUEST`) in a daemon thread;
    :meth:`close` stops it.

    Raises:
        OSError: the address cannot be bound (in use, not this host's).
    """

    def __init__(
        self,
        host: str,
        port: int,
        status: Callable[[], dict[str, Any]],
        *,
        deadline: float = DEADLINE,
    ) -> None:  # (deadline: shorter in tests)
        import socket
        import threading
        from wsgiref.simple_server import make_server

        from prometheus_client import CollectorRegistry, make_wsgi_app

        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(StatusCollector(status))
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        server_class = type(
            "MetricsHTTPServer",
            (_server_class(),),
            {"deadline": deadline, "address_family": family},
        )
        self.server: Any = make_server(
            host,
            port,
            make_wsgi_app(self.registry),
            server_class,
            handler_class=_handler_class(deadline),
        )
        self.thread = threading.Thread(
            target=self.server.serve_forever, name="ioserver-metrics", daemon=True
        )
        self.thread.start()
        self.address: tuple[str, int] = self.server.server_address[:2]
        where = f"[{host}]" if ":" in host else host
        log.info("metrics on http://%s:%d/metrics", where, self.address[1])

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)
        with self.server.lock:  # the connections still served end now, not at their deadline
            for request in list(self.server.serving):
                self.server._cut(request)
