"""Workflow: the middleware that continues chains and chords when a step ends.

A workflow (:mod:`mqtasks.canvas`) travels in its messages: each carries, in
the body's ``workflow`` member, what comes after it (the rest of a chain, the
chord it is a member of, its errbacks). When a step's outcome is final,
:class:`Workflow` publishes what follows, from the outcome
:class:`~mqtasks.middleware.results.Results` stored, before the step's message
is acknowledged. Nothing polls: a chord's callback is published by the member
whose completion makes the set of finished members complete, counted in the
result backend (a set of ids, so a member that runs twice counts once).

A ``workflow`` member is a JSON object with any of:

- ``"chain"``: the signatures (:meth:`Signature.to_dict()
  <mqtasks.canvas.Signature.to_dict>` form, ids assigned) of the steps after this one;
- ``"group"``: the signatures (ids assigned) of the group the chain ends in,
  each sent with the value of the chain's last signature step;
- ``"chord"``: ``{"id", "size", "index", "callback"}`` for a chord member (the
  last step of a chain member carries it);
- ``"on_error"``: signatures to send as ``errback(task_id, error)`` if this step fails for good;
- ``"dedupe": true``: run at most one copy at a time, and none once an outcome
  is stored (chord callbacks, which a member may publish twice).

Beside this module: the backend keys of that state
(:mod:`~mqtasks.middleware.workflow_keys`), the checks of the ``workflow``
member (:mod:`~mqtasks.middleware.workflow_schema`), the publishing of a step
from its JSON form (:mod:`~mqtasks.middleware.workflow_steps`) and the run
leases of ``dedupe`` messages (:mod:`~mqtasks.middleware.workflow_leases`).
"""

from __future__ import annotations

import contextvars
import uuid
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import structlog

from ..exceptions import EncodeError, MQTasksError, SkipMessage
from ..result import DEAD_LETTERED, FAILED, SUCCEEDED, Outcome, decode_outcome, encode_outcome
from .base import Middleware, ensure
from .results import current_outcome
from .workflow_keys import (
    chord_done_key,
    chord_fired_key,
    chord_ids_key,
    chord_published_key,
    run_lease_name,
)
from .workflow_leases import RunLeases
from .workflow_schema import signature_error, workflow_error
from .workflow_steps import failure_record, member_values, publish_step

if TYPE_CHECKING:
    from ..app import App
    from ..message import Message
    from ..worker import Worker

__all__ = [
    "Workflow",
    "chord_done_key",
    "chord_fired_key",
    "chord_ids_key",
    "chord_published_key",
    "run_lease_name",
    "signature_error",
    "with_workflow",
]

logger = structlog.get_logger("mqtasks.workflow")

#: The id of the message whose before_process this middleware saw (one context per message).
_seen: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "mqtasks_workflow_seen", default=None
)

#: Namespace of the ids of errbacks, derived from the failed task's id so that a
#: step whose failure is handled twice sends the same errback message twice.
_ERRBACK_IDS = uuid.UUID("6f0c2b8e-3c1f-4e53-9a55-8f4f5d6b9e21")


class Workflow(Middleware):
    """Continues workflows: the next step of a chain, a chord's callback, errbacks.

    Workers install it (before :class:`~mqtasks.middleware.results.Results`,
    so that its ``after_process`` runs once the outcome is stored) when the
    app has a result backend. Every publish it makes is confirmed before the
    message that triggered it is acknowledged; if a publish or the backend
    fails, that message is deferred (published again, held by the broker) so
    that the continuation is retried, never lost.

    Args:
        lease_ttl: Seconds a ``dedupe`` message's run lease lasts; renewed
            every third of it while the task runs, so it lapses that long
            after a worker dies.
        defer_delay: Seconds a deferred message is held: a copy that finds
            another running, or a step whose continuation could not be sent.
    """

    def __init__(self, *, lease_ttl: float = 30.0, defer_delay: float = 1.0) -> None:
        if lease_ttl <= 0 or defer_delay <= 0:
            raise ValueError("lease_ttl and defer_delay must be positive seconds")
        self.lease_ttl = lease_ttl
        self.defer_delay = defer_delay
        self._leases = RunLeases(lease_ttl)

    def __repr__(self) -> str:
        return f"Workflow(lease_ttl={self.lease_ttl}, defer_delay={self.defer_delay})"

    # -- hooks ------------------------------------------------------------------------

    def before_process(self, worker: Worker, message: Message) -> None:
        """Skip a step that already succeeded (continuing its workflow), or a
        ``dedupe`` copy whose outcome is stored; hold the run lease of a ``dedupe`` one.

        Raises:
            SkipMessage: The message is not run (acknowledged, or deferred first).
        """
        workflow = message.workflow
        if not workflow:
            return
        _seen.set(message.id)
        try:
            if workflow.get("dedupe"):
                self._take_lease(worker, message)
            elif "chain" in workflow or "chord" in workflow or "group" in workflow:
                self._continue_stored(worker, message, workflow)
        except SkipMessage:
            raise
        except MQTasksError as exc:
            self._release(message.id)
            self._defer(worker, message, "workflow_backend_failed", exc)
            raise SkipMessage("deferred: the result backend failed") from exc

    def after_process(
        self,
        worker: Worker,
        message: Message,
        *,
        result: Any = None,
        exception: BaseException | None = None,
    ) -> None:
        """Continue the workflow once the step's outcome is final; release its run lease."""
        workflow = message.workflow
        if not workflow:
            return
        try:
            if isinstance(exception, SkipMessage):
                return
            outcome = current_outcome()
            if outcome is None:
                return  # retried, requeued or deferred: the step is not over
            try:
                self._continue(worker, message, workflow, outcome)
            except MQTasksError as exc:
                self._defer(worker, message, "workflow_continuation_failed", exc)
            except Exception as exc:
                # A bug, not an outage: handling the message again would fail
                # again. The dead letter keeps it; a replay continues the workflow.
                logger.exception("workflow.continuation_crashed", task_id=message.id)
                worker.dead_letter(message, "workflow_failed", f"{type(exc).__name__}: {exc}", exc)
        finally:
            self._release(message.id)

    def after_dead_letter(self, worker: Worker, message: Message | None, reason: str) -> None:
        """Fail the workflow of a step refused unrun (expired, unknown task, bad arguments).

        A step that ran and was dead-lettered is continued by :meth:`after_process`.
        """
        if message is None or not message.workflow or _seen.get() == message.id:
            return
        stored = None
        try:
            stored = worker.app.backend.get_result(message.id)
        except MQTasksError:
            pass
        if stored is not None and stored[1]:
            outcome = decode_outcome(stored[0])
        else:
            outcome = Outcome(DEAD_LETTERED, task=message.task, reason=reason)
        if outcome.state == SUCCEEDED:
            return
        try:
            self._continue(worker, message, message.workflow, outcome)
        except MQTasksError as exc:
            logger.error(
                "workflow.not_continued",
                task_id=message.id,
                task_name=message.task,
                reason=reason,
                error=str(exc),
                note="the step is in the dead-letter queue; replaying it continues the workflow",
            )

    # -- dedupe ---------------------------------------------------------------------------

    def _take_lease(self, worker: Worker, message: Message) -> None:
        backend = worker.app.backend
        if not self._leases.acquire(backend, message.id):
            self._defer(worker, message, "workflow_running_elsewhere")
            raise SkipMessage("another copy of this task is running")
        # Read after the lease is held: a copy that finished before released it
        # only once its outcome was stored.
        stored = backend.get_result(message.id)
        if stored is not None and stored[1]:
            self._release(message.id)
            logger.info("workflow.duplicate_skipped", task_id=message.id, task_name=message.task)
            raise SkipMessage("an outcome is stored for this task already")

    def _release(self, task_id: str) -> None:
        self._leases.release(task_id)

    def _continue_stored(
        self, worker: Worker, message: Message, workflow: Mapping[str, Any]
    ) -> None:
        """A step that succeeded before (redelivered, or deferred after it ran) is
        not run again: its stored value continues the workflow."""
        stored = worker.app.backend.get_result(message.id)
        if stored is None or not stored[1]:
            return
        outcome = decode_outcome(stored[0])
        if outcome.state != SUCCEEDED:
            return  # a replayed dead letter runs again
        logger.info("workflow.step_done_before", task_id=message.id, task_name=message.task)
        self._continue(worker, message, workflow, outcome)
        raise SkipMessage("this step succeeded before; its workflow is continued")

    def _continue(
        self, worker: Worker, message: Message, workflow: Mapping[str, Any], outcome: Outcome
    ) -> None:
        """Publish what follows ``message``'s final ``outcome``.

        Raises:
            MQTasksError: A publish or the backend failed (the caller defers the message).
        """
        problem = workflow_error(workflow)
        if problem is not None:
            logger.error(
                "workflow.invalid",
                task_id=message.id,
                task_name=message.task,
                detail=problem,
                note="the workflow is not continued",
            )
            return
        app = worker.app
        steps: list[dict[str, Any]] = list(workflow.get("chain") or [])
        members: list[dict[str, Any]] = list(workflow.get("group") or [])
        chord = workflow.get("chord")
        if outcome.state == SUCCEEDED:
            if steps:
                self._next_step(app, message, workflow, steps, outcome.value)
            elif members:
                self._fan_out(app, message, members, outcome.value)
            elif chord is not None:
                self._chord_member_done(app, message, chord)
            return
        error = {
            "type": outcome.error_type,
            "message": outcome.error_message,
            "reason": outcome.reason,
        }
        failed_id = outcome.failed_task_id or message.id
        if steps or members:
            self._fail_rest(app, message.id, steps + members, outcome, failed_id)
        if chord is not None:
            self._chord_member_failed(app, message.id, chord, outcome, failed_id, error)
        self._errbacks(app, message.id, failed_id, workflow.get("on_error") or [], error)

    def _next_step(
        self,
        app: App,
        message: Message,
        workflow: Mapping[str, Any],
        steps: list[dict[str, Any]],
        value: Any,
    ) -> None:
        step, rest = steps[0], steps[1:]
        args = list(step.get("args") or [])
        if not step.get("immutable"):
            args.insert(0, value)
        following: dict[str, Any] = {}
        if rest:
            following["chain"] = rest
        for key in ("chord", "group"):
            if workflow.get(key):
                following[key] = workflow[key]
        try:
            publish_step(app, step, args, following)
        except EncodeError as exc:
            # The value cannot travel with the step's arguments: the step can never
            # be sent. It fails, with what follows it, as if it had run and failed.
            self._unsendable(app, step, following, exc)
            return
        logger.info(
            "workflow.step_sent",
            task_id=message.id,
            next_task_id=step["id"],
            next_task_name=step["task"],
            steps_left=len(rest),
        )

    def _fan_out(
        self, app: App, message: Message, members: list[dict[str, Any]], value: Any
    ) -> None:
        """Send every member of the group a chain ends in, each with the chain's value."""
        for member in members:
            args = list(member.get("args") or [])
            if not member.get("immutable"):
                args.insert(0, value)
            try:
                publish_step(app, member, args, {})
            except EncodeError as exc:
                self._unsendable(app, member, {}, exc)
        logger.info("workflow.group_sent", task_id=message.id, members=len(members))

    def _unsendable(
        self,
        app: App,
        step: Mapping[str, Any],
        workflow: Mapping[str, Any],
        exc: EncodeError,
    ) -> None:
        """Fail a step that cannot be encoded: FAILED stored for it, its workflow failed."""
        s = app.settings
        step_id = step["id"]
        logger.error(
            "workflow.step_unsendable", task_id=step_id, task_name=step["task"], error=str(exc)
        )
        record = encode_outcome(
            FAILED,
            task=step["task"],
            exception=exc,
            reason="unsendable",
            max_size=s.max_message_size,
        )
        app.backend.store_result(step_id, record, final=True, expires=s.result_expires)
        outcome = decode_outcome(record)
        error = {
            "type": outcome.error_type,
            "message": outcome.error_message,
            "reason": "unsendable",
        }
        rest: list[dict[str, Any]] = [
            *(workflow.get("chain") or []),
            *(workflow.get("group") or []),
        ]
        if rest:
            self._fail_rest(app, step_id, rest, outcome, step_id)
        chord = workflow.get("chord")
        if chord is not None:
            self._chord_member_failed(app, step_id, chord, outcome, step_id, error)
        self._errbacks(app, step_id, step_id, step.get("on_error") or [], error)

    def _fail_rest(
        self,
        app: App,
        task_id: str,
        steps: list[dict[str, Any]],
        outcome: Outcome,
        failed_id: str,
    ) -> None:
        """Store FAILED for every step after the failed one: the chain's handle names it."""
        backend = app.backend
        s = app.settings
        for step in steps:
            record = failure_record(step["task"], outcome, failed_id, s.max_message_size)
            backend.store_result(step["id"], record, final=True, expires=s.result_expires)
        logger.info(
            "workflow.chain_failed",
            task_id=task_id,
            failed_task_id=failed_id,
            steps_not_run=len(steps),
        )

    def _errbacks(
        self,
        app: App,
        task_id: str,
        failed_id: str,
        errbacks: Sequence[Mapping[str, Any]],
        error: Mapping[str, Any],
    ) -> None:
        for i, errback in enumerate(errbacks):
            # The same id each time this failure is handled: a duplicate is detectable.
            errback_id = str(uuid.uuid5(_ERRBACK_IDS, f"{task_id}/{i}"))
            args = [failed_id, dict(error), *(errback.get("args") or [])]
            publish_step(app, {**errback, "id": errback_id}, args, {})
            logger.info(
                "workflow.errback_sent",
                task_id=task_id,
                failed_task_id=failed_id,
                errback_id=errback_id,
                errback_name=errback["task"],
            )

    # -- chords -----------------------------------------------------------------------

    def _chord_member_done(self, app: App, message: Message, chord: Mapping[str, Any]) -> None:
        backend = app.backend
        ttl = app.settings.result_expires
        cid, size = chord["id"], chord["size"]
        _, done = backend.add_member(chord_done_key(cid), message.id, ttl=ttl)
        if done < size:
            return
        claim = f"callback:{message.id}".encode()
        if not backend.set_if_absent(chord_fired_key(cid), claim, ttl):
            # Claimed before. By another member (or a failed one): it publishes,
            # and its message is not acknowledged before it has. By this member,
            # in an earlier run that may have died before its publish was
            # confirmed: unless the publish is known to be confirmed, send it
            # again with the same id (the callback's copies are deduplicated by id).
            if backend.get(chord_fired_key(cid)) != claim:
                return
            if backend.get(chord_published_key(cid)) is not None:
                return
        callback = chord["callback"]
        values = member_values(backend, cid, size)
        if values is None:
            self._chord_unreadable(app, message, chord)
            return
        args = list(callback.get("args") or [])
        if not callback.get("immutable"):
            args.insert(0, values)
        try:
            publish_step(app, callback, args, {"dedupe": True})
        except EncodeError as exc:
            self._unsendable(app, callback, {}, exc)
        backend.put(chord_published_key(cid), b"1", ttl)
        logger.info(
            "workflow.chord_completed",
            task_id=message.id,
            chord_id=cid,
            size=size,
            callback_name=callback["task"],
        )

    def _chord_member_failed(
        self,
        app: App,
        member_id: str,
        chord: Mapping[str, Any],
        outcome: Outcome,
        failed_id: str,
        error: Mapping[str, Any],
    ) -> None:
        """Fail the chord: FAILED stored for the callback, its errbacks sent once; it never runs."""
        backend = app.backend
        s = app.settings
        cid, callback = chord["id"], chord["callback"]
        claim = f"error:{member_id}".encode()
        if not backend.set_if_absent(chord_fired_key(cid), claim, s.result_expires):
            # Claimed by another member (failed, or completing the chord), which
            # handles it; or by this one in an earlier run: then finish its work.
            if backend.get(chord_fired_key(cid)) != claim:
                return
            if backend.get(chord_published_key(cid)) is not None:
                return
        record = failure_record(callback["task"], outcome, failed_id, s.max_message_size)
        backend.store_result(cid, record, final=True, expires=s.result_expires)
        logger.info("workflow.chord_failed", chord_id=cid, failed_task_id=failed_id)
        self._errbacks(app, cid, failed_id, callback.get("on_error") or [], error)
        backend.put(chord_published_key(cid), b"1", s.result_expires)

    def _chord_unreadable(self, app: App, message: Message, chord: Mapping[str, Any]) -> None:
        """The members' values are gone (expired, forgotten, ``ignore_result``): fail the chord."""
        backend = app.backend
        s = app.settings
        cid, callback = chord["id"], chord["callback"]
        claim = f"error:{message.id}".encode()
        backend.put(chord_fired_key(cid), claim, s.result_expires)
        outcome = Outcome(
            FAILED,
            task=callback["task"],
            reason="chord_results_missing",
            error_message="a member's value is not in the result backend",
        )
        record = failure_record(callback["task"], outcome, message.id, s.max_message_size)
        backend.store_result(cid, record, final=True, expires=s.result_expires)
        logger.error(
            "workflow.chord_results_missing",
            chord_id=cid,
            note="a member's value expired, was forgotten or not stored (ignore_result)",
        )
        error = {"type": None, "message": outcome.error_message, "reason": outcome.reason}
        self._errbacks(app, cid, message.id, callback.get("on_error") or [], error)
        backend.put(chord_published_key(cid), b"1", s.result_expires)

    # -- helpers -----------------------------------------------------------------------

    def _defer(
        self, worker: Worker, message: Message, reason: str, exc: BaseException | None = None
    ) -> None:
        if exc is not None:
            logger.error(
                "workflow.deferred",
                task_id=message.id,
                task_name=message.task,
                reason=reason,
                error=str(exc),
                delay=self.defer_delay,
                note="held by the broker, then handled again",
            )
        worker.defer(message, self.defer_delay, reason)


def with_workflow(middleware: Sequence[Middleware]) -> list[Middleware]:
    """Return ``middleware`` with :class:`Workflow` at the end, unless it has one already.

    A worker of an app with a result backend runs this stack, then
    :class:`~mqtasks.middleware.results.Results` and
    :class:`~mqtasks.middleware.retries.Retries`: so Workflow's
    ``after_process`` runs once the outcome is decided and stored.
    """
    return ensure(middleware, Workflow)
