"""Supervisors, as OTP's ``supervisor``: start children, restart them, give up in time.

Theory of operation
-------------------

A :class:`Supervisor` is an actor function.  Spawned (``system.spawn(Supervisor(...))``,
or as a child of another supervisor), it traps exits, then starts its children in order,
linking to each, so a child's end arrives as an :class:`~ports.Exit` message in its mailbox.
For each one it decides, as OTP does:

* whether to restart, from the child's restart type: ``PERMANENT`` always, ``TRANSIENT``
  unless it ended normally or was shut down, ``TEMPORARY`` never (it is forgotten);
* what to restart, from the strategy: ``ONE_FOR_ONE`` the child alone; ``ONE_FOR_ALL``
  every child, after terminating the others (in reverse start order) - for children that
  cannot work without each other;
* whether to give up: each restart is counted with its time; more than ``intensity``
  restarts within ``period`` seconds means the problem is not going away, so the
  supervisor terminates every child and crashes with :exc:`RestartIntensityError`, naming
  the child and the count - its own supervisor (or whoever links to or monitors it) then
  decides, as in an OTP supervision tree.

Terminating a child is OTP's ``shutdown``: unlink, send it an exit signal with reason
:attr:`~ports.ExitReason.SHUTDOWN` (a child that traps exits gets it as a message and
may clean up), wait up to the child's ``shutdown`` seconds, then kill it.

A supervisor runs until it is terminated itself (an exit signal from its parent ends it
after it has terminated its children), or, with ``auto_shutdown``, once its significant
children have ended, as OTP's ``auto_shutdown``.  However it ends - even killed or
cancelled - it terminates its children first (OTP's supervisor, killed, leaves that to the
links).  It only receives :class:`~ports.Exit` messages; do not send it others.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar, final

import anyio

from ioserver._exceptions import IOServerError, OptionError

from ._actors import Actor, Exit, ExitReason, Reason

__all__ = [
    "AutoShutdown",
    "ChildSpec",
    "Restart",
    "RestartIntensityError",
    "Strategy",
    "Supervisor",
]


class Restart(enum.StrEnum):
    """When a child is restarted (OTP's restart types)."""

    #: Always.
    PERMANENT = "permanent"
    #: Only after a crash: not after :attr:`~ports.ExitReason.NORMAL` or ``SHUTDOWN``.
    TRANSIENT = "transient"
    #: Never; the child is forgotten once it has ended.
    TEMPORARY = "temporary"


class Strategy(enum.StrEnum):
    """What is restarted when a child ends (OTP's restart strategies)."""

    #: That child alone.
    ONE_FOR_ONE = "one_for_one"
    #: Every child: the others are terminated (last started first), then all are started
    #: again in order.
    ONE_FOR_ALL = "one_for_all"


class AutoShutdown(enum.StrEnum):
    """When a supervisor stops by itself (OTP's ``auto_shutdown``)."""

    #: Never: it runs until terminated.
    NEVER = "never"
    #: When any significant child has ended for good (and is not restarted).
    ANY_SIGNIFICANT = "any_significant"
    #: When every significant child has ended for good.
    ALL_SIGNIFICANT = "all_significant"


@dataclass(frozen=True, slots=True)
class ChildSpec:
    """How a supervisor starts and restarts one child: OTP's child specification.

    Attributes:
        id: the child's identifier, unique in its supervisor; errors name it.
        start: the actor function, called as ``start(actor, *args)`` (a
            :class:`Supervisor` too, for a supervision tree).
        args: its positional arguments, the same at every restart.
        restart: :class:`Restart` (or its value as a string); ``PERMANENT`` by default.
        shutdown: seconds a terminated child may take to end after its exit signal,
            before it is killed; ``0`` kills at once (OTP's ``brutal_kill``), ``None``
            waits forever (``infinity``).  5 s by default.
        significant: its end (for good) counts for the supervisor's ``auto_shutdown``;
            only for ``TRANSIENT`` and ``TEMPORARY`` children.
        name: register each incarnation of the child under this name, so others reach
            the current one with :func:`ports.whereis` / :func:`ports.send`.
    """

    id: str
    start: Callable[..., Awaitable[Any]]
    args: tuple[Any, ...] = ()
    restart: Restart | str = Restart.PERMANENT
    shutdown: float | None = 5.0
    significant: bool = False
    name: str | None = None


class RestartIntensityError(IOServerError):
    """A supervisor gave up: a child ended more often than its restart intensity allows.

    As OTP's ``reached_max_restart_intensity``: more than ``intensity`` restarts within
    ``period`` seconds.  It is the supervisor's exit reason (it crashes with it after
    terminating its children): find it in its :class:`~ports.Down` / :class:`~ports.Exit`
    messages or from :meth:`~ports.Actor.wait`.  The child's own last reason is
    ``reason`` (and the ``__cause__`` when it was an exception).

    Attributes:
        child: the :attr:`ChildSpec.id` of the child whose end was one too many.
        restarts: the restarts counted within ``period`` (``intensity + 1``).
        intensity: the supervisor's ``intensity``.
        period: the supervisor's ``period``, in seconds.
        reason: the child's last exit reason.
    """

    def __init__(
        self, child: str, restarts: int, intensity: int, period: float, reason: Reason
    ) -> None:
        super().__init__(
            f"child {child!r} needed {restarts} restarts within {period:g} s (intensity"
            f" {intensity}); last reason: {reason!r}; the supervisor gives up"
        )
        self.child = child
        self.restarts = restarts
        self.intensity = intensity
        self.period = period
        self.reason = reason


@dataclass(slots=True)
class _Child:
    spec: ChildSpec
    actor: Actor | None = None
    ended_for_good: bool = field(default=False)


_E = TypeVar("_E", bound=enum.StrEnum)


def _enum(kind: type[_E], value: object, what: str) -> _E:
    """The member of ``kind`` that ``value`` names (a member is a str too).

    Raises:
        OptionError: ``value`` names none, listing those it may.
    """
    if isinstance(value, str):
        try:
            return kind(value)
        except ValueError:
            pass
    choices = ", ".join(repr(member.value) for member in kind)
    raise OptionError(f"{what} must be one of {choices}, not {value!r}") from None


@final
class Supervisor:
    """An actor function that supervises children, as OTP's ``supervisor`` behaviour.

    ::

        supervisor = ports.Supervisor(
            [ports.ChildSpec("db", db_actor), ports.ChildSpec("web", web_actor, (port,))],
            strategy="one_for_all", intensity=3, period=10,
        )
        actor = system.spawn(supervisor, name="top")

    See the module docstring for what it does.  One :class:`Supervisor` object runs as
    one actor at a time (a restart by its own supervisor starts it afresh).

    Args:
        children: the child specifications, started in this order.
        strategy: :class:`Strategy` (or its value as a string); ``ONE_FOR_ONE`` by default.
        intensity: the restarts allowed within ``period`` (OTP's ``intensity``, default 1).
        period: seconds (OTP's ``period``, default 5).
        auto_shutdown: :class:`AutoShutdown` (or its value); ``NEVER`` by default.

    Raises:
        OptionError: a wrong strategy, intensity, period or auto_shutdown, two children
            with one id, a significant ``PERMANENT`` child, a wrong restart type or
            shutdown, or ``auto_shutdown`` with no significant child.
        TypeError: a child is not a :class:`ChildSpec`.
    """

    def __init__(
        self,
        children: Sequence[ChildSpec],
        *,
        strategy: Strategy | str = Strategy.ONE_FOR_ONE,
        intensity: int = 1,
        period: float = 5.0,
        auto_shutdown: AutoShutdown | str = AutoShutdown.NEVER,
    ) -> None:
        self.strategy: Strategy = _enum(Strategy, strategy, "strategy")
        self.auto_shutdown: AutoShutdown = _enum(AutoShutdown, auto_shutdown, "auto_shutdown")
        if isinstance(intensity, bool) or not isinstance(intensity, int) or intensity < 0:
            raise OptionError(f"intensity must be an int, 0 or more, not {intensity!r}")
        if (
            isinstance(period, bool)
            or not isinstance(period, (int, float))
            or not 0 < period < math.inf
        ):
            raise OptionError(f"period must be positive seconds, not {period!r}")
        self.intensity = intensity
        self.period = float(period)
        specs: list[ChildSpec] = []
        seen: set[str] = set()
        for spec in children:
            if not isinstance(spec, ChildSpec):
                raise TypeError(f"a child is a ChildSpec, not {type(spec).__name__}")
            if spec.id in seen:
                raise OptionError(f"two children have the id {spec.id!r}")
            seen.add(spec.id)
            restart = _enum(Restart, spec.restart, f"child {spec.id!r}: restart")
            if spec.significant and restart is Restart.PERMANENT:
                raise OptionError(f"child {spec.id!r}: a permanent child cannot be significant")
            if spec.shutdown is not None and (
                isinstance(spec.shutdown, bool)
                or not isinstance(spec.shutdown, (int, float))
                or spec.shutdown < 0
            ):
                raise OptionError(
                    f"child {spec.id!r}: shutdown must be seconds (0 or more) or None,"
                    f" not {spec.shutdown!r}"
                )
            specs.append(dataclasses.replace(spec, restart=restart))
        if self.auto_shutdown is not AutoShutdown.NEVER and not any(
            spec.significant for spec in specs
        ):
            raise OptionError(f"auto_shutdown={self.auto_shutdown.value} needs a significant child")
        self._specs = tuple(specs)
        self._children: list[_Child] = []
        self._restarts: deque[float] = deque()
        self._total_restarts = 0
        self._actor: Actor | None = None

    # -- introspection ------------------------------------------------------------------
    def which_children(self) -> list[tuple[str, Actor | None]]:
        """``(id, actor)`` for each child, in start order; ``actor`` is ``None`` while the
        child is not running (OTP's ``which_children/1``)."""
        return [(child.spec.id, child.actor) for child in self._children]

    def child(self, id: str) -> Actor | None:
        """The running actor of the child ``id``, or ``None``."""
        for child in self._children:
            if child.spec.id == id:
                return child.actor
        return None

    @property
    def restarts(self) -> int:
        """The restarts made since this supervisor started (each ``ONE_FOR_ALL`` restart
        of every child counts once)."""
        return self._total_restarts

    # -- the actor ------------------------------------------------------------------------
    async def __call__(self, actor: Actor) -> None:
        """Run as the supervisor actor (spawn the object; do not call it yourself)."""
        actor.trap_exits = True
        self._actor = actor
        self._children = [_Child(spec) for spec in self._specs]
        self._restarts.clear()
        self._total_restarts = 0
        try:
            for child in self._children:
                self._start(child)
            while True:
                message = await actor.receive(match=_is_exit)
                if await self._handle(message):
                    return
        finally:
            with anyio.CancelScope(shield=True):
                await self._terminate_all()

    def _start(self, child: _Child) -> None:
        actor = self._actor
        assert actor is not None
        spec = child.spec
        child.actor = actor.system.spawn(spec.start, *spec.args, name=spec.name)
        actor.link(child.actor)

    async def _handle(self, message: Exit) -> bool:
        """Act on one exit signal; return True when the supervisor should stop."""
        # (An exit signal sent from outside any actor has actor None, as has a child
        # that ended for good: only a live child's actor identifies it.)
        child = next(
            (c for c in self._children if c.actor is not None and c.actor is message.actor),
            None,
        )
        if child is None:
            # Not one of ours: our parent (or someone) told us to stop.  A normal exit of
            # a stray link is nothing; any other reason ends the supervisor, as in OTP.
            return message.reason is not ExitReason.NORMAL
        child.actor = None
        reason = message.reason
        restart = child.spec.restart
        if restart is Restart.TEMPORARY or (
            restart is Restart.TRANSIENT and reason in (ExitReason.NORMAL, ExitReason.SHUTDOWN)
        ):
            child.ended_for_good = True
            if restart is Restart.TEMPORARY:
                self._children.remove(child)
            return self._should_auto_shutdown(child)
        self._count_restart(child, reason)
        if self.strategy is Strategy.ONE_FOR_ONE:
            self._start(child)
        else:
            for other in list(reversed(self._children)):
                if other.actor is not None:
                    await self._terminate(other)
            for other in self._children:
                if not other.ended_for_good:
                    self._start(other)
        return False

    def _count_restart(self, child: _Child, reason: Reason) -> None:
        now = anyio.current_time()
        restarts = self._restarts
        restarts.append(now)
        while restarts and restarts[0] <= now - self.period:
            restarts.popleft()
        if len(restarts) > self.intensity:
            error = RestartIntensityError(
                child.spec.id, len(restarts), self.intensity, self.period, reason
            )
            if isinstance(reason, BaseException):
                raise error from reason
            raise error
        self._total_restarts += 1

    def _should_auto_shutdown(self, ended: _Child) -> bool:
        if not ended.spec.significant or self.auto_shutdown is AutoShutdown.NEVER:
            return False
        if self.auto_shutdown is AutoShutdown.ANY_SIGNIFICANT:
            return True
        return all(
            c.ended_for_good for c in self._children if c.spec.significant and c is not ended
        )

    async def _terminate_all(self) -> None:
        for child in list(reversed(self._children)):
            if child.actor is not None:
                await self._terminate(child)

    async def _terminate(self, child: _Child) -> None:
        """OTP's shutdown of one child: unlink, exit signal ``SHUTDOWN``, wait, kill."""
        actor, child.actor = child.actor, None
        assert actor is not None and self._actor is not None
        self._actor.unlink(actor)
        timeout = child.spec.shutdown
        if timeout == 0:
            actor.kill()
        else:
            actor._signal(self._actor, ExitReason.SHUTDOWN)
            with anyio.move_on_after(math.inf if timeout is None else timeout):
                await actor.wait()
            actor.kill()
        await actor.wait()
        # Its Exit may have come before the unlink: drop it, as OTP's shutdown does.
        self._actor.mailbox._take_all(lambda m: m.__class__ is Exit and m.actor is actor)
        if child.spec.restart is Restart.TEMPORARY and child in self._children:
            self._children.remove(child)  # a terminated temporary child is not restarted


def _is_exit(message: object) -> bool:
    return message.__class__ is Exit
