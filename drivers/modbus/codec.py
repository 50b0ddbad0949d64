"""Register codec: pure functions between Modbus register words and typed, scaled values.

Nothing here talks to a device or imports pymodbus. A read hands :func:`decode` the words it got
(each an int 0..65535; a coil or discrete input is one word 0 or 1) and a :class:`ValueSpec`;
a write asks :func:`encode` for the words to send. Both raise only :class:`CodecError`.

Types and their width in registers::

    bool   1   coil / discrete input bit (or a holding/input register used as a flag: 0 is False)
    u16    1   unsigned 0 .. 65535               i16  1   two's complement -32768 .. 32767
    bits   1   named bits of one u16, bit 0 = least significant, decoded to {name: bool}
    u32    2   unsigned 0 .. 2**32-1             i32  2   two's complement
    f32    2   IEEE 754 binary32
    u64    4   unsigned 0 .. 2**64-1             i64  4   two's complement
    f64    4   IEEE 754 binary64

Multi-register layout. Write the value's bytes most significant first as A B C D (a 32-bit value;
64-bit values continue E F G H). ``word_order`` says which register holds the high word, ``byte_order``
which byte of each register comes first on the wire (the high byte, in Modbus' own big-endian framing,
is ``big``)::

    u32 0x11223344 -> A=0x11 B=0x22 C=0x33 D=0x44

    word_order byte_order  name  | register n | register n+1 |  on the wire (PDU bytes)
    ---------- ----------  ----  | ---------- | ------------ |  -----------------------
    big        big         ABCD  |   0x1122   |    0x3344    |  11 22 33 44   (Modbus "standard")
    little     big         CDAB  |   0x3344   |    0x1122    |  33 44 11 22   (word swap, common)
    big        little      BADC  |   0x2211   |    0x4433    |  22 11 44 33   (byte swap)
    little     little      DCBA  |   0x4433   |    0x2211    |  44 33 22 11   (fully little-endian)

    f32 123.456 = 0x42F6E979:  ABCD -> [0x42F6, 0xE979]   CDAB -> [0xE979, 0x42F6]

    u64 bytes A..H, word_order little: register n holds G H, n+1 E F, n+2 C D, n+3 A B.

Single-register types (u16, i16, bits) honour ``byte_order`` too: ``little`` swaps the two bytes.

Scaling (numeric types): ``value = raw * scale + offset`` on decode; ``raw = (value - offset) / scale``
on encode, rounded to the nearest integer for integer types (ties to even), then range-checked.
An integer type with an integral scale and offset decodes to ``int``; otherwise to ``float``, rounded
to the decimals of ``scale`` and ``offset`` so that 1234 * 0.1 reads 123.4, not 123.40000000000001.
Float types decode non-finite values (NaN, inf) as they are; nothing non-finite is ever encoded.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from fractions import Fraction
from typing import Final, Literal, get_args

ValueType = Literal["bool", "bits", "u16", "i16", "u32", "i32", "u64", "i64", "f32", "f64"]
WordOrder = Literal["big", "little"]
ByteOrder = Literal["big", "little"]
Value = bool | int | float | dict[str, bool]

VALUE_TYPES: Final[tuple[ValueType, ...]] = get_args(ValueType)
WIDTH: Final[Mapping[ValueType, int]] = {
    "bool": 1, "bits": 1, "u16": 1, "i16": 1, "u32": 2, "i32": 2, "u64": 4, "i64": 4, "f32": 2, "f64": 4,
}
INTEGER_TYPES: Final[frozenset[ValueType]] = frozenset({"u16", "i16", "u32", "i32", "u64", "i64"})
FLOAT_TYPES: Final[frozenset[ValueType]] = frozenset({"f32", "f64"})
NUMERIC_TYPES: Final[frozenset[ValueType]] = INTEGER_TYPES | FLOAT_TYPES
_SIGNED: Final[frozenset[ValueType]] = frozenset({"i16", "i32", "i64"})
_FLOAT_FORMAT: Final[Mapping[ValueType, str]] = {"f32": ">f", "f64": ">d"}
_LAYOUT_NAMES: Final[Mapping[tuple[WordOrder, ByteOrder], str]] = {
    ("big", "big"): "ABCD", ("little", "big"): "CDAB", ("big", "little"): "BADC", ("little", "little"): "DCBA",
}


class CodecError(ValueError):
    """Words cannot be decoded as the spec says, or a value cannot be encoded (type, range, NaN)."""


def raw_range(value_type: ValueType) -> tuple[int, int]:
    """The raw (unscaled) integer range of an integer type, inclusive."""
    if value_type not in INTEGER_TYPES:
        raise CodecError(f"{value_type} is not an integer type")
    bits = 16 * WIDTH[value_type]
    if value_type in _SIGNED:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def layout_name(word_order: WordOrder, byte_order: ByteOrder) -> str:
    """ABCD, CDAB, BADC or DCBA: the name installers find in device manuals."""
    return _LAYOUT_NAMES[(word_order, byte_order)]


def _exact(x: float) -> Fraction:
    """The decimal a profile author wrote (0.1 is 1/10, not the nearest binary float)."""
    return Fraction(Decimal(repr(x)))


def _decimals(x: float) -> int:
    exponent = Decimal(repr(x)).as_tuple().exponent
    return max(0, -exponent) if isinstance(exponent, int) else 0


@dataclass(frozen=True, slots=True)
class ValueSpec:
    """How one value sits in its registers. ``bits`` (type ``bits`` only) pairs names with bit
    indices 0 (least significant) .. 15; a bit not named is ignored on decode and 0 on encode."""

    type: ValueType
    word_order: WordOrder = "big"
    byte_order: ByteOrder = "big"
    scale: float = 1.0
    offset: float = 0.0
    bits: tuple[tuple[str, int], ...] = ()
    # Derived in __post_init__; not part of identity.
    _identity: bool = field(init=False, repr=False, compare=False, default=True)
    _integral: bool = field(init=False, repr=False, compare=False, default=True)
    _ndigits: int = field(init=False, repr=False, compare=False, default=0)
    _plain16: bool = field(init=False, repr=False, compare=False, default=False)

    def __post_init__(self) -> None:
        if self.type not in VALUE_TYPES:
            raise CodecError(f"unknown value type {self.type!r} (known: {', '.join(VALUE_TYPES)})")
        if self.word_order not in ("big", "little") or self.byte_order not in ("big", "little"):
            raise CodecError("word_order and byte_order must each be 'big' or 'little'")
        if not (isinstance(self.scale, int | float) and math.isfinite(self.scale) and self.scale != 0):
            raise CodecError(f"scale must be a finite number other than 0 (got {self.scale!r})")
        if not (isinstance(self.offset, int | float) and math.isfinite(self.offset)):
            raise CodecError(f"offset must be a finite number (got {self.offset!r})")
        identity = self.scale == 1 and self.offset == 0
        if self.type not in NUMERIC_TYPES and not identity:
            raise CodecError(f"{self.type} takes no scale or offset")
        if self.type == "bits":
            names = [n for n, _ in self.bits]
            indices = [i for _, i in self.bits]
            if not self.bits:
                raise CodecError("a bit field needs at least one named bit")
            if len(set(names)) != len(names) or len(set(indices)) != len(indices):
                raise CodecError("bit names and bit indices must each be unique")
            if any(not isinstance(i, int) or isinstance(i, bool) or not 0 <= i <= 15 for i in indices):
                raise CodecError("bit indices must be 0 .. 15")
        elif self.bits:
            raise CodecError(f"only type 'bits' has named bits (not {self.type})")
        object.__setattr__(self, "_identity", identity)
        object.__setattr__(self, "_integral", float(self.scale).is_integer() and float(self.offset).is_integer())
        object.__setattr__(self, "_ndigits", max(_decimals(self.scale), _decimals(self.offset)))
        object.__setattr__(self, "_plain16", identity and self.type in ("u16", "i16") and self.byte_order == "big")

    @property
    def count(self) -> int:
        """Registers (or bits) this value occupies."""
        return WIDTH[self.type]

    @property
    def layout(self) -> str:
        return layout_name(self.word_order, self.byte_order)

    def describe(self) -> str:
        out: str = self.type
        if self.count > 1:
            out += f" {self.layout}"
        if not self._identity:
            out += f" (scale {self.scale:g}, offset {self.offset:g})"
        return out

    def value_range(self) -> tuple[float, float] | None:
        """Smallest and largest encodable value of an integer type after scaling (None otherwise)."""
        if self.type not in INTEGER_TYPES:
            return None
        lo, hi = (r * self.scale + self.offset for r in raw_range(self.type))
        return (min(lo, hi), max(lo, hi))


# --- words <-> bytes ---------------------------------------------------------------------------------

def _swap16(word: int) -> int:
    return ((word & 0xFF) << 8) | (word >> 8)


def _check_words(registers: Sequence[int], count: int) -> list[int]:
    try:
        words = list(registers)
    except TypeError as exc:
        raise CodecError(f"registers must be a sequence of ints, not {type(registers).__name__}") from exc
    if len(words) != count:
        raise CodecError(f"expected {count} register{'s' if count != 1 else ''}, got {len(words)}")
    for w in words:
        if not isinstance(w, int):
            raise CodecError(f"register values must be ints, not {type(w).__name__}")
        if not 0 <= w <= 0xFFFF:
            raise CodecError(f"register value {w} is outside 0 .. 65535")
    return words


def _words_to_bytes(words: list[int], spec: ValueSpec) -> bytes:
    """Registers as read -> the value's bytes, most significant first."""
    ordered = words[::-1] if spec.word_order == "little" else words
    if spec.byte_order == "little":
        ordered = [_swap16(w) for w in ordered]
    return b"".join(w.to_bytes(2, "big") for w in ordered)


def _bytes_to_words(data: bytes, spec: ValueSpec) -> list[int]:
    """The value's bytes, most significant first -> registers to write."""
    words = [int.from_bytes(data[i:i + 2], "big") for i in range(0, len(data), 2)]
    if spec.byte_order == "little":
        words = [_swap16(w) for w in words]
    return words[::-1] if spec.word_order == "little" else words


# --- decode -----------------------------------------------------------------------------------------

def decode(registers: Sequence[int], spec: ValueSpec) -> Value:
    """Words as read from the device -> the value. Raises only :class:`CodecError`."""
    if spec._plain16 and type(registers) in (list, tuple) and len(registers) == 1:
        # The commonest register by far (one u16/i16 word, no scale, big-endian): skip the bytes round trip.
        w = registers[0]
        if type(w) is int and 0 <= w <= 0xFFFF:
            return w - 0x10000 if spec.type == "i16" and w >= 0x8000 else w
    words = _check_words(registers, spec.count)
    if spec.type == "bool":
        return words[0] != 0
    if spec.type == "bits":
        raw = _swap16(words[0]) if spec.byte_order == "little" else words[0]
        return {name: bool((raw >> index) & 1) for name, index in spec.bits}
    data = _words_to_bytes(words, spec)
    if spec.type in FLOAT_TYPES:
        fraw: float = struct.unpack(_FLOAT_FORMAT[spec.type], data)[0]
        return fraw if spec._identity else fraw * spec.scale + spec.offset
    raw = int.from_bytes(data, "big", signed=spec.type in _SIGNED)
    if spec._identity:
        return raw
    if spec._integral:
        return raw * int(spec.scale) + int(spec.offset)
    return round(raw * spec.scale + spec.offset, spec._ndigits)


# --- encode -----------------------------------------------------------------------------------------

def _as_flag(value: object, what: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise CodecError(f"{what} must be true or false (got {value!r})")


def _out_of_range(value: float, spec: ValueSpec) -> CodecError:
    bounds = spec.value_range()
    shown = f"{bounds[0]:g} .. {bounds[1]:g}" if bounds else "its range"
    return CodecError(f"{value!r} does not fit {spec.describe()}: allowed {shown}")


def encode(value: Value, spec: ValueSpec) -> list[int]:
    """The value -> words to write. Raises only :class:`CodecError` (wrong type, out of range, NaN)."""
    if spec.type == "bool":
        return [1 if _as_flag(value, "a bool value") else 0]
    if spec.type == "bits":
        if not isinstance(value, Mapping):
            raise CodecError(f"a bit field takes a mapping of bit names to true/false (got {type(value).__name__})")
        index = dict(spec.bits)
        raw = 0
        for name, flag in value.items():
            if name not in index:
                raise CodecError(f"unknown bit {name!r} (known: {', '.join(index)})")
            if _as_flag(flag, f"bit {name!r}"):
                raw |= 1 << index[name]
        return [_swap16(raw) if spec.byte_order == "little" else raw]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise CodecError(f"{spec.type} takes a number (got {type(value).__name__} {value!r})")
    if isinstance(value, float) and not math.isfinite(value):
        raise CodecError(f"refusing to write a non-finite value ({value!r})")
    if spec.type in FLOAT_TYPES:
        try:
            fraw = float(value) if spec._identity else (value - spec.offset) / spec.scale
            if not math.isfinite(fraw):
                raise _out_of_range(value, spec)
            data = struct.pack(_FLOAT_FORMAT[spec.type], fraw)
        except OverflowError as exc:  # too large for binary32 (or an int too large for any float)
            raise CodecError(f"{value!r} is too large for {spec.describe()}") from exc
        return _bytes_to_words(data, spec)
    # Integer types: exact rational arithmetic, so huge ints and decimal scales round predictably.
    raw = round((Fraction(value) - _exact(spec.offset)) / _exact(spec.scale))
    lo, hi = raw_range(spec.type)
    if not lo <= raw <= hi:
        raise _out_of_range(value, spec)
    data = raw.to_bytes(2 * spec.count, "big", signed=spec.type in _SIGNED)
    return _bytes_to_words(data, spec)
