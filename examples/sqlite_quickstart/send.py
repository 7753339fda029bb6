"""Send the quickstart's tasks: ``python -m examples.sqlite_quickstart.send``.

Each ``delay()`` returns once the row is committed to the file; a worker
process on the same file runs it.
"""

from __future__ import annotations

from .app import app, charge_card, make_thumbnail


def send() -> list[str]:
    """Send three thumbnails now, one in a second, and a payment that fails; return the ids."""
    ids = [make_thumbnail.delay(photo).id for photo in (1, 2, 3)]
    ids.append(make_thumbnail.apply_async((4,), countdown=1.0).id)  # held by the file for 1 s
    ids.append(charge_card.delay(7).id)
    return ids


if __name__ == "__main__":
    for task_id in send():
        print("sent", task_id)
    app.close()
