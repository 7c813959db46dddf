"""Memory per idle connection: ioserver on each I/O core against asyncio and uvloop streams.

For each server: starts it as a subprocess (own session) on a free loopback port, waits until it
accepts connections, opens ``--warm`` connections and echoes one byte on each (so one-time costs
such as lazy imports and first-accept allocations are paid), reads the server's RSS (VmRSS in
/proc/PID/status), opens ``--conns`` more connections from this process and echoes one byte on
each (so the server has accepted every one and set it up for reading), lets them sit idle for
``--settle`` seconds and reads the RSS again. Growth / conns is the user-space memory the server
holds per idle connection; kernel socket memory is not in RSS and not counted. Then it closes the
connections and stops the server (SIGTERM to its process group, SIGKILL after 5 s).

With ``--split`` (the default) each Python server runs a second time under
bench/servers/traced.py, which turns tracemalloc on and reports the bytes it traces: the growth of
that figure per connection is the **Python part** (objects and their buffers: the port, its
window, the Conn handle, addresses, and for echo.py the actor's task and coroutines); RSS growth
less it is the **native part** (the native core's Rust state per connection, CPython's own C
structures, allocator overhead). Tracing costs memory of its own, so RSS comes from the untraced
run.

Servers (``--only`` names; CORE is each of ``--cores``, default native and python):
  ioserver-CORE        examples/echo.py --port PORT --core CORE (asyncio; uvloop when installed):
                       one actor (an anyio task) per connection
  ioserver-trio-CORE   the same with --backend trio
  ioserver-ports-CORE  bench/servers/ioserver_ports_only.py (IOSERVER_CORE=CORE): ports owned by
                       one Mailbox, no task per connection - ioserver's own cost per connection
  asyncio              asyncio streams (bench/servers/asyncio_streams.py), one task per connection
  uvloop               the same streams server on uvloop
  uvloop-protocol      a bare asyncio.Protocol on uvloop (bench/servers/uvloop_protocol.py), no task

usage:
  python bench/idle_memory.py [--conns 10000] [--warm 100] [--settle 1] [--only NAME[,NAME...]]
                              [--cores native,python] [--no-split] [--ioserver-args "..."]
                              [--json FILE]

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
TRACED = BENCH_DIR / "servers" / "traced.py"
UVLOOP_PROTOCOL = BENCH_DIR / "servers" / "uvloop_protocol.py"

IO_TIMEOUT_S = 10.0  # per connect / echo on one socket
BATCH = 500  # connections opened before their echoes are awaited (below the backlog of 1024)
FD_MARGIN = 64  # descriptors besides the connections: listener, epoll, pipes, stdio...
GOAL_BYTES = 1024  # issue 14's target for ioserver's own part: <= 1 KiB per idle connection


@dataclasses.dataclass(frozen=True)
class Result:
    server: str
    conns: int
    rss_before: int  # bytes, after the warm-up connections
    rss_after: int  # bytes, with conns more connections idle
    traced_before: int | None = None  # bytes tracemalloc traced (the --split run), or None
    traced_after: int | None = None

    @property
    def per_conn(self) -> float:
        return (self.rss_after - self.rss_before) / self.conns

    @property
    def python_per_conn(self) -> float | None:
        """The Python part per connection (tracemalloc's growth), or None without --split."""
        if self.traced_before is None or self.traced_after is None:
            return None
        return (self.traced_after - self.traced_before) / self.conns


def servers(ioserver_args: str, cores: list[str]) -> list[Server]:
    py = sys.executable
    no_ioserver = None if IOSERVER_ECHO.is_file() else f"{IOSERVER_ECHO} does not exist"
    no_trio = None if importlib.util.find_spec("trio") else "trio is not importable"
    no_uvloop = None if importlib.util.find_spec("uvloop") else "uvloop is not importable"
    common = tuple(shlex.split(ioserver_args))
    echo = (py, str(IOSERVER_ECHO))
    chosen: list[Server] = []
    for core in cores:
        # The ports-only server takes no --core: the environment chooses its core.
        env = (("IOSERVER_CORE", core),)
        chosen += [
            Server(
                f"ioserver-{core}",
                echo,
                ("--core", core, *common),
                is_ioserver=True,
                skip_reason=no_ioserver,
                env=env,
            ),
            Server(
                f"ioserver-trio-{core}",
                echo,
                ("--backend", "trio", "--core", core, *common),
                is_ioserver=True,
                skip_reason=no_ioserver or no_trio,
                env=env,
            ),
            Server(
                f"ioserver-ports-{core}",
                (py, str(PORTS_ONLY)),
                common,
                is_ioserver=True,
                skip_reason=no_ioserver,
                env=env,
            ),
        ]
    return [
        *chosen,
        Server("asyncio", (py, str(ASYNCIO_STREAMS))),
        Server("uvloop", (py, str(ASYNCIO_STREAMS)), ("--uvloop",), skip_reason=no_uvloop),
        Server("uvloop-protocol", (py, str(UVLOOP_PROTOCOL)), skip_reason=no_uvloop),
    ]


def traced(server: Server, outfile: Path) -> Server:
    """``server`` run under bench/servers/traced.py, which reports tracemalloc's bytes."""
    py, script, *rest = server.argv
    return dataclasses.replace(server, argv=(py, str(TRACED), str(outfile), script, *rest))


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


def read_traced(path: Path, settle: float) -> int:
    """The bytes traced.py reported last, after ``settle`` seconds (at least two reports)."""
    time.sleep(max(settle, 0.5))
    try:
        return int(path.read_text())
    except (OSError, ValueError) as e:
        raise RunFailed(f"no tracemalloc report in {path}: {e}") from e


def measure(
    server: Server, args: argparse.Namespace, tmp: Path, trace: Path | None = None
) -> Result:
    """RSS before and after ``--conns`` idle connections; with ``trace`` (the server runs
    under traced.py, writing there) tracemalloc's bytes instead, in ``traced_*``."""
    port = free_port()
    conns: list[socket.socket] = []
    deadline = time.monotonic() + args.timeout
    with (tmp / f"{server.name}.stderr").open("w+") as err, running(server, port, err) as proc:
        try:
            open_echoed(port, args.warm, conns, deadline)
            before = settled_rss(proc.pid, args.settle)
            traced_before = None if trace is None else read_traced(trace, args.settle)
            open_echoed(port, args.conns, conns, deadline)
            after = settled_rss(proc.pid, args.settle)
            traced_after = None if trace is None else read_traced(trace, args.settle)
            if proc.poll() is not None:
                raise RunFailed(f"server exited with status {proc.returncode}\n{tail(err)}")
        except RunFailed as e:
            raise RunFailed(f"{e}\nserver stderr:\n{tail(err)}") from e
        finally:
            for s in conns:
                s.close()
    return Result(server.name, args.conns, before, after, traced_before, traced_after)


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
        "--only",
        metavar="NAME[,NAME]",
        help="ioserver-CORE, ioserver-trio-CORE, ioserver-ports-CORE, asyncio, uvloop, "
        "uvloop-protocol",
    )
    p.add_argument(
        "--cores",
        default="native,python",
        metavar="CORE[,CORE]",
        help="the I/O cores the ioserver servers run on",
    )
    p.add_argument(
        "--no-split",
        dest="split",
        action="store_false",
        help="skip the tracemalloc run that splits the Python part from the native part",
    )
    p.add_argument(
        "--ioserver-args",
        default="",
        metavar='"ARGS"',
        help='extra args for the ioserver servers, e.g. "--no-uvloop"',
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


def parts(r: Result) -> str:
    python = r.python_per_conn
    if python is None:
        return ""
    return f"  (Python {python:6,.0f} B, native and other {r.per_conn - python:6,.0f} B)"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, exit_on_signal)
    cores = [c.strip() for c in args.cores.split(",") if c.strip()]
    chosen = servers(args.ioserver_args, cores)
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
    width = max((len(s.name) for s in chosen), default=14)
    with tempfile.TemporaryDirectory(prefix="ioserver-idle-") as tmpdir:
        for s in chosen:
            if s.skip_reason:
                print(f"{s.name:<{width}} skipped: {s.skip_reason}")
                continue
            try:
                r = measure(s, args, Path(tmpdir))
                if args.split:
                    report = Path(tmpdir) / f"{s.name}.traced"
                    t = measure(traced(s, report), args, Path(tmpdir), trace=report)
                    r = dataclasses.replace(
                        r, traced_before=t.traced_before, traced_after=t.traced_after
                    )
            except RunFailed as e:
                failed[s.name] = str(e)
                print(f"{s.name:<{width}} FAILED: " + str(e).replace("\n", "\n    "), flush=True)
                continue
            results[s.name] = r
            mib_before, mib_after = r.rss_before / 2**20, r.rss_after / 2**20
            print(
                f"{s.name:<{width}} RSS {mib_before:7.1f} MiB -> {mib_after:7.1f} MiB"
                f"  = {r.per_conn:7,.0f} B ({kib(r.per_conn)}) per idle connection" + parts(r),
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
    # ioserver's own part: the ports-only server's whole growth (the I/O half and the
    # port objects, no actor; its owner Mailbox's set of ports is in it too), split into
    # the native part and the Python part; echo.py's Python part beyond it is the actor.
    for core in cores:
        ports_only = results.get(f"ioserver-ports-{core}")
        if ports_only is None:
            continue
        verdict = "meets" if ports_only.per_conn <= GOAL_BYTES else "misses"
        line = (
            f"{core} core: ioserver's own part (ports-only) {kib(ports_only.per_conn)} per idle "
            f"connection {verdict} the <= 1 KiB goal"
        )
        python = ports_only.python_per_conn
        if python is not None:
            line += f": native and other {kib(ports_only.per_conn - python)}, Python {kib(python)}"
            echo = results.get(f"ioserver-{core}")
            if echo is not None and echo.python_per_conn is not None:
                actor = echo.python_per_conn - python
                line += f"; echo.py's actor (its task, Python) {kib(actor)} more"
        print(line)

    if args.json:
        doc: dict[str, Any] = {
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "python": platform.python_version(),
            "servers": {s.name: [*s.argv, "--port", "PORT", *s.extra] for s in chosen},
            "results": {
                k: {
                    **dataclasses.asdict(v),
                    "per_conn_bytes": v.per_conn,
                    "python_per_conn_bytes": v.python_per_conn,
                }
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
