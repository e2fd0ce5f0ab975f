"""rpc.py: framing at any split, the 16 MiB cap (exactly, and with the msgid of the refused request), undecodable
input, the shapes a request may take, and parameter checks whose messages name the field."""

from __future__ import annotations

import math

import msgpack
import pytest

from ds4c.protocol import MAX_MESSAGE_BYTES
from ds4d.rpc import (Bool, Decoder, Fields, Int, ListOf, Num, RpcError, Str, pack_notification, pack_response,
                      parse_request)


def request(msgid, method="hello", **params) -> bytes:
    return msgpack.packb([0, msgid, method, [params]])


def exact(msgid: int, size: int) -> bytes:
    """A request of exactly `size` bytes (a str argument padded to fit)."""
    base = len(request(msgid, text=""))
    for header in (1, 2, 3, 5):                 # fixstr / str8 / str16 / str32 headers grow the message
        m = request(msgid, text="x" * (size - base - header + 1))
        if len(m) == size:
            return m
    raise AssertionError(size)


def test_messages_decode_the_same_at_every_split():
    stream = request(1, protocol="1.0") + request(2, "generate", prompt="héllo ✓", max_tokens=3) + request(3)
    whole, err = Decoder().feed(stream)
    assert err is None and [m[1] for m in whole] == [1, 2, 3]
    for cut in range(1, len(stream)):
        d = Decoder()
        a, e1 = d.feed(stream[:cut])
        b, e2 = d.feed(stream[cut:])
        assert e1 is None and e2 is None and a + b == whole
    d = Decoder()
    assert [m for i in range(len(stream)) for m in d.feed(stream[i:i + 1])[0]] == whole


@pytest.mark.parametrize("piecewise", [False, True])
def test_the_cap_is_exact_and_the_refusal_carries_the_msgid(piecewise):
    cap = 1000
    for size, ok in ((cap, True), (cap + 1, False)):
        data = request(7) + exact(42, size)
        d = Decoder(max_bytes=cap)
        if piecewise:
            results = [d.feed(data[i:i + 97]) for i in range(0, len(data), 97)]
            msgs = [m for r, _ in results for m in r]
            errors = [e for _, e in results if e is not None]
        else:
            msgs, e = d.feed(data)
            errors = [e] if e else []
        assert msgs[0][1] == 7                                    # the message before always counts
        if ok:
            assert not errors and msgs[1][1] == 42
        else:
            assert len(msgs) == 1 and errors[0].code == "too_large" and errors[0].msgid == 42


def test_the_protocol_cap_is_16_mib():
    assert Decoder().feed(exact(1, MAX_MESSAGE_BYTES))[0][0][1] == 1
    msgs, err = Decoder().feed(exact(2, MAX_MESSAGE_BYTES + 1))
    assert msgs == [] and err.code == "too_large" and err.msgid == 2


def test_a_header_announcing_too_many_elements_is_too_large():
    msgs, err = Decoder(max_bytes=1000).feed(request(1) + b"\xdd\xff\xff\xff\xff")     # array32 of 4G elements
    assert [m[1] for m in msgs] == [1] and err.code == "too_large"


@pytest.mark.parametrize("bad", [b"\xc1", b"\xa2\xff\xfe", b"\x81\x91\x01\x02", b"\x91" * 5000])
def test_undecodable_bytes_end_the_stream_without_a_reply(bad):
    # never-used byte, invalid UTF-8, an array as a map key, nesting deeper than msgpack allows
    msgs, err = Decoder().feed(request(1) + bad)
    assert [m[1] for m in msgs] == [1] and err is not None and err.code is None


@pytest.mark.parametrize("msg, msgid, start", [
    ({"a": 1}, None, "a request is an array"),
    ([], None, "a request is an array"),
    ([True, 1, "hello", [{}]], None, "a request is an array"),
    ([2, "stream", [{}]], None, "only requests"),
    ([1, 5, None, {}], None, "only requests"),
    ([0, 5, "hello"], 5, "a request is an array of 4"),
    ([0, -1, "hello", [{}]], None, "msgid:"),
    ([0, 2**32, "hello", [{}]], None, "msgid:"),
    ([0, True, "hello", [{}]], None, "msgid:"),
    ([0, 5, 7, [{}]], 5, "method:"),
    ([0, 5, "hello", {}], 5, "params:"),
    ([0, 5, "hello", [{}, {}]], 5, "params:"),
    ([0, 5, "hello", [{1: 2}]], 5, "params:"),
])
def test_invalid_requests(msg, msgid, start):
    with pytest.raises(RpcError) as e:
        parse_request(msg)
    assert e.value.code == "bad_request" and e.value.msgid == msgid and e.value.message.startswith(start)


def test_valid_requests():
    r = parse_request([0, 2**32 - 1, "generate", [{"prompt": "x"}]])
    assert (r.msgid, r.method, r.params) == (2**32 - 1, "generate", {"prompt": "x"})
    assert parse_request([0, 0, "status", []]).params == {}         # what Neovim sends for no arguments


def test_packing():
    assert msgpack.unpackb(pack_response(3, None, {"a": 1})) == [1, 3, None, {"a": 1}]
    assert msgpack.unpackb(pack_notification("stream", {"id": 3})) == [2, "stream", [{"id": 3}]]


SCHEMA = Fields({"name": Str(required=True), "mode": Str("a", "b"), "n": Int(1, 10), "x": Num(), "on": Bool(),
                 "items": ListOf(Fields({"path": Str(required=True)})), "free": Fields(extra=True)})


@pytest.mark.parametrize("params, message", [
    ({}, "name: required"),
    ({"name": 3}, "name: must be a string"),
    ({"name": "n", "mode": "c"}, "mode: must be one of 'a', 'b', not 'c'"),
    ({"name": "n", "n": 0}, "n: must be in [1, 10], not 0"),
    ({"name": "n", "n": True}, "n: must be an integer"),
    ({"name": "n", "n": 2.0}, "n: must be an integer"),
    ({"name": "n", "x": math.nan}, "x: must be a finite number"),
    ({"name": "n", "x": "1"}, "x: must be a finite number"),
    ({"name": "n", "on": 1}, "on: must be true or false"),
    ({"name": "n", "items": {}}, "items: must be an array"),
    ({"name": "n", "items": [{"path": "a"}, {}]}, "items[1].path: required"),
    ({"name": "n", "items": [{"path": "a", "mode": 1}]}, "items[0].mode: unknown field"),
    ({"name": "n", "nmae": 1}, "nmae: unknown field"),
    ({"name": "n", "free": 3}, "free: must be a map"),
])
def test_parameter_errors_name_the_field(params, message):
    with pytest.raises(RpcError) as e:
        SCHEMA.check(params)
    assert e.value.code == "bad_request" and e.value.message == message


def test_parameters_that_pass():
    p = {"name": "n", "mode": None, "n": 10, "x": 1, "on": False, "items": [{"path": "p"}], "free": {"k": [1]}}
    assert SCHEMA.check(p) == {"name": "n", "n": 10, "x": 1, "on": False, "items": [{"path": "p"}],
                               "free": {"k": [1]}}                 # nil is "not given"
