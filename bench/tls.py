"""TLS benchmark: ioserver's TLS (in the I/O thread) against asyncio's and uvloop's ``ssl=``.

Two loads, each server in turn as a subprocess on a free loopback port, with certificates
trustme makes for the run (``pip install trustme``: the test extras have it):

* **TLS echo**: bench/loadgen.c built with ``-DLOADGEN_TLS`` (its closed loop through
  OpenSSL; ``gcc -O2 -DLOADGEN_TLS ... -lssl -lcrypto``), CONNS connections x one
  SIZE-byte message in flight, handshakes before the clock starts:

    ioserver           examples/echo.py --tls (TLS in the I/O thread: ports.listen_tcp(tls=))
    ioserver-looptls   bench/servers/tls_echo_loop.py: a plaintext port, anyio's TLSStream
                       over ports.PortStream (TLS in the event loop's thread)
    asyncio            bench/servers/asyncio_streams.py --tls-cert (asyncio streams, ssl=)
    uvloop             the same on uvloop

* **HTTPS**: ``wrk -t2 -c100 --latency https://...`` on one file of --size bytes (wrk's
  connections are kept alive: the handshakes are a start-up cost), when wrk is installed:

    ioserver           examples/httpd.py --tls-cert/--tls-key
    asyncio, uvloop    bench/servers/http_asyncio.py --tls-cert (the same h11 handler)

For each run the CPU time of the server's threads (``/proc/PID/task/*/stat``, utime +
stime, over the measured window) is printed per message: ``main`` is the event loop's
thread, ``others`` the rest (in an ioserver process, the I/O thread).  With --rounds N
the servers alternate and each keeps its best run.

usage: python bench/tls.py [--conns 100] [--size 64] [--seconds 5] [--warmup 1] [--rounds 1]
                           [--http-seconds 5] [--file-size 1200] [--only NAME,...]
                           [--no-http] [--json FILE]

Prints a line per run, then each server's best run and ratio = ioserver / that server
(msgs/s or requests/s; above 1: ioserver is faster).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _servers import BENCH_DIR, REPO_ROOT, RunFailed, Server, free_port, running, tail

SERVERS_DIR = BENCH_DIR / "servers"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def make_certificates(directory: Path) -> tuple[str, str]:
    """A certificate for localhost/127.0.0.1 and its key, as PEM files in ``directory``."""
    try:
        import trustme
    except ImportError:
        raise SystemExit("bench/tls.py needs trustme: pip install trustme") from None
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    for index, blob in enumerate(cert.cert_chain_pems):
        blob.write_to_path(str(cert_path), append=index > 0)
    cert.private_key_pem.write_to_path(str(key_path))
    return str(cert_path), str(key_path)


def build_loadgen(directory: Path) -> str:
    binary = directory / "tls_loadgen"
    done = subprocess.run(
        # bench/loadgen.c, built with its TLS transport.
        [
            *("gcc", "-O2", "-DLOADGEN_TLS", "-o", str(binary)),
            *(str(BENCH_DIR / "loadgen.c"), "-lssl", "-lcrypto"),
        ],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise SystemExit(f"bench/tls.py: building tls_loadgen failed (libssl-dev?):\n{done.stderr}")
    return str(binary)


def thread_cpu(pid: int) -> dict[str, float]:
    """Seconds of CPU (user + system) of process ``pid``: ``main`` (its first thread: the
    event loop's) and ``others`` (every other thread: in an ioserver process, the I/O
    thread - Python 3.11 gives threads no OS name to tell them apart by)."""
    cpu: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:
            continue
        name = "main" if task.name == str(pid) else "others"
        fields = stat[stat.rindex(")") + 2 :].split()
        seconds = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
        cpu[name] = cpu.get(name, 0.0) + seconds
    return cpu


def cpu_per_message(before: dict[str, float], after: dict[str, float], messages: float) -> str:
    """``name=Nus`` per thread that used CPU in the window, per message."""
    parts = []
    for name in sorted(after, key=lambda n: -(after[n] - before.get(n, 0.0))):
        used = after[name] - before.get(name, 0.0)
        if used > 0 and messages > 0:
            parts.append(f"{name}={used / messages * 1e6:.1f}us")
    return " ".join(parts) or "-"


def echo_servers(cert: str, key: str) -> dict[str, Server]:
    python = sys.executable
    tls = ("--tls-cert", cert, "--tls-key", key)
    return {
        "ioserver": Server(
            "ioserver",
            (python, str(REPO_ROOT / "examples" / "echo.py"), "--tls", *tls),
            is_ioserver=True,
        ),
        "ioserver-looptls": Server(
            "ioserver-looptls",
            (python, str(SERVERS_DIR / "tls_echo_loop.py"), *tls),
            is_ioserver=True,
        ),
        "asyncio": Server("asyncio", (python, str(SERVERS_DIR / "asyncio_streams.py"), *tls)),
        "uvloop": Server(
            "uvloop",
            (python, str(SERVERS_DIR / "asyncio_streams.py"), "--uvloop", *tls),
        ),
    }


def http_servers(cert: str, key: str, root: str) -> dict[str, Server]:
    python = sys.executable
    tls = ("--tls-cert", cert, "--tls-key", key)
    return {
        "ioserver": Server(
            "ioserver",
            (
                python,
                str(REPO_ROOT / "examples" / "httpd.py"),
                "--root",
                root,
                "--no-access-log",
                *tls,
            ),
            is_ioserver=True,
        ),
        "asyncio": Server(
            "asyncio",
            (
                python,
                str(SERVERS_DIR / "http_asyncio.py"),
                "--root",
                root,
                *tls,
            ),
        ),
        "uvloop": Server(
            "uvloop",
            (
                python,
                str(SERVERS_DIR / "http_asyncio.py"),
                "--root",
                root,
                "--uvloop",
                *tls,
            ),
        ),
    }


def measure_echo(
    loadgen: str, server: Server, args: argparse.Namespace, tmp: Path
) -> dict[str, Any]:
    port = free_port()
    with tempfile.TemporaryFile("w+", dir=tmp) as err, running(server, port, err) as proc:
        command = [
            loadgen,
            str(port),
            str(args.conns),
            str(args.size),
            str(args.seconds),
            str(args.warmup),
        ]
        load = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(args.warmup + 0.5)  # connects and handshakes, then the warm-up
        before, t0 = thread_cpu(proc.pid), time.monotonic()
        time.sleep(max(args.seconds - 1.0, 0.5))
        after, t1 = thread_cpu(proc.pid), time.monotonic()
        out, lg_err = load.communicate(timeout=args.seconds + args.warmup + 60)
        if load.returncode != 0:
            raise RunFailed(
                f"tls_loadgen exited with {load.returncode}",
                f"{lg_err}\nserver stderr:\n{tail(err)}",
            )
    fields = dict(item.split("=") for item in out.split())
    rate = float(fields["msgs_s"])
    return {
        "rate": rate,
        "p99_us": int(fields["p99_us"]),
        "lg_cpu": fields["lg_cpu"],
        "cpu": cpu_per_message(before, after, rate * (t1 - t0)),
        "cpu_total": sum(after.values()) - sum(before.values()),
        "window": t1 - t0,
    }


def measure_http(wrk: str, server: Server, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    port = free_port()
    with tempfile.TemporaryFile("w+", dir=tmp) as err, running(server, port, err) as proc:
        url = f"https://127.0.0.1:{port}/file.bin"
        check = subprocess.run(
            ["curl", "-sSk", "-o", "/dev/null", "-w", "%{http_code}", url],
            capture_output=True,
            text=True,
            timeout=20,
        )
        if check.stdout != "200":
            raise RunFailed(f"GET {url} answered {check.stdout!r}", check.stderr + tail(err))
        command = [wrk, "-t2", f"-c{args.wrk_conns}", f"-d{args.http_seconds}s", "--latency", url]
        load = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(1.0)
        before, t0 = thread_cpu(proc.pid), time.monotonic()
        time.sleep(max(args.http_seconds - 1.5, 0.5))
        after, t1 = thread_cpu(proc.pid), time.monotonic()
        out, wrk_err = load.communicate(timeout=args.http_seconds + 60)
        if load.returncode != 0:
            raise RunFailed(f"wrk exited with {load.returncode}", wrk_err)
    match = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if match is None:
        raise RunFailed("no Requests/sec in wrk's output", out[-2000:])
    rate = float(match.group(1))
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)", out)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: (.*)", out)
    return {
        "rate": rate,
        "p99": f"{p99.group(1)}{p99.group(2)}" if p99 else "?",
        "errors": (int(errors.group(1)) if errors else 0),
        "socket_errors": socket_errors.group(1) if socket_errors else "",
        "cpu": cpu_per_message(before, after, rate * (t1 - t0)),
    }


def report(kind: str, unit: str, best: dict[str, dict[str, Any]]) -> None:
    print(f"\n{kind}: best of each server")
    for name, result in best.items():
        print(f"  {name:17s} {result['rate']:>10.0f} {unit}  cpu/msg: {result['cpu']}")
    ours = best.get("ioserver")
    if ours:
        for name, result in best.items():
            if name != "ioserver" and result["rate"]:
                print(f"  ratio ioserver/{name}: {ours['rate'] / result['rate']:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conns", type=int, default=100)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--http-seconds", type=int, default=5)
    parser.add_argument("--wrk-conns", type=int, default=100)
    parser.add_argument("--file-size", type=int, default=1200)
    parser.add_argument("--only", default="", help="server names, comma-separated")
    parser.add_argument("--no-http", action="store_true", help="skip the HTTPS load")
    parser.add_argument("--json", help="write every run to this file")
    args = parser.parse_args()
    only = {name for name in args.only.split(",") if name}
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-tls-") as directory:
        tmp = Path(directory)
        cert, key = make_certificates(tmp)
        loadgen = build_loadgen(tmp)
        load = os.getloadavg()
        print(
            f"load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} "
            f"({os.cpu_count()} CPUs)",
            flush=True,
        )
        servers = {n: s for n, s in echo_servers(cert, key).items() if not only or n in only}
        best: dict[str, dict[str, Any]] = {}
        print(
            f"TLS echo: {args.conns} connections x {args.size} B ping-pong, "
            f"{args.seconds:g} s measured",
            flush=True,
        )
        for rnd in range(args.rounds):
            for name, server in servers.items():
                try:
                    result = measure_echo(loadgen, server, args, tmp)
                except RunFailed as exc:
                    print(f"  {name}: FAILED {exc}", flush=True)
                    continue
                print(
                    f"  round {rnd + 1} {name:17s} {result['rate']:>9.0f} msgs/s "
                    f"p99 {result['p99_us']} us  loadgen cpu {result['lg_cpu']}  "
                    f"cpu/msg: {result['cpu']}",
                    flush=True,
                )
                runs.append({"load": "echo", "server": name, "round": rnd + 1, **result})
                if name not in best or result["rate"] > best[name]["rate"]:
                    best[name] = result
        report("TLS echo", "msgs/s", best)
        wrk = shutil.which("wrk")
        if not args.no_http and wrk is None:
            print("\nHTTPS: skipped, wrk is not installed (apt-get install wrk)")
        elif not args.no_http:
            root = tmp / "root"
            root.mkdir()
            (root / "file.bin").write_bytes(b"x" * args.file_size)
            servers = {
                n: s for n, s in http_servers(cert, key, str(root)).items() if not only or n in only
            }
            best = {}
            print(
                f"\nHTTPS: wrk -t2 -c{args.wrk_conns} -d{args.http_seconds}s, "
                f"a {args.file_size}-byte file",
                flush=True,
            )
            for rnd in range(args.rounds):
                for name, server in servers.items():
                    try:
                        result = measure_http(wrk, server, args, tmp)
                    except RunFailed as exc:
                        print(f"  {name}: FAILED {exc}", flush=True)
                        continue
                    print(
                        f"  round {rnd + 1} {name:17s} {result['rate']:>9.0f} req/s "
                        f"p99 {result['p99']}  errors {result['errors']} "
                        f"{result['socket_errors']}  cpu/req: {result['cpu']}",
                        flush=True,
                    )
                    runs.append({"load": "https", "server": name, "round": rnd + 1, **result})
                    if name not in best or result["rate"] > best[name]["rate"]:
                        best[name] = result
            report("HTTPS", "req/s", best)
        load = os.getloadavg()
        print(f"\nload average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=2))


if __name__ == "__main__":
    main()
