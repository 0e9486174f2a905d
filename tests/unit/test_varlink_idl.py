"""The IDL parser (systemd's rules plus nsd's documentation rules) and the validator."""

from __future__ import annotations

import os
import shutil
import subprocess
from importlib.resources import files
from pathlib import Path
from typing import Any

import pytest
import varlink.scanner  # the PyPI parser, a second opinion

from nsd.varlink import idl
from tests.samples import tenant_record

SHIPPED = ["io.nsd.Tenant", "io.nsd.Daemon", "org.varlink.service"]


def shipped(name: str) -> str:
    return (files("nsd.varlink") / f"{name}.varlink").read_text(encoding="utf-8")


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_interfaces_pass_strict_rules(name: str) -> None:
    iface = idl.parse(shipped(name))
    assert iface.name == name
    assert iface.doc
    assert iface.text == shipped(name)
    for method in iface.methods.values():
        assert method.doc
        assert all(f.doc for f in method.input.fields + method.output.fields)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_interfaces_parse_with_the_pypi_varlink_scanner(name: str) -> None:
    theirs = varlink.scanner.Interface(shipped(name))
    ours = idl.parse(shipped(name))
    methods = {n for n, m in theirs.members.items() if isinstance(m, varlink.scanner._Method)}
    assert methods == set(ours.methods)


def test_tenant_interface_model() -> None:
    iface = idl.parse(shipped("io.nsd.Tenant"))
    tenant = iface.types["Tenant"].definition
    assert isinstance(tenant, idl.Struct)
    inode = tenant.field("namespaceInode")
    assert inode is not None
    assert inode.type == idl.FieldType("int", nullable=True)
    problems = tenant.field("problems")
    assert problems is not None
    assert str(problems.type) == "[]string"
    state = iface.types["TenantState"].definition
    assert isinstance(state, idl.Enum)
    assert state.names == {"creating", "ready", "removing"}
    assert iface.errors["ShuttingDown"].parameters.fields == ()
    assert iface.methods["Remove"].output.fields == ()


# --------------------------------------------------------------------------- grammar

GOOD = """\
# A test interface.
interface org.example.good

#no space after the hash is fine
type Color (
	# Red.
	red,
	# Green.
	green
)

# Blank lines between a comment and its symbol are fine.

type Node (
	# A recursive reference.
	children: []Node,
	# An anonymous enum.
	kind: (
		# One.
		one,
		# Two.
		two
	),
	# An anonymous struct.
	point: ?(
		# X.
		x: float,
		# Y.
		y: float
	),
	# A map.
	labels: [string]string,
	# An optional array.
	tags: ?[]string,
	# An optional map of named types.
	colors: ?[string]Color,
	# Anything.
	extra: object
)

# No input, no output.
method Nothing() -> ()

# Spacing around the arrow and the parentheses is free.
method Spaced (
	# A.
	a : bool
)->(
	# B.
	b: int
)

# No parameters.
error Failed ()
"""


def test_good_interface_parses() -> None:
    iface = idl.parse(GOOD)
    node = iface.types["Node"].definition
    assert isinstance(node, idl.Struct)
    assert [str(f.type) for f in node.fields] == [
        "[]Node",
        "(one, two)",
        "?(x: float, y: float)",
        "[string]string",
        "?[]string",
        "?[string]Color",
        "object",
    ]
    assert iface.types["Color"].doc == "no space after the hash is fine"
    assert iface.methods["Spaced"].input.fields[0].name == "a"


def wrap(body: str, header: str = "# Doc.\ninterface org.example.bad\n") -> str:
    return header + body


# Rules systemd's parser enforces too (varlinkctl validate-idl refuses these).
SYSTEMD_RULES = [
    # Containers nest at most once, and elements cannot be null.
    (wrap("# M.\nmethod M(\n# A.\na: [][]string) -> ()\n"), "nested container"),
    (wrap("# M.\nmethod M(\n# A.\na: [string][]int) -> ()\n"), "nested container"),
    (wrap("# M.\nmethod M(\n# A.\na: []?string) -> ()\n"), "optional element"),
    (wrap("# M.\nmethod M(\n# A.\na: ?[]?string) -> ()\n"), "optional element"),
    (wrap("# M.\nmethod M(\n# A.\na: ??int) -> ()\n"), "optional at most once"),
    (wrap("# M.\nmethod M(\n# A.\na: [int]string) -> ()\n"), "invalid container"),
    # Names.
    (wrap("# M.\nmethod doIt() -> ()\n"), "invalid method name 'doIt'"),
    (wrap("# T.\ntype tenant (\n# A.\na: int)\n"), "invalid type name"),
    (wrap("# E.\nerror no_such ()\n"), "invalid error name"),
    (wrap("# T.\ntype T (\n# A.\n_a)\n"), "invalid enum member name"),
    ("# D.\ninterface org..example\n", "invalid interface name"),
    ("# D.\ninterface org.example-\n", "invalid interface name"),
    ("# D.\ninterface 1org.example\n", "invalid interface name"),
    # Structure.
    (wrap("# M.\nmethod M() -> ()\n# M.\nmethod M() -> ()\n"), "defined twice"),
    (wrap("# M.\nmethod M(\n# A.\na: int,\n# A.\na: int) -> ()\n"), "defined twice"),
    (wrap("# M.\nmethod M(\n# A.\na: Missing) -> ()\n"), "'Missing' is not defined"),
    (wrap("# M.\nmethod M(\n# A.\na: M) -> ()\n"), "a method or an error, not a type"),
    (wrap("# T.\ntype T ()\n"), "ambiguous"),
    (wrap("# T.\ntype T (\n# A.\na,\n# B.\nb: int)\n"), "mixes enum members and struct"),
    (wrap("# T.\ntype T (\n# A.\na: int,\n# B.\nb)\n"), "mixes enum members and struct"),
    (wrap("# M.\nmethod M(\n# A.\na) -> ()\n"), "expected ':' and a type"),
    (wrap("# M.\nmethod M(\n# A.\na: int # trailing\n) -> ()\n"), "expected ',' or ')'"),
    (wrap("# M.\nmethod M() ()\n"), "expected '->'"),
    (wrap("# M.\nmethod M(\n# A.\na: ? int) -> ()\n"), "expected a type"),
    (wrap("# M.\nmethod M(\n# A.\na: integer) -> ()\n"), "unknown type"),
    (wrap("# X.\nstruct X ()\n"), "unexpected keyword 'struct'"),
    (wrap("# M.\nmethod M(\n"), "end of file"),
    ("# Only a comment.\n", "expected 'interface'"),
]

# nsd's house rules on top: documentation, lowerCamelCase, two-label names.
HOUSE_RULES = [
    # Every symbol, field and enum member is documented.
    ("interface org.example.bad\n# M.\nmethod M() -> ()\n", "interface is not documented"),
    (wrap("method M() -> ()\n"), "method 'M' is not documented"),
    (wrap("type T (\n# A.\na: int)\n"), "type 'T' is not documented"),
    (wrap("error E ()\n"), "error 'E' is not documented"),
    (wrap("# M.\nmethod M(a: int) -> ()\n"), "field 'a' of method 'M' is not documented"),
    (wrap("# M.\nmethod M() -> (\n# A.\na: int,\nb: int)\n"), "field 'b'"),
    (wrap("# T.\ntype T (\n# A.\na,\nb)\n"), "enum member 'b'"),
    (wrap("# T.\ntype T (\n# A.\na: (\nx: int))\n"), "field 'x'"),
    (wrap("# M.\nmethod M(\n# A.\nuser_name: string) -> ()\n"), "not lowerCamelCase"),
    (wrap("# M.\nmethod M(\n# A.\nUserName: string) -> ()\n"), "not lowerCamelCase"),
    (wrap("# M.\nmethod M(\n# A.\n1st: string) -> ()\n"), "not lowerCamelCase"),
    ("# D.\ninterface single\n", "invalid interface name"),
    (wrap("# M.\nmethod M(\n# A.\na: int,\n) -> ()\n"), "trailing comma"),
]


@pytest.mark.parametrize(("text", "message"), SYSTEMD_RULES + HOUSE_RULES)
def test_rule_violations_are_refused_with_a_clear_message(text: str, message: str) -> None:
    with pytest.raises(idl.IdlError) as info:
        idl.parse(text)
    assert message in str(info.value)
    assert info.value.line >= 1
    assert info.value.column >= 1


# systemd >= 255 ships varlinkctl; NSD_VARLINKCTL points at one elsewhere.
VARLINKCTL = os.environ.get("NSD_VARLINKCTL") or shutil.which("varlinkctl")
needs_varlinkctl = pytest.mark.skipif(VARLINKCTL is None, reason="varlinkctl missing")


def systemd_accepts(text: str, tmp_path: Path) -> bool:
    assert VARLINKCTL is not None
    path = tmp_path / "test.varlink"
    path.write_text(text)
    result = subprocess.run(
        [VARLINKCTL, "validate-idl", str(path)], check=False, capture_output=True, timeout=10
    )
    return result.returncode == 0


@needs_varlinkctl
@pytest.mark.parametrize("name", SHIPPED)
def test_systemd_accepts_the_shipped_interfaces(name: str, tmp_path: Path) -> None:
    assert systemd_accepts(shipped(name), tmp_path)


@needs_varlinkctl
def test_systemd_accepts_what_we_accept(tmp_path: Path) -> None:
    assert systemd_accepts(GOOD, tmp_path)


@needs_varlinkctl
@pytest.mark.parametrize(("text", "message"), SYSTEMD_RULES)
def test_systemd_refuses_what_we_refuse(text: str, message: str, tmp_path: Path) -> None:
    assert not systemd_accepts(text, tmp_path), message


def test_error_positions_point_at_the_problem() -> None:
    text = wrap("# M.\nmethod M(\n\t# A.\n\ta: [][]string\n) -> ()\n")
    with pytest.raises(idl.IdlError) as info:
        idl.parse(text)
    assert (info.value.line, info.value.column) == (6, 7)
    assert str(info.value).startswith("6:7: ")


def test_non_strict_mode_applies_only_systemds_rules() -> None:
    text = "interface org.example.loose\nmethod M(user_name: string, Other: int,) -> ()\n"
    iface = idl.parse(text, strict=False)
    assert [f.name for f in iface.methods["M"].input.fields] == ["user_name", "Other"]
    with pytest.raises(idl.IdlError, match="nested container"):
        idl.parse("interface org.example.loose\nmethod M(a: [][]int) -> ()\n", strict=False)
    with pytest.raises(idl.IdlError, match="invalid field name"):
        idl.parse("interface org.example.loose\nmethod M(a__b: int) -> ()\n", strict=False)


def test_anonymous_nesting_is_bounded() -> None:
    nested = "x: int"
    for _ in range(idl.MAX_NESTING + 2):
        nested = f"a: ({nested})"
    text = f"interface org.example.deep\nmethod M({nested}) -> ()\n"
    with pytest.raises(idl.IdlError, match="nested deeper"):
        idl.parse(text, strict=False)


def test_name_helpers() -> None:
    assert idl.is_qualified_name("io.nsd.Tenant.Get")
    assert idl.is_qualified_name("org.varlink.service.InvalidParameter")
    assert not idl.is_qualified_name("io.nsd.Tenant.get")
    assert not idl.is_qualified_name("Get")
    assert not idl.is_qualified_name("nsd.Get")  # a one-label interface
    assert idl.is_interface_name("io.systemd-foo.Bar")
    assert not idl.is_interface_name("io.-foo")
    assert not idl.is_symbol_name("string")


# --------------------------------------------------------------------------- validator

DEMO = """\
# Validator test interface.
interface org.example.check

# A level.
type Level (
	# Low.
	low,
	# High.
	high
)

# An item.
type Item (
	# Its name.
	name: string,
	# Its optional count.
	count: ?int
)

# Everything at once.
method All(
	# A bool.
	flag: bool,
	# An int.
	number: int,
	# A float.
	ratio: float,
	# A string.
	text: string,
	# An enum.
	level: Level,
	# A list of structs.
	items: []Item,
	# A map of ints.
	counts: [string]int,
	# Any object.
	extra: ?object,
	# An optional anonymous struct.
	point: ?(
		# X.
		x: float
	)
) -> (
	# The result.
	ok: bool
)

# Failure.
error Broken (
	# Why.
	reason: string
)
"""


@pytest.fixture(scope="module")
def validator() -> idl.InterfaceValidator:
    return idl.InterfaceValidator(idl.parse(DEMO))


def valid_call() -> dict[str, Any]:
    return {
        "flag": True,
        "number": 3,
        "ratio": 0.5,
        "text": "hi",
        "level": "low",
        "items": [{"name": "a"}, {"name": "b", "count": 2}],
        "counts": {"x": 1},
    }


def test_valid_parameters_pass(validator: idl.InterfaceValidator) -> None:
    assert validator.call("All", valid_call()) is None
    call = valid_call() | {"extra": {"any": ["thing"]}, "point": {"x": 1}, "ratio": 2}
    assert validator.call("All", call) is None
    assert validator.call("All", valid_call() | {"extra": None, "point": None}) is None


@pytest.mark.parametrize(
    ("change", "bad"),
    [
        ({"flag": 1}, "flag"),  # an int is not a bool
        ({"number": True}, "number"),  # a bool is not an int
        ({"number": 1.0}, "number"),  # a float is not an int
        ({"number": 2**64}, "number"),  # beyond 64 bits
        ({"number": -(2**63) - 1}, "number"),
        ({"number": "3"}, "number"),
        ({"ratio": False}, "ratio"),
        ({"ratio": "0.5"}, "ratio"),
        ({"ratio": float("nan")}, "ratio"),
        ({"text": 5}, "text"),
        ({"text": "a\x00b"}, "text"),  # NUL would truncate names in C APIs
        ({"level": "medium"}, "level"),  # not a member
        ({"level": 0}, "level"),
        ({"items": {"name": "a"}}, "items"),
        ({"items": [{"name": "a"}, {"name": 1}]}, "items[1].name"),
        ({"items": [{"name": "a"}, None]}, "items[1]"),
        ({"items": [{"name": "a", "count": "x"}]}, "items[0].count"),
        ({"items": [{"name": "a", "colour": "red"}]}, "items[0].colour"),
        ({"counts": {"x": "1"}}, 'counts["x"]'),
        ({"counts": [1]}, "counts"),
        ({"extra": []}, "extra"),
        ({"point": {"x": "1"}}, "point.x"),
        ({"point": {}}, "point.x"),
        ({"unknown": 1}, "unknown"),  # unknown fields are refused
        ({"text": None}, "text"),  # null is missing, and text is not optional
    ],
)
def test_invalid_parameters_name_the_first_offender(
    validator: idl.InterfaceValidator, change: dict[str, Any], bad: str
) -> None:
    assert validator.call("All", valid_call() | change) == bad


def test_missing_required_parameter(validator: idl.InterfaceValidator) -> None:
    call = valid_call()
    del call["level"]
    assert validator.call("All", call) == "level"


def test_non_object_parameters(validator: idl.InterfaceValidator) -> None:
    assert validator.call("All", [1]) == "parameters"
    assert validator.call("All", None) == "parameters"


def test_replies_and_errors(validator: idl.InterfaceValidator) -> None:
    assert validator.reply("All", {"ok": True}) is None
    assert validator.reply("All", {"ok": 1}) == "ok"
    assert validator.reply("All", {}) == "ok"
    assert validator.error("Broken", {"reason": "x"}) is None
    assert validator.error("Broken", {}) == "reason"
    with pytest.raises(KeyError):
        validator.error("Unknown", {})


def test_recursive_named_types() -> None:
    text = (
        "# D.\ninterface org.example.tree\n# N.\ntype Node (\n# C.\nchildren: []Node,\n"
        "# V.\nvalue: int\n)\n# M.\nmethod M(\n# R.\nroot: Node\n) -> ()\n"
    )
    v = idl.InterfaceValidator(idl.parse(text))
    leaf = {"children": [], "value": 1}
    assert v.call("M", {"root": {"children": [leaf, leaf], "value": 0}}) is None
    bad = {
        "children": [leaf, {"children": [{"children": [], "value": "x"}], "value": 2}],
        "value": 0,
    }
    assert v.call("M", {"root": bad}) == "root.children[1].children[0].value"


def test_tenant_reply_validation() -> None:
    v = idl.InterfaceValidator(idl.parse(shipped("io.nsd.Tenant")))
    tenant = tenant_record(createdUSec=1)
    assert v.reply("Get", {"tenant": tenant}) is None
    assert v.reply("Get", {"tenant": tenant | {"state": "gone"}}) == "tenant.state"
    assert v.call("Get", {"name": "alice"}) is None
    assert v.call("Get", {"name": "alice", "uid": 0}) == "uid"
    assert v.call("Remove", {"name": "alice", "force": None}) is None
    assert v.error("UidOutOfRange", {"name": "a", "uid": 1, "minimum": 2, "maximum": 3}) is None
