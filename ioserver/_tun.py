"""TUN/TAP devices in the I/O thread (Linux): each packet read is one message, each send
one packet written.

A TUN/TAP file descriptor is a packet descriptor like a UDP socket's, read with ``read``
and written with ``write`` instead of ``recvmsg``/``sendto``, and without addresses.  So
:class:`TunHandler` *is* a :class:`~._udp.DatagramHandler` - the same receive flow
control, active modes, memory budget, send queue and statistics (see that module's theory
of operation) - over :class:`TunDevice`, which gives the device's descriptor the few
socket methods the datagram handler calls.  What differs:

* **Opening** (``cmd_open_tun``, on the I/O thread): ``open("/dev/net/tun", O_RDWR |
  O_NONBLOCK | O_CLOEXEC)``, then the ``TUNSETIFF`` ioctl with ``IFF_TUN`` or ``IFF_TAP``,
  ``IFF_NO_PI`` and optionally ``IFF_MULTI_QUEUE``; the kernel answers with the device's
  name (it picks ``tun0``, ``tap1``... for an empty or ``%d`` name).  Both calls return at
  once.  A failure is a :class:`~._exceptions.ConnectError` naming the cause: ``ENOENT``
  (no ``/dev/net/tun``: the ``tun`` module is not loaded, or a container has no device),
  ``EPERM`` (creating or attaching a device needs ``CAP_NET_ADMIN``), ``EACCES``,
  ``EBUSY``, ``EINVAL``.
* **Truncation.**  A TUN read into a buffer too small for the packet silently returns the
  head of it, so the handler reads into ``max_packet + 1`` bytes: a read that fills them
  was truncated, and is dropped and reported as ``EMSGSIZE`` as a UDP datagram too large.
* **The device going away.**  When the device is deleted under the descriptor
  (``ip link del``), ``poll`` reports an error and reads fail with ``EBADFD``: the port
  gets :class:`~._messages.Closed` ``EBADFD`` and the descriptor is closed.
* **Sending** writes each packet whole (a TUN write never takes part of one); a packet
  the kernel refuses (``EINVAL`` for a malformed one, ``EIO``...) is dropped and reported
  as an :class:`~._messages.Error`, as a datagram.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct

from ._contract import Deliver, LoopHalf, TunRequest
from ._exceptions import ConnectError, PollerLimitError, errno_name
from ._iothread import IOThread
from ._messages import Closed, Packet
from ._options import TunSettings, watermarks
from ._poller import ERROR
from ._udp import DatagramHandler

__all__ = ["TUN_PATH", "TunDevice", "TunHandler", "cmd_open_tun"]

TUN_PATH = "/dev/net/tun"
# <linux/if_tun.h>
TUNSETIFF = 0x400454CA  # _IOW('T', 202, int)
IFF_TUN = 0x0001
IFF_TAP = 0x0002
IFF_MULTI_QUEUE = 0x0100
IFF_NO_PI = 0x1000
IFNAMSIZ = 16  # bytes of an interface name, with its terminating NUL
_IFREQ_SIZE = 40  # sizeof(struct ifreq) on Linux
_MSG_TRUNC = getattr(socket, "MSG_TRUNC", 0x20)


class TunDevice:
    """A TUN/TAP descriptor with the socket methods :class:`DatagramHandler` calls."""

    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def fileno(self) -> int:
        return self.fd

    def recvmsg_into(
        self, buffers: list[memoryview], _ancbufsize: int, _flags: int
    ) -> tuple[int, tuple[()], int, None]:
        """One ``read`` of one packet; ``MSG_TRUNC`` when it filled the buffer (which is a
        byte longer than the largest packet accepted, see the module docstring)."""
        n = os.readv(self.fd, buffers)
        return n, (), _MSG_TRUNC if n >= len(buffers[0]) else 0, None

    def send(self, data: bytes) -> int:
        return os.write(self.fd, data)

    def getsockopt(self, _level: int, _option: int) -> int:
        return 0  # no pending socket error: a device's errors come from read and write

    def close(self) -> None:
        fd, self.fd = self.fd, -1  # never read a number another file may reuse
        os.close(fd)


def _packet(data: bytes, _address: object) -> Packet:
    return Packet(data)


class TunHandler(DatagramHandler):
    """The I/O thread's half of a TUN/TAP port (see the module docstring)."""

    message = staticmethod(_packet)

    def __init__(
        self,
        io: IOThread,
        device: TunDevice,
        name: str,
        port: LoopHalf,
        deliver: Deliver,
        options: TunSettings,
        active: tuple[int, bool],
    ) -> None:
        # The datagram handler's buffer is max_datagram bytes: one more than the largest
        # packet accepted, so that a read which fills it is known to be truncated.
        super().__init__(
            io,
            device,  # type: ignore[arg-type]  # duck-typed: see DatagramHandler
            port,
            deliver,
            {
                **watermarks(options),
                "read_packets": options["read_packets"],
                "max_datagram": options["max_packet"] + 1,
            },
            active,
        )
        self.name = name

    def on_ready(self, mask: int) -> None:
        if mask & ERROR and not self.closed:
            # tun_chr_poll reports EPOLLERR only when no device is attached any more.
            self._gone()
            return
        super().on_ready(mask)

    def _gone(self) -> None:
        self.deliver(
            (
                self.port,
                Closed(f"the device {self.name} was deleted under the port (EBADFD)", "EBADFD"),
            )
        )
        self._close()

    def _error(self, number: int | None, detail: str) -> None:
        if self.closed:
            return  # the rest of a read batch on a descriptor closed below
        if number == errno.EBADFD:
            self._gone()  # a poller without EPOLLERR (selectors) learns it from read
            return
        super()._error(number, detail)

    def _read_error_detail(self) -> str:
        return f" (reading a packet from {self.name})"

    def _too_large_detail(self, n: int, size: int, address: object) -> str:
        return f": a packet from {self.name} exceeds max_packet={size - 1} bytes; it was dropped"

    def _dropped_detail(self, size: int, address: object) -> str:
        return f": a packet of {size} bytes to {self.name} was dropped"


def _open_error(exc: OSError, what: str, name: str, mode: str) -> ConnectError:
    number = exc.errno
    label = errno_name(number)
    device = f"the {mode.upper()} device {name!r}" if name else f"a {mode.upper()} device"
    if what == "open":
        cause = {
            errno.ENOENT: f"{TUN_PATH} does not exist: load the tun module (modprobe tun) or, "
            "in a container, give it the device",
            errno.EACCES: f"{TUN_PATH} is not open to this user: run as root or with "
            "CAP_NET_ADMIN, or give the user access to the device",
            errno.ENXIO: "the kernel has no TUN/TAP driver (CONFIG_TUN)",
        }.get(number or 0, f"cannot open {TUN_PATH}")
    else:
        cause = {
            errno.EPERM: "creating or attaching a device needs CAP_NET_ADMIN (run as "
            "root or with that capability, or attach to a persistent device made for this "
            "user: ip tuntap add NAME mode tun user USER)",
            errno.EBUSY: "it is already attached to another descriptor (open all "
            "its queues with multi_queue=True)",
            errno.EINVAL: "it exists with other flags (TUN against TAP, or "
            "multi_queue differs), or the name is not a valid interface name",
        }.get(number or 0, "TUNSETIFF failed")
    return ConnectError(
        f"cannot open {device}: {cause}: {exc.strerror or exc} ({label})", number, label
    )


def cmd_open_tun(io: IOThread, request: object, spec: TunRequest) -> None:
    """Open ``/dev/net/tun`` and attach it to a device on the I/O thread; answer
    ``request`` with ``(handler, device name)`` or the exception."""
    port, deliver, name, mode = spec.port, spec.deliver, spec.name, spec.mode
    options, active = spec.options, spec.active
    fd = -1
    where = "open"
    try:
        fd = os.open(TUN_PATH, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        where = "attach"
        flags = (IFF_TUN if mode == "tun" else IFF_TAP) | IFF_NO_PI
        if options["multi_queue"]:
            flags |= IFF_MULTI_QUEUE
        request_bytes = struct.pack(f"{IFNAMSIZ}sH", name.encode(), flags)
        answer = fcntl.ioctl(fd, TUNSETIFF, request_bytes.ljust(_IFREQ_SIZE, b"\0"))
        given = answer[:IFNAMSIZ].split(b"\0", 1)[0].decode()
    except OSError as exc:
        if fd >= 0:
            os.close(fd)
        deliver((request, _open_error(exc, where, name, mode)))
        return
    except Exception as exc:
        if fd >= 0:
            os.close(fd)
        deliver((request, exc))
        return
    handler = TunHandler(io, TunDevice(fd), given, port, deliver, options, active)
    try:
        io.adopt(handler)
    except PollerLimitError as exc:  # select's FD_SETSIZE: this port only, nothing kept
        os.close(fd)
        deliver((request, exc))
        return
    deliver((request, (handler, given)))
    handler._update_interest()
