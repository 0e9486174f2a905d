"""nsd: per-tenant network namespaces, slices and metrics for shared-hosting servers.

The package is pure Python (the daemon and ``nsctl``); nsd-exec, nsd-ensure and
pam_nsd.so are C, built from native/ (docs/nsd-exec.md, docs/logins.md).
"""

__version__ = "0.1.0"
