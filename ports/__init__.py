"""The actor's side of ioserver: ports, select, mailboxes and memory channels.

Actors never touch a socket.  They open ports through an I/O server
(:func:`ioserver.open`) and use them like channels::

    async with ioserver.open() as ios:
        async with await ports.listen_tcp(ios, "127.0.0.1", 7000) as listener:
            async for accepted in listener:
                task_group.start_soon(echo, accepted.port)

and wait on ports, mailboxes, channels and deadlines together with :func:`select`.

Actors (tasks with a mailbox, Erlang-style links and monitors, ports that close with their
owner), timers as messages and OTP-style supervisors run in an actor system::

    async with ports.open_actor_system() as system:
        system.spawn(ports.Supervisor([ports.ChildSpec("worker", worker)]), name="top")

Port kinds: TCP (:func:`connect_tcp`, :func:`listen_tcp`), Unix stream sockets
(:func:`connect_unix`, :func:`listen_unix`), UDP (:func:`open_udp`: :class:`Datagram`
messages), programs (:func:`open_process`: their stdin/stdout, then :class:`ExitStatus`),
ZeroMQ sockets (:func:`open_zmq`) and TUN/TAP devices (:func:`open_tun`: :class:`Packet`
messages, Linux).  :class:`PortStream` gives a raw stream port the
byte-stream face of anyio's and trio's streams (``receive_some``/``send_all``...).
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
    FrameError as FrameError,
)
from ioserver._exceptions import (
    IOServerError as IOServerError,
)
from ioserver._exceptions import (
    NotSupportedError as NotSupportedError,
)
from ioserver._exceptions import (
    OptionError as OptionError,
)
from ioserver._exceptions import (
    PacketTooLarge as PacketTooLarge,
)
from ioserver._exceptions import (
    SendTimeoutError as SendTimeoutError,
)
from ioserver._exceptions import (
    TLSError as TLSError,
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
    Packet as Packet,
)
from ioserver._messages import (
    Passive as Passive,
)
from ioserver._options import Active as Active
from ioserver._options import FlowOptions as FlowOptions
from ioserver._options import PortOptions as PortOptions
from ioserver._options import TunOptions as TunOptions
from ioserver._options import UDPOptions as UDPOptions
from ioserver._options import ZmqOptions as ZmqOptions

from . import rpc as rpc
from ._actors import Actor as Actor
from ._actors import ActorSystem as ActorSystem
from ._actors import Down as Down
from ._actors import Exit as Exit
from ._actors import ExitReason as ExitReason
from ._actors import MonitorRef as MonitorRef
from ._actors import Reason as Reason
from ._actors import RegistrationError as RegistrationError
from ._actors import cancel_timer as cancel_timer
from ._actors import current_actor as current_actor
from ._actors import current_system as current_system
from ._actors import open_actor_system as open_actor_system
from ._actors import register as register
from ._actors import send as send
from ._actors import send_after as send_after
from ._actors import unregister as unregister
from ._actors import whereis as whereis
from ._channel import MemoryChannelStatistics as MemoryChannelStatistics
from ._channel import MemoryReceiveChannel as MemoryReceiveChannel
from ._channel import MemorySendChannel as MemorySendChannel
from ._channel import open_memory_channel as open_memory_channel
from ._mailbox import Mailbox as Mailbox
from ._port import Listener as Listener
from ._port import Port as Port
from ._port import PortStatistics as PortStatistics
from ._process import ProcessPort as ProcessPort
from ._process import open_process as open_process
from ._select import select as select
from ._stream import PortStream as PortStream
from ._supervisor import AutoShutdown as AutoShutdown
from ._supervisor import ChildSpec as ChildSpec
from ._supervisor import Restart as Restart
from ._supervisor import RestartIntensityError as RestartIntensityError
from ._supervisor import Strategy as Strategy
from ._supervisor import Supervisor as Supervisor
from ._tcp import connect_tcp as connect_tcp
from ._tcp import listen_tcp as listen_tcp
from ._timers import Deadline as Deadline
from ._timers import Timeout as Timeout
from ._timers import TimerRef as TimerRef
from ._tun import TunPort as TunPort
from ._tun import open_tun as open_tun
from ._udp import UDPPort as UDPPort
from ._udp import open_udp as open_udp
from ._unix import connect_unix as connect_unix
from ._unix import listen_unix as listen_unix
from ._zmq import ZMQ_SOCKET_TYPES as ZMQ_SOCKET_TYPES
from ._zmq import ZmqPort as ZmqPort
from ._zmq import open_zmq as open_zmq

__all__ = [
    "ZMQ_SOCKET_TYPES",
    "Accepted",
    "Active",
    "Actor",
    "ActorSystem",
    "AutoShutdown",
    "BrokenPortError",
    "BusyPortError",
    "ChildSpec",
    "Closed",
    "ClosedPortError",
    "ConnectError",
    "Data",
    "Datagram",
    "Deadline",
    "Down",
    "EndOfPort",
    "Error",
    "Exit",
    "ExitReason",
    "ExitStatus",
    "FlowOptions",
    "FrameError",
    "IOServerError",
    "Listener",
    "Mailbox",
    "MemoryChannelStatistics",
    "MemoryReceiveChannel",
    "MemorySendChannel",
    "Message",
    "MonitorRef",
    "NotSupportedError",
    "OptionError",
    "Packet",
    "PacketTooLarge",
    "Passive",
    "Port",
    "PortOptions",
    "PortStatistics",
    "PortStream",
    "ProcessPort",
    "Reason",
    "RegistrationError",
    "Restart",
    "RestartIntensityError",
    "SendTimeoutError",
    "Strategy",
    "Supervisor",
    "TLSError",
    "Timeout",
    "TimerRef",
    "TunOptions",
    "TunPort",
    "UDPOptions",
    "UDPPort",
    "WouldBlock",
    "ZmqOptions",
    "ZmqPort",
    "cancel_timer",
    "connect_tcp",
    "connect_unix",
    "current_actor",
    "current_system",
    "listen_tcp",
    "listen_unix",
    "open_actor_system",
    "open_memory_channel",
    "open_process",
    "open_tun",
    "open_udp",
    "open_zmq",
    "register",
    "rpc",
    "select",
    "send",
    "send_after",
    "unregister",
    "whereis",
]
