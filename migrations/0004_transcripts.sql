-- What was said in each voice session: one row per utterance, in order.
CREATE TABLE transcripts (
    session_id uuid NOT NULL REFERENCES voice_sessions (id) ON DELETE CASCADE,
    seq        integer NOT NULL,
    role       text NOT NULL CHECK (role IN ('user', 'coach')),
    text       text NOT NULL,
    spoken_at  timestamptz NOT NULL,
    PRIMARY KEY (session_id, seq)
);
