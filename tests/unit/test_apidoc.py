from __future__ import annotations

from pathlib import Path

from nsd.varlink import apidoc


def test_api_reference_matches_idl() -> None:
    committed = (Path(__file__).resolve().parents[2] / "docs" / "api.md").read_text()
    assert committed == apidoc.render(), "regenerate: python -m nsd.varlink.apidoc > docs/api.md"
