"""Two phases of the reboot test, run inside the container: ``set`` then, after a
reboot, ``check``. Prints what it saw as JSON for the outer test to judge."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from nsd.systemd import units as sd

SLICE = "tenant-1001.slice"
PROBE = "nsd-boot-probe.service"
LIMITS = sd.limit_properties(
    memory_max=512 << 20, memory_high=256 << 20, cpu_weight=50, tasks_max=200, io_weight=40
)


async def main(phase: str) -> dict[str, object]:
    s = await sd.Systemd.connect()
    try:
        if phase == "set":
            await s.ensure_slice(SLICE, LIMITS)
        props = await s.get_unit_properties(SLICE, sd.SLICE)
        unit = await s.get_unit_properties(SLICE)
        probe = await s.get_unit_properties(PROBE, sd.SERVICE)
        probe_unit = await s.get_unit_properties(PROBE)
        pid = probe["MainPID"]
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines() if pid else []
        cgroup = next(
            (x.split(":", 2)[2] for x in lines if ":name=systemd:" in x or x.startswith("0::")), ""
        )
        return {
            "limits": {name: props[name] for name, _sig, _value in LIMITS},
            "slice_state": unit["ActiveState"],
            "dropins": unit["DropInPaths"],
            "probe_state": probe_unit["ActiveState"],
            "probe_cgroup": cgroup,
            "probe_started_us": probe_unit["ActiveEnterTimestampMonotonic"],
        }
    finally:
        await s.close()


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(sys.argv[1]))))
