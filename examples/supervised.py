"""A line service whose connection handlers are supervised: `crash` crashes one, and its
supervisor restarts it on the same connection while the others go on undisturbed.

Run it:   ioserver run examples/supervised.py            (listens on 127.0.0.1:7001)
          python examples/supervised.py --port 7001
Try it:   nc 127.0.0.1 7001
          hello            -> HELLO                   (each line comes back upper-cased)
          crash            -> * handler ready         (it crashed; a new one took over)
          crash x4 in 10 s -> the connection closes   (its supervisor gave up)

The supervision tree, as an OTP application would have it::

    top (Supervisor, one_for_one)
     └── acceptor                    accepts connections; restarted if it ever crashes
    connection #N (Supervisor, one_for_one, auto_shutdown=all_significant)
     └── handler (transient, significant)

Each connection gets its own small supervisor, which *holds* the connection's port
(``actor.own(port, mailbox=False)``): the port lives as long as the supervisor, so a
crashing handler loses nothing - the next handler reads the very next line.  When the
client hangs up, the handler returns normally; a transient child that ends normally is
not restarted, so the connection's supervisor shuts itself down (``auto_shutdown``) and
its port closes.  A handler that crashes more than ``MAX_RESTARTS`` times in ``PERIOD``
seconds makes its supervisor give up (:exc:`ports.RestartIntensityError`): the port closes
with it, and only that client is disconnected.
"""

from __future__ import annotations

import argparse
import itertools
import logging
from collections.abc import Sequence
from typing import Any

import anyio
import anyio.abc

import ioserver
import ports

log = logging.getLogger("supervised")

MAX_RESTARTS = 3  # handler restarts allowed per connection ...
PERIOD = 10.0  # ... within this many seconds
MAX_LINE = 4096  # bytes


class Crash(Exception):
    """What a handler raises when asked to crash."""


async def handler(actor: ports.Actor, port: ports.Port) -> None:
    """Upper-case each line; crash on ``crash``; return when the client hangs up."""
    try:
        await port.send(b"* handler ready\n")
        async for message in port:
            if isinstance(message, ports.Data):  # one line (an oversized one ends the port)
                line = message.data.rstrip(b"\r\n")
                if line == b"crash":
                    raise Crash(f"asked to crash by {port.remote_address}")
                await port.send(line.upper() + b"\n")
    except ports.BrokenPortError:
        pass  # the client is gone: a normal end


def connection_supervisor(port: ports.Port) -> ports.Supervisor:
    """The supervisor of one connection: one transient, significant handler."""
    return ports.Supervisor(
        [
            ports.ChildSpec(
                "handler", handler, (port,), restart=ports.Restart.TRANSIENT, significant=True
            )
        ],
        intensity=MAX_RESTARTS,
        period=PERIOD,
        auto_shutdown=ports.AutoShutdown.ALL_SIGNIFICANT,
    )


async def acceptor(actor: ports.Actor, listener: ports.Listener) -> None:
    """Give each accepted connection its own supervisor, which holds the port."""
    numbers = itertools.count(1)
    async for accepted in listener:
        if isinstance(accepted, ports.Accepted):
            connection = actor.system.spawn(
                connection_supervisor(accepted.port), name=f"connection-{next(numbers)}"
            )
            connection.own(accepted.port, mailbox=False)  # the port closes with it


async def serve(
    ios: ioserver.IOServer,
    host: str = "127.0.0.1",
    port: int = 7001,
    *,
    task_status: anyio.abc.TaskStatus[Any] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve on ``host:port``; report the bound address through ``task_status``.

    Raises:
        ports.RestartIntensityError: the acceptor kept crashing and the top supervisor
            gave up (every connection is closed then).
    """
    reason: ports.Reason = ports.ExitReason.NORMAL
    async with (
        await ports.listen_tcp(ios, host, port, packet="line", packet_size=MAX_LINE) as listener,
        ports.open_actor_system() as system,
    ):
        top = system.spawn(
            ports.Supervisor([ports.ChildSpec("acceptor", acceptor, (listener,))]), name="top"
        )
        task_status.started(listener.local_address)
        reason = await top.wait()
        system.shutdown()  # the top supervisor gave up: stop every connection too
    if isinstance(reason, BaseException):
        raise reason


async def main(ios: ioserver.IOServer, argv: Sequence[str] = ()) -> None:
    parser = argparse.ArgumentParser(prog="supervised", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=7001, help="TCP port (default 7001)")
    options = parser.parse_args(argv)
    async with anyio.create_task_group() as task_group:
        address = await task_group.start(serve, ios, options.host, options.port)
        print(
            f"supervised line service on {address[0]}:{address[1]}"
            f" - try: nc {address[0]} {address[1]}",
            flush=True,
        )


if __name__ == "__main__":
    import sys

    sys.exit(ioserver.main(["run", __file__, *sys.argv[1:]]))
