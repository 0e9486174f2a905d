"""The ``/metrics`` HTTP endpoint: a deliberately small asyncio HTTP/1.1 server."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable

from nsd.observe.access import forbidden
from nsd.observe.exposition import (
    OPENMETRICS_CONTENT_TYPE,
    TEXT_CONTENT_TYPE,
    Exposition,
    wants_gzip,
    wants_openmetrics,
)

log = logging.getLogger("nsd.metrics")


_INDEX = (b"<html><head><title>nsd</title></head><body><h1>nsd</h1>"
          b'<p><a href="/metrics">Metrics</a></p></body></html>\n')  # fmt: skip
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            503: "Service Unavailable"}  # fmt: skip


class MetricsServer:
    """A deliberately small HTTP/1.1 server: GET/HEAD of ``/metrics`` (and ``/``) only,
    one request per connection, bounded request size, read timeout and connection
    count. Rendering runs on a worker thread, so the event loop never serialises."""

    def __init__(
        self,
        exposition: Exposition,
        host: str,
        port: int,
        *,
        timeout: float = 10.0,
        max_connections: int = 32,
        max_request_bytes: int = 8192,
        refusal: Callable[[socket.socket], str | None] | None = None,
    ) -> None:
        self.exposition = exposition
        #: why a connection may not be served (metrics_access), checked at accept
        self.refusal = refusal
        self.host = host
        self.port = port
        self.timeout = timeout
        self.max_connections = max_connections
        self.max_request_bytes = max_request_bytes
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def address(self) -> tuple[str, int]:
        """The bound address (useful with port 0)."""
        if self._server is None or not self._server.sockets:
            raise RuntimeError("the metrics endpoint is not listening")
        sockname = self._server.sockets[0].getsockname()
        return sockname[0], sockname[1]

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._handle,
            self.host or None,
            self.port,
            limit=self.max_request_bytes,
            backlog=64,
            reuse_address=True,
        )
        log.info("metrics on http://%s:%d/metrics", self.host or "*", self.port)

    async def close(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for writer in list(self._writers):
            writer.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(server.wait_closed(), 1.0)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Before counting it or reading a byte: a refused peer holds no slot.
        refused = self.refusal(writer.get_extra_info("socket")) if self.refusal else None
        if refused is not None:
            writer.write(forbidden(refused))
            writer.close()
            return
        if len(self._writers) >= self.max_connections:
            writer.close()
            return
        self._writers.add(writer)
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.timeout)
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError,
                    ConnectionError, ValueError):  # fmt: skip
                return
            status, headers, body, head_only = await self._respond(head)
            lines = [f"HTTP/1.1 {status} {_REASONS[status]}", *headers,
                     f"Content-Length: {len(body)}", "Connection: close", "", ""]  # fmt: skip
            writer.write("\r\n".join(lines).encode("ascii"))
            if not head_only:
                writer.write(body)
            await asyncio.wait_for(writer.drain(), self.timeout)
        except (ConnectionError, TimeoutError):
            pass
        except Exception:
            log.exception("metrics: request failed")
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _respond(self, head: bytes) -> tuple[int, list[str], bytes, bool]:
        try:
            text = head.decode("latin-1")
            request_line, *header_lines = text.split("\r\n")
            method, target, version = request_line.split(" ")
        except ValueError:
            return 400, ["Content-Type: text/plain"], b"bad request\n", False
        if not version.startswith("HTTP/1."):
            return 400, ["Content-Type: text/plain"], b"bad request\n", False
        head_only = method == "HEAD"
        if method not in ("GET", "HEAD"):
            return 405, ["Allow: GET, HEAD", "Content-Type: text/plain"], b"GET only\n", False
        headers: dict[str, str] = {}
        for line in header_lines:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        path = target.split("?", 1)[0]
        if path == "/":
            return 200, ["Content-Type: text/html; charset=utf-8"], _INDEX, head_only
        if path != "/metrics":
            return 404, ["Content-Type: text/plain"], b"not found; try /metrics\n", head_only
        om = wants_openmetrics(headers.get("accept"))
        use_gzip = wants_gzip(headers.get("accept-encoding"))
        body = await asyncio.to_thread(self.exposition.render, openmetrics=om, use_gzip=use_gzip)
        out = [f"Content-Type: {OPENMETRICS_CONTENT_TYPE if om else TEXT_CONTENT_TYPE}",
               "Vary: Accept, Accept-Encoding"]  # fmt: skip
        if use_gzip:
            out.append("Content-Encoding: gzip")
        return 200, out, body, head_only
