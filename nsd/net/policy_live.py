"""Reading live rulesets: comparable digests of a table (drift), the transaction that
replaces the live host table while keeping its conntrack counts, and other tables'
policies that would drop what nsd's table accepts."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any

from nsd.net.policy_rules import CTDROPS_SET, FAMILY, TABLE, element_key


def is_stateful(set_name: str) -> bool:
    """A set the kernel fills (conntrack counts, the drops over the limit per tenant):
    its elements are state, not policy."""
    return set_name.startswith("ctcount_") or set_name == CTDROPS_SET


def element_counters(listing: Mapping[str, Any]) -> dict[str, int]:
    """Packets per element of a listed set whose elements carry counters
    (``nft -j list set``: ``{"elem": {"val": "nsd1001", "counter": {"packets": 4, ...}}}``)."""
    out: dict[str, int] = {}
    for item in listing.get("nftables", []):
        body = item.get("set") if isinstance(item, dict) else None
        if not isinstance(body, dict):
            continue
        for e in body.get("elem", []):
            elem = e.get("elem") if isinstance(e, dict) else None
            if not isinstance(elem, dict) or not isinstance(elem.get("val"), str):
                continue
            counter = elem.get("counter")
            packets = counter.get("packets") if isinstance(counter, dict) else None
            if isinstance(packets, int):
                out[elem["val"]] = packets
    return out


def _objects(document: Mapping[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(kind, body) of each table object of a document nsd builds (``add`` commands) or
    of what ``nft -j list table`` returns (bare objects)."""
    for cmd in document.get("nftables", []):
        item = cmd.get("add", cmd) if isinstance(cmd, dict) else None
        if not isinstance(item, dict):
            continue
        for kind in ("chain", "rule", "set", "map"):
            if kind in item:
                yield kind, item[kind]


def summary(document: Mapping[str, Any]) -> dict[str, Any]:
    """A comparable digest of a table: chains with their type, hook, priority and policy;
    each chain's rules (their comments, in order); every set and map with its elements
    (sorted; a stateful set's elements are left out). Works on what nsd loads and on what
    ``nft -j list table`` returns, so drift (a flushed table, a deleted chain, set or
    element, an element added by hand, rules added or removed) shows as a difference.
    Rule expressions are not compared here: libnftables lists them in a normalised form
    that differs from what nsd loads (see ``rules_of`` for how nsd still checks them)."""
    chains: dict[str, list[Any]] = {}
    rules: dict[str, list[str]] = {}
    sets: dict[str, list[str] | None] = {}
    for kind, body in _objects(document):
        if kind == "chain":
            chains[body["name"]] = [
                body.get("type"),
                body.get("hook"),
                body.get("prio"),
                body.get("policy"),
            ]
            rules.setdefault(body["name"], [])
        elif kind == "rule":
            rules.setdefault(body["chain"], []).append(body.get("comment", ""))
        else:
            name = body["name"]
            elems = body.get("elem", [])
            sets[name] = None if is_stateful(name) else sorted(element_key(e) for e in elems)
    return {"chains": chains, "rules": rules, "sets": sets}


def rules_of(document: Mapping[str, Any]) -> str:
    """Every rule of a table, exactly, as one comparable string (handles left out,
    counters zeroed). nsd keeps this of the live table after each full load: later, the
    live rules must still read the same (a rule changed in place is drift too)."""
    out = []
    for kind, body in _objects(document):
        if kind != "rule":
            continue
        rule = {k: v for k, v in body.items() if k != "handle"}
        rule["expr"] = [
            {"counter": None} if isinstance(e, dict) and "counter" in e else e
            for e in body.get("expr", [])
        ]
        out.append(rule)
    return json.dumps(out, sort_keys=True)


def replacement(document: Mapping[str, Any], live: Mapping[str, Any] | None) -> dict[str, Any]:
    """The transaction that replaces the ``live`` table by ``document`` atomically while
    keeping its stateful sets (the conntrack counts of ``ctcount_set``).

    ``document`` (``host_document``) starts with add + delete + add of the table: right
    when there is no live table. Otherwise the table is emptied instead of deleted: flush
    (every rule), delete every set and map but the stateful ones the document declares
    too, delete every chain, then the document's content without those sets. It is one
    transaction: packets see the old or the new ruleset. It fails (NftError) if the live
    table changed since ``live`` was read; the caller then loads ``document`` as is."""
    cmds = list(document["nftables"])
    if live is None:
        return {"nftables": cmds}
    table = {"family": FAMILY, "name": TABLE}
    declared = {body["name"] for kind, body in _objects(document) if kind in ("set", "map")}
    kept: set[str] = set()
    out: list[dict[str, Any]] = [{"add": {"table": dict(table)}}, {"flush": {"table": table}}]
    chains = []
    for kind, body in _objects(live):
        ref = {"family": FAMILY, "table": TABLE, "name": str(body.get("name"))}
        if kind in ("set", "map"):
            if is_stateful(ref["name"]) and ref["name"] in declared:
                kept.add(ref["name"])
            else:
                out.append({"delete": {kind: ref}})
        elif kind == "chain":
            chains.append({"delete": {"chain": ref}})
    out += chains  # after the sets: a map element can name a chain (a verdict)
    for cmd in cmds[3:]:
        add = cmd.get("add", {})
        if any(k in add and add[k]["name"] in kept for k in ("set", "map")):
            continue
        out.append(cmd)
    return {"nftables": out}


def forward_drop_policies(ruleset: Mapping[str, Any], *, own: str = TABLE) -> list[str]:
    """Base chains of *other* tables in the forward and input hooks whose policy is drop
    (ufw, Docker, firewalld): they drop tenant traffic that nsd's table accepts, because
    an accept ends only its own chain. One readable line each."""
    out = []
    for item in ruleset.get("nftables", []):
        c = item.get("chain") if isinstance(item, dict) else None
        if not c or c.get("hook") not in ("forward", "input"):
            continue
        if c.get("family") == FAMILY and c.get("table") == own:
            continue
        if c.get("policy") == "drop":
            what = (
                "forwarded tenant traffic"
                if c["hook"] == "forward"
                else ("tenant connections to host services and DNS")
            )
            out.append(
                f"table {c.get('family')} {c.get('table')} chain {c.get('name')} "
                f"(hook {c['hook']}) has policy drop: {what} is dropped there unless that "
                "table accepts it"
            )
    return out
