"""UDP echo: every datagram goes back to where it came from, whole.

Run it:  python examples/udp_echo.py --port 7003      (or: ioserver run examples/udp_echo.py)
Try it:  nc -u 127.0.0.1 7003     (each line you type comes back)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import ioserver
import ports


async def main(ios: ioserver.IOServer, argv: Sequence[str] = ()) -> None:
    parser = argparse.ArgumentParser(prog="udp_echo", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=7003, help="UDP port (default 7003)")
    options = parser.parse_args(argv)
    async with await ports.open_udp(ios, (options.host, options.port)) as port:
        host, number = port.local_address[:2]
        print(f"udp echo listening on {host}:{number}", flush=True)
        async for message in port:
            if isinstance(message, ports.Datagram):
                # A received Datagram carries its sender's address: send it straight back.
                await port.send(message)
            elif isinstance(message, ports.Error):
                # A datagram too large, an ICMP error...: UDP goes on; say so and carry on.
                print(f"udp echo: {message.message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(ioserver.main(["run", __file__, *sys.argv[1:]]))
