"""TLS echo with TLS in the loop half: a plaintext ioserver port, anyio's ``TLSStream``
over ``ports.PortStream`` (``ssl.SSLObject`` run by the event loop's thread).

The alternative to ``ports.listen_tcp(tls=...)`` (TLS in the I/O thread), kept to measure
where TLS is better placed (bench/tls.py, docs/howto/tls.rst).

usage: python bench/servers/tls_echo_loop.py --port PORT --tls-cert PEM --tls-key PEM
                                             [--backend asyncio|trio]
"""

from __future__ import annotations

import argparse
import ssl
import sys
from pathlib import Path

import anyio
from anyio.streams.tls import TLSStream

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import ioserver
import ports


async def echo(port: ports.Port, context: ssl.SSLContext) -> None:
    try:
        stream = await TLSStream.wrap(
            ports.PortStream(port), server_side=True, ssl_context=context, standard_compatible=False
        )
        async with stream:
            while True:
                await stream.send(await stream.receive(65536))
    except (anyio.EndOfStream, anyio.BrokenResourceError, ssl.SSLError, ports.IOServerError):
        await port.aclose()


async def main(port: int, context: ssl.SSLContext) -> None:
    async with (
        ioserver.open() as ios,
        await ports.listen_tcp(ios, "127.0.0.1", port) as listener,
        anyio.create_task_group() as group,
    ):
        async for accepted in listener:
            if isinstance(accepted, ports.Accepted):
                group.start_soon(echo, accepted.port, context)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--tls-cert", required=True)
    parser.add_argument("--tls-key", required=True)
    parser.add_argument("--backend", default="asyncio", choices=("asyncio", "trio"))
    args = parser.parse_args()
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(args.tls_cert, args.tls_key)
    backend_options = {"use_uvloop": True} if args.backend == "asyncio" else {}
    try:
        import uvloop  # noqa: F401
    except ImportError:
        backend_options = {}
    anyio.run(main, args.port, tls, backend=args.backend, backend_options=backend_options)
