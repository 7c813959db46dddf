"""The file service example: every operation, traversal attempts, limits, and the CLI."""

from __future__ import annotations

import importlib.util
import os
import signal
import struct
import subprocess
import sys
import tracemalloc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import anyio
import anyio.abc
import msgpack
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream

import ioserver
from ports import rpc

ROOT = Path(__file__).resolve().parent.parent


def load_example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        f"example_{name}", ROOT / "examples" / f"{name}.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


fs = load_example("file_service")
Request, Reply = fs.Request, fs.Reply


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """``served/`` with files, a subdirectory, and links inside and out; ``secret`` outside."""
    served = tmp_path / "served"
    (served / "sub").mkdir(parents=True)
    (served / "a.txt").write_text("alpha\n")
    (served / "sub" / "b.txt").write_text("béta\n")
    (served / "binary").write_bytes(b"\xff\xfe\x00")
    (tmp_path / "secret").write_text("top secret\n")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "c.txt").write_text("outside\n")
    os.symlink(tmp_path / "secret", served / "secret_link")
    os.symlink(tmp_path / "outside", served / "outside_dir")
    os.symlink("a.txt", served / "inner_link")
    return served


@asynccontextmanager
async def file_client(ios: ioserver.IOServer, root: Path) -> AsyncIterator[Any]:
    async with anyio.create_task_group() as task_group:
        address = await task_group.start(fs.serve, ios, "127.0.0.1", 0, str(root))
        async with await rpc.connect(ios, *address, fs.FILES) as client:
            yield client
        task_group.cancel_scope.cancel()


pytestmark = pytest.mark.anyio


async def test_every_operation_answers_with_its_reply(ios: ioserver.IOServer, tree: Path) -> None:
    async with file_client(ios, tree) as client:
        listing = await client.call(Request.ListAll(), timeout=10)
        assert listing == Reply.List(["a.txt", "binary", "inner_link", "sub/b.txt"])
        assert await client.call(Request.Size("a.txt")) == Reply.Size(6)
        assert await client.call(Request.Size("sub/b.txt")) == Reply.Size(len("béta\n".encode()))
        assert await client.call(Request.Get("sub/b.txt")) == Reply.Content("béta\n")
        assert await client.call(Request.Get("inner_link")) == Reply.Content("alpha\n")
        assert await client.call(Request.Exists("a.txt")) == Reply.Exists(True)
        assert await client.call(Request.Exists("nope")) == Reply.Exists(False)
        assert await client.call(Request.Exists("sub")) == Reply.Exists(False)  # not a file
        assert await client.call(Request.Del("a.txt")) == Reply.Ok()
        assert await client.call(Request.Exists("a.txt")) == Reply.Exists(False)
        assert not (tree / "a.txt").exists()


@pytest.mark.parametrize(
    ("request_", "reason"),
    [
        (Request.Get("../secret"), "'..' is refused"),
        (Request.Get("sub/../../secret"), "'..' is refused"),
        (Request.Get("/etc/passwd"), "absolute"),
        (Request.Get("secret_link"), "leads out"),
        (Request.Get("outside_dir/c.txt"), "leads out"),
        (Request.Size("secret_link"), "leads out"),
        (Request.Exists("secret_link"), "leads out"),
        (Request.Exists("../secret"), "'..' is refused"),
        (Request.Del("secret_link"), "leads out"),
        (Request.Del("outside_dir/c.txt"), "leads out"),
        (Request.Get("a.txt\0"), "non-empty relative path"),
        (Request.Get(""), "non-empty relative path"),
        (Request.Get("."), "leads out"),
    ],
    ids=lambda value: repr(value)[:40],
)
async def test_paths_that_escape_the_served_directory_get_error_never_data(
    ios: ioserver.IOServer, tree: Path, request_: Any, reason: str
) -> None:
    async with file_client(ios, tree) as client:
        reply = await client.call(request_, timeout=10)
        assert isinstance(reply, Reply.Error), reply
        assert reason in reply.message
        assert "top secret" not in reply.message and "outside\n" not in reply.message
    # Nothing outside was touched.
    assert (tree.parent / "secret").read_text() == "top secret\n"
    assert (tree.parent / "outside" / "c.txt").exists()


async def test_errors_for_missing_files_directories_binary_and_large_files(
    ios: ioserver.IOServer, tree: Path
) -> None:
    (tree / "big").write_bytes(b"x" * (fs.MAX_CONTENT + 1))
    (tree / "just_fits").write_bytes(b"y" * fs.MAX_CONTENT)
    async with file_client(ios, tree) as client:
        for request, text in [
            (Request.Get("nope"), "no such file"),
            (Request.Size("sub"), "not a regular file"),
            (Request.Del("sub"), "not a regular file"),
            (Request.Get("binary"), "not UTF-8"),
            (Request.Get("big"), f"larger than {fs.MAX_CONTENT} bytes"),
        ]:
            reply = await client.call(request, timeout=10)
            assert isinstance(reply, Reply.Error), (request, reply)
            assert text in reply.message
        assert await client.call(Request.Size("big")) == Reply.Size(fs.MAX_CONTENT + 1)
        content = await client.call(Request.Get("just_fits"), timeout=10)
        assert content == Reply.Content("y" * fs.MAX_CONTENT)
    assert (tree / "sub").is_dir()


async def test_a_request_of_the_wrong_shape_is_a_decode_error_and_the_service_goes_on(
    ios: ioserver.IOServer, tree: Path
) -> None:
    async with file_client(ios, tree) as client:
        with pytest.raises(rpc.RPCDecodeError, match=r"Get\.path: Expected `str`") as caught:
            await client.call(Request.Get(42))
        assert caught.value.remote
        assert await client.call(Request.Exists("a.txt")) == Reply.Exists(True)


async def test_the_typed_client_raises_file_error_on_error_replies(
    ios: ioserver.IOServer, tree: Path
) -> None:
    async with file_client(ios, tree) as client:
        files = fs.FileClient(client)
        assert await files.get("a.txt") == "alpha\n"
        assert await files.size("a.txt") == 6
        assert await files.exists("a.txt")
        assert "sub/b.txt" in await files.list_all()
        with pytest.raises(fs.FileError, match="leads out"):
            await files.get("secret_link")
        await files.delete("sub/b.txt")
        assert not await files.exists("sub/b.txt")


def test_the_service_and_its_client_run_as_commands(tree: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    script = str(ROOT / "examples" / "file_service.py")
    server = subprocess.Popen(
        [sys.executable, script, "--port", "0", "--root", str(tree)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert server.stdout is not None
        first = server.stdout.readline()
        assert " on 127.0.0.1:" in first, first
        number = first.rsplit(":", 1)[1].strip()

        def client(*argv: str) -> subprocess.CompletedProcess[str]:
            command = [sys.executable, script, "client", "--port", number, *argv]
            return subprocess.run(command, capture_output=True, text=True, env=env, timeout=30)

        got = client("get", "sub/b.txt")
        assert (got.returncode, got.stdout) == (0, "béta\n")
        escaped = client("get", "../secret")
        assert escaped.returncode == 1
        assert "'..' is refused" in escaped.stderr
        assert "top secret" not in escaped.stdout
        server.send_signal(signal.SIGINT)
        assert server.wait(15) == 0
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
        for pipe in (server.stdout, server.stderr):
            if pipe is not None:
                pipe.close()


def _hostile_frame(kind: str, ident: int) -> bytes:
    """A request envelope ``[0, ident, [...]]`` of about 1 MiB whose value expands: a
    million empty arrays (64 bytes of list each), or 350,000 16-bit ints (36 bytes each)."""
    if kind == "empty arrays":
        count, item = 1 << 20, b"\x90"
    else:
        count, item = 350_000, b"\xcd\x12\x34"
    return b"\x93\x00" + bytes([ident]) + b"\xdd" + struct.pack(">I", count) + item * count


async def _exchange(stream: anyio.abc.SocketStream, frame: bytes) -> Any:
    await stream.send(struct.pack(">I", len(frame)) + frame)
    buffered = BufferedByteReceiveStream(stream)
    with anyio.fail_after(10):
        (size,) = struct.unpack(">I", await buffered.receive_exactly(4))
        return msgpack.unpackb(await buffered.receive_exactly(size), raw=False)


@pytest.mark.parametrize("kind", ["empty arrays", "small ints"])
async def test_a_frame_that_would_expand_is_refused_before_it_is_decoded(
    ios: ioserver.IOServer, tree: Path, kind: str
) -> None:
    frame = _hostile_frame(kind, ident=7)
    assert len(frame) < fs.PACKET_SIZE  # the framing lets it through: the decoder decides
    async with file_client(ios, tree) as bystander:
        assert await bystander.call(Request.Exists("a.txt"), timeout=10) == Reply.Exists(True)
        address = bystander.port.remote_address
        async with await anyio.connect_tcp(*address[:2]) as hostile:
            tracemalloc.start()
            try:
                answer = await _exchange(hostile, frame)
                peak = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
            # The service held a few times the frame, not the 15-65 times it decodes to...
            assert peak < 8 * len(frame), f"{peak / len(frame):.1f} x the frame"
            # ...and that peer alone got a typed error, for its request id, saying why.
            assert answer[:3] == [2, 7, "decode"], answer
            assert "more than" in answer[3] and "values" in answer[3], answer
            # Its connection goes on, and so does everyone else's.
            good = msgpack.packb([0, 8, ["Exists", "a.txt"]])
            assert await _exchange(hostile, good) == [1, 8, ["Exists", True]]
        assert await bystander.call(Request.Get("a.txt"), timeout=10) == Reply.Content("alpha\n")


async def test_a_typed_client_gets_the_refusal_of_its_own_call(
    ios: ioserver.IOServer, tree: Path
) -> None:
    # A legitimate but too dense request: 300,000 paths of one byte each fit in a frame of
    # 2 MiB, but decode to more values than its limits allow.
    class Many(rpc.Message):
        paths: list[str]

    interface: rpc.Interface[Any, Any] = rpc.Interface(Many, fs.AnyReply)
    async with anyio.create_task_group() as task_group:
        address = await task_group.start(fs.serve, ios, "127.0.0.1", 0, str(tree))
        async with await rpc.connect(
            ios, *address, interface, packet_size=fs.PACKET_SIZE
        ) as client:
            with pytest.raises(rpc.RPCDecodeError, match=r"more than \d+ values") as caught:
                await client.call(Many(["a"] * 300_000), timeout=10)
            assert caught.value.remote
        task_group.cancel_scope.cancel()
