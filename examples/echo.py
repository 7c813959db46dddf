"""TCP echo: one actor per connection, the way an ioserver service is written.

Run it:  python examples/echo.py --port 7001      (or: ioserver run examples/echo.py --port 7001)
Try it:  nc 127.0.0.1 7001
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import anyio

import ioserver
import ports


async def echo(port: ports.Port) -> None:
    """Send every byte back until the peer closes; then close the port."""
    async with port:
        try:
            async for message in port:
                if isinstance(message, ports.Data):
                    await port.send(message.data)
        except ports.BrokenPortError:
            pass  # the peer reset while we were sending: this actor's work is over


async def main(ios: ioserver.IOServer, argv: Sequence[str] = ()) -> None:
    parser = argparse.ArgumentParser(prog="echo", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=7001, help="TCP port (default 7001)")
    options = parser.parse_args(argv)
    async with (
        await ports.listen_tcp(ios, options.host, options.port) as listener,
        anyio.create_task_group() as task_group,
    ):
        print(
            f"echo listening on {listener.local_address[0]}:{listener.local_address[1]}", flush=True
        )
        async for accepted in listener:
            if isinstance(accepted, ports.Accepted):
                task_group.start_soon(echo, accepted.port)


if __name__ == "__main__":
    import sys

    sys.exit(ioserver.main(["run", __file__, *sys.argv[1:]]))
