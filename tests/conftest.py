"""Shared fixtures: the two backends, an I/O server per test, and the leak check."""

from __future__ import annotations

import os
import threading
from collections.abc import AsyncIterator

import pytest

import ioserver
from ioserver._poller import POLLERS


@pytest.fixture(
    params=[
        pytest.param("asyncio", id="asyncio"),
        pytest.param("trio", id="trio"),
    ]
)
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """Every ``@pytest.mark.anyio`` test runs once on asyncio and once on trio."""
    return str(request.param)


def _open_fds() -> dict[int, str]:
    fds = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            fds[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            pass  # the fd listdir itself used
    return fds


def _ioserver_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("ioserver")]


@pytest.fixture
async def no_leaks() -> AsyncIterator[None]:
    """Fail the test if it leaves an ioserver thread or a file descriptor behind.

    Async, so that it runs inside the test's event loop, whose own descriptors therefore
    exist before the snapshot.
    """
    if not os.path.isdir("/proc/self/fd"):  # pragma: no cover - not Linux
        pytest.skip("the fd leak check needs /proc/self/fd (Linux)")
    fds_before = _open_fds()
    yield
    threads = _ioserver_threads()
    leaked = {fd: target for fd, target in _open_fds().items() if fd not in fds_before}
    assert not threads, f"threads left running: {threads}"
    assert not leaked, f"file descriptors left open: {leaked}"


#: The selector backends an ``every_poller`` test runs under (see :func:`poller`).
EVERY_POLLER = [name for name in ("epoll", "poll", "select") if name in POLLERS]


#: The I/O cores an ``every_core`` test runs on (see :func:`core`).
EVERY_CORE = ["python", "native"]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A test marked ``every_poller`` runs once per selector backend: its ``ios`` (and
    anything that asks for ``poller``) uses each in turn.  A test marked ``every_core``
    runs once per I/O core (``ioserver.open(core=...)``)."""
    if metafunc.definition.get_closest_marker("every_poller") is not None:
        metafunc.parametrize("poller", EVERY_POLLER)
    if (
        metafunc.definition.get_closest_marker("every_core") is not None
        and "core" in metafunc.fixturenames
    ):
        metafunc.parametrize("core", EVERY_CORE)


@pytest.fixture
def core() -> str | None:
    """The I/O core of ``ios``: ``None`` (``$IOSERVER_CORE``, else the Python core) unless
    the test is marked ``every_core`` (then each of :data:`EVERY_CORE`)."""
    return None


def _effective_core(core: str | None) -> str:
    return core or os.environ.get("IOSERVER_CORE") or "python"


@pytest.fixture
def poller() -> str | None:
    """The selector backend of ``ios``: the platform's default unless the test is marked
    ``every_poller`` (then each of :data:`EVERY_POLLER`)."""
    return None


@pytest.fixture
async def ios(
    no_leaks: None, poller: str | None, core: str | None
) -> AsyncIterator[ioserver.IOServer]:
    """An I/O server for this test, closed (thread joined, sockets closed) after it."""
    if poller not in (None, "epoll") and _effective_core(core) == "native":
        pytest.skip("the native core polls with epoll only")
    async with ioserver.open(poller=poller, core=core) as server:
        if poller is not None:
            assert server.statistics().poller == poller
        yield server
