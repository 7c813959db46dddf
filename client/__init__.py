"""The ioserver daemon's client: the same port API, over ZeroMQ, in another process.

::

    import client, ports

    async with client.connect("ipc:///run/user/1000/ioserver/control") as ios:
        port = await ports.connect_tcp(ios, "example.com", 80)
        await port.send(b"GET / HTTP/1.0\\r\\n\\r\\n")
        async for message in port:
            ...

``ios`` is accepted by every port function exactly like an in-process
:class:`ioserver.IOServer`, so an actor runs unchanged against either.  The sockets live
in the daemon (``ioserver serve``); commands and events cross as msgpack messages
(schema: :mod:`ioserver._protocol`, and the docs' protocol page).
"""

from __future__ import annotations

from ._connect import RemoteIOServer as RemoteIOServer
from ._connect import connect as connect
from ._exceptions import DaemonUnavailable as DaemonUnavailable
from ._exceptions import ProtocolError as ProtocolError
from ._exceptions import UnsafeEndpointError as UnsafeEndpointError

__all__ = ["DaemonUnavailable", "ProtocolError", "RemoteIOServer", "UnsafeEndpointError", "connect"]
