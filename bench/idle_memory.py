"""Memory per idle connection: ioserver's examples/echo.py against an asyncio streams echo server.

For each server: starts it as a subprocess (own session) on a free loopback port, waits until it
accepts connections, opens ``--warm`` connections and echoes one byte on each (so one-time costs
such as lazy imports and first-accept allocations are paid), reads the server's RSS (VmRSS in
/proc/PID/status), opens ``--conns`` more connections from this process and echoes one byte on
each (so the server has accepted every one and set it up for reading), lets them sit idle for
``--settle`` seconds and reads the RSS again. Growth / conns is the user-space memory the server
holds per idle connection; kernel socket memory is not in RSS and not counted. Then it closes the
connections and stops the server (SIGTERM to its process group, SIGKILL after 5 s).

Servers (``--only`` names):
  ioserver         examples/echo.py --port PORT (asyncio backend; uvloop when installed)
  ioserver-trio    examples/echo.py --port PORT --backend trio
  ioserver-ports   bench/servers/ioserver_ports_only.py: ports owned by one Mailbox, no task
                   per connection - ioserver's own cost per connection, without an actor
  asyncio          asyncio streams (bench/servers/asyncio_streams.py), one task per connection

usage:
  python bench/idle_memory.py [--conns 10000] [--warm 100] [--settle 1] [--only NAME[,NAME...]]
                              [--ioserver-args "..."] [--json FILE]

Both this process (the client) and each server need conns + warm + a few descriptors; the script
raises its soft RLIMIT_NOFILE to the hard limit, and the servers inherit it.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import platform
import resource
import shlex
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _servers import BENCH_DIR, REPO_ROOT, RunFailed, Server, free_port, running, tail

IOSERVER_ECHO = REPO_ROOT / "examples" / "echo.py"
ASYNCIO_STREAMS = BENCH_DIR / "servers" / "asyncio_streams.py"
PORTS_ONLY = BENCH_DIR / "servers" / "ioserver_ports_only.py"

IO_TIMEOUT_S = 10.0  # per connect / echo on one socket
BATCH = 500  # connections opened before their echoes are awaited (below the backlog of 1024)
FD_MARGIN = 64  # descriptors besides the connections: listener, epoll, pipes, stdio...
GOAL_BYTES = 2048  # the target for ioserver: <= 2 KiB per idle connection


@dataclasses.dataclass(frozen=True)
class Result:
    server: str
    conns: int
    rss_before: int  # bytes, after the warm-up connections
    rss_after: int  # bytes, with conns more connections idle

    @property
    def per_conn(self) -> float:
        return (self.rss_after - self.rss_before) / self.conns


def servers(ioserver_args: str) -> list[Server]:
    py = sys.executable
    no_ioserver = None if IOSERVER_ECHO.is_file() else f"{IOSERVER_ECHO} does not exist"
    no_trio = None if importlib.util.find_spec("trio") else "trio is not importable"
    common = tuple(shlex.split(ioserver_args))
    echo = (py, str(IOSERVER_ECHO))
    return [
        Server("ioserver", echo, common, is_ioserver=True, skip_reason=no_ioserver),
        Server(
            "ioserver-trio",
            echo,
            ("--backend", "trio", *common),
            is_ioserver=True,
            skip_reason=no_ioserver or no_trio,
        ),
        Server(
            "ioserver-ports",
            (py, str(PORTS_ONLY)),
            common,
            is_ioserver=True,
            skip_reason=no_ioserver,
        ),
        Server("asyncio", (py, str(ASYNCIO_STREAMS))),
    ]


# --------------------------------------------------------------------------------------------
# processes


def raise_nofile(needed: int) -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (children inherit it); return the soft
    limit, or exit if ``needed`` descriptors do not fit under the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and needed > hard:
        raise SystemExit(
            f"need {needed} descriptors per process but the hard RLIMIT_NOFILE is {hard}; "
            "use fewer --conns"
        )
    if soft != resource.RLIM_INFINITY and soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    return soft


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024  # "VmRSS:   12345 kB"
    raise RunFailed(f"no VmRSS in /proc/{pid}/status")


# --------------------------------------------------------------------------------------------
# connections


def open_echoed(port: int, count: int, into: list[socket.socket], deadline: float) -> None:
    """Open ``count`` connections in batches, echo one byte on each, keep them in ``into``."""
    addr = ("127.0.0.1", port)
    for start in range(0, count, BATCH):
        if time.monotonic() > deadline:
            raise RunFailed(f"timed out after opening {start} of {count} connections")
        batch: list[socket.socket] = []
        try:
            for _ in range(min(BATCH, count - start)):
                batch.append(socket.create_connection(addr, timeout=IO_TIMEOUT_S))
            for s in batch:
                s.sendall(b"x")
            for s in batch:
                if s.recv(1) != b"x":
                    raise RunFailed("connection closed instead of echoing")
        except OSError as e:
            raise RunFailed(f"after {start + len(batch)} of {count} connections: {e}") from e
        finally:
            into.extend(batch)  # closed by the caller, even on failure


def settled_rss(pid: int, settle: float) -> int:
    """RSS after ``settle`` seconds (taken as the last of a few samples over that time)."""
    samples = max(1, round(settle / 0.25))
    rss = rss_bytes(pid)
    for _ in range(samples):
        time.sleep(settle / samples)
        rss = rss_bytes(pid)
    return rss


def measure(server: Server, args: argparse.Namespace, tmp: Path) -> Result:
    port = free_port()
    conns: list[socket.socket] = []
    deadline = time.monotonic() + args.timeout
    with (tmp / f"{server.name}.stderr").open("w+") as err, running(server, port, err) as proc:
        try:
            open_echoed(port, args.warm, conns, deadline)
            before = settled_rss(proc.pid, args.settle)
            open_echoed(port, args.conns, conns, deadline)
            after = settled_rss(proc.pid, args.settle)
            if proc.poll() is not None:
                raise RunFailed(f"server exited with status {proc.returncode}\n{tail(err)}")
        except RunFailed as e:
            raise RunFailed(f"{e}\nserver stderr:\n{tail(err)}") from e
        finally:
            for s in conns:
                s.close()
    return Result(server.name, args.conns, before, after)


# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Server RSS growth per idle connection: ioserver vs asyncio streams.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--conns", type=int, default=10_000, help="idle connections measured")
    p.add_argument(
        "--warm", type=int, default=100, help="connections opened before the baseline RSS"
    )
    p.add_argument("--settle", type=float, default=1.0, help="seconds idle before each RSS read")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds allowed per server")
    p.add_argument(
        "--only", metavar="NAME[,NAME]", help="ioserver, ioserver-trio, ioserver-ports, asyncio"
    )
    p.add_argument(
        "--ioserver-args",
        default="",
        metavar='"ARGS"',
        help='extra args for both ioserver servers, e.g. "--no-uvloop"',
    )
    p.add_argument("--json", type=Path, metavar="FILE", help="also write results as JSON")
    a = p.parse_args(argv)
    if a.conns < 1 or a.warm < 0 or a.settle < 0 or a.timeout <= 0:
        p.error("need --conns >= 1, --warm >= 0, --settle >= 0, --timeout > 0")
    return a


def exit_on_signal(signum: int, _frame: object) -> None:
    """SIGTERM/SIGHUP: unwind like Ctrl-C does, so the servers (own sessions) get stopped."""
    raise SystemExit(128 + signum)


def kib(n: float) -> str:
    return f"{n / 1024:.2f} KiB"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, exit_on_signal)
    chosen = servers(args.ioserver_args)
    if args.only:
        wanted = {n.strip() for n in args.only.split(",") if n.strip()}
        unknown = wanted - {s.name for s in chosen}
        if unknown:
            raise SystemExit(f"--only: unknown server(s) {', '.join(sorted(unknown))}")
        chosen = [s for s in chosen if s.name in wanted]
    nofile = raise_nofile(args.conns + args.warm + FD_MARGIN)
    print(
        f"idle memory: {args.conns:,} idle connections (after {args.warm} warm-up ones), "
        f"{args.settle:g} s settle; RLIMIT_NOFILE {nofile}; python {platform.python_version()}, "
        f"{platform.machine()}"
    )

    results: dict[str, Result] = {}
    failed: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="ioserver-idle-") as tmpdir:
        for s in chosen:
            if s.skip_reason:
                print(f"{s.name:<14} skipped: {s.skip_reason}")
                continue
            try:
                r = measure(s, args, Path(tmpdir))
            except RunFailed as e:
                failed[s.name] = str(e)
                print(f"{s.name:<14} FAILED: " + str(e).replace("\n", "\n    "), flush=True)
                continue
            results[s.name] = r
            mib_before, mib_after = r.rss_before / 2**20, r.rss_after / 2**20
            print(
                f"{s.name:<14} RSS {mib_before:7.1f} MiB -> {mib_after:7.1f} MiB"
                f"  = {r.per_conn:8,.0f} B ({kib(r.per_conn)}) per idle connection",
                flush=True,
            )

    ratios: dict[str, float] = {}
    ref = results.get("asyncio")
    if results:
        print()
    for name, r in results.items():
        if ref is not None and name != ref.server and ref.per_conn > 0:
            ratios[name] = r.per_conn / ref.per_conn
            extra = r.per_conn - ref.per_conn
            print(
                f"ratio {name}/asyncio = {ratios[name]:.2f}x per connection "
                f"({extra:+,.0f} B = {extra / 1024:+.2f} KiB)"
            )
    for name, r in results.items():
        if name.startswith("ioserver"):
            verdict = "meets" if r.per_conn <= GOAL_BYTES else "misses"
            print(f"{name}: {kib(r.per_conn)} per idle connection {verdict} the <= 2 KiB goal")

    if args.json:
        doc: dict[str, Any] = {
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "python": platform.python_version(),
            "servers": {s.name: [*s.argv, "--port", "PORT", *s.extra] for s in chosen},
            "results": {
                k: {**dataclasses.asdict(v), "per_conn_bytes": v.per_conn}
                for k, v in results.items()
            },
            "failed": failed,
            "ratios_vs_asyncio": ratios,
        }
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 0 if results and not failed else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit("\ninterrupted")
