"""The per-tenant lock admits one operation at a time, however calls interleave."""

from __future__ import annotations

import asyncio
from typing import Any

from nsd import config
from nsd.core.manager import TenantManager


def manager() -> TenantManager:
    cfg = config.from_mapping({})
    # Only the locking is exercised: no store, IPAM or adapter is touched.
    none: Any = None
    return TenantManager(cfg, none, none, none)


async def test_lock_cleanup_never_admits_two_holders() -> None:
    m = manager()
    inside = 0
    most = 0
    loop = asyncio.get_running_loop()
    gate: asyncio.Future[None] = loop.create_future()

    async def op(hold: Any) -> None:
        nonlocal inside, most
        async with m.operation(1001, "alice"):
            inside += 1
            most = max(most, inside)
            await hold
            inside -= 1

    # B holds the lock. B is released in the very loop turn in which A starts
    # waiting (wait_for enqueues A's acquire a turn later, so A is not yet a
    # waiter of the lock). Then C arrives while A holds it.
    b = asyncio.create_task(op(gate))
    for _ in range(5):
        await asyncio.sleep(0)
    loop.call_soon(gate.set_result, None)
    a = asyncio.create_task(op(asyncio.sleep(0.05)))
    for _ in range(5):
        await asyncio.sleep(0)
    c = asyncio.create_task(op(asyncio.sleep(0.05)))
    await asyncio.gather(a, b, c)
    assert most == 1
    assert len(m._locks) == 0  # every lock left the table when its last user did


async def test_different_tenants_run_in_parallel() -> None:
    m = manager()
    started = asyncio.Event()
    release = asyncio.Event()

    async def slow() -> None:
        async with m.operation(1001, "alice"):
            started.set()
            await release.wait()

    task = asyncio.create_task(slow())
    await started.wait()
    async with m.operation(1002, "bob"):
        pass  # not blocked by alice's operation
    release.set()
    await task
