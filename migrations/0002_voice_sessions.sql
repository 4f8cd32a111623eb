-- One row per voice session: opened when the relay starts, finalised when it ends (however it ends).
CREATE TABLE voice_sessions (
    id           uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id      uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    step_id      uuid NOT NULL REFERENCES steps (id) ON DELETE CASCADE,
    instance     text NOT NULL DEFAULT '',
    started_at   timestamptz NOT NULL DEFAULT now(),
    ended_at     timestamptz,
    close_code   integer,
    close_reason text,
    bytes_in     bigint NOT NULL DEFAULT 0,
    bytes_out    bigint NOT NULL DEFAULT 0,
    upstream_reconnects integer NOT NULL DEFAULT 0
);
CREATE INDEX voice_sessions_step_idx ON voice_sessions (step_id, started_at DESC);
-- Live sessions of a user, for the per-user session limit.
CREATE INDEX voice_sessions_open_idx ON voice_sessions (user_id) WHERE ended_at IS NULL;
