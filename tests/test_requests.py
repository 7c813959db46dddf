"""Open requests are named, frozen values (ioserver._requests), the same for the I/O thread,
the daemon's control endpoint and the daemon's client."""

from __future__ import annotations

import dataclasses
import socket

import pytest

from ioserver._contract import ConnectRequest, ListenRequest, UDPRequest

# No I/O core of $IOSERVER_CORE's choice (the request records alone): CI's second pass, on the
# Python core, leaves these tests out (tests/conftest.py checks the mark).
pytestmark = pytest.mark.core_independent


def test_open_requests_are_frozen_and_named() -> None:
    inbox: list[object] = []
    connect = ConnectRequest(
        None, inbox.append, socket.AF_INET, ("example.org", 80), {}, (-1, False)
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        connect.address = ("127.0.0.1", 80)  # type: ignore[misc]
    # A name resolved later (the daemon's control endpoint) makes a new request.
    resolved = dataclasses.replace(connect, address=("127.0.0.1", 80))
    assert resolved.address == ("127.0.0.1", 80) and connect.address == ("example.org", 80)
    assert resolved.deliver == inbox.append and resolved.active == (-1, False)
    for kind in (ConnectRequest, ListenRequest, UDPRequest):
        assert dataclasses.is_dataclass(kind) and kind.__dataclass_params__.frozen  # type: ignore[attr-defined]
        names = [field.name for field in dataclasses.fields(kind)]
        assert names[:3] == ["port", "deliver", "family"] and "active" in names
    # make_port is the last field every listen request gives; what follows is optional
    # (TLS: the context and the handshake's timeout), so the daemon's requests are unchanged.
    fields = dataclasses.fields(ListenRequest)
    names = [f.name for f in fields]
    after = fields[names.index("make_port") + 1 :]
    assert [f.name for f in after] == ["tls", "tls_handshake_timeout"]
    assert all(f.default is None for f in after)
    connect_fields = {f.name: f.default for f in dataclasses.fields(ConnectRequest)}
    assert connect_fields["tls"] is None and connect_fields["server_hostname"] is None
