"""JSON encoding of task calls, with the limits the worker enforces before decoding.

Only ``application/json`` is ever decoded. Pickle, YAML, msgpack and compressed
bodies are refused by content type before any byte is interpreted, so a hostile
message can at worst be dead-lettered, never executed. Bodies nested deeper than
:data:`MAX_JSON_DEPTH` are refused by :func:`json_depth_exceeds` before a JSON
decoder recurses into them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from ._json import json_depth_exceeds
from .exceptions import DecodeError, EncodeError

__all__ = [
    "BODY_KEYS",
    "CONTENT_ENCODING",
    "CONTENT_TYPE",
    "MAX_INT_DIGITS",
    "MAX_JSON_DEPTH",
    "decode_body",
    "decode_call",
    "encode_body",
    "json_depth_exceeds",
]

#: The only content type mqtasks publishes and accepts.
CONTENT_TYPE = "application/json"
#: The only content encoding mqtasks publishes and accepts.
CONTENT_ENCODING = "utf-8"

#: Deepest nesting of arrays and objects in a body, the body's own two levels included.
MAX_JSON_DEPTH = 64
#: Most digits of an integer in a body.
MAX_INT_DIGITS = 1000
#: The members a body may have: the call's arguments and, for a workflow step,
#: what continues the workflow once it has run (see ``docs/protocol.md``).
BODY_KEYS = frozenset({"args", "kwargs", "workflow"})


def _bounded_int(text: str) -> int:
    # Python's own limit (sys.get_int_max_str_digits) can be switched off by
    # the application; int() of a huge literal is quadratic, so bound it here.
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"integer of more than {MAX_INT_DIGITS} digits")
    return int(text)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)
_DECODER = json.JSONDecoder(parse_int=_bounded_int, parse_constant=_no_constant)


def encode_body(
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    max_size: int,
    names: Sequence[str] | None = None,
    task: str = "",
    workflow: Mapping[str, Any] | None = None,
) -> bytes:
    """Encode a call's arguments into a JSON body.

    Args:
        args: Positional arguments.
        kwargs: Keyword arguments.
        max_size: Largest body allowed, in bytes.
        names: Parameter names of the positional arguments, for error messages.
        task: Task name, for error messages.
        workflow: What continues the workflow this call is a step of (a JSON
            object, the body's ``workflow`` member); None for a plain call.

    Raises:
        EncodeError: An argument JSON cannot carry (named in the message), or a
            body larger than ``max_size``.
    """
    call: dict[str, Any] = {"args": args, "kwargs": kwargs}
    if workflow is not None:
        call["workflow"] = workflow
    try:
        body = _ENCODER.encode(call).encode()
    except (TypeError, ValueError) as exc:
        if workflow is not None:
            try:
                _ENCODER.encode(workflow)
            except (TypeError, ValueError) as inner:
                raise EncodeError(
                    f"The workflow of task {task!r} cannot be sent as JSON: {inner}. "
                    "Pass JSON types in every signature's arguments."
                ) from exc
        raise _explain(args, kwargs, names or [], task, exc) from exc
    if len(body) > max_size:
        raise EncodeError(
            f"Arguments of task {task!r} encode to {len(body)} bytes, over the "
            f"{max_size}-byte limit (max_message_size). Send an id or a URL instead of the data.",
        )
    if json_depth_exceeds(body, MAX_JSON_DEPTH):
        raise EncodeError(
            f"Arguments of task {task!r} are nested more than {MAX_JSON_DEPTH - 2} levels "
            "deep; workers refuse such bodies. Flatten the data.",
        )
    return body


def _explain(
    args: tuple[Any, ...], kwargs: dict[str, Any], names: Sequence[str], task: str, exc: Exception
) -> EncodeError:
    """Find the first argument JSON cannot carry and name it."""
    labelled = [(names[i] if i < len(names) else f"#{i}", v) for i, v in enumerate(args)]
    labelled += list(kwargs.items())
    for label, value in labelled:
        try:
            _ENCODER.encode(value)
        except (TypeError, ValueError) as inner:
            return EncodeError(
                f"Argument {label!r} of task {task!r} cannot be sent as JSON "
                f"({type(value).__name__}: {inner}). Pass JSON types: str, int, float, bool, "
                "None, list, dict with str keys.",
                argument=label,
            )
    return EncodeError(f"Arguments of task {task!r} cannot be sent as JSON: {exc}")


def decode_body(
    body: bytes, *, content_type: str | None, content_encoding: str | None, max_size: int
) -> tuple[list[Any], dict[str, Any]]:
    """Decode a JSON body into ``(args, kwargs)``, refusing anything else.

    See :func:`decode_call`, which also returns the body's ``workflow``.

    Raises:
        DecodeError: With reason ``too_large``, ``content_type`` or ``decode_error``.
    """
    args, kwargs, _ = decode_call(
        body, content_type=content_type, content_encoding=content_encoding, max_size=max_size
    )
    return args, kwargs


def decode_call(
    body: bytes, *, content_type: str | None, content_encoding: str | None, max_size: int
) -> tuple[list[Any], dict[str, Any], dict[str, Any] | None]:
    """Decode a JSON body into ``(args, kwargs, workflow)``, refusing anything else.

    ``workflow`` is None when the body has no ``workflow`` member. A body with
    members other than ``args``, ``kwargs`` and ``workflow`` is refused: a
    member this worker does not understand may carry work it would silently drop.

    Args:
        body: The raw body, as received.
        content_type: The message's content type.
        content_encoding: The message's content encoding.
        max_size: Largest body accepted, in bytes; checked before decoding.

    Raises:
        DecodeError: With reason ``too_large``, ``content_type`` or ``decode_error``.
    """
    if len(body) > max_size:
        raise DecodeError("too_large", f"body of {len(body)} bytes exceeds {max_size}")
    if content_type != CONTENT_TYPE:
        raise DecodeError("content_type", f"content type {content_type!r} is not {CONTENT_TYPE!r}")
    if content_encoding not in (CONTENT_ENCODING, "utf8", None):
        raise DecodeError("content_type", f"content encoding {content_encoding!r} is not utf-8")
    if json_depth_exceeds(body, MAX_JSON_DEPTH):
        raise DecodeError("decode_error", f"body nests deeper than {MAX_JSON_DEPTH} levels")
    try:
        # Depth is checked above and integers by _bounded_int; RecursionError
        # stays caught in case a program runs with a very low recursion limit.
        data = _DECODER.decode(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise DecodeError("decode_error", f"body is not valid JSON: {type(exc).__name__}") from None
    if not isinstance(data, dict):
        raise DecodeError("decode_error", "body is not a JSON object")
    unknown = data.keys() - BODY_KEYS
    if unknown:
        names = sorted(str(k)[:64] for k in unknown)[:5]
        raise DecodeError(
            "decode_error", f"body has member(s) {names} besides 'args', 'kwargs' and 'workflow'"
        )
    args = data.get("args", [])
    kwargs = data.get("kwargs", {})
    if not isinstance(args, list) or not isinstance(kwargs, dict):
        raise DecodeError("decode_error", "body needs 'args' (array) and 'kwargs' (object)")
    workflow = data.get("workflow")
    if "workflow" in data and not isinstance(workflow, dict):
        raise DecodeError("decode_error", "body member 'workflow' is not a JSON object")
    return args, kwargs, workflow
