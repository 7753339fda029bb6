"""The ordering options of a task (``ordering_key``, ``partitions``,
``ordering_on_dead_letter``) and their checks at decoration."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from ..exceptions import ConfigurationError
from .keys import DEFAULT_PARTITIONS, MAX_PARTITIONS, key_digest, partition_index, partition_name

if TYPE_CHECKING:
    from ..task import Task

__all__ = ["OPTIONS", "Ordering", "ordered_queues", "ordering_of"]

#: The task options of ordered processing.
OPTIONS = frozenset({"ordering_key", "partitions", "ordering_on_dead_letter"})

#: What happens to a key's later tasks after one of them is dead-lettered.
OnDeadLetter = Literal["continue", "halt"]

_HINT = "App(..., backend='redis://...') or MQTASKS_BACKEND_URL"


@dataclass(frozen=True)
class Ordering:
    """How a task's calls are ordered: by the value of one parameter, over partitions."""

    #: The parameter whose value is the key.
    key: str
    #: Partitions of the task's queue.
    partitions: int = DEFAULT_PARTITIONS
    #: ``continue``: a dead letter lets the key's next task run; ``halt``: later
    #: tasks of the key are dead-lettered (``ordering_halted``) until it is replayed.
    on_dead_letter: OnDeadLetter = "continue"

    @property
    def halts(self) -> bool:
        """Whether a dead letter halts its key."""
        return self.on_dead_letter == "halt"

    def okey(self, arguments: Mapping[str, Any]) -> str:
        """Return the key digest of a call, from its arguments bound to the parameter
        names (defaults applied).

        Raises:
            EncodeError: The key's value cannot be encoded as JSON.
        """
        return key_digest(arguments[self.key])

    def partition(self, queue: str, okey: str) -> str:
        """Return the partition queue of key digest ``okey`` on ``queue``."""
        return partition_name(queue, partition_index(okey, self.partitions), self.partitions)


def ordering_of(
    name: str,
    queue: str,
    fn: Callable[..., Any],
    options: MutableMapping[str, Any],
    *,
    priority: int | None,
    has_backend: bool,
    others: Iterable[Task[Any, Any]],
) -> Ordering | None:
    """Take the ordering options out of ``options``; return the task's :class:`Ordering`, if any.

    Args:
        name: The task's name, for messages.
        queue: The task's queue.
        fn: The task's function.
        options: The task's options; the ordering ones are removed.
        priority: The task's default priority.
        has_backend: Whether the app has a result backend.
        others: The app's other tasks (their queues' partition counts must agree).

    Raises:
        ConfigurationError: What is wrong, and what to do.
    """
    key = options.pop("ordering_key", None)
    partitions = options.pop("partitions", None)
    on_dead_letter = options.pop("ordering_on_dead_letter", None)
    if key is None:
        if partitions is not None or on_dead_letter is not None:
            raise ConfigurationError(
                f"Task {name!r}: partitions and ordering_on_dead_letter go with "
                "ordering_key=<parameter name>."
            )
        return None
    where = f"Task {name!r}"
    signature = inspect.signature(fn)
    if not isinstance(key, str) or key not in signature.parameters:
        raise ConfigurationError(
            f"{where}: ordering_key={key!r} must name a parameter of the function "
            f"(it has {list(signature.parameters)})."
        )
    kind = signature.parameters[key].kind
    if kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
        raise ConfigurationError(f"{where}: ordering_key={key!r} names a *args or **kwargs.")
    if partitions is None:
        partitions = DEFAULT_PARTITIONS
    if (
        isinstance(partitions, bool)
        or not isinstance(partitions, int)
        or not 1 <= partitions <= MAX_PARTITIONS
    ):
        raise ConfigurationError(
            f"{where}: partitions must be a whole number from 1 to {MAX_PARTITIONS}, "
            f"not {partitions!r}."
        )
    if on_dead_letter is None:
        on_dead_letter = "continue"
    if on_dead_letter not in ("continue", "halt"):
        raise ConfigurationError(
            f"{where}: ordering_on_dead_letter must be 'continue' or 'halt', not "
            f"{on_dead_letter!r}."
        )
    if priority is not None:
        raise ConfigurationError(
            f"{where}: ordered tasks take no priority (a priority would let a later task "
            "of a key overtake an earlier one); remove priority=."
        )
    if not has_backend:
        raise ConfigurationError(
            f"{where} sets ordering_key, whose sequence numbers and partition leases are "
            f"kept in the result backend, and the app has none: {_HINT}."
        )
    for other in others:
        theirs = getattr(other, "ordering", None)
        if other.name == name or theirs is None or other.queue != queue:
            continue
        if theirs.partitions != partitions:
            raise ConfigurationError(
                f"{where}: partitions={partitions}, but task {other.name!r} of the same queue "
                f"{queue!r} has partitions={theirs.partitions}: the ordered tasks of a queue "
                "share its partitions; give them the same number."
            )
    return Ordering(key, partitions, on_dead_letter)


def ordered_queues(tasks: Iterable[Task[Any, Any]]) -> dict[str, int]:
    """Return the partition count of each queue that has ordered tasks."""
    found: dict[str, int] = {}
    for task in tasks:
        ordering = getattr(task, "ordering", None)
        if ordering is not None:
            found.setdefault(task.queue, ordering.partitions)
    return found
