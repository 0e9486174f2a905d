"""Render the API reference (docs/api.md) from the IDL files: the IDL is the contract.

Run ``python -m nsd.varlink.apidoc > docs/api.md``; a unit test fails when the
committed reference and the IDL disagree.
"""

from __future__ import annotations

import sys
from importlib.resources import files

from . import idl

INTERFACES = ("io.nsd.Tenant", "io.nsd.Daemon")


def _fields(struct: idl.Struct) -> list[str]:
    if not struct.fields:
        return ["(none)", ""]
    out = ["| field | type | meaning |", "|---|---|---|"]
    for f in struct.fields:
        doc = " ".join(f.doc.split())
        out.append(f"| `{f.name}` | `{f.type}` | {doc} |")
    out.append("")
    return out


def render_interface(iface: idl.Interface) -> list[str]:
    out = [f"## `{iface.name}`", "", " ".join(iface.doc.split()), ""]
    out += ["### Methods", ""]
    for m in iface.methods.values():
        out += [f"#### `{m.name}`", "", " ".join(m.doc.split()), "", "Parameters:", ""]
        out += _fields(m.input)
        out += ["Reply:", ""]
        out += _fields(m.output)
    if iface.types:
        out += ["### Types", ""]
        for t in iface.types.values():
            out += [f"#### `{t.name}`", "", " ".join(t.doc.split()), ""]
            if isinstance(t.definition, idl.Enum):
                out += ["| value | meaning |", "|---|---|"]
                out += [f"| `{m.name}` | {' '.join(m.doc.split())} |" for m in t.definition.members]
                out.append("")
            else:
                out += _fields(t.definition)
    if iface.errors:
        out += ["### Errors", ""]
        for e in iface.errors.values():
            out += [f"#### `{iface.name}.{e.name}`", "", " ".join(e.doc.split()), ""]
            out += _fields(e.parameters)
    return out


def render() -> str:
    out = [
        "# API reference",
        "",
        "Generated from the IDL files in `nsd/varlink/` by `python -m nsd.varlink.apidoc`;",
        "do not edit by hand. The socket is `/run/nsd/io.nsd.Tenant` (`daemon.socket`).",
        "The protocol is plain varlink (NUL-terminated JSON), so `varlinkctl` and other",
        "varlink clients work, e.g. `varlinkctl introspect /run/nsd/io.nsd.Tenant io.nsd.Tenant`.",
        "",
        "Authorization comes from the peer's kernel credentials. Root and members of",
        "`daemon.admin_group` may call everything. A tenant may call, for itself only, `Get`,",
        "`Watch` and `GetUsage` (with its own `name`), `GetLimits`, `GetNetwork` and `Run`;",
        "everything else, and every call about another tenant, is answered with",
        "`org.varlink.service.PermissionDenied`.",
        "Invalid parameters (wrong type, unknown or missing field) are answered with",
        "`org.varlink.service.InvalidParameter` before any handler runs.",
        "",
    ]
    for name in INTERFACES:
        text = files(__package__).joinpath(f"{name}.varlink").read_text(encoding="utf-8")
        out += render_interface(idl.parse(text))
    return "\n".join(out).rstrip() + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
