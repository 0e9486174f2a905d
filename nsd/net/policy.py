"""Network policy: nsd's state and configuration -> nftables documents and tc plans.

Pure derivation, no I/O: given the ``[network]`` configuration, host facts (gateways,
pools, uplinks, the host's loopback resolvers) and the tenants, build the JSON document of
the ``inet nsd`` table in the host namespace, the one inside each tenant's namespace, the
per-interface sysctls each side needs, and the tc plan of each tenant. The model is
explained in docs/networking.md.

This module is the policy's public face (what the daemon, the manager and hostnet use);
each part lives in a module of its own:

* nsd/network_config.py: the ``[network]`` section, parsed and validated;
* nsd/policy_site.py: host facts, tenants, host services resolved against them;
* nsd/policy_rules.py: nft JSON building blocks and the table document;
* nsd/policy_host.py: the host table, and the per-tenant element transactions;
* nsd/policy_tenant.py: the table inside a tenant's namespace;
* nsd/policy_plan.py: sysctls, forwarding and tc plans, the marks tying nft to tc;
* nsd/policy_live.py: reading live tables (drift) and replacing the host table.
"""

from __future__ import annotations

from nsd.net.policy_host import (
    Elements,
    all_elements,
    element_changes,
    host_document,
    tenant_elements,
)
from nsd.net.policy_live import (
    element_counters,
    forward_drop_policies,
    replacement,
    rules_of,
    summary,
)
from nsd.net.policy_plan import (
    ForwardingPlan,
    ShapingPlan,
    forwarding_plan,
    host_interface_sysctls,
    shaping_plan,
    tenant_sysctls,
)
from nsd.net.policy_rules import CTDROPS_SET, FAMILY, TABLE
from nsd.net.policy_site import (
    ResolvedService,
    Site,
    TenantNet,
    check_config,
    loopback_resolvers,
    resolve_services,
)
from nsd.net.policy_tenant import tenant_document
from nsd.network_config import (
    Bandwidth,
    HostService,
    NetworkConfig,
    NetworkConfigError,
    config_from_mapping,
    format_rate,
    parse_rate,
)

__all__ = [
    "CTDROPS_SET",
    "FAMILY",
    "TABLE",
    "Bandwidth",
    "Elements",
    "ForwardingPlan",
    "HostService",
    "NetworkConfig",
    "NetworkConfigError",
    "ResolvedService",
    "ShapingPlan",
    "Site",
    "TenantNet",
    "all_elements",
    "check_config",
    "config_from_mapping",
    "element_changes",
    "element_counters",
    "format_rate",
    "forward_drop_policies",
    "forwarding_plan",
    "host_document",
    "host_interface_sysctls",
    "loopback_resolvers",
    "parse_rate",
    "replacement",
    "resolve_services",
    "rules_of",
    "shaping_plan",
    "summary",
    "tenant_document",
    "tenant_elements",
    "tenant_sysctls",
]
