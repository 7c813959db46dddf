"""TUN/TAP ports (issue 16, item 1), through real devices in a network namespace each test
makes (and deletes): real pings answered by ``examples/tun_ping.py``, UDP packets built
and parsed by the test, the active modes, flow control and memory charges of a UDP port,
and the typed errors of a machine that refuses (no ``CAP_NET_ADMIN``, no
``/dev/net/tun``).

The addresses are 198.18.0.0/30 (RFC 2544's benchmarking range), only ever inside the
test's namespace.  An in-process test moves the main thread into the namespace before
its I/O server starts, so that the I/O thread - which opens the device - is in it too.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

import ioserver
import ports
from ports import Packet, Passive

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
LOCAL, REMOTE = "198.18.0.1", "198.18.0.2"  # the device's address, the far end of its route


def _refused(reason: str) -> None:
    pytest.skip(f"this machine refuses TUN tests: {reason}")


@pytest.fixture
def netns() -> Iterator[str]:
    """A fresh network namespace, deleted after the test."""
    if not sys.platform.startswith("linux"):
        _refused("not Linux")
    if not os.path.exists("/dev/net/tun"):
        _refused("no /dev/net/tun (modprobe tun)")
    if shutil.which("ip") is None:
        _refused("no ip command (iproute2)")
    name = f"iosrv-{uuid.uuid4().hex[:10]}"
    made = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if made.returncode != 0:
        _refused(f"ip netns add: {made.stderr.strip()} (needs CAP_SYS_ADMIN)")
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=True)


@pytest.fixture
def in_netns(netns: str) -> Iterator[str]:
    """The main thread moved into ``netns`` for the test (so an I/O server started after
    this fixture opens its devices there), moved back after it."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    target = os.open(f"/run/netns/{netns}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        setns(target)
    finally:
        os.close(target)
    try:
        yield netns
    finally:
        setns(home)
        os.close(home)


CLONE_NEWNET = 0x40000000


def setns(fd: int) -> None:
    """setns(2) into a network namespace (os.setns is Python 3.12's)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        number = ctypes.get_errno()
        raise OSError(number, os.strerror(number))


def ip(netns: str, *args: str) -> None:
    subprocess.run(["ip", "-n", netns, *args], check=True, capture_output=True)


def bring_up(netns: str, device: str) -> None:
    """198.18.0.1/30 on ``device``, IPv6 off (no router solicitation or MLD report to
    count among the test's packets), then up."""
    subprocess.run(
        ["ip", "netns", "exec", netns, "sysctl", "-qw", f"net.ipv6.conf.{device}.disable_ipv6=1"],
        check=True,
    )
    ip(netns, "addr", "add", f"{LOCAL}/30", "dev", device)
    ip(netns, "link", "set", device, "up")


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def parse_udp(packet: bytes) -> tuple[str, int, str, int, bytes]:
    """``(source, source port, destination, destination port, payload)`` of an IPv4 UDP
    packet, its lengths and both checksums checked."""
    assert packet[0] >> 4 == 4 and packet[9] == socket.IPPROTO_UDP, packet[:20].hex()
    header = (packet[0] & 0x0F) * 4
    assert struct.unpack_from("!H", packet, 2)[0] == len(packet)
    assert checksum(packet[:header]) == 0
    source, destination = packet[12:16], packet[16:20]
    udp = packet[header:]
    sport, dport, length, _ = struct.unpack_from("!HHHH", udp)
    assert length == len(udp)
    pseudo = source + destination + struct.pack("!xBH", socket.IPPROTO_UDP, length)
    assert checksum(pseudo + udp) == 0
    return (socket.inet_ntoa(source), sport, socket.inet_ntoa(destination), dport, udp[8:])


def build_udp(source: str, sport: int, destination: str, dport: int, payload: bytes) -> bytes:
    """An IPv4 UDP packet, checksums right."""
    src, dst = socket.inet_aton(source), socket.inet_aton(destination)
    length = 8 + len(payload)
    pseudo = src + dst + struct.pack("!xBH", socket.IPPROTO_UDP, length)
    udp = struct.pack("!HHHH", sport, dport, length, 0) + payload
    udp = udp[:6] + struct.pack("!H", checksum(pseudo + udp) or 0xFFFF) + udp[8:]
    ip_header = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + length, 0, 0x4000, 64, socket.IPPROTO_UDP, 0, src, dst
    )
    ip_header = ip_header[:10] + struct.pack("!H", checksum(ip_header)) + ip_header[12:]
    return ip_header + udp


async def receive_packet(port: ports.TunPort) -> Packet:
    with anyio.fail_after(5):
        message = await port.receive()
    assert isinstance(message, Packet), message
    return message


def udp_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((LOCAL, 0))
    sock.settimeout(5)
    return sock


# -- through the device ----------------------------------------------------------------------


@pytest.mark.anyio
async def test_udp_round_trips_byte_exact_through_a_tun_port(
    in_netns: str, ios: ioserver.IOServer
) -> None:
    async with await ports.open_tun(ios, "iotun%d") as port:
        assert port.device.startswith("iotun") and port.mode == "tun"
        assert port.device in repr(port)
        bring_up(in_netns, port.device)
        with udp_socket() as sock:
            sport = sock.getsockname()[1]
            question = os.urandom(1200)
            sock.sendto(question, (REMOTE, 4242))
            packet = await receive_packet(port)
            assert parse_udp(packet.data) == (LOCAL, sport, REMOTE, 4242, question)
            answer = bytes(reversed(question)) + b"\0\xff" * 100
            await port.send(Packet(build_udp(REMOTE, 4242, LOCAL, sport, answer)))
            data, address = await anyio.to_thread.run_sync(sock.recvfrom, 65536)
            assert (data, address) == (answer, (REMOTE, 4242))
            statistics = port.statistics()
            assert statistics.bytes_received == len(packet.data)
            with anyio.fail_after(5):
                while port.statistics().bytes_sent < 20 + 8 + len(answer):  # noqa: ASYNC110
                    await anyio.sleep(0.001)
            assert port.statistics().bytes_sent == 20 + 8 + len(answer)


@pytest.mark.anyio
async def test_passive_once_and_counted_active_modes_count_packets(
    in_netns: str, ios: ioserver.IOServer
) -> None:
    async with await ports.open_tun(ios, "iotun%d", active=False) as port:
        bring_up(in_netns, port.device)
        with udp_socket() as sock:
            for index in range(6):
                sock.sendto(b"%d" % index, (REMOTE, 9))

            async def payload() -> bytes:
                return parse_udp((await receive_packet(port)).data)[4]

            # Passive: each receive reads exactly one packet, in order.
            assert await payload() == b"0"
            assert port.statistics().messages_buffered == 0
            port.setopts(active="once")
            assert await payload() == b"1"
            assert port.active is False
            port.setopts(active=2)
            assert await payload() == b"2"
            assert await payload() == b"3"
            with anyio.fail_after(5):
                assert isinstance(await port.receive(), Passive)
            assert port.active is False
            assert port.statistics().messages_buffered == 0
            assert await payload() == b"4"
            assert await payload() == b"5"


@pytest.mark.anyio
async def test_undelivered_packets_are_charged_and_pause_the_port_until_drained(
    in_netns: str, ios: ioserver.IOServer
) -> None:
    async with await ports.open_tun(ios, "iotun%d", high_msgq_messages=8, read_packets=4) as port:
        bring_up(in_netns, port.device)
        with udp_socket() as sock:
            for index in range(40):
                sock.sendto(b"%02d" % index + b"." * 998, (REMOTE, 9))
            # The owner reads nothing: the I/O thread delivers up to the watermark (plus one
            # batch), charges it to the memory budget, and leaves the rest in the device's
            # queue.
            with anyio.fail_after(5):
                while port.statistics().pauses == 0:  # noqa: ASYNC110  # the I/O thread's
                    await anyio.sleep(0.001)
            # What the I/O thread delivered (its count: the messages may still be on their
            # way to the port's buffer), each packet 20 + 8 + 1000 bytes.
            statistics = port.statistics()
            assert 8 * 1028 < statistics.bytes_buffered_in <= (8 + 4) * 1028
            assert ios.statistics().memory_in_use >= statistics.bytes_buffered_in
            received = [parse_udp((await receive_packet(port)).data)[4][:2] for _ in range(40)]
            assert received == [b"%02d" % index for index in range(40)]
            assert port.statistics().bytes_buffered_in == 0
            assert ios.statistics().memory_in_use == 0


@pytest.mark.anyio
async def test_a_burst_goes_out_whole_and_in_order_through_a_busy_port(
    in_netns: str, ios: ioserver.IOServer
) -> None:
    async with await ports.open_tun(ios, "iotun%d", high_watermark=1, low_watermark=0) as port:
        bring_up(in_netns, port.device)
        with udp_socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            sport = sock.getsockname()[1]
            count = 200
            for index in range(count):
                await port.send(build_udp(REMOTE, 9, LOCAL, sport, b"%04d" % index))
            received = [
                (await anyio.to_thread.run_sync(sock.recvfrom, 100))[0] for _ in range(count)
            ]
            assert received == [b"%04d" % index for index in range(count)]
            assert port.statistics().bytes_buffered_out == 0


@pytest.mark.anyio
@pytest.mark.parametrize("poller", ["epoll", "selectors"])
async def test_a_device_deleted_under_the_port_closes_it_with_ebadfd(
    in_netns: str, no_leaks: None, poller: str
) -> None:
    """epoll reports the detached device as an error; selectors only as readable, and the
    read fails with EBADFD: either way the port ends, once, and nothing spins."""
    async with (
        ioserver.open(poller=poller) as ios,
        await ports.open_tun(ios, "iotun%d", mode="tap") as port,
    ):
        assert port.mode == "tap"
        ip(in_netns, "link", "del", port.device)
        with anyio.fail_after(5):
            message = await port.receive()
        assert message == ioserver.Closed(message.reason, "EBADFD"), message
        assert port.statistics().messages_buffered == 0
        with pytest.raises(ports.BrokenPortError, match="EBADFD"):
            await port.send(b"x" * 60)


@pytest.mark.anyio
async def test_a_packet_larger_than_max_packet_is_dropped_and_reported(
    in_netns: str, ios: ioserver.IOServer
) -> None:
    """A TUN read into a short buffer returns the packet's head without a word: the port
    reads into max_packet + 1 bytes to tell."""
    async with await ports.open_tun(ios, "iotun%d", max_packet=228) as port:
        bring_up(in_netns, port.device)
        with udp_socket() as sock:
            for size in (200, 201, 1000, 199):  # 200 + 28 = 228: the largest that fits
                sock.sendto(b"s" * size, (REMOTE, 9))
            assert len(parse_udp((await receive_packet(port)).data)[4]) == 200
            for _ in range(2):
                with anyio.fail_after(5):
                    error = await port.receive()
                assert isinstance(error, ports.Error) and error.errno_name == "EMSGSIZE", error
                assert "max_packet=228" in error.message and port.device in error.message
            assert len(parse_udp((await receive_packet(port)).data)[4]) == 199
            assert port.statistics().packets_too_large == 2


@pytest.mark.anyio
async def test_multi_queue_opens_a_device_twice_and_a_second_plain_open_is_ebusy(
    in_netns: str, ios: ioserver.IOServer
) -> None:
    async with (
        await ports.open_tun(ios, "iomq0", multi_queue=True) as first,
        await ports.open_tun(ios, "iomq0", multi_queue=True) as second,
    ):
        assert first.device == second.device == "iomq0" and first.multi_queue
    async with await ports.open_tun(ios, "iosq0"):
        with pytest.raises(ioserver.ConnectError) as caught:
            await ports.open_tun(ios, "iosq0")
    assert caught.value.errno_name == "EBUSY"
    assert "iosq0" in str(caught.value) and "multi_queue" in str(caught.value)


# -- the example, and a machine that refuses ------------------------------------------------


def test_tun_ping_example_answers_ping_in_the_namespace(netns: str) -> None:
    ping = shutil.which("ping")
    if ping is None:
        pytest.skip("no ping command: apt-get install iputils-ping")
    script = str(ROOT / "examples" / "tun_ping.py")
    command = ["ip", "netns", "exec", netns, sys.executable, script, "--device", "tping0"]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT
    )
    try:
        assert process.stdout is not None and process.stderr is not None
        first = process.stdout.readline()
        assert first.strip() == "tun ping answering on tping0", process.stderr.read()
        ip(netns, "addr", "add", f"{LOCAL}/30", "dev", "tping0")
        ip(netns, "addr", "add", "fd00:198:18::1/126", "dev", "tping0", "nodad")
        ip(netns, "link", "set", "tping0", "up")
        for far_end, count in ((REMOTE, "3"), ("fd00:198:18::2", "1")):  # ICMP, ICMPv6
            pinged = subprocess.run(
                ["ip", "netns", "exec", netns, ping, "-c", count, "-i", "0.2", "-W", "2", far_end],
                capture_output=True,
                text=True,
                timeout=20,
            )
            assert pinged.returncode == 0, pinged.stdout + pinged.stderr
            assert f"{count} received" in pinged.stdout, pinged.stdout
        process.send_signal(signal.SIGINT)
        assert process.wait(15) == 0, process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        for pipe in (process.stdout, process.stderr):
            if pipe is not None:
                pipe.close()


OPEN_AND_REPORT = """
import anyio, ioserver, ports
async def main():
    async with ioserver.open() as ios:
        try:
            await ports.open_tun(ios, "iodenied0")
        except ioserver.ConnectError as exc:
            print(exc.errno_name, exc, sep="\\n")
anyio.run(main)
"""


def run_open(netns: str, *prefix: str) -> list[str]:
    result = subprocess.run(
        ["ip", "netns", "exec", netns, *prefix, sys.executable, "-c", OPEN_AND_REPORT],
        capture_output=True,
        text=True,
        timeout=30,
        env=ENV,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def test_without_cap_net_admin_open_tun_raises_eperm_naming_the_capability(netns: str) -> None:
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("no setpriv (util-linux) to drop CAP_NET_ADMIN")
    drop = [setpriv, "--inh-caps=-net_admin", "--bounding-set=-net_admin"]
    name, message = run_open(netns, *drop)
    assert name == "EPERM", message
    assert "CAP_NET_ADMIN" in message and "iodenied0" in message, message


def test_without_dev_net_tun_open_tun_raises_enoent_naming_the_module(netns: str) -> None:
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("no unshare (util-linux) to hide /dev/net/tun")
    # A private mount namespace with an empty /dev/net: the kernel really answers ENOENT.
    hide = [unshare, "--mount", "sh", "-c", 'mount -t tmpfs none /dev/net && exec "$@"', "-"]
    name, message = run_open(netns, *hide)
    assert name == "ENOENT", message
    assert "/dev/net/tun" in message and "modprobe tun" in message, message


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("name", "mode", "options", "match"),
    [
        ("x" * 16, "tun", {}, "at most 15 bytes"),
        ("a/b", "tun", {}, "not an interface name"),
        (7, "tun", {}, "a device name is a str"),
        ("", "tunnel", {}, 'mode must be "tun" or "tap"'),
        ("", "tun", {"max_packet": 0}, "max_packet must be an int in 1..65553"),
        ("", "tun", {"multi_queue": 1}, "multi_queue must be a bool"),
        ("", "tun", {"recbuf": 1}, "unknown option for a TUN/TAP port: recbuf"),
    ],
)
async def test_bad_names_modes_and_options_raise_option_error_before_opening(
    ios: ioserver.IOServer, name: object, mode: str, options: dict[str, object], match: str
) -> None:
    with pytest.raises(ioserver.OptionError, match=match):
        await ports.open_tun(ios, name, mode, **options)  # type: ignore[arg-type]


@pytest.mark.anyio
async def test_packet_sends_are_checked_at_once(in_netns: str, ios: ioserver.IOServer) -> None:
    async with await ports.open_tun(ios, "iotun%d") as port:
        with pytest.raises(ValueError, match=r"1\.\.65553"):
            await port.send(b"")
        with pytest.raises(ValueError, match=r"1\.\.65553"):
            await port.send(Packet(b"x" * 65554))
        with pytest.raises(TypeError):
            await port.send("text")
        with pytest.raises(TypeError, match="send_to"):
            await port.send_to(b"x", (REMOTE, 9))
