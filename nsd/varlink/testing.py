"""Runs a VarlinkServer on its own event loop in a background thread.

For tests and benchmarks: blocking clients (ours, the PyPI ``varlink`` package,
``varlinkctl`` in a subprocess) can then talk to a real server on a real socket
from the test's thread without an event loop of their own.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from .server import VarlinkServer, bind_unix_socket

T = TypeVar("T")


class ServerThread:
    """``with ServerThread(factory, path) as st:`` serves on ``path`` until the block ends."""

    def __init__(
        self, factory: Callable[[], VarlinkServer], path: str, *, grace: float = 1.0
    ) -> None:
        self.path = path
        self._factory = factory
        self._grace = grace
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._main, name="varlink-server", daemon=True)
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.server: VarlinkServer | None = None

    def _main(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self.server = self._factory()
            self._loop.run_until_complete(self.server.start(bind_unix_socket(self.path)))
        except BaseException as e:
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        self._loop.run_forever()
        self._loop.close()

    def __enter__(self) -> ServerThread:
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = 10.0) -> T:
        """Runs a coroutine on the server's loop and returns its result."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def call_soon(self, fn: Callable[[], object]) -> None:
        self._loop.call_soon_threadsafe(fn)

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        if self.server is not None:
            self.run(self.server.close(self._grace), timeout=self._grace + 10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
