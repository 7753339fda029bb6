"""Start-up checks: configurations that would misbehave are refused before any message moves.

:func:`check_app` is what a :class:`~mqtasks.worker.Worker` runs when it is
created, and what :meth:`App.check() <mqtasks.app.App.check>` runs on demand
(in a deploy script, or a test). It reads the app's settings, queue configs,
tasks and retry policies; it does not talk to the broker.

The retry schedule of a policy is computed from its tenacity wait strategy's
upper bound (for jittered or random waits, their maximum):
:func:`max_backoff` per attempt and :func:`retry_schedule` in all.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ._url import mask_url
from .exceptions import BackendError, ConfigurationError
from .middleware.results import Results
from .retry import RetryPolicy
from .transport.base import Transport, broker_spec

if TYPE_CHECKING:
    import tenacity

    from .app import App

__all__ = [
    "batch_problems",
    "broker_warnings",
    "check_app",
    "check_backend",
    "check_prefetch",
    "max_backoff",
    "result_problems",
    "retry_schedule",
    "time_limit_problems",
]

#: kombu's Redis ``visibility_timeout`` when the transport options set none, in seconds.
KOMBU_VISIBILITY_TIMEOUT = 3600.0

#: RabbitMQ's ``consumer_timeout`` by default (30 minutes, since 3.8.15), in seconds.
#: Reading the broker's value needs the management API; a broker configured
#: otherwise is declared with the ``consumer_timeout`` transport option.
RABBITMQ_CONSUMER_TIMEOUT = 1800.0


def max_backoff(policy: RetryPolicy, attempt: int) -> float:
    """Return the longest wait ``policy`` can choose after failed attempt ``attempt``.

    tenacity's random strategies count at their maximum (``wait_random``'s
    ``max``, ``wait_exponential_jitter`` with its whole jitter,
    ``wait_random_exponential``'s exponential ceiling); sums (``a + b``) and
    chains are followed. A strategy tenacity does not ship is called once.

    Args:
        policy: The retry policy.
        attempt: Attempts made so far, starting at 1.
    """
    state = policy.call_state(attempt, RuntimeError("checking the retry schedule"))
    return max(0.0, _upper(policy.backoff, state))


def retry_schedule(policy: RetryPolicy) -> float:
    """Return the longest time ``policy``'s retries can wait in all, in seconds:
    the sum of :func:`max_backoff` over its ``max_retries`` retries."""
    return sum(max_backoff(policy, attempt) for attempt in range(1, policy.max_retries + 1))


def _upper(wait: Any, state: tenacity.RetryCallState) -> float:
    # Imported here: only a schedule check needs it (see mqtasks/retry.py).
    import tenacity

    n = state.attempt_number
    if isinstance(wait, tenacity.wait_random):
        return float(wait.wait_random_max)
    if isinstance(wait, tenacity.wait_random_exponential):
        return float(tenacity.wait_exponential.__call__(wait, state))
    if isinstance(wait, tenacity.wait_exponential_jitter):
        try:
            high = wait.multiplier * wait.exp_base ** (n - 1) + wait.jitter
        except OverflowError:
            high = wait.max
        return float(max(max(0, wait.min), min(high, wait.max)))
    if isinstance(wait, tenacity.wait_combine):
        return sum(_upper(w, state) for w in wait.wait_funcs)
    if isinstance(wait, tenacity.wait_chain):
        return _upper(wait.strategies[min(max(n, 1), len(wait.strategies)) - 1], state)
    return float(wait(state))


def _visibility_problems(visibility: object, shutdown_timeout: float, scheme: str) -> list[str]:
    """Return what is wrong with a kombu Redis ``visibility_timeout`` (nothing: an empty list).

    kombu's Redis transport hands a message to another worker once it has
    been unacknowledged for ``visibility_timeout`` seconds, whether or not its
    worker is alive and still running the task: a task that runs longer runs
    twice at once. Tasks declare no run time yet, so the longest time the app
    says a task may still run is ``shutdown_timeout``, the grace a stopping
    worker gives running tasks (retry waits, the other thing a worker could
    hold a message for, are refused on this transport altogether).

    Args:
        visibility: The ``visibility_timeout`` transport option, as given.
        shutdown_timeout: Seconds a stopping worker lets running tasks finish.
        scheme: The transport's URL scheme, for the message.
    """
    seconds = _seconds(visibility)
    if seconds is None:
        return [
            f"transport_options visibility_timeout must be a positive number of seconds, not "
            f"{visibility!r}: {scheme}:// hands an unacknowledged message to another worker "
            f"after that long. Set it above your longest task (kombu's default is "
            f"{KOMBU_VISIBILITY_TIMEOUT:g} s)."
        ]
    if seconds <= shutdown_timeout:
        return [
            f"transport_options visibility_timeout is {seconds:g} s, but shutdown_timeout is "
            f"{shutdown_timeout:g} s: a task still running when its worker is told to stop may "
            f"run that long, while {scheme}:// hands its message to another worker once it "
            "has been unacknowledged for visibility_timeout, so the task would run twice at "
            "once. Set visibility_timeout above your longest task and above shutdown_timeout "
            f"(kombu's default is {KOMBU_VISIBILITY_TIMEOUT:g} s), or lower shutdown_timeout."
        ]
    return []


def _seconds(value: object) -> float | None:
    """``value`` as positive finite seconds, or None if it is not that."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    seconds = float(value)
    return seconds if math.isfinite(seconds) and seconds > 0 else None


def check_prefetch(concurrency: int, prefetch: int) -> None:
    """Refuse a prefetch window smaller than the worker's thread pool.

    Raises:
        ConfigurationError: ``prefetch`` is below ``concurrency``.
    """
    if prefetch < concurrency:
        raise ConfigurationError(
            f"prefetch ({prefetch}) is below concurrency ({concurrency}): "
            f"{concurrency - prefetch} worker threads would always be idle. "
            "Raise prefetch or lower concurrency."
        )


def check_app(
    app: App,
    queues: Sequence[str] | None = None,
    *,
    concurrency: int | None = None,
    prefetch: int | None = None,
    shutdown_timeout: float | None = None,
) -> None:
    """Check that a worker of ``app`` on ``queues`` can do what its config promises.

    Refused, each with the queue, task and numbers concerned:

    * ``prefetch`` below ``concurrency`` (threads that could never get work);
    * a queue whose ``message_ttl`` is shorter than the total retry schedule of
      a task it carries: the TTL says work older than it is worthless, yet the
      task's later retries would run well after that (the broker holds retry
      delays outside the work queue, so it would not stop them);
    * a queue option the broker cannot honour (``max_length`` on ``redis://``,
      ``delivery_limit`` on ``redis+kombu://`` ...);
    * on ``redis+kombu://``, a task whose retries wait: kombu's Redis transport
      cannot hold a message for a delay (it would have to stay unacknowledged
      in a worker, and come back as a duplicate after ``visibility_timeout``),
      so mqtasks refuses delays there, and each retry would be handed back at
      once instead, in a loop. ``redis://`` holds delays in a sorted set in
      Redis and has no visibility timeout;
    * on ``redis+kombu://``, a ``visibility_timeout`` that is not a positive
      number, or not above the longest time the app says a task may still
      run: ``shutdown_timeout``, the grace a stopping worker gives running
      tasks;
    * a task whose retries wait, on a queue the broker cannot hold a delay on
      (an SQS FIFO queue; :meth:`~mqtasks.transport.base.Transport.delay_refused`),
      unless it is an ordered task whose retries wait in the queue (its broker
      keeps the key's order itself), for up to SQS's 12 hours;
    * a task's ``soft_time_limit`` above its ``time_limit``, or a ``time_limit``
      above the time the broker lets a message stay unacknowledged
      (:func:`time_limit_problems`);
    * result options that are not booleans, and the ``Results`` middleware on
      an app without a result backend (:func:`result_problems`);
    * event subscribers (``@app.on``) on a transport that cannot route events
      (``redis+kombu://``): their queues would never get an event;
    * a batch task whose ``batch_size`` the prefetch cannot hold, or that is
      also ordered, broadcast or has a hard time limit (:func:`batch_problems`).

    Args:
        app: The app.
        queues: The queues a worker would consume; all task queues by default.
        concurrency: Worker threads; the app's setting by default.
        prefetch: Unacknowledged messages held; the app's setting by default.
        shutdown_timeout: Seconds a stopping worker lets running tasks finish;
            the app's setting by default.

    Raises:
        ConfigurationError: Every problem found, one per line. A broker URL
            that names no transport skips the broker's checks here.
    """
    settings = app.settings
    concurrency = concurrency or settings.concurrency
    prefetch = prefetch or settings.effective_prefetch
    names = list(queues or app.task_queues())
    problems: list[str] = []
    try:
        check_prefetch(concurrency, prefetch)
    except ConfigurationError as exc:
        problems.append(str(exc))
    try:
        transport = app.transport
    except ConfigurationError:
        # A URL naming no transport: the worker reports it when it connects
        # (exit code 1, like an unreachable broker); App.check() raises it.
        transport = None
    for name in names:
        if transport is None:
            break
        try:
            transport.queue_arguments(broker_spec(app.queue(name)))
        except ConfigurationError as exc:
            problems.append(str(exc))
    for task in sorted(app.tasks.values(), key=lambda t: t.name):
        ttl = app.queue(task.queue).message_ttl
        if task.queue not in names or ttl is None or not task.retry_policy.max_retries:
            continue
        schedule = retry_schedule(task.retry_policy)
        if schedule > ttl:
            problems.append(
                f"Queue {task.queue!r}, task {task.name!r}: message_ttl is {ttl:g} s, but the "
                f"task's {task.retry_policy.max_retries} retries can wait up to {schedule:g} s "
                "in all, so its last retries would run work older than the queue's TTL allows. "
                "Raise message_ttl, or shorten the schedule (max_retries, retry_backoff)."
            )
    if transport is not None and transport.capabilities.visibility_timeout:
        # Checked here, not in the transport: a worker reports every problem at once.
        option = settings.transport_options.get("visibility_timeout", KOMBU_VISIBILITY_TIMEOUT)
        held = settings.shutdown_timeout if shutdown_timeout is None else shutdown_timeout
        problems.extend(_visibility_problems(option, held, transport.schemes[0]))
        seconds = _seconds(option)
        visibility = f"{seconds:g} s" if seconds is not None else repr(option)
        for task in sorted(app.tasks.values(), key=lambda t: t.name):
            policy = task.retry_policy
            if task.queue not in names or not policy.max_retries:
                continue
            longest = max(max_backoff(policy, a) for a in range(1, policy.max_retries + 1))
            if longest > 0:
                problems.append(
                    f"Queue {task.queue!r}, task {task.name!r}: its retries wait up to "
                    f"{longest:g} s, but {transport.schemes[0]}:// cannot hold a message for a "
                    "delay (kombu would keep it unacknowledged in a worker and deliver it again "
                    f"after visibility_timeout, {visibility}), so each retry would be handed "
                    "back at once, in a loop. Use redis://, which holds delays in Redis and has "
                    "no visibility timeout, or give the task max_retries=0 or retry_backoff=0."
                )
    if transport is not None and not transport.capabilities.delays:
        for task in sorted(app.tasks.values(), key=lambda t: t.name):
            flow = task.flow
            waits = [
                option
                for option, used in (
                    ("rate_limit", flow.rate_limit is not None),
                    ("concurrency_limit", flow.concurrency_limit is not None),
                    ("circuit", flow.circuit is not None),
                )
                if used
            ]
            if task.queue in names and waits:
                problems.append(
                    f"Queue {task.queue!r}, task {task.name!r}: {', '.join(waits)} makes a "
                    "task that must wait go back to the broker held for a delay, which "
                    f"{transport.schemes[0]}:// cannot hold: it would be handed back at once, "
                    "in a loop. Use redis://, which holds delays in Redis, or amqp://."
                )
    if transport is not None and transport.capabilities.delays:
        problems.extend(_queue_delay_problems(app, transport, names))
    problems.extend(result_problems(app))
    problems.extend(batch_problems(app, names, prefetch))
    if transport is not None:
        problems.extend(time_limit_problems(app, names, transport.schemes[0]))
    if transport is not None and not transport.capabilities.exchanges:
        subscribed = [s for s in app.subscriptions if s.queue in names]
        if subscribed:
            listed = ", ".join(f"{s.pattern!r} on {s.queue!r}" for s in subscribed)
            problems.append(
                f"{transport.schemes[0]}:// cannot route events, but this worker's queues "
                f"have subscribers ({listed}) that would never get one. Use amqp://, "
                "redis:// or memory://, or leave these queues to a worker on one of them."
            )
    if problems:
        raise ConfigurationError("\n".join(problems))


def _queue_delay_problems(app: App, transport: Transport, names: Sequence[str]) -> list[str]:
    """Tasks whose retries wait, on a queue the broker cannot hold a delay on (an SQS
    FIFO queue): each retry would be dead-lettered ``retry_unsupported``."""
    problems = []
    for task in sorted(app.tasks.values(), key=lambda t: t.name):
        policy = task.retry_policy
        if task.queue not in names or not policy.max_retries:
            continue
        # The queue first: the schedule is worked out (tenacity imported) only if it matters.
        reason = transport.delay_refused(task.queue)
        if reason is None:
            continue
        longest = max(max_backoff(policy, a) for a in range(1, policy.max_retries + 1))
        if task.ordering is not None and transport.native_ordering_refused(task.queue) is None:
            # Not delayed by the broker: the message waits in its queue, first of its key.
            if longest > SQS_MAX_INVISIBLE:
                problems.append(
                    f"Queue {task.queue!r}, task {task.name!r}: its retries wait up to "
                    f"{longest:g} s, but a message waits in place for at most "
                    f"{SQS_MAX_INVISIBLE} s (SQS's longest visibility timeout). Give "
                    "the task a shorter retry_backoff."
                )
            continue
        if longest > 0:
            problems.append(
                f"Queue {task.queue!r}, task {task.name!r}: its retries wait up to "
                f"{longest:g} s, but {reason}, so each retry would be dead-lettered "
                "(retry_unsupported). Give the task retry_backoff=0 or max_retries=0, or "
                "send it to a queue that can hold a delay."
            )
    return problems


#: Seconds SQS keeps a received message invisible at most, renewals included.
SQS_MAX_INVISIBLE = 43200


def time_limit_problems(app: App, queues: Sequence[str], scheme: str) -> list[str]:
    """Return what is wrong with the time limits of the tasks on ``queues``.

    A soft limit above the hard one (the task would be stopped before it is
    warned); a hard limit above the time the broker lets a message stay
    unacknowledged: kombu's Redis ``visibility_timeout`` (``redis+kombu://``
    hands the message to another worker while the task still runs) or
    RabbitMQ's ``consumer_timeout`` (the broker closes the channel, and the
    message is delivered again). RabbitMQ's value is not read from the broker:
    its default (``RABBITMQ_CONSUMER_TIMEOUT``, 30 minutes) is assumed unless the
    ``consumer_timeout`` transport option says what the broker was set to.

    Args:
        app: The app.
        queues: The queues a worker consumes.
        scheme: The transport's URL scheme.
    """
    options = app.settings.transport_options
    held: tuple[str, object, str] | None = None
    if app.transport.capabilities.visibility_timeout:
        held = (
            "visibility_timeout",
            options.get("visibility_timeout", KOMBU_VISIBILITY_TIMEOUT),
            f"{scheme}:// hands a message unacknowledged for that long to another worker, "
            "so the task would run twice at once. Raise the visibility_timeout transport "
            "option above the time limit, or lower time_limit",
        )
    elif scheme.startswith("amqp"):
        held = (
            "consumer_timeout",
            options.get("consumer_timeout", RABBITMQ_CONSUMER_TIMEOUT),
            "RabbitMQ closes the channel of a consumer that holds a message for that long, "
            "and every message the worker holds is delivered again. Lower time_limit, or "
            "raise consumer_timeout on the broker (rabbitmq.conf, or the queue's "
            "x-consumer-timeout argument) and say so with the consumer_timeout transport "
            f"option (the broker's value is not read; {RABBITMQ_CONSUMER_TIMEOUT:g} s, "
            "RabbitMQ's default, is assumed)",
        )
    elif scheme == "sqs":
        # The worker renews a held message's visibility timeout while its task
        # runs, but SQS caps the renewals at 12 hours from the message's receipt.
        held = (
            "12-hour cap on a message's invisibility",
            SQS_MAX_INVISIBLE,
            "SQS hands a message to another worker 12 hours after it was received, even "
            "while its worker renews the visibility timeout, so the task would run twice "
            "at once. Lower time_limit or split the task",
        )
    problems = []
    for task in sorted(app.tasks.values(), key=lambda t: t.name):
        if task.queue not in queues:
            continue
        soft, hard = task.soft_time_limit, task.time_limit
        if soft is not None and hard is not None and soft > hard:
            problems.append(
                f"Task {task.name!r}: soft_time_limit ({soft:g} s) is above time_limit "
                f"({hard:g} s): it would be stopped before it is warned. Set the soft "
                "limit below the hard one."
            )
        seconds = _seconds(held[1]) if held is not None else None
        if held is not None and hard is not None and seconds is not None and hard > seconds:
            name, _, consequence = held
            problems.append(
                f"Queue {task.queue!r}, task {task.name!r}: time_limit is {hard:g} s, above "
                f"the broker's {name} ({seconds:g} s): {consequence}."
            )
    return problems


def result_problems(app: App) -> list[str]:
    """Return what keeps results from working as configured: ``ignore_result`` or
    ``track_started`` that is not a bool, a backend URL that names no backend (or
    options it refuses), or a :class:`~mqtasks.middleware.results.Results` in
    ``app.middleware`` of an app without a result backend. Nothing is connected to."""
    problems = []
    for task in sorted(app.tasks.values(), key=lambda t: t.name):
        for option in ("ignore_result", "track_started"):
            value = task.options.get(option, False)
            if not isinstance(value, bool):
                problems.append(
                    f"Task {task.name!r}: {option} must be True or False, not {value!r}."
                )
    if app.has_backend:
        try:
            app.backend  # noqa: B018 - resolving the URL checks its scheme and options
        except ConfigurationError as exc:
            problems.append(str(exc))
    elif any(isinstance(mw, Results) for mw in app.middleware):
        problems.append(
            "Results is in app.middleware, but the app has no result backend: "
            "App(..., backend='redis://...') or MQTASKS_BACKEND_URL."
        )
    return problems


def unenforced_limits(app: App, queues: Sequence[str]) -> list[str]:
    """Return warnings for delivery limits the broker cannot count on these queues.

    A limit set on a queue itself is refused when the queue is declared; the
    app-wide default (:attr:`~mqtasks.config.Settings.delivery_limit`) is on
    for every queue, so a broker without delivery counts (``redis+kombu://``)
    only warns, once per worker, that crash loops stay uncapped there.

    Args:
        app: The app whose settings give the default.
        queues: The queues a worker consumes.
    """
    transport = app.transport
    if transport.capabilities.delivery_count:
        return []
    limited = [q for q in queues if app.delivery_limit(q)]
    if not limited:
        return []
    return [
        f"{transport.schemes[0]}:// does not count deliveries, so the delivery_limit "
        f"({app.settings.delivery_limit}) is not enforced on {limited}: a task that kills "
        "its worker is redelivered without end. Use redis:// or amqp://, or set "
        "delivery_limit=0 (MQTASKS_DELIVERY_LIMIT=0) to say so."
    ]


def batch_problems(app: App, queues: Sequence[str], prefetch: int) -> list[str]:
    """Return what a worker on ``queues`` with ``prefetch`` cannot do for the batch tasks there.

    A batch's messages stay unacknowledged while it is collected, so the
    prefetch window must hold ``batch_size`` of them. A batch task cannot be
    ordered (``ordering_key``) or broadcast, has no ``concurrency_limit`` below its
    ``batch_size`` (each message of a running batch holds a slot), and no hard ``time_limit``
    (a thread running the function on many messages cannot be stopped for
    one of them; ``soft_time_limit`` applies to the whole batch).
    """
    problems: list[str] = []
    for task in sorted(app.tasks.values(), key=lambda t: t.name):
        size = task.flow.batch_size
        if size is None or task.queue not in queues:
            continue
        where = f"Queue {task.queue!r}, batch task {task.name!r}"
        if prefetch < size:
            problems.append(
                f"{where}: batch_size is {size}, but the worker's prefetch is {prefetch}: a "
                "batch is held unacknowledged while it is collected, so it could never fill. "
                f"Set prefetch to at least {size} (--prefetch, MQTASKS_PREFETCH or "
                "Worker(prefetch=...)), or lower batch_size."
            )
        for option, used in (
            ("ordering_key", task.ordering is not None),
            ("broadcast", task.broadcast),
        ):
            if used:
                problems.append(
                    f"{where}: batch_size cannot be combined with {option}: a batch runs "
                    "items from many messages at once. Drop one of the two options."
                )
        slots = task.flow.concurrency_limit
        if slots is not None and slots < size:
            problems.append(
                f"{where}: concurrency_limit ({slots}) is below batch_size ({size}): each "
                "message of a running batch holds a slot, so no batch could run whole. Raise "
                "concurrency_limit to at least batch_size, or lower batch_size."
            )
        if task.time_limit is not None:
            problems.append(
                f"{where}: a hard time_limit ({task.time_limit:g} s, the task's or the app's) "
                "cannot stop a thread running a whole batch for one of its messages. Use "
                "soft_time_limit (raised in the batch function: every item fails and is "
                "retried), or set no time_limit on the batch task."
            )
    return problems


def check_backend(app: App) -> None:
    """Configuration mistakes are caught at start-up: the result backend must answer.

    Raises:
        BackendError: It cannot be reached; the message says what to do.
    """
    try:
        app.backend.check()
    except BackendError as exc:
        url = mask_url(app.settings.backend_url or "")
        raise BackendError(
            f"The result backend {url} cannot be reached: {exc}. The worker stores "
            "task results there: start it, or fix the backend URL (MQTASKS_BACKEND_URL)."
        ) from exc


def broker_warnings(app: App, queues: Sequence[str]) -> list[str]:
    """What a worker warns of at start: broker settings and limits it cannot enforce."""
    try:
        return app.transport.check_broker() + unenforced_limits(app, queues)
    except Exception as exc:  # a check must never stop a worker
        return [f"broker settings could not be checked: {type(exc).__name__}"]
