"""Typed messages over msgpack: encode algebraic data types, validate them on decode.

This is the sans-I/O half of :mod:`ports.rpc`: it knows nothing of ports or tasks.

**Types.**  A message type is a type expression built from:

* ``None``, ``bool``, ``int``, ``float`` (an ``int`` on the wire is accepted and
  converted), ``str``, ``bytes``, ``typing.Any`` (not validated);
* ``list[T]``, ``tuple[T, ...]``, ``tuple[A, B, C]``, ``dict[K, V]``;
* ``Literal[...]`` of ``None``/``bool``/``int``/``str``/``bytes`` values, and
  :class:`enum.Enum` subclasses (sent as their value);
* dataclasses (frozen and slotted ones are the intended kind), whose fields are
  themselves of these types - including the class itself or a union containing it, so
  trees, ASTs and lists of nodes by id are all expressible;
* unions of all of the above (``A | B | None``).  A union of dataclasses is a *sum type*
  (a closed set of variants, as an algebraic data type): the variant is chosen by its tag.

**Theory of operation.**  A type is compiled once, the first time a codec needs it, into a
tree of small decoding functions; each dataclass's resolved type hints
(:func:`typing.get_type_hints`) and field order are computed once and cached for the life
of the process, so decoding a message costs a walk over the value and nothing else.  Each
decoding function checks the value's exact type and shape, builds the Python value and
passes a *remaining depth* down, so hostile nesting stops at ``max_depth`` instead of
exhausting the stack.  A mismatch raises an internal exception that each enclosing level
annotates with where it happened (``Tree.children[3].value``) on its way out - so the
path is built only on failure and the happy path pays nothing for it.

Encoding does not validate: msgpack packs the value, and a ``default`` hook turns each
dataclass into its tagged array and each enum into its value.  Validation happens where
trust ends: on decode, in the receiver.

**Wire format** (also in ``docs/reference/rpc-wire-format.rst``).  Plain msgpack, no ext types, so
any msgpack library can speak it:

* a dataclass instance is an array ``[tag, field1, field2, ...]``: the tag is a str (the
  class's ``__name__``, or the name given with :func:`tag`), then every ``init`` field in
  declaration order.  The array has exactly ``1 + number of fields`` items: a missing or
  extra field is an error.  (The tag is there even where the type is a single class, so a
  value always says what it is.)
* ``None``, ``bool``, ``int``, ``float``, ``str`` and ``bytes`` are msgpack's nil, bool,
  int, float, str (UTF-8) and bin; lists and tuples are arrays; dicts are maps; an enum is
  its value.
"""

from __future__ import annotations

import dataclasses
import enum
import operator
import threading
import types
import typing
from collections.abc import Callable
from typing import Any, Generic, TypeVar, final

import msgpack

from ioserver._exceptions import IOServerError

__all__ = [
    "DEFAULT_MAX_DEPTH",
    "ITEM_BYTES",
    "Codec",
    "DecodeLimits",
    "RPCDecodeError",
    "RPCError",
    "tag",
    "tag_of",
]

T = TypeVar("T")
C = TypeVar("C", bound=type)

#: The deepest nesting of arrays and maps a decoded value may have, by default.
DEFAULT_MAX_DEPTH = 256

#: msgpack's parser refuses deeper nesting than this (its stack).
_PARSER_MAX_DEPTH = 1024

#: Bytes of ``packet_size`` per value a frame may decode to (see :class:`DecodeLimits`).
ITEM_BYTES = 8


class RPCError(IOServerError):
    """Root of the errors of typed RPC (:mod:`ports.rpc`)."""


class RPCDecodeError(RPCError, ValueError):
    """A message did not match its declared type, or was not valid msgpack.

    Raised by :meth:`Codec.decode`; raised from :meth:`ports.rpc.Client.call` when the
    reply did not decode, or when the *server* could not decode the request (then
    ``remote`` is true).  ``path`` says where in the value the mismatch was, as an
    expression on the message (``"Tree.children[3].value"``; ``""`` for the whole frame).
    """

    def __init__(self, message: str, path: str = "", *, remote: bool = False) -> None:
        shown = path if len(path) <= 200 else "..." + path[-200:]
        super().__init__(f"{shown}: {message}" if path else message)
        self.reason = message
        self.path = path
        self.remote = remote


# -- tags -----------------------------------------------------------------------------------


def tag(name: str) -> Callable[[C], C]:
    """A class decorator that sets a dataclass's tag on the wire (default: its ``__name__``).

    Use it when two variants of different sum types share a name, or to keep the wire
    stable across a rename::

        @rpc.tag("Size")
        @dataclass(frozen=True, slots=True)
        class SizeReply:
            n: int

    Raises:
        TypeError: ``name`` is not a non-empty str.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"a tag is a non-empty str, not {name!r}")

    def decorate(cls: C) -> C:
        cls.__rpc_tag__ = name  # type: ignore[attr-defined]
        return cls

    return decorate


def tag_of(cls: type) -> str:
    """The tag a dataclass is sent with (its own :func:`tag`, else ``cls.__name__``)."""
    value = cls.__dict__.get("__rpc_tag__")
    return value if isinstance(value, str) else cls.__name__


# -- encoding -------------------------------------------------------------------------------

_ENCODERS: dict[type, Callable[[Any], Any]] = {}


def _encoder_for(cls: type) -> Callable[[Any], Any]:
    if dataclasses.is_dataclass(cls):
        name = tag_of(cls)
        names = [field.name for field in dataclasses.fields(cls) if field.init]
        if not names:

            def encode(value: Any) -> Any:
                return [name]

        elif len(names) == 1:
            only = names[0]

            def encode(value: Any) -> Any:
                return [name, getattr(value, only)]

        else:
            getter = operator.attrgetter(*names)

            def encode(value: Any) -> Any:
                return [name, *getter(value)]

    elif issubclass(cls, enum.Enum):

        def encode(value: Any) -> Any:
            return value.value

    else:
        raise TypeError(f"cannot encode {cls.__name__}: not a dataclass, an enum or msgpack-able")
    _ENCODERS[cls] = encode
    return encode


def _default(value: Any) -> Any:
    """msgpack's ``default`` hook: a dataclass → its tagged array, an enum → its value."""
    encode = _ENCODERS.get(value.__class__)
    if encode is None:
        encode = _encoder_for(value.__class__)
    return encode(value)


def packb(value: Any) -> bytes:
    """``value`` (messages, possibly inside plain containers) as msgpack bytes.

    Raises:
        TypeError: something in ``value`` cannot be encoded.
        ValueError: ``value`` nests deeper than msgpack packs, or an int is out of range.
    """
    try:
        data: bytes = msgpack.packb(value, default=_default, use_bin_type=True)
    except OverflowError as exc:
        raise ValueError(f"cannot encode: {exc}") from exc
    return data


def to_wire(value: Any) -> Any:
    """``value`` with every dataclass and enum replaced by its wire form (plain msgpack)."""
    cls = value.__class__
    if cls in (str, int, float, bool, bytes) or value is None:
        return value
    if cls is list or cls is tuple:
        return [to_wire(item) for item in value]
    if cls is dict:
        return {to_wire(key): to_wire(item) for key, item in value.items()}
    encode = _ENCODERS.get(cls) or _encoder_for(cls)
    return to_wire(encode(value))


def _ext_hook(code: int, data: bytes) -> Any:
    raise ValueError(f"msgpack ext type {code} is not part of the RPC wire format")


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


def check_frame(data: bytes, limits: DecodeLimits) -> None:
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
    check_frame(data, _DEFAULT_LIMITS if limits is None else limits)
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=False, ext_hook=_ext_hook)
    except Exception as exc:  # untrusted bytes: any failure is the sender's fault
        raise RPCDecodeError(f"not a msgpack frame: {str(exc) or type(exc).__name__}") from None


_DEFAULT_LIMITS = DecodeLimits()


# -- decoding -------------------------------------------------------------------------------

Decoder = Callable[[Any, int], Any]
"""``decode(wire_value, remaining_depth) -> python_value``; raises :class:`_Mismatch`."""


class _Mismatch(Exception):
    """Internal: a value does not match its type.  ``path`` is built while unwinding."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
        self.path: list[str] = []


def _describe(value: Any) -> str:
    if isinstance(value, list) and value and isinstance(value[0], str):
        return f"array tagged {value[0]!r}"
    return _WIRE_NAMES.get(value.__class__) or str(value.__class__.__name__)


_WIRE_NAMES: dict[type, str] = {list: "array", dict: "map", bytes: "bin", type(None): "nil"}


def _name(tp: Any) -> str:
    if isinstance(tp, type):
        return str(tp.__name__)
    return str(tp).replace("typing.", "")


def _too_deep() -> _Mismatch:
    return _Mismatch("nested too deep (max_depth)")


def _exact(cls: type) -> Decoder:
    def decode(value: Any, depth: int) -> Any:
        if value.__class__ is not cls:
            raise _Mismatch(f"expected {cls.__name__}, got {_describe(value)}")
        return value

    return decode


def _decode_any(value: Any, depth: int) -> Any:
    return value


def _decode_none(value: Any, depth: int) -> Any:
    if value is not None:
        raise _Mismatch(f"expected None, got {_describe(value)}")
    return None


def _decode_float(value: Any, depth: int) -> Any:
    cls = value.__class__
    if cls is float:
        return value
    if cls is int:
        return float(value)
    raise _Mismatch(f"expected float, got {_describe(value)}")


_PRIMITIVES: dict[Any, Decoder] = {
    Any: _decode_any,
    object: _decode_any,
    None: _decode_none,
    type(None): _decode_none,
    bool: _exact(bool),
    int: _exact(int),
    str: _exact(str),
    bytes: _exact(bytes),
    float: _decode_float,
}


class _Compiler:
    """Compiles type expressions to decoders; recursive dataclasses share one node."""

    def __init__(self) -> None:
        self.cache: dict[Any, Decoder] = {}
        # Each compiled dataclass: its tag and its decoder of an array already known to be
        # a non-empty list with that tag (what a union dispatches to).
        self.variants: dict[type, tuple[str, Decoder]] = {}

    def compile(self, tp: Any, namespace: dict[str, Any]) -> Decoder:
        try:
            return self.cache[tp]
        except (KeyError, TypeError):  # TypeError: an unhashable type expression
            pass
        decoder = self._compile(tp, namespace)
        try:
            self.cache[tp] = decoder
        except TypeError:
            pass
        return decoder

    def _compile(self, tp: Any, namespace: dict[str, Any]) -> Decoder:
        if tp in _PRIMITIVES:
            return _PRIMITIVES[tp]
        origin = typing.get_origin(tp)
        arguments = typing.get_args(tp)
        if origin is typing.Annotated:
            return self.compile(arguments[0], namespace)
        if origin is typing.Union or origin is types.UnionType:
            return self._union(tp, arguments, namespace)
        if origin is list:
            return self._list(arguments[0] if arguments else Any, namespace)
        if origin is tuple:
            return self._tuple(arguments, namespace)
        if origin is dict:
            key, item = arguments if arguments else (Any, Any)
            return self._dict(key, item, namespace)
        if origin is typing.Literal:
            return self._literal(arguments)
        if tp is list:
            return self._list(Any, namespace)
        if tp is tuple:
            return self._tuple((Any, ...), namespace)
        if tp is dict:
            return self._dict(Any, Any, namespace)
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            return self._dataclass(tp, namespace)
        if isinstance(tp, type) and issubclass(tp, enum.Enum):
            return self._enum(tp)
        raise TypeError(f"typed RPC cannot carry values of type {_name(tp)}")

    def _list(self, item_type: Any, namespace: dict[str, Any]) -> Decoder:
        item = self.compile(item_type, namespace)
        if item is _decode_any:

            def decode_any_list(value: Any, depth: int) -> Any:
                if value.__class__ is not list:
                    raise _Mismatch(f"expected an array, got {_describe(value)}")
                if depth <= 0:
                    raise _too_deep()
                return value

            return decode_any_list

        def decode(value: Any, depth: int) -> Any:
            if value.__class__ is not list:
                raise _Mismatch(f"expected an array, got {_describe(value)}")
            if depth <= 0:
                raise _too_deep()
            depth -= 1
            index = 0
            try:
                result = []
                for index, element in enumerate(value):  # noqa: B007 - read in except
                    result.append(item(element, depth))
            except _Mismatch as exc:
                exc.path.append(f"[{index}]")
                raise
            return result

        return decode

    def _tuple(self, arguments: tuple[Any, ...], namespace: dict[str, Any]) -> Decoder:
        if len(arguments) == 2 and arguments[1] is Ellipsis:
            as_list = self._list(arguments[0], namespace)

            def decode_variable(value: Any, depth: int) -> Any:
                return tuple(as_list(value, depth))

            return decode_variable
        if arguments == ((),):  # tuple[()]
            arguments = ()
        items = [self.compile(argument, namespace) for argument in arguments]
        size = len(items)

        def decode(value: Any, depth: int) -> Any:
            if value.__class__ is not list:
                raise _Mismatch(f"expected an array of {size}, got {_describe(value)}")
            if len(value) != size:
                raise _Mismatch(f"expected an array of {size}, got {len(value)} items")
            if depth <= 0:
                raise _too_deep()
            depth -= 1
            index = 0
            try:
                result = []
                for index, item in enumerate(items):
                    result.append(item(value[index], depth))
            except _Mismatch as exc:
                exc.path.append(f"[{index}]")
                raise
            return tuple(result)

        return decode

    def _dict(self, key_type: Any, item_type: Any, namespace: dict[str, Any]) -> Decoder:
        key_decoder = self.compile(key_type, namespace)
        item_decoder = self.compile(item_type, namespace)

        def decode(value: Any, depth: int) -> Any:
            if value.__class__ is not dict:
                raise _Mismatch(f"expected a map, got {_describe(value)}")
            if depth <= 0:
                raise _too_deep()
            depth -= 1
            result = {}
            for key, item in value.items():
                try:
                    decoded_key = key_decoder(key, depth)
                except _Mismatch as exc:
                    exc.path.append(f"[key {key!r}]")
                    raise
                try:
                    result[decoded_key] = item_decoder(item, depth)
                except _Mismatch as exc:
                    exc.path.append(f"[{key!r}]")
                    raise
                except TypeError:  # a key that decoded to an unhashable value
                    raise _Mismatch(f"unhashable map key {key!r}") from None
            return result

        return decode

    def _literal(self, values: tuple[Any, ...]) -> Decoder:
        allowed = {(value.__class__, value) for value in values}
        text = " | ".join(repr(value) for value in values)

        def decode(value: Any, depth: int) -> Any:
            try:
                if (value.__class__, value) in allowed:
                    return value
            except TypeError:  # unhashable
                pass
            raise _Mismatch(f"expected one of {text}, got {value!r:.60}")

        return decode

    def _enum(self, cls: type[enum.Enum]) -> Decoder:
        def decode(value: Any, depth: int) -> Any:
            try:
                return cls(value)
            except (ValueError, TypeError):
                raise _Mismatch(f"{value!r:.60} is not a value of {cls.__name__}") from None

        return decode

    def _dataclass(self, cls: type, namespace: dict[str, Any]) -> Decoder:
        # Placeholder first, so a field of the class's own type (a tree) finds this node.
        fields: list[tuple[str, Decoder]] = []
        name = tag_of(cls)
        size = 0

        def decode(value: Any, depth: int) -> Any:
            if value.__class__ is not list or not value:
                raise _Mismatch(f"expected {name}, got {_describe(value)}")
            if value[0] != name:
                raise _Mismatch(f"expected tag {name!r}, got {value[0]!r:.60}")
            return decode_fields(value, depth)

        def decode_fields(value: Any, depth: int) -> Any:
            # The tag is checked: ``value`` is a non-empty list tagged ``name``.
            if len(value) != size:
                missing = len(value) < size
                names = [field_name for field_name, _ in fields]
                raise _Mismatch(
                    f"{name} has {size - 1} field{'s' if size != 2 else ''} "
                    f"({', '.join(names)}), got {len(value) - 1}"
                    + (f": {names[len(value) - 1]} is missing" if missing else "")
                )
            if depth <= 0:
                raise _too_deep()
            depth -= 1
            arguments = []
            field_name = ""
            try:
                for index, (field_name, field_decoder) in enumerate(fields, 1):  # noqa: B007
                    arguments.append(field_decoder(value[index], depth))
            except _Mismatch as exc:
                exc.path.append(f".{field_name}")
                raise
            try:
                return cls(*arguments)
            except (TypeError, ValueError) as exc:  # e.g. a __post_init__ check
                raise _Mismatch(f"{name} rejected its fields: {exc}") from None

        self.cache[cls] = decode
        self.variants[cls] = (name, decode_fields)
        local = {**namespace, cls.__name__: cls}
        try:
            try:
                hints = typing.get_type_hints(cls, localns=local)
            except NameError as exc:
                raise TypeError(
                    f"cannot resolve the type hints of {cls.__name__}: {exc} (define the "
                    "types it names at module level, or pass them in namespace=)"
                ) from None
            for field in dataclasses.fields(cls):
                if not field.init:
                    continue
                try:
                    fields.append((field.name, self.compile(hints[field.name], local)))
                except TypeError as exc:
                    raise TypeError(f"{cls.__name__}.{field.name}: {exc}") from None
        except BaseException:
            del self.cache[cls], self.variants[cls]
            raise
        size = 1 + len(fields)
        return decode

    def _union(self, tp: Any, members: tuple[Any, ...], namespace: dict[str, Any]) -> Decoder:
        variants: dict[str, Decoder] = {}
        classes: dict[str, type] = {}
        others: list[Decoder] = []
        nullable = False
        local = dict(namespace)
        for member in members:
            if isinstance(member, type) and dataclasses.is_dataclass(member):
                local.setdefault(member.__name__, member)
        for member in members:
            if member is type(None):
                nullable = True
            elif isinstance(member, type) and dataclasses.is_dataclass(member):
                self.compile(member, local)
                name, fields = self.variants[member]
                if name in classes and classes[name] is not member:
                    raise TypeError(
                        f"{_name(tp)}: two variants have the tag {name!r} "
                        f"({classes[name].__qualname__} and {member.__qualname__}); "
                        "give one another tag with ports.rpc.tag()"
                    )
                variants[name] = fields
                classes[name] = member
            else:
                others.append(self.compile(member, local))
        expected = " | ".join(sorted(variants)) if variants else _name(tp)
        if others or nullable:
            expected = _name(tp)

        if not others:
            # The common case: a sum type of dataclasses, maybe optional.
            def decode_variants(value: Any, depth: int) -> Any:
                if value is None and nullable:
                    return None
                if value.__class__ is not list or not value:
                    raise _Mismatch(f"expected {expected}, got {_describe(value)}")
                name = value[0]
                decode = variants.get(name) if name.__class__ is str else None
                if decode is None:
                    raise _Mismatch(f"unknown tag {name!r:.60}; expected one of {expected}")
                return decode(value, depth)

            return decode_variants

        def decode(value: Any, depth: int) -> Any:
            if value is None and nullable:
                return None
            if variants and value.__class__ is list and value and value[0].__class__ is str:
                variant = variants.get(value[0])
                if variant is not None:
                    return variant(value, depth)
            for other in others:
                try:
                    return other(value, depth)
                except _Mismatch:
                    continue
            raise _Mismatch(f"expected {expected}, got {_describe(value)}")

        return decode


_COMPILER = _Compiler()
_COMPILE_LOCK = threading.Lock()


@final
class Codec(Generic[T]):
    """Encodes values of one message type to msgpack and decodes them back, validated.

    ``Codec(tp)`` compiles ``tp`` once (see the module docstring for the types it can
    carry); encode and decode then cost a walk over the value.  Build it once per type and
    share it: it holds no state per message and may be used from any thread.

    Example::

        @dataclass(frozen=True, slots=True)
        class Leaf:
            value: int

        @dataclass(frozen=True, slots=True)
        class Node:
            children: list[Leaf | Node]

        codec: Codec[Leaf | Node] = Codec(Leaf | Node)
        assert codec.decode(codec.encode(Node([Leaf(1)]))) == Node([Leaf(1)])

    Args:
        tp: the type of the messages: a dataclass, a union of dataclasses (a sum type), or
            any type expression the module docstring lists.
        max_depth: the deepest nesting of arrays and maps a decoded value may have (each
            dataclass value is one array).  Deeper input is an :exc:`RPCDecodeError`, so a
            hostile peer cannot exhaust the stack.
        namespace: extra names for resolving string annotations (forward references to
            classes not defined at module level).

    Raises:
        TypeError: ``tp`` contains a type that cannot be carried, a type hint that does not
            resolve, or two variants of one union with the same tag.
        ValueError: ``max_depth`` is not a positive int.
    """

    __slots__ = ("_decode", "_limits", "max_depth", "type")

    def __init__(
        self,
        tp: Any,
        *,
        max_depth: int = DEFAULT_MAX_DEPTH,
        namespace: dict[str, Any] | None = None,
    ) -> None:
        if isinstance(max_depth, bool) or not isinstance(max_depth, int) or max_depth <= 0:
            raise ValueError(f"max_depth must be a positive int, not {max_depth!r}")
        self.type = tp
        self.max_depth = max_depth
        # The walk checks max_depth itself, saying where; the frame check stops at the
        # depth msgpack's parser stops at.
        self._limits = DecodeLimits(max_depth=max(max_depth, _PARSER_MAX_DEPTH))
        with _COMPILE_LOCK:  # compiling fills shared caches; decoding reads them only
            if namespace:
                self._decode = _Compiler().compile(tp, namespace)
            else:
                self._decode = _COMPILER.compile(tp, {})

    def encode(self, value: T) -> bytes:
        """``value`` as one msgpack frame (see the wire format in the module docstring).

        Raises:
            TypeError: ``value`` holds something that cannot be encoded.
            ValueError: ``value`` nests deeper than msgpack packs, or an int is too large.
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
                ``packet_size`` (64 MiB), and nesting as deep as msgpack parses (1024:
                the walk then refuses what is deeper than ``max_depth``, saying where).  Pass
                ``DecodeLimits.for_packet_size(n)`` for frames of at most ``n`` bytes.

        Raises:
            RPCDecodeError: not msgpack, an unknown tag, a wrong field type, a missing or
                extra field, nested deeper than ``max_depth``, or over ``limits``; the
                message says where.
        """
        if limits is None:
            limits = self._limits
        return self.from_wire(unpackb(bytes(data), limits))

    def from_wire(self, value: Any) -> T:
        """Validate an already parsed msgpack value (e.g. from a ``packet="msgpack"``
        port) and build the typed value.

        Raises:
            RPCDecodeError: as :meth:`decode`.
        """
        try:
            result: T = self._decode(value, self.max_depth)
        except _Mismatch as exc:
            raise RPCDecodeError(exc.message, _path(value, exc.path)) from None
        except RecursionError:
            raise RPCDecodeError("nested too deep for the interpreter's stack") from None
        return result

    def to_wire(self, value: T) -> Any:
        """``value`` as plain msgpack-able data (lists, dicts, str...): its wire form."""
        return to_wire(value)

    def __repr__(self) -> str:
        return f"Codec({_name(self.type)})"


def _path(value: Any, parts: list[str]) -> str:
    """Where a mismatch was: the outer tag (if any), then each step inwards."""
    root = value[0] if value.__class__ is list and value and value[0].__class__ is str else ""
    return root + "".join(reversed(parts)) if parts else ""
