"""Reference echo server: asyncio streams (``asyncio.start_server``), optionally on uvloop.

Each connection loops ``read(65536)`` / ``write`` / ``drain`` until EOF. Listen backlog 1024;
TCP_NODELAY is left at the library default (asyncio and uvloop both set it on TCP sockets).

usage: python bench/servers/asyncio_streams.py --port PORT [--uvloop]
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Callable


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            data = await reader.read(65536)
            if not data:
                break
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def serve(port: int) -> None:
    server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=1024)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop's event loop")
    args = parser.parse_args()
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    if args.uvloop:
        import uvloop

        loop_factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(serve(args.port))


if __name__ == "__main__":
    main()
