"""TUN benchmark: packets/s through a TUN port against a plain os.read/os.write loop.

Makes a network namespace with a TUN device at 198.18.0.1/30 (the benchmarking range,
never routed outside the namespace), runs itself inside it, and measures on the same
device, one reader or writer at a time:

  in   packets the kernel routes to the device (a separate sender process blasts UDP
       datagrams of SIZE bytes to 198.18.0.2 for SECONDS), counted by the reader:
       ioserver's ``ports.open_tun`` (``async for`` over the port, asyncio) against
       ``os.read`` on a blocking descriptor.  What the reader does not take in time the
       kernel drops, so this is the reader's rate.
  out  COUNT UDP packets of SIZE bytes to 198.18.0.1 written to the device:
       ``await port.send(packet)`` until the I/O thread has written them all, against an
       ``os.write`` loop.

usage (as root, Linux):
  python bench/tun.py [--seconds 3] [--count 200000] [--size 64]

Prints one line per measurement and the ratios ioserver / plain (above 1: ioserver is
faster).
"""

from __future__ import annotations

import argparse
import fcntl
import os
import socket
import struct
import subprocess
import sys
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
LOCAL, REMOTE = "198.18.0.1", "198.18.0.2"
DEVICE = "benchtun0"
TUNSETIFF, IFF_TUN, IFF_NO_PI = 0x400454CA, 0x0001, 0x1000


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def udp_packet(size: int, dport: int) -> bytes:
    """An IPv4 UDP packet of ``size`` payload bytes from REMOTE:9 to LOCAL:dport (UDP
    checksum 0: none, as IPv4 allows)."""
    length = 8 + size
    header = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        20 + length,
        0,
        0x4000,
        64,
        socket.IPPROTO_UDP,
        0,
        socket.inet_aton(REMOTE),
        socket.inet_aton(LOCAL),
    )
    header = header[:10] + struct.pack("!H", checksum(header)) + header[12:]
    return header + struct.pack("!HHHH", 9, dport, length, 0) + b"x" * size


def plain_open(blocking: bool) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | (0 if blocking else os.O_NONBLOCK))
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", DEVICE.encode(), IFF_TUN | IFF_NO_PI))
    return fd


def blast(size: int, seconds: float) -> subprocess.Popen[bytes]:
    code = (
        "import socket, time\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        f"data = b'x' * {size}; end = time.monotonic() + {seconds}\n"
        "while time.monotonic() < end:\n"
        "    for _ in range(1000):\n"
        f"        s.sendto(data, ({REMOTE!r}, 9))\n"
    )
    return subprocess.Popen([sys.executable, "-c", code])


def plain_in(size: int, seconds: float) -> float:
    fd = plain_open(blocking=True)
    try:
        sender = blast(size, seconds + 1)
        os.read(fd, 65536)  # the sender has started
        count, start = 0, time.monotonic()
        end = start + seconds
        while True:
            os.read(fd, 65536)
            count += 1
            if count % 1000 == 0 and time.monotonic() >= end:
                break
        elapsed = time.monotonic() - start
        sender.wait()
        return count / elapsed
    finally:
        os.close(fd)


def plain_out(size: int, count: int) -> float:
    fd = plain_open(blocking=False)
    packet = udp_packet(size, 9)
    try:
        start = time.monotonic()
        for _ in range(count):
            os.write(fd, packet)
        return count / (time.monotonic() - start)
    finally:
        os.close(fd)


def ioserver_in(size: int, seconds: float) -> float:
    import anyio

    import ioserver
    import ports

    async def main() -> float:
        async with ioserver.open() as ios, await ports.open_tun(ios, DEVICE) as port:
            sender = blast(size, seconds + 1)
            await port.receive()  # the sender has started
            count, start = 0, time.monotonic()
            end = start + seconds
            async for message in port:
                if isinstance(message, ports.Packet):
                    count += 1
                    if count % 1000 == 0 and time.monotonic() >= end:
                        break
            elapsed = time.monotonic() - start
            sender.wait()
            return count / elapsed

    return anyio.run(main)


def ioserver_out(size: int, count: int) -> float:
    import anyio

    import ioserver
    import ports

    packet = udp_packet(size, 9)

    async def main() -> float:
        async with ioserver.open() as ios, await ports.open_tun(ios, DEVICE) as port:
            start = time.monotonic()
            for _ in range(count):
                await port.send(packet)
            total = count * len(packet)
            while port.statistics().bytes_sent < total:  # noqa: ASYNC110  # the I/O thread
                await anyio.sleep(0.0005)
            return count / (time.monotonic() - start)

    return anyio.run(main)


def inside(options: argparse.Namespace) -> None:
    results = {}
    for name, run in (
        ("plain in", lambda: plain_in(options.size, options.seconds)),
        ("ioserver in", lambda: ioserver_in(options.size, options.seconds)),
        ("plain out", lambda: plain_out(options.size, options.count)),
        ("ioserver out", lambda: ioserver_out(options.size, options.count)),
    ):
        results[name] = run()
        print(f"{name:13} {results[name]:12,.0f} packets/s", flush=True)
    for direction in ("in", "out"):
        ratio = results[f"ioserver {direction}"] / results[f"plain {direction}"]
        print(f"ratio {direction:4} ioserver/plain = {ratio:.2f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds per 'in' run")
    parser.add_argument("--count", type=int, default=200_000, help="packets per 'out' run")
    parser.add_argument("--size", type=int, default=64, help="UDP payload bytes")
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.inside:
        inside(options)
        return 0
    namespace = f"iosrv-bench-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", namespace], check=True)
    try:
        # A persistent device, so that each reader or writer in turn attaches to it.
        run = ["ip", "-n", namespace]
        subprocess.run([*run, "tuntap", "add", DEVICE, "mode", "tun"], check=True)
        subprocess.run([*run, "addr", "add", f"{LOCAL}/30", "dev", DEVICE], check=True)
        subprocess.run([*run, "link", "set", DEVICE, "up"], check=True)
        command = ["ip", "netns", "exec", namespace, sys.executable, __file__, "--inside"]
        command += ["--seconds", str(options.seconds), "--count", str(options.count)]
        command += ["--size", str(options.size)]
        return subprocess.run(command).returncode
    finally:
        subprocess.run(["ip", "netns", "del", namespace], check=True)


if __name__ == "__main__":
    sys.exit(main())
