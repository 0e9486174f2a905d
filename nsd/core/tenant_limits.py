"""Tenants' resource limits: the configured defaults overlaid with each tenant's
overrides (kept in the store), applied to the tenant's systemd slice."""

from __future__ import annotations

import logging
from collections.abc import Mapping

from nsd import limits as limits_mod
from nsd.core.store import Store
from nsd.model import TenantRecord
from nsd.systemd.slices import TenantSlices

log = logging.getLogger("nsd.manager")


class TenantLimits:
    def __init__(self, slices: TenantSlices, store: Store) -> None:
        self._slices = slices
        self._store = store

    def of(self, uid: int) -> limits_mod.Limits:
        """Effective limits: configured defaults overlaid with the tenant's overrides."""
        return self._slices.effective(self._store.limit_overrides(uid))

    def all(self) -> Mapping[int, limits_mod.Limits]:
        """Every tenant's effective limits, from one query (the defaults computed once)."""
        overrides = self._store.all_limit_overrides()
        defaults = self._slices.effective({})
        return {
            r.uid: defaults if (own := overrides.get(r.uid)) is None
            else self._slices.effective(own)
            for r in self._store.all()
        }  # fmt: skip

    def get(self, uid: int) -> tuple[limits_mod.Limits, limits_mod.Limits]:
        """(effective, overrides) of a tenant."""
        overrides = self._store.limit_overrides(uid)
        return self._slices.effective(overrides), limits_mod.Limits(**overrides)

    async def change(
        self, rec: TenantRecord, changes: Mapping[str, str | None]
    ) -> tuple[limits_mod.Limits, limits_mod.Limits]:
        """Change overrides (None resets a field to the default), apply them live,
        persist. The caller holds the tenant's lock."""
        overrides = self._store.limit_overrides(rec.uid)
        for field, value in changes.items():
            if value is None:
                overrides.pop(field, None)
            else:
                overrides[field] = limits_mod.canonical(field, value)
        effective = self._slices.effective(overrides)
        limits_mod.check_consistent(effective)
        # Applied first: if systemd refuses, nothing is recorded. The slice's
        # settings are persistent drop-ins, so both survive a crash in between
        # (reconcile re-applies the store's values).
        await self._slices.ensure(rec.uid, effective)
        self._store.set_limit_overrides(rec.uid, overrides)
        await self.protect_parent()
        log.info("tenant %s: limits now %s", rec.name, effective.items())
        return effective, limits_mod.Limits(**overrides)

    async def protect_parent(self) -> None:
        """The parent slice's protections: the sum of its tenants' (MemoryMin/Low)."""
        if self._slices.available:
            await self._slices.protect_parent(self.all().values())
