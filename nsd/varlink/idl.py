"""Varlink interface definition (IDL) parser: the one entry for interfaces.

The grammar and the rules follow systemd's parser (sd-varlink-idl.c), because
``varlinkctl`` and systemd's own clients are the strictest consumers our
interfaces meet:

* a field type is ``[?][[] | [string]](bool|int|float|string|object|Name|(...))``:
  at most one ``?`` and one container, so ``[][]string``, ``[]?string`` and
  ``?[]?x`` are refused (nest a named struct instead);
* type, method and error names start with an upper-case letter and are
  alphanumerical; ``type X ()`` is refused as ambiguous (enum or struct?);
* ``#`` comments are allowed only before the interface, before a symbol and
  before a field or enum member (after ``(`` or ``,``), never after a field.

``strict=True`` (the default) adds nsd's house rules on top: every interface,
type, method, error, field and enum member carries a preceding ``#`` comment,
field names are lowerCamelCase, and trailing commas are refused (systemd
accepts them, other parsers do not).

The parsed form lives in nsd.varlink.idl_model and the JSON validator in
nsd.varlink.validator; both are re-exported here (``__all__``), so callers
write ``idl.parse(text)`` and ``idl.InterfaceValidator(iface)`` alike.
"""

from __future__ import annotations

import re
from typing import Final, Literal

from nsd.varlink.idl_model import (
    Enum,
    EnumMember,
    ErrorDef,
    Field,
    FieldType,
    Interface,
    Method,
    Struct,
    TypeDef,
)
from nsd.varlink.validator import InterfaceValidator

__all__ = [
    "Enum",
    "EnumMember",
    "ErrorDef",
    "Field",
    "FieldType",
    "IdlError",
    "Interface",
    "InterfaceValidator",
    "Method",
    "Struct",
    "TypeDef",
    "parse",
]

BASE_TYPES: Final = frozenset({"bool", "int", "float", "string", "object"})
MAX_NESTING: Final = 64  # systemd's DEPTH_MAX for anonymous structs in the IDL

_WHITESPACE = " \t\r\n"
_IDENT_RE = re.compile(r"[A-Za-z0-9_]+")
_KEYWORD_RE = re.compile(r"[a-z]+")
_IFACE_TOKEN_RE = re.compile(r"[A-Za-z0-9.\-]+")
_SYMBOL_RE = re.compile(r"[A-Z][A-Za-z0-9]*\Z")
_CAMEL_RE = re.compile(r"[a-z][A-Za-z0-9]*\Z")
# systemd: a letter, then letters, digits and single (not trailing) underscores.
_SYSTEMD_FIELD_RE = re.compile(r"[A-Za-z](?:_?[A-Za-z0-9])*\Z")
# systemd: labels of letters, digits and single inner dashes, first char a letter.
# We also require two labels at least, as varlink.org and the PyPI client do.
_LABEL = r"[A-Za-z0-9]+(?:-[A-Za-z0-9]+)*"
_IFACE_RE = re.compile(rf"[A-Za-z][A-Za-z0-9]*(?:-[A-Za-z0-9]+)*(?:\.{_LABEL})+\Z")


def is_interface_name(name: str) -> bool:
    return _IFACE_RE.match(name) is not None


def is_symbol_name(name: str) -> bool:
    return _SYMBOL_RE.match(name) is not None and name not in BASE_TYPES


def is_qualified_name(name: str) -> bool:
    """True for ``interface.Symbol``, e.g. a method or error name on the wire."""
    iface, dot, symbol = name.rpartition(".")
    return bool(dot) and is_symbol_name(symbol) and is_interface_name(iface)


class IdlError(ValueError):
    """The interface text breaks the grammar or a rule; carries the position."""

    def __init__(self, message: str, line: int, column: int) -> None:
        super().__init__(f"{line}:{column}: {message}")
        self.message = message
        self.line = line
        self.column = column


# --------------------------------------------------------------------------- parser


class _Parser:
    def __init__(self, text: str, strict: bool) -> None:
        self.text = text
        self.pos = 0
        self.strict = strict
        # Named types used by fields, resolved once the whole file is read.
        self.references: list[tuple[str, int]] = []

    # -- low level ---------------------------------------------------------

    def fail(self, message: str, pos: int | None = None) -> IdlError:
        at = self.pos if pos is None else pos
        line = self.text.count("\n", 0, at) + 1
        column = at - (self.text.rfind("\n", 0, at) + 1) + 1
        return IdlError(message, line, column)

    def skip_ws(self) -> str:
        """Skips whitespace; returns the next character ('' at the end)."""
        text, pos, n = self.text, self.pos, len(self.text)
        while pos < n and text[pos] in _WHITESPACE:
            pos += 1
        self.pos = pos
        return text[pos] if pos < n else ""

    def comment(self) -> str:
        """Reads a ``#`` comment up to the end of the line, minus one leading space."""
        if not self.text.startswith("#", self.pos):
            raise self.fail("expected a '#' comment")
        end = self.text.find("\n", self.pos)
        if end < 0:
            end = len(self.text)
        body = self.text[self.pos + 1 : end]
        self.pos = end
        return body[1:] if body.startswith(" ") else body

    def token(self, pattern: re.Pattern[str], what: str) -> str:
        m = pattern.match(self.text, self.pos)
        if m is None:
            found = self.text[self.pos : self.pos + 1] or "end of file"
            raise self.fail(f"expected {what}, found {found!r}")
        self.pos = m.end()
        return m.group(0)

    def expect(self, char: str) -> None:
        if self.skip_ws() != char:
            found = self.text[self.pos : self.pos + 1] or "end of file"
            raise self.fail(f"expected {char!r}, found {found!r}")
        self.pos += 1

    # -- grammar -----------------------------------------------------------

    def parse(self) -> Interface:
        name, doc = self.header()
        self.types: dict[str, TypeDef] = {}
        self.methods: dict[str, Method] = {}
        self.errors: dict[str, ErrorDef] = {}
        self.seen: set[str] = set()
        docs: list[str] = []
        while (c := self.skip_ws()) != "":
            if c == "#":
                docs.append(self.comment())
            else:
                self.symbol(docs)
                docs = []
        for ref, pos in self.references:
            if ref not in self.types:
                what = "a method or an error, not a type" if ref in self.seen else "not defined"
                raise self.fail(f"type {ref!r} is {what}", pos)
        return Interface(name, doc, self.text, self.types, self.methods, self.errors)

    def header(self) -> tuple[str, str]:
        """Reads the comments and the ``interface`` line; returns the name and the doc."""
        docs: list[str] = []
        while self.skip_ws() == "#":
            docs.append(self.comment())
        start = self.pos
        if self.skip_ws() == "" or self.token(_KEYWORD_RE, "'interface'") != "interface":
            raise self.fail("expected 'interface'", start)
        if self.strict and not docs:
            raise self.fail("the interface is not documented (add '# ...' lines before it)", start)
        self.skip_ws()
        name_pos = self.pos
        name = self.token(_IFACE_TOKEN_RE, "an interface name")
        if not is_interface_name(name):
            raise self.fail(
                f"invalid interface name {name!r} (expected e.g. 'io.example.Foo')", name_pos
            )
        return name, "\n".join(docs)

    def symbol(self, docs: list[str]) -> None:
        """Reads one ``type``, ``method`` or ``error`` definition."""
        kw_pos = self.pos
        keyword = self.token(_KEYWORD_RE, "'type', 'method', 'error' or a comment")
        if keyword not in ("type", "method", "error"):
            raise self.fail(f"unexpected keyword {keyword!r}", kw_pos)
        self.skip_ws()
        sym_pos = self.pos
        sym = self.token(_IDENT_RE, f"a {keyword} name")
        if not is_symbol_name(sym):
            raise self.fail(
                f"invalid {keyword} name {sym!r}: must start with an upper-case letter "
                "and contain only letters and digits",
                sym_pos,
            )
        if sym in self.seen:
            raise self.fail(f"{sym!r} is defined twice", sym_pos)
        self.seen.add(sym)
        if self.strict and not docs:
            raise self.fail(
                f"{keyword} {sym!r} is not documented (add a '# ...' line before it)", kw_pos
            )
        doc = "\n".join(docs)
        where = f"{keyword} {sym!r}"
        if keyword == "type":
            self.types[sym] = TypeDef(sym, doc, self.members(where, "either", 0))
        elif keyword == "method":
            inp = self.struct(where)
            self.skip_ws()
            if not self.text.startswith("->", self.pos):
                raise self.fail(f"expected '->' after the input of {where}")
            self.pos += 2
            self.methods[sym] = Method(sym, doc, inp, self.struct(where))
        else:
            self.errors[sym] = ErrorDef(sym, doc, self.struct(where))

    def struct(self, where: str) -> Struct:
        result = self.members(where, "struct", 0)
        if not isinstance(result, Struct):  # members() of kind "struct" returns one
            raise self.fail(f"expected a struct in {where}")
        return result

    def members(self, where: str, kind: Literal["struct", "either"], depth: int) -> Struct | Enum:
        """Parses ``( ... )``: struct fields or, for ``type`` and anonymous types, enum members."""
        if depth > MAX_NESTING:
            raise self.fail(f"anonymous types nested deeper than {MAX_NESTING} levels")
        self.expect("(")
        open_pos = self.pos - 1
        fields: list[Field] = []
        members: list[EnumMember] = []
        names: set[str] = set()
        docs: list[str] = []
        after_comma = False
        while True:
            c = self.skip_ws()
            if c == "#":
                docs.append(self.comment())
                continue
            if c == ")":
                if after_comma and self.strict:
                    raise self.fail(f"trailing comma in {where}")
                self.pos += 1
                break
            name_pos = self.pos
            name, ftype = self.member(
                where, kind, depth, is_enum=bool(members), is_struct=bool(fields)
            )
            self.check_new_member(name, ftype, where=where, pos=name_pos, names=names, docs=docs)
            if ftype is None:
                members.append(EnumMember(name, "\n".join(docs)))
            else:
                fields.append(Field(name, ftype, "\n".join(docs)))
            docs = []
            c = self.skip_ws()
            after_comma = c == ","
            if after_comma:
                self.pos += 1
            elif c != ")":
                # A comment may not follow a field on its line (systemd refuses it too).
                raise self.fail(f"expected ',' or ')' after {name!r} in {where}")
        if members:
            return Enum(tuple(members))
        if not fields and kind == "either":
            raise self.fail(f"empty '()' in {where} is ambiguous (enum or struct?)", open_pos)
        return Struct(tuple(fields))

    def check_new_member(
        self,
        name: str,
        ftype: FieldType | None,
        *,
        where: str,
        pos: int,
        names: set[str],
        docs: list[str],
    ) -> None:
        entry = "enum member" if ftype is None else "field"
        if name in names:
            raise self.fail(f"{entry} {name!r} is defined twice in {where}", pos)
        names.add(name)
        if self.strict and not docs:
            raise self.fail(
                f"{entry} {name!r} of {where} is not documented (add a '# ...' line before it)",
                pos,
            )

    def member(
        self, where: str, kind: str, depth: int, *, is_enum: bool, is_struct: bool
    ) -> tuple[str, FieldType | None]:
        """Reads ``name: type`` (a field) or ``name`` (an enum member, type None)."""
        name_pos = self.pos
        name = self.token(_IDENT_RE, f"a field name or ')' in {where}")
        nxt = self.skip_ws()
        if nxt == ":":
            if is_enum:
                raise self.fail(f"{where} mixes enum members and struct fields", name_pos)
            self.check_member_name(name, "field", where, name_pos)
            self.pos += 1
            self.skip_ws()
            return name, self.field_type(f"field {name!r} of {where}", depth)
        if nxt in (",", ")"):
            if kind == "struct":
                raise self.fail(f"expected ':' and a type after field {name!r} of {where}")
            if is_struct:
                raise self.fail(f"{where} mixes enum members and struct fields", name_pos)
            self.check_member_name(name, "enum member", where, name_pos)
            return name, None
        raise self.fail(f"expected ':' after {name!r} in {where}")

    def check_member_name(self, name: str, entry: str, where: str, pos: int) -> None:
        if entry == "field" and self.strict:
            if _CAMEL_RE.match(name) is None:
                raise self.fail(
                    f"field name {name!r} of {where} is not lowerCamelCase "
                    "(a lower-case letter, then letters and digits)",
                    pos,
                )
        elif _SYSTEMD_FIELD_RE.match(name) is None:
            raise self.fail(
                f"invalid {entry} name {name!r} in {where}: must start with a letter, "
                "then letters, digits and single underscores",
                pos,
            )

    def field_type(self, where: str, depth: int) -> FieldType:
        # No whitespace inside a type expression, exactly as systemd parses it.
        text = self.text
        nullable = text.startswith("?", self.pos)
        if nullable:
            self.pos += 1
            if text.startswith("?", self.pos):
                raise self.fail(f"'??' in {where}: a type is optional at most once")
        container: Literal["", "array", "map"] = ""
        if text.startswith("[]", self.pos):
            container = "array"
            self.pos += 2
        elif text.startswith("[string]", self.pos):
            container = "map"
            self.pos += 8
        elif text.startswith("[", self.pos):
            raise self.fail(f"invalid container in {where}: only '[]' and '[string]' exist")
        if container:
            if text.startswith("[", self.pos):
                raise self.fail(
                    f"nested container in {where}: '[][]T' and '[string][]T' are not allowed, "
                    "wrap the inner one in a named type"
                )
            if text.startswith("?", self.pos):
                raise self.fail(
                    f"optional element in {where}: '[]?T' is not allowed, elements cannot be null"
                )
        if text.startswith("(", self.pos):
            inner = self.members(where, "either", depth + 1)
            if isinstance(inner, Struct):
                return FieldType("struct", nullable, container, struct=inner)
            return FieldType("enum", nullable, container, enum=inner)
        pos = self.pos
        word = self.token(_IDENT_RE, f"a type in {where}")
        if word in BASE_TYPES:
            return FieldType(word, nullable, container)  # type: ignore[arg-type]
        if not is_symbol_name(word):
            raise self.fail(f"unknown type {word!r} in {where}", pos)
        self.references.append((word, pos))
        return FieldType("named", nullable, container, name=word)


def parse(text: str, *, strict: bool = True) -> Interface:
    """Parses an interface definition; raises :class:`IdlError` with line:column."""
    return _Parser(text, strict).parse()
