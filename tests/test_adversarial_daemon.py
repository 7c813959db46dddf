"""The daemon's protocol surface against a hostile client (issue 12, items 5, 6 and 7).

Every test runs a real ``ioserver serve`` subprocess with the echo app, speaks to its
control endpoint through bare ZeroMQ DEALER sockets crafted by hand, and checks that the
attack is refused cheaply - bounded answers, bounded memory, nobody in another session -
while the echo app in the same daemon still answers.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
import zmq.auth
from test_daemon import Daemon, free_port

from ioserver import _protocol as P
from ioserver._status import query_status

HEARTBEAT = 0.2  # seconds: a client silent for 0.6 s is lost
MAX_FRAME = 256 * 1024
SESSION_QUEUE = 1024 * 1024
MAX_SESSIONS = 6
MAX_PORTS = 8


class Served:
    """A daemon with the echo app; its endpoint and the echo's TCP port."""

    def __init__(self, tmp_path: Path, heartbeat: float = HEARTBEAT, *more: str) -> None:
        self.endpoint = f"ipc://{tmp_path}/run/control"
        self.echo_port = free_port()
        self.daemon = Daemon(
            "--endpoint",
            self.endpoint,
            "--heartbeat",
            str(heartbeat),
            "--max-frame",
            str(MAX_FRAME),
            "--session-queue",
            str(SESSION_QUEUE),
            "--max-sessions",
            str(MAX_SESSIONS),
            "--max-ports",
            str(MAX_PORTS),
            *more,
            "--app",
            f"examples/echo.py --port {self.echo_port}",
            ready="echo listening on",
        )
        self.context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()

    def echo_answers(self) -> None:
        """The echo app in the same daemon answers within 5 s."""
        with socket.create_connection(("127.0.0.1", self.echo_port), timeout=5) as connection:
            connection.sendall(b"still there?")
            received = b""
            while len(received) < 12:
                chunk = connection.recv(100)
                assert chunk, "the echo app closed the connection"
                received += chunk
            assert received == b"still there?"

    def status(self) -> dict[str, Any]:
        return query_status(self.endpoint, timeout=10)

    def raw(self, routing_id: bytes | None = None) -> RawClient:
        return RawClient(self.context, self.endpoint, routing_id)


class RawClient:
    """A bare DEALER socket: says and reads exactly what the test tells it."""

    def __init__(
        self, context: zmq.Context[zmq.Socket[bytes]], endpoint: str, routing_id: bytes | None
    ) -> None:
        self.sock = context.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        if routing_id is not None:
            self.sock.setsockopt(zmq.ROUTING_ID, routing_id)
        self.sock.connect(endpoint)
        self.token: bytes | None = None

    def send(self, messages: list[Any], token: Any = "session") -> None:
        self.sock.send(P.pack(messages, self.token if token == "session" else token))

    def receive(self, timeout: float = 10.0) -> list[Any]:
        assert self.sock.poll(int(timeout * 1000)), "no answer from the daemon"
        return P.unpack(self.sock.recv())

    def hello(self) -> dict[str, Any]:
        self.send([[P.HELLO, P.VERSION]], token=None)
        for message in self.receive():
            if message[0] == P.WELCOME:
                self.token = message[1]["token"]
                return dict(message[1])
        raise AssertionError("no WELCOME")

    def until(self, predicate: Any, timeout: float = 10.0) -> list[list[Any]]:
        """Every message received up to and including the first that ``predicate`` takes."""
        seen: list[list[Any]] = []
        deadline = time.monotonic() + timeout
        while True:
            for message in self.receive(max(deadline - time.monotonic(), 0.01)):
                seen.append(message)
                if predicate(message):
                    return seen

    def close(self) -> None:
        self.sock.close(linger=0)


@pytest.fixture
def served(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Served]:
    server = Served(tmp_path, getattr(request, "param", HEARTBEAT))
    try:
        yield server
    finally:
        server.context.destroy(linger=0)
        status = server.daemon.stop()
    assert status == 0, server.daemon.log


def marker(rid: int) -> list[Any]:
    """A request answered at once with a FAULT carrying ``rid``: an end-of-answers mark."""
    return [P.CONNECT, rid, 1, 2, ["127.0.0.1", 9], {"speed": 1}, -1, False]


def is_mark(rid: int) -> Any:
    return lambda message: message[0] == P.FAULT and message[1] == rid


def test_frames_past_the_limits_are_refused_before_they_are_decoded(served: Served) -> None:
    raw = served.raw()
    # 64k messages in one frame pass max_messages: one FAULT for the frame, no message run.
    raw.send([[P.HEARTBEAT]] * (P.MAX_MESSAGES + 1), token=None)
    answer = raw.receive()
    assert [(m[0], m[2]) for m in answer] == [(P.FAULT, "malformed")], answer[:3]
    assert "max_array_len" in answer[0][3]
    # A frame larger than --max-frame: ZeroMQ drops the connection, nothing is decoded or
    # answered; the DEALER reconnects and its next frame is served as the first.
    big = [[P.STATUS, rid] for rid in range(P.MAX_MESSAGES)]
    assert len(P.pack(big)) > MAX_FRAME
    raw.send(big, token=None)
    info = raw.hello()  # its first answer is the WELCOME: the big frame got none
    assert info["max_frame"] == MAX_FRAME and info["max_messages"] == P.MAX_MESSAGES
    raw.close()
    served.echo_answers()
    assert served.status()["faults"] == 1


def test_a_flood_of_status_and_refusals_gets_bounded_answers(served: Served) -> None:
    raw = served.raw()
    raw.hello()
    started = time.monotonic()
    for _ in range(20):
        raw.send([[P.STATUS, rid] for rid in range(20_000)])
    raw.send([marker(999_999)])
    answers = raw.until(is_mark(999_999))
    elapsed = time.monotonic() - started
    statuses = [m for m in answers if m[0] == P.STATUS_REPLY]
    faults = [m for m in answers if m[0] == P.FAULT and m[1] != 999_999]
    # Per frame: at most 4 STATUS answered in its round, 16 refusals, one "the rest is
    # ignored" - not 400,000 answers of a table scan each.
    assert 1 <= len(statuses) <= 4 * 20, len(statuses)
    assert len(faults) <= 17 * 20, len(faults)
    assert {m[2] for m in faults} <= {"limit"}
    assert elapsed < 5, f"the flood took {elapsed:.1f} s to refuse"
    # A refusal flood of bad messages: 16 refused, the rest ignored, one line of log each.
    raw.send([[99, n] for n in range(50_000)])
    raw.send([marker(1_000_000)])
    answers = raw.until(is_mark(1_000_000))
    kinds = [m[2] for m in answers if m[0] == P.FAULT and m[1] != 1_000_000]
    assert kinds == ["unknown-opcode"] * 16 + ["limit"], kinds[-3:]
    raw.close()
    served.echo_answers()
    # The log says a few refusals a second and how many it did not log - not 50,000 lines.
    served.daemon.wait_for("more refused messages were not logged")
    assert served.daemon.log.count("refused a message from") <= 40


def test_host_names_are_resolved_off_the_io_thread(served: Served) -> None:
    raw = served.raw()
    raw.hello()
    with socket.create_server(("127.0.0.1", 0)) as server:
        number = server.getsockname()[1]
        raw.send([[P.CONNECT, 1, 1, 2, ["localhost", number], {}, -1, False]])
        answers = raw.until(lambda m: m[0] in (P.OK, P.FAILED, P.FAULT) and m[1] == 1)
        assert answers[-1][0] == P.OK, answers
        assert answers[-1][3] == ["127.0.0.1", number]
        peer, _ = server.accept()
        with peer:
            peer.sendall(b"via a name")
            data = raw.until(lambda m: m[0] == P.DATA)
            assert data[-1][1:] == [1, b"via a name"]
    raw.send([[P.CONNECT, 2, 2, 2, ["no-such-host.invalid", 80], {}, -1, False]])
    answers = raw.until(lambda m: m[0] in (P.OK, P.FAILED, P.FAULT) and m[1] == 2)
    assert answers[-1][0] == P.FAILED and answers[-1][2] == "ConnectError", answers[-1]
    assert str(answers[-1][4]).startswith("EAI_"), answers[-1]
    raw.close()
    served.echo_answers()
    assert served.status()["names_resolved"] == 1


@pytest.mark.parametrize("watermarks", ["unreachable", "default"])
def test_a_client_that_never_reads_gets_backpressure_not_memory(
    served: Served, watermarks: str
) -> None:
    raw = served.raw()
    raw.sock.setsockopt(zmq.RCVHWM, 1)
    raw.hello()
    stop = threading.Event()
    with socket.create_server(("127.0.0.1", 0)) as server:
        number = server.getsockname()[1]
        # Unreachable watermarks: its port never pauses for the owner, the session's queue
        # must stop it.  Default ones: the port pauses, the blind RESUMEs must not end it.
        options: dict[str, Any] = {}
        if watermarks == "unreachable":
            options = {"high_msgq_watermark": 1 << 50, "low_msgq_watermark": 1 << 49}
        raw.send([[P.CONNECT, 1, 1, 2, ["127.0.0.1", number], options, -1, False]])
        peer, _ = server.accept()

    def blind() -> None:
        # Heartbeats and RESUMEs claiming everything was taken, never a recv.
        generation = 0
        while not stop.wait(0.05):
            generation += 1
            raw.send([[P.RESUME, 1, generation, 1 << 60, 1 << 60], [P.HEARTBEAT]])

    resumer = threading.Thread(target=blind)
    resumer.start()
    pushed = 0
    try:
        with peer:
            peer.settimeout(2.0)
            block = b"x" * (1 << 20)
            try:
                while pushed < 96 << 20:
                    pushed += peer.send(block)
            except TimeoutError:
                pass  # the daemon stopped reading this peer: backpressure
            status = served.status()
            # 96 MiB went nowhere: the daemon held a few MiB, the kernel's buffers the rest.
            assert pushed < 48 << 20, f"the daemon took {pushed >> 20} MiB for a non-reader"
            if watermarks == "unreachable":
                # What waits for the client is charged, bounded by --session-queue plus what
                # one round reads (ZeroMQ's queue is bounded by its SNDHWM, 32 frames).
                assert status["clients_held"] == 1, status
                assert SESSION_QUEUE <= status["client_bytes_queued"] <= SESSION_QUEUE + (2 << 20)
            else:
                # A RESUME takes as consumed only what left the daemon: the port stays
                # paused with about a high watermark (256 KiB) queued, the session's queue
                # never fills.
                assert status["clients_held"] == 0 and status["paused_ports"] == 1, status
                assert 0 < status["client_bytes_queued"] <= 512 * 1024, status
            assert status["memory_in_use"] >= status["client_bytes_queued"]
            served.echo_answers()
    finally:
        stop.set()
        resumer.join()
        raw.close()


def test_a_client_that_never_reads_its_answers_is_dropped_not_grown_into(
    served: Served,
) -> None:
    """Answers that are not DATA (STATUS_REPLY, FAULT...) are not held by --session-queue:
    a client that asks and never reads them is dropped once REPLY_QUEUE bytes wait."""
    raw = served.raw()
    raw.sock.setsockopt(zmq.RCVHWM, 1)
    raw.hello()
    asks = [[P.STATUS, rid] for rid in range(4)] + [[99, n] for n in range(17)]
    deadline = time.monotonic() + 30
    try:
        while "of its answers wait unread" not in served.daemon.log:
            # Each frame costs the daemon about 0.6 KiB of answers that wait for nobody.
            assert time.monotonic() < deadline, "the daemon keeps the answers of a non-reader"
            for _ in range(100):
                raw.send(asks)
    finally:
        raw.close()
    status = served.status()
    assert status["clients_lost"] == 1 and status["clients"] == 1, status  # (the query's own)
    assert status["internal_errors"] == 0
    served.echo_answers()


# Heartbeats of 1 s: the orphaned session lives 3 s, time enough for the thief's attempts.
@pytest.mark.parametrize("served", [1.0], indirect=True)
def test_a_routing_id_does_not_open_another_clients_session(served: Served) -> None:
    victim = served.raw(b"victim")
    victim.hello()
    with socket.create_server(("127.0.0.1", 0)) as server:
        number = server.getsockname()[1]
        victim.send([[P.CONNECT, 1, 1, 2, ["127.0.0.1", number], {}, -1, False]])
        assert victim.until(lambda m: m[0] in (P.OK, P.FAULT, P.FAILED))[-1][0] == P.OK
        peer, _ = server.accept()
    victim.close()  # gone without BYE: its session is orphaned for three heartbeats
    thief = served.raw(b"victim")
    with peer:
        # ZeroMQ ignores a connection whose routing id is in use: until the ROUTER has
        # seen the victim go, connect again (a real thief would).
        for _ in range(50):
            thief.send([[P.SEND, 1, b"stolen"]], token=None)  # no token
            if thief.sock.poll(100):
                break
            thief.close()
            thief = served.raw(b"victim")
        answer = thief.receive()
        assert [(m[0], m[2]) for m in answer] == [(P.FAULT, "no-session")], answer
        assert "token" in answer[0][3]  # the session was there; the frame did not get in
        # A new HELLO without the token does not take the session over either.
        thief.send([[P.HELLO, P.VERSION], [P.SEND, 1, b"stolen"]], token=None)
        assert [(m[0], m[2]) for m in thief.receive()] == [(P.FAULT, "no-session")]
        thief.send([[P.SEND, 1, b"stolen"]], token=os.urandom(P.TOKEN_SIZE))
        assert [(m[0], m[2]) for m in thief.receive()] == [(P.FAULT, "no-session")]
        # The orphan is lost after three silent heartbeats: its port ends, nothing stolen.
        peer.settimeout(10)
        assert peer.recv(100) == b""
    thief.close()
    served.daemon.wait_for("lost (silent for")
    served.echo_answers()


@pytest.mark.parametrize(
    "message",
    [[], [[]], [[1]], [{}], [None], [b"\x0a"], [2.5], [True]],
    ids=["empty", "list", "list-opcode", "map", "nil", "bin", "float", "bool"],
)
def test_a_message_without_an_int_opcode_is_malformed_and_the_endpoint_serves_on(
    served: Served, message: list[Any]
) -> None:
    raw = served.raw()
    raw.hello()
    raw.send([message, marker(1)])
    answers = raw.until(is_mark(1))
    assert [(m[0], m[1], m[2]) for m in answers[:-1]] == [(P.FAULT, None, "malformed")], answers
    # The same client, another client, and the app: all served on.
    raw.send([[P.STATUS, 2]])
    (reply,) = raw.until(lambda m: m[0] == P.STATUS_REPLY)
    assert reply[2]["internal_errors"] == 0
    raw.close()
    served.echo_answers()
    assert served.status()["faults"] == 2


@pytest.fixture
def served_with_programs(tmp_path: Path) -> Iterator[Served]:
    server = Served(tmp_path, HEARTBEAT, "--allow-process")
    try:
        yield server
    finally:
        server.context.destroy(linger=0)
        status = server.daemon.stop()
    assert status == 0, server.daemon.log


UNHASHABLE: list[Any] = [[], ["inherit"], {}, {"a": 1}]


def test_an_unhashable_stderr_or_socket_type_is_a_bad_option_not_an_internal_error(
    served_with_programs: Served,
) -> None:
    served = served_with_programs
    raw = served.raw()
    raw.hello()
    requests = [
        [P.OPEN_PROCESS, rid, rid, ["true"], value, 1.0, {}, -1, False]
        for rid, value in enumerate(UNHASHABLE, 1)
    ] + [
        [P.OPEN_ZMQ, rid, rid, value, ["tcp://127.0.0.1:0"], [], [], {}, -1, False]
        for rid, value in enumerate(UNHASHABLE, 11)
    ]
    raw.send([*requests, marker(99)])
    answers = raw.until(is_mark(99))[:-1]
    assert [(m[0], m[2]) for m in answers] == [(P.FAULT, "bad-option")] * len(requests), answers
    raw.close()
    status = served.status()
    assert status["internal_errors"] == 0
    assert "error while serving" not in served.daemon.log
    served.echo_answers()


def test_out_of_descriptors_an_open_udp_fails_with_emfile_and_the_daemon_serves_on(
    served: Served,
) -> None:
    """A daemon out of file descriptors answers each open with FAILED ``EMFILE`` (typed,
    to the client that asked), and serves again once they are free."""
    import resource

    raw = served.raw()
    raw.hello()
    limits = _out_of_descriptors(served, raw)
    try:
        udp = 100
        raw.send([[P.OPEN_UDP, udp, udp, ["127.0.0.1", 0], None, {}, -1, False]])
        answer = raw.until(lambda m: m[0] in (P.OK, P.FAILED, P.FAULT) and m[1] in (udp, None))[-1]
        assert answer[0] == P.FAILED, answer
        assert answer[2:5] == ["ConnectError", 24, "EMFILE"], answer
        raw.send([[P.BYE]])
    finally:
        raw.close()
        resource.prlimit(served.daemon.process.pid, resource.RLIMIT_NOFILE, limits)
    status = served.status()
    assert status["internal_errors"] == 0, status
    served.echo_answers()


def _out_of_descriptors(served: Served, raw: RawClient) -> tuple[int, int]:
    """Lower the daemon's descriptor limit to a few more than it has, and take those few
    with LISTENs until one fails with EMFILE; the limits to restore."""
    import resource

    pid = served.daemon.process.pid
    room = len(os.listdir(f"/proc/{pid}/fd")) + 6
    limits = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (room, limits[1]))
    for rid in range(1, MAX_PORTS + 1):
        raw.send([[P.LISTEN, rid, rid, 2, ["127.0.0.1", 0], {}, -1, False]])
        answer = raw.until(lambda m, rid=rid: m[0] in (P.OK, P.FAILED, P.FAULT) and m[1] == rid)
        if answer[-1][0] != P.OK:
            assert answer[-1][0] == P.FAILED and answer[-1][3:5] == [24, "EMFILE"], answer
            return limits
    raise AssertionError(f"{MAX_PORTS} LISTENs and no EMFILE")


def test_out_of_descriptors_a_program_or_zeromq_socket_fails_with_emfile(
    served_with_programs: Served,
) -> None:
    """OPEN_PROCESS and OPEN_ZMQ in a daemon out of descriptors: FAILED ``EMFILE`` to the
    client that asked, within the test's wait - not a FAULT "internal", not no answer."""
    import resource

    served = served_with_programs
    raw = served.raw()
    raw.hello()
    limits = _out_of_descriptors(served, raw)
    try:
        opens = {
            100: [P.OPEN_PROCESS, 100, 100, ["true"], "inherit", 1.0, {}, -1, False],
            101: [P.OPEN_ZMQ, 101, 101, "PAIR", ["tcp://127.0.0.1:0"], [], None, {}, -1, False],
        }
        for rid, message in opens.items():
            raw.send([message])
            # (Heartbeats meanwhile: the session must not be lost while the test waits.)
            deadline = time.monotonic() + 10
            answer = None
            while answer is None:
                assert time.monotonic() < deadline, f"no answer to {message[:4]}"
                raw.send([[P.HEARTBEAT]])
                if raw.sock.poll(50):
                    for m in P.unpack(raw.sock.recv()):
                        if m[0] in (P.OK, P.FAILED, P.FAULT) and m[1] in (rid, None):
                            answer = m
            assert answer[0] == P.FAILED and answer[2:5] == ["ConnectError", 24, "EMFILE"], answer
        raw.send([[P.BYE]])
    finally:
        raw.close()
        resource.prlimit(served.daemon.process.pid, resource.RLIMIT_NOFILE, limits)
    status = served.status()
    assert status["internal_errors"] == 0, status
    served.echo_answers()


def test_a_flood_of_status_at_the_supervisor_does_not_stall_its_supervision(
    tmp_path: Path,
) -> None:
    """The supervisor answers STATUS by asking every worker: a client that sends frames of
    it faster than that must not keep the supervisor from seeing a worker die."""
    import re
    import signal

    endpoint = f"ipc://{tmp_path}/run/control"
    daemon = Daemon("--endpoint", endpoint, "--workers", "2", ready="daemon worker", count=2)
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    found = re.search(r"daemon worker 0 serving \S+ \(pid (\d+)", daemon.log)
    assert found is not None, daemon.log
    stop = threading.Event()
    flood = RawClient(context, endpoint, None)

    def flooding() -> None:
        frame = P.pack([[P.STATUS, 1]])
        while not stop.is_set():
            try:
                flood.sock.send(frame, zmq.NOBLOCK)
            except zmq.Again:  # its queue is full: the supervisor is behind
                stop.wait(0.001)

    thread = threading.Thread(target=flooding)
    thread.start()
    try:
        daemon.wait_for("ioserver daemon worker", count=2)  # (already there)
        os.kill(int(found.group(1)), signal.SIGKILL)
        daemon.wait_for("worker 0 (pid", timeout=10)  # "... died with status -9"
        status = query_status(endpoint, timeout=10)
        assert len(status["workers"]) == 2
    finally:
        stop.set()
        thread.join()
        flood.close()
        context.destroy(linger=0)
        assert daemon.stop() == 0, daemon.log


def test_sessions_and_ports_per_session_are_bounded(served: Served) -> None:
    clients = [served.raw() for _ in range(MAX_SESSIONS)]
    try:
        for each in clients:
            each.hello()
        late = served.raw()
        clients.append(late)
        late.send([[P.HELLO, P.VERSION]], token=None)
        assert [(m[0], m[2]) for m in late.receive()] == [(P.FAULT, "limit")]
        first = clients[0]
        first.send(
            [
                [P.LISTEN, rid, rid, 2, ["127.0.0.1", 0], {}, -1, False]
                for rid in range(1, MAX_PORTS + 2)
            ]
        )
        answers = first.until(lambda m: m[1] == MAX_PORTS + 1)
        assert sum(m[0] == P.OK for m in answers) == MAX_PORTS
        assert answers[-1][0] == P.FAULT and answers[-1][2] == "limit", answers[-1]
        for each in clients[:-1]:
            each.send([[P.BYE]])
    finally:
        for each in clients:
            each.close()
    served.echo_answers()


def test_under_curve_a_session_is_bound_to_its_clients_key(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    allowed = tmp_path / "allowed"
    keys.mkdir()
    allowed.mkdir()
    server_public, server_secret = zmq.auth.create_certificates(str(keys), "server")
    for name in ("alice", "mallory"):  # both allowed in: each may open its own session
        public, _ = zmq.auth.create_certificates(str(keys), name)
        os.replace(public, allowed / f"{name}.key")
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    daemon = Daemon(
        "--endpoint",
        endpoint,
        "--curve-secret-key",
        server_secret,
        "--curve-allowed-keys",
        str(allowed),
        "--heartbeat",
        "1.0",
    )
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()

    def dealer(name: str) -> RawClient:
        raw = RawClient.__new__(RawClient)
        raw.sock = context.socket(zmq.DEALER)
        raw.sock.setsockopt(zmq.LINGER, 0)
        raw.sock.setsockopt(zmq.ROUTING_ID, b"alice")
        public, secret = zmq.auth.load_certificate(str(keys / f"{name}.key_secret"))
        raw.sock.curve_serverkey, _ = zmq.auth.load_certificate(server_public)
        raw.sock.curve_publickey = public
        raw.sock.curve_secretkey = secret
        raw.sock.connect(endpoint)
        raw.token = None
        return raw

    try:
        alice = dealer("alice")
        alice.hello()
        with socket.create_server(("127.0.0.1", 0)) as server:
            number = server.getsockname()[1]
            alice.send([[P.CONNECT, 1, 1, 2, ["127.0.0.1", number], {}, -1, False]])
            assert alice.until(lambda m: m[0] in (P.OK, P.FAULT, P.FAILED))[-1][0] == P.OK
            peer, _ = server.accept()
        token = alice.token
        alice.close()
        with peer:
            # Mallory has alice's routing id and (leaked) token, not her key.
            mallory = dealer("mallory")
            for _ in range(50):
                mallory.send([[P.SEND, 1, b"stolen"]], token=token)
                if mallory.sock.poll(100):
                    break
                mallory.close()
                mallory = dealer("mallory")
            answer = mallory.receive()
            assert [(m[0], m[2]) for m in answer] == [(P.FAULT, "no-session")], answer
            mallory.close()
            peer.settimeout(10)
            assert peer.recv(100) == b""  # the orphan was lost; nothing was sent
    finally:
        context.destroy(linger=0)
        assert daemon.stop() == 0, daemon.log


@pytest.mark.anyio
async def test_the_client_cuts_its_frames_to_the_daemons_max_frame(
    served: Served, no_leaks: None
) -> None:
    import anyio

    import client
    import ports

    payload = os.urandom(3 * MAX_FRAME + 12345)  # one send, several frames' worth
    async with (
        client.connect(served.endpoint) as ios,
        await anyio.create_tcp_listener(local_host="127.0.0.1") as listener,
    ):
        number = listener.extra(anyio.abc.SocketAttribute.local_port)
        received = bytearray()
        complete = anyio.Event()

        async def serve(stream: anyio.abc.SocketStream) -> None:
            async with stream:
                while len(received) < len(payload):
                    received.extend(await stream.receive())
                complete.set()

        async with anyio.create_task_group() as group:
            group.start_soon(listener.serve, serve)
            async with await ports.connect_tcp(ios, "127.0.0.1", number) as port:
                with anyio.fail_after(10):
                    await port.send(payload)
                    await complete.wait()
            group.cancel_scope.cancel()
        assert bytes(received) == payload
        assert ios.daemon_info["max_frame"] == MAX_FRAME
    served.echo_answers()
