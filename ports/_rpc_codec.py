"""Typed messages over msgpack, by msgspec: encode algebraic data types, validate on decode.

This is the sans-I/O half of :mod:`ports.rpc`: it knows nothing of ports or tasks.  The
encoding, decoding and validation are msgspec's (in C: :class:`msgspec.msgpack.Decoder`
built once per type builds the typed value straight from the bytes); what is kept here
is the product's own part - the wire format's rules, the bound on what a hostile frame
may make the decoder build (:func:`check_frame`, which msgspec does not have), and
errors that say where, in the message's own field names.

**Types.**  A message type is a type expression built from:

* ``None``, ``bool``, ``int``, ``float`` (an ``int`` on the wire is accepted and
  converted), ``str``, ``bytes``, ``typing.Any`` (not validated);
* ``list[T]``, ``tuple[T, ...]``, ``tuple[A, B, C]``, ``set[T]``, ``frozenset[T]``,
  ``dict[K, V]``;
* ``Literal[...]`` of ``None``/``bool``/``int``/``str`` values, and :class:`enum.Enum`
  subclasses (sent as their value);
* ``Annotated[T, msgspec.Meta(...)]``: msgspec's constraints (``ge``, ``max_length``,
  ``pattern``...), checked on decode;
* message classes - subclasses of :class:`Message` (a :class:`msgspec.Struct`, frozen,
  tagged, sent as an array) - whose fields are themselves of these types, including the
  class itself or a union containing it, so trees, ASTs and lists of nodes by id are all
  expressible;
* unions of all of the above (``A | B | None``), within msgspec's rules for unions: a
  union of message classes is a *sum type* (a closed set of variants, as an algebraic
  data type), the variant chosen by its tag; it may not also hold another type sent as
  an array (a list or tuple).

**Wire format** (also in ``docs/reference/rpc-wire-format.rst``).  Plain msgpack, no ext
types, so any msgpack library can speak it; unchanged from the hand-written codec this
replaced (wire format version 1):

* a message is an array ``[tag, field1, field2, ...]``: the tag is a str (the class's
  ``__name__``, or the name given with ``class X(Message, tag="Name")`` or :func:`tag`),
  then every field in declaration order.  A missing field is an error unless it has a
  default; an extra field is an error.  (The tag is there even where the type is a single
  class, so a value always says what it is.)
* ``None``, ``bool``, ``int``, ``float``, ``str`` and ``bytes`` are msgpack's nil, bool,
  int, float, str (UTF-8) and bin; lists, tuples and sets are arrays; dicts are maps; an
  enum is its value.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from collections.abc import Callable
from typing import Any, Generic, NoReturn, TypeVar, final

import msgspec
import msgspec.inspect as inspect

from ioserver._exceptions import IOServerError

__all__ = [
    "DEFAULT_MAX_DEPTH",
    "ITEM_BYTES",
    "WIRE_FORMAT_VERSION",
    "Codec",
    "DecodeLimits",
    "Message",
    "RPCDecodeError",
    "RPCError",
    "tag",
    "tag_of",
]

T = TypeVar("T")
#: One msgpack frame.
Frame = bytes | bytearray | memoryview
#: A frame, or a payload cut from one (what the decoders read).
Buffer = Frame | msgspec.Raw
C = TypeVar("C", bound=type)

#: The wire format's version (docs/reference/rpc-wire-format.rst): 1 since typed RPC was
#: written; moving onto msgspec did not change a byte of it.
WIRE_FORMAT_VERSION = 1

#: The deepest nesting of arrays and maps a decoded value may have, by default.
DEFAULT_MAX_DEPTH = 256

#: Bytes of ``packet_size`` per value a frame may decode to (see :class:`DecodeLimits`).
ITEM_BYTES = 8


class RPCError(IOServerError):
    """Root of the errors of typed RPC (:mod:`ports.rpc`)."""


class RPCDecodeError(RPCError, ValueError):
    """A message did not match its declared type, or was not valid msgpack.

    Raised by :meth:`Codec.decode`; raised from :meth:`ports.rpc.Client.call` when the
    reply did not decode, or when the *server* could not decode the request (then
    ``remote`` is true).  ``path`` says where in the value the mismatch was, as an
    expression on the message (``"Tree.children[3].value"``; ``""`` for the whole frame);
    ``reason`` is msgspec's description (``"Expected `int`, got `str`"``).
    """

    def __init__(self, message: str, path: str = "", *, remote: bool = False) -> None:
        shown = path if len(path) <= 200 else "..." + path[-200:]
        super().__init__(f"{shown}: {message}" if path else message)
        self.reason = message
        self.path = path
        self.remote = remote


# -- messages and tags ------------------------------------------------------------------


def _name_of(qualname: str) -> str:
    """The default tag: the class's ``__name__`` (msgspec passes the ``__qualname__``,
    which for a nested class ``Reply.Size`` would change the wire format)."""
    return qualname.rpartition(".")[2]


class Message(
    msgspec.Struct, tag=_name_of, array_like=True, frozen=True, forbid_unknown_fields=True
):
    """The base class of RPC messages: a frozen :class:`msgspec.Struct` sent as the array
    ``[tag, field1, field2, ...]`` (the tag: the class's ``__name__`` unless given).

    Subclass it once per variant; the fields are annotated as in a dataclass, with
    defaults after the fields without::

        class Get(rpc.Message):
            key: str

        class Put(rpc.Message):
            key: str
            value: bytes
            ttl: float | None = None

        class Renamed(rpc.Message, tag="Size"):   # sent with the tag "Size"
            n: int

    Instances are immutable and hashable, compare by value, support ``match`` by position
    (``case Put(key, value)``), and may check their fields in ``__post_init__`` (a
    :exc:`ValueError` or :exc:`TypeError` raised there while decoding is an
    :exc:`RPCDecodeError`).  Any :class:`msgspec.Struct` declared with ``tag=True`` (or a
    tag) and ``array_like=True`` is accepted too.
    """


def tag(name: str) -> Callable[[C], C]:
    """A class decorator that gives a message class another tag on the wire (default: its
    ``__name__``); the same as declaring it with ``class X(rpc.Message, tag=name)``.

    Use it when two variants of different sum types share a name, or to keep the wire
    stable across a rename::

        @rpc.tag("Size")
        class SizeReply(rpc.Message):
            n: int

    It returns a subclass of the class with the same name, fields and methods (a Struct's
    tag is fixed when its class is made).

    Raises:
        TypeError: ``name`` is not a non-empty str, or the class is not a message class.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"a tag is a non-empty str, not {name!r}")

    def decorate(cls: C) -> C:
        if not _is_message_class(cls):
            raise TypeError(f"rpc.tag applies to message classes (rpc.Message), not {cls!r}")
        namespace = {"__module__": cls.__module__, "__qualname__": cls.__qualname__}
        if cls.__doc__ is not None:
            namespace["__doc__"] = cls.__doc__
        retagged: C = type(cls)(cls.__name__, (cls,), namespace, tag=name)
        return retagged

    return decorate


def tag_of(cls: type) -> str:
    """The tag a message class is sent with (its ``tag=``, else ``cls.__name__``).

    Raises:
        TypeError: ``cls`` is not a tagged message class.
    """
    config = getattr(cls, "__struct_config__", None)
    value = getattr(config, "tag", None)
    if not isinstance(value, str):
        raise TypeError(f"{cls!r} is not a tagged message class (subclass rpc.Message)")
    return value


def _is_message_class(cls: object) -> bool:
    return isinstance(cls, type) and issubclass(cls, msgspec.Struct)


@final
@dataclasses.dataclass(frozen=True, slots=True)
class DecodeLimits:
    """What one msgpack frame may make the decoder build, checked before anything is built.

    A msgpack value can be much larger in memory than on the wire: each one-byte empty
    array becomes a 56-byte list plus an 8-byte slot in its parent (a 1 MiB frame of them
    is 65 MiB of lists), and msgpack preallocates each array from its declared length.
    So :func:`unpackb` first walks the frame's structure without building anything and
    refuses it unless every container's declared length is present in the frame, the
    nesting is at most ``max_depth`` and the values number at most ``max_items``; only
    then does msgpack build the value.  A frame that passes holds at most ``max_items``
    Python objects (each at most about 72 bytes, strings and bins plus their payload).

    Attributes:
        max_depth: the deepest nesting of arrays and maps (the frame's outermost array
            is depth 1).
        max_items: the most values in all the frame's arrays and maps together (each
            array item, each map key and each map value counts one).

    Build it from a port's ``packet_size`` with :meth:`for_packet_size`.

    Raises:
        ValueError: a limit is not a positive int.
    """

    max_depth: int = DEFAULT_MAX_DEPTH
    max_items: int = (64 << 20) // ITEM_BYTES

    def __post_init__(self) -> None:
        for name in ("max_depth", "max_items"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, not {value!r}")

    @classmethod
    def for_packet_size(cls, packet_size: int, max_depth: int = DEFAULT_MAX_DEPTH) -> DecodeLimits:
        """The limits for frames of at most ``packet_size`` bytes: one value per
        :data:`ITEM_BYTES` (8) bytes of ``packet_size``, so a frame decodes to at most
        about 9 x ``packet_size`` bytes of Python objects, whatever it holds.

        Raises:
            ValueError: ``packet_size`` or ``max_depth`` is not a positive int.
        """
        if isinstance(packet_size, bool) or not isinstance(packet_size, int) or packet_size <= 0:
            raise ValueError(f"packet_size must be a positive int, not {packet_size!r}")
        return cls(max_depth=max_depth, max_items=max(1, packet_size // ITEM_BYTES))


#: For the first byte of a msgpack value in 0xc0-0xdf: its whole size when fixed (> 0),
#: else -1 (str/bin with a 1/2/4-byte length: -1/-2/-4 is carried below), 0 for refused.
_SIZES = [0] * 32
for _byte, _size in {
    0xC0: 1, 0xC2: 1, 0xC3: 1,  # nil, false, true
    0xCA: 5, 0xCB: 9,  # float 32, 64
    0xCC: 2, 0xCD: 3, 0xCE: 5, 0xCF: 9,  # uint 8-64
    0xD0: 2, 0xD1: 3, 0xD2: 5, 0xD3: 9,  # int 8-64
}.items():  # fmt: skip
    _SIZES[_byte - 0xC0] = _size
#: Variable-size values in 0xc0-0xdf: (kind, bytes of the length): kind 0 str/bin, 1 array,
#: 2 map.  Ext types (0xc7-0xc9, 0xd4-0xd8) and 0xc1 are neither: refused.
_VARIABLE = {
    0xC4: (0, 1), 0xC5: (0, 2), 0xC6: (0, 4),  # bin 8-32
    0xD9: (0, 1), 0xDA: (0, 2), 0xDB: (0, 4),  # str 8-32
    0xDC: (1, 2), 0xDD: (1, 4),  # array 16, 32
    0xDE: (2, 2), 0xDF: (2, 4),  # map 16, 32
}  # fmt: skip


def check_frame(data: Frame, limits: DecodeLimits) -> None:
    """Walk the structure of one msgpack frame without building it; refuse it unless it is
    exactly one value within ``limits`` (see :class:`DecodeLimits`) and without ext types.

    Raises:
        RPCDecodeError: the frame is truncated, has bytes after its value, uses an ext
            type or a reserved byte, declares a container longer than what is left of the
            frame, nests deeper than ``limits.max_depth`` or holds more than
            ``limits.max_items`` values.
    """
    end = len(data)
    position = 0
    todo = 1  # values still to read in the innermost open container (the frame: 1)
    stack: list[int] = []  # what is still to read in each enclosing container
    items = 0
    max_depth = limits.max_depth
    max_items = limits.max_items
    sizes = _SIZES
    while True:
        if position >= end:
            raise RPCDecodeError("not a msgpack frame: truncated")
        first = data[position]
        if first < 0x80 or first >= 0xE0:  # positive and negative fixint
            position += 1
            count = -1
        elif first >= 0xA0 and first < 0xC0:  # fixstr
            position += 1 + (first & 0x1F)
            count = -1
        elif first < 0xA0:  # fixmap (0x80-0x8f), fixarray (0x90-0x9f)
            position += 1
            count = (first & 0x0F) * 2 if first < 0x90 else first & 0x0F
        else:
            size = sizes[first - 0xC0]
            if size:
                position += size
                count = -1
            else:
                variable = _VARIABLE.get(first)
                if variable is None:
                    what = "a reserved byte" if first == 0xC1 else f"ext type 0x{first:02x}"
                    raise RPCDecodeError(
                        f"not a msgpack frame: {what} at {position} (ext types are not part "
                        "of the RPC wire format)"
                    )
                kind, length_bytes = variable
                start = position + 1
                position = start + length_bytes
                if position > end:
                    raise RPCDecodeError("not a msgpack frame: truncated")
                length = int.from_bytes(data[start:position], "big")
                if kind == 0:
                    position += length
                    count = -1
                else:
                    count = length * 2 if kind == 2 else length
        if count >= 0:  # a container of ``count`` values
            if len(stack) >= max_depth:
                raise RPCDecodeError(
                    f"frame refused: nested deeper than {max_depth} arrays and maps (max_depth)"
                )
            if count:
                if count > end - position:  # each value takes at least one byte
                    raise RPCDecodeError(
                        f"not a msgpack frame: a container of {count} values at "
                        f"{position} with {end - position} bytes left"
                    )
                items += count
                if items > max_items:
                    raise RPCDecodeError(
                        f"frame refused: it holds more than {max_items} values (max_items: "
                        f"one per {ITEM_BYTES} bytes of the port's packet_size)"
                    )
                stack.append(todo - 1)
                todo = count
                continue
        todo -= 1
        while not todo:
            if not stack:
                if position != end:
                    raise RPCDecodeError(
                        "not a msgpack frame: truncated"
                        if position > end
                        else f"not a msgpack frame: {end - position} bytes after its value"
                    )
                return
            todo = stack.pop()


_DEFAULT_LIMITS = DecodeLimits()


def _checked(data: Frame, limits: DecodeLimits, depth_bound: float = math.inf) -> None:
    """Refuse a frame over ``limits`` before msgspec builds anything of it.

    A frame of ``n`` bytes holds at most ``n`` values nested at most ``n`` deep, and a
    value of a type without recursion or ``Any`` nests at most ``depth_bound`` deep (the
    typed decoder refuses an array where the type has none, without reading into it); so
    a frame that cannot pass a limit is not walked: msgspec itself refuses what else
    :func:`check_frame` would (truncated, trailing bytes, reserved bytes, ext types
    through the decoders' ``ext_hook``), and it allocates an array or map as its items
    arrive, not from the length its header claims.
    """
    size = len(data)
    if size > limits.max_items or (size > limits.max_depth and depth_bound > limits.max_depth):
        check_frame(data, limits)


def _depth_bound(node: inspect.Type, open_structs: frozenset[type] = frozenset()) -> float:
    """How deep a value of the type ``node`` (msgspec.inspect) nests arrays and maps at
    most: ``math.inf`` for a recursive type or one holding ``Any``."""
    if isinstance(node, inspect.AnyType):
        return math.inf
    if isinstance(node, inspect.StructType):
        if node.cls in open_structs:
            return math.inf
        inner = open_structs | {node.cls}
        return 1 + max((_depth_bound(field.type, inner) for field in node.fields), default=0)
    if isinstance(node, _ITEMS_OF):
        return 1 + _depth_bound(node.item_type, open_structs)
    if isinstance(node, inspect.TupleType):
        return 1 + max((_depth_bound(item, open_structs) for item in node.item_types), default=0)
    if isinstance(node, inspect.DictType):
        return 1 + max(
            _depth_bound(node.key_type, open_structs), _depth_bound(node.value_type, open_structs)
        )
    if isinstance(node, inspect.UnionType):
        return max(_depth_bound(member, open_structs) for member in node.types)
    return 0


# -- encoding -------------------------------------------------------------------------------

_ENCODER = msgspec.msgpack.Encoder()


def packb(value: Any) -> bytes:
    """``value`` (messages, possibly inside plain containers) as msgpack bytes.

    Raises:
        TypeError: something in ``value`` cannot be encoded.
        ValueError: ``value`` nests too deep, or an int is out of msgpack's range.
    """
    try:
        return _ENCODER.encode(value)
    except TypeError as exc:
        raise TypeError(f"cannot encode: {exc}") from None
    except (OverflowError, RecursionError) as exc:
        raise ValueError(f"cannot encode: {exc}") from None


def to_wire(value: Any) -> Any:
    """``value`` with every message and enum replaced by its wire form (lists, tuples,
    dicts, str, bytes...: what a ``packet="msgpack"`` port packs)."""
    return msgspec.to_builtins(value, builtin_types=(bytes, bytearray, memoryview))


# -- decoding -------------------------------------------------------------------------------


def _refuse_ext(code: int, data: memoryview) -> NoReturn:
    raise RPCDecodeError(
        f"not a msgpack frame: ext type {code} (ext types are not part of the RPC wire format)"
    )


_UNTYPED = msgspec.msgpack.Decoder(ext_hook=_refuse_ext)
_ITEMS = msgspec.msgpack.Decoder(list[msgspec.Raw], ext_hook=_refuse_ext)


def _untyped(data: Buffer) -> Any:
    try:
        return _UNTYPED.decode(data)
    except RPCDecodeError:
        raise
    except RecursionError:
        raise RPCDecodeError("nested too deep for the interpreter's stack") from None
    except Exception as exc:  # untrusted bytes: any failure is the sender's fault
        raise RPCDecodeError(f"not a msgpack frame: {str(exc) or type(exc).__name__}") from None


def unpackb(data: bytes, limits: DecodeLimits | None = None) -> Any:
    """Parse one msgpack frame (no validation against a type), within ``limits``.

    The frame's structure is checked first (:func:`check_frame`), so a frame that would
    decode to more than ``limits`` allows is refused before anything is built.

    Args:
        data: the frame.
        limits: what it may decode to; default :class:`DecodeLimits()` (the limits for
            the default ``packet_size`` of 64 MiB).

    Raises:
        RPCDecodeError: ``data`` is not exactly one well-formed msgpack object, uses ext
            types, or passes ``limits``.
    """
    _checked(data, _DEFAULT_LIMITS if limits is None else limits)
    return _untyped(data)


def unpack_envelope(
    data: Frame, limits: DecodeLimits, kinds: tuple[int, ...], depth_bound: float = math.inf
) -> Any:
    """Parse an RPC envelope frame ``[kind, id, payload]`` within ``limits``, leaving the
    payload undecoded (a :class:`msgspec.Raw`, for :meth:`Codec.from_wire` to decode
    straight into its type) when ``kind`` is one of ``kinds``; any other frame is decoded
    whole, untyped, for the caller to refuse or read.  ``depth_bound``: how deep the
    payload's type nests at most, plus the envelope's level (see :func:`_checked`).

    Raises:
        RPCDecodeError: as :func:`unpackb`.
    """
    _checked(data, limits, depth_bound)
    try:
        items = _ITEMS.decode(data)
    except msgspec.ValidationError:  # not an array: no envelope
        return _untyped(data)
    except RPCDecodeError:
        raise
    except Exception as exc:
        raise RPCDecodeError(f"not a msgpack frame: {str(exc) or type(exc).__name__}") from None
    if len(items) == 3:
        kind = _untyped(items[0])
        if kind.__class__ is int and kind in kinds:
            return [kind, _untyped(items[1]), items[2]]
    return [_untyped(item) for item in items]


# -- what a type may hold -------------------------------------------------------------------

_LEAVES = (
    inspect.AnyType,
    inspect.NoneType,
    inspect.BoolType,
    inspect.IntType,
    inspect.FloatType,
    inspect.StrType,
    inspect.BytesType,
    inspect.LiteralType,
    inspect.EnumType,
)
_ITEMS_OF = (inspect.ListType, inspect.VarTupleType, inspect.SetType, inspect.FrozenSetType)


def _check_carried(node: inspect.Type, seen: set[type]) -> None:
    """Refuse what the wire format does not carry: a Struct not sent as a tagged array,
    a dataclass, and the types msgspec sends as ext types or as strings (datetimes,
    UUIDs, decimals...).

    Raises:
        TypeError: saying which field, for a field of a message class.
    """
    if isinstance(node, _LEAVES):
        return
    if isinstance(node, inspect.StructType):
        cls = node.cls
        if cls in seen:
            return
        seen.add(cls)
        if not node.array_like or not isinstance(node.tag, str):
            raise TypeError(
                f"{cls.__name__} is not sent as a tagged array: subclass ports.rpc.Message "
                "(or declare the Struct with tag=True, array_like=True)"
            )
        for field in node.fields:
            try:
                _check_carried(field.type, seen)
            except TypeError as exc:
                raise TypeError(f"{cls.__name__}.{field.name}: {exc}") from None
    elif isinstance(node, _ITEMS_OF):
        _check_carried(node.item_type, seen)
    elif isinstance(node, inspect.TupleType):
        for item in node.item_types:
            _check_carried(item, seen)
    elif isinstance(node, inspect.DictType):
        _check_carried(node.key_type, seen)
        _check_carried(node.value_type, seen)
    elif isinstance(node, inspect.UnionType):
        for member in node.types:
            _check_carried(member, seen)
    elif isinstance(node, inspect.DataclassType):
        raise TypeError(
            f"{node.cls.__name__} is a dataclass: RPC messages are msgspec Structs now - "
            "subclass ports.rpc.Message instead of @dataclass"
        )
    else:
        raise TypeError(f"typed RPC cannot carry values of type {_name(node)}")


def _name(node: object) -> str:
    cls = getattr(node, "cls", None)
    if isinstance(cls, type):
        return cls.__name__
    if isinstance(node, type):
        return node.__name__
    return type(node).__name__.removesuffix("Type").lower() or repr(node)


def _resolve_annotations(tp: object, namespace: dict[str, object], seen: set[type]) -> None:
    """Replace the string annotations of the message classes in ``tp`` by the types they
    name, looked up in ``namespace`` too (msgspec looks in the class's module only)."""
    if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
        if tp in seen:
            return
        seen.add(tp)
        local = {**namespace, tp.__name__: tp}
        try:
            hints = typing.get_type_hints(tp, localns=local, include_extras=True)
        except NameError as exc:
            raise TypeError(
                f"cannot resolve the type hints of {tp.__name__}: {exc} (define the types "
                "it names at module level, or pass them in namespace=)"
            ) from None
        own = tp.__dict__.get("__annotations__", {})  # noqa: RUF063 - updated in place
        for name in own:
            own[name] = hints[name]
        for hint in hints.values():
            _resolve_annotations(hint, namespace, seen)
        return
    for argument in typing.get_args(tp):
        _resolve_annotations(argument, namespace, seen)


# -- where a mismatch was -------------------------------------------------------------------

_STEP = re.compile(r"\[(\d+|\.\.\.)\]|\.(\w+)")


def _variant(node: inspect.Type | None, value: object) -> inspect.Type | None:
    """The member of a union that ``value`` (the raw wire value) was decoded as."""
    while isinstance(node, inspect.UnionType):
        members = [member for member in node.types if not isinstance(member, inspect.NoneType)]
        chosen: inspect.Type | None = None
        if isinstance(value, list) and value and value[0].__class__ is str:
            for member in members:
                if isinstance(member, inspect.StructType) and member.tag == value[0]:
                    chosen = member
        if chosen is None:
            arrays = (inspect.StructType, inspect.TupleType, *_ITEMS_OF)
            wanted = arrays if isinstance(value, list) else (inspect.DictType,)
            candidates = [member for member in members if isinstance(member, wanted)]
            if len(candidates) != 1:
                return None
            chosen = candidates[0]
        node = chosen
    return node


def _tagged(node: inspect.Type | None, value: object) -> bool:
    """Whether ``value`` is a message (a tagged array) where ``node`` expects one."""
    members = node.types if isinstance(node, inspect.UnionType) else (node,)
    return (
        value.__class__ is list
        and bool(value)
        and any(isinstance(member, inspect.StructType) for member in members)
    )


def _named_path(info: inspect.Type, raw: object, where: str) -> tuple[str, str]:
    """msgspec's ``$[2][0][1]`` as the message's own names: ``Tree.children[0].value``;
    and when the mismatch is a message's tag, a message saying so (else ``""``)."""
    steps = _STEP.findall(where)
    path = ""
    node: inspect.Type | None = info
    value = raw
    for index, _ in steps:
        position = int(index) if index.isdigit() else -1
        if position == 0 and isinstance(value, list) and _tagged(node, value):
            # The tag of a message: the path is the message's.
            members = node.types if isinstance(node, inspect.UnionType) else (node,)
            tags = sorted(
                str(member.tag) for member in members if isinstance(member, inspect.StructType)
            )
            return path, f"unknown tag {value[0]!r:.60}; expected one of {' | '.join(tags)}"
        node = _variant(node, value)
        if isinstance(node, inspect.StructType):
            if not path:
                path = str(node.tag)
            if 0 < position <= len(node.fields):
                field = node.fields[position - 1]
                path += f".{field.name}"
                node = field.type
            else:
                path += f"[{index}]"
                node = None
        else:
            path += f"[{index}]"
            if isinstance(node, _ITEMS_OF):
                node = node.item_type
            elif isinstance(node, inspect.TupleType) and 0 <= position < len(node.item_types):
                node = node.item_types[position]
            elif isinstance(node, inspect.DictType):
                node = node.value_type
            else:
                node = None
        value = value[position] if isinstance(value, list) and 0 <= position < len(value) else None
    node = _variant(node, value)
    if isinstance(node, inspect.StructType) and isinstance(value, list):
        # A message with fields missing or extra: say which.
        if not path:
            path = str(node.tag)
        names = [field.name for field in node.fields]
        required = sum(field.required for field in node.fields)
        got = len(value) - 1
        if got < required or got > len(names):
            s = "s" if len(names) != 1 else ""
            text = f"{node.tag} has {len(names)} field{s} ({', '.join(names)}), got {got}"
            if got < required:
                text += f": {names[got]} is missing"
            return ("" if path == node.tag else path), text
    return path, ""


def _mismatch(error: msgspec.ValidationError, info: inspect.Type, data: Buffer) -> RPCDecodeError:
    """An :class:`RPCDecodeError` for msgspec's ``error``, its path in the type's names."""
    text = str(error)
    message, found, where = text.rpartition(" - at `")
    if not found:  # at the root
        message, where = text, "$`"
    in_key = where.startswith("key` in `")
    if in_key:
        where = where[len("key` in `") :]
    try:
        raw = _UNTYPED.decode(data)
    except Exception:  # it decoded as far as the mismatch: this cannot fail
        raw = None
    path, about_tag = _named_path(info, raw, where.rstrip("`"))
    return RPCDecodeError(about_tag or message, path + ("[key]" if in_key else ""))


@final
class Codec(Generic[T]):
    """Encodes values of one message type to msgpack and decodes them back, validated.

    ``Codec(tp)`` builds a :class:`msgspec.msgpack.Decoder` for ``tp`` once (see the module
    docstring for the types it can carry); a decode then builds the typed value straight
    from the bytes, in C.  Build it once per type and share it: it holds no state per
    message and may be used from any thread.

    Example::

        class Leaf(rpc.Message):
            value: int

        class Node(rpc.Message):
            children: list[Leaf | Node]

        codec: Codec[Leaf | Node] = Codec(Leaf | Node)
        assert codec.decode(codec.encode(Node([Leaf(1)]))) == Node([Leaf(1)])

    Args:
        tp: the type of the messages: a message class, a union of message classes (a sum
            type), or any type expression the module docstring lists.
        max_depth: the deepest nesting of arrays and maps a decoded value may have (each
            message is one array).  Deeper input is an :exc:`RPCDecodeError`, refused
            before anything is built, so a hostile peer cannot exhaust the stack.
        namespace: extra names for resolving string annotations (forward references to
            classes not defined at module level).

    Raises:
        TypeError: ``tp`` contains a type that cannot be carried (a dataclass, a Struct
            not sent as a tagged array, a datetime...), a type hint that does not
            resolve, or two variants of one union with the same tag.
        ValueError: ``max_depth`` is not a positive int.
    """

    __slots__ = ("_decoder", "_depth_bound", "_info", "_limits", "max_depth", "type")

    def __init__(
        self,
        tp: Any,
        *,
        max_depth: int = DEFAULT_MAX_DEPTH,
        namespace: dict[str, object] | None = None,
    ) -> None:
        if isinstance(max_depth, bool) or not isinstance(max_depth, int) or max_depth <= 0:
            raise ValueError(f"max_depth must be a positive int, not {max_depth!r}")
        self.type = tp
        self.max_depth = max_depth
        self._limits = DecodeLimits(max_depth=max_depth)
        if namespace:
            _resolve_annotations(tp, namespace, set())
        try:
            self._info = inspect.type_info(tp)
            self._decoder: msgspec.msgpack.Decoder[T] = msgspec.msgpack.Decoder(
                tp, ext_hook=_refuse_ext
            )
        except NameError as exc:
            raise TypeError(
                f"cannot resolve the type hints of {tp!r}: {exc} (define the types it "
                "names at module level, or pass them in namespace=)"
            ) from None
        except TypeError as exc:
            text = str(exc)
            if "unique `tag` values" in text:
                raise TypeError(
                    f"two variants have the same tag: {text}; give one another tag with "
                    "class X(rpc.Message, tag=...)"
                ) from None
            raise TypeError(f"typed RPC cannot carry {tp!r}: {text}") from None
        _check_carried(self._info, set())
        self._depth_bound = _depth_bound(self._info)

    def encode(self, value: T) -> bytes:
        """``value`` as one msgpack frame (see the wire format in the module docstring).

        Raises:
            TypeError: ``value`` holds something that cannot be encoded.
            ValueError: ``value`` nests too deep, or an int is out of msgpack's range.
        """
        return packb(value)

    def decode(
        self, data: bytes | bytearray | memoryview, *, limits: DecodeLimits | None = None
    ) -> T:
        """Parse one msgpack frame and validate it against the type.

        Args:
            data: the frame.
            limits: what the frame may decode to, checked before anything is built
                (see :class:`DecodeLimits`); default: the ``max_items`` of the default
                ``packet_size`` (64 MiB) and this codec's ``max_depth``.  Pass
                ``DecodeLimits.for_packet_size(n)`` for frames of at most ``n`` bytes.

        Raises:
            RPCDecodeError: not msgpack, an unknown tag, a wrong field type, a missing or
                extra field, nested deeper than ``max_depth``, or over ``limits``; the
                message says where.
        """
        _checked(data, self._limits if limits is None else limits, self._depth_bound)
        return self._decode(data)

    def _decode(self, data: Buffer) -> T:
        try:
            return self._decoder.decode(data)
        except msgspec.ValidationError as exc:
            raise _mismatch(exc, self._info, data) from None
        except RPCDecodeError:
            raise
        except RecursionError:
            raise RPCDecodeError("nested too deep for the interpreter's stack") from None
        except Exception as exc:  # untrusted bytes: any failure is the sender's fault
            text = str(exc) or type(exc).__name__
            raise RPCDecodeError(f"not a msgpack frame: {text}") from None

    def from_wire(self, value: object) -> T:
        """Validate a payload and build the typed value: a :class:`msgspec.Raw` cut from a
        frame that was checked already (what :func:`unpack_envelope` leaves), or a value
        already parsed (from a ``packet="msgpack"`` port), which is checked as a frame.

        Raises:
            RPCDecodeError: as :meth:`decode`.
        """
        if isinstance(value, msgspec.Raw):
            return self._decode(value)
        try:
            data = _ENCODER.encode(value)
        except Exception as exc:
            raise RPCDecodeError(f"not msgpack data: {exc}") from None
        return self.decode(data)

    def to_wire(self, value: T) -> Any:
        """``value`` as plain msgpack-able data (lists, dicts, str...): its wire form."""
        return to_wire(value)

    def __repr__(self) -> str:
        text = self.type.__name__ if isinstance(self.type, type) else str(self.type)
        return f"Codec({text.replace('typing.', '')})"
