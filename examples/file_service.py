"""A file service over typed RPC: list, size, read, test and delete the files of a directory.

Serve:   python examples/file_service.py --port 7002 --root /srv/files
         ioserver run examples/file_service.py --port 7002 --root /srv/files
Use it:  python examples/file_service.py client --port 7002 list   (exit status 1 on Error)
         python examples/file_service.py client --port 7002 get notes/todo.txt
         (also: size PATH, exists PATH, del PATH)

The protocol is :mod:`ports.rpc` over TCP with ``packet=4``.  Requests: ``ListAll``,
``Size(path)``, ``Get(path)``, ``Exists(path)``, ``Del(path)``; replies: ``Ok``,
``List(files)``, ``Content(text)``, ``Size(n)``, ``Exists(exists)``, ``Error(message)``.
Requests and replies are two separate sum types, so ``Size`` and ``Exists`` are each both a
request and a reply: here they are ``Request.Size`` and ``Reply.Size``.

Safety, for a service that reads and deletes files for anyone who connects:

* A path is relative, uses ``/`` and names a file *inside* the served directory: an
  absolute path, a ``..`` component, a NUL byte, or a path that leads out of the directory
  through a symbolic link is answered with ``Error`` - never with data, and nothing is
  deleted.  (The check resolves symbolic links, then opens; a link swapped in between by
  someone with write access to the directory is not guarded against.)
* ``Get`` returns UTF-8 text of at most ``MAX_CONTENT`` bytes (1 MiB); a larger or
  non-UTF-8 file is answered with ``Error``.  ``ListAll`` lists at most ``MAX_FILES``
  regular files, else ``Error``.
* File system calls run in a worker thread (``anyio.to_thread.run_sync``), so a slow disk
  never blocks the event loop.

Bounds, so that no client can make the service hold more than it allows:

* ``--packet-size`` (default 2 MiB, room for the largest reply): the largest frame in
  either direction; a larger one ends that connection.  Each request frame is checked
  before it is decoded (:class:`ports.rpc.DecodeLimits`, derived from the packet size):
  at most one value per 8 bytes of it, nested at most ``max_depth`` deep - a frame that
  would decode to more (a 1 MiB frame of empty arrays is 65 MiB of lists) is answered
  with a ``"decode"`` error, the client gets :exc:`ports.rpc.RPCDecodeError`, and the
  connection goes on.
* At most ``MAX_CONCURRENT_CALLS`` (16) requests run at once per connection; past that
  the service stops reading it (TCP pushes back on the client).
* ``--memory-limit`` (default 64 MiB): the I/O server's budget for everything buffered,
  input not yet taken and output not yet written, for every connection together.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

import anyio
import anyio.abc
import anyio.to_thread

import ioserver
import ports
from ports import rpc

MAX_CONTENT = 1024 * 1024  #: bytes: the largest file Get returns
MAX_FILES = 10_000  #: the most files ListAll returns
PACKET_SIZE = 2 << 20  #: bytes: the largest frame, either way (a Content of MAX_CONTENT fits)
MEMORY_LIMIT = 64 << 20  #: bytes: the I/O server's budget (--memory-limit)
MAX_CONCURRENT_CALLS = 16  #: requests running at once per connection


class Request:
    """The requests (a namespace: each variant is a message class, ``rpc.Message``)."""

    class ListAll(rpc.Message):
        """List every regular file, as sorted relative paths."""

    class Size(rpc.Message):
        """The size of one file in bytes."""

        path: str

    class Get(rpc.Message):
        """The content of one file, as UTF-8 text."""

        path: str

    class Exists(rpc.Message):
        """Whether a regular file exists at ``path``."""

        path: str

    class Del(rpc.Message):
        """Delete one file."""

        path: str


class Reply:
    """The replies (a namespace, as :class:`Request`)."""

    class Ok(rpc.Message):
        pass

    class List(rpc.Message):
        files: list[str]

    class Content(rpc.Message):
        text: str

    class Size(rpc.Message):
        n: int

    class Exists(rpc.Message):
        exists: bool

    class Error(rpc.Message):
        message: str


AnyRequest = Request.ListAll | Request.Size | Request.Get | Request.Exists | Request.Del
AnyReply = Reply.Ok | Reply.List | Reply.Content | Reply.Size | Reply.Exists | Reply.Error
FILES: rpc.Interface[AnyRequest, AnyReply] = rpc.Interface(AnyRequest, AnyReply)


class Refused(Exception):
    """A request the service answers with ``Error(message)``."""


class FileService:
    """The handler: answers requests about the files under ``root``."""

    def __init__(self, root: str) -> None:
        self.root = os.path.realpath(root)
        if not os.path.isdir(self.root):
            raise NotADirectoryError(f"not a directory: {root}")

    def resolve(self, path: str) -> str:
        """The real path of ``path`` inside the root, or :exc:`Refused`."""
        if not path or "\0" in path:
            raise Refused("a path must be a non-empty relative path")
        if path.startswith("/") or os.path.isabs(path):
            raise Refused(f"{path!r}: absolute paths are refused")
        if ".." in path.split("/"):
            raise Refused(f"{path!r}: '..' is refused")
        real = os.path.realpath(os.path.join(self.root, path))
        if os.path.commonpath([self.root, real]) != self.root or real == self.root:
            raise Refused(f"{path!r} leads out of the served directory")
        return real

    async def handle(self, request: AnyRequest) -> AnyReply:
        try:
            return await anyio.to_thread.run_sync(self._answer, request)
        except Refused as exc:
            return Reply.Error(str(exc))
        except OSError as exc:
            return Reply.Error(f"{getattr(request, 'path', '')}: {exc.strerror or exc}")

    def _answer(self, request: AnyRequest) -> AnyReply:
        # Runs in a worker thread: blocking file system calls are fine here.
        match request:
            case Request.ListAll():
                return Reply.List(self._list())
            case Request.Size(path):
                real = self._regular(path)
                return Reply.Size(os.stat(real).st_size)
            case Request.Get(path):
                return Reply.Content(self._read(self._regular(path)))
            case Request.Exists(path):
                return Reply.Exists(os.path.isfile(self.resolve(path)))
            case Request.Del(path):
                os.unlink(self._regular(path))
                return Reply.Ok()
        raise Refused(f"unknown request {request!r}")

    def _regular(self, path: str) -> str:
        real = self.resolve(path)
        if not os.path.isfile(real):
            raise Refused(
                f"{path!r} is not a regular file"
                if os.path.exists(real)
                else f"{path!r}: no such file"
            )
        return real

    def _read(self, real: str) -> str:
        with open(real, "rb") as file:
            data = file.read(MAX_CONTENT + 1)
        if len(data) > MAX_CONTENT:
            raise Refused(f"the file is larger than {MAX_CONTENT} bytes")
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            raise Refused("the file is not UTF-8 text") from None

    def _list(self) -> list[str]:
        files: list[str] = []
        for directory, subdirectories, names in os.walk(self.root):  # never follows links
            subdirectories.sort()
            for name in names:
                full = os.path.join(directory, name)
                real = os.path.realpath(full)
                inside = os.path.commonpath([self.root, real]) == self.root
                if inside and os.path.isfile(real):
                    files.append(os.path.relpath(full, self.root).replace(os.sep, "/"))
                    if len(files) > MAX_FILES:
                        raise Refused(f"more than {MAX_FILES} files")
        return sorted(files)


async def serve(
    ios: ioserver.IOServer,
    host: str,
    port: int,
    root: str,
    *,
    packet_size: int = PACKET_SIZE,
    task_status: anyio.abc.TaskStatus[Any] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the files under ``root`` on ``host:port``; reports the bound address.

    ``packet_size`` (bytes) caps each frame and sets the limits its requests are
    decoded within (see the module docstring).
    """
    service = FileService(root)
    async with await ports.listen_tcp(
        ios, host, port, packet=4, packet_size=packet_size
    ) as listener:
        await rpc.serve_listener(
            listener,
            FILES,
            service.handle,
            max_concurrent_calls=MAX_CONCURRENT_CALLS,
            task_status=task_status,
        )


class FileClient:
    """A typed client: one method per request; ``Error`` replies raise :exc:`FileError`."""

    def __init__(self, client: rpc.Client[AnyRequest, AnyReply], timeout: float = 30) -> None:
        self.client = client
        self.timeout = timeout

    async def _call(self, request: AnyRequest) -> AnyReply:
        reply = await self.client.call(request, timeout=self.timeout)
        if isinstance(reply, Reply.Error):
            raise FileError(reply.message)
        return reply

    async def list_all(self) -> list[str]:
        reply = await self._call(Request.ListAll())
        assert isinstance(reply, Reply.List), reply
        return reply.files

    async def size(self, path: str) -> int:
        reply = await self._call(Request.Size(path))
        assert isinstance(reply, Reply.Size), reply
        return reply.n

    async def get(self, path: str) -> str:
        reply = await self._call(Request.Get(path))
        assert isinstance(reply, Reply.Content), reply
        return reply.text

    async def exists(self, path: str) -> bool:
        reply = await self._call(Request.Exists(path))
        assert isinstance(reply, Reply.Exists), reply
        return reply.exists

    async def delete(self, path: str) -> None:
        reply = await self._call(Request.Del(path))
        assert isinstance(reply, Reply.Ok), reply


class FileError(Exception):
    """The service answered ``Error(message)``."""


async def client_main(ios: ioserver.IOServer, options: argparse.Namespace) -> int:
    connecting = rpc.connect(ios, options.host, options.port, FILES, packet_size=PACKET_SIZE)
    async with await connecting as client:
        files = FileClient(client)
        try:
            match options.operation:
                case "list":
                    for name in await files.list_all():
                        print(name)
                case "size":
                    print(await files.size(options.path))
                case "get":
                    sys.stdout.write(await files.get(options.path))
                case "exists":
                    print("yes" if await files.exists(options.path) else "no")
                case "del":
                    await files.delete(options.path)
        except FileError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="file_service", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on / connect to")
    parser.add_argument("--port", type=int, default=7002, help="TCP port (default 7002)")
    parser.add_argument("--root", default=".", help="the directory to serve (default: .)")
    return parser


def byte_size(text: str) -> int:
    """``"1048576"``, ``"64k"``, ``"1M"``, ``"2G"`` → bytes (powers of 1024)."""
    text = text.strip()
    scale = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}.get(text[-1:].lower(), 1)
    try:
        number = int(text[:-1] if scale != 1 else text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size in bytes: {text!r}") from None
    if number <= 0:
        raise argparse.ArgumentTypeError(f"a size must be positive, not {text!r}")
    return number * scale


async def main(ios: ioserver.IOServer, argv: Sequence[str] = ()) -> int:
    """Serve (``--port P --root DIR``), or run one client operation (``client ...``).

    Returns the exit status: 0, or 1 when the service answered ``Error``.
    """
    argv = list(argv)
    if argv and argv[0] == "client":
        parser = _parser()
        parser.prog = "file_service client"
        parser.add_argument("operation", choices=["list", "size", "get", "exists", "del"])
        parser.add_argument("path", nargs="?", default="")
        options = parser.parse_args(argv[1:])
        if options.operation != "list" and not options.path:
            parser.error(f"{options.operation} needs a PATH")
        return await client_main(ios, options)
    parser = _parser()
    parser.add_argument(
        "--packet-size",
        type=byte_size,
        default=PACKET_SIZE,
        help="the largest frame in bytes, either way; requests decode within limits "
        "derived from it (default 2M)",
    )
    parser.add_argument(
        "--memory-limit",
        type=byte_size,
        default=MEMORY_LIMIT,
        help="the I/O server's budget for buffered input and output "
        "(ioserver.open(memory_limit=...); default 64M)",
    )
    options = parser.parse_args(argv)
    # `ioserver run` opened `ios` without a budget: serve from one opened with it.
    async with (
        ioserver.open(memory_limit=options.memory_limit) as bounded,
        anyio.create_task_group() as task_group,
    ):
        address = await task_group.start(
            lambda task_status: serve(
                bounded,
                options.host,
                options.port,
                options.root,
                packet_size=options.packet_size,
                task_status=task_status,
            )
        )
        print(
            f"file service for {options.root} on {address[0]}:{address[1]}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(ioserver.main(["run", __file__, *sys.argv[1:]]))
