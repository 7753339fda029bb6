"""``mqtasks backend migrate -A app``: creates the PostgreSQL tables, says when there is nothing to do."""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from mqtasks.cli.backend import backend as backend_group

from .conftest import drop_tables, postgres_url, table_prefix

SECRET = "s3cret-Pa55word"
_modules = itertools.count()


@pytest.fixture
def migrate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[str | None], Result]:
    """Run ``backend migrate -A <module>`` on an app whose backend is the URL given (or none)."""
    monkeypatch.syspath_prepend(str(tmp_path))

    def run(backend_url: str | None) -> Result:
        module = f"backend_app_{uuid.uuid4().hex[:8]}_{next(_modules)}"
        backend = "" if backend_url is None else f", backend={backend_url!r}"
        (tmp_path / f"{module}.py").write_text(
            f"from mqtasks import App\napp = App('t', broker='memory://'{backend})\n"
        )
        return CliRunner().invoke(backend_group, ["migrate", "-A", module])

    return run


@pytest.mark.integration
def test_migrate_creates_the_postgresql_tables_and_says_so(
    migrate: Callable[[str | None], Result],
) -> None:
    prefix = table_prefix()
    try:
        first = migrate(postgres_url(prefix))
        second = migrate(postgres_url(prefix))
    finally:
        drop_tables(prefix)

    assert first.exit_code == 0, first.output
    assert f"created table {prefix}results" in first.output
    assert second.exit_code == 0, second.output
    assert f"table {prefix}results exists" in second.output
    assert "created" not in second.output


@pytest.mark.parametrize("url", ["memory://", "redis://127.0.0.1:1/0"])
def test_migrate_has_nothing_to_do_on_other_backends(
    migrate: Callable[[str | None], Result], url: str
) -> None:
    result = migrate(url)

    assert result.exit_code == 0, result.output
    assert "nothing to migrate" in result.output


def test_migrate_without_a_backend_is_a_usage_error(
    migrate: Callable[[str | None], Result],
) -> None:
    result = migrate(None)

    assert result.exit_code == 2
    assert "has no result backend" in result.output


def test_migrate_of_an_unreachable_backend_fails_without_the_password(
    migrate: Callable[[str | None], Result],
) -> None:
    result = migrate(f"postgresql://postgres:{SECRET}@127.0.0.1:1/test")

    assert result.exit_code == 1
    assert "127.0.0.1:1" in result.output
    assert SECRET not in result.output
