"""Namespaces made ahead of the netns worker, on a thread of their own, for a batch.

When a batch of tenants needs new namespaces (every tenant after a reboot), creating them
(the file, ``unshare``, the bind mount) took a quarter of the netns worker's time, and
little of it waits for what the worker's netlink requests hold (the rtnl lock): most of a
new namespace's cost is setting up its own tables, sysctls and procfs entries. So while
the worker builds one tenant's links, addresses and routes, this thread makes the next
tenants' namespaces: on a 2-core machine a direct run of 1,000 fresh tenants took 1.6-1.8 s
instead of 2.1-2.5 s (docs/benchmarks.md, seventh round).

The maker only ever creates namespace files (``NamespaceFiles.ensure``, which it shares
with the worker under the files' own lock) and returns to the host namespace after each,
as the worker does (``Worker.go_home`` works on any thread). Every tenant of the batch is
locked by the caller for the whole batch, so nothing else touches these paths meanwhile.
If nsd dies midway, a namespace made ahead is one without its pair: the next reconcile
adopts it and builds the rest, as after any interrupted creation.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from nsd.net.netns_mount import NamespaceFiles

#: what the maker hands over per path: (fd of the namespace, adopted_existing, actions)
Made = tuple[int, bool, list[str]]


class Ahead:
    """The namespaces one batch asked the maker for, in the order it will use them."""

    def __init__(self, paths: list[tuple[str, bool]]) -> None:
        #: (path, adopt, its future) in the maker's order; ``futures`` loses each
        #: path as the worker takes it
        self.order: list[tuple[str, bool, Future[Made]]] = [(p, a, Future()) for p, a in paths]
        self.futures = {p: f for p, _, f in self.order}
        self.stop = threading.Event()
        self.job: Future[None] | None = None

    def take(self, path: str) -> Made | None:
        """The namespace made for ``path`` (waiting for it), or None if none was asked
        for; raises what making it raised (a NetnsError, as ``NamespaceFiles.ensure``)."""
        future = self.futures.pop(path, None)
        return future.result() if future is not None else None

    def finish(self) -> None:
        """Stop the maker after the namespace it is making, wait for it, and close what
        was made and not taken (a batch that ended early)."""
        self.stop.set()
        if self.job is not None:
            self.job.result()
        for future in self.futures.values():
            if future.done() and not future.cancelled() and future.exception() is None:
                os.close(future.result()[0])
        self.futures.clear()


class NamespaceMaker:
    def __init__(
        self,
        files: NamespaceFiles,
        mount_new_namespace: Callable[[str], None],
        go_home: Callable[[], None],
    ) -> None:
        self.files = files
        self.mount_new_namespace = mount_new_namespace
        self.go_home = go_home
        self._pool: ThreadPoolExecutor | None = None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def make(self, paths: list[tuple[str, bool]]) -> Ahead:
        """Start making the namespaces at ``paths`` (files that hold none now), in order;
        each with its ``adopt`` (what ``NamespaceFiles.ensure`` does if one appeared)."""
        ahead = Ahead(paths)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nsd-netns-maker")
        ahead.job = self._pool.submit(self._make, ahead)
        return ahead

    def _make(self, ahead: Ahead) -> None:
        # The thread was started from the worker's, in whatever namespace that was in;
        # nothing here depends on it, but the host's is the one to leave it in.
        self.go_home()
        for path, adopt, future in ahead.order:
            if ahead.stop.is_set():  # the batch ended: nobody will take the rest
                future.cancel()
                continue
            actions: list[str] = []
            try:
                fd, adopted = self.files.ensure(path, adopt, actions, self.mount_new_namespace)
            except BaseException as e:  # the worker raises it for this tenant
                future.set_exception(e)
            else:
                future.set_result((fd, adopted, actions))
