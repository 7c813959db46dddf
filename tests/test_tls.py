"""TLS ports (``tls=``): the handshake's failures first, then plaintext in every packet
mode, the memory bound, ALPN, SNI, client certificates and cancellation - against real
TLS peers (Python's ssl through anyio, a blocking ``ssl`` server thread), on both
backends.  Certificates are made at test time by ``trustme``."""

from __future__ import annotations

import contextlib
import errno
import select
import socket
import ssl
import struct
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import anyio.streams.tls
import pytest
import trustme
from anyio.streams.tls import TLSAttribute
from conftest import until
from test_daemon import HEARTBEAT, Daemon

import client
import ioserver
import ports
from ports import Accepted, Closed, Data, Error

pytestmark = pytest.mark.anyio


class Certs:
    """A CA, a server certificate for localhost/127.0.0.1 and the contexts made of them."""

    def __init__(self) -> None:
        self.ca = trustme.CA()
        self.server_cert = self.ca.issue_cert("localhost", "127.0.0.1")
        self.client_cert = self.ca.issue_cert("client@example.org")

    def server(
        self, *, alpn: list[str] | None = None, client_certs: bool = False
    ) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.server_cert.configure_cert(context)
        if alpn:
            context.set_alpn_protocols(alpn)
        if client_certs:
            context.verify_mode = ssl.CERT_REQUIRED
            self.ca.configure_trust(context)
        return context

    def client(self, *, alpn: list[str] | None = None, cert: bool = False) -> ssl.SSLContext:
        context = ssl.create_default_context()
        self.ca.configure_trust(context)
        if alpn:
            context.set_alpn_protocols(alpn)
        if cert:
            self.client_cert.configure_cert(context)
        return context


@pytest.fixture(scope="module")
def certs() -> Certs:
    return Certs()


@pytest.fixture(scope="module")
def other_ca() -> trustme.CA:
    return trustme.CA()


async def receive_exactly(port: ports.Port, size: int) -> bytes:
    data = b""
    while len(data) < size:
        message = await port.receive()
        assert isinstance(message, Data), message
        data += message.data
    return data


async def accept(listener: ports.Listener) -> ports.Port:
    message = await listener.receive()
    assert isinstance(message, Accepted), message
    return message.port


async def tls_client(number: int, context: ssl.SSLContext, **kwargs: Any) -> anyio.abc.ByteStream:
    """Python's ssl client (through anyio), ``standard_compatible``: an end without
    ``close_notify`` would raise BrokenResourceError."""
    return await anyio.connect_tcp(
        "127.0.0.1", number, ssl_context=context, tls_standard_compatible=True, **kwargs
    )


class Neighbour:
    """An established TLS pair (our listener's port, a Python client) that must lose no
    byte while another connection fails next to it."""

    def __init__(self, port: ports.Port, client: anyio.abc.ByteStream) -> None:
        self.port = port
        self.client = client
        self.sent = 0

    async def close(self) -> None:
        # Ours first: a standard-compatible client's close waits for our close_notify.
        await self.port.aclose()
        await self.client.aclose()

    async def check(self) -> None:
        payload = bytes([self.sent % 251]) * 70000  # several records each way
        self.sent += 1
        await self.client.send(payload)
        assert await receive_exactly(self.port, len(payload)) == payload
        await self.port.send(payload)
        got = b""
        while len(got) < len(payload):
            got += await self.client.receive()
        assert got == payload


async def neighbour(ios: ioserver.IOServer, certs: Certs) -> tuple[ports.Listener, Neighbour]:
    listener = await ports.listen_tcp(ios, tls=certs.server())
    client = await tls_client(listener.local_address[1], certs.client())
    port = await accept(listener)
    pair = Neighbour(port, client)
    await pair.check()
    return listener, pair


@pytest.fixture
def silent_server() -> Iterator[tuple[int, Callable[[], None]]]:
    """A TCP server that accepts and then says nothing until released (its port, and the
    function that releases it: it then closes every connection)."""
    server = socket.create_server(("127.0.0.1", 0))
    release = threading.Event()
    accepted: list[socket.socket] = []

    def run() -> None:
        server.settimeout(0.05)
        while not release.is_set():
            try:
                accepted.append(server.accept()[0])
            except TimeoutError:
                pass

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1], release.set
    finally:
        release.set()
        thread.join(5)
        for connection in accepted:
            connection.close()
        server.close()


async def wait_ports_open(ios: ioserver.IOServer, count: int) -> None:
    await until(lambda: ios.statistics().ports_open == count, 5)  # the I/O thread's state


# -- a handshake that fails: our port as the client ---------------------------------------
async def test_connect_to_a_server_of_an_untrusted_ca_raises_tlserror(
    ios: ioserver.IOServer, certs: Certs, other_ca: trustme.CA
) -> None:
    listener, pair = await neighbour(ios, certs)
    wrong = ssl.create_default_context()
    other_ca.configure_trust(wrong)
    async with listener:
        with pytest.raises(ports.TLSError) as info:
            await ports.connect_tcp(ios, "127.0.0.1", listener.local_address[1], tls=wrong)
        assert info.value.errno_name == "ETLS"
        assert info.value.reason == "CERTIFICATE_VERIFY_FAILED"
        assert "127.0.0.1" in str(info.value)
        # The listener saw the client give up, as an Error, and the neighbour lost nothing.
        error = await listener.receive()
        assert isinstance(error, Error) and error.errno_name == "ETLS", error
        await pair.check()
        await pair.close()


async def test_connect_to_a_server_whose_certificate_names_another_host_raises(
    ios: ioserver.IOServer, certs: Certs
) -> None:
    listener, pair = await neighbour(ios, certs)
    async with listener:
        with pytest.raises(ports.TLSError) as info:
            await ports.connect_tcp(
                ios,
                "127.0.0.1",
                listener.local_address[1],
                tls=certs.client(),
                server_hostname="not-this-host.example",
            )
        assert info.value.reason == "CERTIFICATE_VERIFY_FAILED"
        assert "not-this-host.example" in str(info.value)
        await pair.check()
        await pair.close()


async def test_connect_to_a_plaintext_server_raises_tlserror(
    ios: ioserver.IOServer, certs: Certs
) -> None:
    async with await anyio.create_tcp_listener(local_host="127.0.0.1") as plain:
        number = plain.extra(anyio.abc.SocketAttribute.local_port)

        async def answer(stream: anyio.abc.SocketStream) -> None:
            async with stream:
                await stream.receive()
                await stream.send(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

        async with anyio.create_task_group() as group:
            group.start_soon(plain.serve, answer)
            with pytest.raises(ports.TLSError) as info:
                await ports.connect_tcp(ios, "127.0.0.1", number, tls=certs.client())
            assert info.value.errno_name == "ETLS"
            assert info.value.reason in ("WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE"), info.value
            group.cancel_scope.cancel()
    await wait_ports_open(ios, 0)


async def test_connect_to_a_server_that_never_answers_times_out(
    ios: ioserver.IOServer, certs: Certs, silent_server: tuple[int, Callable[[], None]]
) -> None:
    number, _ = silent_server
    listener, pair = await neighbour(ios, certs)
    async with listener:
        with anyio.fail_after(5):
            with pytest.raises(ports.TLSError) as info:
                await ports.connect_tcp(
                    ios, "127.0.0.1", number, tls=certs.client(), tls_handshake_timeout=0.3
                )
        assert info.value.errno_name == "ETIMEDOUT"
        assert "0.3 s" in str(info.value)
        await pair.check()
        await pair.close()
    await wait_ports_open(ios, 0)


# -- a handshake that fails: our listener -----------------------------------------------
async def test_a_client_that_does_not_trust_us_is_an_error_on_the_listener_only(
    ios: ioserver.IOServer, certs: Certs, other_ca: trustme.CA
) -> None:
    listener, pair = await neighbour(ios, certs)
    wrong = ssl.create_default_context()
    other_ca.configure_trust(wrong)
    async with listener:
        with pytest.raises(ssl.SSLCertVerificationError):
            await tls_client(listener.local_address[1], wrong)
        error = await listener.receive()
        assert isinstance(error, Error), error
        assert error.errno_name == "ETLS"
        assert "127.0.0.1" in error.message  # (anyio's client sends no alert: "closed")
        await pair.check()
        # The listener goes on accepting.
        async with await tls_client(listener.local_address[1], certs.client()) as again:
            port = await accept(listener)
            await again.send(b"still here")
            assert await receive_exactly(port, 10) == b"still here"
            await port.aclose()
        await pair.close()


@pytest.mark.parametrize(
    "garbage",
    [b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"\x16\x03\x01\x00\x05hello", bytes(range(256)) * 8],
    ids=["plaintext-http", "truncated-hello", "noise"],
)
async def test_a_plaintext_or_garbage_client_is_an_error_on_the_listener_only(
    ios: ioserver.IOServer, certs: Certs, garbage: bytes
) -> None:
    listener, pair = await neighbour(ios, certs)
    async with listener:
        async with await anyio.connect_tcp("127.0.0.1", listener.local_address[1]) as raw:
            await raw.send(garbage)
            if garbage.startswith(b"\x16"):  # a record that never completes: its end ends it
                await raw.send_eof()
            error = await listener.receive()
            assert isinstance(error, Error), error
            assert error.errno_name == "ETLS"
            with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                while True:
                    await raw.receive()  # an alert at most, then the end
        await pair.check()
        await pair.close()
    await wait_ports_open(ios, 0)


async def test_a_silent_client_times_out_and_the_io_thread_never_stalls(
    ios: ioserver.IOServer, certs: Certs
) -> None:
    listener = await ports.listen_tcp(ios, tls=certs.server(), tls_handshake_timeout=0.5)
    number = listener.local_address[1]
    async with listener:
        client = await tls_client(number, certs.client())
        pair = Neighbour(await accept(listener), client)
        async with await anyio.connect_tcp("127.0.0.1", number) as silent:
            # While the silent client holds its handshake open, the neighbour works.
            await pair.check()
            error = await listener.receive()
            assert isinstance(error, Error) and error.errno_name == "ETIMEDOUT", error
            assert error.errno is not None
            with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                await silent.receive()
        await pair.check()
        await pair.close()


async def test_a_client_without_the_required_certificate_is_refused(
    ios: ioserver.IOServer, certs: Certs
) -> None:
    listener = await ports.listen_tcp(ios, tls=certs.server(client_certs=True))
    async with listener:
        # TLS 1.3: the client finishes first and hears of the refusal on its first read.
        try:
            client = await tls_client(listener.local_address[1], certs.client())
        except (ssl.SSLError, anyio.BrokenResourceError):
            pass
        else:
            with pytest.raises((anyio.BrokenResourceError, ssl.SSLError, anyio.EndOfStream)):
                await client.receive()
            await anyio.aclose_forcefully(client)
        error = await listener.receive()
        assert isinstance(error, Error) and error.errno_name == "ETLS", error
        assert "CERTIFICATE" in error.message.upper()


async def test_a_record_that_does_not_decrypt_is_an_error_then_closed_on_that_port(
    ios: ioserver.IOServer, certs: Certs
) -> None:
    listener, pair = await neighbour(ios, certs)
    async with listener:
        client = await tls_client(listener.local_address[1], certs.client())
        port = await accept(listener)
        await client.send(b"fine")
        assert await receive_exactly(port, 4) == b"fine"
        assert isinstance(client, anyio.streams.tls.TLSStream)
        # Under the TLS layer: an application data record whose tag cannot verify.
        await client.transport_stream.send(b"\x17\x03\x03\x00\x20" + b"\x00" * 32)
        error = await port.receive()
        assert isinstance(error, Error) and error.errno_name == "ETLS", error
        assert await port.receive() == Closed("ETLS", "ETLS")
        await port.aclose()
        await anyio.aclose_forcefully(client)  # (we sent no close_notify after the alert)
        await pair.check()
        await pair.close()


# -- plaintext through TLS ----------------------------------------------------------------
MODES: list[tuple[Any, dict[str, Any], list[Any]]] = [
    ("raw", {}, [b"x" * 3, bytes(range(256)) * 1024]),
    (1, {}, [b"", b"a" * 255]),
    (2, {}, [b"b" * 65535, b"c"]),
    (4, {}, [b"d" * (3 << 20), b"e" * 17, b""]),
    ("line", {}, [b"one\n", b"y" * 100000 + b"\n"]),
    ("msgpack", {}, [{"k": [1, 2.5, None, b"\x00" * 70000]}, "text", 7]),
    ("resp", {}, [[b"SET", b"key", b"v" * 40000], [b"GET", b"key"]]),
]


@pytest.mark.parametrize(("packet", "extra", "messages"), MODES, ids=[str(m[0]) for m in MODES])
async def test_every_packet_mode_round_trips_over_tls(
    ios: ioserver.IOServer, certs: Certs, packet: Any, extra: dict[str, Any], messages: list[Any]
) -> None:
    """Our client to our listener, both TLS: each message comes back byte-exact, large
    ones split across many records (and reads) on the way."""
    options: dict[str, Any] = {"packet": packet, **extra}
    listener = await ports.listen_tcp(ios, tls=certs.server(), **options)
    async with listener:
        client = await ports.connect_tcp(
            ios, "localhost", listener.local_address[1], tls=certs.client(), **options
        )
        server = await accept(listener)
        async with client, server:
            for message in messages:
                await client.send(message)
            if packet == "raw":
                expected = b"".join(messages)
                got = await receive_exactly(server, len(expected))
                assert got == expected
                await server.send(got)
                assert await receive_exactly(client, len(expected)) == expected
                return
            for message in messages:
                received = await server.receive()
                assert isinstance(received, Data), received
                assert received.data == message
                await server.send(received.data)
            for message in messages:
                received = await client.receive()
                assert isinstance(received, Data), received
                assert received.data == message


async def test_our_port_is_a_client_of_a_python_ssl_server(
    ios: ioserver.IOServer, certs: Certs
) -> None:
    """A blocking ``ssl`` echo server in a thread; our port sends 1 MiB and reads it back,
    then closes with close_notify, which the server reads as a clean end (unwrap)."""
    context = certs.server(alpn=["echo/1"])
    server = socket.create_server(("127.0.0.1", 0))
    ended: list[str] = []

    def serve() -> None:
        connection, _ = server.accept()
        with context.wrap_socket(connection, server_side=True) as tls:
            while data := tls.recv(65536):
                tls.sendall(data)
            ended.append(tls.version() or "")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        port = await ports.connect_tcp(
            ios, "localhost", server.getsockname()[1], tls=certs.client(alpn=["echo/1"])
        )
        assert port.extra(TLSAttribute.alpn_protocol) == "echo/1"
        assert port.extra(TLSAttribute.server_side) is False
        assert port.extra(TLSAttribute.peer_certificate)["subjectAltName"]
        payload = bytes(range(256)) * 4096
        await port.send(payload)
        assert await receive_exactly(port, len(payload)) == payload
        with pytest.raises(NotImplementedError, match="close_notify"):
            await port.send_eof()
        await port.aclose()
        await anyio.to_thread.run_sync(thread.join, 5)
        assert ended and ended[0].startswith("TLS"), "the server saw no clean close_notify"
    finally:
        server.close()


async def test_closing_a_tls_port_sends_close_notify(ios: ioserver.IOServer, certs: Certs) -> None:
    listener = await ports.listen_tcp(ios, tls=certs.server())
    async with listener:
        client = await tls_client(listener.local_address[1], certs.client())
        port = await accept(listener)
        await port.send(b"bye")
        await port.aclose()
        assert await client.receive() == b"bye"
        with pytest.raises(anyio.EndOfStream):  # not BrokenResourceError: a clean TLS end
            await client.receive()
        await client.aclose()


async def test_a_peer_close_notify_is_the_ports_eof(ios: ioserver.IOServer, certs: Certs) -> None:
    listener = await ports.listen_tcp(ios, tls=certs.server())
    async with listener:
        client = await tls_client(listener.local_address[1], certs.client())
        port = await accept(listener)
        await client.send(b"last words")
        async with anyio.create_task_group() as group:
            group.start_soon(client.aclose)  # close_notify, then it waits for ours
            assert await receive_exactly(port, 10) == b"last words"
            assert await port.receive() == Closed("eof")
            await port.aclose()


async def test_port_stream_over_tls_has_the_tls_attributes(
    ios: ioserver.IOServer, certs: Certs
) -> None:
    listener = await ports.listen_tcp(ios, tls=certs.server(alpn=["h2", "http/1.1"]))
    async with listener:
        client = await tls_client(listener.local_address[1], certs.client(alpn=["http/1.1"]))
        stream = ports.PortStream(await accept(listener))
        assert stream.extra(TLSAttribute.alpn_protocol) == "http/1.1"
        assert stream.extra(TLSAttribute.server_side) is True
        assert stream.extra(TLSAttribute.tls_version).startswith("TLS")
        _name, _version, bits = stream.extra(TLSAttribute.cipher)
        assert bits >= 128
        assert stream.extra(TLSAttribute.peer_certificate) is None  # no client certificate
        assert stream.extra(anyio.abc.SocketAttribute.remote_port) > 0
        with pytest.raises(anyio.TypedAttributeLookupError):
            stream.extra(TLSAttribute.ssl_object)
        await client.send(b"via stream")
        assert await stream.receive(10) == b"via stream"
        with pytest.raises(NotImplementedError):
            await stream.send_eof()
        await stream.aclose()
        await client.aclose()


async def test_sni_and_mutual_tls(ios: ioserver.IOServer, certs: Certs) -> None:
    names: list[str | None] = []
    context = certs.server(client_certs=True)
    context.sni_callback = lambda sslobj, name, ctx: names.append(name)  # type: ignore[assignment,func-returns-value]
    listener = await ports.listen_tcp(ios, tls=context)
    async with listener:
        client = await ports.connect_tcp(
            ios, "localhost", listener.local_address[1], tls=certs.client(cert=True)
        )
        server = await accept(listener)
        async with client, server:
            assert names == ["localhost"]
            peer = server.extra(TLSAttribute.peer_certificate)
            assert peer is not None
            assert ("email", "client@example.org") in peer["subjectAltName"]
            assert server.extra(TLSAttribute.peer_certificate_binary)
            assert ("DNS", "localhost") in client.extra(TLSAttribute.peer_certificate)[
                "subjectAltName"
            ]
            await client.send(b"mutual")
            assert await receive_exactly(server, 6) == b"mutual"


# -- the memory bound ---------------------------------------------------------------------
async def test_a_tls_flood_to_passive_owners_stays_under_the_memory_bound(
    no_leaks: None, certs: Certs
) -> None:
    limit = 1 << 20
    each = 3 << 20
    async with ioserver.open(memory_limit=limit) as ios:
        listener = await ports.listen_tcp(
            ios, tls=certs.server(), high_msgq_watermark=8 << 20, low_msgq_watermark=4 << 20
        )
        number = listener.local_address[1]
        clients = [await tls_client(number, certs.client()) for _ in range(3)]
        owners = [await accept(listener) for _ in clients]
        payload = bytes(range(256)) * (each // 256)
        async with listener, anyio.create_task_group() as group:
            for client in clients:
                group.start_soon(client.send, payload)
            await until(lambda: ios.statistics().global_pauses > 0, 10)  # the I/O thread's state
            assert ios.statistics().memory_in_use <= limit

            async def drain(owner: ports.Port) -> None:
                assert await receive_exactly(owner, each) == payload

            for owner in owners:
                group.start_soon(drain, owner)
        assert ios.statistics().peak_memory <= limit
        for owner in owners:
            await owner.aclose()
        for client in clients:
            await client.aclose()


@pytest.mark.every_core
async def test_a_mailbox_owning_tls_and_plain_ports_reads_its_tls_port_through_the_reserve(
    no_leaks: None, certs: Certs, core: str
) -> None:
    """A mailbox owns a TLS port (on the native core: its hosted Python half) and a plain
    TCP port (its native thread): a cell in each half.  Plain peers fill the budget; the
    TLS peer's data is paused by it while nobody waits.  A task waiting on the mailbox
    gets it through the reserve, from whichever half holds the port."""
    limit, each = 1 << 20, 512 << 10
    unbound = {"high_msgq_watermark": 64 << 20, "low_msgq_watermark": 32 << 20}
    async with ioserver.open(memory_limit=limit, core=core) as ios:
        plain = await ports.listen_tcp(ios, "127.0.0.1", 0, **unbound)
        secure = await ports.listen_tcp(ios, "127.0.0.1", 0, tls=certs.server(), **unbound)
        mailbox = ports.Mailbox()
        tls_peer = await tls_client(secure.local_address[1], certs.client())
        tls_port = await accept(secure)
        tls_port.set_owner(mailbox)
        idle = socket.create_connection(plain.local_address)
        (await accept(plain)).set_owner(mailbox)
        # One cell in each half the mailbox's ports are in.
        assert mailbox._cells is not None and len(mailbox._cells) == (2 if core == "native" else 1)
        hog_peers = [socket.create_connection(plain.local_address) for _ in range(8)]
        hogs = [await accept(plain) for _ in hog_peers]

        def flood(peer: socket.socket) -> None:
            with contextlib.suppress(OSError):  # (its port closes at the end)
                peer.sendall(b"h" * each)

        def reserve_reads() -> int:
            counters = getattr(ios._io, "budget_counters", None)
            return int(ios._io.budget.reserve_reads if counters is None else counters()[2])

        try:
            async with anyio.create_task_group() as group:
                for peer in hog_peers:
                    group.start_soon(anyio.to_thread.run_sync, flood, peer)
                with anyio.fail_after(10):
                    # the I/O thread's state
                    await until(lambda: ios.statistics().global_pauses > 0)
                    group.start_soon(tls_peer.send, b"t" * each)
                    # paused, nobody waiting
                    await until(lambda: tls_port.statistics().pauses > 0)
                before = reserve_reads()
                received = 0
                with anyio.fail_after(10):
                    while received < each:
                        source, message = await mailbox.receive()
                        assert source is tls_port and isinstance(message, Data)
                        received += len(message.data)
                assert received == each
                assert reserve_reads() > before
                assert ios.statistics().peak_memory <= limit
                for hog in hogs:
                    await hog.aclose()
        finally:
            mailbox.close()
            await tls_peer.aclose()
            idle.close()
            for peer in hog_peers:
                peer.close()
            await plain.aclose()
            await secure.aclose()


async def test_a_passive_tls_port_reads_one_message_at_a_time(
    ios: ioserver.IOServer, certs: Certs
) -> None:
    """Plaintext held inside OpenSSL past a read is delivered when the owner asks, though
    the socket has nothing more to signal (packets of 4 bytes, many per record)."""
    listener = await ports.listen_tcp(ios, tls=certs.server(), active=False, packet=4)
    async with listener:
        client = await tls_client(listener.local_address[1], certs.client())
        port = await accept(listener)
        frames = b"".join(struct.pack(">I", 5) + b"%05d" % i for i in range(2000))
        await client.send(frames)  # one write: every frame within a few records
        for i in range(2000):
            message = await port.receive()
            assert message == Data(b"%05d" % i)
        async with anyio.create_task_group() as group:
            group.start_soon(client.aclose)
            assert await port.receive() == Closed("eof")
            await port.aclose()


# -- cancellation -------------------------------------------------------------------------
async def test_cancelling_a_tls_connect_at_each_await_leaves_nothing(
    ios: ioserver.IOServer, certs: Certs
) -> None:
    """Cancelled before it starts, while the name resolves, and during the handshake (the
    server then completes it: the I/O thread closes what nobody waits for)."""
    go = threading.Event()
    server = socket.create_server(("127.0.0.1", 0))
    context = certs.server()
    seen: list[bytes] = []

    def serve() -> None:
        for _ in range(2):
            connection, _ = server.accept()
            go.wait(5)
            try:
                with context.wrap_socket(connection, server_side=True) as tls:
                    seen.append(tls.recv(10))  # b"": our side closed with close_notify
            except (ssl.SSLError, OSError):
                seen.append(b"error")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    number = server.getsockname()[1]
    try:
        with anyio.CancelScope() as scope:
            scope.cancel()
            await ports.connect_tcp(ios, "localhost", number, tls=certs.client())
        for host in ("localhost", "127.0.0.1"):  # a name resolved, then a number
            with anyio.move_on_after(0.2) as scope:
                await ports.connect_tcp(ios, host, number, tls=certs.client())
            assert scope.cancelled_caught
        go.set()
        await anyio.to_thread.run_sync(thread.join, 10)
        assert seen == [b"", b""], seen
        await wait_ports_open(ios, 0)
    finally:
        go.set()
        server.close()


# -- wrong use ----------------------------------------------------------------------------
async def test_wrong_tls_arguments_are_option_errors(ios: ioserver.IOServer, certs: Certs) -> None:
    with pytest.raises(ports.OptionError, match=r"ssl\.SSLContext"):
        await ports.listen_tcp(ios, tls=True)  # type: ignore[arg-type]
    with pytest.raises(ports.OptionError, match="client context"):
        await ports.listen_tcp(ios, tls=certs.client())
    with pytest.raises(ports.OptionError, match="server context"):
        await ports.connect_tcp(ios, "127.0.0.1", 1, tls=certs.server())
    with pytest.raises(ports.OptionError, match="server_hostname"):
        await ports.connect_tcp(ios, "127.0.0.1", 1, server_hostname="x")
    for wrong in (0, -1.0, float("nan"), "1", True):
        with pytest.raises(ports.OptionError, match="tls_handshake_timeout"):
            await ports.listen_tcp(ios, tls=certs.server(), tls_handshake_timeout=wrong)  # type: ignore[arg-type]
    assert ios.statistics().ports_open == 0


async def test_tls_through_a_daemon_is_refused_at_once(
    tmp_path: Path, no_leaks: None, certs: Certs
) -> None:
    """An SSLContext cannot cross to the daemon's process: NotSupportedError, before
    anything is opened, and the session goes on."""
    path = tmp_path / "control"
    process = Daemon("--endpoint", f"ipc://{path}", "--heartbeat", str(HEARTBEAT))
    try:
        async with client.connect(f"ipc://{path}") as ios:
            for call in (
                lambda: ports.listen_tcp(ios, tls=certs.server()),
                lambda: ports.connect_tcp(ios, "127.0.0.1", 1, tls=certs.client()),
            ):
                with anyio.fail_after(5), pytest.raises(ioserver.NotSupportedError) as caught:
                    await call()
                assert "daemon" in str(caught.value) and "SSLContext" in str(caught.value)
            async with await ports.listen_tcp(ios, "127.0.0.1", 0) as listener:
                assert listener.local_address[1] > 0
            assert (await ios.status())["client_ports"] == 0
    finally:
        assert process.stop() == 0, process.log


async def test_a_slow_tls_reader_makes_the_port_busy_and_loses_nothing(
    ios: ioserver.IOServer, certs: Certs
) -> None:
    """Output counts as written only once its ciphertext is in the kernel: a client that
    reads nothing makes our port busy (send_nowait raises WouldBlock), its queued output
    stays bounded by the watermark plus what the kernel and one encryption hold, and
    everything arrives once the client reads."""
    listener = await ports.listen_tcp(
        ios, tls=certs.server(), high_watermark=64 * 1024, low_watermark=32 * 1024, sndbuf=65536
    )
    async with listener:
        client = await tls_client(listener.local_address[1], certs.client())
        port = await accept(listener)
        chunk = bytes(range(256)) * 64  # 16 KiB
        sent = 0
        with anyio.fail_after(10):
            while True:
                try:
                    port.send_nowait(chunk)
                except ports.WouldBlock:
                    break
                sent += len(chunk)
                await anyio.lowlevel.checkpoint()
        assert port.busy
        assert port.statistics().bytes_buffered_out <= 64 * 1024 + len(chunk)
        assert ios.statistics().ports_open == 2

        async def read_all() -> bytes:
            got = b""
            while len(got) < sent:
                got += await client.receive()
            return got

        async with anyio.create_task_group() as group:
            result: list[bytes] = []

            async def reader() -> None:
                result.append(await read_all())

            group.start_soon(reader)
        assert result[0] == chunk * (sent // len(chunk))
        await port.aclose()
        await client.aclose()


async def test_close_after_a_large_send_delivers_everything_then_close_notify(
    ios: ioserver.IOServer, certs: Certs
) -> None:
    """Erlang's close after a flush, over TLS: the port is closed while megabytes of its
    output wait on a client that is not reading yet (more than the kernel buffers); the
    client still reads every byte,
    then a clean end (close_notify, not a truncation)."""
    listener = await ports.listen_tcp(
        ios, tls=certs.server(), high_watermark=32 << 20, sndbuf=32768
    )
    async with listener:
        client = await tls_client(listener.local_address[1], certs.client())
        port = await accept(listener)
        # More than the kernel's buffers hold on loopback (tcp_rmem's 6 MiB at most),
        # not a multiple of a record.
        payload = bytes(range(251)) * (12 * 4177)
        await port.send(payload)
        await port.aclose()
        got = b""
        with anyio.fail_after(10):
            try:
                while True:
                    got += await client.receive()
            except anyio.EndOfStream:
                pass
        assert len(got) == len(payload) and got == payload
        await client.aclose()


async def test_stopping_the_server_while_a_tls_close_waits_leaves_nothing(
    no_leaks: None, certs: Certs
) -> None:
    """A port closed with megabytes unsent to a client that never reads: the I/O server
    stops meanwhile, and no socket of it stays open (the leak check)."""
    async with ioserver.open() as ios:
        listener = await ports.listen_tcp(
            ios, tls=certs.server(), high_watermark=32 << 20, sndbuf=32768
        )
        client = await tls_client(listener.local_address[1], certs.client())
        port = await accept(listener)
        await port.send(b"z" * (12 << 20))
        await port.aclose()
        await listener.aclose()
    await anyio.aclose_forcefully(client)


async def test_a_tls_port_closed_on_a_peer_that_never_reads_is_reset_after_linger(
    ios: ioserver.IOServer, certs: Certs
) -> None:
    """The ``linger`` option over TLS: megabytes queued to a client that never reads,
    the port closed: after ``linger`` the connection is reset (no close_notify, the
    ciphertext not written dropped) and the output released."""
    listener = await ports.listen_tcp(
        ios, tls=certs.server(), high_watermark=32 << 20, sndbuf=32768, linger=0.2
    )
    async with listener:
        client = await tls_client(listener.local_address[1], certs.client())
        raw = client.extra(anyio.abc.SocketAttribute.raw_socket)
        try:
            port = await accept(listener)
            await port.send(b"z" * (12 << 20))  # more than loopback's buffers hold
            await port.aclose()
            poller = select.poll()
            poller.register(raw, select.POLLERR | select.POLLHUP)
            assert await anyio.to_thread.run_sync(poller.poll, 10_000)
            assert raw.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == errno.ECONNRESET
            probe = await ports.listen_tcp(ios, "127.0.0.1", 0)  # a round trip: the close ran
            statistics = ios.statistics()
            await probe.aclose()
            assert statistics.linger_timeouts == 1
            assert statistics.memory_in_use == 0
            assert statistics.ports_open == 2  # the listener and the probe
        finally:
            await anyio.aclose_forcefully(client)
