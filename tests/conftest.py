"""Shared fixtures: the two backends, an I/O server per test, and the leak check."""

from __future__ import annotations

import os
import threading
from collections.abc import AsyncIterator, Callable

import anyio
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

#: The native core's I/O backends an ``every_core`` test runs its native ``ios`` on (see
#: :func:`io_backend`): ``(core, io_backend)`` pairs, with their test ids.
EVERY_CORE_AND_IO_BACKEND = [
    pytest.param("python", None, id="python"),
    pytest.param("native", "epoll", id="native-epoll"),
    pytest.param("native", "io_uring", id="native-io_uring"),
]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A test marked ``every_poller`` runs once per selector backend: its ``ios`` (and
    anything that asks for ``poller``) uses each in turn.  A test marked ``every_core``
    runs once per I/O core (``ioserver.open(core=...)``), and on the native core once per
    I/O backend (``io_backend=...``) when it uses ``ios``."""
    if metafunc.definition.get_closest_marker("every_poller") is not None:
        metafunc.parametrize("poller", EVERY_POLLER)
    if (
        metafunc.definition.get_closest_marker("every_core") is not None
        and "core" in metafunc.fixturenames
    ):
        if "io_backend" in metafunc.fixturenames:
            metafunc.parametrize(("core", "io_backend"), EVERY_CORE_AND_IO_BACKEND)
        else:
            metafunc.parametrize("core", EVERY_CORE)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test run under a poller only the Python core has (a ``poller`` parameter other
    than epoll: ``every_poller``'s, or the test's own) is a test of a Python core feature:
    marked ``python_core``, as :func:`_python_core_features` runs it on that core whatever
    ``IOSERVER_CORE`` says.  (Before ``-m`` deselects: CI's second pass, on the Python
    core, does not run it a second time.)  A ``core_independent`` test is marked neither
    ``python_core`` nor ``every_core``."""
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and callspec.params.get("poller") not in (None, "epoll"):
            item.add_marker(pytest.mark.python_core)
        if item.get_closest_marker("core_independent") is not None and (
            item.get_closest_marker("python_core") is not None
            or item.get_closest_marker("every_core") is not None
        ):
            # (Each sets $IOSERVER_CORE or the core its own way: one mark per test.)
            raise pytest.UsageError(
                f"{item.nodeid}: core_independent with python_core or every_core"
            )


@pytest.fixture
def core() -> str | None:
    """The I/O core of ``ios``: ``None`` (``$IOSERVER_CORE``, else the native core) unless
    the test is marked ``every_core`` (then each of :data:`EVERY_CORE`)."""
    return None


def _effective_core(core: str | None) -> str:
    return core or os.environ.get("IOSERVER_CORE") or "native"


@pytest.fixture
def io_backend() -> str | None:
    """The native core's I/O backend of ``ios``: ``None`` (``$IOSERVER_IO_BACKEND``, else
    io_uring where the kernel allows it) unless the test is marked ``every_core`` (then
    ``"epoll"`` and ``"io_uring"`` on the native core)."""
    return None


#: Seconds between two looks at the I/O thread's state in :func:`until`.
UNTIL_INTERVAL = 0.001


async def until(condition: Callable[[], object], seconds: float = 10) -> None:
    """Wait until ``condition()`` is true - the I/O thread's state (a counter of
    ``statistics()``, a port's), seen from the loop - or fail with ``TimeoutError``
    after ``seconds``.

    It looks again every :data:`UNTIL_INTERVAL` seconds, sleeping in between, not at
    every checkpoint: a loop that only checkpoints never sleeps, so it keeps the GIL
    but for the interpreter's switch interval (5 ms) and the Python core's I/O thread,
    which needs it after each system call, falls behind by that much per call (a step
    of 600 reads took 10 s on trio instead of 0.3 s)."""
    with anyio.fail_after(seconds):
        while not condition():  # noqa: ASYNC110 (the I/O thread sets no Event)
            await anyio.sleep(UNTIL_INTERVAL)


_io_uring_refusal: list[str | None] = []


def io_uring_refusal() -> str | None:
    """Why this kernel refuses the native core's io_uring backend, or None (asked once)."""
    if not _io_uring_refusal:
        from ioserver import _native

        try:
            _native.Core(64, "io_uring").close_commands()
        except OSError as exc:
            _io_uring_refusal.append(f"io_uring is refused here: {exc}")
        else:
            _io_uring_refusal.append(None)
    return _io_uring_refusal[0]


@pytest.fixture
def needs_io_uring() -> None:
    """Skip the test where the kernel refuses io_uring (saying why)."""
    refusal = io_uring_refusal()
    if refusal is not None:
        pytest.skip(refusal)


@pytest.fixture
def poller() -> str | None:
    """The selector backend of ``ios``: the platform's default unless the test is marked
    ``every_poller`` (then each of :data:`EVERY_POLLER`)."""
    return None


@pytest.fixture(autouse=True)
def _python_core_features(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """A test of a feature of the Python core - a poller other than epoll (a ``poller``
    parameter, or the ``python_core`` mark), its I/O thread's internals (``python_core``) -
    runs on the Python core whatever ``IOSERVER_CORE`` says, its subprocesses too: the
    native core polls with epoll and writes through its own backends
    (docs/reference/cores.rst)."""
    callspec = getattr(request.node, "callspec", None)
    poller = callspec.params.get("poller") if callspec is not None else None
    if request.node.get_closest_marker("python_core") is not None or poller not in (
        None,
        "epoll",
    ):
        monkeypatch.setenv("IOSERVER_CORE", "python")


#: ``$IOSERVER_CORE`` during a ``core_independent`` test: no core's name, so that a server
#: it opened on the environment's choice (``core=None``, in the test or a program it runs)
#: would fail with ``OptionError`` instead of passing on whichever core CI chose.
NO_CORE = "none-for-a-core_independent-test"


@pytest.fixture(autouse=True)
def _core_independent(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """A test marked ``core_independent`` (its outcome does not depend on
    ``$IOSERVER_CORE``: pure logic, the docs, or the core it names itself) runs with
    ``$IOSERVER_CORE`` set to :data:`NO_CORE`: the mark is checked on every run, and CI's
    second pass, on the Python core, can leave the test out (it ran on the first)."""
    if request.node.get_closest_marker("core_independent") is not None:
        monkeypatch.setenv("IOSERVER_CORE", NO_CORE)


@pytest.fixture
async def ios(
    no_leaks: None, poller: str | None, core: str | None, io_backend: str | None
) -> AsyncIterator[ioserver.IOServer]:
    """An I/O server for this test, closed (thread joined, sockets closed) after it."""
    if poller not in (None, "epoll") and _effective_core(core) == "native":
        pytest.skip("the native core polls with epoll only")
    if io_backend == "io_uring" and (refusal := io_uring_refusal()) is not None:
        pytest.skip(refusal)
    async with ioserver.open(poller=poller, core=core, io_backend=io_backend) as server:
        if poller is not None:
            assert server.statistics().poller == poller
        if io_backend is not None:
            assert server.statistics().io_backend == io_backend
        yield server
