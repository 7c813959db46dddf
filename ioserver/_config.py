"""``ioserver serve``'s settings from a TOML file (``--config``) and ``IOSERVER_*``
environment variables.

Every option of ``ioserver serve`` can be given three more ways than on the command line;
the first that gives it wins:

1. the command line: ``--max-sessions 100``;
2. the environment: ``IOSERVER_MAX_SESSIONS=100`` (the option's name in capitals, ``-``
   as ``_``; a flag takes ``1/true/yes/on`` or ``0/false/no/off``; ``IOSERVER_APP`` takes
   one app per line);
3. the ``--config`` file (or ``IOSERVER_CONFIG``), TOML read with :mod:`tomllib`:
   ``max-sessions = 100`` (or ``max_sessions``); ``app`` is a string or a list of strings;
4. the built-in default.

Values are checked as the command line checks them, and a wrong one is an
:exc:`~ioserver.OptionError` that names where it came from: the file and its key, or the
variable.  So the CLI exits 2 with one line.
"""

from __future__ import annotations

import argparse
import os
import tomllib
from collections.abc import Mapping, Sequence
from typing import Any

from ._exceptions import OptionError

__all__ = ["ENV_PREFIX", "apply_defaults", "config_path", "settable"]

ENV_PREFIX = "IOSERVER_"
#: Options that no file or variable sets: ``--config`` names the file itself (its variable,
#: ``IOSERVER_CONFIG``, is read by :func:`config_path`), the worker index is the
#: supervisor's business (and ``IOSERVER_WORKER`` means something else: see _supervise).
_NOT_SETTABLE = {"help", "config", "worker_index"}

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def settable(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """The parser's options that a file or a variable may set, by ``dest``."""
    return {
        action.dest: action
        for action in parser._actions
        if action.option_strings and action.dest not in _NOT_SETTABLE
    }


def config_path(argv: Sequence[str], environ: Mapping[str, str]) -> str | None:
    """The ``--config`` file named on the command line, else by ``IOSERVER_CONFIG``."""
    finder = argparse.ArgumentParser(add_help=False)
    finder.add_argument("--config")
    known, _ = finder.parse_known_args(list(argv))
    path = known.config or environ.get(ENV_PREFIX + "CONFIG") or None
    return str(path) if path else None


def _is_flag(action: argparse.Action) -> bool:
    return isinstance(
        action,
        (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse.BooleanOptionalAction),
    )


def _convert(action: argparse.Action, value: Any, where: str) -> Any:
    """``value`` (a TOML value, or a variable's string) as the option's type."""
    if _is_flag(action):
        if isinstance(value, str):
            word = value.strip().lower()
            if word in _TRUE:
                return True
            if word in _FALSE:
                return False
        elif isinstance(value, bool):
            return value
        raise OptionError(f"{where}: expected true or false, not {value!r}")
    if isinstance(action, argparse._AppendAction):
        if isinstance(value, str):
            items: list[Any] = [line for line in value.splitlines() if line.strip()]
        elif isinstance(value, list) and all(isinstance(item, str) for item in value):
            items = list(value)
        else:
            raise OptionError(f"{where}: expected a string or a list of strings, not {value!r}")
        return items
    kind = action.type
    if kind in (int, float):
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise OptionError(f"{where}: expected a number, not {value!r}")
        if kind is int and isinstance(value, float):
            raise OptionError(f"{where}: expected an integer, not {value!r}")
        try:
            converted: Any = kind(value)
        except ValueError:
            raise OptionError(f"{where}: expected a number, not {value!r}") from None
    elif kind is None:
        if not isinstance(value, str):
            raise OptionError(f"{where}: expected a string, not {value!r}")
        converted = value
    else:
        try:
            converted = kind(value) if isinstance(value, str) else value  # type: ignore[operator]
        except (ValueError, TypeError, argparse.ArgumentTypeError) as exc:
            raise OptionError(f"{where}: {exc}") from None
    if action.choices is not None and converted not in action.choices:
        choices = ", ".join(map(str, action.choices))
        raise OptionError(f"{where}: {converted!r} is not one of {choices}")
    return converted


def read_file(path: str, actions: Mapping[str, argparse.Action]) -> dict[str, Any]:
    """The settings in the TOML file at ``path``, by ``dest``.

    Raises:
        OptionError: the file cannot be read or parsed, a key is not an option of
            ``ioserver serve``, or a value has the wrong type (the key is named).
    """
    try:
        with open(path, "rb") as file:
            document = tomllib.load(file)
    except OSError as exc:
        raise OptionError(f"--config {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise OptionError(f"--config {path}: not valid TOML: {exc}") from None
    settings: dict[str, Any] = {}
    for key, value in document.items():
        dest = key.replace("-", "_")
        action = actions.get(dest)
        if action is None:
            known = ", ".join(sorted(name.replace("_", "-") for name in actions))
            raise OptionError(f"--config {path}: unknown key {key!r} (the keys: {known})")
        settings[dest] = _convert(action, value, f"--config {path}: key {key!r}")
    return settings


def read_environment(
    environ: Mapping[str, str], actions: Mapping[str, argparse.Action]
) -> dict[str, Any]:
    """The settings in ``IOSERVER_*`` variables, by ``dest``.

    Raises:
        OptionError: a variable's value has the wrong type (the variable is named).
    """
    settings: dict[str, Any] = {}
    for dest, action in actions.items():
        name = ENV_PREFIX + dest.upper()
        if name in environ:
            settings[dest] = _convert(action, environ[name], f"environment variable {name}")
    return settings


def apply_defaults(
    parser: argparse.ArgumentParser, argv: Sequence[str], environ: Mapping[str, str] | None = None
) -> str | None:
    """Make the ``--config`` file's and the environment's settings the defaults of
    ``parser`` (the environment's over the file's), so that what the command line gives
    still wins when ``parser`` parses it.  Returns the config file's path, if any.

    Raises:
        OptionError: as :func:`read_file` and :func:`read_environment`.
    """
    environ = os.environ if environ is None else environ
    actions = settable(parser)
    path = config_path(argv, environ)
    settings = read_file(path, actions) if path else {}
    settings.update(read_environment(environ, actions))
    parser.set_defaults(**settings)
    return path
