"""The ``ioserver`` command (also ``python -m ioserver``).

``ioserver run APP [--backend asyncio|trio] [APP ARGS...]`` runs an app on an embedded I/O
thread.  APP is a Python file (``examples/chat.py``) or a module (``package.module``),
optionally followed by ``:function``; the function (``main`` by default) is called as
``await function(ios, argv)`` with the :class:`~ioserver.IOServer` and the app's own
arguments: every argument after APP (``--help`` included) except ``--backend``,
``--uvloop``/``--no-uvloop`` and the ``--log-*`` options, and everything after ``--``.
``ioserver serve`` runs the daemon (:mod:`ioserver._daemon`), ``ioserver status`` asks it.

Every error is one line and an exit status: 2 for a usage error (the subcommand's usage
and an ``error:`` line, as argparse prints them), 1 for a runtime error
(``ioserver: MESSAGE``), the app's own status when it exits (argparse's ``--help`` and
usage errors included), the same on both backends.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from ._apps import _AppExit, call_app, load_app
from ._exceptions import IOServerError, OptionError, UnsafeEndpointError
from ._server import run

__all__ = ["main"]

log = logging.getLogger("ioserver")


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors may carry a hint (``hint``)."""

    hint: str | None = None

    def error(self, message: str) -> NoReturn:
        if self.hint and "unrecognized arguments" in message:
            message = f"{message}\n{self.hint}"
        super().error(message)


#: The options of `ioserver run` itself, each with the number of values it takes: they
#: are taken wherever they appear before ``--``; every other argument after APP is the app's.
_RUN_OPTIONS = {
    "--backend": 1,
    "--uvloop": 0,
    "--no-uvloop": 0,
    "--poller": 1,
    "--core": 1,
    "--io-backend": 1,
    "--log-level": 1,
    "--log-format": 1,
    "--log-config": 1,
}


class _AppendOverride(argparse._AppendAction):
    """``append``, except that the first use on the command line replaces the default
    (which may come from ``--config`` or ``IOSERVER_APP``) instead of adding to it."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        marker = f"_given_{self.dest}"
        if not getattr(namespace, marker, False):
            setattr(namespace, self.dest, [])
            setattr(namespace, marker, True)
        super().__call__(parser, namespace, values, option_string)


def _add_logging(parser: argparse.ArgumentParser, level: str) -> None:
    from ._logging import FORMATS

    parser.add_argument(
        "--log-level", default=level, help=f"logging level: DEBUG, INFO, WARNING... ({level})"
    )
    parser.add_argument(
        "--log-format",
        choices=FORMATS,
        default="text",
        help="text (default) or json: one JSON object per line",
    )
    parser.add_argument(
        "--log-config",
        default=None,
        metavar="FILE",
        help="a logging.config.dictConfig dictionary in a JSON or TOML (.toml) file; "
        "it replaces --log-level and --log-format",
    )


def _add_poller(parser: argparse.ArgumentParser) -> None:
    from ._poller import POLLERS, default_poller

    parser.add_argument(
        "--poller",
        choices=tuple(POLLERS),
        default=None,
        help=f"the I/O thread's selector backend (default here: {default_poller()}); "
        "select serves descriptors below 1024 only",
    )


def _split_run(arguments: Sequence[str]) -> tuple[list[str], list[str]]:
    """``ioserver run``'s arguments, split into the command's (APP included) and the
    app's.  Before APP every option is the command's (``-h`` prints run's help); after it,
    only those of :data:`_RUN_OPTIONS` are, and everything after ``--`` goes to the app."""
    own: list[str] = []
    app_argv: list[str] = []
    seen_app = False
    index = 0
    while index < len(arguments):
        word = arguments[index]
        index += 1
        if word == "--":
            if not seen_app and index < len(arguments):
                own.append(arguments[index])  # `ioserver run -- APP ...`
                index += 1
                seen_app = True
            app_argv.extend(arguments[index:])
            break
        name = word.partition("=")[0]
        if name in _RUN_OPTIONS or (not seen_app and word.startswith("-")):
            own.append(word)
            takes = _RUN_OPTIONS.get(name, 0)
            if takes and "=" not in word and index < len(arguments):
                own.append(arguments[index])
                index += 1
        elif not seen_app:
            own.append(word)
            seen_app = True
        else:
            app_argv.append(word)
    return own, app_argv


def _parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The ``ioserver`` parser and its subcommands' parsers, by name."""
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="ioserver", description="I/O the Erlang way: run apps on an embedded I/O thread."
    )
    parser.add_argument("--version", action="version", version=f"ioserver {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    run_parser = commands.add_parser(
        "run",
        help="run an app on an embedded I/O thread",
        description="Run APP's main(ios, argv) on an embedded I/O thread.  The arguments "
        "after APP go to the app (its --help too), except --backend, --uvloop/--no-uvloop, "
        "--poller, --core, --io-backend and the --log-* options; everything after -- goes "
        "to the app.",
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
    _add_poller(run_parser)
    run_parser.add_argument(
        "--core",
        choices=("python", "native"),
        default=None,
        help="the I/O core: native (the I/O thread in Rust; every port kind) or python "
        "(the I/O thread in Python; every poller); default: $IOSERVER_CORE, else native "
        "(python with a --poller other than epoll)",
    )
    run_parser.add_argument(
        "--io-backend",
        choices=("epoll", "io_uring"),
        default=None,
        help="the native core's reads and writes: epoll (a syscall each) or io_uring (a "
        "round's in one io_uring_enter); default: $IOSERVER_IO_BACKEND, else io_uring where "
        "the kernel allows it, else epoll",
    )
    _add_logging(run_parser, "INFO")
    from ._control import ControlLimits

    serve_parser = commands.add_parser(
        "serve",
        help="run the ioserver daemon (control endpoint over ZeroMQ, optional apps)",
        description=(
            "Run an I/O thread as a daemon: clients open ports in it with client.connect(); "
            "apps given with --app run in its event loop.  Stops cleanly on SIGTERM/SIGINT."
        ),
    )
    assert isinstance(serve_parser, _Parser)
    serve_parser.hint = (
        "(an app's own options go inside --app, with the app: --app 'examples/echo.py --port 7000')"
    )
    serve_parser.add_argument(
        "--endpoint",
        default="",
        help="control endpoint: ipc://PATH (default: ipc://<runtime dir>/control, "
        "directory 0700) or tcp://ADDRESS:PORT (needs the CURVE options)",
    )
    serve_parser.add_argument(
        "--app",
        action=_AppendOverride,
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
    serve_parser.add_argument(
        "--max-restarts",
        type=int,
        default=5,
        metavar="N",
        help="with --workers: give up (exit 1) when workers die more than N times within "
        "--restart-period (default 5; Erlang's supervisor intensity)",
    )
    serve_parser.add_argument(
        "--restart-period",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="the window --max-restarts counts in (default 30)",
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
    for kind, what in (
        ("process", "run programs (ports.open_process): any program, as the daemon's user"),
        ("unix", "use Unix socket paths and ipc:// ZeroMQ endpoints on the daemon's machine"),
        ("tun", "open TUN/TAP devices in the daemon's network namespace"),
    ):
        serve_parser.add_argument(
            f"--allow-{kind}",
            action="store_true",
            help=f"let clients {what} (off by default: refused with the FAULT 'forbidden')",
        )
    serve_parser.add_argument(
        "--metrics",
        default="",
        metavar="HOST:PORT",
        help="serve the status figures for Prometheus at http://HOST:PORT/metrics "
        "(a loopback address unless --metrics-allow-remote)",
    )
    serve_parser.add_argument(
        "--metrics-allow-remote",
        action="store_true",
        help="allow --metrics on an address that is not loopback",
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
    _add_poller(serve_parser)
    _add_logging(serve_parser, "INFO")
    serve_parser.add_argument(
        "--config",
        default=None,
        metavar="FILE.toml",
        help="a TOML file of these options (max-sessions = 100); the precedence: command "
        "line, then IOSERVER_* environment variables (IOSERVER_MAX_SESSIONS=100), then "
        "the file, then the defaults",
    )

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
    status_parser.add_argument(
        "--log-level", default="WARNING", help="logging level (default WARNING)"
    )
    return parser, {"run": run_parser, "serve": serve_parser, "status": status_parser}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ioserver`` command; returns the exit status.

    A usage error prints the subcommand's usage and one ``error:`` line and raises
    :exc:`SystemExit` with status 2 (as :mod:`argparse` does); so do ``--help`` (status 0)
    and an app's own argument parsing under ``ioserver run``.
    """
    parser, commands = _parser()
    arguments = list(sys.argv[1:] if argv is None else argv)
    if not arguments or arguments[0] not in commands:
        parser.parse_args(arguments)  # --help, --version, or a usage error: exits
        return 2  # pragma: no cover - parse_args exits
    command = arguments[0]
    app_argv: list[str] = []
    if command == "run":
        own, app_argv = _split_run(arguments[1:])
        options = commands["run"].parse_args(own)
    elif command == "serve":
        options = _parse_serve(commands["serve"], arguments[1:])
    else:
        options = commands[command].parse_args(arguments[1:])
    options.command = command
    try:
        _configure_logging(options)
    except OptionError as exc:
        commands[command].error(str(exc))
    if command == "serve":
        return _serve(options)
    if command == "status":
        return _status(options)
    try:
        app = load_app(options.app)
    except OptionError as exc:
        commands["run"].error(str(exc))
    try:
        log.debug("running %s on %s", options.app, options.backend)
        result = run(
            call_app(app),
            app_argv,
            backend=options.backend,
            use_uvloop=options.uvloop,
            poller=options.poller,
            core=options.core,
            io_backend=options.io_backend,
        )
    except KeyboardInterrupt:
        log.info("interrupted; stopped")
        return 0
    except (IOServerError, BaseExceptionGroup) as exc:
        return _report(exc)
    # An app may return its exit status (file_service's client does).
    return result if isinstance(result, int) and not isinstance(result, bool) else 0


def _configure_logging(options: argparse.Namespace) -> None:
    from ._logging import configure

    configure(
        options.log_level,
        getattr(options, "log_format", "text"),
        getattr(options, "log_config", None),
    )


def _parse_serve(parser: argparse.ArgumentParser, arguments: Sequence[str]) -> argparse.Namespace:
    """``ioserver serve``'s options: the command line over ``IOSERVER_*`` variables over
    the ``--config`` file over the defaults (:mod:`ioserver._config`)."""
    from ._config import apply_defaults

    try:
        apply_defaults(parser, arguments)
    except OptionError as exc:
        parser.error(str(exc))
    options = parser.parse_args(arguments)
    options.arguments = list(arguments)
    return options


def _daemon_config(options: argparse.Namespace) -> Any:
    from ._control import ControlLimits
    from ._daemon_config import DaemonConfig

    return DaemonConfig(
        endpoint=options.endpoint,
        apps=options.app,
        heartbeat=options.heartbeat,
        grace=options.grace,
        backend=options.backend,
        use_uvloop=options.uvloop,
        curve_secret_key=options.curve_secret_key,
        curve_allowed_keys=options.curve_allowed_keys,
        allow_all_interfaces=options.allow_all_interfaces,
        allow=frozenset(
            kind for kind in ("process", "unix", "tun") if getattr(options, f"allow_{kind}")
        ),
        workers=options.workers,
        max_restarts=options.max_restarts,
        restart_period=options.restart_period,
        worker_index=options.worker_index,
        memory_limit=options.memory_limit,
        poller=options.poller,
        limits=ControlLimits(
            max_frame=options.max_frame,
            max_sessions=options.max_sessions,
            max_ports=options.max_ports,
            session_queue=options.session_queue,
        ),
        metrics=options.metrics,
        metrics_allow_remote=options.metrics_allow_remote,
        arguments=options.arguments,
        reload=lambda: _reload_serve(options.arguments),
    )


def _reload_serve(arguments: list[str]) -> Any:
    """SIGHUP: the daemon's configuration read again (the same command line over the
    environment over the ``--config`` file as it is now), and the logging configured
    from it again (which reopens its files).

    Raises:
        OptionError: the file or a variable is wrong now; nothing was changed.
    """
    from ._config import apply_defaults

    _, commands = _parser()
    parser = commands["serve"]
    apply_defaults(parser, arguments)
    options = parser.parse_args(arguments)
    options.arguments = list(arguments)
    _configure_logging(options)
    return _daemon_config(options)


def _serve(options: argparse.Namespace) -> int:
    from ._daemon import serve

    config = _daemon_config(options)
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

    from ._daemon_config import DaemonError
    from ._protocol import default_endpoint
    from ._status import format_status, query_status

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
    try:
        if options.json:
            print(json.dumps(status, indent=2, sort_keys=True), flush=True)
        else:
            print(format_status(status), flush=True)
    except BrokenPipeError:  # `ioserver status | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def _report(exc: BaseException) -> int:
    """Our own errors (a port in use, a wrong option...) as one clear line each, not a
    traceback - an app's task groups wrap them in exception groups; the exit status: 2
    for wrong options, 1 otherwise.  An app's own exit (argparse's ``--help`` or usage
    error, :func:`sys.exit`) gives the app's status, its message already printed.
    Anything else is re-raised."""
    errors = _leaves(exc)
    if not all(isinstance(error, IOServerError) for error in errors):
        raise exc
    exits = [error for error in errors if isinstance(error, _AppExit)]
    if exits:
        code = exits[0].code
        if code is None:
            return 0
        if isinstance(code, int):
            return code
        print(code, file=sys.stderr)  # sys.exit("message"), as Python prints it
        return 1
    for error in errors:
        print(f"ioserver: {error}", file=sys.stderr)
    return 2 if all(isinstance(error, OptionError) for error in errors) else 1


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
