"""TUN ping responder: every ICMP echo request routed to a TUN device gets its echo reply.

Run it (as root, Linux):  python examples/tun_ping.py --device tping0
Then, in another shell:   ip addr add 198.18.0.1/30 dev tping0 && ip link set tping0 up
Try it:                   ping -c 3 198.18.0.2     (IPv6: ip addr add fd00:198:18::1/126
                          dev tping0, then ping -c 3 fd00:198:18::2)

It answers for every address routed to the device: the far end of the device's route.
Anything else it reads (not an echo request) is ignored.  It exits with status 1 and one
line naming the cause when the device cannot be opened (EPERM without CAP_NET_ADMIN...).
"""

from __future__ import annotations

import argparse
import struct
import sys
from collections.abc import Sequence

import ioserver
import ports

ICMP = 1
ICMPV6 = 58
ECHO_REQUEST, ECHO_REPLY = 8, 0
ECHO_REQUEST_V6, ECHO_REPLY_V6 = 128, 129


def checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071): the ones' complement of the ones' complement sum
    of the 16-bit big-endian words, an odd last byte padded with zero."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def echo_reply(packet: bytes) -> bytes | None:
    """The echo reply to ``packet`` when it is an ICMP (IPv4) or ICMPv6 echo request,
    else ``None``."""
    if len(packet) >= 28 and packet[0] >> 4 == 4:
        header = (packet[0] & 0x0F) * 4
        total = struct.unpack_from("!H", packet, 2)[0]
        flags_offset = struct.unpack_from("!H", packet, 6)[0]
        if packet[9] != ICMP or flags_offset & 0x3FFF or total > len(packet) or header < 20:
            return None  # not ICMP, a fragment, or cut short
        icmp = bytearray(packet[header:total])
        if len(icmp) < 8 or icmp[0] != ECHO_REQUEST:
            return None
        icmp[0] = ECHO_REPLY  # same code, identifier, sequence and payload
        icmp[2:4] = b"\0\0"
        icmp[2:4] = struct.pack("!H", checksum(bytes(icmp)))
        ip = bytearray(packet[:20])  # the reply carries no IP options
        ip[0] = 0x45
        ip[2:4] = struct.pack("!H", 20 + len(icmp))
        ip[8] = 64  # TTL
        ip[10:12] = b"\0\0"
        ip[12:16], ip[16:20] = packet[16:20], packet[12:16]
        ip[10:12] = struct.pack("!H", checksum(bytes(ip)))
        return bytes(ip + icmp)
    if len(packet) >= 48 and packet[0] >> 4 == 6:
        length = struct.unpack_from("!H", packet, 4)[0]
        if packet[6] != ICMPV6 or 40 + length > len(packet) or length < 8:
            return None  # not ICMPv6 directly after the header (no extension headers)
        icmp = bytearray(packet[40 : 40 + length])
        if icmp[0] != ECHO_REQUEST_V6:
            return None
        source, destination = packet[24:40], packet[8:24]  # swapped
        icmp[0] = ECHO_REPLY_V6
        icmp[2:4] = b"\0\0"
        pseudo = source + destination + struct.pack("!I3xB", len(icmp), ICMPV6)
        icmp[2:4] = struct.pack("!H", checksum(pseudo + bytes(icmp)))
        ip = bytearray(packet[:8])
        ip[7] = 64  # hop limit
        return bytes(ip + source + destination + icmp)
    return None


async def main(ios: ioserver.IOServer, argv: Sequence[str] = ()) -> None:
    parser = argparse.ArgumentParser(prog="tun_ping", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--device",
        default="",
        help="TUN device to open, created if it does not exist (default: the kernel picks tunN)",
    )
    options = parser.parse_args(argv)
    async with await ports.open_tun(ios, options.device) as port:
        print(f"tun ping answering on {port.device}", flush=True)
        async for message in port:
            if isinstance(message, ports.Packet):
                reply = echo_reply(message.data)
                if reply is not None:
                    await port.send(reply)
            elif isinstance(message, ports.Error):
                print(f"tun ping: {message.message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(ioserver.main(["run", __file__, *sys.argv[1:]]))
