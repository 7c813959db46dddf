"""The layering of the three packages, read from their import statements (with ast).

``ioserver/`` is the lower floor (the I/O thread and what it shares with the loops): it
imports nothing from ``ports/`` (the loop's half) nor ``client/`` (the daemon's client),
which both build on it.  And no module imports, even lazily or for type checking only, a
module that imports it back: a circle makes the import order matter and hides which of
two modules is the lower one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

# No I/O core of $IOSERVER_CORE's choice (the sources' imports): CI's second pass, on the
# Python core, leaves these tests out (tests/conftest.py checks the mark).
pytestmark = pytest.mark.core_independent

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("ioserver", "ports", "client")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {
        _module_name(path): path for package in PACKAGES for path in (ROOT / package).glob("*.py")
    }


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Every module of the three packages ``name`` imports, wherever the import is (at the
    top, in a function, under ``if TYPE_CHECKING``)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            # ``from . import _protocol`` imports a module; ``from . import x`` a name.
            targets = [
                f"{module}.{alias.name}" if f"{module}.{alias.name}" in known else module
                for alias in node.names
            ]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target:
                found.add(target)
    found.discard(name)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, set(modules)) for name, path in modules.items()}


def test_the_graph_is_read() -> None:
    graph = _graph()
    # A sample of edges known to exist, so that a parser that finds nothing fails here.
    assert "ioserver._iothread" in graph["ports._port"]
    assert "ioserver._options" in graph["ioserver._open_commands"]
    assert "ioserver._protocol" in graph["client._remote"]  # from ioserver import _protocol


def test_ioserver_imports_neither_ports_nor_client() -> None:
    upward = {
        (name, target)
        for name, targets in _graph().items()
        if name.split(".")[0] == "ioserver"
        for target in targets
        if target.split(".")[0] in ("ports", "client")
    }
    assert not upward, f"the lower floor imports the upper ones: {sorted(upward)}"


def test_no_import_circle() -> None:
    graph = _graph()
    # A package's modules may read their package's own public face (``from . import
    # __version__`` at call time): the face re-exports them, that is not a layering edge.
    for name, targets in graph.items():
        for target in list(targets):
            if "." not in target and name.startswith(target + "."):
                targets.discard(target)
    # Depth-first search; a back edge is a circle.
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    circles: list[list[str]] = []

    def visit(name: str, stack: list[str]) -> None:
        state[name] = 1
        stack.append(name)
        for target in sorted(graph[name]):
            if state.get(target) == 1:
                circles.append([*stack[stack.index(target) :], target])
            elif target not in state:
                visit(target, stack)
        stack.pop()
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [])
    assert not circles, "import circles: " + "; ".join(" -> ".join(c) for c in circles)


_MODE_NAMES = {"raw", "line", "msgpack", "resp"}
# Where a packet mode's name may be compared: the framing module, which maps names to
# framers, and typed RPC, which accepts only some modes.  Anything else asks the framer
# (``Framer.decodes_objects``, ``port_framer``), so that the modes' rules live in one place.
_MAY_NAME_MODES = {"ioserver._framing", "ports._rpc"}


def test_only_the_framing_module_keys_on_packet_mode_names() -> None:
    found = []
    for name, path in _modules().items():
        if name in _MAY_NAME_MODES:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Compare):
                for constant in ast.walk(node):
                    if isinstance(constant, ast.Constant) and constant.value in _MODE_NAMES:
                        found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not found, f"packet modes compared by name: {found}"


def test_each_port_kind_is_a_same_named_pair() -> None:
    # A port kind's I/O half (ioserver/_KIND.py) and loop half (ports/_KIND.py) carry the
    # same name, and the loop half imports its I/O half: a new kind copies one pair.
    graph = _graph()
    for kind in ("tcp", "udp", "unix", "process", "zmq"):
        io_half, loop_half = f"ioserver._{kind}", f"ports._{kind}"
        assert io_half in graph and loop_half in graph, kind
    for kind in ("udp", "unix", "process", "zmq"):
        assert f"ioserver._{kind}" in graph[f"ports._{kind}"], kind


def _attribute_calls(module: str) -> set[str]:
    path = ROOT / (module.replace(".", "/") + ".py")
    return {
        node.func.attr
        for node in ast.walk(ast.parse(path.read_text(), str(path)))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
    }


def test_the_round_keeps_registration_and_dispatch_only() -> None:
    # TCP's connect, listen and accept are ioserver/_tcp.py's, the memory budget is
    # ioserver/_flow.py's (MemoryBudget): the round dispatches to them and keeps no copy.
    path = ROOT / "ioserver" / "_iothread.py"
    tree = ast.parse(path.read_text(), str(path))
    syscalls = _attribute_calls("ioserver._iothread") & {"accept", "bind", "connect_ex", "listen"}
    assert not syscalls, f"the round connects, listens or accepts itself: {sorted(syscalls)}"
    budget_state = {"_globally_paused", "_reserve_waiters", "memory_reserve", "peak_memory"}
    found = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    found |= {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
    assert not found & budget_state, f"the round keeps budget state: {found & budget_state}"
    assert "ioserver._tcp" in _graph()["ioserver._iothread"]


def test_unix_listens_through_tcps_listen_step_on_both_sides() -> None:
    # One listen helper: Unix binds its path and keeps its socket file, nothing more.
    graph = _graph()
    assert "ioserver._tcp" in graph["ioserver._unix"]
    assert "listen" not in _attribute_calls("ioserver._unix")
    assert "ports._tcp" in graph["ports._unix"]
    path = ROOT / "ports" / "_unix.py"
    names = {
        node.id
        for node in ast.walk(ast.parse(path.read_text(), str(path)))
        if isinstance(node, ast.Name)
    }
    assert not names & {"ListenRequest", "ConnectRequest", "_Request"}, (
        "ports/_unix.py opens by itself"
    )
