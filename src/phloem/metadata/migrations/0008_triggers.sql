-- Schedule triggers (neon.ts `triggers`, phloemfile.py `triggers=`): a named cron
-- schedule per branch that POSTs to one of its functions. The function is named by slug,
-- not referenced: a project may declare a trigger before (or without) deploying its
-- function; a delivery then fails and says so in the history.
CREATE TABLE triggers (
    id             text PRIMARY KEY,
    branch_id      text NOT NULL REFERENCES branches (id) ON DELETE CASCADE,
    name           text NOT NULL,
    function_slug  text NOT NULL,
    cron           text NOT NULL,
    function_path  text NOT NULL DEFAULT '/',
    enabled        boolean NOT NULL DEFAULT true,
    owner          text,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    UNIQUE (branch_id, name)
);

-- One row per invocation (its id is the X-Neon-Invocation-Id the function sees); the
-- attempts of one invocation share it (at-least-once: the function may see it twice).
CREATE TABLE trigger_runs (
    id              text PRIMARY KEY,
    trigger_id      text NOT NULL REFERENCES triggers (id) ON DELETE CASCADE,
    scheduled_for   timestamptz NOT NULL,
    reason          text NOT NULL,
    status          text NOT NULL,
    attempts        integer NOT NULL DEFAULT 0,
    http_status     integer,
    error           text,
    started_at      timestamptz NOT NULL DEFAULT now(),
    finished_at     timestamptz
);

CREATE INDEX trigger_runs_trigger_idx ON trigger_runs (trigger_id, started_at DESC);
