"""Redis-protocol benchmark: examples/kvstore.py against a real redis-server, same run.

Both are loaded by ``redis-benchmark -t set,get,incr,lpush,lpop,mset -n 100000 -c 50`` (``--tests``
to choose), once without pipelining and
once with ``-P 16`` (16 commands in flight per connection), each server in turn as a
subprocess on a free loopback port (its own session; SIGTERM, then SIGKILL, afterwards - so
the redis-server started here is always stopped):

  kvstore        examples/kvstore.py --port PORT [--ioserver-args]   (asyncio, uvloop if any)
  kvstore-trio   the same with --backend trio
  redis          redis-server --port PORT --save "" --appendonly no (no persistence)

redis-server and redis-benchmark come from the system packages (redis-server, redis-tools);
they are installed when absent and the script runs as root, else it says how.

usage: python bench/redis.py [--tests set,get,...] [--requests 100000] [--clients 50]
                             [--pipeline 16] [--rounds 1] [--only NAME,...]
                             [--ioserver-args "..."] [--json FILE]

Prints requests/s per server, test and pipeline depth, then ratio = kvstore / redis-server.
redis-server is written in C: the ratio says how far a Python server on ioserver is from it.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from _servers import REPO_ROOT, RunFailed, Server, free_port, running, tail

KVSTORE = REPO_ROOT / "examples" / "kvstore.py"
TESTS = "set,get,incr,lpush,lpop,mset"  # redis-benchmark -t (the commands users try first)
# redis-benchmark's names for them in its CSV output
NAMES = {"mset": "MSET (10 keys)", "lrange": "LRANGE_100 (first 100 elements)"}


@dataclasses.dataclass(frozen=True)
class Result:
    server: str
    round: int
    pipeline: int
    test: str
    requests_s: float
    p50_ms: float


def ensure_tools() -> tuple[str, str]:
    """The paths of redis-server and redis-benchmark, installing them if need be."""
    wanted = {"redis-server": "redis-server", "redis-benchmark": "redis-tools"}
    missing = sorted({package for tool, package in wanted.items() if not shutil.which(tool)})
    if missing:
        how = f"apt-get update && apt-get install -y {' '.join(missing)}"
        if os.geteuid() != 0 or shutil.which("apt-get") is None:
            raise SystemExit(f"bench/redis.py: missing {', '.join(missing)}; install with: {how}")
        print(f"installing {', '.join(missing)}: {how}", flush=True)
        for command in (
            ["apt-get", "update", "-qq"],
            ["apt-get", "install", "-y", "-qq", *missing],
        ):
            if subprocess.run(command, check=False).returncode != 0:
                raise SystemExit(f"bench/redis.py: '{' '.join(command)}' failed")
    server, benchmark = shutil.which("redis-server"), shutil.which("redis-benchmark")
    if server is None or benchmark is None:
        raise SystemExit("bench/redis.py: redis-server or redis-benchmark is still missing")
    return server, benchmark


def servers(redis_server: str, ioserver_args: str) -> dict[str, Server]:
    extra = tuple(shlex.split(ioserver_args))
    kvstore = (sys.executable, str(KVSTORE))
    return {
        "kvstore": Server("kvstore", kvstore, extra, is_ioserver=True),
        "kvstore-trio": Server(
            "kvstore-trio", kvstore, ("--backend", "trio", *extra), is_ioserver=True
        ),
        "redis": Server(
            "redis",
            (redis_server,),
            ("--save", "", "--appendonly", "no", "--bind", "127.0.0.1", "--daemonize", "no"),
        ),
    }


def parse_csv(text: str, tests: set[str]) -> dict[str, tuple[float, float]]:
    """``{test: (requests/s, p50 ms)}`` from ``redis-benchmark --csv``, for ``tests``
    (redis-benchmark's names for them)."""
    out: dict[str, tuple[float, float]] = {}
    rows = list(csv.reader(io.StringIO(text)))
    if not rows:
        raise RunFailed("redis-benchmark printed nothing")
    header = [cell.lower() for cell in rows[0]]
    for row in rows[1:]:
        if len(row) < 2 or row[0] not in tests:
            continue
        record = dict(zip(header, row, strict=False))
        p50 = float(record.get("p50_latency_ms", "nan"))
        out[row[0]] = (float(record.get("rps", row[1])), p50)
    if not out:
        raise RunFailed("no lines for the tests in redis-benchmark's output", text[-2000:])
    return out


def test_names(tests: str) -> set[str]:
    """redis-benchmark's CSV names for the tests of ``-t``."""
    return {NAMES.get(test, test.upper()) for test in tests.split(",") if test}


def measure(
    benchmark: str, server: Server, rnd: int, args: argparse.Namespace, tmp: Path
) -> list[Result]:
    port = free_port()
    results: list[Result] = []
    with (
        (tmp / f"{server.name}.round{rnd}.stderr").open("w+") as err,
        running(server, port, err) as proc,
    ):
        for pipeline in (1, args.pipeline):
            command = [
                benchmark,
                *("-h", "127.0.0.1", "-p", str(port), "-t", args.tests),
                *("-n", str(args.requests), "-c", str(args.clients), "-P", str(pipeline)),
                "--csv",
            ]
            try:
                done = subprocess.run(
                    command, capture_output=True, text=True, check=False, timeout=300
                )
            except subprocess.TimeoutExpired as exc:
                raise RunFailed("redis-benchmark did not finish", tail(err)) from exc
            if proc.poll() is not None:
                raise RunFailed(f"server exited with status {proc.returncode}", tail(err))
            if done.returncode != 0:
                raise RunFailed(f"redis-benchmark exited with {done.returncode}", done.stderr)
            for test, (requests_s, p50) in parse_csv(done.stdout, test_names(args.tests)).items():
                results.append(Result(server.name, rnd, pipeline, test, requests_s, p50))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tests", default=TESTS, help=f"redis-benchmark -t (default {TESTS})")
    parser.add_argument("--requests", type=int, default=100_000, help="redis-benchmark -n")
    parser.add_argument("--clients", type=int, default=50, help="redis-benchmark -c")
    parser.add_argument("--pipeline", type=int, default=16, help="the pipelined run's -P")
    parser.add_argument("--rounds", type=int, default=1, help="alternate N times, keep the best")
    parser.add_argument("--only", default="", help="comma-separated server names")
    parser.add_argument("--ioserver-args", default="", help="more arguments for kvstore.py")
    parser.add_argument("--json", type=Path, help="write the runs and ratios to this file")
    args = parser.parse_args()

    redis_server, benchmark = ensure_tools()
    table = servers(redis_server, args.ioserver_args)
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(table)
    unknown = set(names) - set(table)
    if unknown:
        raise SystemExit(f"--only: unknown {sorted(unknown)}; known: {sorted(table)}")
    print(
        f"redis-benchmark -t {args.tests} -n {args.requests} -c {args.clients}, -P 1 and "
        f"-P {args.pipeline}; {args.rounds} round(s); {os.cpu_count()} CPUs",
        flush=True,
    )
    results: list[Result] = []
    failures: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="bench-redis-") as tmp_name:
        for rnd in range(1, args.rounds + 1):
            for name in names:
                try:
                    measured = measure(benchmark, table[name], rnd, args, Path(tmp_name))
                except RunFailed as exc:
                    failures[name] = str(exc)
                    print(f"round {rnd} {name:13} FAILED: {exc}", flush=True)
                    continue
                results += measured
                for r in measured:
                    print(
                        f"round {rnd} {name:13} -P {r.pipeline:<3} {r.test:14} "
                        f"{r.requests_s:11,.0f} req/s  p50 {r.p50_ms:6.3f} ms",
                        flush=True,
                    )

    best: dict[tuple[str, int, str], Result] = {}
    for r in results:
        key = (r.server, r.pipeline, r.test)
        if key not in best or r.requests_s > best[key].requests_s:
            best[key] = r
    print("\nbest runs (requests/s)   ratio = kvstore variant / redis-server")
    ratios: dict[str, float] = {}
    for pipeline in (1, args.pipeline):
        for test in sorted(test_names(args.tests)):
            redis = best.get(("redis", pipeline, test))
            line = f"-P {pipeline:<3} {test:14}"
            for name in names:
                r = best.get((name, pipeline, test))
                line += f"  {name} {r.requests_s:10,.0f}" if r else f"  {name} -"
                if r and redis and name != "redis":
                    ratio = r.requests_s / redis.requests_s
                    ratios[f"{name} -P {pipeline} {test}"] = ratio
                    line += f" ({ratio:.2f}x)"
            print(line)
    for name, reason in failures.items():
        print(f"{name}: {reason.splitlines()[0]}")
    print("(a shared machine: figures move by 10-20% between runs; use --rounds 3)")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "config": vars(args) | {"json": str(args.json)},
                    "runs": [dataclasses.asdict(r) for r in results],
                    "ratios": ratios,
                    "failures": failures,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
