"""Reference HTTP server: examples/httpd.py's handler (``HttpSession``, h11) on plain trio sockets.

The same sans-I/O handler as the ioserver example - same h11 parsing, same file-reading policy
(read the whole file per request), same budgets - so the benchmark compares only the I/O.
``trio.serve_tcp``, ``receive_some`` / ``send_all``; listen backlog 1024.

usage: python bench/servers/http_trio.py --port PORT --root DIR [--request-memory BYTES]
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
import httpd


async def handle(
    files: httpd.StaticFiles, request_memory: int, pool: httpd.MemoryPool, stream: trio.SocketStream
) -> None:
    session = httpd.HttpSession(files, request_memory, pool)
    try:
        while True:
            data = await stream.receive_some(65536)
            session.feed(data)
            while True:
                chunks = session.responses()
                if not chunks:
                    break
                for chunk in chunks:
                    await stream.send_all(chunk)
                session.sent()
            if session.closing or not data:
                break
    except trio.BrokenResourceError:
        pass
    finally:
        session.release()
        await stream.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--root", required=True)
    parser.add_argument("--request-memory", type=int, default=httpd.REQUEST_MEMORY)
    args = parser.parse_args()
    files = httpd.StaticFiles(args.root)
    pool = httpd.MemoryPool(httpd.HANDLER_MEMORY)
    handler = partial(handle, files, args.request_memory, pool)
    trio.run(partial(trio.serve_tcp, handler, args.port, host="127.0.0.1", backlog=1024))


if __name__ == "__main__":
    main()
