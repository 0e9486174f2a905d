"""nsctl's bash completion: its lists match the parser, and bash completes with it."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
from pathlib import Path

from nsd.cli import parser

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "contrib" / "bash-completion" / "nsctl"
GLOBAL = {"--json", "--socket", "--help"}


def parser_commands() -> dict[str, set[str]]:
    sub = next(a for a in parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {
        name: {o for a in c._actions for o in a.option_strings if o.startswith("--")} - GLOBAL
        for name, c in sub.choices.items()
    }


def test_lists_match_the_parser() -> None:
    text = SCRIPT.read_text()
    commands = re.search(r'^_nsctl_commands="([^"]*)"', text, re.M)
    assert commands is not None
    options = dict(re.findall(r'^\s+\[(\w+)\]="([^"]*)"$', text, re.M))
    expected = parser_commands()
    assert commands.group(1).split() == list(expected)
    assert {k: set(v.split()) for k, v in options.items()} == {
        k: v for k, v in expected.items() if v
    }


def complete(*words: str, path: str = "") -> list[str]:
    """What bash offers for the last of ``words`` (an empty string: a new word)."""
    line = " ".join(("nsctl", *words))
    script = (
        f"source {SCRIPT}\n"
        f"COMP_WORDS=(nsctl {' '.join(repr(w) for w in words)}); COMP_CWORD={len(words)}\n"
        f"COMP_LINE={line!r}; COMP_POINT={len(line)}\n"
        '_nsctl; printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    env = dict(os.environ, PATH=f"{path}:{os.environ['PATH']}" if path else os.environ["PATH"])
    out = subprocess.run(
        ["bash", "-c", script], capture_output=True, text=True, env=env, check=True
    )
    return sorted(w for w in out.stdout.splitlines() if w)


def test_commands_and_options() -> None:
    assert complete("sh") == ["show"]
    assert complete("re") == ["reconcile", "remove"]
    assert complete("remove", "alice", "--f") == ["--force"]
    assert complete("show", "alice", "--j") == ["--json"]
    assert complete("top", "--sort", "w") == ["wset"]
    assert complete("net", "alice", "--reset", "") == ["egress", "ingress"]
    assert complete("run", "alice", "--", "l") == []
