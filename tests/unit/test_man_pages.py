"""The man pages cannot drift from the code: every command, option, exit status
and configuration key is in its page, and every page renders without warnings.

nsctl(8) and nsd(8) are written in man/*.md; nsd.toml(5) and nsd-exec(8) are
rendered from docs/configuration.md and docs/nsd-exec.md (scripts/build-man).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from nsd import config, daemon
from nsd.cli import parser

ROOT = Path(__file__).resolve().parents[2]


def page_text(name: str) -> str:
    # pandoc markdown escapes "--" as "\--"; compare what a reader sees
    return (ROOT / "man" / name).read_text().replace("\\-", "-")


def subcommands() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def test_nsctl_page_names_every_command_and_option() -> None:
    text = page_text("nsctl.8.md")
    missing = []
    for name, command in subcommands().items():
        if not re.search(rf"^\*\*{re.escape(name)}\*\*", text, re.M):
            missing.append(f"command {name}")
        missing += [
            f"{name} {opt}"
            for action in command._actions
            for opt in action.option_strings
            if opt.startswith("--") and opt not in text
        ]
    assert missing == [], "missing from man/nsctl.8.md"


def test_nsd_page_names_every_option_and_exit_status() -> None:
    text = page_text("nsd.8.md")
    help_text = subprocess.run(
        [sys.executable, "-m", "nsd.daemon", "--help"], capture_output=True, text=True, check=True
    ).stdout
    options = set(re.findall(r"(--[a-z][a-z-]+)", help_text))
    assert {"--config", "--check-config"} <= options
    assert sorted(o for o in options if o not in text) == []
    statuses = {v for k, v in vars(daemon).items() if k.startswith("EXIT_")} | {0}
    section = text.split("# EXIT STATUS", 1)[1].split("\n# ", 1)[0]
    assert sorted(s for s in statuses if f"**{s}**" not in section) == []


def config_sections() -> dict[str, list[str]]:
    sections = {}
    for f in dataclasses.fields(config.Config):
        if f.name == "source":
            continue
        default = getattr(config.Config(), f.name)
        sections[f.name] = [k.name for k in dataclasses.fields(default)]
    return sections


def test_configuration_reference_names_every_key() -> None:
    text = (ROOT / "docs" / "configuration.md").read_text()
    parts = re.split(r"^## `\[(\w+)\]`.*$", text, flags=re.M)
    documented = dict(zip(parts[1::2], parts[2::2], strict=True))
    missing = []
    for section, keys in config_sections().items():
        body = documented.get(section)
        if body is None:
            missing.append(f"[{section}]")
            continue
        missing += [f"{section}.{k}" for k in keys if not re.search(rf"`[^`]*\b{k}\b[^`]*`", body)]
    assert missing == [], "missing from docs/configuration.md (and so from nsd.toml(5))"


@pytest.mark.skipif(
    shutil.which("pandoc") is None or shutil.which("groff") is None,
    reason="pandoc and groff render the pages (scripts/test installs both)",
)
def test_pages_render_without_warnings(tmp_path: Path) -> None:
    subprocess.run([ROOT / "scripts" / "build-man", tmp_path], check=True, capture_output=True)
    pages = sorted(p.name for p in tmp_path.iterdir())
    assert pages == ["nsctl.8", "nsd-exec.8", "nsd.8", "nsd.toml.5"]
    env = dict(os.environ, LC_ALL="C.UTF-8")
    for page in pages:
        res = subprocess.run(
            ["groff", "-man", "-ww", "-z", "-Tutf8", tmp_path / page],
            capture_output=True, text=True, env=env, check=False,
        )  # fmt: skip
        assert (res.returncode, res.stderr) == (0, ""), page
        head = (tmp_path / page).read_text().split("\n.SH", 2)
        assert head[1].startswith(" NAME"), page
