"""The actor's side of ioserver: ports, select, mailboxes and memory channels.

Actors never touch a socket.  They open ports through an I/O server
(:func:`ioserver.open`) and use them like channels::

    async with ioserver.open() as ios:
        async with await ports.listen_tcp(ios, "127.0.0.1", 7000) as listener:
            async for accepted in listener:
                task_group.start_soon(echo, accepted.port)

and wait on ports, mailboxes and channels together with :func:`select`.

Port kinds: TCP (:func:`connect_tcp`, :func:`listen_tcp`), Unix stream sockets
(:func:`connect_unix`, :func:`listen_unix`), UDP (:func:`open_udp`: :class:`Datagram`
messages) and programs (:func:`open_process`: their stdin/stdout, then :class:`ExitStatus`).
"""

from ioserver._exceptions import (
    BrokenPortError as BrokenPortError,
)
from ioserver._exceptions import (
    BusyPortError as BusyPortError,
)
from ioserver._exceptions import (
    ClosedPortError as ClosedPortError,
)
from ioserver._exceptions import (
    ConnectError as ConnectError,
)
from ioserver._exceptions import (
    EndOfPort as EndOfPort,
)
from ioserver._exceptions import (
    IOServerError as IOServerError,
)
from ioserver._exceptions import (
    OptionError as OptionError,
)
from ioserver._exceptions import (
    SendTimeoutError as SendTimeoutError,
)
from ioserver._exceptions import (
    WouldBlock as WouldBlock,
)
from ioserver._messages import (
    Accepted as Accepted,
)
from ioserver._messages import (
    Closed as Closed,
)
from ioserver._messages import (
    Data as Data,
)
from ioserver._messages import (
    Datagram as Datagram,
)
from ioserver._messages import (
    Error as Error,
)
from ioserver._messages import (
    ExitStatus as ExitStatus,
)
from ioserver._messages import (
    Message as Message,
)
from ioserver._messages import (
    Passive as Passive,
)

from ._channel import MemoryChannelStatistics as MemoryChannelStatistics
from ._channel import MemoryReceiveChannel as MemoryReceiveChannel
from ._channel import MemorySendChannel as MemorySendChannel
from ._channel import open_memory_channel as open_memory_channel
from ._mailbox import Mailbox as Mailbox
from ._port import Active as Active
from ._port import Listener as Listener
from ._port import Port as Port
from ._port import PortOptions as PortOptions
from ._port import PortStatistics as PortStatistics
from ._port import connect_tcp as connect_tcp
from ._port import listen_tcp as listen_tcp
from ._select import select as select
from ._subprocess import ProcessPort as ProcessPort
from ._subprocess import open_process as open_process
from ._udp import UDPOptions as UDPOptions
from ._udp import UDPPort as UDPPort
from ._udp import open_udp as open_udp
from ._unix import connect_unix as connect_unix
from ._unix import listen_unix as listen_unix

__all__ = [
    "Accepted",
    "Active",
    "BrokenPortError",
    "BusyPortError",
    "Closed",
    "ClosedPortError",
    "ConnectError",
    "Data",
    "Datagram",
    "EndOfPort",
    "Error",
    "ExitStatus",
    "IOServerError",
    "Listener",
    "Mailbox",
    "MemoryChannelStatistics",
    "MemoryReceiveChannel",
    "MemorySendChannel",
    "Message",
    "OptionError",
    "Passive",
    "Port",
    "PortOptions",
    "PortStatistics",
    "ProcessPort",
    "SendTimeoutError",
    "UDPOptions",
    "UDPPort",
    "WouldBlock",
    "connect_tcp",
    "connect_unix",
    "listen_tcp",
    "listen_unix",
    "open_memory_channel",
    "open_process",
    "open_udp",
    "select",
]
