"""Encoding and decoding of varlink messages (JSON objects) for the server.

Incoming messages are hostile: their nesting depth is checked on the raw bytes
*before* ``json.loads`` sees them, so ``[[[[...]]]]`` ten thousand deep costs a
byte scan instead of a RecursionError deep in the decoder.
"""

from __future__ import annotations

import json
import math
import re
from array import array
from itertools import accumulate
from typing import Any, Final, NoReturn

# Whole JSON strings (escapes included), so brackets inside them are not counted.
# Possessive quantifiers keep the scan linear on long strings.
_STRING_RE: Final = re.compile(rb'"(?:[^"\\]++|\\.)*+"', re.DOTALL)
# Maps "[" and "{" to +1, "]" and "}" to -1 (0xff as a signed byte), deletes the rest.
_DEPTH_TABLE: Final = bytes(1 if c in b"[{" else 0xFF if c in b"]}" else 0 for c in range(256))
_NOT_BRACKETS: Final = bytes(c for c in range(256) if c not in b"[]{}")


def nesting_exceeds(data: bytes, limit: int) -> bool:
    """True if arrays/objects in ``data`` nest deeper than ``limit``."""
    if data.count(b"[") + data.count(b"{") <= limit:
        return False  # the common case: too few brackets to be that deep
    brackets = _STRING_RE.sub(b"", data).translate(None, _NOT_BRACKETS)
    steps = array("b", brackets.translate(_DEPTH_TABLE))
    return max(accumulate(steps), default=0) > limit


def _reject_constant(name: str) -> NoReturn:
    # Python's json accepts NaN and Infinity; JSON (and every other peer) does not.
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    # "1e999" parses to inf without passing parse_constant; refuse it the same way.
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is out of range")
    return value


_decoder: Final = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite_float)
_encoder: Final = json.JSONEncoder(separators=(",", ":"), allow_nan=False)


def decode(frame: bytes, max_depth: int) -> Any:
    """Decodes one message (without its NUL); ValueError if it is not valid JSON."""
    if nesting_exceeds(frame, max_depth):
        raise ValueError(f"JSON nested deeper than {max_depth} levels")
    # Strict UTF-8 first: json.loads(bytes) would also guess UTF-16 and UTF-32.
    return _decoder.decode(frame.decode("utf-8"))


def encode(message: dict[str, Any]) -> bytes:
    """Encodes one message with its terminating NUL (TypeError/ValueError if not JSON)."""
    return (_encoder.encode(message) + "\0").encode("ascii")
