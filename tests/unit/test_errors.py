"""Every error the API sends is a class in nsd.errors, named like its IDL error."""

from __future__ import annotations

import inspect
from importlib.resources import files

from nsd import errors
from nsd.api.handlers import DAEMON_INTERFACE, TENANT_INTERFACE, varlink_error
from nsd.varlink import idl

IDL_ERRORS = {
    name
    for interface in (TENANT_INTERFACE, DAEMON_INTERFACE)
    for name in idl.parse(
        files("nsd.varlink").joinpath(f"{interface}.varlink").read_text("utf-8")
    ).errors
}
CLASSES = [
    c
    for _, c in inspect.getmembers(errors, inspect.isclass)
    if issubclass(c, errors.NsdError) and c is not errors.NsdError
]


def test_each_class_is_an_idl_error_of_its_own_name() -> None:
    for cls in CLASSES:
        assert cls.name == cls.__name__
        if cls is not errors.PermissionDenied:  # the standard org.varlink.service error
            assert cls.name in IDL_ERRORS, cls


def test_no_error_class_outside_nsd_errors() -> None:
    import pkgutil

    import nsd

    for info in pkgutil.iter_modules(nsd.__path__):
        if info.name in ("errors", "__main__"):
            continue
        module = __import__(f"nsd.{info.name}", fromlist=["_"])
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, errors.NsdError):
                assert cls.__module__ == "nsd.errors", (info.name, cls)


def test_mapping_keeps_parameters_and_drops_nulls() -> None:
    e = errors.AddressConflict("ipv4", "100.64.0.0/16", "100.64.3.233")
    wire = varlink_error(TENANT_INTERFACE, e)
    assert wire.name == "io.nsd.Tenant.AddressConflict"
    assert wire.parameters == {"family": "ipv4", "pool": "100.64.0.0/16",
                               "address": "100.64.3.233"}  # fmt: skip
    failed = varlink_error(TENANT_INTERFACE, errors.NetworkSetupFailed("a", "veth", "x", None))
    assert "errno" not in failed.parameters
    denied = varlink_error(TENANT_INTERFACE, errors.PermissionDenied("no"))
    assert (denied.name, denied.parameters) == ("org.varlink.service.PermissionDenied", {})
