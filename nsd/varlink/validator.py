"""Checks JSON values against a parsed varlink interface.

The validator returns the path of the first offending value instead of raising,
because the server turns it into ``org.varlink.service.InvalidParameter``. The
rules follow systemd's JSON handling: 64-bit integers, finite floats, no NUL in
strings, no null elements in arrays and maps.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any, Final

from nsd.varlink.idl_model import Enum, FieldType, Interface, Struct

__all__ = ["INT_MAX", "INT_MIN", "InterfaceValidator"]


INT_MIN: Final = -(2**63)
INT_MAX: Final = 2**64 - 1  # varlink ints are 64-bit; systemd accepts unsigned too


# A check returns None if the value is fine, otherwise the path of the offending
# value relative to the checked one: "" for the value itself, ".field" or "[3]"
# for a part of it. The paths join into e.g. "tenant.resourceLimits[2].soft".
_Check = Callable[[Any], "str | None"]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and INT_MIN <= v <= INT_MAX


def _is_float(v: Any) -> bool:
    # JSON has one number type: an int is a fine float, a bool is not.
    if isinstance(v, bool):
        return False
    if isinstance(v, int):
        return True
    return isinstance(v, float) and math.isfinite(v)


def _is_string(v: Any) -> bool:
    # NUL inside strings is refused like systemd's JSON parser does: names end up
    # in paths and C APIs where an embedded NUL would truncate them.
    return isinstance(v, str) and "\x00" not in v


def _base_check(kind: str) -> _Check:
    test: Callable[[Any], bool] = {
        "bool": lambda v: isinstance(v, bool),
        "int": _is_int,
        "float": _is_float,
        "string": _is_string,
        "object": lambda v: isinstance(v, dict),
    }[kind]
    return lambda v: None if test(v) else ""


class _Compiler:
    """Turns IDL structures into closures once, so each call only runs checks."""

    def __init__(self, iface: Interface) -> None:
        self.iface = iface
        self.named: dict[str, _Check] = {}

    def named_check(self, name: str) -> _Check:
        # Indirect through the table: named types may be recursive.
        table = self.named
        if name not in table:
            table[name] = lambda v: None  # placeholder while compiling recursion
            definition = self.iface.types[name].definition
            table[name] = (
                self.enum(definition) if isinstance(definition, Enum) else self.struct(definition)
            )

        def check_named(v: Any) -> str | None:
            return table[name](v)

        return check_named

    def enum(self, enum: Enum) -> _Check:
        names = enum.names
        return lambda v: None if isinstance(v, str) and v in names else ""

    def element(self, ftype: FieldType) -> _Check:
        if ftype.kind == "named":
            return self.named_check(ftype.name)
        if ftype.struct is not None:
            return self.struct(ftype.struct)
        if ftype.enum is not None:
            return self.enum(ftype.enum)
        return _base_check(ftype.kind)

    def value(self, ftype: FieldType) -> _Check:
        elem = self.element(ftype)
        if ftype.container == "array":

            def check_array(v: Any) -> str | None:
                if not isinstance(v, list | tuple):
                    return ""
                for i, e in enumerate(v):
                    if e is None:
                        return f"[{i}]"
                    bad = elem(e)
                    if bad is not None:
                        return f"[{i}]{bad}"
                return None

            return check_array
        if ftype.container == "map":

            def check_map(v: Any) -> str | None:
                if not isinstance(v, dict):
                    return ""
                for k, e in v.items():
                    if e is None or not isinstance(k, str):
                        return f"[{json.dumps(k)}]"
                    bad = elem(e)
                    if bad is not None:
                        return f"[{json.dumps(k)}]{bad}"
                return None

            return check_map
        return elem

    def struct(self, struct: Struct) -> _Check:
        checks = tuple((f.name, self.value(f.type), f.type.nullable) for f in struct.fields)
        known = frozenset(f.name for f in struct.fields)

        def check_struct(v: Any) -> str | None:
            if not isinstance(v, dict):
                return ""
            if not known.issuperset(v):
                for k in v:
                    if k not in known:
                        return f".{k}"
            for name, check, nullable in checks:
                e = v.get(name)
                if e is None:
                    if nullable:
                        continue
                    return f".{name}"
                bad = check(e)
                if bad is not None:
                    return f".{name}{bad}"
            return None

        return check_struct


def _top(path: str | None) -> str | None:
    if path is None:
        return None
    # A non-object at the top has no field to name; "parameters" is what is wrong.
    return path[1:] if path else "parameters"


class InterfaceValidator:
    """Validates call parameters, replies and error parameters of one interface.

    Each method returns None when the value is valid, or the dotted path of the
    first offending parameter (an unknown field, a missing non-optional one or a
    wrong type), e.g. ``"name"`` or ``"tenant.resourceLimits[2].soft"``.
    """

    def __init__(self, iface: Interface) -> None:
        compiler = _Compiler(iface)
        self.interface = iface
        self._inputs = {n: compiler.struct(m.input) for n, m in iface.methods.items()}
        self._outputs = {n: compiler.struct(m.output) for n, m in iface.methods.items()}
        self._errors = {n: compiler.struct(e.parameters) for n, e in iface.errors.items()}

    def call(self, method: str, parameters: Any) -> str | None:
        return _top(self._inputs[method](parameters))

    def reply(self, method: str, parameters: Any) -> str | None:
        return _top(self._outputs[method](parameters))

    def error(self, error: str, parameters: Any) -> str | None:
        """Validates an error's parameters; KeyError if the interface lacks the error."""
        return _top(self._errors[error](parameters))
