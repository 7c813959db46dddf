"""Reference echo server: a bare ``asyncio.Protocol`` on uvloop (``data_received`` -> ``write``).

The cheapest echo asyncio's API allows: no streams, no coroutine per connection, no flow control
(the load is closed-loop, one message in flight per connection). Listen backlog 1024; TCP_NODELAY
is left at uvloop's default (set).

usage: python bench/servers/uvloop_protocol.py --port PORT
"""

from __future__ import annotations

import argparse
import asyncio
from typing import cast

import uvloop


class Echo(asyncio.Protocol):
    transport: asyncio.Transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCPTransport is not an asyncio.Transport subclass, only duck-typed like one.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


async def serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Echo, "127.0.0.1", port, backlog=1024)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve(args.port))


if __name__ == "__main__":
    main()
