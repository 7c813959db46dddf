"""The HTTP handler's own cost, with no I/O: the floor under every server in bench/http.py.

Every server bench/http.py loads runs the same sans-I/O handler (``HttpSession`` from
examples/httpd.py: h11 parses and writes, the file is read whole per request). This script
runs that handler alone, in one thread, on the request wrk sends (``GET /index.html`` with a
Host header, keep-alive), a session per ``--pipeline`` requests as wrk's connections do, and
reports the CPU time per request (``time.thread_time``): feed, responses, sent.

A server answers its requests on one event-loop thread, so it cannot serve more than
1 / floor requests a second, whatever its I/O costs. With ``--asyncio-rps R`` (asyncio
streams' figure from a run of bench/http.py) it also prints the best ratio any server could
reach against it: (1 / floor) / R. Measure both in one sitting: the machine's speed moves.

usage: python bench/http_floor.py [--size 1200] [--requests 20000] [--rounds 5]
                                  [--pipeline 1000] [--asyncio-rps R] [--access-log]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import httpd

#: What wrk sends for ``wrk http://127.0.0.1:PORT/index.html`` (wrk 4: a Host header only).
REQUEST = b"GET /index.html HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n"


def one_round(files: httpd.StaticFiles, requests: int, pipeline: int, access_log: bool) -> float:
    """Serve ``requests`` requests, one at a time as wrk's connections send them, and return
    the thread's CPU seconds per request."""
    pool = httpd.MemoryPool(httpd.HANDLER_MEMORY)
    served = 0
    session = httpd.HttpSession(files, httpd.REQUEST_MEMORY, pool, access_log=access_log)
    start = time.thread_time()
    while served < requests:
        if served % pipeline == 0:
            session.release()
            session = httpd.HttpSession(files, httpd.REQUEST_MEMORY, pool, access_log=access_log)
        session.feed(REQUEST)
        while chunks := session.responses():
            if not chunks[0].startswith(b"HTTP/1.1 200"):
                raise SystemExit(f"the handler answered {chunks[0][:40]!r}, not 200")
            session.sent()
        if access_log and session.access:
            httpd.write_access_log("127.0.0.1", session.access)
        served += 1
    elapsed = time.thread_time() - start
    session.release()
    return elapsed / requests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1200, help="the file's size, bytes")
    parser.add_argument("--requests", type=int, default=20_000, help="requests per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--pipeline", type=int, default=1000, help="requests per session (connection)"
    )
    parser.add_argument(
        "--asyncio-rps", type=float, help="asyncio streams' req/s, to print the best ratio"
    )
    parser.add_argument(
        "--access-log",
        action="store_true",
        help="also format each access-log line (examples/httpd.py's default; the logger "
        "itself is left without handlers, so nothing is written)",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="http-floor-") as tmp:
        content = (b"<!doctype html><title>bench</title>\n" + b"x" * args.size)[: args.size]
        (Path(tmp) / "index.html").write_bytes(content)
        files = httpd.StaticFiles(tmp)
        one_round(files, 1000, args.pipeline, args.access_log)  # warm up
        rounds = [
            one_round(files, args.requests, args.pipeline, args.access_log)
            for _ in range(args.rounds)
        ]
    floor = statistics.median(rounds)
    print(
        f"handler alone ({'with' if args.access_log else 'no'} access log), "
        f"{args.size}-byte file, python {sys.version.split()[0]}: "
        f"median {floor * 1e6:.1f} us/request (rounds: "
        + ", ".join(f"{r * 1e6:.1f}" for r in rounds)
        + f"), at most {1 / floor:,.0f} req/s on one thread"
    )
    if args.asyncio_rps:
        print(
            f"best ratio any server could reach against asyncio streams' "
            f"{args.asyncio_rps:,.0f} req/s: {1 / floor / args.asyncio_rps:.2f}x"
        )


if __name__ == "__main__":
    main()
