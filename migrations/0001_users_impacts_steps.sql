-- Users, their plans (impacts) and the steps of each plan.
CREATE EXTENSION IF NOT EXISTS citext;

CREATE TABLE users (
    id            uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    email         citext NOT NULL UNIQUE,
    password_hash text NOT NULL,
    full_name     text NOT NULL,
    user_data     jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at    timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE impacts (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id     uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    title       text NOT NULL,
    description text NOT NULL DEFAULT '',
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX impacts_user_id_idx ON impacts (user_id);

CREATE TABLE steps (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id     uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    impact_id   uuid NOT NULL REFERENCES impacts (id) ON DELETE CASCADE,
    step_order  integer NOT NULL CHECK (step_order >= 1),
    title       text NOT NULL,
    description text NOT NULL DEFAULT '',
    icon        text NOT NULL DEFAULT '',
    created_at  timestamptz NOT NULL DEFAULT now(),
    -- The order is unique within a plan; this index also serves "the steps of an impact, in order".
    CONSTRAINT steps_impact_order_key UNIQUE (impact_id, step_order)
);
CREATE INDEX steps_user_id_idx ON steps (user_id);
