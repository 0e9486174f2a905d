"""Comparison 3's load generator: C concurrent varlink clients in one process.

Each client is its own connection with at most one call in flight (no pipelining).
One process multiplexes all C connections with epoll on raw sockets, so the client
side costs ~10-20 us per call and stays off the daemon's core on a 2-core host (C
processes would spend that core on context switches). Enter replies carry the
namespace descriptor (SCM_RIGHTS); it is received and closed at once.

Two modes:

* closed loop (RATE 0): every client sends its next call as soon as the previous
  reply is in. This measures the most calls/s the daemon serves; latency then is
  C / throughput by Little's law, whatever the daemon does per call.
* open loop (RATE > 0): the C clients together offer RATE calls/s, each on its own
  Poisson schedule. A call whose time comes while its client still waits for a
  reply is sent when the reply arrives, and its latency counts from the time it was
  due (no coordinated omission): this is the latency a caller sees at that load.

Usage: python -m benchlib.loadclient SOCKET METHOD NAMES_FILE CONCURRENCY DURATION WARMUP [RATE]
Prints one JSON object.
"""

from __future__ import annotations

import array
import json
import os
import random
import select
import socket
import sys
import time
from typing import Any

RECV = 65536
ANC = socket.CMSG_SPACE(16 * 4)
CLOEXEC = getattr(socket, "MSG_CMSG_CLOEXEC", 0x40000000)


def percentile(s: list[float], p: float) -> float:
    if not s:
        return float("nan")
    k = (len(s) - 1) * p / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def main(argv: list[str]) -> int:  # noqa: PLR0912, PLR0915 -- one hot loop, kept whole
    path, method, names_file = argv[0], argv[1], argv[2]
    concurrency, duration, warmup = int(argv[3]), float(argv[4]), float(argv[5])
    rate = float(argv[6]) if len(argv) > 6 else 0.0
    with open(names_file, encoding="utf-8") as f:
        names = [line.strip() for line in f if line.strip()]
    rnd = random.Random(1)  # noqa: S311 -- a load pattern, not a secret
    params: dict[str, Any] = {"create": False} if method.endswith(".Enter") else {}
    requests = [
        json.dumps({"method": method, "parameters": {"name": n, **params}}).encode() + b"\0"
        for n in names
    ]
    socks: dict[int, socket.socket] = {}
    bufs: dict[int, bytearray] = {}
    due: dict[int, float] = {}  # when the call in flight (or the next one) was/is due
    ep = select.epoll()
    for _ in range(concurrency):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(path)
        s.setblocking(False)
        socks[s.fileno()] = s
        bufs[s.fileno()] = bytearray()
        ep.register(s.fileno(), select.EPOLLIN)
    mean_gap = concurrency / rate if rate > 0 else 0.0
    latencies: list[float] = []
    errors = 0
    first_error = ""
    fds_closed = 0
    checked = False
    t_start = time.perf_counter()
    t_measure = t_start + warmup
    t_end = t_measure + duration
    idle: set[int] = set()

    def send(fd: int) -> None:
        socks[fd].send(requests[rnd.randrange(len(requests))])

    for fd in socks:
        if rate > 0:
            due[fd] = t_start + rnd.expovariate(1 / mean_gap)
            idle.add(fd)
        else:
            due[fd] = time.perf_counter()
            send(fd)
    outstanding = len(socks) - len(idle)
    # Closed loop: every client sends again at once until t_end. Open loop: calls
    # follow the schedule, not the clock: every call due up to t_end is sent, however
    # late, and its reply awaited. Stopping at t_end by the clock would, when the
    # daemon serves fewer calls/s than offered, never send the calls due inside the
    # window (the schedule lags behind the clock): the smoke test once measured
    # 0 calls/s for a loaded machine's open-loop cell.
    while outstanding or idle:
        now = time.perf_counter()
        if rate > 0:
            for fd in [fd for fd in idle if due[fd] <= now]:
                idle.discard(fd)
                send(fd)
                outstanding += 1
            wake = min((due[fd] for fd in idle), default=now + 1.0)
            timeout = max(0.0, wake - time.perf_counter())
        else:
            timeout = 1.0
        for fd, _ev in ep.poll(timeout):
            s = socks[fd]
            data, anc, _flags, _addr = s.recvmsg(RECV, ANC, CLOEXEC)
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    got = array.array("i")
                    got.frombytes(payload[: len(payload) - len(payload) % 4])
                    for rfd in got:
                        os.close(rfd)
                        fds_closed += 1
            if not data:
                raise SystemExit(f"daemon closed connection {fd}")
            buf = bufs[fd]
            buf += data
            end = buf.find(b"\0")
            if end < 0:
                continue
            frame = bytes(buf[:end])
            del buf[: end + 1]
            now = time.perf_counter()
            outstanding -= 1
            if not checked:  # the first reply is checked in full, later ones cheaply
                reply = json.loads(frame)
                if "error" not in reply and "tenant" not in reply.get("parameters", {}):
                    raise SystemExit(f"unexpected reply: {frame[:200]!r}")
                checked = True
            if b'"error":' in frame:
                errors += 1
                first_error = first_error or frame[:300].decode(errors="replace")
            # A call due inside the window counts, however late its reply.
            if t_measure <= due[fd] <= t_end:
                latencies.append(now - due[fd])
            if rate > 0:
                due[fd] += rnd.expovariate(1 / mean_gap)
                if due[fd] > t_end:
                    continue  # this client's schedule is done
                if due[fd] <= now:
                    send(fd)  # late: it was due while this client waited
                    outstanding += 1
                else:
                    idle.add(fd)
            elif now < t_end:
                due[fd] = now
                send(fd)
                outstanding += 1
    for s in socks.values():
        s.close()
    latencies.sort()
    print(
        json.dumps(
            {
                "method": method,
                "concurrency": concurrency,
                "offered_per_s": rate or None,
                "duration_s": duration,
                "calls": len(latencies),
                "calls_per_s": len(latencies) / duration,
                "p50_ms": percentile(latencies, 50) * 1000,
                "p90_ms": percentile(latencies, 90) * 1000,
                "p99_ms": percentile(latencies, 99) * 1000,
                "max_ms": (latencies[-1] * 1000) if latencies else float("nan"),
                "errors": errors,
                "first_error": first_error,
                "fds_closed": fds_closed,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
