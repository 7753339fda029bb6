"""The table of the ``postgresql://`` broker and its statements, named by their role.

One table holds the messages of every queue (dead-letter queues included:
``<queue>.dlq`` is a queue name like any other). :class:`~mqtasks.transport.postgres.PostgresTransport`
formats each statement with the identifier of its table, ``{t}``, named from
its ``table_prefix``; ``%(lease)s`` is the lease in seconds.
"""

from __future__ import annotations

__all__ = ["COLUMNS", "CONSUMERS", "INDEXES", "SQL", "TABLE"]

#: The message table. ``run_at``: when the message becomes ready (a delay holds
#: it until then). ``locked_until``/``locked_by``: the lease of the consumer that
#: holds it (NULL: nobody). ``deliveries``: fetches that did not end in a
#: requeue, the one in progress included.
TABLE = """CREATE TABLE IF NOT EXISTS {t} (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    queue text NOT NULL,
    priority smallint NOT NULL DEFAULT 0,
    run_at timestamptz NOT NULL DEFAULT now(),
    enqueued_at timestamptz NOT NULL DEFAULT now(),
    locked_until timestamptz,
    locked_by text,
    deliveries integer NOT NULL DEFAULT 0,
    redelivered boolean NOT NULL DEFAULT false,
    message_id text,
    headers jsonb NOT NULL,
    content_type text,
    content_encoding text,
    body bytea NOT NULL)"""

#: The consumers of each queue, for ``mqtasks status``: a consumer renews its rows
#: as it renews its leases, and they count while ``seen_until`` is ahead.
CONSUMERS = """CREATE TABLE IF NOT EXISTS {c} (
    owner text NOT NULL,
    queue text NOT NULL,
    seen_until timestamptz NOT NULL,
    PRIMARY KEY (queue, owner))"""

#: Index name suffix -> its columns: the fetch order of each queue, and its
#: messages by due time (the earliest held one).
INDEXES = {"fetch": "(queue, priority DESC, run_at, id)", "due": "(queue, run_at)"}

#: Columns a delivery or a stored message is built from, in this order.
COLUMNS = (
    "id, queue, priority, deliveries, redelivered, message_id, headers, "
    "content_type, content_encoding, body, run_at"
)

#: The condition of a row a consumer may take: due, and held by nobody (or by a lease run out).
_AVAILABLE = "run_at <= now() AND (locked_until IS NULL OR locked_until <= now())"

#: Every statement by role; ``{t}`` is the table, ``{channel}`` the NOTIFY channel literal.
SQL = {
    "insert": """INSERT INTO {t}
            (queue, priority, run_at, message_id, headers, content_type, content_encoding, body)
        VALUES (%(queue)s, %(priority)s, now() + make_interval(secs => %(delay)s),
            %(message_id)s, %(headers)s, %(content_type)s, %(content_encoding)s, %(body)s)""",
    "notify": "SELECT pg_notify({channel}, %s)",
    # The rows are chosen and leased in one statement; SKIP LOCKED passes over the
    # rows another consumer is leasing at this moment, so consumers never wait on
    # each other nor take the same row. One index-ordered scan per queue (an
    # equality on queue, not ANY(), which would sort every row of the queues).
    "fetch": f"""WITH picked AS (
            SELECT c.id FROM unnest(%(queues)s::text[]) AS q(name)
            CROSS JOIN LATERAL (
                SELECT id, priority, run_at FROM {{t}}
                WHERE queue = q.name AND {_AVAILABLE}
                ORDER BY priority DESC, run_at, id
                LIMIT %(n)s
                FOR UPDATE SKIP LOCKED) AS c
            ORDER BY c.priority DESC, c.run_at, c.id
            LIMIT %(n)s)
        UPDATE {{t}} AS m SET locked_until = now() + make_interval(secs => %(lease)s),
            locked_by = %(owner)s, deliveries = m.deliveries + 1
        FROM picked WHERE m.id = picked.id
        RETURNING {", ".join("m." + c.strip() for c in COLUMNS.split(","))}""",
    "next_due": """SELECT extract(epoch FROM min(d.run_at) - now())
        FROM unnest(%(queues)s::text[]) AS q(name)
        CROSS JOIN LATERAL (
            SELECT run_at FROM {t} WHERE queue = q.name AND run_at > now()
            ORDER BY run_at LIMIT 1) AS d""",
    "renew": """UPDATE {t} SET locked_until = now() + make_interval(secs => %(lease)s)
        WHERE id = ANY(%(ids)s) AND locked_by = %(owner)s RETURNING id""",
    "ack": """DELETE FROM {t} AS m USING unnest(%(ids)s::bigint[], %(counts)s::int[]) AS s(id, n)
        WHERE m.id = s.id AND m.deliveries = s.n AND m.locked_by = %(owner)s""",
    # A requeue hands back a message never started: that delivery does not count.
    "requeue": """UPDATE {t} AS m SET locked_until = NULL, locked_by = NULL,
            deliveries = greatest(m.deliveries - 1, 0), redelivered = true
        FROM unnest(%(ids)s::bigint[], %(counts)s::int[]) AS s(id, n)
        WHERE m.id = s.id AND m.deliveries = s.n AND m.locked_by = %(owner)s""",
    # A consumer that closes with messages held hands them back; they count as delivered.
    "release": """UPDATE {t} SET locked_until = NULL, locked_by = NULL, redelivered = true
        WHERE id = ANY(%(ids)s) AND locked_by = %(owner)s""",
    "beat": """INSERT INTO {c} (owner, queue, seen_until)
        SELECT %(owner)s, q, now() + make_interval(secs => %(lease)s)
        FROM unnest(%(queues)s::text[]) AS q
        ON CONFLICT (queue, owner) DO UPDATE SET seen_until = EXCLUDED.seen_until""",
    # Also the rows of queues no longer consumed, and those of consumers gone (killed).
    "unbeat": """DELETE FROM {c} WHERE (owner = %(owner)s AND queue <> ALL(%(queues)s))
        OR seen_until < now()""",
    "consumers": """SELECT queue, count(*) FROM {c}
        WHERE queue = ANY(%(queues)s) AND seen_until > now() GROUP BY queue""",
    "count_ready": f"""SELECT queue, count(*) FROM {{t}}
        WHERE queue = ANY(%(queues)s) AND {_AVAILABLE} GROUP BY queue""",
    "stats": """SELECT queue,
            count(*) FILTER (WHERE run_at <= now()
                AND (locked_until IS NULL OR locked_until <= now())),
            count(*) FILTER (WHERE locked_until > now()),
            count(*) FILTER (WHERE run_at > now() AND (locked_until IS NULL
                OR locked_until <= now())),
            extract(epoch FROM min(enqueued_at) FILTER (WHERE run_at <= now()
                AND (locked_until IS NULL OR locked_until <= now())))
        FROM {t} WHERE queue = ANY(%(queues)s) GROUP BY queue""",
    "browse": f"""SELECT {COLUMNS} FROM {{t}} WHERE queue = %(queue)s
        ORDER BY run_at, id LIMIT %(limit)s""",
    # Tooling takes a queue's messages one by one, oldest first (keyset on run_at, id),
    # leasing each so that no consumer takes it meanwhile.
    "take_next": f"""UPDATE {{t}} AS m SET locked_until = now() + make_interval(secs => %(lease)s),
            locked_by = %(owner)s
        WHERE m.id = (
            SELECT id FROM {{t}}
            WHERE queue = %(queue)s AND {_AVAILABLE} AND (run_at, id) > (%(after_at)s::timestamptz, %(after)s)
            ORDER BY run_at, id LIMIT 1 FOR UPDATE SKIP LOCKED)
        RETURNING {", ".join("m." + c.strip() for c in COLUMNS.split(","))}""",
    "remove": "DELETE FROM {t} WHERE id = %(id)s AND locked_by = %(owner)s",
    "untake": """UPDATE {t} SET locked_until = NULL, locked_by = NULL
        WHERE locked_by = %(owner)s AND id = ANY(%(ids)s)""",
    "purge": """DELETE FROM {t} WHERE queue = ANY(%(queues)s)
        AND (run_at > now() OR locked_until IS NULL OR locked_until <= now())""",
    "delete": "DELETE FROM {t} WHERE queue = ANY(%(queues)s)",
    "delete_consumers": "DELETE FROM {c} WHERE queue = ANY(%(queues)s)",
}
