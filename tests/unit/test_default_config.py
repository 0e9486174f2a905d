"""The packaged /etc/nsd/nsd.toml (scripts/default-config) shows every key at
its real default: uncommented, it loads to exactly the embedded defaults."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

from nsd import config

ROOT = Path(__file__).resolve().parents[2]


def rendered() -> str:
    return subprocess.run(
        [sys.executable, ROOT / "scripts" / "default-config"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip


def load(text: str, tmp_path: Path) -> config.Config:
    path = tmp_path / "nsd.toml"
    path.write_text(text)
    return dataclasses.replace(config.load(path), source="<defaults>")


def test_as_shipped_it_is_the_defaults(tmp_path: Path) -> None:
    assert load(rendered(), tmp_path) == config.Config()


def test_every_default_shown_is_the_real_one(tmp_path: Path) -> None:
    text = rendered()
    # uncomment every key except [limits]'s examples (unset by default)
    before_limits, limits_and_after = text.split("\n[limits]\n", 1)
    limits, after = limits_and_after.split("\n[", 1)
    uncomment = re.compile(r"^#(\w+ = )", re.M)
    live = uncomment.sub(r"\1", before_limits) + "\n[limits]\n" + limits
    live += "\n[" + uncomment.sub(r"\1", after)
    assert len(uncomment.findall(text)) > 40
    assert load(live, tmp_path) == config.Config()


def test_every_key_is_in_the_file() -> None:
    text = rendered()
    for f in dataclasses.fields(config.Config):
        if f.name == "source":
            continue
        assert f"\n[{f.name}]\n" in text
        section = text.split(f"\n[{f.name}]\n", 1)[1].split("\n[", 1)[0]
        for key in dataclasses.fields(getattr(config.Config(), f.name)):
            assert re.search(rf"^#\[*(network\.)?{key.name}\b", section, re.M), key.name
