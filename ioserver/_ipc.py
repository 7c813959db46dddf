"""The ``ipc://`` control endpoint's safety checks, shared by the daemon and its clients.

An ``ipc://`` endpoint is a Unix socket file; whoever can connect to it owns the daemon's
ports, and whoever made the file receives every command a client sends.  Its protection
is the file system: the socket lives in a directory of its user's with mode 0700, the
socket itself is 0600.  The default endpoint without ``XDG_RUNTIME_DIR`` is
``<tmp>/ioserver-<uid>/control``, a name any local user can create first in a shared
``/tmp``; so both sides check before they trust the path, and neither follows a symbolic
link:

- the directory must be a real directory (``lstat``: not a symbolic link), owned by this
  user (the effective uid), with no permission bit for group or others;
- the socket file, if present, must be a socket (not a link), owned by this user;
- where the platform reports it, the client checks the peer's credentials: libzmq appends
  ``:uid:gid:pid`` from ``SO_PEERCRED`` (``LOCAL_PEERCRED`` on BSDs) to the
  ``Peer-Address`` property of every message received on an ``ipc://`` connection, and
  the client refuses a daemon whose first answer comes from another uid - before it sends
  anything but HELLO.

A failed check raises :exc:`~ioserver.UnsafeEndpointError`, whose message says what is
wrong and what to do.  Nothing here changes the file system except :func:`make_directory`
creating a missing directory with mode 0700.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import zmq

from ._exceptions import UnsafeEndpointError

__all__ = [
    "check_directory",
    "check_socket",
    "client_check",
    "is_stale",
    "make_directory",
    "peer_uid",
    "refuse_peer",
    "stale_message",
]


def _refuse(text: str) -> UnsafeEndpointError:
    return UnsafeEndpointError(text, errno.EPERM, "EPERM")


def check_directory(directory: str) -> None:
    """Check that the control socket's ``directory`` is private to this user.

    Raises:
        FileNotFoundError: it does not exist.
        UnsafeEndpointError: a symbolic link, not a directory, owned by another uid, or
            with group/other permission bits.
    """
    info = os.lstat(directory)
    if stat.S_ISLNK(info.st_mode):
        try:
            target = os.readlink(directory)
        except OSError:  # pragma: no cover - removed meanwhile
            target = "?"
        raise _refuse(
            f"{directory} is a symbolic link (to {target}); the control socket's directory "
            "must be a real directory of yours, mode 0700 (another user may have planted "
            "the link): remove it, or choose another endpoint"
        )
    if not stat.S_ISDIR(info.st_mode):
        raise _refuse(f"{directory} is not a directory; choose another endpoint")
    uid = os.geteuid()
    if info.st_uid != uid:
        raise _refuse(
            f"{directory} belongs to uid {info.st_uid}, not to this user (uid {uid}): "
            "another user may have planted it to receive the daemon's commands; have it "
            "removed (by its owner or root), or choose another endpoint (--endpoint, or "
            "set XDG_RUNTIME_DIR)"
        )
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o077:
        raise _refuse(
            f"{directory} is open to other users (mode {mode:o}): the control socket's "
            f"directory must be 0700; check that nobody else put files there, then "
            f"`chmod 700 {directory}`, or choose another endpoint"
        )


def check_socket(path: str) -> bool:
    """Check the socket file at ``path`` (not following a link); False when absent.

    Raises:
        UnsafeEndpointError: a symbolic link, not a socket, or owned by another uid.
    """
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return False
    if stat.S_ISLNK(info.st_mode):
        raise _refuse(f"{path} is a symbolic link, not the daemon's socket; not using it")
    if not stat.S_ISSOCK(info.st_mode):
        raise _refuse(f"{path} exists and is not a socket; not touching it")
    uid = os.geteuid()
    if info.st_uid != uid:
        raise _refuse(
            f"{path} belongs to uid {info.st_uid}, not to this user (uid {uid}): it is not "
            "your daemon's socket; not using it"
        )
    return True


def make_directory(directory: str) -> None:
    """Create the control socket's directory (mode 0700) if missing, then check it.

    Raises:
        UnsafeEndpointError: as :func:`check_directory`.
        OSError: it cannot be created.
    """
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
    except FileExistsError:
        pass  # a dangling symbolic link, or not a directory: check_directory says which
    check_directory(directory)


def client_check(path: str) -> bool:
    """A client's checks before connecting to the ``ipc://`` socket at ``path``.

    Returns False when the directory or the socket does not exist (no daemon there).

    Raises:
        UnsafeEndpointError: the directory or the socket fails a check (module docstring).
    """
    try:
        check_directory(os.path.dirname(os.path.abspath(path)))
    except FileNotFoundError:
        return False
    return check_socket(path)


def is_stale(path: str) -> bool:
    """Whether the Unix socket file at ``path`` is *stale*: nothing listens on it (its
    daemon died without removing it).

    The probe is a non-blocking ``connect(2)``: ``ECONNREFUSED`` means no process holds
    the listening socket any more, which the kernel knows at once - no timeout is waited
    for.  Any other outcome (connected, a full backlog, a permission error) counts as a
    live socket.  A connection that succeeds is closed at once; libzmq drops it as a peer
    that never greeted.
    """
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.setblocking(False)
        probe.connect(path)
    except ConnectionRefusedError:
        return True
    except OSError:
        return False
    finally:
        probe.close()
    return False


def stale_message(endpoint: str) -> str:
    """The one line said about a stale socket, by ``ioserver status`` and clients."""
    return (
        f"stale socket, no daemon: {endpoint} is left from a daemon that died "
        "(`ioserver serve` removes it when it starts)"
    )


def peer_uid(frame: zmq.Frame) -> int | None:
    """The uid of the process that sent ``frame`` (a :class:`zmq.Frame` received on an
    ``ipc://`` connection), or None where libzmq does not report it."""
    try:
        address = frame.get("Peer-Address")
    except Exception:  # no such property on this libzmq
        return None
    if not isinstance(address, str):
        return None
    parts = address.rsplit(":", 3)
    if len(parts) != 4 or not parts[1].isdigit():
        return None
    return int(parts[1])


def refuse_peer(endpoint: str, uid: int) -> UnsafeEndpointError:
    """The error for a daemon at ``endpoint`` that runs as another ``uid``."""
    return _refuse(
        f"the process answering at {endpoint} runs as uid {uid}, not as this user "
        f"(uid {os.geteuid()}): it is not your daemon; stopped talking to it (it got no "
        "more than the greeting)"
    )
