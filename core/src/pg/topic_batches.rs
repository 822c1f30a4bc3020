//! Schema version 8: topic batches in generations reclaimed by `TRUNCATE`, and a
//! subscription's cursor in its newest batch.
//!
//! Version 6 kept the cursor in the subscription's row, updated by every receive, and deleted
//! a batch when it was acked. While a long transaction holds the database's xmin horizon,
//! neither kind of dead row can be removed: the subscription row grew a chain of versions
//! every receive walked, and the look for expired batches walked every deleted one. Here a
//! receive appends one batch row that also records the cursor after it, the subscription row
//! is only locked, settling marks the batch done (a HOT update), and the look for expired
//! batches runs once per [`EXPIRED_BATCH_CHECK`](crate::topic::EXPIRED_BATCH_CHECK). Rotation
//! truncates a generation of batches once none of them is unsettled, carrying the cursor of a
//! subscription whose newest batch is there into its row (`rotate/log.rs`).

/// The migration: the batches table rebuilt partitioned, then the receive and settle
/// functions that use it.
pub(crate) const V8: &str = r#"
ALTER TABLE {batches} RENAME TO {batches_v7_name};

CREATE SEQUENCE {batch_seq} AS bigint;

CREATE TABLE {batches} (
    slot       smallint    NOT NULL,
    seq        bigint      NOT NULL DEFAULT nextval('{batch_seq}'),
    token      uuid        NOT NULL,
    sub        text        NOT NULL REFERENCES {subs} (name) ON DELETE CASCADE,
    topic      text        NOT NULL,
    lo         pg_snapshot NOT NULL,
    hi         pg_snapshot NOT NULL,
    pos_xid    xid8        NOT NULL,
    pos_id     bigint      NOT NULL,
    checked_at timestamptz,
    ids        bigint[]    NOT NULL,
    xids       xid8[]      NOT NULL,
    settled    bigint[]    NOT NULL DEFAULT ARRAY[]::bigint[],
    done       boolean     NOT NULL DEFAULT false,
    holder     text,
    leased_at  timestamptz NOT NULL,
    ttl_ms     float8      NOT NULL,
    expires_at timestamptz NOT NULL
) PARTITION BY LIST (slot);

ALTER SEQUENCE {batch_seq} OWNED BY {batches}.seq;

-- Room on each page for the one HOT update a batch gets when it is settled.
CREATE TABLE {batches_p0} PARTITION OF {batches} FOR VALUES IN (0) WITH (fillfactor = 50);
CREATE TABLE {batches_p1} PARTITION OF {batches} FOR VALUES IN (1) WITH (fillfactor = 50);
CREATE TABLE {batches_p2} PARTITION OF {batches} FOR VALUES IN (2) WITH (fillfactor = 50);

ALTER TABLE {subs} ADD COLUMN checked_at timestamptz;

-- Unsettled batches move over; each subscription's cursor stays in its row.
INSERT INTO {batches} (slot, token, sub, topic, lo, hi, pos_xid, pos_id, ids, xids, settled,
                       holder, leased_at, ttl_ms, expires_at)
SELECT (SELECT (last_value % {generations})::smallint FROM {log_gen}), o.token, o.sub, o.topic,
       s.lo, s.hi, s.pos_xid, s.pos_id, o.ids, o.xids, o.settled, o.holder, o.leased_at,
       o.ttl_ms, o.expires_at
FROM {batches_v7} AS o JOIN {subs} AS s ON s.name = o.sub
ORDER BY o.leased_at;

DROP TABLE {batches_v7};

CREATE INDEX {batch_idx} ON {batches} (sub, seq);
CREATE INDEX {batch_token_idx} ON {batches} (token);

CREATE OR REPLACE FUNCTION {receive_fn}(p_sub text, p_max integer, p_ttl_ms float8, p_token uuid,
                             p_holder text, p_max_deliveries integer, p_now timestamptz)
RETURNS TABLE (id bigint, topic text, payload bytea, headers jsonb, correlation_id uuid,
               created_at timestamptz, attempts integer, deliveries integer,
               first_attempt_at timestamptz, last_error text, acquired_at timestamptz)
LANGUAGE plpgsql SET enable_seqscan = off SET jit = off AS $postbox$
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
    v_checked timestamptz;
BEGIN
    -- Receivers of one subscription take turns. The row is locked, never updated: the
    -- cursor is the subscription's newest batch (or, before its first one and after
    -- rotation carried it over, the row itself).
    SELECT x.topic INTO v_topic FROM {subs} AS x WHERE x.name = p_sub FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'postbox: no subscription %', p_sub USING ERRCODE = 'P0002';
    END IF;
    SELECT c.lo, c.hi, c.pos_xid, c.pos_id, c.checked_at
    INTO v_lo, v_hi, v_pos_xid, v_pos_id, v_checked
    FROM ((SELECT b.lo, b.hi, b.pos_xid, b.pos_id, b.checked_at
           FROM {batches} AS b WHERE b.sub = p_sub ORDER BY b.seq DESC LIMIT 1)
          UNION ALL
          (SELECT x.lo, x.hi, x.pos_xid, x.pos_id, x.checked_at
           FROM {subs} AS x WHERE x.name = p_sub)
          LIMIT 1) AS c;

    -- Batches whose lease expired: their unsettled messages are held, delivered one by
    -- one. Looked for once per {expiry_check_ms} ms, not at every receive: the look reads
    -- every batch of the subscription since the last rotation.
    IF v_checked IS NULL OR v_checked <= v_now - {expiry_check_ms} * interval '1 millisecond' THEN
    v_checked := v_now;
    WITH gone AS (
        UPDATE {batches} AS b SET done = true
        WHERE b.sub = p_sub AND NOT b.done AND b.expires_at < v_now
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
    END IF;

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
                -- One index probe per transaction in flight at `lo`: as a filter,
                -- `xid = ANY (...)` made generic plans read every row after the position.
                (SELECT y.r FROM pg_snapshot_xip(v_lo) AS x(xid)
                 CROSS JOIN LATERAL (
                     SELECT l AS r FROM {log} AS l
                     WHERE l.topic = v_topic
                       AND l.xid = x.xid
                       AND (l.xid, l.id) > (v_pos_xid, v_pos_id)
                       AND pg_visible_in_snapshot(l.xid, v_hi)
                     ORDER BY l.id
                     LIMIT v_left) AS y
                 ORDER BY (y.r).xid, (y.r).id
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

    -- One row: the batch, and the cursor after it.
    INSERT INTO {batches} (slot, token, sub, topic, lo, hi, pos_xid, pos_id, checked_at, ids,
                           xids, holder, leased_at, ttl_ms, expires_at)
    SELECT (SELECT (last_value % {generations})::smallint FROM {log_gen}), p_token, p_sub,
           v_topic, c_lo, c_hi, c_pos_xid, c_pos_id, v_checked,
           array_agg(u.id ORDER BY u.ordinality), array_agg(u.xid ORDER BY u.ordinality),
           p_holder, v_now, p_ttl_ms, v_until
    FROM unnest(v_rows) WITH ORDINALITY AS u;
    RETURN QUERY
    SELECT u.id, u.topic, u.payload, u.headers, u.correlation_id, u.created_at,
           0, 1, v_now, NULL::text, v_now
    FROM unnest(v_rows) WITH ORDINALITY AS u
    ORDER BY u.ordinality;
END
$postbox$;

CREATE OR REPLACE FUNCTION {settle_fn}(p_kind text, p_ids bigint[], p_token uuid, p_delay_ms float8,
                            p_text text, p_now timestamptz)
RETURNS SETOF bigint
LANGUAGE plpgsql SET enable_seqscan = off SET jit = off AS $postbox$
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
    FROM {batches} AS x WHERE x.token = p_token AND NOT x.done FOR UPDATE;
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
                WHERE x.token = p_token AND NOT x.done;
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
                -- The row stays (it may hold the cursor) until rotation truncates its
                -- generation; only a column no index covers changes, so the update is HOT.
                IF cardinality(b.settled) + cardinality(v_mine) >= cardinality(b.ids) THEN
                    UPDATE {batches} AS x SET done = true
                    WHERE x.token = p_token AND NOT x.done;
                ELSE
                    UPDATE {batches} AS x SET settled = x.settled || v_mine
                    WHERE x.token = p_token AND NOT x.done;
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
