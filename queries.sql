-- Every SQL statement of the service, by name (loaded once by aiosql; `^` = one row, `$` = one value,
-- `!` = no result). Ownership is always decided in the WHERE clause.

-- name: get_user_for_login(email)^
SELECT id, password_hash FROM users WHERE email = :email;

-- name: get_user(user_id)^
SELECT id, email, full_name, user_data FROM users WHERE id = :user_id;

-- name: get_user_id_by_email(email)$
SELECT id FROM users WHERE email = :email;

-- name: insert_user(email, password_hash, full_name, user_data)$
INSERT INTO users (email, password_hash, full_name, user_data)
VALUES (:email, :password_hash, :full_name, :user_data)
RETURNING id;

-- name: insert_impact(user_id, title, description)$
INSERT INTO impacts (user_id, title, description)
VALUES (:user_id, :title, :description)
RETURNING id;

-- name: insert_step(impact_id, step_order, title, description, icon)$
-- The order defaults to the next free one of the impact; the step carries its impact's owner.
INSERT INTO steps (user_id, impact_id, step_order, title, description, icon)
SELECT i.user_id, i.id,
       coalesce(:step_order, (SELECT coalesce(max(s.step_order), 0) + 1 FROM steps s WHERE s.impact_id = i.id)),
       :title, :description, :icon
FROM impacts i
WHERE i.id = :impact_id
RETURNING id;

-- name: list_impacts_with_steps(user_id)
-- The caller's impacts, each with its steps in order, as one JSON array per impact.
SELECT i.id, i.title, i.description,
       coalesce(
           jsonb_agg(
               jsonb_build_object('id', s.id, 'order', s.step_order, 'title', s.title,
                                  'description', s.description, 'icon', s.icon)
               ORDER BY s.step_order
           ) FILTER (WHERE s.id IS NOT NULL),
           '[]'::jsonb
       ) AS steps
FROM impacts i
LEFT JOIN steps s ON s.impact_id = i.id AND s.user_id = i.user_id
WHERE i.user_id = :user_id
GROUP BY i.id
ORDER BY i.created_at, i.id;

-- name: get_session_context(user_id, step_id)^
-- One round trip decides every refusal of the voice handshake and gathers the coach's context:
-- the user (NULL: "User not found"), the step if it is theirs (NULL: "Step not found"), its impact if
-- that is theirs too (NULL: "Impact not found"), the neighbouring steps and the progress.
SELECT u.id AS user_id, u.full_name, u.user_data,
       s.id AS step_id, s.step_order, s.title AS step_title, s.description AS step_description,
       s.icon AS step_icon,
       i.id AS impact_id, i.title AS impact_title, i.description AS impact_description,
       prev.title AS previous_step_title, next.title AS next_step_title,
       (SELECT count(*) FROM steps c WHERE c.impact_id = i.id AND c.user_id = u.id
            AND c.step_order <= s.step_order) AS current_order,
       (SELECT count(*) FROM steps c WHERE c.impact_id = i.id AND c.user_id = u.id) AS total_steps
FROM users u
LEFT JOIN steps s ON s.id = :step_id AND s.user_id = u.id
LEFT JOIN impacts i ON i.id = s.impact_id AND i.user_id = u.id
LEFT JOIN LATERAL (
    SELECT p.title FROM steps p
    WHERE p.impact_id = i.id AND p.user_id = u.id AND p.step_order < s.step_order
    ORDER BY p.step_order DESC LIMIT 1
) prev ON true
LEFT JOIN LATERAL (
    SELECT n.title FROM steps n
    WHERE n.impact_id = i.id AND n.user_id = u.id AND n.step_order > s.step_order
    ORDER BY n.step_order LIMIT 1
) next ON true
WHERE u.id = :user_id;

-- name: lock_user_sessions(user_id)$
-- Serialises session admission per user across every instance, until the transaction ends.
SELECT pg_advisory_xact_lock(hashtextextended(CAST(CAST(:user_id AS uuid) AS text), 0));

-- name: open_voice_session(user_id, step_id, instance, max_sessions, max_session_seconds)$
-- Opens the session row unless the user already has `max_sessions` live ones. Rows left open by an
-- instance that died count only until they are older than the longest possible session.
INSERT INTO voice_sessions (user_id, step_id, instance)
SELECT :user_id, :step_id, :instance
WHERE (
    SELECT count(*) FROM voice_sessions
    WHERE user_id = :user_id AND ended_at IS NULL
      AND started_at > now() - make_interval(secs => :max_session_seconds + 60)
) < :max_sessions
RETURNING id;

-- name: finish_voice_session(session_id, close_code, close_reason, bytes_in, bytes_out, upstream_reconnects)!
UPDATE voice_sessions
SET ended_at = now(), close_code = :close_code, close_reason = :close_reason,
    bytes_in = :bytes_in, bytes_out = :bytes_out, upstream_reconnects = :upstream_reconnects
WHERE id = :session_id AND ended_at IS NULL;

-- name: count_login_attempt(key, window_seconds)^
-- Counts one attempt in the key's current fixed window; returns the count and the window's end.
INSERT INTO login_attempts AS a (key, window_start)
VALUES (:key, to_timestamp(floor(extract(epoch FROM now()) / :window_seconds) * :window_seconds))
ON CONFLICT (key, window_start) DO UPDATE SET attempts = a.attempts + 1
RETURNING attempts, extract(epoch FROM a.window_start + make_interval(secs => :window_seconds) - now())
          AS seconds_left;

-- name: forget_old_login_attempts()!
DELETE FROM login_attempts WHERE window_start < now() - interval '1 day';

-- name: spend_ticket(nonce, expires_in)$
-- The nonce is recorded once; a second spend finds it and returns nothing.
INSERT INTO spent_tickets (nonce, expires_at)
VALUES (:nonce, now() + make_interval(secs => :expires_in))
ON CONFLICT (nonce) DO NOTHING
RETURNING nonce;

-- name: forget_expired_tickets()!
DELETE FROM spent_tickets WHERE expires_at < now();

-- name: insert_transcript_lines(session_id, seq, role, text, spoken_at)*!
INSERT INTO transcripts (session_id, seq, role, text, spoken_at)
VALUES (:session_id, :seq, :role, :text, :spoken_at);

-- name: step_belongs_to(step_id, user_id)$
SELECT EXISTS (
    SELECT 1 FROM steps s JOIN impacts i ON i.id = s.impact_id AND i.user_id = s.user_id
    WHERE s.id = :step_id AND s.user_id = :user_id
);

-- name: list_conversations(user_id, step_id, before, page_size)
-- The caller's sessions on a step, newest first, each with its transcript in order.
SELECT v.id, v.started_at, v.ended_at, v.close_code, v.close_reason,
       coalesce(
           (SELECT jsonb_agg(jsonb_build_object('role', t.role, 'text', t.text, 'at', t.spoken_at)
                             ORDER BY t.seq)
            FROM transcripts t WHERE t.session_id = v.id),
           '[]'::jsonb
       ) AS transcript
FROM voice_sessions v
WHERE v.user_id = :user_id AND v.step_id = :step_id
  AND (CAST(:before AS timestamptz) IS NULL OR v.started_at < CAST(:before AS timestamptz))
ORDER BY v.started_at DESC, v.id DESC
LIMIT :page_size;
