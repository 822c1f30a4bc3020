//! Schema version 9: the topic receive reads its range without sorting rows.
//!
//! Version 8's receive gathered the range's messages as whole rows and ordered them by fields
//! of those rows (`(r).xid, (r).id`): the planner could not merge the two index branches in
//! order, so each receive sorted its rows twice, then unnested them again to build the batch's
//! id arrays, sorting once more. Here the keys travel as columns beside the row, the branches
//! merge in index order, and the ids are aggregated in the same pass. Same messages, same
//! order, same batch row; about a fifth less server time per received message
//! (`docs/design/storage.md`, *Topics*).

/// The migration: the receive function replaced.
pub(crate) const V9: &str = r#"
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
    v_ids     bigint[] := ARRAY[]::bigint[];
    v_xids    xid8[] := ARRAY[]::xid8[];
    v_more_ids  bigint[];
    v_more_xids xid8[];
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
        -- The keys travel as columns, so both branches merge in index order and the
        -- aggregates read that order (a plain aggregate consumes its input in order): no
        -- sort of composite values, and the batch's ids come without unnesting the rows.
        SELECT coalesce(array_agg(v.r), ARRAY[]::{log}[]),
               coalesce(array_agg(v.id), ARRAY[]::bigint[]),
               coalesce(array_agg(v.xid), ARRAY[]::xid8[])
        INTO v_more, v_more_ids, v_more_xids
        FROM (
            SELECT u.xid, u.id, u.r FROM (
                -- One index probe per transaction in flight at `lo`: as a filter,
                -- `xid = ANY (...)` made generic plans read every row after the position.
                (SELECT y.xid, y.id, y.r FROM pg_snapshot_xip(v_lo) AS x(xid)
                 CROSS JOIN LATERAL (
                     SELECT l.xid, l.id, l AS r FROM {log} AS l
                     WHERE l.topic = v_topic
                       AND l.xid = x.xid
                       AND (l.xid, l.id) > (v_pos_xid, v_pos_id)
                       AND pg_visible_in_snapshot(l.xid, v_hi)
                     ORDER BY l.id
                     LIMIT v_left) AS y
                 ORDER BY y.xid, y.id
                 LIMIT v_left)
                UNION ALL
                (SELECT l.xid, l.id, l AS r FROM {log} AS l
                 WHERE l.topic = v_topic
                   AND l.xid >= pg_snapshot_xmax(v_lo)
                   AND l.xid < pg_snapshot_xmax(v_hi)
                   AND (l.xid, l.id) > (v_pos_xid, v_pos_id)
                   AND pg_visible_in_snapshot(l.xid, v_hi)
                 ORDER BY l.xid, l.id
                 LIMIT v_left)
            ) AS u
            ORDER BY u.xid, u.id
            LIMIT v_left
        ) AS v;
        v_n := cardinality(v_more);
        IF v_n > 0 THEN
            IF cardinality(v_rows) = 0 THEN
                -- The usual case: one range fills the limit, nothing to copy.
                v_rows := v_more;
                v_ids := v_more_ids;
                v_xids := v_more_xids;
            ELSE
                v_rows := v_rows || v_more;
                v_ids := v_ids || v_more_ids;
                v_xids := v_xids || v_more_xids;
            END IF;
            v_left := v_left - v_n;
            c_lo := v_lo;
            c_hi := v_hi;
            c_pos_xid := v_more_xids[v_n];
            c_pos_id := v_more_ids[v_n];
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
    VALUES ((SELECT (last_value % {generations})::smallint FROM {log_gen}), p_token, p_sub,
            v_topic, c_lo, c_hi, c_pos_xid, c_pos_id, v_checked, v_ids, v_xids,
            p_holder, v_now, p_ttl_ms, v_until);
    RETURN QUERY
    SELECT u.id, u.topic, u.payload, u.headers, u.correlation_id, u.created_at,
           0, 1, v_now, NULL::text, v_now
    FROM unnest(v_rows) AS u;
END
$postbox$;"#;
