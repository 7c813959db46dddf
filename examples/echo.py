"""TCP echo: one actor per connection, the way an ioserver service is written.

Run it:  python examples/echo.py --port 7001      (or: ioserver run examples/echo.py --port 7001)
Try it:  nc 127.0.0.1 7001
TLS:     python examples/echo.py --tls --tls-cert cert.pem --tls-key key.pem
         openssl s_client -connect 127.0.0.1:7001 -CAfile ca.pem
"""

from __future__ import annotations

import argparse
import ssl
import sys
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
    parser = argparse.ArgumentParser(
        prog="echo",
        description=__doc__.splitlines()[0],
        # One line, as argparse's own fits: the three TLS options go together.
        usage="%(prog)s [-h] [--host HOST] [--port PORT] [--tls --tls-cert PEM --tls-key PEM]",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=7001, help="TCP port (default 7001)")
    parser.add_argument("--tls", action="store_true", help="serve TLS (needs --tls-cert/--tls-key)")
    parser.add_argument("--tls-cert", metavar="PEM", help="the certificate (chain), PEM")
    parser.add_argument("--tls-key", metavar="PEM", help="the private key of --tls-cert, PEM")
    options = parser.parse_args(argv)
    tls = None
    if options.tls:
        if options.tls_cert is None or options.tls_key is None:
            parser.error("--tls needs --tls-cert and --tls-key")
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            tls.load_cert_chain(options.tls_cert, options.tls_key)
        except (OSError, ssl.SSLError) as exc:
            parser.error(f"--tls-cert/--tls-key: {exc.strerror or exc}")
    elif options.tls_cert is not None or options.tls_key is not None:
        parser.error("--tls-cert and --tls-key need --tls")
    async with (
        await ports.listen_tcp(ios, options.host, options.port, tls=tls) as listener,
        anyio.create_task_group() as task_group,
    ):
        print(
            f"echo listening on {listener.local_address[0]}:{listener.local_address[1]}"
            + (" (TLS)" if tls else ""),
            flush=True,
        )
        async for accepted in listener:
            if isinstance(accepted, ports.Accepted):
                task_group.start_soon(echo, accepted.port)
            elif isinstance(accepted, ports.Error):  # e.g. a TLS handshake that failed
                print(f"echo: {accepted.message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(ioserver.main(["run", __file__, *sys.argv[1:]]))
