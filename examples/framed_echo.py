"""Framed echo: each whole message comes back whole, framing done by the I/O thread.

Run it:  python examples/framed_echo.py --port 7002 --packet 4
         (--packet is raw, 1, 2, 4, line or msgpack)

A client in a few lines of plain ``socket`` code, for ``--packet 4``::

    import socket, struct
    with socket.create_connection(("127.0.0.1", 7002)) as s:
        s.sendall(struct.pack(">I", 5) + b"hello")       # a 4-byte big-endian length
        size = struct.unpack(">I", s.recv(4, socket.MSG_WAITALL))[0]
        print(s.recv(size, socket.MSG_WAITALL))           # b'hello'
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

import anyio

import ioserver
import ports


def packet_mode(text: str) -> Any:
    return int(text) if text.isdigit() else text


async def echo(port: ports.Port) -> None:
    """Send every message back, whole, until the peer closes."""
    async with port:
        try:
            async for message in port:
                if isinstance(message, ports.Data):
                    await port.send(message.data)
                elif isinstance(message, ports.Error):
                    print(f"{port.remote_address}: {message.message}", flush=True)
        except ports.BrokenPortError:
            pass  # the peer reset while we were sending: this actor's work is over


async def main(ios: ioserver.IOServer, argv: Sequence[str] = ()) -> None:
    parser = argparse.ArgumentParser(prog="framed_echo", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=7002, help="TCP port (default 7002)")
    parser.add_argument(
        "--packet", type=packet_mode, default=4, help="raw, 1, 2, 4, line or msgpack"
    )
    parser.add_argument("--packet-size", type=int, default=1 << 20, help="largest message in bytes")
    options = parser.parse_args(argv)
    listener = await ports.listen_tcp(
        ios, options.host, options.port, packet=options.packet, packet_size=options.packet_size
    )
    async with listener, anyio.create_task_group() as task_group:
        host, number = listener.local_address[:2]
        print(f"framed echo (packet={options.packet}) on {host}:{number}", flush=True)
        async for accepted in listener:
            if isinstance(accepted, ports.Accepted):
                task_group.start_soon(echo, accepted.port)


if __name__ == "__main__":
    import sys

    sys.exit(ioserver.main(["run", __file__, *sys.argv[1:]]))
