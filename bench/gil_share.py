"""The loop's share of the GIL while the I/O thread's Python half handles a flood.

A ZeroMQ PULL port (a *hosted* port on the native core: its handler is Python, run on
the I/O thread under the GIL) is flooded by a PUSH socket in another process (or, with
``--flood control``, the daemon's control endpoint by frames it refuses: then none of the
work reaches the loop), and an actor drained by the same event loop echoes on a native
TCP port.  A probe in a third process sends one byte at a time to the echo (every 2 ms)
and times each round trip; a task in the loop sleeps 1 ms at a time and records how late
each wake-up was (the loop's lag), and that lag less the time the loop thread waited for
a CPU (``/proc/thread-self/schedstat``): its wait for the GIL, on a shared machine too.
Measured for ``--seconds`` while the flood runs.

::

    .venv/bin/python bench/gil_share.py                        # native core, asyncio
    .venv/bin/python bench/gil_share.py --core python --backend trio
    .venv/bin/python bench/gil_share.py --flood control        # the hosted half's work only
    .venv/bin/python bench/gil_share.py --flood none           # the echo alone

Prints one JSON line: the echo's round trips (count, median, p99, worst, in ms), the
loop's lag and GIL wait (median, worst, ms), the I/O thread's Python rounds during one of
the loop's 1 ms sleeps (median, max), and the flood's messages handled per second.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import anyio
import zmq

import ioserver
import ports
from ioserver._control import ControlEndpoint

_FLOOD = """
import sys, zmq
ctx = zmq.Context()
push = ctx.socket(zmq.PUSH)
push.setsockopt(zmq.SNDHWM, 0)
push.connect(sys.argv[1])
frame = b"x" * 64
while True:
    push.send(frame)
"""

# The daemon's control endpoint flooded with frames it refuses (each answered by a FAULT):
# all the work is the hosted half's, none of it reaches a loop.
_CONTROL_FLOOD = """
import sys, zmq
from ioserver import _protocol as P
ctx = zmq.Context()
sock = ctx.socket(zmq.DEALER)
sock.setsockopt(zmq.SNDHWM, 0)
sock.connect(sys.argv[1])
sock.send(P.pack([[P.HELLO, P.VERSION]]))
token = P.unpack(sock.recv())[0][1]["token"]
frame = P.pack([[99]], token)
while True:
    for _ in range(100):
        sock.send(frame)
    try:
        while True:
            sock.recv(zmq.NOBLOCK)
    except zmq.Again:
        pass
"""

_PROBE = """
import socket, sys, time, json
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
end = time.monotonic() + float(sys.argv[2])
rtts = []
while time.monotonic() < end:
    t = time.monotonic()
    s.sendall(b"p")
    if s.recv(16) != b"p":
        raise SystemExit("bad echo")
    rtts.append(time.monotonic() - t)
    time.sleep(0.002)
print(json.dumps(rtts))
"""


async def _echo(listener: ports.Listener) -> None:
    async for accepted in listener:
        if isinstance(accepted, ports.Accepted):
            async with accepted.port as port:
                async for message in port:
                    if isinstance(message, ports.Data):
                        await port.send(message.data)
            return


async def run(options: argparse.Namespace) -> dict[str, Any]:
    received = 0
    lags: list[float] = []
    gil: list[float] = []  # the lag, less the time this thread waited for a CPU
    waited: list[int] = []  # the I/O thread's Python rounds during each 1 ms sleep
    async with (
        ioserver.open(core=options.core) as ios,
        await ports.listen_tcp(ios, "127.0.0.1", 0) as listener,
        await ports.open_zmq(ios, "PULL", bind="tcp://127.0.0.1:*") as pull,
        anyio.create_task_group() as tg,
    ):

        async def consume() -> None:
            nonlocal received
            async for message in pull:
                if isinstance(message, ports.Data):
                    received += 1

        io = ios._io

        async def lag() -> None:
            with open("/proc/thread-self/schedstat", "rb", buffering=0) as schedstat:  # noqa: ASYNC230

                def runqueue() -> float:  # seconds this thread waited for a CPU
                    schedstat.seek(0)
                    return int(schedstat.read().split()[1]) / 1e9

                while True:
                    t, rounds, queued = time.monotonic(), io.polls, runqueue()
                    await anyio.sleep(0.001)
                    late = time.monotonic() - t - 0.001
                    lags.append(late)
                    gil.append(late - (runqueue() - queued))
                    waited.append(io.polls - rounds)

        tg.start_soon(_echo, listener)
        tg.start_soon(consume)
        flood = None
        control = None
        if options.flood == "pull":
            endpoint = pull.local_address
            flood = subprocess.Popen([sys.executable, "-c", _FLOOD, str(endpoint)])  # noqa: ASYNC220
            while received == 0:  # noqa: ASYNC110 (the flood is being handled)
                await anyio.sleep(0.01)
        elif options.flood == "control":
            router = io.zmq_context().socket(zmq.ROUTER)
            endpoint = f"ipc://{tempfile.mkdtemp()}/control"
            router.bind(endpoint)
            io.zmq_sockets.add(router)
            control = ControlEndpoint(io, router, heartbeat=5.0, info={}, status=dict)
            io.submit(lambda target, _: target.start(), control, None)
            flood = subprocess.Popen([sys.executable, "-c", _CONTROL_FLOOD, endpoint])  # noqa: ASYNC220
            while control.faults == 0:  # noqa: ASYNC110 (a counter: no event tells of it)
                await anyio.sleep(0.01)
        tg.start_soon(lag)
        start_received, start = received, time.monotonic()
        if control is not None:
            start_received = control.faults
        try:
            if options.no_echo:  # the loop idle: what the flood gets alone
                await anyio.sleep(options.seconds)
                probe = None
            else:
                probe = await anyio.run_process(
                    [
                        sys.executable,
                        "-c",
                        _PROBE,
                        str(listener.local_address[1]),
                        str(options.seconds),
                    ]
                )
        finally:
            elapsed = time.monotonic() - start
            if flood is not None:
                flood.kill()
                flood.wait()
        if control is not None:
            received = control.faults

        tg.cancel_scope.cancel()
    rtts = sorted(json.loads(probe.stdout)) if probe is not None else [0.0]
    ms = 1000.0
    return {
        "core": options.core,
        "backend": options.backend,
        "flood": options.flood,
        "echoes": len(rtts),
        "rtt_median_ms": round(statistics.median(rtts) * ms, 3),
        "rtt_p99_ms": round(rtts[int(len(rtts) * 0.99)] * ms, 3),
        "rtt_worst_ms": round(rtts[-1] * ms, 3),
        "lag_median_ms": round(statistics.median(lags) * ms, 3) if lags else None,
        "lag_worst_ms": round(max(lags) * ms, 3) if lags else None,
        "gil_wait_median_ms": round(statistics.median(gil) * ms, 3) if gil else None,
        "gil_wait_worst_ms": round(max(gil) * ms, 3) if gil else None,
        "rounds_in_sleep_median": statistics.median(waited) if waited else None,
        "rounds_in_sleep_max": max(waited) if waited else None,
        "flood_msgs_per_s": round((received - start_received) / elapsed),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--core", default="native", choices=["native", "python"])
    parser.add_argument("--backend", default="asyncio", choices=["asyncio", "trio"])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument(
        "--no-echo", action="store_true", help="no probe: the loop idle, the flood alone"
    )
    parser.add_argument(
        "--flood",
        default="pull",
        choices=["pull", "control", "none"],
        help="a PULL port's (delivered to the loop), the control endpoint's (refused"
        " frames: the hosted half's work only), or none (the echo alone)",
    )
    options = parser.parse_args()
    logging.getLogger("ioserver").setLevel(logging.ERROR)  # a warning per refused frame
    result = anyio.run(run, options, backend=options.backend)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
