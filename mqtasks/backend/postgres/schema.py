"""The PostgreSQL backend's tables and statements, named by their role.

:class:`~mqtasks.backend.postgres.PostgresBackend` formats each statement with
the identifiers of its own tables (``{results}``, ``{kv}``...), named from its
``table_prefix``.
"""

from __future__ import annotations

__all__ = ["EXPIRING", "SQL", "TABLES"]

#: Each table's ``CREATE TABLE IF NOT EXISTS``; ``{t}`` is the table's name.
TABLES = {
    "results": """CREATE TABLE IF NOT EXISTS {t} (
        task_id text PRIMARY KEY, record bytea NOT NULL, final boolean NOT NULL,
        expires_at timestamptz NOT NULL)""",
    "kv": """CREATE TABLE IF NOT EXISTS {t} (
        key text PRIMARY KEY, value bytea, num bigint, expires_at timestamptz NOT NULL)""",
    "members": """CREATE TABLE IF NOT EXISTS {t} (
        key text NOT NULL, member text NOT NULL, PRIMARY KEY (key, member))""",
    "leases": """CREATE TABLE IF NOT EXISTS {t} (
        name text PRIMARY KEY, owner text NOT NULL, token bigint NOT NULL,
        expires_at timestamptz NOT NULL)""",
    "revocations": """CREATE TABLE IF NOT EXISTS {t} (
        task_id text PRIMARY KEY, terminate boolean NOT NULL, expires_at timestamptz NOT NULL)""",
    "buckets": """CREATE TABLE IF NOT EXISTS {t} (
        key text PRIMARY KEY, tokens double precision NOT NULL, ts double precision NOT NULL,
        queued double precision NOT NULL, expires_at timestamptz NOT NULL)""",
    "slots": """CREATE TABLE IF NOT EXISTS {t} (
        key text NOT NULL, owner text NOT NULL, expires_at timestamptz NOT NULL,
        PRIMARY KEY (key, owner))""",
}
#: Tables swept for expired rows get an index on ``expires_at``.
EXPIRING = ("results", "kv", "leases", "revocations", "buckets", "slots")

#: The SQL expression of an expiry ``ttl`` seconds from now (the server's clock).
EXPIRES = "now() + make_interval(secs => %(ttl)s)"

#: Every statement by role; ``{results}``, ``{kv}``... stand for the table names.
SQL = {
    "store": f"""INSERT INTO {{results}} AS r (task_id, record, final, expires_at)
        VALUES (%(id)s, %(record)s, %(final)s, {EXPIRES})
        ON CONFLICT (task_id) DO UPDATE SET record = EXCLUDED.record, final = EXCLUDED.final,
            expires_at = EXCLUDED.expires_at
        WHERE NOT r.final OR r.expires_at <= now()
        RETURNING 1""",
    "notify": "SELECT pg_notify(%s, %s)",
    "get_result": """SELECT record, final FROM {results}
        WHERE task_id = %s AND expires_at > now()""",
    "get_results": """SELECT task_id, record, final FROM {results}
        WHERE task_id = ANY(%s) AND expires_at > now()""",
    "forget": "DELETE FROM {results} WHERE task_id = %s",
    "set_if_absent": f"""INSERT INTO {{kv}} AS t (key, value, expires_at)
        VALUES (%(key)s, %(value)s, {EXPIRES})
        ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value, num = NULL,
            expires_at = EXCLUDED.expires_at
        WHERE t.expires_at <= now()
        RETURNING 1""",
    "get": "SELECT value, num FROM {kv} WHERE key = %s AND expires_at > now()",
    "put": f"""INSERT INTO {{kv}} AS t (key, value, expires_at)
        VALUES (%(key)s, %(value)s, {EXPIRES})
        ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value, num = NULL,
            expires_at = EXCLUDED.expires_at""",
    "delete_key": "DELETE FROM {kv} WHERE key = %s",
    "delete_members": "DELETE FROM {members} WHERE key = %s",
    "incr": f"""INSERT INTO {{kv}} AS t (key, num, expires_at)
        VALUES (%(key)s, %(amount)s, {EXPIRES})
        ON CONFLICT (key) DO UPDATE SET
            num = CASE WHEN t.expires_at <= now() THEN EXCLUDED.num
                       ELSE coalesce(t.num, 0) + EXCLUDED.num END,
            value = NULL,
            expires_at = CASE WHEN t.expires_at <= now() THEN EXCLUDED.expires_at
                              ELSE t.expires_at END
        RETURNING num""",
    # The set's row in kv is locked by this upsert until the transaction ends, so
    # the adds to one set run one after the other and each sees the size it made.
    "lock_set": f"""INSERT INTO {{kv}} AS t (key, num, expires_at)
        VALUES (%(key)s, 0, {EXPIRES})
        ON CONFLICT (key) DO UPDATE SET
            num = CASE WHEN t.expires_at <= now() THEN 0 ELSE coalesce(t.num, 0) END,
            value = NULL,
            expires_at = CASE WHEN t.expires_at <= now() THEN EXCLUDED.expires_at
                              ELSE t.expires_at END
        RETURNING num""",
    "add_member": """INSERT INTO {members} (key, member) VALUES (%s, %s)
        ON CONFLICT DO NOTHING""",
    "count_member": "UPDATE {kv} SET num = num + 1 WHERE key = %s RETURNING num",
    "members": """SELECT m.member FROM {members} m JOIN {kv} k ON k.key = m.key
        WHERE m.key = %s AND k.expires_at > now()""",
    "acquire": f"""INSERT INTO {{leases}} AS l (name, owner, token, expires_at)
        VALUES (%(name)s, %(owner)s, nextval({{seq}}), {EXPIRES})
        ON CONFLICT (name) DO UPDATE SET
            owner = EXCLUDED.owner,
            token = CASE WHEN l.owner = EXCLUDED.owner AND l.expires_at > now() THEN l.token
                         ELSE EXCLUDED.token END,
            expires_at = EXCLUDED.expires_at
        WHERE l.owner = EXCLUDED.owner OR l.expires_at <= now()
        RETURNING token""",
    "renew": f"""UPDATE {{leases}} SET expires_at = {EXPIRES}
        WHERE name = %(name)s AND owner = %(owner)s AND expires_at > now()
        RETURNING 1""",
    "release": "DELETE FROM {leases} WHERE name = %s AND owner = %s",
    "holder": "SELECT owner, token FROM {leases} WHERE name = %s AND expires_at > now()",
    # Writes fenced by a lease (mqtasks.backend.postgres.fenced). The lease's row, live
    # with the token, is locked FOR SHARE first: an acquire (an upsert of that row)
    # waits for the commit, and one committed before is seen (the row is read anew).
    "claim_fenced": f"""WITH lease AS MATERIALIZED (
            SELECT 1 FROM {{leases}}
            WHERE name = %(lease)s AND token = %(token)s AND expires_at > now()
            FOR SHARE
        ), claims AS (
            INSERT INTO {{kv}} AS t (key, value, expires_at)
            SELECT k, %(value)s, {EXPIRES} FROM unnest(%(keys)s::text[]) AS k
            WHERE EXISTS (SELECT 1 FROM lease)
            ON CONFLICT (key) DO UPDATE SET
                value = CASE WHEN t.expires_at <= now() THEN EXCLUDED.value ELSE t.value END,
                num = CASE WHEN t.expires_at <= now() THEN NULL ELSE t.num END,
                expires_at = CASE WHEN t.expires_at <= now() THEN EXCLUDED.expires_at
                                  ELSE t.expires_at END
            RETURNING t.key, t.value, t.num
        )
        SELECT c.key, c.value, c.num FROM lease LEFT JOIN claims c ON true""",
    "put_fenced": f"""WITH lease AS MATERIALIZED (
            SELECT 1 FROM {{leases}}
            WHERE name = %(lease)s AND token = %(token)s AND expires_at > now()
            FOR SHARE
        )
        INSERT INTO {{kv}} AS t (key, value, expires_at)
        SELECT %(key)s, %(value)s, {EXPIRES} WHERE EXISTS (SELECT 1 FROM lease)
        ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value, num = NULL,
            expires_at = EXCLUDED.expires_at
        RETURNING 1""",
    "revoke": f"""INSERT INTO {{revocations}} AS r (task_id, terminate, expires_at)
        VALUES (%(id)s, %(terminate)s, {EXPIRES})
        ON CONFLICT (task_id) DO UPDATE SET terminate = EXCLUDED.terminate,
            expires_at = EXCLUDED.expires_at""",
    "unrevoke": "DELETE FROM {revocations} WHERE task_id = %s",
    "revocation": """SELECT terminate, extract(epoch FROM expires_at - now())
        FROM {revocations} WHERE task_id = %s AND expires_at > now()""",
    "revocations": """SELECT task_id, terminate, extract(epoch FROM expires_at - now())
        FROM {revocations} WHERE starts_with(task_id, %s) AND expires_at > now()""",
    "sweep_revocations": """DELETE FROM {revocations} WHERE task_id IN (
        SELECT task_id FROM {revocations} WHERE expires_at <= now()
        LIMIT %(limit)s FOR UPDATE SKIP LOCKED)""",
    "sweep_results": """DELETE FROM {results} WHERE task_id IN (
        SELECT task_id FROM {results} WHERE expires_at <= now()
        LIMIT %(limit)s FOR UPDATE SKIP LOCKED)""",
    "sweep_kv": """WITH gone AS (
            DELETE FROM {kv} WHERE key IN (
                SELECT key FROM {kv} WHERE expires_at <= now()
                LIMIT %(limit)s FOR UPDATE SKIP LOCKED)
            RETURNING key)
        DELETE FROM {members} WHERE key IN (SELECT key FROM gone)""",
    "sweep_leases": """DELETE FROM {leases} WHERE name IN (
        SELECT name FROM {leases} WHERE expires_at <= now()
        LIMIT %(limit)s FOR UPDATE SKIP LOCKED)""",
    "sweep_buckets": """DELETE FROM {buckets} WHERE key IN (
        SELECT key FROM {buckets} WHERE expires_at <= now()
        LIMIT %(limit)s FOR UPDATE SKIP LOCKED)""",
    "sweep_slots": """DELETE FROM {slots} WHERE (key, owner) IN (
        SELECT key, owner FROM {slots} WHERE expires_at <= now()
        LIMIT %(limit)s FOR UPDATE SKIP LOCKED)""",
    # Flow control. The bucket's row is locked by this upsert (made, expired at
    # once, if absent) until the transaction ends; it returns the stored state,
    # whether it is live, and the clock read once the lock is held.
    "bucket_lock": """INSERT INTO {buckets} AS b (key, tokens, ts, queued, expires_at)
        VALUES (%(key)s, 0, 0, 0, '-infinity')
        ON CONFLICT (key) DO UPDATE SET key = b.key
        RETURNING b.tokens, b.ts, b.queued, b.expires_at > clock_timestamp(),
            extract(epoch FROM clock_timestamp())""",
    "bucket_write": """UPDATE {buckets} SET tokens = %(tokens)s, ts = %(ts)s, queued = %(queued)s,
            expires_at = to_timestamp(%(ts)s) + make_interval(secs => %(ttl)s)
        WHERE key = %(key)s""",
    "bucket_peek": """SELECT tokens, ts, extract(epoch FROM clock_timestamp()) FROM {buckets}
        WHERE key = %s AND expires_at > clock_timestamp()""",
    "slot_lock": "SELECT pg_advisory_xact_lock(hashtext(%s))",
    "slot_acquire": """WITH others AS (
            SELECT owner FROM {slots}
            WHERE key = %(key)s AND owner <> %(owner)s AND expires_at > clock_timestamp()
        ), taken AS (
            INSERT INTO {slots} (key, owner, expires_at)
            SELECT %(key)s, %(owner)s, clock_timestamp() + make_interval(secs => %(ttl)s)
            WHERE (SELECT count(*) FROM others) < %(limit)s
            ON CONFLICT (key, owner) DO UPDATE SET expires_at = EXCLUDED.expires_at
            RETURNING 1
        )
        SELECT (SELECT count(*) FROM taken), (SELECT count(*) FROM others)""",
    "slot_renew": """UPDATE {slots} SET expires_at = clock_timestamp() + make_interval(secs => %(ttl)s)
        WHERE key = %(key)s AND owner = ANY(%(owners)s) AND expires_at > clock_timestamp()""",
    "slot_release": "DELETE FROM {slots} WHERE key = %s AND owner = %s",
    "slots_held": """SELECT count(*) FROM {slots}
        WHERE key = %s AND expires_at > clock_timestamp()""",
}
