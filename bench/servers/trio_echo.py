"""Reference echo server: trio (``trio.serve_tcp``, ``receive_some`` / ``send_all``).

Listen backlog 1024; TCP_NODELAY is left at trio's default (``SocketStream`` sets it).

usage: python bench/servers/trio_echo.py --port PORT
"""

from __future__ import annotations

import argparse
from functools import partial

import trio


async def handle(stream: trio.SocketStream) -> None:
    try:
        while True:
            data = await stream.receive_some(65536)
            if not data:
                break
            await stream.send_all(data)
    except trio.BrokenResourceError:
        pass
    finally:
        await stream.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    trio.run(partial(trio.serve_tcp, handle, args.port, host="127.0.0.1", backlog=1024))


if __name__ == "__main__":
    main()
