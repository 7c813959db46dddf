"""Loading an app: the function ``ioserver run APP`` and ``ioserver serve --app`` call.

Its own module, below both the command line (:mod:`~._cli`) and the daemon
(:mod:`~._daemon`), which both load apps: neither imports the other for it.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Callable
from typing import Any

from ._exceptions import OptionError

__all__ = ["load_app"]


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
    function = getattr(module, function_name, None)
    if function is None or not callable(function):
        raise OptionError(f"{target!r} has no function {function_name!r}")
    return function  # type: ignore[no-any-return]
