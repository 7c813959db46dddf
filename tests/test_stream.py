"""ports.PortStream: a raw stream port as an anyio ByteStream and a trio HalfCloseableStream.

Real sockets on loopback: trio's own conformance suite, anyio's buffered, text and TLS
streams (against a real TLS peer with a throw-away self-signed certificate), an h11
client/server loop, a program's stdio.
"""

from __future__ import annotations

import itertools
import os
import shutil
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import anyio
import anyio.abc
import h11
import pytest
import trio
import trio.testing
from anyio.abc import SocketAttribute
from anyio.streams.buffered import BufferedByteReceiveStream
from anyio.streams.text import TextStream
from anyio.streams.tls import TLSListener, TLSStream

import ioserver
import ports
from ports import PortStream
from ports._stream import SEND_CHUNK_SIZE

pytestmark = pytest.mark.anyio

#: The clogged pairs' flow-control settings (bytes): small, so a few hundred KiB clog them.
CLOG_OPTIONS = {
    "sndbuf": 4096,
    "recbuf": 4096,
    "high_watermark": 16384,
    "low_watermark": 8192,
    "high_msgq_watermark": 16384,
    "low_msgq_watermark": 8192,
}
#: Far more than a clogged Unix pair absorbs (its socket buffer, one 64 KiB read, the
#: receiver's 16 KiB message queue): the sender stays busy until its peer reads.
CLOG_SIZE = 512 * 1024

_names = itertools.count()


async def tcp_ports(ios: ioserver.IOServer, **options: object) -> tuple[ports.Port, ports.Port]:
    listener = await ports.listen_tcp(ios, "127.0.0.1", 0, **options)  # type: ignore[arg-type]
    async with listener:
        client = await ports.connect_tcp(
            ios,
            "127.0.0.1",
            listener.local_address[1],
            **options,  # type: ignore[arg-type]
        )
        accepted = await listener.receive()
        assert isinstance(accepted, ports.Accepted), accepted
    return client, accepted.port


async def unix_ports(ios: ioserver.IOServer, **options: object) -> tuple[ports.Port, ports.Port]:
    name = f"\0ioserver-stream-{os.getpid()}-{next(_names)}"
    listener = await ports.listen_unix(ios, name, **options)  # type: ignore[arg-type]
    async with listener:
        client = await ports.connect_unix(ios, name, **options)  # type: ignore[arg-type]
        accepted = await listener.receive()
        assert isinstance(accepted, ports.Accepted), accepted
    return client, accepted.port


async def clogged_ports(ios: ioserver.IOServer) -> tuple[ports.Port, ports.Port]:
    """A Unix port pair whose both directions are clogged: each side queued CLOG_SIZE
    bytes that the other has not read, so each is busy (its sends wait) until the other
    side reads."""
    first, second = await unix_ports(ios, **CLOG_OPTIONS)
    for port in (first, second):
        await port.send(b"c" * CLOG_SIZE)
        assert port.busy
    return first, second


def tcp_stream_maker(ios: ioserver.IOServer):  # type: ignore[no-untyped-def]
    async def make() -> tuple[PortStream, PortStream]:
        first, second = await tcp_ports(ios)
        return PortStream(first), PortStream(second)

    return make


def unix_stream_maker(ios: ioserver.IOServer):  # type: ignore[no-untyped-def]
    async def make() -> tuple[PortStream, PortStream]:
        first, second = await unix_ports(ios)
        return PortStream(first), PortStream(second)

    return make


def clogged_stream_maker(ios: ioserver.IOServer):  # type: ignore[no-untyped-def]
    async def make() -> tuple[PortStream, PortStream]:
        first, second = await clogged_ports(ios)
        return PortStream(first), PortStream(second)

    return make


# -- trio's conformance suite ---------------------------------------------------------------


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_trio_half_closeable_stream_conformance(ios: ioserver.IOServer) -> None:
    """trio's own check, including the clogged-stream half (trio's suite runs on trio
    only: it uses trio's nurseries and wait_all_tasks_blocked)."""
    with trio.fail_after(30):
        await trio.testing.check_half_closeable_stream(
            tcp_stream_maker(ios), clogged_stream_maker(ios)
        )


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_trio_conformance_over_unix_ports(ios: ioserver.IOServer) -> None:
    with trio.fail_after(30):
        await trio.testing.check_half_closeable_stream(unix_stream_maker(ios), None)


async def test_it_is_both_libraries_stream(ios: ioserver.IOServer) -> None:
    first, second = await tcp_ports(ios)
    async with PortStream(first) as a, PortStream(second) as b:
        assert isinstance(a, anyio.abc.ByteStream)
        assert isinstance(a, trio.abc.HalfCloseableStream)
        assert a.port is first
        await a.send(b"hello")
        assert await b.receive() == b"hello"
        await b.send_all(memoryview(b"back"))
        assert await a.receive_some() == b"back"


# -- receiving --------------------------------------------------------------------------------


async def test_a_larger_data_is_kept_for_the_next_receive(ios: ioserver.IOServer) -> None:
    first, second = await tcp_ports(ios)
    async with PortStream(first) as a, PortStream(second) as b:
        await a.send(b"0123456789")
        got = b""
        while len(got) < 10:
            chunk = await b.receive(3)
            assert 1 <= len(chunk) <= 3
            got += chunk
        assert got == b"0123456789"
        with pytest.raises(TypeError):
            await b.receive_some(1.5)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="at least 1"):
            await b.receive(0)


async def test_end_of_stream_is_endofstream_for_anyio_and_empty_for_trio(
    ios: ioserver.IOServer,
) -> None:
    first, second = await tcp_ports(ios)
    async with PortStream(first) as a, PortStream(second) as b:
        await a.send_all(b"last")
        await a.send_eof()
        assert await b.receive_some(100) == b"last"
        assert await b.receive_some(100) == b""
        assert await b.receive_some(100) == b""  # and stays so
        with pytest.raises(anyio.EndOfStream):
            await b.receive()
        with pytest.raises(ports.EndOfPort):
            await b.receive()
        await b.send_all(b"half-closed: the other way still works")
        assert await a.receive(100) == b"half-closed: the other way still works"
        with pytest.raises(ports.ClosedPortError, match="send_eof"):
            await a.send_all(b"no more")
        await b.aclose()  # closed by this side: that wins over the end of the stream
        with pytest.raises(ports.ClosedPortError):
            await b.receive_some()


async def test_a_reset_connection_is_broken_on_both_libraries(ios: ioserver.IOServer) -> None:
    listener = await ports.listen_tcp(ios, "127.0.0.1", 0)
    async with listener:
        raw = socket.create_connection(listener.local_address)
        accepted = await listener.receive()
    assert isinstance(accepted, ports.Accepted)
    async with PortStream(accepted.port) as stream:
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
        raw.close()  # an RST: ECONNRESET
        for _ in range(2):  # and it stays broken
            with pytest.raises(ports.BrokenPortError) as caught:
                await stream.receive_some()
            assert isinstance(caught.value, anyio.BrokenResourceError)
            assert isinstance(caught.value, trio.BrokenResourceError)
            assert caught.value.errno_name == "ECONNRESET"


async def test_a_cancelled_receive_takes_nothing(ios: ioserver.IOServer) -> None:
    first, second = await tcp_ports(ios)
    async with PortStream(first) as a, PortStream(second) as b:
        await a.send(b"abcdef")
        assert await b.receive(2) == b"ab"  # "cdef" is kept in the stream
        with anyio.CancelScope() as scope:
            scope.cancel()
            await b.receive(2)
        assert scope.cancelled_caught
        assert await b.receive(10) == b"cdef"
        await a.send(b"g")
        with anyio.CancelScope() as scope:
            scope.cancel()
            await b.receive(2)  # a Data buffered in the port: not taken either
        assert await b.receive(10) == b"g"


async def test_concurrent_receives_or_sends_are_busy(ios: ioserver.IOServer) -> None:
    first, second = await clogged_ports(ios)
    async with PortStream(first) as a, PortStream(second) as b:
        del b
        # a's peer has not read: a's send waits; a second one is refused.
        async with anyio.create_task_group() as task_group:
            task_group.start_soon(a.send_all, b"x")
            await anyio.wait_all_tasks_blocked()
            for operation in (a.send_all(b"y"), a.wait_send_all_might_not_block(), a.send_eof()):
                with pytest.raises(ports.BusyPortError) as caught:
                    await operation
                assert isinstance(caught.value, anyio.BusyResourceError)
                assert isinstance(caught.value, trio.BusyResourceError)
            task_group.cancel_scope.cancel()
    first, second = await tcp_ports(ios)
    async with PortStream(first) as a, PortStream(second), anyio.create_task_group() as task_group:
        task_group.start_soon(a.receive_some, 10)  # nothing sent: it waits
        await anyio.wait_all_tasks_blocked()
        with pytest.raises(ports.BusyPortError, match="receiving"):
            await a.receive_some(10)
        task_group.cancel_scope.cancel()


# -- sending and flow control -----------------------------------------------------------------


async def test_wait_send_all_might_not_block_waits_while_the_port_is_busy(
    ios: ioserver.IOServer,
) -> None:
    first, second = await clogged_ports(ios)
    async with PortStream(first) as a, PortStream(second) as b:
        record = []

        async def waiter() -> None:
            await a.wait_send_all_might_not_block()
            record.append("writable")
            assert not a.port.busy

        async with anyio.create_task_group() as task_group:
            task_group.start_soon(waiter)
            await anyio.wait_all_tasks_blocked()
            assert record == []  # clogged: it waits
            got = 0
            while not record:
                got += len(await b.receive_some())
        assert got >= CLOG_SIZE - CLOG_OPTIONS["low_watermark"] - 200_000


async def test_a_send_cancelled_before_queueing_left_the_stream_whole(
    ios: ioserver.IOServer,
) -> None:
    first, second = await clogged_ports(ios)
    async with PortStream(first) as a, PortStream(second) as b:
        async with anyio.create_task_group() as task_group:
            task_group.start_soon(a.send_all, b"lost")
            await anyio.wait_all_tasks_blocked()  # waiting: the port is busy
            task_group.cancel_scope.cancel()

        async def drain() -> bytes:
            got = bytearray()
            while len(got) < CLOG_SIZE + 5:
                got += await b.receive_some()
            return bytes(got)

        async with anyio.create_task_group() as task_group:
            task_group.start_soon(a.send_all, b"kept!")
            assert await drain() == b"c" * CLOG_SIZE + b"kept!"


async def test_a_send_cancelled_part_way_breaks_the_stream(ios: ioserver.IOServer) -> None:
    first, second = await unix_ports(ios, **CLOG_OPTIONS)
    async with PortStream(first) as a, PortStream(second) as b:
        payload = b"p" * (8 * 1024 * 1024)  # far more than the pair absorbs
        async with anyio.create_task_group() as task_group:
            task_group.start_soon(a.send_all, payload)
            await anyio.wait_all_tasks_blocked()  # blocked part-way: the port is busy
            assert a.port.statistics().bytes_buffered_out > 0
            task_group.cancel_scope.cancel()
        for operation in (a.send_all(b"more"), a.wait_send_all_might_not_block()):
            with pytest.raises(ports.BrokenPortError, match="part-way"):
                await operation
        # Receiving still works, and closing.
        assert await b.receive_some(1) == b"p"


async def test_a_large_send_all_is_bounded_by_the_watermarks(ios: ioserver.IOServer) -> None:
    """send_all queues in pieces, each waiting while the port is busy: a 4 MiB send
    never has more than high_watermark + one piece queued (one port.send of it would
    queue it all at once)."""
    first, second = await unix_ports(ios, **CLOG_OPTIONS)
    async with PortStream(first) as a, PortStream(second) as b:
        payload = os.urandom(4 * 1024 * 1024)
        peak = 0

        async def reader() -> None:
            nonlocal peak
            got = bytearray()
            while len(got) < len(payload):
                peak = max(peak, a.port.statistics().bytes_buffered_out)
                got += await b.receive_some()
            assert got == payload

        async with anyio.create_task_group() as task_group:
            task_group.start_soon(reader)
            await a.send_all(bytearray(payload))
        assert 0 < peak <= CLOG_OPTIONS["high_watermark"] + SEND_CHUNK_SIZE


async def test_a_closed_port_flushing_to_a_blocked_peer_lets_that_peer_drain(
    ios: ioserver.IOServer,
) -> None:
    """Both directions clogged, then one side closes: it flushes its queued output before
    its socket closes, and it must read on meanwhile (dropping what comes), or the peer,
    blocked writing to it, never reads what it flushes: both would wait forever (the
    clogged half of trio's conformance suite found this)."""
    first, second = await clogged_ports(ios)
    async with first:
        await second.aclose()
        with anyio.fail_after(10):
            try:
                await first.send(b"")  # waits while busy: it drains now
            except ports.BrokenPortError:
                pass  # or the flush ended and the close broke the connection
        assert not first.busy or first.closed


# -- what the stream accepts ------------------------------------------------------------------


async def test_only_a_raw_stream_port_is_accepted(ios: ioserver.IOServer) -> None:
    first, second = await tcp_ports(ios, packet=4)
    async with first, second:
        with pytest.raises(ports.OptionError, match=r"packet='raw'.*packet=4"):
            PortStream(first)
    async with await ports.listen_tcp(ios, "127.0.0.1", 0) as listener:
        with pytest.raises(ports.OptionError, match=r"stream port.*Listener"):
            PortStream(listener)  # type: ignore[arg-type]
    async with await ports.open_udp(ios, ("127.0.0.1", 0)) as udp:
        with pytest.raises(ports.OptionError, match="UDPPort"):
            PortStream(udp)  # type: ignore[arg-type]
    first, second = await tcp_ports(ios)
    mailbox = ports.Mailbox()
    async with first, second:
        first.set_owner(mailbox)
        with pytest.raises(ports.OptionError, match="owner mailbox"):
            PortStream(first)
    mailbox.close()


async def test_typed_attributes_are_the_ports_addresses(ios: ioserver.IOServer) -> None:
    first, second = await tcp_ports(ios)
    async with PortStream(first) as a, PortStream(second) as b:
        assert a.extra(SocketAttribute.local_address) == first.local_address
        assert a.extra(SocketAttribute.remote_address) == first.remote_address
        assert a.extra(SocketAttribute.remote_port) == second.local_address[1]
        assert a.extra(SocketAttribute.local_port) == first.local_address[1]
        assert b.extra(SocketAttribute.family) == socket.AF_INET
        with pytest.raises(anyio.TypedAttributeLookupError):
            a.extra(SocketAttribute.raw_socket)  # the I/O thread owns the socket


# -- anyio's streams over a PortStream --------------------------------------------------------


async def test_anyio_buffered_and_text_streams(ios: ioserver.IOServer) -> None:
    first, second = await tcp_ports(ios)
    async with PortStream(first) as a, PortStream(second) as b:
        buffered = BufferedByteReceiveStream(b)
        await a.send(b"HEADER\r\nbody:12345")
        assert await buffered.receive_until(b"\r\n", 100) == b"HEADER"
        assert await buffered.receive_exactly(5) == b"body:"
        assert await buffered.receive_exactly(5) == b"12345"
        text = TextStream(a)
        await TextStream(b).send("naïve ✓")
        assert await text.receive() == "naïve ✓"


async def test_a_process_ports_stdio_is_a_stream(ios: ioserver.IOServer) -> None:
    process = await ports.open_process(ios, ["cat"])
    async with PortStream(process) as stream:
        text = TextStream(stream)
        await text.send("through cat\n")
        await stream.send_eof()
        got = ""
        with pytest.raises(anyio.EndOfStream):
            while True:
                got += await text.receive()
        assert got == "through cat\n"
    assert process.exit_status == 0


# -- TLS over a PortStream, against a real TLS peer ------------------------------------------


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    """A throw-away self-signed certificate for localhost/127.0.0.1: (cert, key)."""
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "cert.pem", directory / "key.pem"
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("TLS tests need the openssl command to make a self-signed certificate")
    subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    yield cert, key


def contexts(certificate: tuple[Path, Path]) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    cert, key = certificate
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert, key)
    server.set_alpn_protocols(["http/1.1"])
    client = ssl.create_default_context(cafile=str(cert))
    client.set_alpn_protocols(["http/1.1"])
    return server, client


async def test_tls_client_over_a_port_stream_against_anyios_tls_server(
    ios: ioserver.IOServer, certificate: tuple[Path, Path]
) -> None:
    server_context, client_context = contexts(certificate)
    tcp_listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    number = tcp_listener.extra(SocketAttribute.local_port)
    listener = TLSListener(tcp_listener, server_context)

    async def serve(stream: anyio.abc.ByteStream) -> None:
        async with stream:
            line = await BufferedByteReceiveStream(stream).receive_until(b"\n", 1000)
            await stream.send(line.upper() + b"\n")

    async with listener, anyio.create_task_group() as task_group:
        task_group.start_soon(listener.serve, serve)
        port = await ports.connect_tcp(ios, "127.0.0.1", number)
        tls = await TLSStream.wrap(
            PortStream(port), hostname="localhost", ssl_context=client_context
        )
        async with tls:
            assert tls.extra(anyio.streams.tls.TLSAttribute.alpn_protocol) == "http/1.1"
            assert tls.extra(SocketAttribute.remote_port) == number
            await tls.send(b"hello over tls\n")
            assert await BufferedByteReceiveStream(tls).receive_until(b"\n", 100) == (
                b"HELLO OVER TLS"
            )
        task_group.cancel_scope.cancel()


async def test_tls_server_over_a_port_stream_against_a_stdlib_client(
    ios: ioserver.IOServer, certificate: tuple[Path, Path]
) -> None:
    server_context, client_context = contexts(certificate)
    listener = await ports.listen_tcp(ios, "127.0.0.1", 0)
    number = listener.local_address[1]
    async with listener, anyio.create_task_group() as task_group:

        async def serve() -> None:
            accepted = await listener.receive()
            assert isinstance(accepted, ports.Accepted)
            tls = await TLSStream.wrap(
                PortStream(accepted.port), server_side=True, ssl_context=server_context
            )
            async with tls:
                data = await tls.receive()
                await tls.send(data[::-1])

        task_group.start_soon(serve)
        # The peer: the standard library's ssl over a socket of the event loop.
        client = await anyio.connect_tcp(
            "127.0.0.1", number, tls=True, ssl_context=client_context, tls_hostname="localhost"
        )
        async with client:
            await client.send(b"stressed")
            assert await client.receive() == b"desserts"


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_trio_ssl_stream_over_a_port_stream(
    ios: ioserver.IOServer, certificate: tuple[Path, Path]
) -> None:
    """trio's SSLStream on both ends, each over a PortStream of a real TCP connection."""
    server_context, client_context = contexts(certificate)
    first, second = await tcp_ports(ios)
    client = trio.SSLStream(PortStream(first), client_context, server_hostname="localhost")
    server = trio.SSLStream(PortStream(second), server_context, server_side=True)
    async with client, server:

        async def serve() -> None:
            data = await server.receive_some()
            await server.send_all(data.upper())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            await client.send_all(b"trio ssl")
            assert await client.receive_some() == b"TRIO SSL"
        assert client.selected_alpn_protocol() == "http/1.1"


# -- h11 over PortStreams ---------------------------------------------------------------------


async def h11_next_event(connection: h11.Connection, stream: PortStream) -> object:
    while True:
        event = connection.next_event()
        if event is not h11.NEED_DATA:
            return event
        connection.receive_data(await stream.receive_some())


async def test_an_h11_client_and_server_loop(ios: ioserver.IOServer) -> None:
    first, second = await tcp_ports(ios)
    async with PortStream(first) as client_stream, PortStream(second) as server_stream:

        async def server() -> None:
            connection = h11.Connection(h11.SERVER)
            for _ in range(2):  # two requests on one keep-alive connection
                request = await h11_next_event(connection, server_stream)
                assert isinstance(request, h11.Request)
                body = b""
                while True:
                    event = await h11_next_event(connection, server_stream)
                    if isinstance(event, h11.EndOfMessage):
                        break
                    assert isinstance(event, h11.Data)
                    body += event.data
                reply = request.target + b" " + body
                await server_stream.send_all(
                    connection.send(
                        h11.Response(status_code=200, headers=[("content-length", str(len(reply)))])
                    )
                    + connection.send(h11.Data(data=reply))
                    + connection.send(h11.EndOfMessage())
                )
                connection.start_next_cycle()

        async with anyio.create_task_group() as task_group:
            task_group.start_soon(server)
            connection = h11.Connection(h11.CLIENT)
            for index in range(2):
                body = b"x" * (100_000 * index + 1)  # the second one spans many reads
                await client_stream.send_all(
                    connection.send(
                        h11.Request(
                            method="POST",
                            target=f"/{index}",
                            headers=[("host", "test"), ("content-length", str(len(body)))],
                        )
                    )
                    + connection.send(h11.Data(data=body))
                    + connection.send(h11.EndOfMessage())
                )
                response = await h11_next_event(connection, client_stream)
                assert isinstance(response, h11.Response)
                assert response.status_code == 200
                got = b""
                while True:
                    event = await h11_next_event(connection, client_stream)
                    if isinstance(event, h11.EndOfMessage):
                        break
                    assert isinstance(event, h11.Data)
                    got += event.data
                assert got == f"/{index} ".encode() + body
                connection.start_next_cycle()


if sys.platform != "linux":  # pragma: no cover
    pytestmark = [pytestmark, pytest.mark.skip(reason="abstract Unix socket names are Linux's")]


# -- through a daemon -------------------------------------------------------------------------


async def test_a_daemons_tcp_port_is_a_stream_too(
    tmp_path: Path, no_leaks: None, anyio_backend: str
) -> None:
    """A port of an ioserver daemon (client.connect) wraps the same way; on trio, trio's
    conformance suite runs over it (without the clogged half: a daemon's port pair is two
    hops of buffers away from a clog)."""
    from test_daemon import HEARTBEAT, Daemon

    import client

    endpoint = f"ipc://{tmp_path / 'run' / 'control'}"
    daemon = Daemon("--endpoint", endpoint, "--heartbeat", str(HEARTBEAT))
    try:
        async with client.connect(endpoint) as ios:

            async def make() -> tuple[PortStream, PortStream]:
                first, second = await tcp_ports(ios)  # type: ignore[arg-type]
                return PortStream(first), PortStream(second)

            with anyio.fail_after(30):
                if anyio_backend == "trio":
                    await trio.testing.check_half_closeable_stream(make, None)
                a, b = await make()
                async with a, b:
                    await a.send(b"line one\r\nline two\r\n")
                    reader = BufferedByteReceiveStream(b)
                    assert await reader.receive_until(b"\r\n", 100) == b"line one"
                    assert await reader.receive_until(b"\r\n", 100) == b"line two"
    finally:
        assert daemon.stop() == 0, daemon.log
