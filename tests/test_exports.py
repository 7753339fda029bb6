"""The public API: everything in __all__ exists, is documented, and nothing else leaks."""

from __future__ import annotations

import mqtasks
import mqtasks.testing


def test_all_is_sorted_and_complete() -> None:
    assert mqtasks.__all__ == sorted(mqtasks.__all__)
    for name in mqtasks.__all__:
        assert hasattr(mqtasks, name), name


def test_public_names_have_docstrings() -> None:
    for name in mqtasks.__all__:
        obj = getattr(mqtasks, name)
        if name != "__version__":
            assert obj.__doc__, name


def test_version_is_a_string() -> None:
    assert isinstance(mqtasks.__version__, str)


def test_testing_helpers_are_exported() -> None:
    assert set(mqtasks.testing.__all__) == {
        "FAKE_REDIS_URL",
        "drain",
        "fake_redis_app",
        "memory_app",
        "reset",
        "running_worker",
    }


def test_observability_middleware_is_exported() -> None:
    import mqtasks.middleware

    for name in ("OpenTelemetryTracing", "StatsdMetrics", "StructlogContext"):
        assert getattr(mqtasks, name) is getattr(mqtasks.middleware, name)
        assert name in mqtasks.__all__


def test_publishing_names_are_documented() -> None:
    """The block is reached through ``app.publishing()``; its module documents its names."""
    import mqtasks.publishing

    for name in mqtasks.publishing.__all__:
        assert hasattr(mqtasks.publishing, name), name
    for name in ("Publishing", "LoopBatcher", "publish_encoded", "settle", "current_block"):
        assert getattr(mqtasks.publishing, name).__doc__, name
    assert mqtasks.App.publishing.__doc__ and mqtasks.Task.adelay.__doc__
