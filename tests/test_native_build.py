"""The native I/O core is part of the package: `pip install` built it with maturin."""

from __future__ import annotations

import pathlib
import tomllib

import pytest

# No I/O core of $IOSERVER_CORE's choice (the build's configuration): CI's second pass, on the
# Python core, leaves these tests out (tests/conftest.py checks the mark).
pytestmark = pytest.mark.core_independent

CRATE = pathlib.Path(__file__).resolve().parent.parent / "native" / "Cargo.toml"


def test_the_native_module_is_built_from_this_checkout_s_crate() -> None:
    from ioserver import _native

    with CRATE.open("rb") as manifest:
        crate = tomllib.load(manifest)
    assert _native.__version__ == crate["package"]["version"]
