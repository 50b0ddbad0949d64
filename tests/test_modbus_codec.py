"""Modbus register codec: every type and word/byte order round-trips, known vectors decode as the
manuals say, and nothing but CodecError ever comes out of decode or encode."""

from __future__ import annotations

import contextlib
import math
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeagent.drivers.modbus.codec import (
    FLOAT_TYPES,
    INTEGER_TYPES,
    VALUE_TYPES,
    WIDTH,
    ByteOrder,
    CodecError,
    ValueSpec,
    ValueType,
    WordOrder,
    decode,
    encode,
    layout_name,
    raw_range,
)

Order = tuple[WordOrder, ByteOrder]
ORDERS: list[Order] = [("big", "big"), ("little", "big"), ("big", "little"), ("little", "little")]
INT_TYPES: list[ValueType] = sorted(INTEGER_TYPES)
word = st.integers(0, 0xFFFF)
orders = st.sampled_from(ORDERS)


def spec(t: ValueType, order: Order = ("big", "big"), **kw: Any) -> ValueSpec:
    return ValueSpec(t, order[0], order[1], **kw)


# --- known vectors -----------------------------------------------------------------------------------

@pytest.mark.parametrize(("order", "name", "words"), [
    (("big", "big"), "ABCD", [0x42F6, 0xE979]),
    (("little", "big"), "CDAB", [0xE979, 0x42F6]),
    (("big", "little"), "BADC", [0xF642, 0x79E9]),
    (("little", "little"), "DCBA", [0x79E9, 0xF642]),
])
def test_f32_123_456_in_every_layout(order: Order, name: str, words: list[int]) -> None:
    s = spec("f32", order)
    assert s.layout == name == layout_name(*order)
    assert encode(123.456, s) == words
    assert decode(words, s) == pytest.approx(123.456, rel=1e-7)
    assert decode(words, s) == struct.unpack(">f", struct.pack(">f", 123.456))[0]


@pytest.mark.parametrize(("order", "words"), [
    (("big", "big"), [0x1122, 0x3344]),
    (("little", "big"), [0x3344, 0x1122]),
    (("big", "little"), [0x2211, 0x4433]),
    (("little", "little"), [0x4433, 0x2211]),
])
def test_u32_layout_table_of_the_docstring(order: Order, words: list[int]) -> None:
    assert encode(0x11223344, spec("u32", order)) == words
    assert decode(words, spec("u32", order)) == 0x11223344


def test_64_bit_and_single_register_vectors() -> None:
    assert encode(0x1122334455667788, spec("u64", ("little", "big"))) == [0x7788, 0x5566, 0x3344, 0x1122]
    assert encode(0x1122334455667788, spec("u64")) == [0x1122, 0x3344, 0x5566, 0x7788]
    assert decode([0xFFFF] * 4, spec("i64")) == -1
    assert decode([0xFFFF] * 4, spec("u64")) == 2**64 - 1
    assert encode(1.0, spec("f64")) == [0x3FF0, 0, 0, 0]
    assert decode([0xFFFF], spec("i16")) == -1
    assert decode([0x8000], spec("i16")) == -32768
    assert decode([0xFFFE, 0xFFFF], spec("i32", ("little", "big"))) == -2
    assert encode(0x1234, spec("u16", ("big", "little"))) == [0x3412]
    assert decode([0x3412], spec("u16", ("little", "little"))) == 0x1234


def test_scaling_reads_like_the_manual() -> None:
    assert decode([1234], spec("u16", scale=0.1)) == 123.4  # not 123.40000000000001
    assert encode(123.4, spec("u16", scale=0.1)) == [1234]
    assert decode([0xFF01], spec("i16", scale=0.1)) == -25.5
    assert encode(-25.5, spec("i16", scale=0.1)) == [0xFF01]
    assert decode([0x0001, 0x86A0], spec("u32", scale=0.001)) == 100.0  # 100000 Wh counter in kWh
    assert decode([500], spec("u16", scale=0.1, offset=-40)) == 10.0
    assert encode(10.0, spec("u16", scale=0.1, offset=-40)) == [500]
    tenfold = decode([7], spec("u16", scale=10, offset=3))
    assert tenfold == 73 and isinstance(tenfold, int)
    assert isinstance(decode([7], spec("u16")), int)
    assert decode([0x3F80, 0], spec("f32", scale=2.0, offset=1.0)) == 3.0
    assert encode(3.0, spec("f32", scale=2.0, offset=1.0)) == [0x3F80, 0]
    # Rounds to the nearest step, ties to even.
    assert encode(12.34, spec("u16", scale=0.1)) == [123]
    assert encode(0.25, spec("u16", scale=0.1)) == [2]
    assert encode(2.5, spec("u16")) == [2]
    assert encode(3.5, spec("u16")) == [4]


def test_bits_and_bools() -> None:
    s = spec("bits", bits=(("door", 0), ("fault", 3), ("top", 15)))
    assert decode([0b1001], s) == {"door": True, "fault": True, "top": False}
    assert decode([0x8000], s) == {"door": False, "fault": False, "top": True}
    assert encode({"fault": True}, s) == [0b1000]
    flags: dict[str, Any] = {"door": True, "top": 1}  # 0/1 is accepted for a bit
    assert encode(flags, spec("bits", ("big", "little"), bits=s.bits)) == [0x0180]
    assert decode([0x0180], spec("bits", ("big", "little"), bits=s.bits)) == {"door": True, "fault": False, "top": True}
    b = spec("bool")
    assert decode([0], b) is False and decode([1], b) is True and decode([0xFF00], b) is True
    assert decode([True], b) is True  # pymodbus hands coils over as bools
    assert encode(True, b) == [1] and encode(False, b) == [0] and encode(1, b) == [1]


def test_non_finite_floats_decode_as_they_are() -> None:
    nan = decode([0x7FC0, 0], spec("f32"))
    assert isinstance(nan, float) and math.isnan(nan)
    assert decode([0x7F80, 0], spec("f32")) == math.inf
    assert decode([0xFF80, 0], spec("f32")) == -math.inf


# --- errors ------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("value", "s"), [
    (65536, spec("u16")), (-1, spec("u16")), (32768, spec("i16")), (-32769, spec("i16")),
    (2**32, spec("u32")), (2**63, spec("i64")), (2**64, spec("u64")), (-1, spec("u64")),
    (6553.6, spec("u16", scale=0.1)), (-40.1, spec("u16", scale=0.1, offset=-40)),
    (math.nan, spec("u16")), (math.nan, spec("f32")), (math.inf, spec("f32")), (-math.inf, spec("i32")),
    (1e39, spec("f32")), (10**400, spec("f32")), (10**400, spec("f64")), (1e308, spec("f32", scale=1e-10)),
    ("12", spec("u16")), (True, spec("u16")), (None, spec("f32")), ({"a": True}, spec("u16")), ([1], spec("i16")),
    (2, spec("bool")), ("yes", spec("bool")), (5, spec("bits", bits=(("a", 0),))),
    ({"b": True}, spec("bits", bits=(("a", 0),))), ({"a": "yes"}, spec("bits", bits=(("a", 0),))),
])
def test_unencodable_values_raise_codec_error(value: Any, s: ValueSpec) -> None:
    with pytest.raises(CodecError):
        encode(value, s)


def test_range_message_names_the_limits() -> None:
    with pytest.raises(CodecError, match=r"does not fit u16 \(scale 0.1, offset 0\): allowed 0 .. 6553.5"):
        encode(7000, spec("u16", scale=0.1))
    assert encode(6553.5, spec("u16", scale=0.1)) == [65535]


@pytest.mark.parametrize("words", [[], [1, 2], [70000], [-1], ["x"], [None], [1.5], None, 5, "ab"])
def test_bad_words_raise_codec_error(words: Any) -> None:
    with pytest.raises(CodecError):
        decode(words, spec("u16"))


@pytest.mark.parametrize("kwargs", [
    {"type": "u24"}, {"type": "u16", "scale": 0}, {"type": "u16", "scale": math.nan},
    {"type": "u16", "offset": math.inf}, {"type": "bool", "scale": 2}, {"type": "bits"},
    {"type": "bits", "bits": (("a", 0), ("b", 0))}, {"type": "bits", "bits": (("a", 16),)},
    {"type": "u16", "bits": (("a", 1),)}, {"type": "u16", "word_order": "middle"},
])
def test_bad_specs_raise_codec_error(kwargs: dict[str, Any]) -> None:
    with pytest.raises(CodecError):
        ValueSpec(**kwargs)


def test_raw_range() -> None:
    assert raw_range("u16") == (0, 65535)
    assert raw_range("i32") == (-(2**31), 2**31 - 1)
    with pytest.raises(CodecError):
        raw_range("f32")


# --- properties --------------------------------------------------------------------------------------

@st.composite
def int_value(draw: st.DrawFn) -> tuple[ValueType, int]:
    t = draw(st.sampled_from(INT_TYPES))
    lo, hi = raw_range(t)
    return t, draw(st.integers(lo, hi))


@given(int_value(), orders)
def test_integers_round_trip_in_every_layout(tv: tuple[ValueType, int], order: Order) -> None:
    t, value = tv
    s = spec(t, order)
    words = encode(value, s)
    assert len(words) == WIDTH[t] and all(0 <= w <= 0xFFFF for w in words)
    assert decode(words, s) == value


@given(st.sampled_from([t for t in VALUE_TYPES if t != "bits"]), orders, st.data())
def test_words_round_trip_through_decode_and_encode(t: ValueType, order: Order, data: st.DataObject) -> None:
    s = spec(t, order)
    words = data.draw(st.lists(st.integers(0, 1) if t == "bool" else word, min_size=s.count, max_size=s.count))
    value = decode(words, s)
    if isinstance(value, float) and not math.isfinite(value):
        return  # NaN and inf decode faithfully but are never written
    assert encode(value, s) == words


@given(st.floats(width=32, allow_nan=False, allow_infinity=False), orders)
def test_f32_values_round_trip_exactly(value: float, order: Order) -> None:
    s = spec("f32", order)
    assert decode(encode(value, s), s) == value


@given(st.floats(allow_nan=False, allow_infinity=False), orders)
def test_f64_values_round_trip_exactly(value: float, order: Order) -> None:
    s = spec("f64", order)
    assert decode(encode(value, s), s) == value


@given(st.floats(allow_nan=False, allow_infinity=False), orders)
def test_f32_nearest_or_codec_error(value: float, order: Order) -> None:
    s = spec("f32", order)
    try:
        words = encode(value, s)
    except CodecError:
        assert abs(value) > 3.4e38
        return
    assert decode(words, s) == struct.unpack(">f", struct.pack(">f", value))[0]


SCALES = [0.1, 0.01, 0.001, 0.5, 0.25, 2.0, 10.0, 1.0, 0.2, 1e-5]
OFFSETS = [0.0, -40.0, 273.15, 1.5, 100.0]
SCALED_TYPES: list[ValueType] = ["u16", "i16", "u32", "i32"]


@st.composite
def scaled_case(draw: st.DrawFn) -> tuple[ValueSpec, int]:
    t = draw(st.sampled_from(SCALED_TYPES))
    s = spec(t, draw(orders), scale=draw(st.sampled_from(SCALES)), offset=draw(st.sampled_from(OFFSETS)))
    lo, hi = raw_range(t)
    return s, draw(st.integers(lo, hi))


@given(scaled_case())
def test_scaled_registers_round_trip_exactly(case: tuple[ValueSpec, int]) -> None:
    s, raw = case
    words = encode(raw, spec(s.type, (s.word_order, s.byte_order)))
    value = decode(words, s)
    assert encode(value, s) == words


@given(scaled_case(), st.floats(-1, 1))
def test_scaled_values_round_trip_within_half_a_step(case: tuple[ValueSpec, int], frac: float) -> None:
    s, raw = case
    bounds = s.value_range()
    assert bounds is not None
    lo, hi = bounds
    value = raw * s.scale + s.offset + frac * abs(s.scale) / 2
    if not lo <= value <= hi:
        return
    back = decode(encode(value, s), s)
    assert isinstance(back, int | float)
    assert abs(back - value) <= abs(s.scale) / 2 * (1 + 1e-9) + 1e-9 * abs(value)


@given(st.sampled_from(INT_TYPES), st.integers(), orders)
def test_integers_outside_the_type_raise_codec_error(t: ValueType, value: int, order: Order) -> None:
    lo, hi = raw_range(t)
    s = spec(t, order)
    if lo <= value <= hi:
        assert decode(encode(value, s), s) == value
    else:
        with pytest.raises(CodecError):
            encode(value, s)


@st.composite
def bit_field(draw: st.DrawFn) -> ValueSpec:
    indices = draw(st.lists(st.integers(0, 15), min_size=1, max_size=16, unique=True))
    return spec("bits", draw(orders), bits=tuple((f"b{i}", i) for i in indices))


@given(bit_field(), st.data())
def test_bit_fields_round_trip(s: ValueSpec, data: st.DataObject) -> None:
    names = [n for n, _ in s.bits]
    given_flags = data.draw(st.dictionaries(st.sampled_from(names), st.booleans()))
    expected = {n: given_flags.get(n, False) for n in names}
    assert decode(encode(given_flags, s), s) == expected
    words = encode(expected, s)
    assert encode(decode(words, s), s) == words


@given(st.lists(word, min_size=1, max_size=1), orders)
def test_fully_named_bit_field_keeps_every_word(words: list[int], order: Order) -> None:
    s = spec("bits", order, bits=tuple((f"b{i}", i) for i in range(16)))
    assert encode(decode(words, s), s) == words


anything = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=4) | st.binary(max_size=4),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
    max_leaves=8,
)
any_spec = st.builds(
    lambda t, o, scaled: spec(t, o, bits=(("a", 0), ("b", 9)) if t == "bits" else (),
                              **({"scale": 0.1, "offset": -5.0} if scaled and t not in ("bool", "bits") else {})),
    st.sampled_from(VALUE_TYPES), orders, st.booleans())


@settings(max_examples=300)
@given(anything, any_spec)
def test_decode_raises_nothing_but_codec_error(registers: Any, s: ValueSpec) -> None:
    with contextlib.suppress(CodecError):
        decode(registers, s)


@settings(max_examples=300)
@given(st.lists(st.integers(-(2**20), 2**20) | st.booleans(), max_size=5), any_spec)
def test_decode_of_any_int_list(registers: list[int], s: ValueSpec) -> None:
    ok = len(registers) == s.count and all(0 <= w <= 0xFFFF for w in registers)
    if ok:
        decode(registers, s)
    else:
        with pytest.raises(CodecError):
            decode(registers, s)


@settings(max_examples=300)
@given(anything, any_spec)
def test_encode_gives_words_or_codec_error(value: Any, s: ValueSpec) -> None:
    try:
        words = encode(value, s)
    except CodecError:
        return
    assert len(words) == s.count and all(isinstance(w, int) and 0 <= w <= 0xFFFF for w in words)
    if s.type not in FLOAT_TYPES and s.type != "bits":
        assert decode(words, s) is not None


@settings(max_examples=500)
@given(word, st.sampled_from(["u16", "i16"]), st.sampled_from(["big", "little"]))
def test_single_word_fast_path_matches_the_bytes(w: int, t: ValueType, word_order: WordOrder) -> None:
    """One plain u16/i16 word skips the bytes round trip; it must read exactly as the bytes say."""
    expected = int.from_bytes(w.to_bytes(2, "big"), "big", signed=t == "i16")
    assert decode([w], ValueSpec(t, word_order, "big")) == expected
    assert decode((w,), ValueSpec(t, word_order, "big")) == expected
