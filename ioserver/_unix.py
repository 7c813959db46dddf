"""Unix stream sockets in the I/O thread: listening on a path, with its socket file.

A Unix stream connection is a TCP-like byte stream, so it is an ordinary STREAM ``Conn``
(framing, flow control and the hot path unchanged), connecting goes through TCP's
(``ioserver/_tcp.py``, with ``AF_UNIX``) and so does the listen step
(:func:`~._tcp.open_listener`).  What is particular is the listener's socket file, handled
here:

* **Stale files.**  A socket file left behind by a process that died blocks ``bind`` with
  ``EADDRINUSE``.  Before binding, a socket file at the path is checked: when Linux's
  ``/proc/net/unix`` lists a listener bound to that path, it is live; otherwise it is
  probed with a non-blocking connect: refused means nobody listens, so the file is stale
  and removed; accepted (or ``EAGAIN``: a full backlog) means a live listener (which then
  sees one connection open and close: the price of the probe, paid only when the
  listener bound a relative path or lives in another network namespace).  A live path
  makes ``bind`` fail with ``EADDRINUSE``, as it should.  A file that is not a socket is
  never removed.
* **Removal on close.**  The listening socket is a :class:`_UnixListenerSocket`, whose
  ``close`` removes the socket file it created - and only that file: if something else
  replaced it meanwhile (another device or inode), it is left alone.  Every way a
  listener closes (the owner closes it, it fails, the I/O thread stops) goes through it.

A path starting with ``"\\0"`` (or ``b"\\0"``) is in Linux's abstract namespace: no file,
nothing to probe or remove.

On the native core (``ioserver._native_core``), the loop's thread binds the socket
(:func:`listen_unix_socket`: the same stale-file check and bind) and hands it to the
native I/O thread with its file's identity; that thread removes the file when the
listener's socket closes, by the same rule (``native/src/sock.rs``, ``SocketFile``).
"""

from __future__ import annotations

import errno
import os
import socket
import stat

from ._contract import ListenRequest
from ._exceptions import OptionError
from ._tcp import StreamHost, listen_bound, open_listener

__all__ = [
    "check_path",
    "cmd_listen_unix",
    "is_abstract",
    "listen_unix_socket",
    "remove_socket_file",
    "remove_stale_socket_file",
]


def check_path(path: object) -> str | bytes:
    """``path`` as a Unix socket address: a non-empty ``str`` or ``bytes`` (a path-like
    is converted) of at most 107 bytes once encoded as file names are (``sun_path`` holds
    108 with the final NUL).

    Raises:
        OptionError: anything else, or a path too long (the message gives its size).
    """
    if isinstance(path, os.PathLike):
        path = os.fspath(path)
    if not isinstance(path, (str, bytes)) or not path:
        raise OptionError(f"a Unix socket path is a non-empty str, bytes or path, not {path!r}")
    limit = 107  # sun_path holds 108 bytes with the final NUL
    size = len(os.fsencode(path))
    if size > limit:
        raise OptionError(f"the Unix socket path is {size} bytes long; the limit is {limit}")
    return path


def is_abstract(path: str | bytes) -> bool:
    """True for a path in Linux's abstract namespace (it starts with a NUL)."""
    return path[:1] in ("\0", b"\0")


class _UnixListenerSocket(socket.socket):
    """A listening Unix socket that removes its socket file when it closes.

    Sockets it accepts are plain sockets (``socket.accept`` makes them so).
    """

    path: str | bytes | None = None
    identity: tuple[int, int] | None = None

    def close(self) -> None:
        path, identity = self.path, self.identity
        super().close()
        if path is not None and identity is not None:
            remove_socket_file(path, identity)
        self.path = self.identity = None  # last: None means the file is dealt with


def remove_socket_file(path: str | bytes, identity: tuple[int, int]) -> None:
    """Remove the socket file at ``path`` if it is still the one bound there: the same
    ``(st_dev, st_ino)`` as ``identity``.  A file that replaced it is left alone."""
    try:
        info = os.stat(path)
        if (info.st_dev, info.st_ino) == identity:
            os.unlink(path)
    except OSError:
        pass  # already gone, or not ours to remove


_ACCEPTING = 0x10000  # __SO_ACCEPTCON in /proc/net/unix's Flags: a listening socket


def _listed_as_listening(path: str | bytes) -> bool:
    """True if ``/proc/net/unix`` (Linux) lists a listening socket bound to ``path``."""
    try:
        with open("/proc/net/unix", "rb") as table:
            lines = table.read().splitlines()[1:]
    except OSError:
        return False
    target = os.fsencode(os.path.abspath(path))
    for line in lines:
        fields = line.split(None, 7)
        if len(fields) == 8 and fields[7] == target and int(fields[3], 16) & _ACCEPTING:
            return True
    return False


def remove_stale_socket_file(path: str | bytes) -> None:
    """Remove the socket file at ``path`` if no process listens on it.

    A live socket, a file that is not a socket, and a missing file are left as they are
    (``bind`` then reports ``EADDRINUSE`` for the first two).
    """
    if is_abstract(path):
        return
    try:
        info = os.lstat(path)
    except OSError:
        return
    if not stat.S_ISSOCK(info.st_mode) or _listed_as_listening(path):
        return
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.setblocking(False)
        result = probe.connect_ex(path)
    if result == errno.ECONNREFUSED:
        try:
            os.unlink(path)
        except OSError:
            pass


def _bind_unix(path: str | bytes) -> _UnixListenerSocket:
    """A non-blocking Unix stream socket bound to ``path`` (a stale socket file there
    removed first), which removes its socket file when it closes."""
    remove_stale_socket_file(path)
    sock = _UnixListenerSocket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.bind(path)
        if not is_abstract(path):
            info = os.stat(path)
            sock.path, sock.identity = path, (info.st_dev, info.st_ino)
    except BaseException:
        sock.close()
        raise
    return sock


def listen_unix_socket(
    path: str | bytes, backlog: int
) -> tuple[socket.socket, tuple[bytes, tuple[int, int]] | None]:
    """A plain ``socket.socket`` bound to the Unix ``path`` (a stale socket file there
    removed first, as :func:`cmd_listen_unix` does) and listening with ``backlog``: the
    native core's listen step, made on the loop's thread.  Returns the socket and its
    file as ``(fsencoded path, (st_dev, st_ino))`` (None in the abstract namespace): the
    caller owns both, and removes the file (:func:`remove_socket_file`) if it does not
    hand them on.

    Raises:
        ConnectError: the path is in use (``"EADDRINUSE"``), its directory is missing
            (``"ENOENT"``) or not writable (``"EACCES"``)...; nothing is left behind.
    """
    bound = listen_bound(lambda: _bind_unix(path), backlog, f"the Unix socket {path!r}")
    assert isinstance(bound, _UnixListenerSocket)
    identity = bound.identity
    bound.path = bound.identity = None  # the file is the caller's from here
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, fileno=bound.detach())
    file = None if identity is None else (os.fsencode(path), identity)
    return sock, file


def cmd_listen_unix(io: StreamHost, request: object, spec: ListenRequest) -> None:
    """Listen on a Unix path on the I/O thread: answer ``request`` with
    ``(listener conn, path, None)`` or a :class:`ConnectError`.  Queued bound to its
    ``io`` (``functools.partial``); the listen step is TCP's (:func:`~._tcp.open_listener`)."""
    path = spec.address
    assert isinstance(path, (str, bytes))
    open_listener(
        io,
        request,
        spec,
        lambda: _bind_unix(path),
        f"the Unix socket {path!r}",
        sockname=lambda sock: path,
    )
