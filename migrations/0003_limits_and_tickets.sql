-- Login attempts counted per key ("email:..." or "addr:...") in fixed windows, shared by all instances.
CREATE TABLE login_attempts (
    key          text NOT NULL,
    window_start timestamptz NOT NULL,
    attempts     integer NOT NULL DEFAULT 1,
    PRIMARY KEY (key, window_start)
);

-- Voice tickets are single-use: a ticket's nonce is recorded when it is spent.
CREATE TABLE spent_tickets (
    nonce      text PRIMARY KEY,
    expires_at timestamptz NOT NULL
);
CREATE INDEX spent_tickets_expires_idx ON spent_tickets (expires_at);
