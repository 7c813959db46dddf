"""ioserver: I/O the Erlang way.

One I/O thread owns every socket and turns what happens on them into messages; actors
(trio or asyncio tasks) talk to it only through *ports* (see the :mod:`ports` package).
This package holds the I/O side: :func:`open` starts an I/O thread for the running event
loop, :func:`run` runs an app on a fresh loop with one, and the exception and message
types are shared with :mod:`ports`.
"""

from ._cli import main as main
from ._exceptions import BrokenPortError as BrokenPortError
from ._exceptions import BusyPortError as BusyPortError
from ._exceptions import ClosedPortError as ClosedPortError
from ._exceptions import ConnectError as ConnectError
from ._exceptions import EndOfPort as EndOfPort
from ._exceptions import FrameError as FrameError
from ._exceptions import IOServerError as IOServerError
from ._exceptions import NotSupportedError as NotSupportedError
from ._exceptions import OptionError as OptionError
from ._exceptions import PacketTooLarge as PacketTooLarge
from ._exceptions import PollerLimitError as PollerLimitError
from ._exceptions import SendTimeoutError as SendTimeoutError
from ._exceptions import TLSError as TLSError
from ._exceptions import UnsafeEndpointError as UnsafeEndpointError
from ._exceptions import WouldBlock as WouldBlock
from ._messages import Accepted as Accepted
from ._messages import Closed as Closed
from ._messages import Data as Data
from ._messages import Datagram as Datagram
from ._messages import Error as Error
from ._messages import ExitStatus as ExitStatus
from ._messages import Message as Message
from ._messages import Packet as Packet
from ._messages import Passive as Passive
from ._server import IOServer as IOServer
from ._server import IOServerStatistics as IOServerStatistics
from ._server import open as open
from ._server import run as run

__version__ = "0.1.0.dev0"

__all__ = [
    "Accepted",
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
    "FrameError",
    "IOServer",
    "IOServerError",
    "IOServerStatistics",
    "Message",
    "NotSupportedError",
    "OptionError",
    "Packet",
    "PacketTooLarge",
    "Passive",
    "PollerLimitError",
    "SendTimeoutError",
    "TLSError",
    "UnsafeEndpointError",
    "WouldBlock",
    "__version__",
    "main",
    "open",
    "run",
]
