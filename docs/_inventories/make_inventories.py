"""Write the Sphinx inventories of trio, anyio and pyzmq that docs/conf.py uses offline.

The docs are built where only PyPI and Debian mirrors are reachable, so intersphinx cannot
download ``objects.inv`` from Read the Docs.  ``python.inv`` is Python's own inventory,
copied from Debian's ``python3.11-doc`` package (``/usr/share/doc/python3.11/html/objects.inv``).
For trio, anyio and pyzmq no packaged inventory exists, so this script writes a small one:
exactly the names the docs (and the docstrings they render) refer to, each checked to exist
in the installed library, each pointing where that project's own documentation puts it.

Run it after referring to a new name of one of these libraries::

    .venv/bin/python docs/_inventories/make_inventories.py

It rewrites ``trio.inv``, ``anyio.inv`` and ``pyzmq.inv`` next to itself (the format is
Sphinx's version 2 inventory: four header lines, then zlib-compressed
``name domain:role priority uri display`` lines).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import zlib
from pathlib import Path

HERE = Path(__file__).resolve().parent

# (name, role, page): the page of the project's documentation that documents ``name``.
TRIO = [
    ("trio", "module", "reference-core.html"),
    ("trio.run", "function", "reference-core.html"),
    ("trio.open_nursery", "function", "reference-core.html"),
    ("trio.Nursery", "class", "reference-core.html"),
    ("trio.open_memory_channel", "function", "reference-core.html"),
    ("trio.MemorySendChannel", "class", "reference-core.html"),
    ("trio.MemoryReceiveChannel", "class", "reference-core.html"),
    ("trio.WouldBlock", "exception", "reference-core.html"),
    ("trio.EndOfChannel", "exception", "reference-core.html"),
    ("trio.BusyResourceError", "exception", "reference-core.html"),
    ("trio.ClosedResourceError", "exception", "reference-core.html"),
    ("trio.BrokenResourceError", "exception", "reference-core.html"),
    ("trio.Cancelled", "exception", "reference-core.html"),
    ("trio.abc.SendChannel", "class", "reference-io.html"),
    ("trio.abc.ReceiveChannel", "class", "reference-io.html"),
    ("trio.abc.Channel", "class", "reference-io.html"),
    ("trio.serve_tcp", "function", "reference-io.html"),
    ("trio.lowlevel.wait_readable", "function", "reference-lowlevel.html"),
    ("trio.lowlevel.wait_task_rescheduled", "function", "reference-lowlevel.html"),
    ("trio.lowlevel.reschedule", "function", "reference-lowlevel.html"),
    ("trio.lowlevel.checkpoint_if_cancelled", "function", "reference-lowlevel.html"),
    ("trio.lowlevel.TrioToken.run_sync_soon", "method", "reference-lowlevel.html"),
]
ANYIO = [
    ("anyio", "module", "api.html"),
    ("anyio.run", "function", "api.html"),
    ("anyio.create_task_group", "function", "api.html"),
    ("anyio.abc.TaskGroup", "class", "api.html"),
    ("anyio.abc.TaskStatus", "class", "api.html"),
    ("anyio.fail_after", "function", "api.html"),
    ("anyio.current_time", "function", "api.html"),
    ("anyio.move_on_after", "function", "api.html"),
    ("anyio.wait_readable", "function", "api.html"),
    ("anyio.open_signal_receiver", "function", "api.html"),
    ("anyio.create_memory_object_stream", "class", "api.html"),
    ("anyio.lowlevel.checkpoint", "function", "api.html"),
    ("anyio.abc.ObjectStream", "class", "api.html"),
    ("anyio.abc.ObjectReceiveStream", "class", "api.html"),
    ("anyio.abc.ObjectSendStream", "class", "api.html"),
    ("anyio.abc.SocketAttribute", "class", "api.html"),
    ("anyio.EndOfStream", "exception", "api.html"),
    ("anyio.WouldBlock", "exception", "api.html"),
    ("anyio.BusyResourceError", "exception", "api.html"),
    ("anyio.ClosedResourceError", "exception", "api.html"),
    ("anyio.BrokenResourceError", "exception", "api.html"),
]
PYZMQ = [
    ("zmq", "module", "api/zmq.html"),
    ("zmq.Context", "class", "api/zmq.html"),
    ("zmq.Socket", "class", "api/zmq.html"),
    ("zmq.Frame", "class", "api/zmq.html"),
    ("zmq.Poller", "class", "api/zmq.html"),
    ("zmq.auth", "module", "api/zmq.auth.html"),
    ("zmq.auth.create_certificates", "function", "api/zmq.auth.html"),
    ("zmq.auth.load_certificate", "function", "api/zmq.auth.html"),
    ("zmq.asyncio.Context", "class", "api/zmq.asyncio.html"),
    ("zmq.asyncio.Socket", "class", "api/zmq.asyncio.html"),
]

INVENTORIES = [
    # (file, project, distribution, entries)
    ("trio.inv", "Trio", "trio", TRIO),
    ("anyio.inv", "AnyIO", "anyio", ANYIO),
    ("pyzmq.inv", "PyZMQ", "pyzmq", PYZMQ),
]


def resolve(name: str) -> object:
    """Import ``name`` (a module, or an attribute path under one); fail if it does not exist."""
    parts = name.split(".")
    for split in range(len(parts), 0, -1):
        try:
            obj: object = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        for attribute in parts[split:]:
            obj = getattr(obj, attribute)  # AttributeError: the name does not exist
        return obj
    raise ImportError(f"cannot import any prefix of {name!r}")


def inventory(project: str, version: str, entries: list[tuple[str, str, str]]) -> bytes:
    header = (
        "# Sphinx inventory version 2\n"
        f"# Project: {project}\n"
        f"# Version: {version}\n"
        "# The remainder of this file is compressed using zlib.\n"
    )
    lines = []
    for name, role, page in sorted(entries):
        resolve(name)
        # Sphinx's anchors: "#module-NAME" for a module, "#NAME" ("$") for anything else.
        anchor = f"#module-{name}" if role == "module" else "#$"
        lines.append(f"{name} py:{role} 1 {page}{anchor} -\n")
    return header.encode() + zlib.compress("".join(lines).encode(), 9)


def main() -> None:
    for filename, project, distribution, entries in INVENTORIES:
        version = importlib.metadata.version(distribution)
        (HERE / filename).write_bytes(inventory(project, version, entries))
        print(f"wrote {filename}: {len(entries)} names of {project} {version}")


if __name__ == "__main__":
    main()
