"""The parsed form of a varlink interface: what nsd.varlink.idl produces.

Plain frozen data: the parser (nsd.varlink.idl) builds it, the validator
(nsd.varlink.validator) compiles checks from it, the server and apidoc read it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class FieldType:
    """The type of one field: a base type, a named type or an anonymous one."""

    kind: Literal["bool", "int", "float", "string", "object", "named", "struct", "enum"]
    nullable: bool = False
    container: Literal["", "array", "map"] = ""
    name: str = ""  # for kind == "named"
    struct: Struct | None = None  # for kind == "struct" (anonymous)
    enum: Enum | None = None  # for kind == "enum" (anonymous)

    def __str__(self) -> str:
        prefix = ("?" if self.nullable else "") + {"": "", "array": "[]", "map": "[string]"}[
            self.container
        ]
        if self.kind == "named":
            return prefix + self.name
        if self.struct is not None:
            return prefix + "(" + ", ".join(f"{f.name}: {f.type}" for f in self.struct.fields) + ")"
        if self.enum is not None:
            return prefix + "(" + ", ".join(m.name for m in self.enum.members) + ")"
        return prefix + self.kind


@dataclass(frozen=True)
class Field:
    name: str
    type: FieldType
    doc: str


@dataclass(frozen=True)
class Struct:
    fields: tuple[Field, ...]

    def field(self, name: str) -> Field | None:
        for f in self.fields:
            if f.name == name:
                return f
        return None


@dataclass(frozen=True)
class EnumMember:
    name: str
    doc: str


@dataclass(frozen=True)
class Enum:
    members: tuple[EnumMember, ...]

    @property
    def names(self) -> frozenset[str]:
        return frozenset(m.name for m in self.members)


@dataclass(frozen=True)
class TypeDef:
    name: str
    doc: str
    definition: Struct | Enum


@dataclass(frozen=True)
class Method:
    name: str
    doc: str
    input: Struct
    output: Struct


@dataclass(frozen=True)
class ErrorDef:
    name: str
    doc: str
    parameters: Struct


@dataclass(frozen=True)
class Interface:
    name: str
    doc: str
    text: str  # the source, served verbatim by GetInterfaceDescription
    types: Mapping[str, TypeDef]
    methods: Mapping[str, Method]
    errors: Mapping[str, ErrorDef]
