"""The core: what a tenant is and how it changes, independent of any wire format.

``manager`` (TenantManager: create, ensure, enter, remove, limits, run, watch;
per-tenant locks in ``tenant_locks``) and ``reconcile`` (store vs host at start and
on demand) drive the adapters of ``nsd.net``, ``nsd.systemd`` and ``nsd.observe``.
State lives in ``store`` (SQLite, intent recorded before acting) with addresses
from ``ipam``. Returns dataclasses of ``nsd.model``; never imports ``nsd.api``,
``nsd.varlink``, ``nsd.cli`` or ``nsd.daemon`` (tests/unit/test_layers.py).
"""
