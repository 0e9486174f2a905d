"""The import graph keeps the layers the architecture promises (docs/architecture.md).

Layers point one way: entry points (daemon, cli) -> api -> core -> adapters
(net, systemd, observe) -> shared leaves (errors, model, names, config, ...). The
api may use adapters' types directly (a usage snapshot, a run result); the core
and the adapters never import the api, the varlink package, the CLI or the
daemon, and adapters never import the core. The varlink package is a protocol
library: it imports nothing else of nsd. Every ``import`` statement counts,
including those inside functions (lazy imports are still dependencies).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

NSD = Path(__file__).resolve().parents[2] / "nsd"

# Shared leaves: plain values, names and parsing that every layer uses.
LEAVES = frozenset(
    {
        "nsd", "nsd.errors", "nsd.model", "nsd.names", "nsd.config", "nsd.config_check",
        "nsd.network_config", "nsd.limits", "nsd.users", "nsd.kerneltext",
    }
)  # fmt: skip
ADAPTERS = ("nsd.net", "nsd.systemd", "nsd.observe")
# Entry points and what only they use (nsctl's table renderers).
ENTRY_POINTS = frozenset({"nsd.daemon", "nsd.startup", "nsd.cli", "nsd.topview", "nsd.faultview"})


def layer(module: str) -> str:
    """The layer a module belongs to."""
    if module in ENTRY_POINTS:
        return "entry"
    if module in LEAVES:
        return "leaf"
    top = ".".join(module.split(".")[:2])
    if top == "nsd.varlink":
        return "varlink"
    if top == "nsd.api":
        return "api"
    if top == "nsd.core":
        return "core"
    if top in ADAPTERS:
        return "adapter"
    raise AssertionError(f"{module}: in no layer; add it to tests/unit/test_layers.py")


# What each layer may import (besides itself, the standard library and third parties).
ALLOWED = {
    "entry": {"entry", "api", "core", "adapter", "leaf", "varlink"},
    "api": {"api", "core", "adapter", "leaf", "varlink"},
    "core": {"core", "adapter", "leaf"},
    "adapter": {"adapter", "leaf"},
    "leaf": {"leaf"},
    "varlink": {"varlink"},
}


def module_name(path: Path) -> str:
    rel = path.relative_to(NSD.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported(source: str, module: str, is_package: bool) -> set[str]:
    """The nsd modules that ``source`` (the text of ``module``) imports."""
    found: set[str] = set()
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "nsd")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "nsd":
                continue
            # `from nsd.core import manager` imports the submodule nsd.core.manager
            subs = [f"{target}.{a.name}" for a in node.names]
            found.update(s for s in subs if _exists(s))
            found.add(target)
    return found


def _exists(module: str) -> bool:
    rel = Path(*module.split("."))
    return (NSD.parent / rel).with_suffix(".py").is_file() or (
        NSD.parent / rel / "__init__.py"
    ).is_file()


def violations(source: str, module: str, is_package: bool = False) -> list[str]:
    """Imports of ``module`` that point the wrong way, as readable lines."""
    own = layer(module)
    bad = []
    for target in sorted(imported(source, module, is_package)):
        if target in ("nsd",) or not _exists(target):
            continue
        theirs = layer(target)
        if theirs not in ALLOWED[own]:
            bad.append(f"{module} ({own}) imports {target} ({theirs})")
    return bad


def all_modules() -> list[Path]:
    return sorted(NSD.rglob("*.py"))


def test_every_module_is_in_a_layer() -> None:
    for path in all_modules():
        layer(module_name(path))


def test_layers_point_one_way() -> None:
    bad: list[str] = []
    for path in all_modules():
        bad += violations(path.read_text(), module_name(path), path.name == "__init__.py")
    assert bad == [], "wrong-way imports:\n" + "\n".join(bad)


@pytest.mark.parametrize(
    ("module", "source"),
    [
        ("nsd.core.manager", "from nsd.api import handlers\n"),
        ("nsd.core.store", "def f() -> None:\n    from nsd import daemon\n"),
        ("nsd.net.netns", "from nsd.core.manager import TenantManager\n"),
        ("nsd.observe.sampler", "import nsd.varlink.server\n"),
        ("nsd.config", "from nsd.observe import procscan\n"),
        ("nsd.varlink.server", "from nsd import errors\n"),
    ],
)
def test_a_wrong_way_import_is_caught(module: str, source: str) -> None:
    """The checker itself can fail: each of these imports points the wrong way."""
    assert violations(source, module) != []


def test_right_way_imports_pass() -> None:
    assert violations("from nsd.core.manager import TenantManager\n", "nsd.api.handlers") == []
    assert violations("from nsd.net import netns\n", "nsd.core.manager") == []
