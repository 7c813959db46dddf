"""Loading an app: the function ``ioserver run APP`` and ``ioserver serve --app`` call.

Its own module, below both the command line (:mod:`~._cli`) and the daemon
(:mod:`~._daemon`), which both load apps: neither imports the other for it.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from ._exceptions import IOServerError, OptionError

__all__ = ["call_app", "load_app"]


def load_app(spec: str) -> Callable[..., Any]:
    """The app function named by ``spec``: ``path/to/file.py[:function]`` or
    ``package.module[:function]``; the function defaults to ``main``.

    Raises:
        OptionError: the file or module cannot be found, or has no such async function.
    """
    target, _, function_name = spec.partition(":")
    function_name = function_name or "main"
    if target.endswith(".py") or os.sep in target:
        if not os.path.isfile(target):
            raise OptionError(f"no app file {target!r}")
        name = "ioserver_app_" + os.path.splitext(os.path.basename(target))[0]
        module_spec = importlib.util.spec_from_file_location(name, target)
        if module_spec is None or module_spec.loader is None:
            raise OptionError(f"cannot load {target!r} as a Python file")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        module_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise OptionError(f"cannot import app module {target!r}: {exc}") from exc
    function: object = getattr(module, function_name, None)
    if function is None or not callable(function):
        raise OptionError(f"{target!r} has no function {function_name!r}")
    return function


class _AppExit(IOServerError):
    """An app called :func:`sys.exit` (argparse does, for ``--help`` and for a usage
    error): its status, carried out of the event loop as an ordinary exception.

    A :exc:`SystemExit` raised in a task is a :exc:`BaseException`: asyncio stops the loop
    and logs the pending tasks, trio wraps it in a group, and the two backends exit with
    different statuses.  Turned into this at the app's boundary, it unwinds the task
    groups as any error does, and :func:`main` exits with the app's status."""

    def __init__(self, code: object) -> None:
        super().__init__(code)
        self.code = code


def call_app(function: Callable[..., Any]) -> Callable[..., Any]:
    """``function`` (an app), with :exc:`SystemExit` turned into :class:`_AppExit`."""

    async def app(ios: Any, argv: Sequence[str]) -> Any:
        try:
            return await function(ios, argv)
        except SystemExit as exc:
            raise _AppExit(exc.code) from None

    return app
