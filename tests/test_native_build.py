"""The native I/O core is part of the package: `pip install` built it with maturin."""

from __future__ import annotations

import pathlib
import tomllib

CRATE = pathlib.Path(__file__).resolve().parent.parent / "native" / "Cargo.toml"


def test_the_native_module_is_built_from_this_checkout_s_crate() -> None:
    from ioserver import _native

    with CRATE.open("rb") as manifest:
        crate = tomllib.load(manifest)
    assert _native.__version__ == crate["package"]["version"]
