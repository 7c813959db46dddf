"""Actors: tasks with a mailbox, spawned in an actor system, with links and monitors.

Theory of operation
-------------------

An :class:`Actor` is one task of an :class:`ActorSystem`'s task group plus a
:class:`~ports.Mailbox`, as an Erlang process is code plus a mailbox.  Everything here runs
in one event loop, so the bookkeeping (links, monitors, the name registry) is plain data
with no lock, and every notification is a synchronous ``send_nowait`` into a mailbox.

**How an actor ends, and its exit reason.**  The task runs the actor's function inside a
cancel scope of its own.  The function returning is the reason
:attr:`ExitReason.NORMAL`; raising an exception is a *crash* and the exception is the
reason; being killed (by :meth:`Actor.kill`, an exit signal, or a linked actor's crash)
cancels that scope, and the reason is the one the signal carried; the system's task group
being cancelled is :attr:`ExitReason.SHUTDOWN`.  A crash never escapes into the task group:
as in Erlang, it concerns only the actors linked to or monitoring the one that crashed (it
is also logged on the ``ioserver`` logger).

**What ending does**, at once and in this order, whatever the reason (:meth:`Actor._end`,
synchronous, so it runs even while the task is being cancelled): the actor's registered
name is freed; its mailbox is closed, which closes every port the actor owns (peers see
the connection end) and drops the messages nobody will receive; each linked actor gets the
exit signal (an :class:`Exit` message if it traps exits; otherwise it is killed with the
same reason, unless the reason is ``NORMAL``); each monitoring actor gets a :class:`Down`
message; whoever awaits :meth:`Actor.wait` is woken.

**Structured concurrency.**  Actors are tasks of the system's task group, and the
system's timers are served by one more task there: nothing outlives the ``async with
open_actor_system()`` block.  Leaving the block waits for every actor to end (as a task
group waits for its tasks), then cancels the timers that have not fired; cancelling the
block (or :meth:`ActorSystem.shutdown`) stops every actor, so every port they own closes.
"""

from __future__ import annotations

import contextvars
import enum
import itertools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar, TypeVarTuple, final

import anyio
import anyio.abc

from ioserver._exceptions import ClosedPortError, IOServerError
from ioserver._hub import yield_at_next_operation

from ._mailbox import Mailbox, Match
from ._port import Listener, Port
from ._timers import TimerRef, TimerService, check_seconds

__all__ = [
    "Actor",
    "ActorSystem",
    "Down",
    "Exit",
    "ExitReason",
    "MonitorRef",
    "Reason",
    "RegistrationError",
    "cancel_timer",
    "current_actor",
    "current_system",
    "open_actor_system",
    "register",
    "send",
    "send_after",
    "unregister",
    "whereis",
]

log = logging.getLogger("ioserver")

PosArgsT = TypeVarTuple("PosArgsT")
PortT = TypeVar("PortT", Port, Listener)


class ExitReason(enum.Enum):
    """The exit reasons that are not a crash (a crash's reason is its exception).

    As Erlang's atoms ``normal``, ``shutdown``, ``killed`` and ``noproc``.
    """

    #: The actor's function returned.  A normal exit kills no linked actor.
    NORMAL = "normal"
    #: Stopped in order: its system or task group was cancelled, or a supervisor
    #: terminated it.
    SHUTDOWN = "shutdown"
    #: Killed by :meth:`Actor.kill` (an exit signal no actor can trap).
    KILLED = "killed"
    #: The actor had already ended when it was linked to or monitored.
    NOPROC = "noproc"

    def __repr__(self) -> str:
        return f"ExitReason.{self.name}"


Reason = ExitReason | BaseException
"""Why an actor ended: an :class:`ExitReason`, or the exception it crashed with."""


@final
class MonitorRef:
    """The reference :meth:`Actor.monitor` returns; it names the monitor in its
    :class:`Down` message and in :meth:`Actor.demonitor`.  Compare by identity."""

    __slots__ = ("_number", "_target", "_watcher")

    _numbers = itertools.count(1)

    def __init__(self, watcher: Actor, target: Actor) -> None:
        self._number = next(MonitorRef._numbers)
        self._watcher: Actor | None = watcher
        self._target = target

    def __repr__(self) -> str:
        return f"<MonitorRef #{self._number} on {self._target!r}>"


@dataclass(frozen=True, slots=True)
class Exit:
    """An exit signal received as a message, by an actor that traps exits.

    As Erlang's ``{'EXIT', Pid, Reason}``: ``actor`` is the linked actor that ended (or
    the actor that called :meth:`Actor.exit`; ``None`` if that was code outside any
    actor), ``reason`` why.
    """

    actor: Actor | None
    reason: Reason


@dataclass(frozen=True, slots=True)
class Down:
    """A monitored actor ended, as Erlang's ``{'DOWN', Ref, process, Pid, Reason}``.

    ``ref`` is what :meth:`Actor.monitor` returned, ``actor`` the actor that ended, and
    ``reason`` why (:attr:`ExitReason.NOPROC` if it had ended before it was monitored).
    """

    ref: MonitorRef
    actor: Actor
    reason: Reason


class RegistrationError(IOServerError, ValueError):
    """A name could not be registered or was not found, as Erlang's ``badarg`` from
    ``register/2`` and ``Name ! Message``: the name is taken, the actor has a name
    already or has ended, or no actor is registered under the name sent to."""


_current_actor: contextvars.ContextVar[Actor | None] = contextvars.ContextVar(
    "ports_current_actor", default=None
)
_current_system: contextvars.ContextVar[ActorSystem | None] = contextvars.ContextVar(
    "ports_current_system", default=None
)


def current_actor() -> Actor | None:
    """The actor running this code (Erlang's ``self()``), or ``None`` outside any actor."""
    return _current_actor.get()


def current_system() -> ActorSystem:
    """The actor system this code runs in: the innermost
    ``async with open_actor_system()`` block, or the system of the current actor.

    Raises:
        RuntimeError: there is none.
    """
    system = _current_system.get()
    if system is None:
        raise RuntimeError(
            "no actor system here: call this inside `async with ports.open_actor_system()`"
            " or in one of its actors"
        )
    return system


@final
class Actor:
    """A task with a mailbox, spawned by :meth:`ActorSystem.spawn`: an Erlang process.

    Others talk to it with :meth:`send` (never waits, never fails: a message to an actor
    that has ended is dropped, as Erlang drops it); it receives with :meth:`receive`
    (selective, from its :attr:`mailbox`) or waits on its mailbox together with ports in
    :func:`ports.select`.  It links to and monitors other actors; it owns ports, which
    close when it ends (see :meth:`own`).  Do not create one directly.
    """

    __slots__ = (
        "__weakref__",
        "_args",
        "_done",
        "_ended",
        "_function",
        "_kill_reason",
        "_links",
        "_mailbox",
        "_monitors",
        "_name",
        "_number",
        "_reason",
        "_scope",
        "_system",
        "_trap_exits",
        "_watching",
    )

    _numbers = itertools.count(1)

    def __init__(
        self,
        system: ActorSystem,
        function: Callable[..., Awaitable[Any]],
        args: tuple[Any, ...],
        trap_exits: bool,
    ) -> None:
        self._number = next(Actor._numbers)
        self._system = system
        self._function = function
        self._args = args
        self._mailbox = Mailbox()
        self._trap_exits = bool(trap_exits)
        self._scope = anyio.CancelScope()  # cancelled to kill the actor, even before it runs
        self._kill_reason: Reason | None = None
        self._reason: Reason | None = None
        self._done = False
        self._ended = anyio.Event()
        self._name: str | None = None
        self._links: set[Actor] = set()
        self._monitors: dict[MonitorRef, Actor] = {}  # monitors on this actor -> watcher
        self._watching: dict[MonitorRef, Actor] = {}  # this actor's monitors -> target

    # -- running ------------------------------------------------------------------------
    async def _run(self) -> None:
        _current_actor.set(self)  # this task's context only
        _current_system.set(self._system)
        reason: Reason = ExitReason.NORMAL
        try:
            with self._scope:
                await self._function(self, *self._args)
        except Exception as exc:
            reason = exc
        except BaseException:
            # The system's task group was cancelled (or KeyboardInterrupt...): stop, and
            # let it go on up.
            reason = ExitReason.SHUTDOWN
            raise
        finally:
            if self._kill_reason is not None:
                reason = self._kill_reason  # killed: the signal's reason, as in Erlang
            elif isinstance(reason, Exception):
                log.error("actor %r crashed", self, exc_info=reason)
            self._end(reason)

    def _end(self, reason: Reason) -> None:
        """Everything an actor's end does (see the module docstring).  Idempotent."""
        if self._done:
            return
        self._done = True
        self._reason = reason
        system = self._system
        if self._name is not None and system._registry.get(self._name) is self:
            del system._registry[self._name]
        self._mailbox.close()  # closes the ports it owns
        links, self._links = self._links, set()
        for other in links:
            other._links.discard(self)
            other._signal(self, reason)
        monitors, self._monitors = self._monitors, {}
        for ref, watcher in monitors.items():
            ref._watcher = None
            watcher._watching.pop(ref, None)
            watcher._deliver(Down(ref, self, reason))
        watching, self._watching = self._watching, {}
        for ref, target in watching.items():
            target._monitors.pop(ref, None)
        system._ended(self)
        self._ended.set()

    def _deliver(self, message: object) -> None:
        if not self._done:
            self._mailbox.send_nowait(message)

    def _signal(self, sender: Actor | None, reason: Reason) -> None:
        """Receive an exit signal, as Erlang does: a message if trapping exits; else end
        with ``reason``, unless it is ``NORMAL``."""
        if self._done:
            return
        if self._trap_exits:
            self._mailbox.send_nowait(Exit(sender, reason))
        elif reason is not ExitReason.NORMAL:
            self._kill_with(reason)

    def _kill_with(self, reason: Reason) -> None:
        if self._done or self._kill_reason is not None:
            return
        self._kill_reason = reason
        self._scope.cancel()

    # -- the mailbox --------------------------------------------------------------------
    @property
    def mailbox(self) -> Mailbox:
        """The actor's :class:`~ports.Mailbox` (closed once the actor has ended)."""
        return self._mailbox

    def send_nowait(self, message: object) -> None:
        """Put ``message`` in the actor's mailbox, as Erlang's ``Pid ! Message``.

        Never waits, never fails: if the actor has ended the message is dropped.
        """
        if not self._done:
            self._mailbox.send_nowait(message)

    async def send(self, message: object) -> None:
        """Put ``message`` in the actor's mailbox (see :meth:`send_nowait`); a checkpoint."""
        await anyio.lowlevel.checkpoint()  # first: a send that raises Cancelled sent nothing
        self.send_nowait(message)

    async def receive(self, match: Match | None = None, *, timeout: float | None = None) -> Any:
        """Receive from the actor's mailbox; see :meth:`ports.Mailbox.receive`.

        Called by the actor itself.  Port messages arrive as ``(port, message)`` tuples,
        exit signals (when trapping exits) as :class:`Exit`, monitors' as :class:`Down`.

        Raises:
            TimeoutError: ``timeout`` seconds passed with no matching message.
            ClosedPortError: the actor has ended.
        """
        return await self._mailbox.receive(match, timeout=timeout)

    def receive_nowait(self, match: Match | None = None) -> Any:
        """Take a matching message without waiting; see :meth:`ports.Mailbox.receive_nowait`.

        Raises:
            WouldBlock: no matching message is queued.
            ClosedPortError: the actor has ended.
        """
        return self._mailbox.receive_nowait(match)

    # -- links, monitors, exit signals --------------------------------------------------
    @property
    def trap_exits(self) -> bool:
        """Whether exit signals arrive as :class:`Exit` messages instead of killing the
        actor, as Erlang's ``process_flag(trap_exit, true)``.  Settable."""
        return self._trap_exits

    @trap_exits.setter
    def trap_exits(self, value: bool) -> None:
        self._trap_exits = bool(value)

    def link(self, other: Actor) -> None:
        """Link this actor and ``other``, as Erlang's ``link/1``: when either ends, the
        other gets the exit signal (see the module docstring).  Links are two-way and
        idempotent; linking to oneself does nothing.

        If one of the two has already ended, the other gets the signal at once, with
        reason :attr:`ExitReason.NOPROC` (which kills it unless it traps exits), as in
        Erlang.
        """
        if other is self:
            return
        if self._done or other._done:
            if not other._done:
                other._signal(self, ExitReason.NOPROC)
            elif not self._done:
                self._signal(other, ExitReason.NOPROC)
            return
        self._links.add(other)
        other._links.add(self)

    def unlink(self, other: Actor) -> None:
        """Remove the link between this actor and ``other`` (``unlink/1``); idempotent.

        An :class:`Exit` from ``other`` already in the mailbox stays there.
        """
        self._links.discard(other)
        other._links.discard(self)

    @property
    def links(self) -> frozenset[Actor]:
        """The actors linked to this one now."""
        return frozenset(self._links)

    def monitor(self, target: Actor) -> MonitorRef:
        """Monitor ``target``: when it ends, this actor gets ``Down(ref, target, reason)``.

        As Erlang's ``erlang:monitor(process, Pid)``: one-way (``target`` is not
        affected), never kills, and each call makes a new monitor.  If ``target`` has
        already ended, the :class:`Down` (reason :attr:`ExitReason.NOPROC`) comes at once.

        Returns:
            The monitor's reference, for :meth:`demonitor` and to match the ``Down``.

        Raises:
            ClosedPortError: this actor has ended.
        """
        if self._done:
            raise ClosedPortError("this actor has ended: it cannot monitor")
        ref = MonitorRef(self, target)
        if target._done:
            ref._watcher = None
            self._mailbox.send_nowait(Down(ref, target, ExitReason.NOPROC))
        else:
            target._monitors[ref] = self
            self._watching[ref] = target
        return ref

    def demonitor(self, ref: MonitorRef, *, flush: bool = False) -> bool:
        """Stop the monitor ``ref``, as Erlang's ``erlang:demonitor/2``.

        Args:
            ref: what :meth:`monitor` returned.
            flush: also remove its :class:`Down` from the mailbox if it came already.

        Returns:
            ``True`` if the monitor was still active (no ``Down`` will come), ``False``
            if its ``Down`` was sent already (Erlang's ``info`` option).
        """
        target = self._watching.pop(ref, None)
        if target is not None:
            target._monitors.pop(ref, None)
            ref._watcher = None
            return True
        if flush:
            self._mailbox._take_all(
                lambda message: message.__class__ is Down and message.ref is ref
            )
        return False

    def exit(self, reason: Reason) -> None:
        """Send this actor an exit signal, as Erlang's ``exit(Pid, Reason)``.

        If it traps exits it gets ``Exit(sender, reason)`` (the sender being the current
        actor, or ``None``); otherwise it ends with ``reason`` - except that a
        :attr:`ExitReason.NORMAL` signal is ignored.  To end it whatever it traps, use
        :meth:`kill`.
        """
        self._signal(current_actor(), reason)

    def kill(self) -> None:
        """End this actor now, with reason :attr:`ExitReason.KILLED`; it cannot trap this.

        As Erlang's ``exit(Pid, kill)``.  Its task is cancelled; the actor is ended once
        its code has unwound (await :meth:`wait`).  Does nothing if it has ended already.
        """
        self._kill_with(ExitReason.KILLED)

    # -- ports ----------------------------------------------------------------------------
    def own(self, port: PortT, *, mailbox: bool = True) -> PortT:
        """Make this actor the owner of ``port``: the port closes when the actor ends.

        As an Erlang port's link to its owner: whether the actor returns, crashes, is
        killed or is cancelled, the port is closed, so its peer sees the connection end.

        Args:
            port: a :class:`~ports.Port` or :class:`~ports.Listener`.
            mailbox: ``True`` (default): the port's messages go to this actor's mailbox as
                ``(port, message)`` tuples (:meth:`ports.Port.set_owner`), with those
                already buffered in the port first; they count against the port's
                receive watermarks and the memory budget until the actor receives them.
                ``False``: the port keeps its
                messages, so any task may ``receive`` from it or ``select`` on it; only
                its life is tied to this actor's.

        Returns:
            ``port``, for chaining.

        Raises:
            ClosedPortError: this actor has ended, the port is closed, or (with
                ``mailbox=True``) a task is waiting on the port.
        """
        if self._done:
            raise ClosedPortError("this actor has ended: it cannot own a port")
        if mailbox:
            port.set_owner(self._mailbox)
        else:
            if port.closed:
                raise ClosedPortError("this port is closed")
            self._mailbox._hold(port)
        return port

    def give(self, port: Port | Listener, to: Actor | Mailbox) -> None:
        """Hand ``port``, owned by this actor, to ``to``, with its messages in flight.

        As Erlang's ``gen_tcp:controlling_process/2`` without the race it documents: the
        ``(port, message)`` tuples of this port still queued in this actor's mailbox move
        to the new owner first, in order, then the messages buffered in the port, then
        every later one; none is lost or duplicated, and each stays charged to the port
        (see :class:`~ports.Mailbox`) until ``to`` receives it.  The port then closes
        with ``to``'s actor (or when the mailbox ``to`` is closed), not with this one.
        (A port this actor held with ``own(port, mailbox=False)`` is given the mailbox
        way too.)

        Raises:
            ValueError: this actor does not own ``port``.
            ClosedPortError: the port is closed, ``to`` has ended, or a task is waiting on
                the port.
        """
        mailbox = self._mailbox
        owner = port.owner
        if not (owner is mailbox or (owner is None and mailbox._holds(port))):
            raise ValueError(f"{self!r} does not own {port!r}")
        target = to._mailbox if isinstance(to, Actor) else to
        if target.closed:
            raise ClosedPortError(f"cannot give a port to {to!r}: it has ended")
        if port.closed:
            raise ClosedPortError("this port is closed")
        mailbox._move_messages_of(port, target)  # (still charged to the port, see Mailbox)
        port.set_owner(target)

    # -- state ----------------------------------------------------------------------------
    @property
    def name(self) -> str | None:
        """The name this actor is registered under, or ``None``."""
        return self._name

    @property
    def system(self) -> ActorSystem:
        """The actor system this actor runs in."""
        return self._system

    @property
    def alive(self) -> bool:
        """True until the actor has ended (Erlang's ``is_process_alive/1``)."""
        return not self._done

    @property
    def reason(self) -> Reason | None:
        """Why the actor ended (see :data:`Reason`), or ``None`` while it runs."""
        return self._reason

    async def wait(self) -> Reason:
        """Wait until the actor has ended; return why (its :attr:`reason`).

        It does not raise the crash: the exception is returned, as a monitor's
        :class:`Down` carries it.
        """
        await self._ended.wait()
        assert self._reason is not None
        return self._reason

    def __repr__(self) -> str:
        name = f" {self._name!r}" if self._name else ""
        state = "running" if not self._done else f"ended {self._reason!r}"
        function = self._function
        kind = getattr(function, "__name__", None) or type(function).__name__
        return f"<Actor #{self._number}{name} {kind} {state}>"


@final
class ActorSystem:
    """A task group of actors, with their name registry and their timers.

    Get one from :func:`open_actor_system`.  Every actor it spawns is a task of its task
    group, and nothing it starts outlives it (see the module docstring).
    """

    def __init__(self, task_group: anyio.abc.TaskGroup) -> None:
        self._task_group = task_group
        self._registry: dict[str, Actor] = {}
        self._live: set[Actor] = set()
        self._idle: anyio.Event | None = None
        self._closed = False
        self._timers = TimerService(self._deliver_timer)

    # -- actors ---------------------------------------------------------------------------
    def spawn(
        self,
        function: Callable[[Actor, *PosArgsT], Awaitable[Any]],
        *args: *PosArgsT,
        name: str | None = None,
        trap_exits: bool = False,
    ) -> Actor:
        """Start ``await function(actor, *args)`` as a new actor; return the actor.

        As Erlang's ``spawn/3``.  The function gets its own :class:`Actor` first (its
        ``self()``).  The task starts at the next scheduling point, so linking or
        monitoring the returned actor right away cannot miss its end.

        Args:
            function: an async function taking the actor, then ``args``.
            args: its positional arguments.
            name: register the actor under this name (see :meth:`register`).
            trap_exits: start with :attr:`Actor.trap_exits` set.

        Raises:
            ClosedPortError: the system has ended.
            RegistrationError: ``name`` is taken.
        """
        if self._closed:
            raise ClosedPortError("this actor system has ended: it spawns no actor")
        if name is not None and name in self._registry:
            raise RegistrationError(f"the name {name!r} is taken by {self._registry[name]!r}")
        actor = Actor(self, function, args, trap_exits)
        self._live.add(actor)
        if name is not None:
            self.register(name, actor)
        self._task_group.start_soon(actor._run, name=repr(actor))
        return actor

    def _ended(self, actor: Actor) -> None:
        self._live.discard(actor)
        if not self._live and self._idle is not None:
            self._idle.set()

    @property
    def actors(self) -> list[Actor]:
        """The actors that have not ended yet."""
        return list(self._live)

    def shutdown(self) -> None:
        """Cancel the system, body included: as ``nursery.cancel_scope.cancel()``.

        Every actor ends with :attr:`ExitReason.SHUTDOWN` (their ports close), pending
        timers are cancelled, and the rest of the ``async with open_actor_system()`` body
        is cancelled at its next checkpoint (an ``await`` of anyio, trio or ioserver);
        the block then ends without an error.  The same on trio and on asyncio.

        Why the body too: the body runs inside the system's task group, and a trio or
        anyio user expects cancelling a nursery-like object to cancel everything in it,
        the body of its ``async with`` included (``nursery.cancel_scope.cancel()``,
        ``task_group.cancel_scope.cancel()``); code that must run after the shutdown
        belongs after the block, or in a ``finally``.

        Synchronous and idempotent; callable from the body or from an actor.
        """
        self._task_group.cancel_scope.cancel()
        # On asyncio the caller's own cancellation waits for its next suspension, and an
        # ioserver operation that completes at once suspends only now and then: make the
        # next one suspend, so the body stops at its next checkpoint as it does on trio.
        yield_at_next_operation()

    # -- names ----------------------------------------------------------------------------
    def register(self, name: str, actor: Actor) -> None:
        """Register ``actor`` under ``name``, as Erlang's ``register/2``.

        The name is freed when the actor ends.  Messages and timers can then be sent to
        the name (:meth:`send`, :meth:`send_after`).

        Raises:
            TypeError: ``name`` is not a str.
            RegistrationError: the name is taken, the actor has a name already, has
                ended, or belongs to another system.
        """
        if not isinstance(name, str):
            raise TypeError(f"a name is a str, not {type(name).__name__}")
        if actor._system is not self:
            raise RegistrationError(f"{actor!r} belongs to another actor system")
        if actor._done:
            raise RegistrationError(f"{actor!r} has ended")
        holder = self._registry.get(name)
        if holder is not None:
            raise RegistrationError(f"the name {name!r} is taken by {holder!r}")
        if actor._name is not None:
            raise RegistrationError(f"{actor!r} is registered as {actor._name!r} already")
        self._registry[name] = actor
        actor._name = name

    def unregister(self, name: str) -> None:
        """Free ``name`` (Erlang's ``unregister/1``).

        Raises:
            RegistrationError: no actor is registered under ``name``.
        """
        actor = self._registry.pop(name, None)
        if actor is None:
            raise RegistrationError(f"no actor is registered as {name!r}")
        actor._name = None

    def whereis(self, name: str) -> Actor | None:
        """The actor registered under ``name``, or ``None`` (Erlang's ``whereis/1``)."""
        return self._registry.get(name)

    def registered(self) -> dict[str, Actor]:
        """A snapshot of the registry: name → actor (Erlang's ``registered/0``)."""
        return dict(self._registry)

    def send(self, destination: Actor | Mailbox | str, message: object) -> None:
        """Send ``message`` to an actor, a mailbox, or the actor registered under a name.

        As Erlang's ``Destination ! Message``: never waits; a message to an actor that
        has ended is dropped.

        Raises:
            RegistrationError: no actor is registered under the name.
            ClosedPortError: the mailbox is closed.
            TypeError: ``destination`` is none of those.
        """
        if isinstance(destination, str):
            actor = self._registry.get(destination)
            if actor is None:
                raise RegistrationError(f"no actor is registered as {destination!r}")
            actor.send_nowait(message)
        elif isinstance(destination, (Actor, Mailbox)):
            destination.send_nowait(message)
        else:
            raise TypeError(f"cannot send to {type(destination).__name__}")

    # -- timers ---------------------------------------------------------------------------
    def send_after(
        self, seconds: float, destination: Actor | Mailbox | str, message: object
    ) -> TimerRef:
        """Send ``message`` to ``destination`` in ``seconds``, as ``erlang:send_after/3``.

        The message arrives through the destination's mailbox like any other, so it is
        received, selected on and matched as usual.  A registered name is looked up when
        the timer fires; if the actor has ended by then (or no actor has the name, or the
        mailbox is closed), the message is dropped, as in Erlang.  The timer belongs to
        this system: it is cancelled when the system ends.

        Args:
            seconds: the delay, 0 or more (the event loop's clock).
            destination: an :class:`Actor`, a :class:`~ports.Mailbox` or a registered name.
            message: any object.

        Returns:
            The timer, to cancel with :func:`cancel_timer` / :meth:`TimerRef.cancel`.

        Raises:
            TypeError: ``seconds`` is not a number, or ``destination`` is not one of those.
            ValueError: ``seconds`` is negative or NaN.
            ClosedPortError: the system has ended.
        """
        delay = check_seconds(seconds)
        if not isinstance(destination, (Actor, Mailbox, str)):
            raise TypeError(
                "a timer's destination is an Actor, a Mailbox or a registered name, not "
                + type(destination).__name__
            )
        return self._timers.send_after(delay, destination, message)

    def _deliver_timer(self, destination: Any, message: object) -> None:
        if isinstance(destination, str):
            destination = self._registry.get(destination)
            if destination is None:
                return
        if not destination.closed if isinstance(destination, Mailbox) else destination.alive:
            destination.send_nowait(message)

    @property
    def timers_pending(self) -> int:
        """The number of timers that have neither fired nor been cancelled."""
        return self._timers.pending

    # -- lifecycle ------------------------------------------------------------------------
    async def _wait_idle(self) -> None:
        while self._live:
            self._idle = anyio.Event()
            await self._idle.wait()

    def _close(self) -> None:
        self._closed = True
        self._timers.close()
        self._task_group.cancel_scope.cancel()


@asynccontextmanager
async def open_actor_system() -> AsyncIterator[ActorSystem]:
    """Open an actor system: a task group for actors, their registry and timers.

    ::

        async with ports.open_actor_system() as system:
            worker = system.spawn(work, port)
            system.send_after(5, worker, "tick")

    Leaving the block waits for every actor to end, as a task group waits for its tasks,
    then cancels the timers that have not fired.  If the block raises or is cancelled
    (or :meth:`ActorSystem.shutdown` is called), every actor is cancelled and ends with
    :attr:`ExitReason.SHUTDOWN`; the ports they own close; after ``shutdown()`` the rest
    of the block is cancelled too, at its next checkpoint, on both backends.  As with any
    anyio task group, an exception raised in the block comes out in an
    :exc:`ExceptionGroup`.  An actor's crash does not end the system (see :class:`Actor`).

    Inside the block and in its actors, the module-level :func:`send_after`,
    :func:`register`, :func:`whereis`... act on this system.
    """
    system: ActorSystem | None = None
    try:
        async with anyio.create_task_group() as task_group:
            system = ActorSystem(task_group)
            await task_group.start(system._timers.run)
            token = _current_system.set(system)
            try:
                yield system
                await system._wait_idle()
            finally:
                _current_system.reset(token)
                system._close()
    finally:
        if system is not None:
            system._close()
            # An actor cancelled before its task ever ran (asyncio drops such a coroutine
            # unstarted) still ends: its ports close, its links and monitors are told.
            for actor in list(system._live):
                actor._end(actor._kill_reason or ExitReason.SHUTDOWN)


# -- the current system's operations, as Erlang's BIFs ---------------------------------------
def send_after(seconds: float, destination: Actor | Mailbox | str, message: object) -> TimerRef:
    """Send ``message`` to ``destination`` in ``seconds``, as ``erlang:send_after/3``.

    :meth:`ActorSystem.send_after` on the :func:`current_system`: see there.

    Raises:
        RuntimeError: not inside an actor system.
        TypeError, ValueError, ClosedPortError: as :meth:`ActorSystem.send_after`.
    """
    return current_system().send_after(seconds, destination, message)


def cancel_timer(ref: TimerRef) -> bool:
    """Cancel a timer from :func:`send_after`, as ``erlang:cancel_timer/1``.

    Returns:
        ``True`` if it was cancelled before it fired (its message will never be sent);
        ``False`` if it fired already, was cancelled before, or its system has ended.

    Raises:
        TypeError: ``ref`` is not a :class:`TimerRef`.
    """
    if not isinstance(ref, TimerRef):
        raise TypeError(f"cancel_timer() takes a TimerRef, not {type(ref).__name__}")
    return ref.cancel()


def register(name: str, actor: Actor) -> None:
    """:meth:`ActorSystem.register` on the :func:`current_system` (``register/2``)."""
    current_system().register(name, actor)


def unregister(name: str) -> None:
    """:meth:`ActorSystem.unregister` on the :func:`current_system` (``unregister/1``)."""
    current_system().unregister(name)


def whereis(name: str) -> Actor | None:
    """:meth:`ActorSystem.whereis` on the :func:`current_system` (``whereis/1``)."""
    return current_system().whereis(name)


def send(destination: Actor | Mailbox | str, message: object) -> None:
    """:meth:`ActorSystem.send` on the :func:`current_system` (``Destination ! Message``)."""
    current_system().send(destination, message)
