"""Sphinx configuration for the mqtasks documentation.

Build (warnings are errors, every cross-reference must resolve)::

    python -m sphinx -W -n -b html docs docs/_build/html

The ``doctest`` blocks in the guide run with ``-b doctest`` instead of ``-b html``.
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
import sys
from pathlib import Path
from typing import Any

# Document the tree these docs sit in, even if another copy is installed.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mqtasks  # noqa: E402

project = "mqtasks"
author = "the mqtasks authors"
copyright = "the mqtasks authors"
release = mqtasks.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.intersphinx",
    "sphinx.ext.viewcode",
    "sphinx.ext.doctest",
    "myst_parser",  # protocol.md
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "_snippets"]

# -- autodoc and napoleon ---------------------------------------------------------

autodoc_member_order = "bysource"
# Base classes are shown where they say something (the exceptions and transport
# pages ask for them), not as "Bases: object" on every class.
autodoc_default_options = {"members": True}
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
autoclass_content = "class"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

# -- intersphinx -------------------------------------------------------------------
#
# Empty on purpose: the machines this project builds on (developers' and CI)
# reach package registries only, so the Python and kombu inventories cannot be
# fetched, and a failed fetch is a warning, which -W turns into an error. With
# network access, this is the mapping to use (and the stdlib and kombu entries
# of nitpick_ignore_regex below can then go):
#
#     intersphinx_mapping = {
#         "python": ("https://docs.python.org/3", None),
#         "kombu": ("https://docs.celeryq.dev/projects/kombu/en/stable/", None),
#     }
intersphinx_mapping: dict[str, tuple[str, str | None]] = {}

# -- nitpicky mode -----------------------------------------------------------------

nitpicky = True

# Without intersphinx, references to the standard library and to third-party
# packages have no target. Each pattern covers one package that mqtasks'
# signatures mention; mqtasks' own names are never ignored.
nitpick_ignore_regex = [
    # Standard library: collections.abc.Mapping, datetime.timedelta, typing.ParamSpec
    # (Sphinx also renders ``*args: P.args`` as a reference to "typing.~P").
    (r"py:(class|obj)", r"(collections\.abc|contextlib|datetime|typing)\..+"),
    # kombu objects the transports wrap or subclass (Connection, Queue, Message, ...).
    (r"py:(class|obj)", r"kombu\..+"),
    # py-amqp, under kombu's RabbitMQ transport: the exceptions amqp:// raises.
    (r"py:(class|exc|obj)", r"amqp\..+"),
    # redis-py clients the redis:// transport returns (redis.Redis).
    (r"py:(class|obj)", r"redis\..+"),
    # psycopg connections and pool, which the postgresql:// result backend holds.
    (r"py:(class|obj)", r"psycopg(_pool)?\..+"),
    # tenacity's call state, which retry backoff strategies receive.
    (r"py:(class|obj)", r"tenacity\..+"),
    # The fakeredis server that mqtasks.testing.fake_redis_app takes.
    (r"py:class", r"fakeredis\..+"),
    # The observability libraries the middleware use (structlog, statsd, OpenTelemetry).
    (r"py:(class|obj|mod|func)", r"(structlog|statsd|opentelemetry)(\..+)?"),
    (r"py:class", r"threading\.(local|Thread|Event)"),
    # click's usage errors, which command helpers raise.
    (r"py:(class|exc)", r"click\..+"),
    # The standard library's SQLite connections and paths the sqlite:// transport holds.
    (r"py:(class|mod)", r"(sqlite3|pathlib)(\..+)?"),
    # What the worker's threads and event loop hold (a context, a task, a queue).
    (r"py:class", r"(contextvars|_asyncio|asyncio|_queue|queue)\..+"),
    # prometheus_client's registry and metric classes (mqtasks.middleware.prometheus).
    (r"py:(class|obj)", r"prometheus_client\..+"),
]

# -- HTML --------------------------------------------------------------------------

html_theme = "alabaster"
html_title = f"mqtasks {release}"
html_theme_options = {"description": "A Celery-style task queue on kombu"}


# -- local hooks -------------------------------------------------------------------


def _bind_type_checking_names() -> None:
    """Bind each module's ``if TYPE_CHECKING:`` imports, in this process only.

    Modules import some names only for annotations, to keep imports pointing
    down the layers (STYLE.md section 2). autodoc cannot evaluate annotations
    that use them and would print bare, unlinkable names such as ``App``.
    """
    for info in pkgutil.walk_packages(mqtasks.__path__, "mqtasks."):
        module = importlib.import_module(info.name)
        package = info.name if info.ispkg else info.name.rpartition(".")[0]
        tree = ast.parse(Path(module.__file__ or "").read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if not (isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING"):
                continue
            for stmt in node.body:
                if not isinstance(stmt, ast.ImportFrom):
                    continue
                source = importlib.import_module(
                    "." * stmt.level + (stmt.module or ""), package if stmt.level else None
                )
                for alias in stmt.names:
                    name = alias.asname or alias.name
                    if not hasattr(module, name):
                        setattr(module, name, getattr(source, alias.name))


_bind_type_checking_names()

# Packages whose __all__ re-exports names defined in submodules. ``mqtasks.App``
# is documented once, as ``mqtasks.app.App``; _alias_reexports registers the
# package spelling as an alias of it, so ``mqtasks.App`` and ``mqtasks.app.App``
# link to the same description and a short ``App`` is not ambiguous.
_REEXPORTING_PACKAGES = ("mqtasks", "mqtasks.transport", "mqtasks.middleware")
# Names a module imports from the module that documents them.
_EXTRA_ALIASES = {
    "mqtasks.app.P": "mqtasks.task.P",
    "mqtasks.app.R": "mqtasks.task.R",
    "mqtasks.task.Confirmation": "mqtasks.handle.Confirmation",
    "mqtasks.task.TaskHandle": "mqtasks.handle.TaskHandle",
}


def _alias_reexports(app: Any, env: Any) -> None:
    objects = env.get_domain("py").objects
    aliases = dict(_EXTRA_ALIASES)
    for package in _REEXPORTING_PACKAGES:
        module = importlib.import_module(package)
        for name in module.__all__:
            obj = getattr(module, name)
            modname = getattr(obj, "__module__", None)
            qualname = getattr(obj, "__qualname__", None)
            if isinstance(modname, str) and isinstance(qualname, str):
                aliases[f"{package}.{name}"] = f"{modname}.{qualname}"
    for alias, canonical in aliases.items():
        entry = objects.get(canonical)
        existing = objects.get(alias)
        if alias != canonical and entry is not None and (existing is None or existing.aliased):
            objects[alias] = entry._replace(aliased=True)


# mqtasks documents attributes, constants and properties in prose ("#: Exit code:
# stopped cleanly."), their types being in annotations (STYLE.md section 8).
# napoleon reads a first line "words: more words" in such a docstring as
# "type: description" and would make "Exit code" a type to link. These two
# hooks, run before and after napoleon's, keep those docstrings as written.
_PROSE_KINDS = frozenset({"attribute", "data", "property"})
_prose: dict[str, list[str]] = {}


def _remember_prose(app: Any, what: str, name: str, obj: Any, options: Any, lines: list[str]) -> None:
    if what in _PROSE_KINDS:
        _prose[name] = list(lines)


def _restore_prose(app: Any, what: str, name: str, obj: Any, options: Any, lines: list[str]) -> None:
    original = _prose.pop(name, None)
    if original is not None:
        lines[:] = original


def _factory_defaults(
    app: Any, what: str, name: str, obj: Any, options: Any, signature: str | None, annotation: str | None
) -> tuple[str, str | None] | None:
    """Show a dataclass default_factory as ``...``.

    Its default renders as ``<factory>``, which is not Python: Sphinx then cannot
    parse the signature, splits it on every comma and breaks ``tuple[Any, ...]``.
    """
    if signature and "<factory>" in signature:
        return signature.replace("<factory>", "..."), annotation
    return None


def setup(app: Any) -> None:
    app.connect("autodoc-process-docstring", _remember_prose, priority=100)
    app.connect("autodoc-process-docstring", _restore_prose, priority=900)
    app.connect("autodoc-process-signature", _factory_defaults)
    app.connect("env-updated", _alias_reexports)
