"""The actor's side of ioserver: ports, select, mailboxes and memory channels.

Actors never touch a socket.  They open ports through an I/O server
(:func:`ioserver.open`) and use them like channels::

    async with ioserver.open() as ios:
        async with await ports.listen_tcp(ios, "127.0.0.1", 7000) as listener:
            async for accepted in listener:
                task_group.start_soon(echo, accepted.port)

and wait on ports, mailboxes and channels together with :func:`select`.
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
    Error as Error,
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
from ._zmq import ZMQ_SOCKET_TYPES as ZMQ_SOCKET_TYPES
from ._zmq import ZmqOptions as ZmqOptions
from ._zmq import ZmqPort as ZmqPort
from ._zmq import open_zmq as open_zmq

__all__ = [
    "ZMQ_SOCKET_TYPES",
    "Accepted",
    "Active",
    "BrokenPortError",
    "BusyPortError",
    "Closed",
    "ClosedPortError",
    "ConnectError",
    "Data",
    "EndOfPort",
    "Error",
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
    "SendTimeoutError",
    "WouldBlock",
    "ZmqOptions",
    "ZmqPort",
    "connect_tcp",
    "listen_tcp",
    "open_memory_channel",
    "open_zmq",
    "select",
]
