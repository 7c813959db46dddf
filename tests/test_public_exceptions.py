"""Every exception a public docstring names in its ``Raises:`` section can be caught by
name from a public module: a user who reads "Raises: PacketTooLarge" must not have to
import it from a private one."""

from __future__ import annotations

import builtins
import inspect
import re
from collections.abc import Iterator
from typing import Any

import pytest

import client
import ioserver
import ports
import ports.rpc

# No I/O core of $IOSERVER_CORE's choice (the exception classes alone): CI's second pass, on the
# Python core, leaves these tests out (tests/conftest.py checks the mark).
pytestmark = pytest.mark.core_independent

PUBLIC = (ioserver, ports, ports.rpc, client)

# "    Name: why" or "    Name, Other: why" under "Raises:", up to the next section.
_SECTION = re.compile(r"^([ ]*)Raises:\n((?:\1[ ]+.*\n?|[ ]*\n)*)", re.MULTILINE)
_ENTRY = re.compile(r"^[ ]{4,}([\w., ]+?):(?:\s|$)")


def _documented() -> Iterator[tuple[str, Any]]:
    """``(qualified name, object)`` for every public name and each of a class's members."""
    for module in PUBLIC:
        for name in module.__all__:
            value = getattr(module, name)
            yield f"{module.__name__}.{name}", value
            if inspect.isclass(value):
                for member in dir(value):  # inherited members too
                    if not member.startswith("_") or member in ("__init__", "__aenter__"):
                        attribute = inspect.getattr_static(value, member)
                        if isinstance(attribute, property):
                            attribute = attribute.fget
                        yield f"{module.__name__}.{name}.{member}", attribute


def _raised(doc: str) -> set[str]:
    names: set[str] = set()
    for section in _SECTION.finditer(doc):
        indent = len(section.group(1))
        for line in section.group(2).splitlines():
            # Only the entries, one indent in (not their wrapped explanations).
            if len(line) - len(line.lstrip()) != indent + 4:
                continue
            entry = _ENTRY.match(line)
            if entry:
                names.update(part.strip() for part in entry.group(1).split(","))
    return {name for name in names if name}


def _resolves(name: str) -> bool:
    head, _, last = name.rpartition(".")
    if head in ("anyio", "trio", "builtins", "zmq", "msgpack"):
        return True
    if head:
        holders = [module for module in PUBLIC if module.__name__ == head]
        return any(hasattr(holder, last) for holder in holders)
    return hasattr(builtins, name) or any(hasattr(module, name) for module in PUBLIC)


def test_raises_sections_are_read() -> None:
    # The parser finds what it must, so that the test below cannot pass by finding nothing.
    assert {"ConnectError", "OptionError", "ClosedPortError"} <= _raised(
        inspect.getdoc(ports.connect_tcp) + "\n"
    )


def test_every_exception_a_public_docstring_names_is_exported() -> None:
    missing = set()
    for where, value in _documented():
        doc = getattr(value, "__doc__", None)
        if not isinstance(doc, str):
            continue
        for name in _raised(inspect.cleandoc(doc) + "\n"):
            if not _resolves(name):
                missing.add((where, name))
    assert not missing, f"named in Raises: but not exported: {sorted(missing)}"
