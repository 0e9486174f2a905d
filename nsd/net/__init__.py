"""Network adapters: namespaces, links and the host's network policy.

``netns`` (the asyncio facade over the one worker thread that enters namespaces,
``netns_worker``; the /run/netns mount protocol in ``netns_mount``; veth,
addresses and routes in ``netns_links`` over the raw rtnetlink of ``rtnl``),
``policy`` and its parts (the nftables table ``inet nsd``, sysctls and tc plans),
``hostnet`` (applies them), ``nft`` (libnftables), ``shaping`` (HTB), ``procs``
(processes inside a namespace), ``linux`` (setns/unshare/mount wrappers).
Adapters import only each other and the shared leaves, never the core.
"""
