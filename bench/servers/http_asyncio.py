"""Reference HTTP server: examples/httpd.py's handler (``HttpSession``, h11) on asyncio streams.

The same sans-I/O handler as the ioserver example - same h11 parsing, same file-reading policy
(read the whole file per request), same budgets - so the benchmark compares only the I/O.
``asyncio.start_server``, ``read(65536)`` / ``write`` / ``drain``; listen backlog 1024;
optionally on uvloop.

usage: python bench/servers/http_asyncio.py --port PORT --root DIR [--request-memory BYTES]
                                            [--uvloop]
"""

from __future__ import annotations

import argparse
import asyncio
import ssl
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
import httpd

#: The server's TLS context (--tls-cert/--tls-key), or None: plaintext.
TLS: ssl.SSLContext | None = None


async def handle(
    files: httpd.StaticFiles,
    request_memory: int,
    pool: httpd.MemoryPool,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
) -> None:
    session = httpd.HttpSession(files, request_memory, pool)
    try:
        while True:
            data = await reader.read(65536)
            session.feed(data)
            while True:
                chunks = session.responses()
                if not chunks:
                    break
                for chunk in chunks:
                    writer.write(chunk)
                await writer.drain()
                session.sent()
            if session.closing or not data:
                break
    except ConnectionError:
        pass
    finally:
        session.release()
        writer.close()


async def serve(port: int, root: str, request_memory: int) -> None:
    files = httpd.StaticFiles(root)
    pool = httpd.MemoryPool(httpd.HANDLER_MEMORY)
    handler = partial(handle, files, request_memory, pool)
    server = await asyncio.start_server(handler, "127.0.0.1", port, backlog=1024, ssl=TLS)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--root", required=True)
    parser.add_argument("--request-memory", type=int, default=httpd.REQUEST_MEMORY)
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
        runner.run(serve(args.port, args.root, args.request_memory))


if __name__ == "__main__":
    main()
