"""Typed RPC over ports: requests and replies as algebraic data types, over msgpack.

A service declares its messages as message classes - subclasses of :class:`Message`, a
frozen :class:`msgspec.Struct` sent as a tagged array - a request type and a reply type,
each usually a union of variants (a sum type), and shares one :class:`Interface`::

    from ports import rpc

    class Add(rpc.Message):
        a: int
        b: int

    class Neg(rpc.Message):
        a: int

    class Result(rpc.Message):
        value: int

    CALC: rpc.Interface[Add | Neg, Result] = rpc.Interface(Add | Neg, Result)

    async def handle(request: Add | Neg) -> Result:
        match request:
            case Add(a, b):
                return Result(a + b)
            case Neg(a):
                return Result(-a)

The server answers each connection with :func:`serve` (or every connection of a
listener with :func:`serve_listener`); the client multiplexes calls over one port::

    listener = await ports.listen_tcp(ios, "127.0.0.1", 7001, packet=4)
    task_group.start_soon(rpc.serve_listener, listener, CALC, handle)

    async with await rpc.connect(ios, "127.0.0.1", 7001, CALC) as client:
        assert await client.call(Add(1, 2), timeout=5) == Result(3)

Encoding, decoding and validation are msgspec's (in C).  Every message is validated against
its type when it is decoded: a frame that is not
msgpack, has an unknown tag, a field of the wrong type, a missing or extra field, or nests
deeper than ``max_depth`` is an :exc:`RPCDecodeError` for the one it concerns - the
server answers it with an error and goes on serving.  Before a frame is decoded its
structure is checked against :class:`DecodeLimits` derived from the port's
``packet_size`` (at most one value per 8 bytes of it), so a small frame that would
expand into a large value is refused before anything is built.  The wire format (tagged msgpack
arrays inside ``[kind, id, ...]`` envelopes) is described in :mod:`ports._rpc_codec`,
:mod:`ports._rpc` and ``docs/reference/rpc-wire-format.rst``.
"""

from ._rpc import Client as Client
from ._rpc import ClientStatistics as ClientStatistics
from ._rpc import Interface as Interface
from ._rpc import RPCRemoteError as RPCRemoteError
from ._rpc import ServerStatistics as ServerStatistics
from ._rpc import connect as connect
from ._rpc import serve as serve
from ._rpc import serve_listener as serve_listener
from ._rpc_codec import DEFAULT_MAX_DEPTH as DEFAULT_MAX_DEPTH
from ._rpc_codec import ITEM_BYTES as ITEM_BYTES
from ._rpc_codec import WIRE_FORMAT_VERSION as WIRE_FORMAT_VERSION
from ._rpc_codec import Codec as Codec
from ._rpc_codec import DecodeLimits as DecodeLimits
from ._rpc_codec import Message as Message
from ._rpc_codec import RPCDecodeError as RPCDecodeError
from ._rpc_codec import RPCError as RPCError
from ._rpc_codec import tag as tag
from ._rpc_codec import tag_of as tag_of

__all__ = [
    "DEFAULT_MAX_DEPTH",
    "ITEM_BYTES",
    "WIRE_FORMAT_VERSION",
    "Client",
    "ClientStatistics",
    "Codec",
    "DecodeLimits",
    "Interface",
    "Message",
    "RPCDecodeError",
    "RPCError",
    "RPCRemoteError",
    "ServerStatistics",
    "connect",
    "serve",
    "serve_listener",
    "tag",
    "tag_of",
]
