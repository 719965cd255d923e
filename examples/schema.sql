-- The tiny app schema the examples share: a blog where readers comment on posts.
-- nudge's own table, nudge.events, is created by `nudge migrate`; this file only holds the app's tables.
CREATE TABLE IF NOT EXISTS comments (
    id         bigserial PRIMARY KEY,
    post_id    bigint      NOT NULL,
    author     text        NOT NULL,
    body       text        NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS messages (
    id         bigserial PRIMARY KEY,
    sender     text        NOT NULL,
    recipient  text        NOT NULL,
    body       text        NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
