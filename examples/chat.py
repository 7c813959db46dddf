"""A line-based chat room: every line a member types goes to every other member.

Run it:   ioserver run examples/chat.py            (listens on 127.0.0.1:7000)
          python examples/chat.py --port 7000
Join it:  nc 127.0.0.1 7000      (from two terminals: lines typed in one appear in the other)

Each member is one actor.  It waits in ONE ``ports.select`` on two sources: its TCP port
(what the member types) and its own memory channel, fed by the room (what the others
said).  No second task per member, no lock: the room is a plain object, because every
actor runs in the same event loop.
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

log = logging.getLogger("chat")

MAX_LINE = 4096  # bytes: a longer line without a newline gets its sender disconnected
BACKLOG = 1024  # lines buffered for a member; a member that falls further behind is dropped


class Room:
    """The members' outboxes.  ``broadcast`` never waits: a member too slow to keep up
    (its outbox full) is dropped instead of slowing everyone down."""

    def __init__(self) -> None:
        self.members: dict[str, ports.MemorySendChannel[bytes]] = {}

    def join(self, name: str, outbox: ports.MemorySendChannel[bytes]) -> None:
        self.members[name] = outbox

    def leave(self, name: str) -> None:
        self.members.pop(name, None)

    def broadcast(self, line: bytes, sender: str | None = None) -> None:
        for name, outbox in list(self.members.items()):
            if name == sender:
                continue
            try:
                outbox.send_nowait(line)
            except ports.WouldBlock:
                log.warning("%s is too slow; dropping it", name)
                self.leave(name)
                outbox.close()  # its actor sees the end of its outbox and says goodbye


async def member(port: ports.Port, room: Room, name: str) -> None:
    """One member's actor: relay its lines to the room and the room's lines to it."""
    outbox, inbox = ports.open_memory_channel(BACKLOG)
    room.join(name, outbox)
    pending = b""
    try:
        await port.send(f"* welcome, you are {name}\n".encode())
        room.broadcast(f"* {name} joined\n".encode(), sender=name)
        while True:
            try:
                source, message = await ports.select(port, inbox)
            except ports.EndOfPort:
                # The room closed our outbox: we were too slow.
                await port.send(b"* you fell too far behind; goodbye\n")
                return
            if source is inbox:
                await port.send(message)
            elif isinstance(message, ports.Data):
                pending += message.data
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    room.broadcast(name.encode() + b": " + line.rstrip(b"\r") + b"\n", name)
                if len(pending) > MAX_LINE:
                    await port.send(b"* line too long; goodbye\n")
                    return
            elif isinstance(message, ports.Closed):
                return
    except ports.BrokenPortError:
        pass  # the member's connection broke while we wrote to it: it has left
    finally:
        room.leave(name)
        room.broadcast(f"* {name} left\n".encode())
        await port.aclose()


async def serve(
    ios: ioserver.IOServer,
    host: str = "127.0.0.1",
    port: int = 7000,
    *,
    task_status: anyio.abc.TaskStatus[Any] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve a chat room on ``host:port``; reports the bound address through ``task_status``."""
    room = Room()
    numbers = itertools.count(1)
    async with (
        await ports.listen_tcp(ios, host, port) as listener,
        anyio.create_task_group() as task_group,
    ):
        task_status.started(listener.local_address)
        async for accepted in listener:
            if isinstance(accepted, ports.Accepted):
                task_group.start_soon(member, accepted.port, room, f"guest{next(numbers)}")


async def main(ios: ioserver.IOServer, argv: Sequence[str] = ()) -> None:
    parser = argparse.ArgumentParser(prog="chat", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=7000, help="TCP port (default 7000)")
    options = parser.parse_args(argv)
    async with anyio.create_task_group() as task_group:
        address = await task_group.start(serve, ios, options.host, options.port)
        print(
            f"chat room on {address[0]}:{address[1]} - join with: nc {address[0]} {address[1]}",
            flush=True,
        )


if __name__ == "__main__":
    import sys

    sys.exit(ioserver.main(["run", __file__, *sys.argv[1:]]))
