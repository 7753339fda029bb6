"""RetryPolicy: whether and when a failed task runs again, in tenacity's vocabulary.

tenacity decides (its ``wait_*``, ``stop_*`` and ``retry_if_*`` strategies); the
attempt count comes from the message, not from a loop in the worker, because the
next attempt is a new message the broker holds until it is due.

tenacity is imported when a policy first decides something, not with this
module: every task has a policy, but a worker process whose tasks never fail
never asks one, and would otherwise hold tenacity (and its asyncio support)
for nothing. :data:`DEFAULT_BACKOFF` is made on first use.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeAlias

if TYPE_CHECKING:
    import tenacity

__all__ = ["DEFAULT_BACKOFF", "DEFAULT_MAX_RETRIES", "Backoff", "RetryPolicy"]

#: Retries after the first attempt when a task names none (Celery's default).
DEFAULT_MAX_RETRIES = 3

#: A tenacity wait strategy (called with a ``RetryCallState``), or fixed seconds.
Backoff: TypeAlias = "Callable[[tenacity.RetryCallState], float] | float | int"

#: Exponential backoff with jitter: about 1 s, 2 s, 4 s ... capped at 5 minutes
#: (``tenacity.wait_exponential_jitter(initial=1, max=300)``, made on first use).
DEFAULT_BACKOFF: Callable[[tenacity.RetryCallState], float]


def __getattr__(name: str) -> Any:
    # DEFAULT_BACKOFF, made on first use and kept; see the module docstring.
    if name != "DEFAULT_BACKOFF":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import tenacity

    return globals().setdefault(name, tenacity.wait_exponential_jitter(initial=1, max=300))


def _wait_strategy(backoff: Backoff | None) -> Callable[[tenacity.RetryCallState], float]:
    """The tenacity wait strategy for a ``backoff`` argument of :class:`RetryPolicy`."""
    if backoff is None:
        # A name this module has not made yet is not looked up through __getattr__ here.
        default: Callable[[tenacity.RetryCallState], float] | None = globals().get(
            "DEFAULT_BACKOFF"
        )
        return default if default is not None else __getattr__("DEFAULT_BACKOFF")
    if isinstance(backoff, (int, float)):
        import tenacity

        return tenacity.wait_fixed(float(backoff))
    return backoff


class RetryPolicy:
    """When a failed attempt is retried, and after how long.

    Attempts = ``max_retries`` + 1, exactly.

    Args:
        max_retries: Retries after the first attempt; 0 never retries.
        backoff: A tenacity wait strategy (``tenacity.wait_fixed(0.3)``,
            ``tenacity.wait_exponential_jitter(initial=1, max=300)``) or seconds.
        retry_on: Exception types that are retried (all by default).
        dont_retry_on: Exception types never retried, even if listed in ``retry_on``.

    Example::

        RetryPolicy(max_retries=5, backoff=tenacity.wait_exponential(multiplier=0.2))
    """

    def __init__(
        self,
        max_retries: int = DEFAULT_MAX_RETRIES,
        backoff: Backoff | None = None,
        retry_on: tuple[type[BaseException], ...] = (Exception,),
        dont_retry_on: tuple[type[BaseException], ...] = (),
    ) -> None:
        if max_retries < 0:
            raise ValueError("max_retries cannot be negative")
        self.max_retries = max_retries
        self._backoff_given = backoff
        # A strategy given is used as it is; the default or fixed seconds become
        # one on first use, which imports tenacity.
        self._backoff = None if backoff is None or isinstance(backoff, (int, float)) else backoff
        self.retry_on = tuple(retry_on)
        self.dont_retry_on = tuple(dont_retry_on)
        self._decide: tuple[tenacity.stop.stop_base, tenacity.retry_base] | None = None

    @property
    def backoff(self) -> Callable[[tenacity.RetryCallState], float]:
        """The tenacity wait strategy (seconds given are a ``tenacity.wait_fixed``)."""
        backoff = self._backoff
        if backoff is None:
            backoff = self._backoff = _wait_strategy(self._backoff_given)
        return backoff

    @backoff.setter
    def backoff(self, strategy: Callable[[tenacity.RetryCallState], float]) -> None:
        self._backoff = self._backoff_given = strategy

    def _strategies(self) -> tuple[tenacity.stop.stop_base, tenacity.retry_base]:
        """When to stop, and which exceptions are retried, as tenacity strategies."""
        decide = self._decide
        if decide is None:
            import tenacity

            retry = tenacity.retry_if_exception_type(
                self.retry_on
            ) & tenacity.retry_if_not_exception_type(self.dont_retry_on)
            decide = self._decide = (tenacity.stop_after_attempt(self.max_retries + 1), retry)
        return decide

    def __repr__(self) -> str:
        return f"RetryPolicy(max_retries={self.max_retries}, backoff={self.backoff!r})"

    def replace(self, **changes: Any) -> RetryPolicy:
        """Return a copy with some arguments changed (``None`` keeps the current one)."""
        args: dict[str, Any] = {
            "max_retries": self.max_retries,
            "backoff": self._backoff_given,
            "retry_on": self.retry_on,
            "dont_retry_on": self.dont_retry_on,
        }
        args.update({k: v for k, v in changes.items() if v is not None})
        return RetryPolicy(**args)

    def is_retryable(self, exc: BaseException) -> bool:
        """Whether ``exc`` is an exception this policy retries at all."""
        _, retry = self._strategies()
        return bool(retry(self.call_state(1, exc)))

    def next_delay(self, attempt: int, exc: BaseException) -> float | None:
        """Return seconds to wait before the next attempt, or None to give up.

        Args:
            attempt: Attempts made so far, starting at 1.
            exc: The exception the last attempt raised.
        """
        stop, retry = self._strategies()
        state = self.call_state(attempt, exc)
        if not retry(state) or stop(state):
            return None
        return max(0.0, float(self.backoff(state)))

    def backoff_delay(self, attempt: int, exc: BaseException) -> float:
        """Return the seconds ``backoff`` waits after ``attempt``, whether or not it is retried.

        For a retry the task asked for (:exc:`~mqtasks.exceptions.Retry` without
        a countdown), which :meth:`next_delay` would not grant past ``max_retries``.

        Args:
            attempt: Attempts made so far, starting at 1.
            exc: The exception the last attempt raised.
        """
        return max(0.0, float(self.backoff(self.call_state(attempt, exc))))

    @staticmethod
    def call_state(attempt: int, exc: BaseException) -> tenacity.RetryCallState:
        """Return the tenacity call state of a failed ``attempt`` that raised ``exc``.

        tenacity's strategies read the attempt number and the outcome from a call
        state; this one is for the attempt the message says it was, not for a
        loop tenacity runs.
        """
        import tenacity

        state = tenacity.RetryCallState(None, None, (), {})  # type: ignore[arg-type]
        state.attempt_number = attempt
        state.outcome = tenacity.Future.construct(attempt, exc, True)
        return state
