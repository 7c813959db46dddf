"""Echo benchmark: ioserver's examples/echo.py against reference Python echo servers.

Compiles the C load generator (bench/loadgen.c) with ``gcc -O2``, then for each selected server:
starts it as a subprocess on a free loopback port, waits until it accepts connections, drives it
with the load generator (closed-loop ping-pong: CONNS connections, one SIZE-byte message in flight
on each), and stops it (its whole process group). With several rounds the servers alternate
within each round and the best msgs/s run of each server is kept.

Servers (``--only`` names):
  ioserver         examples/echo.py --port PORT [args]; more variants with --variant NAME="args"
  ioserver-packet4 examples/framed_echo.py --packet 4 --port PORT [args], driven with 4-byte
                   length-prefixed requests (loadgen framing len4); added by --framed, one per
                   ioserver variant (NAME-packet4), or by naming it in --only
  asyncio          asyncio streams (bench/servers/asyncio_streams.py)
  uvloop-streams   asyncio streams on uvloop
  uvloop-protocol  bare asyncio.Protocol on uvloop (bench/servers/uvloop_protocol.py)
  trio             trio.serve_tcp (bench/servers/trio_echo.py)

usage:
  python bench/echo.py [--conns 100] [--size 64] [--seconds 5] [--warmup 1] [--rounds 1]
                       [--only NAME[,NAME...]] [--ioserver-args "..."] [--variant NAME="args"]...
                       [--framed] [--json FILE]

Each run also reads the server's CPU time per thread from /proc/PID/task/*/stat over the
measured seconds (Linux), and reports it in microseconds per message: ``main µs/msg`` is the
process's main thread (the event loop), ``other µs/msg`` every other thread together (the I/O
thread of ioserver, Python's or the native one; 0 for the one-thread servers).

Prints one line per server per round, then a table with each server's best run and, for every
ioserver variant, ratio = ioserver msgs/s / that server's msgs/s (above 1: ioserver is faster) and
p99 ratio = ioserver p99 / that server's p99 (below 1: ioserver's tail latency is lower). With
--framed it also prints, per ioserver variant, packet4/raw = NAME-packet4 msgs/s / NAME msgs/s: what
framing in the I/O thread costs (or saves) against raw echo.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _servers import BENCH_DIR, REPO_ROOT, RunFailed, Server, free_port, running, tail

SERVERS_DIR = BENCH_DIR / "servers"
LOADGEN_SRC = BENCH_DIR / "loadgen.c"
IOSERVER_ECHO = REPO_ROOT / "examples" / "echo.py"
IOSERVER_FRAMED_ECHO = REPO_ROOT / "examples" / "framed_echo.py"
FRAMED_SUFFIX = "-packet4"
FRAMED_DEFAULT_PACKET_SIZE = 1 << 20  # examples/framed_echo.py's default --packet-size

REFERENCES = (
    "asyncio",
    "uvloop-streams",
    "uvloop-protocol",
    "trio",
    "ioserver-daemon",
    "ioserver-workers1",
    "ioserver-workers2",
)
LOADGEN_SLACK_S = 30.0  # connect time and the like, on top of warm-up + measured seconds
LG_CPU_WARN = 90.0  # load generator CPU% above which it may be the bottleneck


@dataclasses.dataclass(frozen=True)
class EchoServer(Server):
    """An echo server to benchmark (see ``_servers.Server``).

    ``framing`` is the load generator's FRAMING argument: "raw", or "len4" for a server that
    frames with a 4-byte big-endian length header; ``raw_base`` names the raw ioserver variant a
    framed one is compared with."""

    framing: str = "raw"
    raw_base: str | None = None


@dataclasses.dataclass(frozen=True)
class Result:
    server: str
    round: int
    msgs_s: float
    p50_us: float
    p99_us: float
    p999_us: float
    lg_cpu: float
    #: CPU µs per message of the server's main thread and of its other threads (None: no /proc)
    main_us: float | None = None
    other_us: float | None = None


# --------------------------------------------------------------------------------------------
# servers


def reference_servers() -> dict[str, EchoServer]:
    py = sys.executable
    no_uvloop = None if importlib.util.find_spec("uvloop") else "uvloop is not importable"
    no_trio = None if importlib.util.find_spec("trio") else "trio is not importable"
    streams = str(SERVERS_DIR / "asyncio_streams.py")
    return {
        "asyncio": EchoServer("asyncio", (py, streams)),
        "uvloop-streams": EchoServer(
            "uvloop-streams", (py, streams), ("--uvloop",), skip_reason=no_uvloop
        ),
        "uvloop-protocol": EchoServer(
            "uvloop-protocol",
            (py, str(SERVERS_DIR / "uvloop_protocol.py")),
            skip_reason=no_uvloop,
        ),
        "trio": EchoServer("trio", (py, str(SERVERS_DIR / "trio_echo.py")), skip_reason=no_trio),
        # examples/echo.py's actors in this process, its sockets in an ioserver daemon.
        "ioserver-daemon": EchoServer(
            "ioserver-daemon", (py, str(SERVERS_DIR / "echo_via_daemon.py")), is_ioserver=True
        ),
        # examples/echo.py under `ioserver serve --workers N` (SO_REUSEPORT, share-nothing).
        **{
            f"ioserver-workers{n}": EchoServer(
                f"ioserver-workers{n}",
                (py, str(SERVERS_DIR / "echo_workers.py")),
                ("--workers", str(n)),
                is_ioserver=True,
            )
            for n in (1, 2)
        },
    }


def ioserver_variants(common: str, variants: list[str] | None) -> list[EchoServer]:
    """``--variant NAME="args"`` entries (default: one "ioserver" variant), each with the
    ``--ioserver-args`` appended."""
    skip = None if IOSERVER_ECHO.is_file() else f"{IOSERVER_ECHO} does not exist (yet)"
    specs = variants or ["ioserver="]
    out: list[EchoServer] = []
    for spec in specs:
        name, sep, args = spec.partition("=")
        name = name.strip()
        if not sep or not name:
            raise SystemExit(f'--variant wants NAME="args", got {spec!r}')
        if name in REFERENCES or any(s.name == name for s in out):
            raise SystemExit(f"--variant name {name!r} is already taken")
        extra = (*shlex.split(args), *shlex.split(common))
        argv = (sys.executable, str(IOSERVER_ECHO))
        out.append(EchoServer(name, argv, extra, is_ioserver=True, skip_reason=skip))
    return out


def framed_variants(raw: list[EchoServer], size: int) -> list[EchoServer]:
    """For each raw ioserver variant NAME, NAME-packet4: examples/framed_echo.py --packet 4 with
    the same extra args, driven with len4 framing (``size`` bytes including the 4-byte header)."""
    skip = None if IOSERVER_FRAMED_ECHO.is_file() else f"{IOSERVER_FRAMED_ECHO} does not exist"
    packet = ["--packet", "4"]
    if size - 4 > FRAMED_DEFAULT_PACKET_SIZE:
        packet += ["--packet-size", str(size - 4)]
    argv = (sys.executable, str(IOSERVER_FRAMED_ECHO))
    return [
        EchoServer(
            v.name + FRAMED_SUFFIX,
            argv,
            (*packet, *v.extra),
            is_ioserver=True,
            skip_reason=v.skip_reason or skip,
            framing="len4",
            raw_base=v.name,
        )
        for v in raw
    ]


def select_servers(
    raw: list[EchoServer],
    framed: list[EchoServer],
    refs: list[EchoServer],
    args: argparse.Namespace,
) -> list[EchoServer]:
    """The servers to run, in order, each framed variant right after its raw variant.

    Without --only: the raw variants, their framed ones with --framed, and the references. With
    --only: the servers named, plus (with --framed) the framed variants of the raw ones named."""
    taken = {s.name for s in [*raw, *refs]}
    for f in framed:
        if f.name in taken:
            raise SystemExit(f"--variant name {f.name!r} clashes with a framed variant's name")
    by_base = {f.raw_base: f for f in framed}
    ordered: list[EchoServer] = []
    for v in raw:
        ordered += [v, by_base[v.name]]
    ordered += refs
    if not args.only:
        return [s for s in ordered if s.raw_base is None or args.framed]
    wanted = {n.strip() for n in args.only.split(",") if n.strip()}
    unknown = wanted - {s.name for s in ordered}
    if unknown:
        known = ", ".join(s.name for s in ordered)
        raise SystemExit(f"--only: unknown server(s) {', '.join(sorted(unknown))}; known: {known}")
    return [
        s
        for s in ordered
        if s.name in wanted or (args.framed and s.raw_base is not None and s.raw_base in wanted)
    ]


# --------------------------------------------------------------------------------------------
# load generator


def find_gcc() -> str:
    gcc = shutil.which("gcc")
    if gcc is None:
        raise SystemExit(
            "bench/echo.py: gcc not found; the load generator is C. "
            "Install it with: apt-get install gcc"
        )
    return gcc


def build_loadgen(gcc: str, tmp: Path) -> Path:
    exe = tmp / "loadgen"
    done = subprocess.run(
        [gcc, "-O2", "-Wall", "-o", str(exe), str(LOADGEN_SRC)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"bench/echo.py: compiling {LOADGEN_SRC} failed:\n{done.stderr}")
    return exe


def parse_loadgen(line: str) -> dict[str, float]:
    fields = dict(tok.split("=", 1) for tok in line.split() if "=" in tok)
    return {k: float(v.rstrip("%")) for k, v in fields.items()}


def thread_cpu(pid: int) -> dict[int, float] | None:
    """CPU seconds (user + system) of each thread of process ``pid``, by thread id, from
    /proc/PID/task/*/stat; None where there is no /proc."""
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    times: dict[int, float] = {}
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            continue  # the thread ended
        times[int(tid)] = (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return times


def measure(
    server: EchoServer, rnd: int, loadgen: Path, args: argparse.Namespace, tmp: Path
) -> Result:
    port = free_port()
    with (
        (tmp / f"{server.name}.round{rnd}.stderr").open("w+") as err,
        running(server, port, err) as proc,
    ):
        cmd = [
            str(loadgen),
            str(port),
            str(args.conns),
            str(args.size),
            str(args.seconds),
            str(args.warmup),
            server.framing,
        ]
        try:
            with subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            ) as generator:
                # The CPU of the measured seconds only: after the warm-up, until the end.
                time.sleep(args.warmup)
                cpu_before = thread_cpu(proc.pid)
                stdout, stderr = generator.communicate(timeout=args.seconds + LOADGEN_SLACK_S)
                cpu_after = thread_cpu(proc.pid)
            done = subprocess.CompletedProcess(cmd, generator.returncode, stdout, stderr)
        except subprocess.TimeoutExpired as e:
            raise RunFailed(
                f"load generator did not finish in {e.timeout:.0f} s",
                f"server stderr:\n{tail(err)}",
            ) from e
        lg_said = done.stderr.strip() or f"load generator exit status {done.returncode}"
        if proc.poll() is not None:
            raise RunFailed(
                f"server exited with status {proc.returncode} during the run",
                f"{lg_said}\nserver stderr:\n{tail(err)}",
            )
        if done.returncode != 0:
            raise RunFailed(lg_said, f"server still running; its stderr:\n{tail(err)}")
    f = parse_loadgen(done.stdout)
    main_us = other_us = None
    if cpu_before is not None and cpu_after is not None and f.get("msgs_s"):
        messages = f["msgs_s"] * args.seconds
        spent = {tid: cpu_after[tid] - cpu_before.get(tid, 0.0) for tid in cpu_after}
        main_us = spent.get(proc.pid, 0.0) * 1e6 / messages
        other_us = sum(t for tid, t in spent.items() if tid != proc.pid) * 1e6 / messages
    try:
        return Result(
            server.name,
            rnd,
            f["msgs_s"],
            f["p50_us"],
            f["p99_us"],
            f["p999_us"],
            f["lg_cpu"],
            main_us,
            other_us,
        )
    except KeyError as e:
        raise RunFailed("unexpected load generator output", repr(done.stdout)) from e


# --------------------------------------------------------------------------------------------
# reporting


def ratio(num: float, den: float) -> float | None:
    return num / den if den > 0 else None


def fmt_ratio(r: float | None) -> str:
    return "n/a" if r is None else f"{r:.2f}x"


def print_table(
    servers: list[EchoServer], best: dict[str, Result], failed: dict[str, str]
) -> dict[str, dict[str, dict[str, float | None]]]:
    """Print the summary table; return the ratios as {variant: {server: {...}}}."""
    variants = [s for s in servers if s.is_ioserver and s.name in best]
    one = len(variants) == 1
    ratio_heads: list[str] = []
    for v in variants:
        ratio_heads += ["ratio", "p99 ratio"] if one else [f"{v.name} ratio", f"{v.name} p99r"]
    heads = [
        "server",
        "msgs/s",
        "p50 µs",
        "p99 µs",
        "p99.9 µs",
        "lg cpu",
        "main µs/msg",
        "other µs/msg",
        *ratio_heads,
    ]
    rows: list[list[str]] = []
    notes: dict[str, str] = {}  # skipped or failed servers: why, instead of figures
    ratios: dict[str, dict[str, dict[str, float | None]]] = {v.name: {} for v in variants}
    for s in servers:
        if s.name not in best:
            why = s.skip_reason or "failed: " + failed.get(s.name, "not run")
            notes[s.name] = f"({why})"
            continue
        r = best[s.name]
        row = [
            s.name,
            f"{r.msgs_s:,.0f}",
            f"{r.p50_us:.0f}",
            f"{r.p99_us:.0f}",
            f"{r.p999_us:.0f}",
            f"{r.lg_cpu:.0f}%",
            "n/a" if r.main_us is None else f"{r.main_us:.2f}",
            "n/a" if r.other_us is None else f"{r.other_us:.2f}",
        ]
        for v in variants:
            if v.name == s.name:
                row += ["-", "-"]
                continue
            iv = best[v.name]
            rr, pr = ratio(iv.msgs_s, r.msgs_s), ratio(iv.p99_us, r.p99_us)
            ratios[v.name][s.name] = {"msgs_s_ratio": rr, "p99_ratio": pr}
            row += [fmt_ratio(rr), fmt_ratio(pr)]
        rows.append(row)
    widths = [max([len(h), *(len(row[i]) for row in rows)]) for i, h in enumerate(heads)]
    widths[0] = max([widths[0], *(len(n) for n in notes)])

    def line(cells: list[str]) -> str:
        rest = (c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True))
        return "  ".join([cells[0].ljust(widths[0]), *rest])

    print()
    print(line(heads))
    print("  ".join("-" * w for w in widths))
    by_name = {row[0]: row for row in rows}
    for s in servers:
        print(
            line(by_name[s.name])
            if s.name in by_name
            else f"{s.name.ljust(widths[0])}  {notes[s.name]}"
        )
    if any(ratios.values()):
        print()
        who = variants[0].name if one else "<variant>"
        print(
            f"ratio = {who} msgs/s / row's msgs/s (>1: ioserver faster); "
            f"p99 ratio = {who} p99 / row's p99 (<1: ioserver's tail lower)"
        )
    return ratios


def print_framing_ratios(
    servers: list[EchoServer], best: dict[str, Result]
) -> dict[str, dict[str, str | float | None]]:
    """For each framed variant measured along with its raw one, print and return packet4/raw:
    the ratios of their msgs/s and of their p99 latencies."""
    out: dict[str, dict[str, str | float | None]] = {}
    for s in servers:
        if s.raw_base is None or s.name not in best or s.raw_base not in best:
            continue
        f, r = best[s.name], best[s.raw_base]
        rr, pr = ratio(f.msgs_s, r.msgs_s), ratio(f.p99_us, r.p99_us)
        out[s.name] = {"raw": s.raw_base, "msgs_s_ratio": rr, "p99_ratio": pr}
        if len(out) == 1:
            print()
        print(
            f"packet4/raw: {s.name} {f.msgs_s:,.0f} msgs/s / {s.raw_base} {r.msgs_s:,.0f} msgs/s"
            f" = {fmt_ratio(rr)}  (p99: {f.p99_us:.0f} / {r.p99_us:.0f} µs = {fmt_ratio(pr)})"
        )
    return out


# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Echo benchmark: ioserver's examples/echo.py vs reference Python servers.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--conns", type=int, default=100, help="concurrent connections")
    p.add_argument("--size", type=int, default=64, help="message size in bytes")
    p.add_argument("--seconds", type=float, default=5.0, help="measured seconds per run")
    p.add_argument("--warmup", type=float, default=1.0, help="warm-up seconds, not counted")
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="rounds; servers alternate within each, best msgs/s per server kept",
    )
    p.add_argument(
        "--only",
        metavar="NAME[,NAME]",
        help=f"servers to run (ioserver variant names, {', '.join(REFERENCES)})",
    )
    p.add_argument(
        "--ioserver-args",
        default="",
        metavar='"ARGS"',
        help='extra args for every ioserver variant, e.g. "--backend trio"',
    )
    p.add_argument(
        "--variant",
        action="append",
        metavar='NAME="ARGS"',
        help="an ioserver variant: examples/echo.py run with ARGS (repeatable; "
        "replaces the default single 'ioserver' variant)",
    )
    p.add_argument(
        "--framed",
        action="store_true",
        help="also run each ioserver variant NAME as NAME-packet4: examples/framed_echo.py "
        "--packet 4, loaded with 4-byte length-prefixed requests of --size bytes in all; "
        "prints packet4/raw msgs/s ratios",
    )
    p.add_argument("--json", type=Path, metavar="FILE", help="also write results as JSON")
    a = p.parse_args(argv)
    if a.conns < 1 or a.size < 1 or a.seconds <= 0 or a.warmup < 0 or a.rounds < 1:
        p.error("need --conns >= 1, --size >= 1, --seconds > 0, --warmup >= 0, --rounds >= 1")
    return a


def exit_on_signal(signum: int, _frame: object) -> None:
    """SIGTERM/SIGHUP: unwind like Ctrl-C does, so the servers (own sessions) get stopped."""
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, exit_on_signal)
    raw = ioserver_variants(args.ioserver_args, args.variant)
    framed = framed_variants(raw, args.size)
    servers = select_servers(raw, framed, list(reference_servers().values()), args)
    any_framed = any(s.framing == "len4" for s in servers)
    if any_framed and args.size < 4:
        raise SystemExit("the packet-4 servers need --size >= 4 (the 4-byte header included)")

    gcc = find_gcc()
    print(
        f"echo benchmark: {args.conns} conns x {args.size} B, {args.warmup:g} s warm-up + "
        f"{args.seconds:g} s measured, {args.rounds} round(s); "
        f"{'packet-4 servers: 4-byte header + payload in the size; ' if any_framed else ''}"
        f"python {platform.python_version()}, {os.cpu_count()} CPUs, {platform.machine()}"
    )
    for s in servers:
        if s.skip_reason:
            print(f"skipping {s.name}: {s.skip_reason}")
    runnable = [s for s in servers if not s.skip_reason]

    best: dict[str, Result] = {}
    runs: list[Result] = []
    failed: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="ioserver-bench-") as tmpdir:
        tmp = Path(tmpdir)
        loadgen = build_loadgen(gcc, tmp)
        for rnd in range(1, args.rounds + 1):
            for s in runnable:
                label = f"round {rnd}/{args.rounds}  {s.name:<16}"
                try:
                    r = measure(s, rnd, loadgen, args, tmp)
                except RunFailed as e:
                    failed[s.name] = e.summary
                    print(f"{label} FAILED: " + str(e).replace("\n", "\n    "), flush=True)
                    continue
                runs.append(r)
                warn = "  (load generator near saturation)" if r.lg_cpu >= LG_CPU_WARN else ""
                print(
                    f"{label} msgs/s={r.msgs_s:>9,.0f}  p50={r.p50_us:>6.0f} µs  "
                    f"p99={r.p99_us:>6.0f} µs  p99.9={r.p999_us:>6.0f} µs  "
                    f"lg_cpu={r.lg_cpu:.0f}%  cpu/msg main={r.main_us or 0:.2f} "
                    f"other={r.other_us or 0:.2f} µs{warn}",
                    flush=True,
                )
                if s.name not in best or r.msgs_s > best[s.name].msgs_s:
                    best[s.name] = r

    ratios = print_table(servers, best, failed)
    framing_ratios = print_framing_ratios(servers, best)

    if args.json:
        doc: dict[str, Any] = {
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "servers": {
                s.name: {
                    "command": [*s.argv, "--port", "PORT", *s.extra],
                    "framing": s.framing,
                    "skipped": s.skip_reason,
                    "failed": failed.get(s.name),
                }
                for s in servers
            },
            "runs": [dataclasses.asdict(r) for r in runs],
            "best": {k: dataclasses.asdict(v) for k, v in best.items()},
            "ratios": ratios,
            "packet4_vs_raw": framing_ratios,
        }
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 0 if best else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit("\ninterrupted")
