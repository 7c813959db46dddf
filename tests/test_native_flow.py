"""The native flow control and budget (``native/src/flow.rs``) against the Python ones.

The same random steps - deliveries, takes, pauses and resumes, active modes, owners that
park, budget rounds and reads - run on the Python rules (``ioserver._flow``'s
``ReceiveFlow`` and ``Window``, and its ``MemoryBudget``, with stubs that hold only what
they read) and on ``ioserver._native._FlowModel``; after
each step both must agree on every decision and counter.

The two rules the Rust port first found wrong in Python - a declined resume of the
current pause pauses again under a new generation, and a framed read takes its whole
charge off the round's headroom - are now the rules of both, so the Python side runs
unchanged.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ioserver._conn import STREAM
from ioserver._exceptions import PacketTooLarge
from ioserver._flow import MemoryBudget, ReceiveFlow, Window
from ioserver._framing import PACKET_OVERHEAD, make_framer
from ioserver._iothread import READ_SIZE, IOThread
from ioserver._messages import PASSIVE, Closed, Data, Error
from ioserver._native import _FlowModel
from ioserver._options import apply_active_mode

# No I/O core of $IOSERVER_CORE's choice (the flow and budget models alone): CI's second
# pass, on the Python core, leaves these tests out (tests/conftest.py checks the mark).
pytestmark = pytest.mark.core_independent


class _PyPort(ReceiveFlow):
    """A stream ``Conn``'s flow fields, as the I/O thread's methods read them."""

    __slots__ = ("closed", "credit", "global_paused", "notify_passive", "packet_overhead", "waits")

    def __init__(
        self, high: int, low: int, messages: int, active: tuple[int, bool], overhead: int
    ) -> None:
        window = Window()
        self.init_flow(window)
        options = {
            "high_msgq_watermark": high,
            "low_msgq_watermark": low,
            "high_msgq_messages": messages,
        }
        self.configure_flow(options, window)
        self.closed = False
        self.global_paused = False
        self.credit, self.notify_passive = active
        self.packet_overhead = overhead
        self.waits = False
        window.task_waits = self._task_waits

    def _task_waits(self) -> bool:
        return self.waits


class _PyBudget:
    """The Python core's :class:`~ioserver._flow.MemoryBudget`, with the counters it reads
    (``delivered_total``... as the I/O thread keeps them) and one owner (a hub's
    ``queued_bytes``/``consumed_bytes``)."""

    def __init__(self, limit: int) -> None:
        self.delivered_total = 0
        self.framing_bytes = 0
        self.bytes_out = 0
        self.bytes_discarded = 0
        self.bytes_forwarded = 0
        self.consumed = 0
        self.queued = 0
        self.headroom = 0
        self.budget: MemoryBudget[_PyPort] = MemoryBudget(
            limit, self, READ_SIZE, PACKET_OVERHEAD, lambda entry: None
        )
        self.budget.owners.append(self)

    @property
    def queued_bytes(self) -> int:
        return self.queued

    @property
    def consumed_bytes(self) -> int:
        return self.consumed

    @property
    def reserve_reads(self) -> int:
        return self.budget.reserve_reads

    @property
    def global_pauses(self) -> int:
        return self.budget.pauses

    @property
    def peak_memory(self) -> int:
        return self.budget.peak

    def memory_in_use(self) -> int:
        return self.budget.in_use()

    def begin_round(self) -> int:
        return self.budget.headroom()

    def want(self, conn: _PyPort) -> None:
        self.budget.want(conn)

    def admit_read(self, conn: _PyPort) -> tuple[int, bool] | None:
        """The read decision inlined in ``IOThread._run``."""
        headroom, budget = self.headroom, self.budget
        if headroom < budget.read_floor and budget.blocks(conn, headroom):
            return None
        if headroom < budget.packet_floor and conn.packet_overhead:
            return budget.packet_read_size(conn, headroom), True
        return READ_SIZE, False


def _py_deliver(budget: _PyBudget, conn: _PyPort, charges: list[int]) -> tuple[bool, bool, bool]:
    """``IOThread._deliver_payloads`` and the hot path's check point, for delivered packets."""
    count, size = len(charges), sum(charges)
    credit = conn.credit
    conn.delivered_messages += count
    conn.delivered_bytes += size
    budget.delivered_total += size
    turned = send = False
    if credit > 0:  # _spend_credit
        conn.credit = max(conn.credit - count, 0)
        if conn.credit == 0:
            turned, send = True, conn.notify_passive
    over = False
    if conn.delivered_bytes > conn.check_bytes or conn.delivered_messages > conn.check_messages:
        over = conn.check()
    return turned, send, over


class _Pair:
    """The same ports and budget on both sides, and the loop half's queues."""

    def __init__(self, limit: int, ports: list[tuple[int, int, int, tuple[int, bool], int]]):
        self.budget = _PyBudget(limit)
        self.native = _FlowModel(limit, None, READ_SIZE)
        self.ports: list[_PyPort] = []
        for high, low, messages, active, overhead in ports:
            self.ports.append(_PyPort(high, low, messages, active, overhead))
            self.native.add_port(high, low, messages, active, overhead)
        self.inboxes: list[deque[int]] = [deque() for _ in ports]
        self.resumes: list[deque[int]] = [deque() for _ in ports]
        self.wants: list[bool] = [False for _ in ports]
        self.new_round()

    def new_round(self) -> None:
        self.budget.headroom = self.budget.begin_round()
        headroom, _ = self.native.begin_round()
        assert headroom == self.budget.headroom

    def packets(self, index: int, charges: list[int]) -> None:
        """A read's packets (their charges come off the round's headroom, as a raw read's
        bytes do in Python)."""
        self.budget.headroom -= sum(charges)
        self.deliver(index, charges)

    def deliver(self, index: int, charges: list[int]) -> None:
        conn = self.ports[index]
        expected = _py_deliver(self.budget, conn, charges)
        assert self.native.deliver(index, charges) == expected
        self.inboxes[index].extend(charges)
        if expected[2]:  # over high: IOThread._pause_msgq
            started = conn.pause()
            assert self.native.pause(index) == started
            if started:
                assert self.native.recheck(index) == conn.recheck()

    def take(self, index: int) -> None:
        if not self.inboxes[index]:
            return
        charge = self.inboxes[index].popleft()
        conn = self.ports[index]
        window = conn.window
        window.consumed_messages += 1
        window.consumed_bytes += charge
        self.budget.consumed += charge
        expected = None
        if conn.pause_generation != window.resume_generation:
            expected = window.resume_due(conn)
        assert self.native.took(index, charge) == expected
        if expected is not None:
            self.resumes[index].append(expected)

    def resume(self, index: int) -> None:
        if not self.resumes[index]:
            return
        generation = self.resumes[index].popleft()
        conn = self.ports[index]
        resumed = conn.may_resume(generation)
        assert self.native.may_resume(index, generation) == resumed

    def park(self, index: int, waits: bool) -> None:
        conn = self.ports[index]
        conn.waits = waits
        want = waits and conn.global_paused  # Port._receive: the waiter, then the flag
        assert self.native.set_waiting(index, waits) == want
        if want:
            self.wants[index] = True

    def wait(self, index: int) -> None:
        """The owner takes everything delivered to it, then parks on the port."""
        while self.inboxes[index]:
            self.take(index)
        self.park(index, True)

    def want(self, index: int) -> None:
        if not self.wants[index]:
            return
        self.wants[index] = False
        conn = self.ports[index]
        was_paused = conn.global_paused
        self.budget.want(conn)
        assert self.native.want(index) == (was_paused and not conn.global_paused)

    def read(self, index: int, size: int) -> None:
        conn = self.ports[index]
        if not (conn.credit and not conn.msgq_paused and not conn.global_paused):
            return
        grant = self.budget.admit_read(conn)
        assert self.native.admit_read(index) == grant
        if grant is None:
            return
        limit, _ = grant
        n = min(limit, size)
        overhead = conn.packet_overhead
        charge = n + overhead
        self.budget.headroom -= charge
        self.deliver(index, [charge])

    def set_active(self, index: int, mode: tuple[int, bool]) -> None:
        conn = self.ports[index]
        credit, notify = apply_active_mode(conn.credit, conn.notify_passive, mode)
        conn.credit, conn.notify_passive = credit, notify
        assert self.native.set_active(index, mode) == (notify and not credit)

    def read_once(self, index: int) -> None:
        conn = self.ports[index]
        expected = conn.credit == 0
        if expected:
            conn.credit, conn.notify_passive = 1, False
        assert self.native.read_once(index) == expected

    def admit(self, index: int, count: int) -> None:
        credit = self.ports[index].credit
        expected = credit if 0 <= credit < count else count
        assert self.native.admit(index, count) == expected

    def output(self, queued: int, written: int) -> None:
        self.budget.queued += queued
        self.native.queued(queued)
        written = min(written, self.budget.queued - self.budget.bytes_out)
        self.budget.bytes_out += written
        self.native.wrote(written)

    def compare(self) -> None:
        for index, conn in enumerate(self.ports):
            window = conn.window
            may_read = bool(conn.credit) and not conn.msgq_paused and not conn.global_paused
            assert self.native.state(index) == (
                conn.pause_generation,
                conn.msgq_paused,
                conn.global_paused,
                conn.credit,
                (conn.delivered_bytes, conn.delivered_messages),
                (window.consumed_bytes, window.consumed_messages),
                conn.pauses,
                may_read,
            ), index
        assert self.native.in_use() == self.budget.memory_in_use()
        budget = self.budget
        assert self.native.stats() == (
            budget.reserve_reads,
            budget.global_pauses,
            budget.peak_memory,
        )


_MODES = st.one_of(
    st.sampled_from([(-1, False), (0, False), (1, False)]),
    st.tuples(st.integers(-2, 5), st.just(True)),
)
_PORT = st.integers(0, 2)
_STEPS = st.lists(
    st.one_of(
        st.tuples(st.just("packets"), _PORT, st.lists(st.integers(1, 40_000), max_size=3)),
        st.tuples(st.just("read"), _PORT, st.integers(1, READ_SIZE)),
        st.tuples(st.just("read"), _PORT, st.just(READ_SIZE)),
        st.tuples(st.just("take"), _PORT),
        st.tuples(st.just("take"), _PORT),
        st.tuples(st.just("resume"), _PORT),
        st.tuples(st.just("park"), _PORT, st.booleans()),
        st.tuples(st.just("want"), _PORT),
        st.tuples(st.just("wait"), _PORT),
        st.tuples(st.just("round")),
        st.tuples(st.just("set_active"), _PORT, _MODES),
        st.tuples(st.just("read_once"), _PORT),
        st.tuples(st.just("admit"), _PORT, st.integers(0, 6)),
        st.tuples(st.just("output"), st.integers(0, 100_000), st.integers(0, 100_000)),
    ),
    min_size=20,
    max_size=150,
)
_WATERMARKS = st.one_of(
    st.tuples(st.integers(1, 300_000), st.integers(1, 64)),
    st.tuples(st.sampled_from([256 * 1024, 1 << 20, 1 << 62]), st.sampled_from([4096, 1 << 62])),
).map(lambda marks: (marks[0], marks[0] // 2, marks[1]))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    limit=st.one_of(
        st.sampled_from([256 * 1024, 300 * 1024, 512 * 1024, 16 * 1024 * 1024]),
        st.integers(256 * 1024, 20 * 1024 * 1024),
    ),
    marks=st.lists(_WATERMARKS, min_size=3, max_size=3),
    actives=st.lists(st.one_of(st.just((-1, False)), _MODES), min_size=3, max_size=3),
    steps=_STEPS,
)
def test_flow_and_budget_decide_as_python_s(
    limit: int,
    marks: list[tuple[int, int, int]],
    actives: list[tuple[int, bool]],
    steps: list[tuple[Any, ...]],
) -> None:
    overheads = [0, PACKET_OVERHEAD, 0]  # a raw port, a framed one, a daemon's
    pair = _Pair(
        limit,
        [(*marks[i], actives[i], overheads[i]) for i in range(3)],
    )
    pair.compare()
    for step in steps:
        name, *args = step
        if name == "round":
            pair.new_round()
        else:
            getattr(pair, name)(*args)
        pair.compare()


_BUDGET_STEPS = st.lists(
    st.one_of(
        st.tuples(st.just("read"), _PORT, st.just(READ_SIZE)),
        st.tuples(st.just("read"), _PORT, st.integers(1, READ_SIZE)),
        st.tuples(st.just("take"), _PORT),
        st.tuples(st.just("wait"), _PORT),
        st.tuples(st.just("park"), _PORT, st.booleans()),
        st.tuples(st.just("want"), _PORT),
        st.tuples(st.just("round")),
        st.tuples(st.just("output"), st.integers(0, 100_000), st.integers(0, 100_000)),
    ),
    min_size=20,
    max_size=150,
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    limit=st.sampled_from([256 * 1024, 300 * 1024, 400 * 1024, 1 << 20]),
    steps=_BUDGET_STEPS,
)
def test_the_budget_s_reserve_decides_as_python_s(limit: int, steps: list[tuple[Any, ...]]) -> None:
    """Budget pauses, the reserve for waiting owners, reserve waiters and ``cmd_want``:
    ports that read freely (no watermark), so that the budget is what stops them."""
    none = 1 << 62
    overheads = [0, PACKET_OVERHEAD, 0]
    pair = _Pair(limit, [(none, none, none, (-1, False), overheads[i]) for i in range(3)])
    for step in steps:
        name, *args = step
        if name == "round":
            pair.new_round()
        else:
            getattr(pair, name)(*args)
        pair.compare()


def test_a_declined_resume_is_asked_again() -> None:
    """The stall the Python rule leaves: the owner asked to resume while a grant delivered
    held packets; the I/O half declined; the owner takes everything and the port must
    read again."""
    native = _FlowModel(None, None, READ_SIZE)
    native.add_port(10, 5, 1000, (1, False), 0)
    assert native.deliver(0, [11])[2]
    assert native.pause(0) and not native.recheck(0)
    generation = native.took(0, 11)
    assert generation is not None
    assert native.read_once(0)
    native.deliver(0, [12])  # a held packet, delivered by the grant
    assert not native.may_resume(0, generation)
    again = native.took(0, 12)
    assert again == generation + 1
    assert native.may_resume(0, again)
    assert not native.state(0)[1]  # no longer paused


# -- framed reads end to end: framing, charges, held packets, credit and pauses ---------------


class _PyConn(_PyPort):
    """A framed stream ``Conn``'s fields, as the I/O thread's delivery methods read them."""

    __slots__ = ("deliver", "events", "framer", "held", "held_bytes", "kind", "port", "sizes")
    __slots__ += ("packets_too_large",)

    def __init__(
        self,
        marks: tuple[int, int, int],
        active: tuple[int, bool],
        packet: Any,
        packet_size: int,
    ) -> None:
        super().__init__(*marks, active, PACKET_OVERHEAD)
        self.framer = make_framer(packet, packet_size=packet_size)
        self.sizes: deque[int] = deque()
        self.held: deque[tuple[Any, int]] | None = None
        self.held_bytes = 0
        self.port = None
        self.events: list[tuple[Any, Any]] = []
        self.deliver = self.events.append
        self.kind = STREAM
        self.packets_too_large = 0


class _PyIO:
    """The I/O thread's delivery methods, on what they read of it."""

    _deliver_framed = IOThread._deliver_framed
    _deliver_payloads = IOThread._deliver_payloads
    _spend_credit = IOThread._spend_credit
    _deliver_held = IOThread._deliver_held
    _frame_error = IOThread._frame_error
    _buffer_limit_error = IOThread._buffer_limit_error
    _check_msgq = IOThread._check_msgq
    _pause_msgq = IOThread._pause_msgq
    cmd_set_active = IOThread.cmd_set_active
    cmd_read_once = IOThread.cmd_read_once

    def __init__(self, port_buffer_limit: int | None) -> None:
        self.port_buffer_limit = port_buffer_limit
        self.message_cap = None  # (no memory_limit, as the native model below)
        self.delivered_total = 0
        self.framing_bytes = 0
        self.consumed = 0
        self._view = memoryview(b"")

    def _stream_interest(self, conn: Any) -> None:
        pass

    def _close(self, conn: _PyConn) -> None:
        conn.closed = True
        # (An unfinished packet is charged its bytes only: IOThread._close.)
        self.framing_bytes -= conn.framer.buffered + conn.held_bytes
        conn.held = None
        conn.held_bytes = 0

    def read(self, conn: _PyConn, data: bytes) -> None:
        """A framed read, as the round of ``IOThread._run`` makes it."""
        n = len(data)
        self._view = memoryview(data)
        if self._deliver_framed(conn, n) and (
            conn.delivered_bytes > conn.check_bytes or conn.delivered_messages > conn.check_messages
        ):
            self._check_msgq(conn)
        self.delivered_total += n  # the round's `received`


def _py_events(conn: _PyConn) -> list[tuple[Any, ...]]:
    """What the owner was sent since the last look, with each message's charge."""
    events: list[tuple[Any, ...]] = []
    for _, message in conn.events:
        if message is PASSIVE:
            events.append(("passive",))
        elif isinstance(message, Data):
            events.append(("data", conn.sizes.popleft()))
        elif isinstance(message, Error):
            events.append(("error", message.errno_name, message.message))
        else:
            assert isinstance(message, Closed)
            events.append(("closed", message.reason))
    conn.events.clear()
    return events


def _native_events(charges: list[int], passive_after: bool) -> list[tuple[Any, ...]]:
    events: list[tuple[Any, ...]] = [("data", charge) for charge in charges]
    if passive_after:
        events.append(("passive",))
    return events


_FRAMED_MODES = st.sampled_from([("line", 30), (1, 20), (2, 40), ("resp", 60), ("msgpack", 50)])


@st.composite
def _framed_stream(draw: st.DrawFn, packet: Any) -> bytes:
    if packet == "line":
        pieces = st.one_of(st.binary(max_size=12), st.just(b"\n"))
    elif packet in (1, 2):
        pieces = st.one_of(
            st.binary(max_size=50).map(lambda b: len(b).to_bytes(packet, "big") + b),
            st.binary(max_size=3),
        )
    elif packet == "resp":
        pieces = st.one_of(
            st.lists(st.binary(max_size=6), min_size=1, max_size=3).map(
                lambda args: (
                    b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%b\r\n" % (len(a), a) for a in args)
                )
            ),
            st.sampled_from([b"PING\r\n", b"GET k\n", b"*0\r\n", b"*x\r\n", b"$1\r\n"]),
        )
    else:
        pieces = st.one_of(
            st.recursive(
                st.one_of(st.integers(-5, 300), st.binary(max_size=20), st.none()),
                lambda children: st.lists(children, max_size=4),
                max_leaves=8,
            ).map(lambda value: msgpack.packb(value, use_bin_type=True)),
            st.sampled_from([b"\xc1", b"\xa1\xff", b"\xdb\xff\xff\xff\xff"]),
        )
    return b"".join(draw(st.lists(pieces, max_size=12)))


_FRAMED_STEPS = st.lists(
    st.one_of(
        st.tuples(st.just("read"), st.integers(1, 40)),
        st.tuples(st.just("take")),
        st.tuples(st.just("take")),
        st.tuples(st.just("resume")),
        st.tuples(st.just("set_active"), _MODES),
        st.tuples(st.just("read_once")),
    ),
    min_size=5,
    max_size=80,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    mode=_FRAMED_MODES,
    marks=_WATERMARKS,
    active=st.one_of(st.just((-1, False)), _MODES),
    port_buffer_limit=st.sampled_from([None, 8, 40]),
    steps=_FRAMED_STEPS,
)
def test_framed_reads_deliver_hold_and_charge_as_python_s(
    data: st.DataObject,
    mode: tuple[Any, int],
    marks: tuple[int, int, int],
    active: tuple[int, bool],
    port_buffer_limit: int | None,
    steps: list[tuple[Any, ...]],
) -> None:
    """Framing, each message's charge, packets held past the credit and delivered by
    grants, ``Passive``, the watermarks' pauses and the errors that close a port: the
    same messages in the same order, and the same bytes charged, as the Python I/O
    thread's own delivery methods."""
    packet, packet_size = mode
    stream = data.draw(_framed_stream(packet))
    io = _PyIO(port_buffer_limit)
    conn = _PyConn(marks, active, packet, packet_size)
    native = _FlowModel(None, port_buffer_limit, READ_SIZE)
    native.add_framed_port(*marks, active, PACKET_OVERHEAD, packet, packet_size)
    taken: deque[int] = deque()  # charges delivered and not yet taken
    resumes: deque[int] = deque()
    position = 0
    for step in steps:
        if conn.closed:
            break
        name, *args = step
        if name == "read":
            if not (conn.credit and not conn.held and not conn.msgq_paused):
                continue
            chunk = stream[position : position + args[0]]
            position += len(chunk)
            if not chunk:
                continue
            io.read(conn, chunk)
            expected = _py_events(conn)
            charges, passive, fault = native.framed_read(0, chunk)
            got = _native_events(charges, passive)
            if fault is not None:
                name_ = (
                    "ENOBUFS"
                    if isinstance(fault, str)
                    else ("EMSGSIZE" if isinstance(fault, PacketTooLarge) else "EPROTO")
                )
                got += [("error", name_, str(fault)), ("closed", name_)]
            # (A str fault: port_buffer_limit's.)
            decoder_error = expected[-1:] == [("closed", "EPROTO")]
            if (fault is None or isinstance(fault, str)) and decoder_error:
                # An object only the decoder refuses: the drain finds it (see
                # test_native_framing), after the objects before it in the read; or, if
                # the same read leaves the framer holding more than port_buffer_limit,
                # the port is closed for that first (ENOBUFS), where the Python framer,
                # which decodes in feed, raised EPROTO.
                assert packet == "msgpack"
                assert expected[-2][2].startswith("malformed msgpack")
                break
            assert got == expected
        elif name == "take":
            if not taken:
                continue
            charge = taken.popleft()
            window = conn.window
            window.consumed_messages += 1
            window.consumed_bytes += charge
            io.consumed += charge
            generation = None
            if conn.pause_generation != window.resume_generation:
                generation = window.resume_due(conn)
            assert native.took(0, charge) == generation
            if generation is not None:
                resumes.append(generation)
            continue
        elif name == "resume":
            if not resumes:
                continue
            generation = resumes.popleft()
            resumed = conn.may_resume(generation)
            assert native.may_resume(0, generation) == resumed
            continue
        elif name == "set_active":
            io.cmd_set_active(conn, args[0])
            expected = _py_events(conn)
            first, charges, after = native.set_active_framed(0, args[0])
            assert [("passive",)] * first + _native_events(charges, after) == expected
        else:
            io.cmd_read_once(conn, None)
            expected = _py_events(conn)
            _, charges, after = native.read_once_framed(0)
            assert _native_events(charges, after) == expected
        taken.extend(event[1] for event in expected if event[0] == "data")
        held = conn.held or ()
        assert native.held(0) == (len(held), conn.held_bytes)
        # Both cores charge an unfinished msgpack object its items walked so far too (as
        # they arrive: at most PACKET_OVERHEAD a byte it holds), the same.
        framer_bytes, pending = native.framer_holds(0)
        assert pending <= PACKET_OVERHEAD * framer_bytes
        assert pending == 0 or packet == "msgpack"
        if not conn.closed:
            assert (framer_bytes, pending) == (conn.framer.buffered, conn.framer.pending_charge)
        assert native.framing_bytes() == io.framing_bytes
        assert native.in_use() == io.delivered_total + io.framing_bytes - io.consumed
        state = native.state(0)
        assert state[:2] == (conn.pause_generation, conn.msgq_paused)
        assert state[3:7] == (
            conn.credit,
            (conn.delivered_bytes, conn.delivered_messages),
            (conn.window.consumed_bytes, conn.window.consumed_messages),
            conn.pauses,
        )
