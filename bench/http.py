"""HTTP benchmark: examples/httpd.py against the same handler on trio and on asyncio streams.

Every server runs the very same sans-I/O handler (``HttpSession`` from examples/httpd.py: h11
for parsing and writing, the file read whole per request - or streamed a 256 KiB chunk at a
time when larger, so any --size works - the same memory budgets), so the figures compare
only how the bytes get to and from the sockets:

  ioserver        examples/httpd.py --root DIR --port PORT [--ioserver-args]
                  (asyncio on uvloop when installed, as `ioserver run` does)
  ioserver-trio   the same with --backend trio
  trio            bench/servers/http_trio.py: trio.serve_tcp, receive_some / send_all
  asyncio         bench/servers/http_asyncio.py: asyncio.start_server, read / write / drain
  uvloop-streams  the same asyncio streams server on uvloop (only with --only)

Load: ``wrk -t2 -c100 -d10s --latency`` on one file of --size bytes (1,200 by default), each
server in turn as a subprocess on a free loopback port; with --rounds N they alternate and each
keeps its best run.  wrk is installed from the system packages when absent and the script runs
as root (``apt-get update && apt-get install -y wrk``), else it says how.

usage: python bench/http.py [--seconds 10] [--threads 2] [--conns 100] [--size 1200]
                            [--rounds 1] [--only NAME,...] [--ioserver-args "..."] [--json FILE]

Prints a line per run, then each server's best run and ratio = ioserver req/s / that server's
req/s (above 1: ioserver is faster), for every ioserver variant, against the issue's goals
(>= 1.3x trio, >= 1.1x asyncio streams).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import re
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import http_floor
from _servers import BENCH_DIR, REPO_ROOT, RunFailed, Server, free_port, running, tail

HTTPD = REPO_ROOT / "examples" / "httpd.py"
SERVERS_DIR = BENCH_DIR / "servers"
GOALS = {"trio": 1.3, "asyncio": 1.1}
#: Issue 14's goal for the native core: ioserver >= 1.7x asyncio streams.
NATIVE_GOAL = 1.7
IOSERVER_VARIANTS = ("ioserver", "ioserver-trio")


@dataclasses.dataclass(frozen=True)
class Result:
    server: str
    round: int
    requests_s: float
    latency_p50_ms: float
    latency_p99_ms: float
    errors: int  # non-2xx responses plus socket errors


def ensure_wrk() -> str:
    wrk = shutil.which("wrk")
    if wrk is not None:
        return wrk
    how = "apt-get update && apt-get install -y wrk"
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise SystemExit(f"bench/http.py: wrk is not installed; install it with: {how}")
    print(f"wrk is not installed; running: {how}", flush=True)
    for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "wrk"]):
        if subprocess.run(command, check=False).returncode != 0:
            raise SystemExit(f"bench/http.py: '{' '.join(command)}' failed; install wrk by hand")
    wrk = shutil.which("wrk")
    if wrk is None:
        raise SystemExit("bench/http.py: wrk is still not on PATH after apt-get install")
    return wrk


def servers(root: Path, ioserver_args: str, access_log: bool = False) -> dict[str, Server]:
    py = sys.executable
    common = ("--root", str(root))
    # The reference servers write no access log; httpd.py writes one by default (to its
    # standard error, a file here), which is work the others do not do.
    extra = (*(() if access_log else ("--no-access-log",)), *shlex.split(ioserver_args))
    no_uvloop = None if importlib.util.find_spec("uvloop") else "uvloop is not importable"
    streams = str(SERVERS_DIR / "http_asyncio.py")
    return {
        "ioserver": Server("ioserver", (py, str(HTTPD)), (*common, *extra), is_ioserver=True),
        "ioserver-trio": Server(
            "ioserver-trio",
            (py, str(HTTPD)),
            (*common, "--backend", "trio", *extra),
            is_ioserver=True,
        ),
        "trio": Server("trio", (py, str(SERVERS_DIR / "http_trio.py")), common),
        "asyncio": Server("asyncio", (py, streams), common),
        "uvloop-streams": Server(
            "uvloop-streams", (py, streams), (*common, "--uvloop"), skip_reason=no_uvloop
        ),
    }


def check_answer(port: int, expected: bytes) -> None:
    """One GET before the load: the server must answer 200 with the file, byte for byte.

    (A raw socket: this script's name, http.py, hides the standard library's http package.)
    """
    request = b"GET /index.html HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"
    answer = b""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(request)
            while chunk := sock.recv(65536):
                answer += chunk
    except OSError as exc:
        raise RunFailed(f"GET /index.html failed before the load: {exc}") from exc
    head, _, body = answer.partition(b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0]
    if not status.startswith(b"HTTP/1.1 200") or body != expected:
        raise RunFailed(f"GET /index.html: {status!r}, {len(body)} bytes (not the file)")


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def parse_wrk(text: str) -> tuple[float, float, float, int]:
    """``(requests/s, p50 ms, p99 ms, errors)`` from ``wrk --latency`` output."""
    requests = re.search(r"Requests/sec:\s*([\d.]+)", text)
    if requests is None:
        raise RunFailed("no Requests/sec in wrk's output", text[-2000:])

    def percentile(name: str) -> float:
        found = re.search(rf"^\s*{name}%\s+([\d.]+)(us|ms|s)\s*$", text, re.MULTILINE)
        return float(found.group(1)) * _UNITS[found.group(2)] if found else float("nan")

    errors = 0
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", text)
    if non_2xx:
        errors += int(non_2xx.group(1))
    socket_errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text
    )
    if socket_errors:
        errors += sum(int(n) for n in socket_errors.groups())
    return float(requests.group(1)), percentile("50"), percentile("99"), errors


def measure(
    wrk: str, server: Server, rnd: int, args: argparse.Namespace, tmp: Path, content: bytes
) -> Result:
    port = free_port()
    with (
        (tmp / f"{server.name}.round{rnd}.stderr").open("w+") as err,
        running(server, port, err) as proc,
    ):
        check_answer(port, content)
        command = [
            wrk,
            f"-t{args.threads}",
            f"-c{args.conns}",
            f"-d{args.seconds}s",
            "--latency",
            f"http://127.0.0.1:{port}/index.html",
        ]
        try:
            done = subprocess.run(
                command, capture_output=True, text=True, check=False, timeout=args.seconds + 30
            )
        except subprocess.TimeoutExpired as exc:
            raise RunFailed("wrk did not finish", f"server stderr:\n{tail(err)}") from exc
        if proc.poll() is not None:
            raise RunFailed(
                f"server exited with status {proc.returncode} during the run",
                f"server stderr:\n{tail(err)}",
            )
        if done.returncode != 0:
            raise RunFailed(f"wrk exited with {done.returncode}", done.stderr[-2000:])
    requests_s, p50, p99, errors = parse_wrk(done.stdout)
    return Result(server.name, rnd, requests_s, p50, p99, errors)


def handler_floor(size: int, access_log: bool) -> float:
    """The handler's CPU seconds per request with no I/O (bench/http_floor.py), median of 3."""
    with tempfile.TemporaryDirectory(prefix="bench-http-floor-") as tmp:
        content = (b"<!doctype html><title>bench</title>\n" + b"x" * size)[:size]
        (Path(tmp) / "index.html").write_bytes(content)
        files = http_floor.httpd.StaticFiles(tmp)
        http_floor.one_round(files, 1000, 1000, access_log)
        return statistics.median(
            http_floor.one_round(files, 10_000, 1000, access_log) for _ in range(3)
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=10, help="wrk -d (default 10)")
    parser.add_argument("--threads", type=int, default=2, help="wrk -t (default 2)")
    parser.add_argument("--conns", type=int, default=100, help="wrk -c (default 100)")
    parser.add_argument("--size", type=int, default=1200, help="bytes of the file (1200)")
    parser.add_argument("--rounds", type=int, default=1, help="alternate N times, keep the best")
    parser.add_argument("--only", default="", help="comma-separated server names")
    parser.add_argument("--ioserver-args", default="", help="more arguments for httpd.py")
    parser.add_argument("--json", type=Path, help="write the runs and ratios to this file")
    parser.add_argument(
        "--access-log",
        action="store_true",
        help="let httpd.py write its access log (the reference servers write none)",
    )
    parser.add_argument(
        "--no-floor",
        action="store_true",
        help="skip the handler's floor (bench/http_floor.py's measure, run after the load)",
    )
    args = parser.parse_args()

    wrk = ensure_wrk()
    with tempfile.TemporaryDirectory(prefix="bench-http-") as tmp_name:
        tmp = Path(tmp_name)
        root = tmp / "www"
        root.mkdir()
        content = (b"<!doctype html><title>bench</title>\n" + b"x" * args.size)[: args.size]
        (root / "index.html").write_bytes(content)
        table = servers(root, args.ioserver_args, args.access_log)
        if args.only:
            names = [name.strip() for name in args.only.split(",") if name.strip()]
            unknown = set(names) - set(table)
            if unknown:
                raise SystemExit(f"--only: unknown {sorted(unknown)}; known: {sorted(table)}")
        else:
            names = ["ioserver", "ioserver-trio", "trio", "asyncio"]
        print(
            f"wrk -t{args.threads} -c{args.conns} -d{args.seconds}s, a {args.size}-byte file, "
            f"{args.rounds} round(s), python {sys.version.split()[0]}, {os.cpu_count()} CPUs",
            flush=True,
        )
        results: list[Result] = []
        failures: dict[str, str] = {}
        for rnd in range(1, args.rounds + 1):
            for name in names:
                server = table[name]
                if server.skip_reason:
                    failures[name] = f"skipped: {server.skip_reason}"
                    continue
                try:
                    result = measure(wrk, server, rnd, args, tmp, content)
                except RunFailed as exc:
                    failures[name] = str(exc)
                    print(f"round {rnd} {name:15} FAILED: {exc}", flush=True)
                    continue
                results.append(result)
                print(
                    f"round {rnd} {name:15} {result.requests_s:10,.0f} req/s  "
                    f"p50 {result.latency_p50_ms:6.2f} ms  p99 {result.latency_p99_ms:6.2f} ms"
                    + (f"  ERRORS {result.errors}" if result.errors else ""),
                    flush=True,
                )

    best: dict[str, Result] = {}
    for result in results:
        if result.server not in best or result.requests_s > best[result.server].requests_s:
            best[result.server] = result
    variants = [name for name in IOSERVER_VARIANTS if name in best]
    print("\nbest runs" + "".join(f"   ratio {v:>13}" for v in variants))
    ratios: dict[str, dict[str, float]] = {}
    for name, result in best.items():
        line = f"{name:15} {result.requests_s:10,.0f} req/s"
        for variant in variants:
            ratio = best[variant].requests_s / result.requests_s
            ratios.setdefault(variant, {})[name] = ratio
            line += f"   {ratio:18.2f}x"
        print(line)
    for name, reason in failures.items():
        if name not in best:
            print(f"{name:15} {reason.splitlines()[0]}")
    for variant in variants:
        for reference, goal in GOALS.items():
            if reference in best:
                ratio = ratios[variant][reference]
                verdict = "meets" if ratio >= goal else "misses"
                print(f"{variant} vs {reference}: {ratio:.2f}x ({verdict} the {goal}x goal)")
    if "asyncio" in best:
        for variant in variants:
            ratio = ratios[variant]["asyncio"]
            verdict = "meets" if ratio >= NATIVE_GOAL else "misses"
            print(f"{variant} vs asyncio: {ratio:.2f}x ({verdict} issue 14's {NATIVE_GOAL}x goal)")
    floor = None
    if not args.no_floor:
        floor = handler_floor(args.size, args.access_log)
        line = (
            f"the handler alone (bench/http_floor.py, no I/O): {floor * 1e6:.1f} us/request, "
            f"at most {1 / floor:,.0f} req/s on one event-loop thread"
        )
        if "asyncio" in best:
            line += f": at best {1 / floor / best['asyncio'].requests_s:.2f}x asyncio streams"
        print(line)
    print("(a shared machine: figures move by 10-20% between runs; use --rounds 3)")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "config": vars(args) | {"json": str(args.json)},
                    "runs": [dataclasses.asdict(r) for r in results],
                    "best": {k: dataclasses.asdict(v) for k, v in best.items()},
                    "ratios": ratios,
                    "failures": failures,
                    "handler_floor_s": floor,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
