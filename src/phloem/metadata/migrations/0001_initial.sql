CREATE TABLE api_keys (
    id          text PRIMARY KEY,
    key_hash    text NOT NULL UNIQUE,
    name        text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE branches (
    id                  text PRIMARY KEY,
    name                text NOT NULL UNIQUE,
    parent_id           text REFERENCES branches (id),
    port                integer NOT NULL UNIQUE,
    database            text NOT NULL,
    role                text NOT NULL,
    role_password       text NOT NULL,
    superuser_password  text NOT NULL,
    state               text NOT NULL,
    created_at          timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE functions (
    id                    text PRIMARY KEY,
    number                serial UNIQUE,
    branch_id             text NOT NULL REFERENCES branches (id) ON DELETE CASCADE,
    slug                  text NOT NULL,
    name                  text NOT NULL,
    runtime               text NOT NULL,
    active_deployment_id  text,
    created_at            timestamptz NOT NULL DEFAULT now(),
    updated_at            timestamptz NOT NULL DEFAULT now(),
    UNIQUE (branch_id, slug)
);

CREATE TABLE deployments (
    id               text PRIMARY KEY,
    function_id      text NOT NULL REFERENCES functions (id) ON DELETE CASCADE,
    artifact_sha256  text NOT NULL,
    runtime          text NOT NULL,
    entry            text NOT NULL,
    env              jsonb NOT NULL DEFAULT '{}',
    status           text NOT NULL,
    error            text,
    build_log        text NOT NULL DEFAULT '',
    created_at       timestamptz NOT NULL DEFAULT now(),
    finished_at      timestamptz
);

CREATE INDEX deployments_function_idx ON deployments (function_id, created_at DESC);
