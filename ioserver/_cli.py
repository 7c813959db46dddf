"""The ``ioserver`` command (also ``python -m ioserver``).

``ioserver run APP [--backend asyncio|trio] [APP ARGS...]`` runs an app on an embedded I/O
thread.  APP is a Python file (``examples/chat.py``) or a module (``package.module``),
optionally followed by ``:function``; the function (``main`` by default) is called as
``await function(ios, argv)`` with the :class:`~ioserver.IOServer` and the app's own
arguments.  ``--backend`` and ``--uvloop``/``--no-uvloop`` are taken by ``ioserver`` wherever
they appear; every other argument goes to the app.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from ._apps import load_app
from ._exceptions import IOServerError, OptionError, UnsafeEndpointError
from ._server import run

__all__ = ["main"]

log = logging.getLogger("ioserver")


def _parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="ioserver", description="I/O the Erlang way: run apps on an embedded I/O thread."
    )
    parser.add_argument("--version", action="version", version=f"ioserver {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser(
        "run",
        help="run an app on an embedded I/O thread",
        description="Run APP's main(ios, argv) on an embedded I/O thread.",
    )
    run_parser.add_argument("app", help="file.py[:function] or package.module[:function]")
    run_parser.add_argument(
        "--backend", choices=("asyncio", "trio"), default="asyncio", help="event loop library"
    )
    run_parser.add_argument(
        "--uvloop",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="on asyncio, use uvloop (default: when installed)",
    )
    run_parser.add_argument(
        "--log-level", default="INFO", help="logging level (DEBUG, INFO, WARNING...)"
    )

    from ._control import ControlLimits

    serve_parser = commands.add_parser(
        "serve",
        help="run the ioserver daemon (control endpoint over ZeroMQ, optional apps)",
        description=(
            "Run an I/O thread as a daemon: clients open ports in it with client.connect(); "
            "apps given with --app run in its event loop.  Stops cleanly on SIGTERM/SIGINT."
        ),
    )
    serve_parser.add_argument(
        "--endpoint",
        default="",
        help="control endpoint: ipc://PATH (default: ipc://<runtime dir>/control, "
        "directory 0700) or tcp://ADDRESS:PORT (needs the CURVE options)",
    )
    serve_parser.add_argument(
        "--app",
        action="append",
        default=[],
        help="an app to run, as for `ioserver run`, with its arguments in one string: "
        "--app 'examples/chat.py --port 7000' (repeatable)",
    )
    serve_parser.add_argument(
        "--heartbeat",
        type=float,
        default=1.0,
        help="seconds between heartbeats; a client silent for 3 is lost and its ports "
        "closed (default 1)",
    )
    serve_parser.add_argument(
        "--grace",
        type=float,
        default=5.0,
        help="seconds to let queued output drain when stopping (default 5)",
    )
    serve_parser.add_argument(
        "--workers", type=int, default=1, help="share-nothing worker processes"
    )
    serve_parser.add_argument("--worker-index", type=int, default=None, help=argparse.SUPPRESS)
    serve_parser.add_argument(
        "--curve-secret-key", default=None, help="the daemon's secret certificate file (tcp://)"
    )
    serve_parser.add_argument(
        "--curve-allowed-keys",
        default=None,
        help="directory of the public certificate files of the clients allowed in (tcp://)",
    )
    serve_parser.add_argument(
        "--allow-all-interfaces",
        action="store_true",
        help="allow a tcp:// endpoint on all interfaces (*, 0.0.0.0, ::)",
    )
    serve_parser.add_argument(
        "--memory-limit", type=int, default=None, help="the global memory budget in bytes"
    )
    serve_parser.add_argument(
        "--max-frame",
        type=int,
        default=ControlLimits.max_frame,
        help="the largest frame a client may send, in bytes; ZeroMQ disconnects a client "
        "that sends more (default 1 MiB)",
    )
    serve_parser.add_argument(
        "--max-sessions",
        type=int,
        default=ControlLimits.max_sessions,
        help="clients served at once; a HELLO past it is refused (default 1024)",
    )
    serve_parser.add_argument(
        "--max-ports",
        type=int,
        default=ControlLimits.max_ports,
        help="ports per client, accepted ones included; a CONNECT or LISTEN past it is "
        "refused (default 4096)",
    )
    serve_parser.add_argument(
        "--session-queue",
        type=int,
        default=ControlLimits.session_queue,
        help="bytes of data queued for one client before its ports stop reading (default 4 MiB)",
    )
    serve_parser.add_argument(
        "--backend", choices=("asyncio", "trio"), default="asyncio", help="event loop library"
    )
    serve_parser.add_argument(
        "--uvloop", action=argparse.BooleanOptionalAction, default=None, help="use uvloop"
    )
    serve_parser.add_argument("--log-level", default="INFO", help="logging level")

    status_parser = commands.add_parser(
        "status", help="show a daemon's ports, queues, wakes and bytes, per worker"
    )
    status_parser.add_argument("endpoint", nargs="?", default="", help="the control endpoint")
    status_parser.add_argument("--json", action="store_true", help="print JSON")
    status_parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait")
    status_parser.add_argument(
        "--curve-server-key", default=None, help="the daemon's public certificate file"
    )
    status_parser.add_argument(
        "--curve-certificate", default=None, help="this client's secret certificate file"
    )
    status_parser.add_argument("--log-level", default="WARNING", help="logging level")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ioserver`` command; returns the exit status."""
    parser = _parser()
    arguments = list(sys.argv[1:] if argv is None else argv)
    options, app_argv = parser.parse_known_args(arguments)
    logging.basicConfig(
        level=getattr(logging, str(options.log_level).upper(), logging.INFO),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    if options.command == "serve":
        if app_argv:
            parser.error(f"unrecognized arguments: {' '.join(app_argv)}")
        return _serve(options)
    if options.command == "status":
        if app_argv:
            parser.error(f"unrecognized arguments: {' '.join(app_argv)}")
        return _status(options)
    try:
        app = load_app(options.app)
    except OptionError as exc:
        parser.error(str(exc))
    try:
        log.info("running %s on %s", options.app, options.backend)
        run(app, app_argv, backend=options.backend, use_uvloop=options.uvloop)
    except KeyboardInterrupt:
        log.info("interrupted; stopped")
        return 0
    except (IOServerError, BaseExceptionGroup) as exc:
        return _report(exc)
    return 0


def _serve(options: argparse.Namespace) -> int:
    from ._control import ControlLimits
    from ._daemon import DaemonConfig, serve

    config = DaemonConfig(
        endpoint=options.endpoint,
        apps=options.app,
        heartbeat=options.heartbeat,
        grace=options.grace,
        backend=options.backend,
        use_uvloop=options.uvloop,
        curve_secret_key=options.curve_secret_key,
        curve_allowed_keys=options.curve_allowed_keys,
        allow_all_interfaces=options.allow_all_interfaces,
        workers=options.workers,
        worker_index=options.worker_index,
        memory_limit=options.memory_limit,
        limits=ControlLimits(
            max_frame=options.max_frame,
            max_sessions=options.max_sessions,
            max_ports=options.max_ports,
            session_queue=options.session_queue,
        ),
    )
    if config.workers < 1:
        print("ioserver: --workers must be at least 1", file=sys.stderr)
        return 2
    try:
        return serve(config)
    except KeyboardInterrupt:
        return 0
    except (IOServerError, BaseExceptionGroup) as exc:
        return _report(exc)


def _status(options: argparse.Namespace) -> int:
    import json

    from ._daemon import DaemonError, format_status, query_status
    from ._protocol import default_endpoint

    endpoint = options.endpoint or default_endpoint()
    curve = None
    if options.curve_server_key or options.curve_certificate:
        if not (options.curve_server_key and options.curve_certificate):
            print(
                "ioserver: CURVE needs --curve-server-key and --curve-certificate", file=sys.stderr
            )
            return 2
        curve = (options.curve_server_key, options.curve_certificate)
    try:
        status = query_status(endpoint, timeout=options.timeout, curve=curve)
    except (DaemonError, UnsafeEndpointError) as exc:
        print(f"ioserver: {exc}", file=sys.stderr)
        return 1
    if "workers" not in status:
        status = {"workers": [status]}
    if options.json:
        print(json.dumps(status, indent=2, sort_keys=True))
    else:
        print(format_status(status))
    return 0


def _report(exc: BaseException) -> int:
    """Our own errors (a port in use, a wrong option...) as one clear line each, not a
    traceback - an app's task groups wrap them in exception groups; the exit status: 2
    for wrong options, 1 otherwise.  Anything else is re-raised."""
    errors = _leaves(exc)
    if not all(isinstance(error, IOServerError) for error in errors):
        raise exc
    for error in errors:
        print(f"ioserver: {error}", file=sys.stderr)
    return 2 if all(isinstance(error, OptionError) for error in errors) else 1


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
