"""nft JSON building blocks (libnftables' JSON schema, nft 1.0.x) and :class:`Document`,
which accumulates the commands that replace one ``inet nsd`` table.

Every document replaces its table in one transaction (nsd/nft.py): ``add table``,
``delete table``, ``add table`` and the content, so chains and sets that are no longer
derived disappear too, and packets see either the old or the new ruleset, never a mix.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from ipaddress import IPv4Network, IPv6Network
from typing import Any

TABLE = "nsd"
FAMILY = "inet"

#: the host table's dynamic set whose elements (one per tenant veth that had a
#: connection refused by the conntrack limit) each carry a counter of that veth's
#: refused packets: drops are attributed to tenants without a rule or a named counter
#: per tenant, and the elements need no element transaction of nsd's (the kernel adds
#: them; nsd.net.hostnet reads them for the ``conntrack`` fault)
CTDROPS_SET = "ctdrops"

# Chain priorities (nft's named priorities as numbers: valid for every hook in nft 1.0.6)
PRIO_RAW_MANGLE = -150
PRIO_DSTNAT = -100
PRIO_FILTER = 0
PRIO_SRCNAT = 100


def meta(key: str) -> dict[str, Any]:
    return {"meta": {"key": key}}


def payload(protocol: str, field_: str) -> dict[str, Any]:
    return {"payload": {"protocol": protocol, "field": field_}}


def ct(key: str) -> dict[str, Any]:
    return {"ct": {"key": key}}


def match(left: Any, right: Any, op: str = "==") -> dict[str, Any]:
    return {"match": {"op": op, "left": left, "right": right}}


def prefix(net: IPv4Network | IPv6Network) -> Any:
    if net.prefixlen == net.max_prefixlen:
        return str(net.network_address)
    return {"prefix": {"addr": str(net.network_address), "len": net.prefixlen}}


def set_ref(name: str) -> str:
    return "@" + name


def wildcard(prefix: str) -> str:
    # nft's interface-name wildcard: a trailing '*' matches any suffix
    return prefix + "*"


ACCEPT: dict[str, Any] = {"accept": None}
DROP: dict[str, Any] = {"drop": None}
COUNTER: dict[str, Any] = {"counter": None}


def jump(chain: str) -> dict[str, Any]:
    return {"jump": {"target": chain}}


def l4proto(proto: str) -> dict[str, Any]:
    return match(meta("l4proto"), proto)


def dport(port: int) -> dict[str, Any]:
    return match(payload("th", "dport"), port)


class Document:
    """Accumulates one table's commands."""

    def __init__(self, comment: str) -> None:
        self.cmds: list[dict[str, Any]] = []
        # Chains and sets come before every rule: a jump or a set reference must name
        # something that exists at that point of the transaction.
        self.objects: list[dict[str, Any]] = []
        self.rules: list[dict[str, Any]] = []
        table = {"family": FAMILY, "name": TABLE}
        # add + delete + add: replaces the whole table, chains and sets included, in one
        # transaction whether or not it existed before (nft 1.0.6 has no "destroy").
        self.cmds += [
            {"add": {"table": dict(table)}},
            {"delete": {"table": dict(table)}},
            {"add": {"table": dict(table, comment=comment)}},
        ]

    def chain(
        self,
        name: str,
        *,
        type_: str | None = None,
        hook: str | None = None,
        prio: int = 0,
        policy: str = "accept",
    ) -> None:
        chain: dict[str, Any] = {"family": FAMILY, "table": TABLE, "name": name}
        if hook is not None:
            chain.update(type=type_ or "filter", hook=hook, prio=prio, policy=policy)
        self.objects.append({"add": {"chain": chain}})

    def set(
        self,
        name: str,
        type_: str | list[str],
        elements: Iterable[Any],
        *,
        interval: bool = False,
        map_: str | None = None,
        dynamic_size: int | None = None,
        counter: bool = False,
    ) -> None:
        """A named set (a map with ``map_``, the data type). ``dynamic_size``: a set the
        kernel fills from the packet path (``add @set``), holding state of its own.
        ``counter``: every element carries a packet and byte counter of its own."""
        body: dict[str, Any] = {"family": FAMILY, "table": TABLE, "name": name, "type": type_}
        flags = ["interval"] if interval else []
        if dynamic_size is not None:
            # nft 1.0.6's JSON parser knows no "dynamic" flag; the kernel gets it
            # (NFT_SET_EVAL) from nft's evaluation of the ``add @set`` rule.
            body["size"] = dynamic_size
        if flags:
            body["flags"] = flags
        if counter:
            body["stmt"] = [{"counter": None}]
        if map_ is not None:
            body["map"] = map_
        elems = list(elements)
        if elems:
            body["elem"] = elems
        self.objects.append({"add": {"map" if map_ is not None else "set": body}})

    def rule(self, chain: str, *expr: dict[str, Any], comment: str | None = None) -> None:
        body: dict[str, Any] = {
            "family": FAMILY,
            "table": TABLE,
            "chain": chain,
            "expr": list(expr),
        }
        if comment:
            body["comment"] = comment
        self.rules.append({"add": {"rule": body}})

    def document(self) -> dict[str, Any]:
        """The commands; the first rule's comment carries a hash of every rule (see
        ``stamp``)."""
        rules = [json.loads(json.dumps(r)) for r in self.rules]
        if rules:
            digest = hashlib.sha256(
                json.dumps([r["add"]["rule"] for r in rules], sort_keys=True).encode()
            ).hexdigest()[:RULES_HASH_LEN]
            first = rules[0]["add"]["rule"]
            first["comment"] = stamp(first.get("comment"), digest)
        return {"nftables": [*self.cmds, *self.objects, *rules]}


#: hex digits of the rules' hash in the first rule's comment
RULES_HASH_LEN = 12


def element_key(element: Any) -> str:
    """A set element as a string that compares and hashes (elements are JSON values)."""
    return json.dumps(element, sort_keys=True)


def stamp(comment: str | None, digest: str) -> str:
    """A rule comment that also names the hash of every rule of the derived table.

    libnftables lists rules in a normalised form that differs from what nsd loads, so
    rules cannot be compared with the derived ones directly; comments come back as they
    were. With the hash in a comment, ``summary`` sees any change of the derived rules
    (a host service's port, a new limit) even in a new process, where nsd has not yet
    seen the live rules it loaded."""
    tag = f"rules {digest}"
    return f"{comment} [{tag}]" if comment else f"nsd {tag}"
