# firmware.cbor: RFC 8949 Appendix A vectors, deterministic encoding, hostile input. The
# decoder takes what the message set can carry (no tags, bignums or indefinite lengths):
# the Appendix A items beyond that are refused as bad input, with the offset.
import math

from fwtest import raises

from firmware import cbor
from firmware.cbor import CBORError


def h(text):
    return bytes([int(text[i:i + 2], 16) for i in range(0, len(text), 2)])


_INF = float("inf")

# RFC 8949 Appendix A, items whose preferred serialization we produce: encode and decode.
ROUND_TRIP = (
    ("00", 0), ("01", 1), ("0a", 10), ("17", 23), ("1818", 24), ("1819", 25), ("1864", 100),
    ("1903e8", 1000), ("1a000f4240", 1000000), ("1b000000e8d4a51000", 1000000000000),
    ("1bffffffffffffffff", 18446744073709551615),
    ("3bffffffffffffffff", -18446744073709551616),
    ("20", -1), ("29", -10), ("3863", -100), ("3903e7", -1000),
    ("f90000", 0.0), ("f98000", -0.0), ("f93c00", 1.0), ("fb3ff199999999999a", 1.1),
    ("f93e00", 1.5), ("f97bff", 65504.0), ("fa47c35000", 100000.0),
    ("fa7f7fffff", 3.4028234663852886e+38), ("fb7e37e43c8800759c", 1.0e+300),
    ("f90001", 5.960464477539063e-8), ("f90400", 0.00006103515625), ("f9c400", -4.0),
    ("fbc010666666666666", -4.1), ("f97c00", _INF), ("f9fc00", -_INF),
    ("f4", False), ("f5", True), ("f6", None),
    ("40", b""), ("4401020304", b"\x01\x02\x03\x04"),
    ("60", ""), ("6161", "a"), ("6449455446", "IETF"), ("62225c", "\"\\"), ("62c3bc", "\u00fc"),
    ("63e6b0b4", "\u6c34"), ("64f0908591", "\U00010151"),
    ("80", []), ("83010203", [1, 2, 3]), ("8301820203820405", [1, [2, 3], [4, 5]]),
    ("98190102030405060708090a0b0c0d0e0f101112131415161718181819", list(range(1, 26))),
    ("a0", {}), ("a201020304", {1: 2, 3: 4}), ("a26161016162820203", {"a": 1, "b": [2, 3]}),
    ("826161a161626163", ["a", {"b": "c"}]),
    ("a56161614161626142616361436164614461656145",
     {"a": "A", "b": "B", "c": "C", "d": "D", "e": "E"}),
)

# Appendix A items that decode to a plain value in a form we never produce.
DECODE_ONLY = (
    ("fa7f800000", _INF), ("faff800000", -_INF), ("fb7ff0000000000000", _INF),
    ("fbfff0000000000000", -_INF),
    ("1801", 1), ("190001", 1), ("fa3fc00000", 1.5), ("fb3ff8000000000000", 1.5),  # non-shortest
)

# Appendix A items the codec refuses: (hex, offset of the refused head, words of the error).
REFUSED = (
    ("c249010000000000000000", 0, "unsupported tag"), ("c349010000000000000000", 0, "unsupported tag"),
    ("f7", 0, "unsupported simple value"),
    ("c074323031332d30332d32315432303a30343a30305a", 0, "unsupported tag"),
    ("c11a514b67b0", 0, "unsupported tag"), ("c1fb41d452d9ec200000", 0, "unsupported tag"),
    ("d74401020304", 0, "unsupported tag"), ("d818456449455446", 0, "unsupported tag"),
    ("d82076687474703a2f2f7777772e6578616d706c652e636f6d", 0, "unsupported tag"),
    ("5f42010243030405ff", 0, "indefinite length"), ("7f657374726561646d696e67ff", 0, "indefinite length"),
    ("9fff", 0, "indefinite length"), ("9f018202039f0405ffff", 0, "indefinite length"),
    ("83018202039f0405ff", 5, "indefinite length"), ("83019f0203ff820405", 2, "indefinite length"),
    ("bf61610161629f0203ffff", 0, "indefinite length"), ("826161bf61626163ff", 3, "indefinite length"),
)


def same(a, b):
    """Equal, with NaN == NaN, -0.0 != 0.0 and bool/int/float kept apart."""
    if type(a) is not type(b):
        return False
    if type(a) is float:
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)
    if type(a) is list:
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if type(a) is dict:
        return len(a) == len(b) and all(k in b and same(a[k], b[k]) for k in a)
    return a == b


def test_rfc8949_vectors_encode_exactly():
    for text, value in ROUND_TRIP:
        assert cbor.dumps(value) == h(text), text


def test_rfc8949_vectors_decode():
    for text, value in ROUND_TRIP + DECODE_ONLY:
        assert same(cbor.loads(h(text)), value), text


def test_appendix_a_items_beyond_the_message_set_are_refused_at_their_head():
    for text, offset, words in REFUSED:
        check_error(text, offset, words)


def test_ints_beyond_64_bits_encode_as_bignums_that_the_decoder_refuses():
    for big, text in ((18446744073709551616, "c249010000000000000000"),
                      (-18446744073709551617, "c349010000000000000000")):
        assert cbor.dumps(big) == h(text)
        assert cbor.dumps([1, big]) == h("8201" + text)
        check_error("8201" + text, 2, "unsupported tag")
    assert cbor.dumps(-18446744073709551616) == h("3bffffffffffffffff")


def test_nan_encodes_canonically_and_decodes_in_every_width():
    assert cbor.dumps(float("nan")) == h("f97e00")
    for text in ("f97e00", "fa7fc00000", "fb7ff8000000000000"):
        assert math.isnan(cbor.loads(h(text)))


def test_tuples_bytearrays_and_memoryviews_encode_like_lists_and_bytes():
    assert cbor.dumps((1, 2)) == h("820102")
    assert cbor.dumps(bytearray(b"\x01")) == h("4101")
    assert cbor.dumps(memoryview(b"\x01\x02")[1:]) == h("4102")


def test_map_keys_are_sorted_by_encoded_bytes():
    # RFC 8949 4.2.1: bytewise order of the encoded keys, whatever the dict order.
    value = {"b": 1, 100: 2, "a": 3, -1: 4, 10: 5}
    assert cbor.dumps(value) == h("a5" "0a05" "186402" "2004" "616103" "616201")


def test_float_width_chosen_by_exactness():
    assert cbor.dumps(0.5) == h("f93800")
    assert cbor.dumps(0.1) == h("fb3fb999999999999a")
    assert cbor.dumps(230.25) == h("f95b32")
    assert cbor.dumps(230.2) == h("fb406cc66666666666")
    assert cbor.dumps(1e-7) == h("fb3e7ad7f29abcaf48")
    assert cbor.dumps(65536.0) == h("fa47800000")


def test_decode_from_bytearray_and_memoryview():
    data = bytearray(h("83010203"))
    assert cbor.loads(data) == [1, 2, 3]
    assert cbor.loads(memoryview(data)) == [1, 2, 3]


def test_loads_from_walks_a_cbor_sequence():
    data = h("01") + h("6161") + h("820102")
    items = []
    pos = 0
    while pos < len(data):
        item, pos = cbor.loads_from(data, pos)
        items.append(item)
    assert items == [1, "a", [1, 2]]
    assert pos == len(data)


def check_error(text, offset, words):
    exc = raises(CBORError, cbor.loads, h(text))
    assert isinstance(exc, ValueError)
    assert exc.offset == offset, (text, exc.offset, str(exc))
    assert ("at byte %d" % offset) in str(exc), str(exc)
    assert words in str(exc), (text, str(exc))


def test_structural_errors_name_the_offset():
    check_error("", 0, "unexpected end")
    check_error("0001", 1, "trailing")
    check_error("1901", 0, "truncated argument")
    check_error("1c", 0, "reserved additional information")
    check_error("811c", 1, "reserved additional information")
    check_error("1f", 0, "indefinite length not supported")
    check_error("3f", 0, "indefinite length not supported")
    check_error("df01", 0, "unsupported tag")
    check_error("ff", 0, "unexpected break")
    check_error("81ff", 1, "unexpected break")
    check_error("9f01", 0, "indefinite length not supported")
    check_error("fb3ff0", 0, "truncated float")
    check_error("fa3f", 0, "truncated float")
    check_error("f9", 0, "truncated argument")


def test_unsupported_values_are_errors():
    check_error("f0", 0, "unsupported simple value")     # simple(16)
    check_error("f8ff", 0, "unsupported simple value")   # simple(255)
    check_error("c201", 0, "unsupported tag")
    check_error("8201c0", 2, "unsupported tag")
    check_error("a18001", 1, "unhashable")
    check_error("a1a00001", 1, "unhashable")


def test_declared_lengths_beyond_the_data_fail_before_allocating():
    check_error("5bffffffffffffffff00", 0, "declared length 18446744073709551615 exceeds the 1 bytes left")
    check_error("7a0000000a61", 0, "declared length 10 exceeds the 1 bytes left")
    check_error("9bffffffffffffffff", 0, "array of 18446744073709551615 items exceeds")
    check_error("9a00010000" + "00" * 4, 0, "array of 65536 items exceeds the 4 bytes left")
    check_error("a30102", 0, "map of 3 pairs exceeds")
    check_error("824401", 1, "declared length 4 exceeds")


def test_indefinite_lengths_are_refused_wherever_they_start():
    for text, offset in (("5f6161ff", 0), ("7f4161ff", 0), ("5f41", 0), ("825f4101", 1),
                         ("a1617a9f01ff", 3), ("bf", 0), ("9f", 0)):
        check_error(text, offset, "indefinite length not supported")


def test_invalid_utf8_is_an_error():
    for text in ("6180", "62c328", "63eda080", "62c080", "63e08080", "64f4908080", "64f5808080",
                 "61ff", "62e282", "8162c3ff"):
        assert "invalid UTF-8" in str(raises(CBORError, cbor.loads, h(text))), text
    assert cbor.loads(h("64f48fbfbf")) == "\U0010ffff"
    assert cbor.loads(h("63ed9fbf")) == "\ud7ff"
    assert cbor.loads(h("63616262")) == "abb"


def nested(levels):
    return h("81" * (levels - 1) + "80")


def test_depth_limit_is_sixteen_nested_containers():
    value = cbor.loads(nested(cbor.MAX_DEPTH))
    for _ in range(cbor.MAX_DEPTH - 1):
        value = value[0]
    assert value == []
    check_error("81" * 16 + "80", 16, "nesting deeper than 16")
    check_error("a101" + "81" * 15 + "a0", 17, "nesting deeper")
    check_error("a100" * 16 + "a0", 32, "nesting deeper")
    deep = []
    for _ in range(cbor.MAX_DEPTH):
        deep = [deep]
    raises(CBORError, cbor.dumps, deep)
    assert cbor.dumps(deep[0]) == nested(cbor.MAX_DEPTH)


def test_item_count_is_bounded():
    assert cbor.loads(h("83010203"), 4) == [1, 2, 3]
    exc = raises(CBORError, cbor.loads, h("83010203"), 3)
    assert "allowed number of items" in str(exc)
    assert cbor.loads(h("a201020304"), 5) == {1: 2, 3: 4}
    raises(CBORError, cbor.loads, h("a201020304"), 4)
    many = h("9907ff") + bytes(2047)  # 2047 zeros + the array itself: allowed
    assert len(cbor.loads(many)) == 2047
    raises(CBORError, cbor.loads, h("990800") + bytes(2048))


def test_bad_input_types_raise_cbor_error_only():
    for bad in (None, 5, "text", [1, 2]):
        raises(CBORError, cbor.loads, bad)
    raises(CBORError, cbor.loads_from, b"\x01", 5)
    raises(CBORError, cbor.loads_from, b"\x01", -1)


def test_unencodable_values_raise_cbor_error():
    for bad in (object(), {1, 2}, [1, object()], {"k": object()}, {object(): 1}, cbor):
        raises(CBORError, cbor.dumps, bad)
    cyclic = []
    cyclic.append(cyclic)
    raises(CBORError, cbor.dumps, cyclic)


def test_mutated_vectors_never_raise_anything_else():
    outcomes = 0
    for text, _ in ROUND_TRIP + DECODE_ONLY + tuple((r[0], None) for r in REFUSED):
        good = h(text)
        variants = [good[:i] for i in range(len(good))]
        for i in range(len(good)):
            for flip in (0x01, 0x20, 0x80, 0xFF):
                b = bytearray(good)
                b[i] ^= flip
                variants.append(bytes(b))
        for data in variants:
            try:
                cbor.loads(data)
            except CBORError:
                outcomes += 1
    assert outcomes > 500  # most mutations must be caught (truncations always are)
