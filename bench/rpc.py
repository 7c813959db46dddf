"""Typed RPC throughput: calls/s for N concurrent callers over one port and over N ports.

    .venv/bin/python bench/rpc.py                       # both backends, N = 1, 10, 100
    .venv/bin/python bench/rpc.py --callers 1,32 --seconds 3 --backend trio

Client and server run in one process, on one event loop and one I/O thread (so the figure
is the whole cost of a call: encode, the hops through the I/O thread both ways, decode and
validation on both sides, a handler task per request).  Each caller loops
``await client.call(Add(a, b))`` for ``--seconds`` after a warm-up; the request and reply
are small message classes (``Add(a: int, b: int)`` -> ``Sum(value: int)``, msgspec Structs).

* ``one port``: the N callers share one :class:`ports.rpc.Client` (multiplexed: up to N
  calls in flight on one connection, matched by request id);
* ``N ports``: each caller has its own connection and client.

``CPU us`` is the process's CPU time (event loop and I/O thread together) per call: less
sensitive than calls/s to other load on the machine.  On a shared 2-core machine the
figures are noisy (+-15% or worse); compare rows of one run.
"""

from __future__ import annotations

import argparse
import time
from contextlib import AsyncExitStack

import anyio

import ioserver
import ports
from ports import rpc


class Add(rpc.Message):
    a: int
    b: int


class Sum(rpc.Message):
    value: int


CALC: rpc.Interface[Add, Sum] = rpc.Interface(Add, Sum)


async def handle(request: Add) -> Sum:
    return Sum(request.a + request.b)


async def measure(
    ios: ioserver.IOServer, address: tuple[str, int], callers: int, shared: bool, seconds: float
) -> tuple[float, float]:
    """``(calls per second, CPU microseconds per call)`` with ``callers`` callers, sharing
    one client or with one each.  The CPU time is the whole process's (both threads)."""
    counts = [0] * callers
    running = True
    clients: list[rpc.Client[Add, Sum]] = []
    async with AsyncExitStack() as stack:
        for _ in range(1 if shared else callers):
            client = await rpc.connect(ios, *address, CALC)
            clients.append(await stack.enter_async_context(client))

        async def caller(index: int) -> None:
            client = clients[0 if shared else index]
            while running:
                reply = await client.call(Add(index, 1))
                assert reply.value == index + 1
                counts[index] += 1

        async with anyio.create_task_group() as task_group:
            for index in range(callers):
                task_group.start_soon(caller, index)
            await anyio.sleep(min(1.0, seconds / 3))  # warm-up
            before, start, cpu = sum(counts), time.perf_counter(), time.process_time()
            await anyio.sleep(seconds)
            done, elapsed = sum(counts) - before, time.perf_counter() - start
            cpu = time.process_time() - cpu
            running = False
    return done / elapsed, cpu / max(done, 1) * 1e6


async def bench(
    ios: ioserver.IOServer, options: argparse.Namespace
) -> list[tuple[str, str, str, str, str]]:
    rows = []
    async with (
        await ports.listen_tcp(ios, "127.0.0.1", 0, packet=4) as listener,
        anyio.create_task_group() as task_group,
    ):
        address = await task_group.start(rpc.serve_listener, listener, CALC, handle)
        for callers in options.callers:
            shared, shared_cpu = await measure(ios, address, callers, True, options.seconds)
            separate, separate_cpu = await measure(ios, address, callers, False, options.seconds)
            rows.append(
                (
                    str(callers),
                    f"{shared:,.0f}",
                    f"{shared_cpu:.0f}",
                    f"{separate:,.0f}",
                    f"{separate_cpu:.0f}",
                )
            )
        task_group.cancel_scope.cancel()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="measured time per cell")
    parser.add_argument(
        "--callers",
        type=lambda text: [int(part) for part in text.split(",")],
        default=[1, 10, 100],
        help="comma-separated numbers of concurrent callers (default 1,10,100)",
    )
    parser.add_argument("--backend", choices=["asyncio", "trio", "both"], default="both")
    options = parser.parse_args()
    backends = ["asyncio", "trio"] if options.backend == "both" else [options.backend]
    print(f"typed RPC, Add(a, b) -> Sum(value), {options.seconds} s per cell; calls/s")
    cpu = "CPU us"
    print(f"{'backend':<8} {'callers':>7} {'one port':>10} {cpu:>7} {'N ports':>10} {cpu:>7}")
    for backend in backends:
        rows = ioserver.run(bench, options, backend=backend, use_uvloop=False)
        assert rows is not None
        for callers, shared, shared_cpu, separate, separate_cpu in rows:
            print(
                f"{backend:<8} {callers:>7} {shared:>10} {shared_cpu:>7} "
                f"{separate:>10} {separate_cpu:>7}",
                flush=True,
            )


if __name__ == "__main__":
    main()
