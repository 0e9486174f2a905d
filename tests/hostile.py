"""Hostile local users against the varlink socket, and honest callers beside them.

Used by tests/integration/test_hostile.py and ``scripts/bench --hostile``. Each
role runs in its own process under its own UID (``setpriv``), started as
``python -m tests.hostile ROLE ...``, and prints one JSON object:

* ``hold``: holds as many idle connections as the daemon admits, plus N
  slowloris connections that trickle one byte of a never-ending request every
  ``--trickle`` seconds; reopens whatever the daemon closes. Reports the most
  connections held at once, how many the daemon closed and after how long, and
  why it refused the rest.
* ``flood``: sends 60 KB requests whose 60 KB error replies it never reads, on
  every connection it may hold (what pins the daemon's memory if input and
  output are unbounded).
* ``get``: calls ``io.nsd.Tenant.Get`` in a loop, a new connection per call
  (what nsctl does), and reports latencies and errors.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import selectors
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Any

_TICK = 0.25
_REFUSED = b"ConnectionLimitReached"


_HELLO = b'{"method":"org.varlink.service.GetInfo"}\0'


@dataclass
class _Conn:
    sock: socket.socket
    since: float  # connected; once admitted, when the daemon answered the first call
    slow: bool
    admitted: bool = False
    trickled: bool = False


@dataclass
class HoldReport:
    max_held: int = 0
    held_at_end: int = 0
    refused: int = 0
    refusal_reasons: set[str] = field(default_factory=set)
    closed_idle: list[float] = field(default_factory=list)
    closed_slow: list[float] = field(default_factory=list)
    resets: int = 0  # closes before an answer and without a refusal message

    def as_json(self) -> dict[str, Any]:
        return {
            "max_held": self.max_held,
            "held_at_end": self.held_at_end,
            "refused": self.refused,
            "refusal_reasons": sorted(self.refusal_reasons),
            "closed_idle": len(self.closed_idle),
            "closed_idle_max_s": max(self.closed_idle, default=0.0),
            "closed_slow": len(self.closed_slow),
            "closed_slow_max_s": max(self.closed_slow, default=0.0),
            "resets": self.resets,
        }


class _Holder:
    """One hostile UID's connections: idle ones up to the cap, plus slowloris ones."""

    def __init__(self, path: str, slow: int, probe: int, retry: float) -> None:
        self.path = path
        self.slow = slow
        self.probe = probe
        self.retry = retry  # seconds to wait after a refusal before asking again
        self.next_probe = 0.0
        self.sel = selectors.DefaultSelector()
        self.conns: dict[int, _Conn] = {}
        self.report = HoldReport()

    def open(self, is_slow: bool) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(self.path)
        except OSError:
            s.close()
            self.report.refused += 1
            return
        # One call first: its answer tells an admitted connection from a refused
        # one (also on a loaded host, where a refusal can take a while), and the
        # connection is idle (or trickling) from that answer on.
        with contextlib.suppress(OSError):
            s.sendall(_HELLO)
        s.setblocking(False)
        self.conns[s.fileno()] = _Conn(s, time.monotonic(), is_slow)
        self.sel.register(s, selectors.EVENT_READ)

    def top_up(self) -> None:
        if time.monotonic() < self.next_probe:
            return
        # Slowloris ones first, so they are among those the cap admits.
        idle_n = sum(1 for c in self.conns.values() if not c.slow)
        for _ in range(max(0, self.slow - (len(self.conns) - idle_n))):
            self.open(True)
        for _ in range(max(0, self.probe - idle_n)):
            self.open(False)

    def trickle(self) -> None:
        for c in self.conns.values():
            if c.slow and c.admitted:
                piece = b"a" if c.trickled else b'{"method":"io.nsd.Tenant.Get","parameters":{"n'
                c.trickled = True
                with contextlib.suppress(OSError):  # the close shows up as readable
                    c.sock.send(piece, socket.MSG_NOSIGNAL)

    def poll(self, timeout: float) -> None:
        for key, _ in self.sel.select(timeout):
            c = self.conns.get(key.fd)
            if c is not None:
                self.readable(c)
        held = sum(1 for c in self.conns.values() if c.admitted)
        self.report.max_held = max(self.report.max_held, held)

    def readable(self, c: _Conn) -> None:
        try:
            data = c.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data and _REFUSED not in data:
            if not c.admitted:  # the answer to the first call
                c.admitted = True
                c.since = time.monotonic()
            return
        report = self.report
        lifetime = time.monotonic() - c.since
        if data:
            report.refused += 1
            self.next_probe = time.monotonic() + self.retry
            message = json.loads(data.split(b"\0", 1)[0])
            report.refusal_reasons.add(message["parameters"]["reason"])
        elif not c.admitted:
            report.resets += 1
        elif c.slow:
            report.closed_slow.append(lifetime)
        else:
            report.closed_idle.append(lifetime)
        self.drop(c)

    def drop(self, c: _Conn) -> None:
        self.sel.unregister(c.sock)
        del self.conns[c.sock.fileno()]
        c.sock.close()


def hold(
    path: str, seconds: float, *, slow: int, trickle: float, probe: int, retry: float
) -> HoldReport:
    """Idle connections up to the cap, ``slow`` slowloris ones; for ``seconds``."""
    h = _Holder(path, slow, probe, retry)
    end = time.monotonic() + seconds
    next_trickle = 0.0
    while (now := time.monotonic()) < end:
        h.top_up()
        if now >= next_trickle:
            next_trickle = now + trickle
            h.trickle()
        h.poll(_TICK)
    h.report.held_at_end = len(h.conns)
    for c in list(h.conns.values()):
        h.drop(c)
    return h.report


def flood(path: str, seconds: float, conns: int, request: bytes) -> dict[str, Any]:
    """Opens up to ``conns`` connections that send requests and never read."""
    socks: list[socket.socket] = []
    sent = 0
    end = time.monotonic() + seconds
    for _ in range(conns):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(path)
        s.setblocking(False)
        socks.append(s)
    # Whole messages only: a partial send is finished before the next one starts
    # (a torn message would be a protocol violation, closed at once).
    left = {s.fileno(): b"" for s in socks}
    while time.monotonic() < end:
        progress = False
        for s in socks:
            data = left[s.fileno()] or request
            try:
                n = s.send(data, socket.MSG_NOSIGNAL)
            except OSError:  # full (BlockingIOError) or closed by the daemon
                continue
            left[s.fileno()] = data[n:]
            sent += not left[s.fileno()]
            progress = True
        if not progress:
            time.sleep(_TICK)
    states = [_state(s) for s in socks]
    for s in socks:
        s.close()
    return {
        "connections_tried": conns,
        "admitted": sum(admitted for admitted, _ in states),
        "requests_sent": sent,
        "alive_at_end": sum(alive for _, alive in states),
    }


def refused_loop(path: str, seconds: float, name: str) -> dict[str, Any]:
    """Pipelines a call the daemon refuses (Remove, tenants may not), 8 at a time."""
    request = json.dumps({"method": "io.nsd.Tenant.Remove", "parameters": {"name": name}})
    batch = (request.encode() + b"\0") * 8
    answered = 0
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(path)
        s.settimeout(10)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            s.sendall(batch)
            buf = b""
            while buf.count(b"\0") < 8:
                data = s.recv(65536)
                if not data:
                    return {"answered": answered, "closed": True}
                buf += data
            answered += 8
    return {"answered": answered, "closed": False}


def _state(s: socket.socket) -> tuple[bool, bool]:
    """(admitted, still open): reads what is buffered; EOF means the daemon closed it.

    Admitted: the daemon answered a call (a refusal is an answer of its own, or
    with older versions a close without one).
    """
    head = b""
    try:
        while data := s.recv(1 << 20):
            head = head or data[:200]
    except BlockingIOError:
        return bool(head) and _REFUSED not in head, True
    except OSError:
        pass
    return bool(head) and _REFUSED not in head, False


def get_loop(path: str, seconds: float, name: str) -> dict[str, Any]:
    from nsd.varlink.client import VarlinkClient
    from nsd.varlink.protocol import VarlinkError

    latencies: list[float] = []
    errors: dict[str, int] = {}
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        t0 = time.perf_counter()
        try:
            with VarlinkClient(path, timeout=30) as c:
                c.call("io.nsd.Tenant.Get", {"name": name})
            latencies.append(time.perf_counter() - t0)
        except VarlinkError as e:
            errors[e.name] = errors.get(e.name, 0) + 1
        except OSError as e:
            key = type(e).__name__
            errors[key] = errors.get(key, 0) + 1
    latencies.sort()
    return {"ok": len(latencies), "errors": errors, "latencies_s": latencies}


# -- the driver (root, in the test or the bench) -----------------------------------


def spawn(role: str, user: str | None, sock: str, seconds: float, *opts: str) -> Any:
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, "-m", "tests.hostile", role, "--socket", sock,
           "--seconds", f"{seconds:g}", *opts]  # fmt: skip
    if user is not None:
        cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", *cmd]
    return subprocess.Popen(cmd, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip


def result_of(proc: Any) -> dict[str, Any]:
    out, err = proc.communicate(timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"{proc.args}: exit {proc.returncode}: {err}")
    result: dict[str, Any] = json.loads(out)
    return result


def _percentile(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    return xs[min(len(xs) - 1, int(len(xs) * p / 100))]


def siege(
    sock: str,
    hostile: list[str],
    callers: dict[str, tuple[str | None, str]],
    seconds: float,
    *,
    slow: int = 4,
    trickle: float = 1.0,
    probe: int = 64,
    retry: float = 1.0,
) -> dict[str, Any]:
    """Hostile UIDs hold their caps (+ ``slow`` slowloris each) while callers loop on Get.

    ``callers`` maps a role ("tenant", "admin", "root") to (user or None for
    root, tenant name to Get). The callers start once the hostile UIDs had a
    second to fill their allowances, and stop a second before them.
    """
    hold_opts = ("--slow", str(slow), "--trickle", f"{trickle:g}", "--probe", str(probe),
                 "--retry", f"{retry:g}")  # fmt: skip
    holders = [spawn("hold", u, sock, seconds, *hold_opts) for u in hostile]
    time.sleep(1.0)  # let them fill their allowances first: that is the attack
    procs = {role: spawn("get", user, sock, seconds - 2, "--name", name)
             for role, (user, name) in callers.items()}  # fmt: skip
    calls = {role: result_of(p) for role, p in procs.items()}
    holds = [result_of(p) for p in holders]
    summary: dict[str, Any] = {"seconds": seconds, "hostile_uids": len(hostile), "callers": {}}
    for role, r in calls.items():
        lat = r.pop("latencies_s")
        summary["callers"][role] = {
            "ok": r["ok"],
            "errors": r["errors"],
            "p50_ms": round(_percentile(lat, 50) * 1000, 2),
            "p99_ms": round(_percentile(lat, 99) * 1000, 2),
            "max_ms": round(max(lat, default=float("nan")) * 1000, 2),
        }
    summary["hostile"] = {
        "held_max_total": sum(h["max_held"] for h in holds),
        "held_max_per_uid": sorted({h["max_held"] for h in holds}),
        "closed_idle": sum(h["closed_idle"] for h in holds),
        "closed_idle_max_s": round(max(h["closed_idle_max_s"] for h in holds), 2),
        "closed_slow": sum(h["closed_slow"] for h in holds),
        "closed_slow_max_s": round(max(h["closed_slow_max_s"] for h in holds), 2),
        "refused": sum(h["refused"] for h in holds),
        "refusal_reasons": sorted(
            {re.sub(r"uid \d+", "uid N", r) for h in holds for r in h["refusal_reasons"]}
        ),
        "resets": sum(h["resets"] for h in holds),
    }
    summary["per_uid"] = holds
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.hostile")
    p.add_argument("role", choices=["hold", "flood", "get", "refused"])
    p.add_argument("--socket", required=True)
    p.add_argument("--seconds", type=float, required=True)
    p.add_argument("--slow", type=int, default=4)
    p.add_argument("--trickle", type=float, default=1.0)
    p.add_argument("--probe", type=int, default=24, help="idle connections to try to hold")
    p.add_argument("--retry", type=float, default=1.0, help="seconds between probes once refused")
    p.add_argument("--connections", type=int, default=16)
    p.add_argument("--name", default="")
    a = p.parse_args(argv)
    if a.role == "hold":
        report = hold(
            a.socket, a.seconds, slow=a.slow, trickle=a.trickle, probe=a.probe, retry=a.retry
        )
        out: dict[str, Any] = report.as_json()
    elif a.role == "flood":
        # A 60,000-byte method name: MethodNotFound echoes it, so every request
        # of 60 KB in pins 60 KB out (and 60 KB queued in) for a peer that never reads.
        req = json.dumps({"method": "io.nsd.Tenant.X" + "x" * 60_000})
        out = flood(a.socket, a.seconds, a.connections, req.encode() + b"\0")
    elif a.role == "refused":
        out = refused_loop(a.socket, a.seconds, a.name)
    else:
        out = get_loop(a.socket, a.seconds, a.name)
    out["uid"] = os.getuid()
    json.dump(out, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
