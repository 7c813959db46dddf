"""An echo server with no task per connection: every port's owner is one Mailbox.

For bench/idle_memory.py: what ioserver itself costs per idle connection (the I/O thread's
Conn, the socket, the loop's Port), without the per-connection actor that examples/echo.py
adds on top.  One task echoes for all connections through the mailbox.

usage: python bench/servers/ioserver_ports_only.py --port PORT [--backend asyncio|trio]
"""

from __future__ import annotations

from collections.abc import Sequence

import anyio

import ioserver
import ports


async def main(ios: ioserver.IOServer, argv: Sequence[str]) -> None:
    mailbox = ports.Mailbox()
    listener = await ports.listen_tcp(ios, "127.0.0.1", int(argv[0]))
    print(f"ports-only echo on 127.0.0.1:{listener.local_address[1]}", flush=True)
    async with listener, anyio.create_task_group() as task_group:

        async def accept() -> None:
            async for accepted in listener:
                if isinstance(accepted, ports.Accepted):
                    accepted.port.set_owner(mailbox)

        task_group.start_soon(accept)
        while True:
            port, message = await mailbox.receive()
            if isinstance(message, ports.Data):
                try:
                    port.send_nowait(message.data)
                except ports.IOServerError:
                    await port.aclose()
            elif isinstance(message, ports.Closed):
                await port.aclose()


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--backend", choices=("asyncio", "trio"), default="asyncio")
    options, _ = parser.parse_known_args()
    ioserver.run(main, [str(options.port)], backend=options.backend)
