"""Message decoding: the nesting check on raw bytes, strict JSON, encoding."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nsd.varlink import wire


def depth(value: Any) -> int:
    if isinstance(value, list):
        return 1 + max((depth(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((depth(v) for v in value.values()), default=0)
    return 0


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4)
    ),
    max_leaves=40,
)


@given(json_values, st.integers(min_value=0, max_value=12))
def test_nesting_check_agrees_with_the_real_depth(value: Any, limit: int) -> None:
    data = json.dumps(value).encode()
    assert wire.nesting_exceeds(data, limit) == (depth(value) > limit)


@given(st.text(alphabet='[]{}"\\ab', max_size=30))
def test_brackets_inside_strings_do_not_count(text: str) -> None:
    data = json.dumps({"s": text}).encode()
    assert not wire.nesting_exceeds(data, 1)


def test_ten_thousand_deep_nesting_is_refused_fast() -> None:
    data = b"[" * 10_000 + b"]" * 10_000
    started = time.perf_counter()
    with pytest.raises(ValueError, match="nested deeper than 32"):
        wire.decode(data, 32)
    assert time.perf_counter() - started < 0.5
    # Unbalanced, as an attacker would send it, is caught the same way.
    with pytest.raises(ValueError, match="nested deeper"):
        wire.decode(b'{"a":' * 10_000, 32)


@pytest.mark.parametrize(
    "data",
    [
        b"{",
        b'{"a": NaN}',
        b'{"a": Infinity}',
        b'{"a": -Infinity}',
        b'{"a": 1e999}',
        b'{"a": "\xff"}',  # not UTF-8
        '{"a": 1}'.encode("utf-16"),  # json.loads(bytes) would accept this
        b'{"a": 1} x',
    ],
)
def test_invalid_json_is_refused(data: bytes) -> None:
    with pytest.raises(ValueError):
        wire.decode(data, 32)


def test_encode_is_compact_ascii_and_nul_terminated() -> None:
    data = wire.encode({"parameters": {"name": "jürgen"}, "continues": True})
    assert data == b'{"parameters":{"name":"j\\u00fcrgen"},"continues":true}\x00'
    with pytest.raises(ValueError):
        wire.encode({"x": float("nan")})
    with pytest.raises(TypeError):
        wire.encode({"x": object()})
