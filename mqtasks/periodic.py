"""Periodic schedules: when each tick falls, which ticks are due, and their registry.

Pure arithmetic and validation; the scheduler (:mod:`mqtasks.scheduler`) sends the
ticks. A tick is a float of epoch seconds (UTC). ``every=N`` ticks are the multiples
``k * N`` of ``N`` from the epoch, so every process computes the same tick times.

``cron=`` takes a 5-field expression (minute, hour, day of month, month, day of
week), evaluated in the schedule's time zone (``tz``, UTC by default) by cronsim,
which follows Debian cron across daylight-saving changes:

* A job at a specific time (neither the minute nor the hour field starts with
  ``*``) whose local time falls in the hour skipped when clocks go forward runs
  once, at the first local time after the jump: in Europe/Berlin on 2026-03-29,
  ``30 2 * * *`` runs at 03:00 CEST (01:00 UTC).
* Such a job whose local time falls in the hour repeated when clocks go back runs
  once, in the first pass: on 2026-10-25, ``30 2 * * *`` runs at 02:30 CEST
  (00:30 UTC), not at 02:30 CET.
* A job whose minute or hour field starts with ``*`` (``*/30 * * * *``,
  ``0 */2 * * *``) follows real elapsed time: it skips nothing that exists and runs
  in both passes of the repeated hour (on 2026-10-25, ``*/30 * * * *`` runs at
  00:00, 00:30, 01:00 and 01:30 UTC, that is 02:00 and 02:30 CEST then CET).
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone, tzinfo
from typing import TYPE_CHECKING, Any, Literal, get_args
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError

from .exceptions import ConfigurationError

if TYPE_CHECKING:
    from .task import Task

__all__ = [
    "HORIZON",
    "MAX_PER_TURN",
    "ON_TIME",
    "CatchUp",
    "PeriodicRegistry",
    "Schedule",
    "make_schedule",
]

#: What a scheduler sends after a gap: every missed tick, the newest, or only an on-time one.
CatchUp = Literal["all", "latest", "none"]

#: Seconds a tick may be late and still count as on time (``catch_up="none"``).
ON_TIME: float = 1.0
#: Seconds after which a tick is never sent (claims in the backend live this long).
HORIZON: float = 86400.0
#: Most ticks of one schedule that one :meth:`Schedule.due` call returns (``catch_up="all"``).
MAX_PER_TURN: int = 1000

#: The options a schedule passes on to :meth:`~mqtasks.task.Task.message`.
MESSAGE_OPTIONS = frozenset({"queue", "priority", "expires"})
#: Shortest ``every``: tick ids have millisecond resolution.
MIN_EVERY = 0.001

_CRON_FIELDS = "minute hour day-of-month month day-of-week"
_NAME_OK = re.compile(r"[^\s\x00-\x1f\x7f]+")


@dataclass(frozen=True)
class Schedule:
    """A task sent at cron times or every so many seconds; build one with :func:`make_schedule`."""

    #: Unique among the app's schedules; part of every tick id.
    name: str
    #: Name of the task each tick calls.
    task: str
    args: tuple[Any, ...]
    kwargs: Mapping[str, Any]
    #: ``queue``/``priority``/``expires`` for :meth:`~mqtasks.task.Task.message`.
    options: Mapping[str, Any]
    #: A 5-field cron expression, or None for ``every``.
    cron: str | None
    #: Seconds between epoch-aligned ticks, or None for ``cron``.
    every: float | None
    #: IANA time zone the cron expression is read in ("UTC" when none was given).
    tz: str
    #: Which ticks a scheduler sends after a gap: ``"all"``, ``"latest"`` or ``"none"``.
    catch_up: CatchUp
    # The last (after, next tick) pair computed for cron: the scheduler asks again
    # each turn with the same `after` (the last tick sent), and CronSim is far
    # dearer than two comparisons. Not part of the value.
    _memo: tuple[float, float] = field(
        init=False, repr=False, compare=False, default=(math.inf, math.inf)
    )

    def next_tick(self, after: float) -> float:
        """Return the first tick strictly after ``after`` (epoch seconds).

        Returns ``math.inf`` when a cron expression matches no later time.
        """
        if self.every is not None:
            return _every_next(self.every, after)
        lo, tick = self._memo
        if lo <= after < tick:
            return tick
        assert self.cron is not None
        tick = _cron_next(self.cron, self.tz, after)
        object.__setattr__(self, "_memo", (after, tick))
        return tick

    def ticks(self, after: float, until: float, limit: int = MAX_PER_TURN) -> list[float]:
        """Return the ticks in ``(after, until]``, ascending: the first ``limit`` of them."""
        out: list[float] = []
        if limit <= 0 or until <= after:
            return out
        if self.every is not None:
            every = self.every
            k = _every_index(every, after) + 1
            while len(out) < limit:
                tick = k * every
                if tick > until:
                    break
                out.append(tick)
                k += 1
            return out
        assert self.cron is not None
        first = self.next_tick(after)
        if first > until:
            return out
        out.append(first)
        if len(out) < limit:
            for tick in _cron_ticks(self.cron, self.tz, first):
                if tick > until:
                    break
                out.append(tick)
                if len(out) >= limit:
                    break
        if len(out) > 1:
            object.__setattr__(self, "_memo", (out[-2], out[-1]))
        return out

    def due(self, last: float | None, now: float) -> list[float]:
        """Return the ticks to send at ``now``, oldest first, per :attr:`catch_up`.

        Args:
            last: The newest tick already sent, or None if this schedule was never
                sent (it then starts from ``now``, with no history).
            now: The current time, epoch seconds.
        """
        lower = last if last is not None else now - ON_TIME
        lower = max(lower, now - HORIZON)
        if self.catch_up == "all":
            return self.ticks(lower, now, MAX_PER_TURN)
        newest = self._newest(lower, now)
        if newest is None:
            return []
        if self.catch_up == "none" and now - newest > ON_TIME:
            return []
        return [newest]

    def tick_id(self, tick: float) -> str:
        """Return the id of a tick: ``periodic:<name>:<UTC time>``, also its message id.

        The time is ISO 8601 with a ``Z``, with milliseconds only when the tick has them:
        ``periodic:cleanup:2026-12-07T15:05:00Z``, ``periodic:poll:2026-12-07T15:05:00.500Z``.
        """
        seconds, ms = divmod(round(tick * 1000), 1000)
        when = datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
        fraction = f".{ms:03d}" if ms else ""
        return f"periodic:{self.name}:{when}{fraction}Z"

    def describe(self) -> str:
        """Return the timing in a few words: ``cron */5 * * * * (Europe/Berlin)``, ``every 30s``."""
        if self.every is not None:
            return f"every {self.every:g}s"
        return f"cron {self.cron} ({self.tz})"

    def _newest(self, lower: float, now: float) -> float | None:
        """The newest tick in ``(lower, now]``, or None."""
        if now <= lower:
            return None
        if self.every is not None:
            tick = _every_index(self.every, now) * self.every
            return tick if tick > lower else None
        assert self.cron is not None
        if self.next_tick(lower) > now:
            return None
        # Search back from `now` in doubling windows rather than walk every tick
        # since `lower`: after a long gap that walk is up to a day of minutes.
        window = 60.0
        while True:
            start = max(lower, now - window)
            newest = self.next_tick(start)
            if newest <= now:
                break
            if start <= lower:
                return None
            window *= 2
        following = math.inf
        for tick in _cron_ticks(self.cron, self.tz, newest):
            if tick > now:
                following = tick
                break
            newest = tick
        object.__setattr__(self, "_memo", (newest, following))
        return newest


def _zone(tz: str) -> tzinfo:
    # cronsim skips its daylight-saving handling for datetime.timezone.utc only.
    return timezone.utc if tz == "UTC" else ZoneInfo(tz)


def _cron_ticks(expr: str, tz: str, after: float) -> Iterator[float]:
    """Ticks of a valid cron expression in ``tz`` strictly after ``after``, strictly ascending."""
    latest = after
    for when in CronSim(expr, datetime.fromtimestamp(after, _zone(tz))):
        tick = when.timestamp()
        # For a specific-time job cronsim works in local wall time, which forgets
        # which pass of a repeated hour `after` was in: from inside the second pass
        # it names the first pass again. That tick is past.
        if tick > latest:
            latest = tick
            yield tick


@functools.lru_cache(maxsize=4096)
def _cron_next(expr: str, tz: str, after: float) -> float:
    """The first tick after ``after`` (``math.inf`` if none), shared by schedules alike."""
    return next(_cron_ticks(expr, tz, after), math.inf)


def _every_index(every: float, t: float) -> int:
    """The largest k with ``k * every <= t``, checked in the same float product ticks use."""
    k = math.floor(t / every)
    while k * every > t:
        k -= 1
    while (k + 1) * every <= t:
        k += 1
    return k


def _every_next(every: float, after: float) -> float:
    return (_every_index(every, after) + 1) * every


def make_schedule(
    name: str,
    task: Task[..., Any],
    *,
    cron: str | None = None,
    every: float | timedelta | None = None,
    tz: str | None = None,
    args: tuple[Any, ...] | list[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    options: Mapping[str, Any] | None = None,
    catch_up: str = "latest",
) -> Schedule:
    """Check a periodic schedule and build it.

    Args:
        name: The schedule's name, unique in the app; part of every tick id.
        task: The task each tick calls.
        cron: A 5-field cron expression, read in ``tz``.
        every: Seconds (or a ``timedelta``) between ticks, aligned to the epoch.
        tz: IANA time zone for ``cron`` (default UTC); not accepted with ``every``.
        args: Positional arguments of each call.
        kwargs: Keyword arguments of each call.
        options: ``queue``, ``priority`` and/or ``expires`` for each message.
        catch_up: ``"all"``, ``"latest"`` (default) or ``"none"``: what is sent after a gap.

    Raises:
        ConfigurationError: Something above cannot work; the message names the schedule.
    """

    def fail(problem: str) -> ConfigurationError:
        return ConfigurationError(f"Periodic schedule {name!r}: {problem}")

    if not isinstance(name, str) or not _NAME_OK.fullmatch(name):
        raise fail(
            "the name must be a non-empty string without spaces or control characters; "
            "pass name=... (it defaults to the task's name)."
        )
    if (cron is None) == (every is None):
        raise fail(
            "give exactly one of cron=... (a 5-field cron expression) or every=... "
            f"(seconds between ticks); got {'both' if cron is not None else 'neither'}."
        )
    cron_expr = _check_cron(cron, fail) if cron is not None else None
    every_s = _check_every(every, fail) if every is not None else None
    if tz is not None and every is not None:
        raise fail(
            f"tz={tz!r} applies to cron schedules only; every= ticks are counted in "
            "seconds from the epoch whatever the time zone. Drop tz, or use cron=..."
        )
    zone = _check_tz(tz, fail) if tz is not None else "UTC"
    if catch_up not in get_args(CatchUp):
        raise fail(
            f"catch_up must be 'all', 'latest' or 'none', not {catch_up!r}: every missed "
            "tick, only the newest missed, or only a tick that is on time."
        )
    args_t = tuple(args)
    kwargs_d = dict(kwargs or {})
    try:
        task.check_arguments(args_t, kwargs_d)
    except TypeError as exc:
        raise fail(
            f"args/kwargs do not fit task {task.name!r}: {exc}. Every tick calls the task "
            "with these arguments; pass args=(...) and kwargs={...} that bind its signature."
        ) from None
    options_d = dict(options or {})
    unknown = sorted(set(options_d) - MESSAGE_OPTIONS)
    if unknown:
        raise fail(
            f"unknown options {unknown}: a schedule passes only queue, priority and expires "
            "to its messages; set other options on the task itself."
        )
    return Schedule(
        name=name,
        task=task.name,
        args=args_t,
        kwargs=kwargs_d,
        options=options_d,
        cron=cron_expr,
        every=every_s,
        tz=zone,
        catch_up=catch_up,  # type: ignore[arg-type]  # checked against CatchUp above
    )


def _check_cron(cron: object, fail: Callable[[str], ConfigurationError]) -> str:
    if not isinstance(cron, str):
        raise fail(f"cron must be a string such as '*/5 * * * *', not {cron!r}.")
    fields = cron.split()
    if len(fields) == 6:
        raise fail(
            f"cron {cron!r} has 6 fields; 6-field expressions (with seconds) are not "
            f"supported. Use 5 fields: {_CRON_FIELDS}, or every=... for sub-minute ticks."
        )
    if len(fields) != 5:
        raise fail(
            f"cron {cron!r} has {len(fields)} fields; a cron expression has exactly 5: "
            f"{_CRON_FIELDS}."
        )
    expr = " ".join(fields)
    try:
        CronSim(expr, datetime.now(timezone.utc))
    except CronSimError as exc:
        raise fail(
            f"invalid cron expression {cron!r} ({exc}). Fields: {_CRON_FIELDS}; "
            "e.g. '*/5 * * * *' every five minutes, '30 2 * * MON' at 02:30 on Mondays."
        ) from None
    return expr


def _check_every(every: object, fail: Callable[[str], ConfigurationError]) -> float:
    if isinstance(every, timedelta):
        seconds = every.total_seconds()
    elif isinstance(every, (int, float)) and not isinstance(every, bool):
        seconds = float(every)
    else:
        raise fail(f"every must be a number of seconds or a timedelta, not {every!r}.")
    if not math.isfinite(seconds) or seconds < MIN_EVERY:
        raise fail(
            f"every must be a finite duration of at least {MIN_EVERY} s (tick ids have "
            f"millisecond resolution), not {every!r}."
        )
    return seconds


def _check_tz(tz: object, fail: Callable[[str], ConfigurationError]) -> str:
    if not isinstance(tz, str) or not tz:
        raise fail(f"tz must be an IANA time zone name such as 'Europe/Berlin', not {tz!r}.")
    try:
        ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError):
        raise fail(
            f"unknown time zone {tz!r}; use an IANA name such as 'Europe/Berlin' or 'UTC' "
            "(on systems without zone data, install the tzdata package)."
        ) from None
    return tz


class PeriodicRegistry:
    """The schedules of an app, by name, in the order they were added."""

    def __init__(self) -> None:
        self._schedules: dict[str, Schedule] = {}

    def add(self, schedule: Schedule) -> None:
        """Register ``schedule``.

        Raises:
            ConfigurationError: A schedule of that name is already registered.
        """
        if schedule.name in self._schedules:
            raise ConfigurationError(
                f"Periodic schedule {schedule.name!r}: a schedule of that name is already "
                f"registered (task {self._schedules[schedule.name].task!r}); give this one "
                "another name=..."
            )
        self._schedules[schedule.name] = schedule

    def get(self, name: str) -> Schedule:
        """Return the schedule called ``name``.

        Raises:
            KeyError: No schedule has that name.
        """
        try:
            return self._schedules[name]
        except KeyError:
            raise KeyError(f"no periodic schedule named {name!r}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._schedules

    def names(self) -> list[str]:
        """Return the schedules' names, in the order they were added."""
        return list(self._schedules)

    def __iter__(self) -> Iterator[Schedule]:
        return iter(list(self._schedules.values()))

    def __len__(self) -> int:
        return len(self._schedules)
