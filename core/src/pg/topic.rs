//! Topics on Postgres: the topic log, subscription cursors, batches and held messages.
//!
//! - **Publish** inserts one row per message into `T_log` (the generation `T_log_gen` names),
//!   stamped with the publishing transaction's id (`xid`, from `pg_current_xact_id()`).
//! - **A subscription's cursor** is a range of commit snapshots `(lo, hi]` and a position
//!   `(xid, id)` inside it. The messages of a range are those visible in `hi` and not in
//!   `lo`: a set fixed once `hi` is taken, whatever commits later, so nothing is skipped
//!   when transactions commit out of id order. They are the rows whose `xid` was in flight
//!   at `lo` (`pg_snapshot_xip(lo)`, a few index probes) or is at least `pg_snapshot_xmax(lo)`
//!   (one index range): an open transaction anywhere in the database never widens the scan.
//! - **Receive** (`T_receive`, schema v8 in `topic_batches.rs`) locks the subscription row
//!   (never updating it), reads the cursor from the newest batch, takes back expired batches
//!   (once per [`EXPIRED_BATCH_CHECK`](crate::topic::EXPIRED_BATCH_CHECK)), hands out due held
//!   messages, then the next messages of the range and, while its limit is not reached, of a
//!   new range ending now; appends them as one batch row carrying the cursor after it.
//! - **Settle** (`T_settle`) acts on held messages by `(id, token)` and on batches by token:
//!   acking a whole batch marks its row done (a HOT update); anything else writes a held row
//!   per message. Rotation truncates a generation of batches once all are settled.
//!
//! See `docs/design/storage.md` for what each statement touches and what reclaims it.

use std::collections::{BTreeMap, BTreeSet};

use async_trait::async_trait;
use sqlx::{PgConnection, Row};
use uuid::Uuid;

use super::PgBackend;
use crate::cancel::Cancellation;
use crate::error::{Error, Result};
use crate::inspect::DeadLetter;
use crate::message::{Delivery, Lease, Message, MessageId};
use crate::topic::{
    Published, Receive, Settlement, Subscribed, SubscriptionInfo, Topics, Unsubscribe,
    validate_topic_message,
};

/// Schema version 6: the topic log (partitioned into generations like the outbox table),
/// subscriptions, batches and held messages, and the receive and settle functions.
pub(crate) const V6: &str = r#"
CREATE SEQUENCE {log_gen} AS bigint MINVALUE 0 START 0;
SELECT setval('{log_gen}', 0, true);
CREATE SEQUENCE {log_id} AS bigint;

CREATE TABLE {log} (
    slot           smallint    NOT NULL,
    id             bigint      NOT NULL DEFAULT nextval('{log_id}'),
    topic          text        NOT NULL,
    xid            xid8        NOT NULL DEFAULT pg_current_xact_id(),
    payload        bytea       NOT NULL,
    headers        jsonb,
    correlation_id uuid        NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now()
) PARTITION BY LIST (slot);

CREATE TABLE {log_p0} PARTITION OF {log} FOR VALUES IN (0);
CREATE TABLE {log_p1} PARTITION OF {log} FOR VALUES IN (1);
CREATE TABLE {log_p2} PARTITION OF {log} FOR VALUES IN (2);

ALTER SEQUENCE {log_id} OWNED BY {log}.id;

CREATE INDEX {log_idx} ON {log} (topic, xid, id);

CREATE TABLE {subs} (
    name       text        PRIMARY KEY,
    topic      text        NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    lo         pg_snapshot NOT NULL,
    hi         pg_snapshot NOT NULL,
    pos_xid    xid8        NOT NULL DEFAULT '0',
    pos_id     bigint      NOT NULL DEFAULT 0
);

CREATE TABLE {batches} (
    token      uuid        PRIMARY KEY,
    sub        text        NOT NULL REFERENCES {subs} (name) ON DELETE CASCADE,
    topic      text        NOT NULL,
    lo         pg_snapshot NOT NULL,
    ids        bigint[]    NOT NULL,
    xids       xid8[]      NOT NULL,
    settled    bigint[]    NOT NULL DEFAULT ARRAY[]::bigint[],
    holder     text,
    leased_at  timestamptz NOT NULL,
    ttl_ms     float8      NOT NULL,
    expires_at timestamptz NOT NULL
);

CREATE INDEX {batch_idx} ON {batches} (sub, expires_at);

CREATE TABLE {held} (
    id               bigint      NOT NULL,
    sub              text        NOT NULL REFERENCES {subs} (name) ON DELETE CASCADE,
    topic            text        NOT NULL,
    payload          bytea       NOT NULL,
    headers          jsonb,
    correlation_id   uuid        NOT NULL,
    created_at       timestamptz NOT NULL,
    attempts         integer     NOT NULL DEFAULT 0,
    deliveries       integer     NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz NOT NULL,
    first_attempt_at timestamptz,
    last_error       text,
    acquired_token   uuid,
    acquired_at      timestamptz,
    acquired_by      text,
    ttl_ms           float8,
    dead_at          timestamptz,
    reason           text,
    PRIMARY KEY (id, sub)
);

CREATE INDEX {held_idx} ON {held} (sub, next_attempt_at, id) WHERE dead_at IS NULL;

CREATE TABLE {keys} (
    topic      text        NOT NULL,
    key        text        NOT NULL,
    id         bigint      NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (topic, key)
);

CREATE INDEX {keys_idx} ON {keys} (created_at);

CREATE FUNCTION {receive_fn}(p_sub text, p_max integer, p_ttl_ms float8, p_token uuid,
                             p_holder text, p_max_deliveries integer, p_now timestamptz)
RETURNS TABLE (id bigint, topic text, payload bytea, headers jsonb, correlation_id uuid,
               created_at timestamptz, attempts integer, deliveries integer,
               first_attempt_at timestamptz, last_error text, acquired_at timestamptz)
LANGUAGE plpgsql SET enable_seqscan = off AS $postbox$
#variable_conflict use_column
DECLARE
    v_now     timestamptz := coalesce(p_now, now());
    v_until   timestamptz := coalesce(p_now, now()) + p_ttl_ms * interval '1 millisecond';
    v_left    integer := p_max;
    v_n       integer;
    v_topic   text;
    v_lo      pg_snapshot;
    v_hi      pg_snapshot;
    v_pos_xid xid8;
    v_pos_id  bigint;
BEGIN
    SELECT x.topic, x.lo, x.hi, x.pos_xid, x.pos_id
    INTO v_topic, v_lo, v_hi, v_pos_xid, v_pos_id
    FROM {subs} AS x WHERE x.name = p_sub FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'postbox: no subscription %', p_sub USING ERRCODE = 'P0002';
    END IF;

    -- Batches whose lease expired: their unsettled messages are held, delivered one by one.
    WITH gone AS (
        DELETE FROM {batches} AS b
        WHERE b.sub = p_sub AND b.expires_at < v_now
        RETURNING b.ids, b.xids, b.settled, b.leased_at
    ), back AS (
        SELECT u.id AS id, u.xid AS xid, g.leased_at AS leased_at
        FROM gone AS g, unnest(g.ids, g.xids) AS u(id, xid)
        WHERE NOT (u.id = ANY (g.settled))
    )
    INSERT INTO {held} (id, sub, topic, payload, headers, correlation_id, created_at,
                        deliveries, next_attempt_at, first_attempt_at)
    SELECT l.id, p_sub, l.topic, l.payload, l.headers, l.correlation_id, l.created_at,
           1, v_now, back.leased_at
    FROM back JOIN {log} AS l ON l.topic = v_topic AND l.xid = back.xid AND l.id = back.id
    ON CONFLICT DO NOTHING;

    IF p_max_deliveries IS NOT NULL THEN
        UPDATE {held} AS h
        SET dead_at        = v_now,
            reason         = 'max_deliveries exceeded: leased ' || h.deliveries
                             || ' times without an outcome',
            acquired_token = NULL,
            acquired_at    = NULL,
            acquired_by    = NULL
        WHERE h.sub = p_sub AND h.dead_at IS NULL AND h.next_attempt_at <= v_now
          AND h.deliveries >= p_max_deliveries;
    END IF;

    -- Held messages due (retried, released, taken back, or leased and expired).
    RETURN QUERY
    WITH due AS (
        SELECT h.id AS id, h.sub AS sub FROM {held} AS h
        WHERE h.sub = p_sub AND h.dead_at IS NULL AND h.next_attempt_at <= v_now
        ORDER BY h.next_attempt_at, h.id
        LIMIT v_left
        FOR UPDATE SKIP LOCKED
    )
    UPDATE {held} AS h
    SET acquired_token   = p_token,
        acquired_at      = v_now,
        acquired_by      = p_holder,
        ttl_ms           = p_ttl_ms,
        next_attempt_at  = v_until,
        deliveries       = h.deliveries + 1,
        first_attempt_at = coalesce(h.first_attempt_at, v_now)
    FROM due WHERE h.id = due.id AND h.sub = due.sub
    RETURNING h.id, h.topic, h.payload, h.headers, h.correlation_id, h.created_at,
              h.attempts, h.deliveries, h.first_attempt_at, h.last_error, v_now;
    GET DIAGNOSTICS v_n = ROW_COUNT;
    v_left := v_left - v_n;
    IF v_left <= 0 THEN
        RETURN;
    END IF;

    -- The next messages of the range; when it is exhausted, of a new one ending now.
    FOR v_round IN 1..2 LOOP
        RETURN QUERY
        WITH picked AS (
            SELECT f.id AS id, f.xid AS xid, f.topic AS topic, f.payload AS payload,
                   f.headers AS headers, f.correlation_id AS correlation_id,
                   f.created_at AS created_at
            FROM (
                (SELECT l.* FROM {log} AS l
                 WHERE l.topic = v_topic
                   AND l.xid = ANY (ARRAY(SELECT pg_snapshot_xip(v_lo)))
                   AND (l.xid, l.id) > (v_pos_xid, v_pos_id)
                   AND pg_visible_in_snapshot(l.xid, v_hi)
                 ORDER BY l.xid, l.id
                 LIMIT v_left)
                UNION ALL
                (SELECT l.* FROM {log} AS l
                 WHERE l.topic = v_topic
                   AND l.xid >= pg_snapshot_xmax(v_lo)
                   AND l.xid < pg_snapshot_xmax(v_hi)
                   AND (l.xid, l.id) > (v_pos_xid, v_pos_id)
                   AND pg_visible_in_snapshot(l.xid, v_hi)
                 ORDER BY l.xid, l.id
                 LIMIT v_left)
            ) AS f
            ORDER BY f.xid, f.id
            LIMIT v_left
        ), batch AS (
            INSERT INTO {batches} (token, sub, topic, lo, ids, xids, holder, leased_at, ttl_ms,
                                   expires_at)
            SELECT p_token, p_sub, v_topic, v_lo, array_agg(p.id ORDER BY p.xid, p.id),
                   array_agg(p.xid ORDER BY p.xid, p.id), p_holder, v_now, p_ttl_ms, v_until
            FROM picked AS p
            HAVING count(*) > 0
            RETURNING ids, xids
        ), moved AS (
            UPDATE {subs} AS x
            SET lo      = v_lo,
                hi      = v_hi,
                pos_xid = b.xids[cardinality(b.xids)],
                pos_id  = b.ids[cardinality(b.ids)]
            FROM batch AS b
            WHERE x.name = p_sub
        )
        SELECT p.id, p.topic, p.payload, p.headers, p.correlation_id, p.created_at,
               0, 1, v_now, NULL::text, v_now
        FROM picked AS p
        ORDER BY p.xid, p.id;
        GET DIAGNOSTICS v_n = ROW_COUNT;
        EXIT WHEN v_n > 0 OR v_round = 2;
        -- Exhausted: the next range runs from this one's end to now. Written only when it
        -- yields messages, so an idle poll changes no row.
        v_lo := v_hi;
        v_hi := pg_current_snapshot();
        v_pos_xid := '0';
        v_pos_id := 0;
    END LOOP;
    RETURN;
END
$postbox$;

CREATE FUNCTION {settle_fn}(p_kind text, p_ids bigint[], p_token uuid, p_delay_ms float8,
                            p_text text, p_now timestamptz)
RETURNS SETOF bigint
LANGUAGE plpgsql SET enable_seqscan = off AS $postbox$
DECLARE
    v_now  timestamptz := coalesce(p_now, now());
    v_n    integer;
    v_mine bigint[];
    v_rest bigint[];
    b      record;
BEGIN
    IF p_kind NOT IN ('ack', 'retry', 'bury', 'release', 'renew') THEN
        RAISE EXCEPTION 'postbox: unknown settlement %', p_kind;
    END IF;

    -- Messages of the batch leased under this token, not settled yet.
    v_rest := p_ids;
    SELECT x.sub, x.topic, x.ids, x.xids, x.settled, x.leased_at, x.ttl_ms INTO b
    FROM {batches} AS x WHERE x.token = p_token FOR UPDATE;
    IF FOUND THEN
        IF cardinality(b.settled) = 0 AND p_ids = b.ids THEN
            -- The whole batch, as received: no set arithmetic.
            v_mine := b.ids;
        ELSE
            v_mine := ARRAY(SELECT unnest(p_ids) INTERSECT SELECT unnest(b.ids)
                            EXCEPT SELECT unnest(b.settled));
        END IF;
        IF cardinality(v_mine) > 0 THEN
            v_rest := ARRAY(SELECT unnest(p_ids) EXCEPT SELECT unnest(v_mine));
            IF p_kind = 'renew' THEN
                UPDATE {batches} AS x
                SET expires_at = v_now + b.ttl_ms * interval '1 millisecond'
                WHERE x.token = p_token;
            ELSE
                IF p_kind <> 'ack' THEN
                    INSERT INTO {held} (id, sub, topic, payload, headers, correlation_id,
                                        created_at, attempts, deliveries, next_attempt_at,
                                        first_attempt_at, last_error, dead_at, reason)
                    SELECT l.id, b.sub, l.topic, l.payload, l.headers, l.correlation_id,
                           l.created_at,
                           CASE WHEN p_kind = 'release' THEN 0 ELSE 1 END,
                           CASE WHEN p_kind = 'release' THEN 0 ELSE 1 END,
                           CASE WHEN p_kind = 'retry'
                                THEN v_now + p_delay_ms * interval '1 millisecond'
                                ELSE v_now END,
                           b.leased_at,
                           CASE WHEN p_kind = 'retry' THEN p_text END,
                           CASE WHEN p_kind = 'bury' THEN v_now END,
                           CASE WHEN p_kind = 'bury' THEN p_text END
                    FROM unnest(b.ids, b.xids) AS u(id, xid)
                    JOIN {log} AS l ON l.topic = b.topic AND l.xid = u.xid AND l.id = u.id
                    WHERE u.id = ANY (v_mine);
                END IF;
                IF cardinality(b.settled) + cardinality(v_mine) >= cardinality(b.ids) THEN
                    DELETE FROM {batches} AS x WHERE x.token = p_token;
                ELSE
                    UPDATE {batches} AS x SET settled = x.settled || v_mine
                    WHERE x.token = p_token;
                END IF;
            END IF;
            RETURN QUERY SELECT unnest(v_mine);
        END IF;
    END IF;

    -- The rest: held messages leased under this token.
    IF cardinality(v_rest) = 0 THEN
        RETURN;
    END IF;
    IF p_kind = 'ack' THEN
        RETURN QUERY
        DELETE FROM {held} AS h
        WHERE h.id = ANY (v_rest) AND h.acquired_token = p_token
        RETURNING h.id;
    ELSIF p_kind = 'retry' THEN
        RETURN QUERY
        UPDATE {held} AS h
        SET attempts        = h.attempts + 1,
            next_attempt_at = v_now + p_delay_ms * interval '1 millisecond',
            last_error      = p_text,
            acquired_token  = NULL,
            acquired_at     = NULL,
            acquired_by     = NULL
        WHERE h.id = ANY (v_rest) AND h.acquired_token = p_token
        RETURNING h.id;
    ELSIF p_kind = 'bury' THEN
        RETURN QUERY
        UPDATE {held} AS h
        SET attempts       = h.attempts + 1,
            dead_at        = v_now,
            reason         = p_text,
            acquired_token = NULL,
            acquired_at    = NULL,
            acquired_by    = NULL
        WHERE h.id = ANY (v_rest) AND h.acquired_token = p_token
        RETURNING h.id;
    ELSIF p_kind = 'release' THEN
        RETURN QUERY
        UPDATE {held} AS h
        SET next_attempt_at = v_now,
            deliveries      = greatest(h.deliveries - 1, 0),
            acquired_token  = NULL,
            acquired_at     = NULL,
            acquired_by     = NULL
        WHERE h.id = ANY (v_rest) AND h.acquired_token = p_token
        RETURNING h.id;
    ELSIF p_kind = 'renew' THEN
        RETURN QUERY
        UPDATE {held} AS h
        SET next_attempt_at = v_now + h.ttl_ms * interval '1 millisecond'
        WHERE h.id = ANY (v_rest) AND h.acquired_token = p_token
        RETURNING h.id;
    END IF;
    RETURN;

END
$postbox$;
"#;

// $1 channel, $2 topics, $3 payloads, $4 headers, $5 correlation ids, $6 pinned now,
// $7 distinct topics to notify, $8 idempotency keys (NULL: none), $9 key retention in ms
//
// Ids are drawn first; a keyed message is written only if its key could be inserted, or
// replaced a key older than the retention (the conflict waits for a transaction that holds
// the key to end). Keys are taken in (topic, key) order, so two transactions publishing the
// same keys in different orders cannot deadlock; a key repeated within one call is taken by
// its first message.
pub(crate) const PUBLISH: &str = r#"
WITH m AS MATERIALIZED (
    SELECT u.topic, u.payload, u.headers, u.correlation_id, u.key, u.ord,
           nextval('{log_id}') AS id
    FROM unnest($2::text[], $3::bytea[], $4::jsonb[], $5::uuid[], $8::text[])
         WITH ORDINALITY AS u(topic, payload, headers, correlation_id, key, ord)
    ORDER BY u.ord
),
keyed AS (
    INSERT INTO {keys} AS k (topic, key, id, created_at)
    SELECT DISTINCT ON (m.topic, m.key) m.topic, m.key, m.id, coalesce($6::timestamptz, now())
    FROM m
    WHERE m.key IS NOT NULL
    ORDER BY m.topic, m.key, m.ord
    ON CONFLICT (topic, key) DO UPDATE
    SET id = EXCLUDED.id, created_at = EXCLUDED.created_at
    WHERE k.created_at <= EXCLUDED.created_at - $9::float8 * interval '1 millisecond'
    RETURNING id
),
ins AS (
    INSERT INTO {log} (slot, id, topic, payload, headers, correlation_id, created_at)
    SELECT (SELECT (last_value % {generations})::smallint FROM {log_gen}), m.id, m.topic,
           m.payload, m.headers, m.correlation_id, coalesce($6::timestamptz, now())
    FROM m
    WHERE m.key IS NULL OR m.id IN (SELECT id FROM keyed)
    ORDER BY m.ord
    RETURNING id
),
notified AS (
    SELECT count(*) AS n FROM unnest($7::text[]) AS q(name), pg_notify($1, q.name)
)
SELECT m.id, (m.key IS NULL OR m.id IN (SELECT id FROM keyed)) AS new
FROM m CROSS JOIN notified
ORDER BY m.ord"#;

// $1 topics, $2 keys: the ids the keys belong to (read after a conflict, in a new statement,
// so a key committed by another transaction meanwhile is visible).
pub(crate) const DUPLICATES: &str = r#"
SELECT k.topic, k.key, k.id
FROM {keys} AS k
JOIN unnest($1::text[], $2::text[]) AS d(topic, key) ON k.topic = d.topic AND k.key = d.key"#;

// $1 subscription, $2 topic, $3 pinned now
pub(crate) const SUBSCRIBE: &str = r#"
INSERT INTO {subs} (name, topic, created_at, lo, hi)
VALUES ($1, $2, coalesce($3::timestamptz, now()), pg_current_snapshot(), pg_current_snapshot())
ON CONFLICT (name) DO NOTHING
RETURNING topic"#;

// $1 subscription
pub(crate) const SUBSCRIPTION_TOPIC: &str = "SELECT topic FROM {subs} WHERE name = $1";

// $1 subscription
pub(crate) const LOCK_SUBSCRIPTION: &str = "SELECT 1 FROM {subs} WHERE name = $1 FOR UPDATE";

// $1 subscription
pub(crate) const UNSUBSCRIBE: &str = "DELETE FROM {subs} WHERE name = $1";

// $1 topic (NULL: every topic), $2 subscription (NULL: every subscription)
pub(crate) const SUBSCRIPTIONS: &str = r#"
SELECT s.name, s.topic, s.created_at,
       coalesce(u.n, 0) + coalesce(b.n, 0) + coalesce(h.n, 0) AS backlog,
       least(u.oldest, b.oldest, h.oldest) AS oldest,
       coalesce(h.dead, 0) AS dead
FROM {subs} AS s
CROSS JOIN LATERAL (
    (SELECT b.lo, b.hi, b.pos_xid, b.pos_id
     FROM {batches} AS b WHERE b.sub = s.name ORDER BY b.seq DESC LIMIT 1)
    UNION ALL
    (SELECT s.lo, s.hi, s.pos_xid, s.pos_id)
    LIMIT 1
) AS c
LEFT JOIN LATERAL (
    SELECT count(*) AS n, min(l.created_at) AS oldest
    FROM {log} AS l
    WHERE l.topic = s.topic
      AND (l.xid = ANY (ARRAY(SELECT pg_snapshot_xip(c.lo))) OR l.xid >= pg_snapshot_xmax(c.lo))
      AND NOT (pg_visible_in_snapshot(l.xid, c.hi) AND (l.xid, l.id) <= (c.pos_xid, c.pos_id))
) AS u ON true
LEFT JOIN LATERAL (
    SELECT count(*) AS n, min(l.created_at) AS oldest
    FROM {batches} AS x
    CROSS JOIN LATERAL unnest(x.ids, x.xids) AS m(id, xid)
    JOIN {log} AS l ON l.topic = x.topic AND l.xid = m.xid AND l.id = m.id
    WHERE x.sub = s.name AND NOT x.done AND NOT (m.id = ANY (x.settled))
) AS b ON true
LEFT JOIN LATERAL (
    SELECT count(*) FILTER (WHERE y.dead_at IS NULL) AS n,
           min(y.created_at) FILTER (WHERE y.dead_at IS NULL) AS oldest,
           count(*) FILTER (WHERE y.dead_at IS NOT NULL) AS dead
    FROM {held} AS y
    WHERE y.sub = s.name
) AS h ON true
WHERE ($1::text IS NULL OR s.topic = $1) AND ($2::text IS NULL OR s.name = $2)
ORDER BY s.name"#;

/// Schema version 7: a receive fills its limit from the rest of its snapshot range and then a
/// new range ending now (version 6 stopped at the end of the range), and writes its batch and
/// cursor once.
pub(crate) const V7: &str = r#"
CREATE OR REPLACE FUNCTION {receive_fn}(p_sub text, p_max integer, p_ttl_ms float8, p_token uuid,
                             p_holder text, p_max_deliveries integer, p_now timestamptz)
RETURNS TABLE (id bigint, topic text, payload bytea, headers jsonb, correlation_id uuid,
               created_at timestamptz, attempts integer, deliveries integer,
               first_attempt_at timestamptz, last_error text, acquired_at timestamptz)
LANGUAGE plpgsql SET enable_seqscan = off AS $postbox$
#variable_conflict use_column
DECLARE
    v_now     timestamptz := coalesce(p_now, now());
    v_until   timestamptz := coalesce(p_now, now()) + p_ttl_ms * interval '1 millisecond';
    v_left    integer := p_max;
    v_n       integer;
    v_topic   text;
    v_lo      pg_snapshot;
    v_hi      pg_snapshot;
    v_pos_xid xid8;
    v_pos_id  bigint;
    v_more    {log}[];
    v_rows    {log}[] := ARRAY[]::{log}[];
    c_lo      pg_snapshot;
    c_hi      pg_snapshot;
    c_pos_xid xid8;
    c_pos_id  bigint;
BEGIN
    SELECT x.topic, x.lo, x.hi, x.pos_xid, x.pos_id
    INTO v_topic, v_lo, v_hi, v_pos_xid, v_pos_id
    FROM {subs} AS x WHERE x.name = p_sub FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'postbox: no subscription %', p_sub USING ERRCODE = 'P0002';
    END IF;

    -- Batches whose lease expired: their unsettled messages are held, delivered one by one.
    WITH gone AS (
        DELETE FROM {batches} AS b
        WHERE b.sub = p_sub AND b.expires_at < v_now
        RETURNING b.ids, b.xids, b.settled, b.leased_at
    ), back AS (
        SELECT u.id AS id, u.xid AS xid, g.leased_at AS leased_at
        FROM gone AS g, unnest(g.ids, g.xids) AS u(id, xid)
        WHERE NOT (u.id = ANY (g.settled))
    )
    INSERT INTO {held} (id, sub, topic, payload, headers, correlation_id, created_at,
                        deliveries, next_attempt_at, first_attempt_at)
    SELECT l.id, p_sub, l.topic, l.payload, l.headers, l.correlation_id, l.created_at,
           1, v_now, back.leased_at
    FROM back JOIN {log} AS l ON l.topic = v_topic AND l.xid = back.xid AND l.id = back.id
    ON CONFLICT DO NOTHING;

    IF p_max_deliveries IS NOT NULL THEN
        UPDATE {held} AS h
        SET dead_at        = v_now,
            reason         = 'max_deliveries exceeded: leased ' || h.deliveries
                             || ' times without an outcome',
            acquired_token = NULL,
            acquired_at    = NULL,
            acquired_by    = NULL
        WHERE h.sub = p_sub AND h.dead_at IS NULL AND h.next_attempt_at <= v_now
          AND h.deliveries >= p_max_deliveries;
    END IF;

    -- Held messages due (retried, released, taken back, or leased and expired).
    RETURN QUERY
    WITH due AS (
        SELECT h.id AS id, h.sub AS sub FROM {held} AS h
        WHERE h.sub = p_sub AND h.dead_at IS NULL AND h.next_attempt_at <= v_now
        ORDER BY h.next_attempt_at, h.id
        LIMIT v_left
        FOR UPDATE SKIP LOCKED
    )
    UPDATE {held} AS h
    SET acquired_token   = p_token,
        acquired_at      = v_now,
        acquired_by      = p_holder,
        ttl_ms           = p_ttl_ms,
        next_attempt_at  = v_until,
        deliveries       = h.deliveries + 1,
        first_attempt_at = coalesce(h.first_attempt_at, v_now)
    FROM due WHERE h.id = due.id AND h.sub = due.sub
    RETURNING h.id, h.topic, h.payload, h.headers, h.correlation_id, h.created_at,
              h.attempts, h.deliveries, h.first_attempt_at, h.last_error, v_now;
    GET DIAGNOSTICS v_n = ROW_COUNT;
    v_left := v_left - v_n;
    IF v_left <= 0 THEN
        RETURN;
    END IF;

    -- The rest of the range, then (while the limit is not reached) a new range ending now.
    FOR v_round IN 1..2 LOOP
        SELECT coalesce(array_agg(v.r ORDER BY (v.r).xid, (v.r).id), ARRAY[]::{log}[]) INTO v_more
        FROM (
            SELECT u.r FROM (
                (SELECT l AS r FROM {log} AS l
                 WHERE l.topic = v_topic
                   AND l.xid = ANY (ARRAY(SELECT pg_snapshot_xip(v_lo)))
                   AND (l.xid, l.id) > (v_pos_xid, v_pos_id)
                   AND pg_visible_in_snapshot(l.xid, v_hi)
                 ORDER BY l.xid, l.id
                 LIMIT v_left)
                UNION ALL
                (SELECT l AS r FROM {log} AS l
                 WHERE l.topic = v_topic
                   AND l.xid >= pg_snapshot_xmax(v_lo)
                   AND l.xid < pg_snapshot_xmax(v_hi)
                   AND (l.xid, l.id) > (v_pos_xid, v_pos_id)
                   AND pg_visible_in_snapshot(l.xid, v_hi)
                 ORDER BY l.xid, l.id
                 LIMIT v_left)
            ) AS u
            ORDER BY (u.r).xid, (u.r).id
            LIMIT v_left
        ) AS v;
        v_n := cardinality(v_more);
        IF v_n > 0 THEN
            v_rows := v_rows || v_more;
            v_left := v_left - v_n;
            c_lo := v_lo;
            c_hi := v_hi;
            c_pos_xid := (v_more[v_n]).xid;
            c_pos_id := (v_more[v_n]).id;
        END IF;
        EXIT WHEN v_left <= 0 OR v_round = 2;
        -- The range is exhausted: the next one runs from its end to now.
        v_lo := v_hi;
        v_hi := pg_current_snapshot();
        v_pos_xid := '0';
        v_pos_id := 0;
    END LOOP;
    IF cardinality(v_rows) = 0 THEN
        -- An idle poll changes no row.
        RETURN;
    END IF;

    INSERT INTO {batches} (token, sub, topic, lo, ids, xids, holder, leased_at, ttl_ms,
                           expires_at)
    SELECT p_token, p_sub, v_topic, c_lo, array_agg(u.id ORDER BY u.ordinality),
           array_agg(u.xid ORDER BY u.ordinality), p_holder, v_now, p_ttl_ms, v_until
    FROM unnest(v_rows) WITH ORDINALITY AS u;
    UPDATE {subs} AS x
    SET lo = c_lo, hi = c_hi, pos_xid = c_pos_xid, pos_id = c_pos_id
    WHERE x.name = p_sub;
    RETURN QUERY
    SELECT u.id, u.topic, u.payload, u.headers, u.correlation_id, u.created_at,
           0, 1, v_now, NULL::text, v_now
    FROM unnest(v_rows) WITH ORDINALITY AS u
    ORDER BY u.ordinality;
END
$postbox$;
"#;

// $1 subscription, $2 limit, $3 ttl ms, $4 token, $5 holder, $6 max deliveries, $7 pinned now
pub(crate) const RECEIVE: &str = "SELECT * FROM {receive_fn}($1, $2, $3, $4, $5, $6, $7)";

// $1 kind, $2 ids, $3 token, $4 delay ms, $5 error or reason, $6 pinned now
pub(crate) const SETTLE: &str = "SELECT * FROM {settle_fn}($1, $2, $3, $4, $5, $6)";

// $1 subscription
pub(crate) const DEAD_LETTERS: &str = r#"
SELECT id, topic AS queue, payload, headers, correlation_id, attempts, deliveries, last_error,
       reason, dead_at
FROM {held}
WHERE sub = $1 AND dead_at IS NOT NULL
ORDER BY dead_at, id"#;

/// Whether `error` is the receive function's "no such subscription".
fn unknown_subscription(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(db) if db.code().as_deref() == Some("P0002"))
}

impl PgBackend {
    async fn subscriptions_where(
        &self,
        topic: Option<&str>,
        subscription: Option<&str>,
        conn: &mut PgConnection,
    ) -> Result<Vec<SubscriptionInfo>> {
        let rows = sqlx::query(self.shared().sql.subscriptions.clone())
            .persistent(self.shared().persistent())
            .bind(topic)
            .bind(subscription)
            .fetch_all(conn)
            .await?;
        rows.iter()
            .map(|r| {
                let mut info = SubscriptionInfo::new(
                    r.try_get::<String, _>("name")?,
                    r.try_get::<String, _>("topic")?,
                    r.try_get("created_at")?,
                );
                info.backlog = r.try_get("backlog")?;
                info.oldest_unprocessed = r.try_get("oldest")?;
                info.dead_letters = r.try_get("dead")?;
                Ok(info)
            })
            .collect()
    }
}

#[async_trait]
impl Topics for PgBackend {
    async fn subscribe(&self, topic: &str, subscription: &str) -> Result<Subscribed> {
        crate::message::validate_queue(topic)?;
        crate::message::validate_queue(subscription)?;
        let mut session = self.shared().session().await?;
        let created: Option<String> = sqlx::query_scalar(self.shared().sql.subscribe.clone())
            .persistent(self.shared().persistent())
            .bind(subscription)
            .bind(topic)
            .bind(self.shared().now())
            .fetch_optional(&mut *session)
            .await?;
        if created.is_some() {
            session.done().await?;
            tracing::debug!(target: "postbox", table = %self.shared().table, topic, subscription, "postbox.subscribe: created");
            return Ok(Subscribed::New);
        }
        // Taken, by now committed (ON CONFLICT waited for it): read it in a new statement.
        let existing: Option<String> =
            sqlx::query_scalar(self.shared().sql.subscription_topic.clone())
                .persistent(self.shared().persistent())
                .bind(subscription)
                .fetch_optional(&mut *session)
                .await?;
        session.done().await?;
        match existing {
            Some(existing) if existing == topic => Ok(Subscribed::Existing),
            Some(existing) => Err(Error::SubscriptionTopic {
                subscription: subscription.to_owned(),
                topic: topic.to_owned(),
                existing,
            }),
            // Unsubscribed between the two statements: try again.
            None => Box::pin(self.subscribe(topic, subscription)).await,
        }
    }

    async fn unsubscribe(&self, subscription: &str, pending: Unsubscribe) -> Result<bool> {
        let mut tx = self.shared().pool.begin().await?;
        let exists = sqlx::query(self.shared().sql.lock_subscription.clone())
            .persistent(self.shared().persistent())
            .bind(subscription)
            .fetch_optional(&mut *tx)
            .await?
            .is_some();
        if !exists {
            return Ok(false);
        }
        if pending == Unsubscribe::IfDrained {
            let info = self
                .subscriptions_where(None, Some(subscription), &mut tx)
                .await?;
            let backlog = info.first().map_or(0, |i| i.backlog);
            if backlog > 0 {
                return Err(Error::SubscriptionNotDrained {
                    subscription: subscription.to_owned(),
                    backlog,
                });
            }
        }
        sqlx::query(self.shared().sql.unsubscribe.clone())
            .persistent(self.shared().persistent())
            .bind(subscription)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        tracing::debug!(target: "postbox", table = %self.shared().table, subscription, ?pending, "postbox.unsubscribe");
        Ok(true)
    }

    async fn subscriptions(&self, topic: Option<&str>) -> Result<Vec<SubscriptionInfo>> {
        let mut session = self.shared().session().await?;
        let list = self.subscriptions_where(topic, None, &mut session).await?;
        session.done().await?;
        Ok(list)
    }

    async fn publish_to_topics(
        &self,
        conn: &mut PgConnection,
        messages: Vec<Message>,
    ) -> Result<Vec<Published>> {
        messages.iter().try_for_each(validate_topic_message)?;
        if messages.is_empty() {
            return Ok(Vec::new());
        }
        let mut topics = Vec::with_capacity(messages.len());
        let mut payloads = Vec::with_capacity(messages.len());
        let mut headers = Vec::with_capacity(messages.len());
        let mut correlation_ids = Vec::with_capacity(messages.len());
        let mut keys = Vec::with_capacity(messages.len());
        for mut m in messages {
            crate::trace::inject_current(&mut m);
            headers.push(m.headers.map(serde_json::Value::Object));
            correlation_ids.push(m.correlation_id.unwrap_or_else(Uuid::new_v4));
            topics.push(m.queue);
            payloads.push(m.payload);
            keys.push(m.key);
        }
        let distinct: Vec<&str> = topics
            .iter()
            .map(String::as_str)
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let rows: Vec<(MessageId, bool)> = sqlx::query_as(self.shared().sql.topic_publish.clone())
            .persistent(self.shared().persistent())
            .bind(self.shared().table.channel())
            .bind(&topics)
            .bind(&payloads)
            .bind(&headers)
            .bind(&correlation_ids)
            .bind(self.shared().now())
            .bind(&distinct)
            .bind(&keys)
            .bind(self.shared().rotator.key_retention().as_secs_f64() * 1000.0)
            .fetch_all(&mut *conn)
            .await?;
        let duplicates: Vec<usize> = rows
            .iter()
            .enumerate()
            .filter(|(_, (_, new))| !new)
            .map(|(i, _)| i)
            .collect();
        let mut existing: BTreeMap<(String, String), MessageId> = BTreeMap::new();
        if !duplicates.is_empty() {
            let dup_topics: Vec<&str> = duplicates.iter().map(|i| topics[*i].as_str()).collect();
            let dup_keys: Vec<&str> = duplicates
                .iter()
                .map(|i| keys[*i].as_deref().unwrap_or_default())
                .collect();
            let found: Vec<(String, String, MessageId)> =
                sqlx::query_as(self.shared().sql.topic_duplicates.clone())
                    .persistent(self.shared().persistent())
                    .bind(&dup_topics)
                    .bind(&dup_keys)
                    .fetch_all(&mut *conn)
                    .await?;
            existing.extend(found.into_iter().map(|(t, k, id)| ((t, k), id)));
        }
        let published = rows
            .iter()
            .zip(topics.iter().zip(&keys))
            .map(|((id, new), (topic, key))| {
                if *new {
                    return Ok(Published::New(*id));
                }
                let key = key.clone().unwrap_or_default();
                existing
                    .get(&(topic.clone(), key.clone()))
                    .map(|id| Published::Duplicate(*id))
                    .ok_or_else(|| {
                        Error::Runtime(format!(
                            "idempotency key {key:?} of topic {topic:?} was taken, then forgotten before its id could be read; publish again"
                        ))
                    })
            })
            .collect::<Result<Vec<_>>>()?;
        tracing::debug!(target: "postbox", table = %self.shared().table, rows = published.len(), duplicates = duplicates.len(), topics = distinct.len(), "postbox.publish_to_topics");
        crate::metrics::published(
            rows.iter()
                .zip(&topics)
                .filter(|((_, new), _)| *new)
                .map(|(_, topic)| topic.as_str()),
        );
        Ok(published)
    }

    async fn receive(&self, params: &Receive) -> Result<Vec<Delivery>> {
        params.validate()?;
        let token = Uuid::new_v4();
        let mut session = self.shared().session().await?;
        let rows = sqlx::query(self.shared().sql.receive.clone())
            .persistent(self.shared().persistent())
            .bind(params.get_subscription())
            .bind(i32::try_from(params.get_limit()).unwrap_or(i32::MAX))
            .bind(params.get_lease_ttl().as_secs_f64() * 1000.0)
            .bind(token)
            .bind(params.get_holder())
            .bind(
                params
                    .get_max_deliveries()
                    .map(|n| i32::try_from(n).unwrap_or(i32::MAX)),
            )
            .bind(self.shared().now())
            .fetch_all(&mut *session)
            .await;
        let rows = match rows {
            Ok(rows) => rows,
            Err(e) if unknown_subscription(&e) => {
                return Err(Error::UnknownSubscription {
                    subscription: params.get_subscription().to_owned(),
                });
            }
            Err(e) => return Err(e.into()),
        };
        session.done().await?;
        self.shared().rotator.tick();
        let deliveries = rows
            .iter()
            .map(|r| {
                let acquired_at = r.try_get("acquired_at")?;
                Ok(Delivery {
                    envelope: super::inspect::envelope(r, "topic")?,
                    created_at: r.try_get("created_at")?,
                    next_attempt_at: acquired_at,
                    first_attempt_at: r.try_get("first_attempt_at")?,
                    acquired_at,
                    token,
                    acquired_by: params.get_holder().map(str::to_owned),
                    cancel: Cancellation::default(),
                })
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()?;
        if !deliveries.is_empty() {
            tracing::debug!(target: "postbox", table = %self.shared().table, subscription = params.get_subscription(), rows = deliveries.len(), batch = %token, "postbox.receive");
        }
        Ok(deliveries)
    }

    async fn settle(&self, leases: &[Lease], settlement: Settlement) -> Result<Vec<MessageId>> {
        settlement.validate()?;
        let (kind, delay_ms, text) = match &settlement {
            Settlement::Ack => ("ack", 0.0, None),
            Settlement::Retry(params) => (
                "retry",
                params.get_delay().as_secs_f64() * 1000.0,
                params.get_error().map(str::to_owned),
            ),
            Settlement::DeadLetter(reason) => ("bury", 0.0, Some(reason.clone())),
            Settlement::Release => ("release", 0.0, None),
            Settlement::Renew => ("renew", 0.0, None),
        };
        let mut by_token: BTreeMap<Uuid, Vec<MessageId>> = BTreeMap::new();
        for lease in leases {
            by_token.entry(lease.token).or_default().push(lease.id);
        }
        let mut settled = Vec::with_capacity(leases.len());
        for (token, ids) in by_token {
            let mut session = self.shared().session().await?;
            let done: Vec<MessageId> = sqlx::query_scalar(self.shared().sql.settle.clone())
                .persistent(self.shared().persistent())
                .bind(kind)
                .bind(&ids)
                .bind(token)
                .bind(delay_ms)
                .bind(text.as_deref())
                .bind(self.shared().now())
                .fetch_all(&mut *session)
                .await?;
            session.done().await?;
            tracing::debug!(target: "postbox", table = %self.shared().table, batch = %token, settlement = kind, rows = done.len(), lost = ids.len() - done.len().min(ids.len()), "postbox.settle");
            settled.extend(done);
        }
        Ok(settled)
    }

    async fn subscription_dead_letters(&self, subscription: &str) -> Result<Vec<DeadLetter>> {
        let mut session = self.shared().session().await?;
        let rows = sqlx::query(self.shared().sql.topic_dead_letters.clone())
            .persistent(self.shared().persistent())
            .bind(subscription)
            .fetch_all(&mut *session)
            .await?;
        session.done().await?;
        Ok(rows
            .iter()
            .map(super::inspect::dead_letter)
            .collect::<Result<_, _>>()?)
    }
}
