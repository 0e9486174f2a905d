"""nsd: per-tenant network namespaces, slices and metrics for shared-hosting servers.

Kept empty on purpose: ``nsd-exec`` imports ``nsd.exec`` on every service start, and
anything imported here would be paid for on that path.
"""

__version__ = "0.1.0"
