"""nsctl takes its options anywhere on the line, as systemctl and machinectl do."""

from __future__ import annotations

import argparse

import pytest

from nsd.cli import DEFAULT_SOCKET, parser


@pytest.mark.parametrize(
    "argv",
    [
        ["--json", "show", "alice"],
        ["show", "alice", "--json"],
        ["show", "--json", "alice"],
    ],
)
def test_json_before_or_after_the_command(argv: list[str]) -> None:
    args = parser().parse_args(argv)
    assert (args.command, args.user, args.json) == ("show", "alice", True)


def test_defaults_survive_the_subcommand(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NSD_SOCKET", raising=False)
    args = parser().parse_args(["list"])
    assert (args.json, args.socket) == (False, DEFAULT_SOCKET)


def test_an_option_before_the_command_is_not_reset_after_it() -> None:
    args = parser().parse_args(["--socket", "/x", "--json", "list"])
    assert (args.socket, args.json) == ("/x", True)


def test_socket_after_the_command() -> None:
    args = parser().parse_args(["top", "--socket", "/y", "--sort", "memory"])
    assert (args.command, args.socket) == ("top", "/y")


def test_options_after_double_dash_belong_to_the_command() -> None:
    args = parser().parse_args(["run", "alice", "--", "sh", "-c", "x", "--json"])
    assert args.json is False
    assert args.argv[-1] == "--json"


def test_every_command_takes_the_global_options() -> None:
    sub = next(a for a in parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, command in sub.choices.items():
        options = {o for a in command._actions for o in a.option_strings}
        assert {"--json", "--socket"} <= options, name
