"""Reference echo server: asyncio streams (``asyncio.start_server``), optionally on uvloop.

Each connection loops ``read(65536)`` / ``write`` / ``drain`` until EOF. Listen backlog 1024;
TCP_NODELAY is left at the library default (asyncio and uvloop both set it on TCP sockets).

usage: python bench/servers/asyncio_streams.py --port PORT [--uvloop]
                                              [--tls-cert PEM --tls-key PEM]
"""

from __future__ import annotations

import argparse
import asyncio
import ssl
from collections.abc import Callable

#: The server's TLS context (--tls-cert/--tls-key), or None: plaintext.
TLS: ssl.SSLContext | None = None


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
    server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=1024, ssl=TLS)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop's event loop")
    parser.add_argument("--tls-cert", help="serve TLS (asyncio's ssl=) with this PEM chain")
    parser.add_argument("--tls-key", help="the private key of --tls-cert, PEM")
    args = parser.parse_args()
    global TLS
    if args.tls_cert:
        TLS = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        TLS.load_cert_chain(args.tls_cert, args.tls_key)
        TLS.set_alpn_protocols(["http/1.1"])
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    if args.uvloop:
        import uvloop

        loop_factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(serve(args.port))


if __name__ == "__main__":
    main()
