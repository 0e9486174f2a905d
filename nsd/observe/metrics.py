"""The metrics service the daemon runs: the sampler, nsd's own metrics, the exposition
and the HTTP endpoint, started and stopped together.

The parts: nsd/metrics_catalogue.py (every metric), nsd/collectors.py (series from the
snapshot and nsd's own counters), nsd/exposition.py (rendering a scrape),
nsd/metrics_http.py (the endpoint); the sampler (nsd/sampler.py) reads the host.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Sequence

from prometheus_client.registry import CollectorRegistry

from nsd.config import DEFAULT_LISTEN
from nsd.config_check import parse_listen
from nsd.names import DEFAULT_HELPERS
from nsd.observe.collectors import DaemonMetrics
from nsd.observe.exposition import Exposition
from nsd.observe.http import MetricsServer
from nsd.observe.sampler import Sampler, Snapshot, Target

log = logging.getLogger("nsd.metrics")


class MetricsService:
    """Sampler + self-metrics + exposition + HTTP endpoint, started and stopped together.

    ``listen`` "" disables the HTTP endpoint only: the sampler still runs, because
    GetUsage, Audit and ``nsctl top`` read its snapshot.
    """

    def __init__(
        self,
        targets: Callable[[], Sequence[Target]],
        *,
        interval: float,
        listen: str = DEFAULT_LISTEN,
        helpers: Sequence[str] = DEFAULT_HELPERS,
        cgroup_root: str | None = None,
        proc_root: str = "/proc",
        probe_cgroup: str | None = None,
        registry: CollectorRegistry | None = None,
        refusal: Callable[[socket.socket], str | None] | None = None,
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=False)
        self.daemon = DaemonMetrics(self.registry)
        self.exposition = Exposition(lambda: self.sampler.snapshot, self.registry)
        self.sampler = Sampler(
            targets,
            interval,
            cgroup_root=cgroup_root,
            proc_root=proc_root,
            helpers=helpers,
            probe_cgroup=probe_cgroup,
            after_sample=self.exposition.prerender,
            on_sample=self._on_sample,
            on_error=self.daemon.on_sample_error,
        )
        address = parse_listen(listen)
        self.server = (
            MetricsServer(self.exposition, *address, refusal=refusal)
            if address is not None
            else None
        )
        #: why the HTTP endpoint is not serving (e.g. the port is taken); "" if it is
        self.listen_error = ""
        #: called on the event loop after each sample, once the sampler's thread is done
        self.sampled: list[Callable[[], None]] = []

    def _on_sample(self, snap: Snapshot) -> None:
        self.daemon.on_sample(snap)
        for fn in self.sampled:
            fn()

    async def start(self) -> None:
        """Start sampling (the first sample begins at once, in the background) and serving.

        A listen address that cannot be bound is logged and reported in
        :attr:`listen_error`, not raised: namespaces matter more than metrics, so
        the daemon starts anyway (and can show it as degraded).
        """
        self.sampler.start()
        if self.server is not None:
            try:
                await self.server.start()
            except OSError as e:
                self.listen_error = (
                    f"metrics endpoint {self.server.host}:{self.server.port}: {e.strerror or e}"
                )
                log.error("%s; serving no /metrics", self.listen_error)
                self.server = None

    async def close(self) -> None:
        if self.server is not None:
            await self.server.close()
        await self.sampler.stop()
